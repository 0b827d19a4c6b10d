"""The doctor: every capability it finds missing comes with the command that fixes it.

The host running these tests has most capabilities, so the probe's inputs (the files it
reads, the setup steps' errors, the cgroup layout) are faked for each condition.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pytest_sandbox import probe

ALL_WORK = {step: "" for step in ("userns", "mountns", "host_view", "overlay", "tmpfs_xattr", "netns", "pidns")}


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Files the probe reads (path -> content); a recent kernel and a delegated cgroup v2 unless a test says."""
    files: dict[str, str] = {
        "/proc/filesystems": "nodev\ttmpfs\nnodev\toverlay\n",
        "/proc/self/status": "Seccomp:\t0\n",
    }
    monkeypatch.setattr(probe, "_read", files.get)
    monkeypatch.setattr(probe, "_kernel_at_least", lambda major, minor: True)
    monkeypatch.setattr(probe, "cgroup_mode", lambda: "v2")
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "delegated (cpu memory pids)")
    monkeypatch.setattr(probe, "_user", lambda: "alice")
    return files


def _check(name: str, results: dict[str, str]) -> probe.Check:
    return next(c for c in probe.build_checks(results) if c.name == name)


@pytest.mark.parametrize(
    ("path", "value", "fix"),
    [
        ("/proc/sys/user/max_user_namespaces", "0", "sudo sysctl -w user.max_user_namespaces=15000"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        ),
        ("/proc/self/status", "Name:\tx\nSeccomp:\t2\n", "--security-opt seccomp=unconfined"),
    ],
)
def test_refused_user_namespaces_name_their_fix(host: dict[str, str], path: str, value: str, fix: str) -> None:
    host[path] = value
    check = _check("userns", {"userns": "Operation not permitted"})
    assert not check.ok and fix in check.fix
    # the steps after it were not tried: they point at that fix
    assert _check("mountns", {"userns": "Operation not permitted"}).fix == "the fix of userns above"


def test_unknown_userns_refusal_still_says_what_to_check(host: dict[str, str]) -> None:
    check = _check("userns", {"userns": "Operation not permitted"})
    assert not check.ok and "CONFIG_USER_NS" in check.fix


@pytest.mark.parametrize(
    ("step", "limit"),
    [
        ("mountns", "user.max_mnt_namespaces"),
        ("netns", "user.max_net_namespaces"),
        ("pidns", "user.max_pid_namespaces"),
    ],
)
def test_namespace_limit_zero_names_its_sysctl(host: dict[str, str], step: str, limit: str) -> None:
    host[f"/proc/sys/{limit.replace('.', '/')}"] = "0"
    check = _check(step, {**ALL_WORK, step: "No space left on device"})
    assert not check.ok and check.fix == f"sudo sysctl -w {limit}=15000"


def test_namespace_refused_by_apparmor_names_the_sysctl(host: dict[str, str]) -> None:
    host["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = "1"
    check = _check("netns", {**ALL_WORK, "netns": "Operation not permitted"})
    assert "apparmor_restrict_unprivileged_userns=0" in check.fix


def test_overlay_module_missing_names_modprobe(host: dict[str, str]) -> None:
    host["/proc/filesystems"] = "nodev\ttmpfs\n"
    check = _check("overlay", {**ALL_WORK, "overlay": "No such device"})
    assert not check.ok and check.fix.startswith("sudo modprobe overlay")


@pytest.mark.parametrize(("step", "version"), [("overlay", "5.12"), ("host_view", "5.12"), ("tmpfs_xattr", "6.6")])
def test_old_kernel_names_the_version_needed(
    host: dict[str, str], monkeypatch: pytest.MonkeyPatch, step: str, version: str
) -> None:
    monkeypatch.setattr(probe, "_kernel_at_least", lambda major, minor: False)
    check = _check(step, {**ALL_WORK, step: "Invalid argument"})
    assert not check.ok and f"upgrade the kernel to Linux >= {version}" in check.fix


def test_cgroup_v2_not_delegated_names_systemd_run(host: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "not delegated")
    check = _check("cgroup", ALL_WORK)
    assert not check.ok and "systemd-run --user --scope -p Delegate=yes pytest" in check.fix
    assert _check("cgroup", ALL_WORK).detail.startswith("cgroup v2, not delegated")


@pytest.mark.parametrize("mode", ["v1", "hybrid"])
def test_cgroup_v1_not_delegated_names_the_chown_recipe(
    host: dict[str, str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(probe, "cgroup_mode", lambda: mode)
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "not delegated")
    check = _check("cgroup", ALL_WORK)
    assert not check.ok
    assert "for c in memory cpu pids blkio; do d=/sys/fs/cgroup/$c/pytest-alice;" in check.fix
    assert "sudo chown alice $d $d/cgroup.procs $d/tasks" in check.fix
    assert "pytest --sandbox-cgroup=/pytest-alice" in check.fix


def test_cgroup_v1_partly_delegated_names_only_the_missing(
    host: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe, "cgroup_mode", lambda: "hybrid")
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "writable: memory cpu")
    check = _check("cgroup", ALL_WORK)
    assert not check.ok and "no pids, blkio limits" in check.detail
    assert "for c in pids blkio;" in check.fix
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "writable: memory cpu pids blkio")
    assert _check("cgroup", ALL_WORK).ok


