"""Hostile tests against --sandbox-keep: nothing pytest or the CLI does with a kept layer follows a link the
sandbox planted in it (the layer is the test's, its metadata and the host are not)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from oci_inputs import BUSYBOX

pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")


@pytest.fixture
def visible_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An image store where the inner session's sandboxes see the host (not under /tmp, which every sandbox
    covers, nor under the pytester dir, which they overlay): the sandbox can reach its read/write layer there
    and so plant what it likes in it."""
    candidates = [pwd.getpwuid(os.getuid()).pw_dir, str(request.config.rootpath)]
    parent = next((c for c in candidates if os.access(c, os.W_OK | os.X_OK)), None)
    if parent is None:
        pytest.fail(f"none of {candidates} is writable: no place for a store the sandbox sees")
    store = Path(tempfile.mkdtemp(prefix=".pytest-sandbox-hostile-", dir=parent))
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    yield store
    shutil.rmtree(store, ignore_errors=True)


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=60)


def test_a_layer_swapped_for_a_symlink_makes_pytest_write_nothing_there(
    pytester: pytest.Pytester, visible_store: Path, tmp_path: Path
) -> None:
    """The test replaces its read/write layer (and its upper) by symlinks to a host dir, then fails."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    pytester.makepyfile(f"""
        import os, pytest

        def own_layer():
            for line in open("/proc/self/mountinfo"):
                for option in line.split(" - ", 1)[1].split()[-1].split(","):
                    if option.startswith("upperdir=") and "/containers/.session-" in option:
                        return os.path.dirname(option[len("upperdir="):])
            raise AssertionError("no overlay with its upper dir in the store")

        @pytest.mark.container(image="busybox")
        def test_plants(sandbox):
            layer = own_layer()
            if not os.path.isdir(layer) or not os.access(layer, os.W_OK):
                assert False, "UNREACHABLE " + layer  # the sandbox does not see the session's kept layers
            os.rename(layer, layer + ".real")  # the overlay goes on working on the renamed dir
            os.symlink({str(host_dir)!r}, layer)
            os.symlink({str(host_dir)!r}, layer + ".real/meta.json")
            os.rename(layer + ".real/upper", layer + ".real/upper.real")
            os.symlink("/proc/1/root" + {str(host_dir)!r}, layer + ".real/upper")
            assert False, "PLANTED " + layer
    """)
    result = pytester.runpytest_subprocess("--sandbox-keep=failed", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert os.listdir(host_dir) == []
    if "AssertionError: UNREACHABLE " in result.stdout.str():
        return  # the first line of defence: kept layers are masked in every sandbox; the layer is kept as usual
    result.stdout.fnmatch_lines(["*AssertionError: PLANTED *", "*cannot keep*symlink or not a directory*"])
    assert os.listdir(visible_store / "containers") == []  # the planted link was refused, the session dir removed


def test_containers_rm_shell_and_commit_do_not_follow_links_planted_in_a_kept_layer(
    pytester: pytest.Pytester, visible_store: Path, tmp_path: Path
) -> None:
    """Links planted in a kept layer after the fact: rm removes only the layer, shell and commit refuse a linked
    upper, and a link stored as a link in the upper is committed as a link, never as what it points at."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "precious").write_text("host secret\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(image="busybox")
        def test_fails(sandbox):
            sandbox.run("echo evidence > /evidence", check=True)
            assert False
    """)
    pytester.runpytest_subprocess("--sandbox-keep=failed", "-p", "no:cacheprovider").assert_outcomes(failed=1)
    (cid,) = os.listdir(visible_store / "containers")
    kept = visible_store / "containers" / cid
    uppers = [Path(root) / "upper" for root, dirs, _ in os.walk(kept) if "upper" in dirs]
    assert len(uppers) == 1 and (uppers[0] / "evidence").read_text() == "evidence\n"
    upper = uppers[0]
    (upper / "stored-link").symlink_to(host_dir / "precious")  # a link as a link: fine to commit
    assert cli(pytester.path, "commit", cid, "with-link").returncode == 0
    pytester.makepyfile(f"""
        import os, pytest

        @pytest.mark.container(image="with-link")
        def test_committed(sandbox):
            assert sandbox.run("cat /evidence").stdout == "evidence\\n"
            assert os.readlink(sandbox.path("/stored-link")) == {str(host_dir / "precious")!r}
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    for root, _dirs, _files in os.walk(kept):
        os.symlink(host_dir, os.path.join(root, "planted-link"))
    upper.rename(upper.parent / "upper.real")
    upper.symlink_to(host_dir)  # the upper itself a link to a host dir
    commit = cli(pytester.path, "commit", cid, "with-host-files")
    assert commit.returncode != 0 and "symlink" in commit.stderr, commit.stderr
    assert "with-host-files" not in cli(pytester.path, "images", "ls").stdout
    shell = cli(pytester.path, "shell", cid, "sh", "-c", "echo written > /written")
    assert shell.returncode != 0 and "symlink" in shell.stderr, shell.stderr
    assert cli(pytester.path, "containers", "rm", cid).returncode == 0
    assert os.listdir(visible_store / "containers") == []
    assert sorted(os.listdir(host_dir)) == ["precious"]
    assert (host_dir / "precious").read_text() == "host secret\n"
