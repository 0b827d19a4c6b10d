"""The pytest-sandbox command and the doctor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import run_cli
from oci_inputs import BUSYBOX

from pytest_sandbox import probe

needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")


def test_doctor_reports_this_host() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest_sandbox", "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("userns", "overlay", "netns", "pidns", "cgroup", "newuidmap"):
        assert name in result.stdout
    assert "sandboxes: available" in result.stdout
    assert "limits: " in result.stdout and "enforces" in result.stdout


def test_console_script_installed() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "pytest-sandbox")
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "doctor" in result.stdout


def test_blocker_explanations(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"/proc/sys/user/max_user_namespaces": "0"}
    monkeypatch.setattr(probe, "_read", lambda path: values.get(path))
    reason, fix = probe._userns_blocker()
    assert "max_user_namespaces is 0" in reason and "sysctl" in fix
    values.clear()
    values["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = "1"
    reason, fix = probe._userns_blocker()
    assert "AppArmor" in reason and "apparmor_restrict_unprivileged_userns=0" in fix


def test_unavailable_fails_or_skips_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        from pytest_sandbox import probe
        probe.unavailable_reason = lambda: "user.max_user_namespaces is 0; fix: sudo sysctl -w x=1"
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_boxed():
            pass
    """)
    failed = pytester.runpytest_subprocess()
    failed.assert_outcomes(errors=1)
    failed.stdout.fnmatch_lines(["*sandbox unavailable: user.max_user_namespaces is 0*"])
    skipped = pytester.runpytest_subprocess("--sandbox-unavailable=skip", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*sandbox unavailable: user.max_user_namespaces is 0*"])


def test_doctor_reports_images(tmp_path: os.PathLike[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(tmp_path), "doctor"], capture_output=True, text=True
    )
    lines = result.stdout.split("\nimages:\n", 1)[1].splitlines()
    assert lines[0].split()[:3] == ["ok", "store", str(tmp_path)] and "(0 images, 0 layers" in lines[0]
    names = [line.split()[1] for line in lines]
    assert names == ["store", "volumes", "lowerdir+", "busybox", "zstd"]
    assert lines[1].split()[2:] == [os.path.join(tmp_path, "volumes"), "(0", "named,", "0", "B)"]
    kernel = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    assert lines[2].startswith(" ok" if kernel >= (6, 8) else " NO")


def test_store_without_a_home_directory(tmp_path: os.PathLike[str]) -> None:
    """A CI user without a home directory still gets a store of its own, in /var/tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "PYTEST_SANDBOX_STORE")}
    env["HOME"] = os.path.join(str(tmp_path), "missing", "home")
    os.chmod(tmp_path, 0o500)  # the home directory cannot be created
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest_sandbox", "doctor"], capture_output=True, text=True, env=env
        )
    finally:
        os.chmod(tmp_path, 0o700)
    if os.geteuid() == 0:  # root writes anywhere: the home-based store is made
        assert f"{env['HOME']}/.cache/pytest-sandbox" in result.stdout
    else:
        assert f"/var/tmp/pytest-sandbox-{os.getuid()} (" in result.stdout


# -- the CLI agrees with pytest: rootdir, ini file, store, images --------------------------------------------------

TOOLS = "FROM busybox\nRUN mkdir -p /var/lib/app && echo ready > /var/lib/app/state\n"
FAILING = """
import pytest

@pytest.mark.container(image="tools")
def test_leaves_state(sandbox):
    sandbox.run("echo left > /var/lib/app/left", check=True)
    assert False
"""
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def ini_project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A project whose store is set only by its ini file (``sandbox_store = ".sandbox-store"``), with images/."""
    monkeypatch.delenv("PYTEST_SANDBOX_STORE", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))  # the default store: unused
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nsandbox_store = ".sandbox-store"\n')
    (pytester.path / "images").mkdir()
    (pytester.path / "images" / "tools.Containerfile").write_text(TOOLS)
    (pytester.path / "sub" / "deeper").mkdir(parents=True)
    return pytester.path