def test_doctor_prints_a_fix_under_every_no(host: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    host["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = "1"
    monkeypatch.setattr(probe, "cgroup_mode", lambda: "hybrid")
    monkeypatch.setattr(probe, "cgroup_delegation", lambda override=None: "not delegated")
    refused = probe.build_checks({"userns": "Operation not permitted"})
    monkeypatch.setattr(probe, "checks", lambda cgroup=None: refused)
    lines = probe.doctor_text().splitlines()
    nos = [i for i, line in enumerate(lines) if line.startswith(" NO ")]
    assert len(nos) >= 8  # userns, the six steps not tried, cgroup
    for i in nos:
        assert lines[i + 1].startswith("      fix: "), lines[i : i + 2]
    assert "      fix: sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" in lines
    assert "UNAVAILABLE: AppArmor restricts" in lines[-1] and "fix: sudo sysctl" in lines[-1]


def test_doctor_on_this_host_has_a_fix_under_every_no() -> None:
    """As whoever runs the suite (root: cgroups writable; a plain user: usually not delegated)."""
    result = subprocess.run([sys.executable, "-m", "pytest_sandbox", "doctor"], capture_output=True, text=True)
    lines = result.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(" NO "):
            assert lines[i + 1].lstrip().startswith("fix: "), result.stdout
    cgroup = next(line for line in lines if line.split()[1:2] == ["cgroup"])
    if "not delegated" in cgroup:
        assert cgroup.startswith(" NO "), cgroup
        mode = cgroup.split()[3].rstrip(",")
        expected = "systemd-run --user --scope -p Delegate=yes" if mode == "v2" else "sudo chown"
        assert expected in result.stdout, result.stdout


def test_doctor_cgroup_option_checks_that_cgroup(tmp_path: os.PathLike[str]) -> None:
    """--cgroup PATH: the cgroup line and the limits line look below PATH, not in this process's cgroups."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "doctor", "--cgroup", "/pytest-sandbox-no-such-cgroup"],
        capture_output=True,
        text=True,
    )
    cgroup = next(line for line in result.stdout.splitlines() if line.split()[1:2] == ["cgroup"])
    assert "not delegated" in cgroup and cgroup.startswith(" NO "), result.stdout
    assert "limits: rlimits" in result.stdout


def test_the_doctor_checks_the_cgroup_pytest_would_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """PYTEST_SANDBOX_CGROUP names the cgroup pytest uses; the doctor said "not delegated" for the cgroup it
    found itself while its own limits line named the one set there."""
    import argparse

    from pytest_sandbox import cli

    asked: list[str | None] = []

    def doctor_text(cgroup: str | None = None) -> str:
        asked.append(cgroup)
        raise KeyboardInterrupt  # enough: what the checks were asked about

    monkeypatch.setattr(probe, "doctor_text", doctor_text)
    monkeypatch.setenv("PYTEST_SANDBOX_CGROUP", "/delegated-here")
    for given, expected in ((None, "/delegated-here"), ("/from-the-option", "/from-the-option")):
        with pytest.raises(KeyboardInterrupt):
            cli._doctor(argparse.Namespace(cgroup=given))
        assert asked.pop() == expected
