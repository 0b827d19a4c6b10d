"""The pytest-sandbox command and the doctor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pytest_sandbox import probe


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
    assert names == ["store", "lowerdir+", "busybox", "zstd"]
    kernel = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    assert lines[1].startswith(" ok" if kernel >= (6, 8) else " NO")


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