def in_sub(project: Path) -> Cli:
    """``pytest-sandbox`` typed in a subdirectory of the project."""
    return lambda *args, **kw: run_cli(*args, cwd=project / "sub" / "deeper", timeout=120, **kw)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return result.stdout


@needs_busybox
def test_a_kept_container_is_found_from_the_report_and_shell_leaves_it_alone(
    pytester: pytest.Pytester, ini_project: Path
) -> None:
    """The command a failed test's report prints works as printed, from any subdirectory; ``shell ID``
    changes nothing of the kept layer, ``shell --persist ID`` does (and ``commit`` sees it)."""
    pytester.makepyfile(test_keep=FAILING)
    failed = pytester.runpytest_subprocess("--sandbox-keep=failed")
    failed.assert_outcomes(failed=1)
    found = re.search(r"kept as ([0-9a-f]+): pytest-sandbox shell \1", failed.stdout.str())
    assert found, failed.stdout.str()
    cid, cli = found.group(1), in_sub(ini_project)
    assert cid in ok(cli("containers"))
    assert ok(cli("shell", cid, "sh", "-c", "cat /var/lib/app/left; echo shell > /made")) == "left\n"
    assert ok(cli("shell", cid, "sh", "-c", "test -e /made || echo gone")) == "gone\n"  # a throwaway layer
    ok(cli("shell", "--persist", cid, "sh", "-c", "echo persisted > /made"))
    assert ok(cli("shell", cid, "cat", "/made")) == "persisted\n"
    ok(cli("commit", cid, "broken"))
    assert ok(cli("run", "broken", "cat", "/made", "/var/lib/app/left")) == "persisted\nleft\n"
    assert (ini_project / ".sandbox-store" / "images" / "broken.json").is_file()  # pytest's store, not ~/.cache
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "pytest-sandbox").exists()


@needs_busybox
def test_rootdir_ini_and_store_resolved_as_pytest_does(ini_project: Path, tmp_path: Path) -> None:
    cli = in_sub(ini_project)
    ok(cli("images", "build"))  # images/ of the rootdir, not of the cwd
    info = json.loads(ok(cli("version", "--json")))
    assert info["rootdir"] == str(ini_project) and info["inifile"] == str(ini_project / "pyproject.toml")
    assert info["store"] == str(ini_project / ".sandbox-store") and info["store_format"] == 1
    for key in ("pytest-sandbox", "pytest", "python", "kernel", "cgroup"):
        assert info[key], key
    assert f"store:          {ini_project / '.sandbox-store'}" in ok(cli("version"))
    # command line > environment > ini, as for pytest's --sandbox-store
    assert json.loads(ok(cli("version", "--json", env={"PYTEST_SANDBOX_STORE": "/e"})))["store"] == "/e"
    both = cli("--store", str(tmp_path / "s"), "version", "--json", env={"PYTEST_SANDBOX_STORE": "/e"})
    assert json.loads(ok(both))["store"] == str(tmp_path / "s")
    # -c and --rootdir, as pytest takes them: an ini's paths are relative to the ini's directory
    (tmp_path / "other.ini").write_text("[pytest]\nsandbox_store = other-store\nsandbox_images = defs\n")
    other = json.loads(ok(cli("-c", str(tmp_path / "other.ini"), "version", "--json")))
    assert other["inifile"] == str(tmp_path / "other.ini") and other["store"] == str(tmp_path / "other-store")
    empty = cli("-c", str(tmp_path / "other.ini"), "images", "build")
    assert empty.returncode == 2 and "no *.Containerfile in" in empty.stderr and "defs" in empty.stderr
    assert json.loads(ok(cli("version", "--json", "--rootdir", str(tmp_path))))["rootdir"] == str(tmp_path)
    # a pytest usage error is ours, one line
    missing = cli("--rootdir", str(tmp_path / "nowhere"), "images", "ls")
    assert missing.returncode == 2 and missing.stderr.startswith("pytest-sandbox: Directory ")
    assert missing.stderr.count("\n") == 1


