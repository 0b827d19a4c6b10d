"""Hostile tests: sandboxes that crash, kill, hang or outlive pytest leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import processes_with, start_pytest_until_running, wait_gone


def test_pytest_killed_takes_its_sandboxes_along(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, time, pytest

        @pytest.mark.container
        def test_hangs():
            code = "import os, time\\nif os.fork(): os._exit(0)\\ntime.sleep(1000)"
            subprocess.run([sys.executable, "-c", code, {token!r}])
            print("RUNNING", flush=True)
            time.sleep(1000)
    """)
    proc = start_pytest_until_running(pytester.path, token)
    assert len(processes_with(token)) >= 3  # pytest, zygote(s), the test and its daemon
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_xdist_controller_killed_takes_its_workers_sandboxes_along(
    pytester: pytest.Pytester, token: str, signum: int
) -> None:
    """`timeout` sends SIGTERM to the controller only; its workers would run their hanging tests on (as
    without sandboxes) until execnet gives up on them (^C after 5 s). Their sandboxes end with the
    controller at once, and the workers then."""
    sleeper = f"{token}-sleeper"
    pytester.makepyfile(f"""
        import signal, subprocess, sys

        def test_hangs_1():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            subprocess.run([sys.executable, "-c", "import time; time.sleep(1000)", {sleeper!r}])

        def test_hangs_2():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            subprocess.run([sys.executable, "-c", "import time; time.sleep(1000)", {sleeper!r}])
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--sandbox=all"],
        cwd=pytester.path,
        env={**os.environ, "SANDBOX_TEST_MARK": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(processes_with(sleeper)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(processes_with(sleeper)) >= 2, "the tests never started"
    proc.send_signal(signum)
    proc.wait()
    assert wait_gone(token, timeout=3) == []  # 0.35 s measured; execnet's ^C ends them after 6 s


def test_killpg_in_a_sandbox_cannot_reach_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, signal, time, pytest

        @pytest.mark.container
        def test_kill_my_group():
            os.killpg(0, signal.SIGKILL)

        @pytest.mark.container
        def test_kill_everything_visible():
            os.kill(-1, signal.SIGKILL)
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(30)  # its sandbox's end takes it too: it does not return first and pass

        def test_pytest_still_alive():
            pass
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*killed by SIGKILL*"])


def test_closed_fds_and_garbage_output(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, pytest

        @pytest.mark.container
        def test_scribbles():
            for fd in range(3, 64):
                try:
                    os.write(fd, b"garbage")
                except OSError:
                    pass
            os.closerange(3, 1024)
            assert False, "closed every fd"

        @pytest.mark.container
        def test_next():
            pass
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)  # the scribbles fail that test only; the session goes on
    result.stdout.fnmatch_lines(["*sandbox sent a malformed message: a datagram without a message header*"])


def test_keyboard_interrupt_ends_everything(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, time, pytest

        @pytest.mark.container
        def test_waits():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", {token!r}])
            print("RUNNING", flush=True)
            time.sleep(1000)
    """)
    proc = start_pytest_until_running(pytester.path)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    assert wait_gone(token) == []


def test_fork_storm_is_cleaned_up(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import os, subprocess, sys, pytest

        @pytest.mark.container
        def test_many_children():
            for _ in range(30):
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", {token!r}],
                                 start_new_session=True)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert wait_gone(token, timeout=1) == []


def test_session_end_leaves_no_process(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_a():
            pass
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    del result
    me = os.getpid()
    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == me]
    assert [p for p in children if "sandbox" in _comm(int(p))] == []


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read()
    except OSError:
        return ""


def test_host_mounts_untouched(pytester: pytest.Pytester) -> None:
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(writable=["/var/tmp"])
        def test_a(tmp_path):
            (tmp_path / "x").write_text("x")
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    with open("/proc/self/mountinfo") as f:
        assert f.read() == before


def test_pytest_killed_in_an_image_test_leaves_nothing(
    pytester: pytest.Pytester, token: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of pytest mid-test: the image's commands die, and the next session removes the layers
    the dead one kept for --sandbox-keep (nothing else of it was ever on disk)."""
    from oci_inputs import BUSYBOX

    if BUSYBOX is None:
        pytest.skip("host lacks a static busybox (apt install busybox-static)")
    store = tmp_path_factory.mktemp("store")
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    pytester.makeini("[pytest]\nsandbox_keep = failed\n")
    pytester.makepyfile(f"""
        import time, pytest

        @pytest.mark.container(image="busybox")
        def test_hangs(sandbox):
            sandbox.run("echo layer > /in-the-layer", check=True)
            sandbox.spawn(["sh", "-c", "sleep 1000 # {token}"])
            print("RUNNING", flush=True)
            time.sleep(1000)
    """)
    proc = start_pytest_until_running(pytester.path, token)
    sessions = [e for e in os.listdir(store / "containers") if e.startswith(".session-")]
    assert len(sessions) == 1
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    assert os.listdir(store / "tmp") == []
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(image="busybox")
        def test_next(sandbox):
            assert sandbox.run("echo ok").stdout == "ok\\n"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert os.listdir(store / "containers") == []
