"""What comes back from a sandbox for well-known plugins is checked before pytest's copy takes it."""

from __future__ import annotations

import pathlib

import pytest

from pytest_sandbox import plugin_state
from pytest_sandbox.protocol import ProtocolError


def test_coverage_files_must_be_absolute_and_visible_to_the_sandbox(tmp_path: pathlib.Path) -> None:
    hidden = [str(tmp_path / "secret")]
    ok = str(tmp_path / "lib.py")
    assert plugin_state._checked_files({ok: [1, 2]}, arcs=False, hidden=hidden) == {ok: [1, 2]}
    for path in ("relative.py", str(tmp_path / "secret" / "key.py"), str(tmp_path / "x" / ".." / "secret" / "k")):
        with pytest.raises(ProtocolError, match="cannot see"):
            plugin_state._checked_files({path: [1]}, arcs=False, hidden=hidden)


def test_a_symlink_into_a_hidden_place_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ProtocolError, match="cannot see"):
        plugin_state._checked_files(
            {str(tmp_path / "link" / "k.py"): [1]}, arcs=False, hidden=[str(tmp_path / "secret")]
        )


@pytest.mark.parametrize(
    ("numbers", "arcs"),
    [
        (["1"], False),
        ([True], False),
        ([1.5], False),
        ([[1, 2]], False),
        ([1], True),
        ([[1]], True),
        ([["a", 1]], True),
    ],
)
def test_coverage_numbers_must_be_lines_or_arcs(numbers: list[object], arcs: bool) -> None:
    with pytest.raises(ProtocolError, match="not a list of"):
        plugin_state._checked_files({"/src/lib.py": numbers}, arcs=arcs, hidden=[])


def test_arcs_become_pairs() -> None:
    assert plugin_state._checked_files({"/src/lib.py": [[-1, 1], [1, 2]]}, arcs=True, hidden=[]) == {
        "/src/lib.py": [(-1, 1), (1, 2)]
    }


def test_files_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not a mapping"):
        plugin_state._checked_files(["/src/lib.py"], arcs=False, hidden=[])
