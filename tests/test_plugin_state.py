"""What comes back from a sandbox for well-known plugins is checked before pytest's copy takes it."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

from pytest_sandbox import plugin_results, plugin_state
from pytest_sandbox.protocol import ProtocolError

LIB = plugin_state.__file__  # a regular file the sandbox sees as the host has it
SHOWN = [os.path.dirname(LIB)]  # even where the checkout lies under /tmp


def test_coverage_files_must_be_absolute_and_visible_to_the_sandbox(tmp_path: pathlib.Path) -> None:
    hidden = [str(tmp_path / "secret")]
    ok = tmp_path / "lib.py"
    ok.write_text("x = 1\n")
    shown = [str(tmp_path)]  # under /tmp, a fresh tmpfs: only what the sandbox shows again
    assert plugin_state._checked_files({str(ok): [1, 2]}, arcs=False, hidden=hidden, shown=shown) == {str(ok): [1, 2]}
    for path in ("relative.py", str(tmp_path / "secret" / "key.py"), str(tmp_path / "x" / ".." / "secret" / "k")):
        with pytest.raises(ProtocolError, match="cannot see"):
            plugin_state._checked_files({path: [1]}, arcs=False, hidden=hidden, shown=shown)


def test_coverage_files_relative_to_the_cwd_are_taken_as_measured(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """coverage's ``relative_files = True`` records paths relative to the cwd, which the sandbox shares."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    shown = [str(tmp_path)]
    assert plugin_state._checked_files({"pkg/mod.py": [1]}, arcs=False, hidden=[], shown=shown) == {"pkg/mod.py": [1]}
    with pytest.raises(ProtocolError, match="cannot see"):  # resolved first, then checked as any path
        plugin_state._checked_files({"x/../pkg/mod.py": [1]}, arcs=False, hidden=[str(tmp_path / "pkg")], shown=shown)


@pytest.mark.parametrize(
    "path",
    [
        "/dev/zero",  # coverage's report would read it forever
        "/proc/self/environ",  # the host's, not the sandbox's
        "/x/" + "a/" * 3000,  # past PATH_MAX: realpath is quadratic in components
        "/nonexistent/lib.py",
    ],
    ids=["device", "proc", "long", "missing"],
)
def test_coverage_of_what_the_sandbox_did_not_see_as_the_host_has_it(path: str) -> None:
    with pytest.raises(ProtocolError, match="cannot see"):
        plugin_state._checked_files({path: [1]}, arcs=False, hidden=[], shown=SHOWN)


def test_coverage_of_a_host_file_under_a_fresh_tmpfs(tmp_path: pathlib.Path) -> None:
    """/tmp (/run, /var/tmp) is a fresh tmpfs in a sandbox: only the paths it shows again are the host's."""
    host_only = tmp_path / "host_only.py"
    host_only.write_text("x = 1\n")
    assert str(tmp_path).startswith(("/tmp/", "/var/tmp/", "/run/")), "pytest's basetemp is not under /tmp"
    with pytest.raises(ProtocolError, match="cannot see"):
        plugin_state._checked_files({str(host_only): [1]}, arcs=False, hidden=[], shown=SHOWN)


@pytest.mark.parametrize("numbers", [[-1], [2**24], [2**60]])
def test_line_numbers_coverage_cannot_store(numbers: list[int]) -> None:
    with pytest.raises(ProtocolError, match="not a list of"):
        plugin_state._checked_files({LIB: numbers}, arcs=False, hidden=[], shown=SHOWN)


def test_line_bitmaps_within_a_budget() -> None:
    budget = [1000]
    plugin_state._checked_files({LIB: [4000]}, arcs=False, hidden=[], shown=SHOWN, budget=budget)
    with pytest.raises(ProtocolError, match="more lines"):
        plugin_state._checked_files({LIB: [4000]}, arcs=False, hidden=[], shown=SHOWN, budget=budget)


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
        plugin_state._checked_files({LIB: numbers}, arcs=arcs, hidden=[], shown=SHOWN)


def test_arcs_become_pairs() -> None:
    assert plugin_state._checked_files({LIB: [[-1, 1], [1, 2]]}, arcs=True, hidden=[], shown=SHOWN) == {
        LIB: [(-1, 1), (1, 2)]
    }


def test_files_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not a mapping"):
        plugin_state._checked_files(["/src/lib.py"], arcs=False, hidden=[], shown=SHOWN)


# -- plugin_results: pytest-benchmark, flaky, syrupy ----------------------------------------------------------


def test_a_snapshot_extension_is_never_imported_for_a_sandbox() -> None:
    """Only a class pytest already loaded: importing ``antigravity`` would open a web browser."""
    pytest.importorskip("syrupy")  # a dev dependency
    assert "antigravity" not in sys.modules
    for name in (["antigravity", "X"], ["os", "system"], ["syrupy", "__class__"], ["os", "path.join"], "os"):
        with pytest.raises(ProtocolError, match="snapshot extension"):
            plugin_results._extension_class(name)
    assert "antigravity" not in sys.modules
    amber = plugin_results._extension_class(["syrupy.extensions.amber", "AmberSnapshotExtension"])
    assert amber.__name__ == "AmberSnapshotExtension"


def test_a_benchmark_profile_becomes_pstats() -> None:
    stats = plugin_results._profile([["/src/f.py", 3, "f", 2, 4, 0.5, 1.0]])
    assert stats is not None and stats.stats == {("/src/f.py", 3, "f"): (2, 4, 0.5, 1.0, {})}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "entry",
    [
        ["/src/f.py", 3, "f", -1, 4, 0.5, 1.0],  # negative calls
        ["/src/f.py", 3, "f", 2, 4, float("inf"), 1.0],  # a time that is no number
        ["/src/f.py", True, "f", 2, 4, 0.5, 1.0],  # a line that is a flag
        ["/src/f.py", 3, "f", 2, 4, 0.5],  # too short
        ["/src/f\0.py", 3, "f", 2, 4, 0.5, 1.0],
    ],
)
def test_a_malformed_benchmark_profile_is_refused(entry: list[object]) -> None:
    with pytest.raises(ProtocolError, match="profile"):
        plugin_results._profile([entry])