@needs_busybox
def test_import_never_replaces_silently(ini_project: Path, tmp_path: Path) -> None:
    cli = in_sub(ini_project)
    ok(cli("images", "build"))
    ok(cli("images", "export", "tools", str(tmp_path / "tools.tar")))
    refused = cli("images", "import", str(tmp_path / "tools.tar"))  # its tag names it tools
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "not imported as tools: an image tools exists (4 layers, from " in refused.stderr
    assert "images/tools.Containerfile defines tools (pytest builds that" in refused.stderr
    assert "tools.Containerfile" in json.loads(ok(cli("images", "inspect", "tools")))["source"]  # untouched
    forced = cli("images", "import", str(tmp_path / "tools.tar"), "--force")
    assert "--force: replaced: an image tools exists" in forced.stderr and "imported tools" in ok(forced)
    assert json.loads(ok(cli("images", "inspect", "tools")))["source"].startswith("oci-archive:")
    ok(cli("images", "import", str(tmp_path / "tools.tar"), "copy"))
    again = cli("images", "import", str(tmp_path / "tools.tar"), "copy")
    assert again.returncode == 2 and "not imported as copy: an image copy exists" in again.stderr


@needs_busybox
def test_run_and_shell_both_build_a_removed_image(ini_project: Path) -> None:
    cli = in_sub(ini_project)
    for verb in ("run", "shell"):
        ok(cli("images", "build", "tools"))
        ok(cli("images", "rm", "tools"))
        result = cli(verb, "tools", "cat", "/var/lib/app/state")
        assert ok(result) == "ready\n"
        assert "image tools is not in the store" in result.stderr and "building it from" in result.stderr
        assert "tools.Containerfile" in result.stderr
    nothing = cli("shell", "nothing")
    assert nothing.returncode == 2 and "'nothing' is neither a kept container" in nothing.stderr


@needs_busybox
def test_every_command_with_bad_input_is_one_line_and_exit_2(ini_project: Path, tmp_path: Path) -> None:
    cli = in_sub(ini_project)
    ok(cli("images", "build"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "broken.ini").write_text("[pytest\n")  # no section header pytest can read (an empty file is fine)
    (tmp_path / "empty.tar").write_bytes(b"")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    bad = [
        ("images", "build", "nope"),
        ("images", "build", "tools", "--build-arg", "NOEQUALS"),
        ("images", "build", "--dir", str(tmp_path / "nowhere")),
        ("images", "inspect", "nope"),
        ("images", "inspect", "Not A Name"),
        ("images", "rm", "nope"),
        ("images", "import", str(tmp_path / "nowhere.tar")),
        ("images", "import", str(tmp_path / "empty.tar")),
        ("images", "import", str(tmp_path / "empty.tar"), "Bad"),
        ("images", "export", "nope", str(tmp_path / "x.tar")),
        ("images", "export", "tools", str(tmp_path / "a-file" / "x.tar")),
        ("images", "export", "tools", str(tmp_path)),
        ("run", "nope"),
        ("run", "Bad/name"),
        ("run", "tools", "/no/such/program"),
        ("shell", "nope"),
        ("shell", "0123456789ab"),
        ("commit", "nope", "x"),
        ("commit", "0123456789ab", "x"),
        ("containers", "rm", "0123456789ab"),
        ("--store", str(tmp_path / "a-file"), "images", "ls"),
        ("-c", str(tmp_path / "broken.ini"), "images", "ls"),
        ("doctor", "--cgroup", "relative/path"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        bad.append(("images", "export", "tools", str(read_only / "x.tar")))
    for args in bad:
        result = cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.startswith("pytest-sandbox: ")]
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert "written" not in result.stdout, (args, result.stdout)  # refused before any layer is written
    debug = cli("--debug", "images", "inspect", "nope")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "StoreError" in debug.stderr
