"""Real enforcement through cgroups (v1 as root or delegated here; v2 in the guest lane).

Set PYTEST_SANDBOX_CGROUP to a delegated cgroup to run these as a plain user.
"""

from __future__ import annotations

import os

import pytest
from helpers import start_pytest_until_running, wait_gone

from pytest_sandbox.runtime import cgroups


def _backend() -> cgroups.Backend:
    return cgroups.choose("auto", os.environ.get("PYTEST_SANDBOX_CGROUP"), os.getcwd())


BACKEND = _backend()
pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        isinstance(BACKEND, cgroups.Rlimits),
        reason=f"host gives this user no writable cgroup: {getattr(BACKEND, 'reason', '')}",
    ),
]


def _no_session_cgroups_left() -> list[str]:
    left = []
    for root, dirs, _ in os.walk(cgroups.CGROUP_ROOT):
        # pytest's own leaf (a delegated v2 cgroup cannot hold pytest and sandboxes side by side) stays
        left += [
            os.path.join(root, d)
            for d in dirs
            if d.startswith(f"{cgroups.SESSION_PREFIX}{os.getpid()}") and not d.endswith("-pytest")
        ]
        if root.count("/") > 6:
            dirs.clear()
    return left


def test_memory_limit_oom_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(memory="64M")
        def test_hog():
            data = bytearray(200 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1

        @pytest.mark.container(memory="64M")
        def test_fits():
            data = bytearray(16 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*killed by the OOM killer: memory limit 64.0 MiB, peak 6*.* MiB*"])


def test_pids_limit_stops_a_fork_loop(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, pytest

        SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)", {token!r}]

        @pytest.mark.container(pids=16)
        def test_fork_loop():
            started = 0
            with pytest.raises(BlockingIOError):
                for _ in range(100):
                    subprocess.Popen(SLEEPER)
                    started += 1
            assert started < 16

        @pytest.mark.container(pids=16)
        def test_fork_loop_fails():
            for _ in range(100):
                subprocess.Popen(SLEEPER)
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*sandbox limits*", "*the pids limit 16 refused * fork(s)*"])
    assert wait_gone(token, timeout=2) == []


def test_cpu_limit_throttles_a_busy_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(cpus=0.2)
        def test_busy():
            start, cpu = time.monotonic(), time.process_time()
            while time.monotonic() - start < 2:
                pass
            ratio = (time.process_time() - cpu) / (time.monotonic() - start)
            print(f"cpu seconds per wall second: {ratio:.2f}")
            assert ratio <= 0.3
    """)
    result = pytester.runpytest_subprocess("--sandbox-durations=0", "-s")
    result.assert_outcomes(passed=1)
    lines = [line for line in result.outlines if line.endswith("test_busy")]
    throttled = float(lines[0].split()[3].rstrip("s"))
    assert throttled > 0.5, lines


def test_children_gone_and_cgroups_removed(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, pytest

        @pytest.mark.container(memory="128M", pids=64, cpus=1)
        def test_spawns():
            for _ in range(5):
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {token!r}],
                                 start_new_session=True)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert wait_gone(token, timeout=2) == []
    assert _no_session_cgroups_left() == []


def test_pytest_killed_removes_its_cgroups(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(memory="128M")
        def test_waits():
            print("RUNNING", flush=True)
            time.sleep(600)
    """)
    proc = start_pytest_until_running(pytester.path, token)
    session = f"{cgroups.SESSION_PREFIX}{proc.pid}"
    assert any(session in path for path, _, _ in os.walk(cgroups.CGROUP_ROOT) if path.count("/") < 8)
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [path for path, _, _ in os.walk(cgroups.CGROUP_ROOT) if session in path and path.count("/") < 9]
        if not left:
            break
        time.sleep(0.1)
    assert left == []


def test_stress_overrides_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(cpus=4)
        def test_busy():
            start, cpu = time.monotonic(), time.process_time()
            while time.monotonic() - start < 1:
                pass
            assert (time.process_time() - cpu) / (time.monotonic() - start) <= 0.3
    """)
    pytester.runpytest_subprocess("--sandbox-stress=cpus=0.2").assert_outcomes(passed=1)


@pytest.mark.skipif("io" not in BACKEND.enforced, reason="the rootdir is not on a block device this host can throttle")
def test_io_limit_throttles_direct_reads(pytester: pytest.Pytester) -> None:
    big = max(
        (
            os.path.join(d, f)
            for d, _, files in os.walk("/usr/lib")
            for f in files
            if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
        ),
        key=lambda p: os.path.getsize(p),
    )
    assert os.path.getsize(big) > 8 * 2**20, big
    pytester.makepyfile(f"""
        import mmap, os, time, pytest

        @pytest.mark.container(io={{"read_bps": "2M"}})
        def test_read():
            buf = mmap.mmap(-1, 1 << 20)
            fd = os.open({big!r}, os.O_RDONLY | os.O_DIRECT)
            start, done = time.monotonic(), 0
            while done < 6 * 2**20:
                done += os.readv(fd, [buf])
            rate = done / (time.monotonic() - start)
            print(f"read {{rate / 2**20:.1f}} MiB/s")
            assert rate < 3 * 2**20
    """)
    pytester.runpytest_subprocess("-s").assert_outcomes(passed=1)


def test_limits_under_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        @pytest.mark.container(memory="64M", pids=32)
        def test_small(n):
            bytearray(8 * 1024 * 1024)

        @pytest.mark.container(memory="64M")
        def test_hog():
            data = bytearray(200 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*killed by the OOM killer: memory limit 64.0 MiB*"])
