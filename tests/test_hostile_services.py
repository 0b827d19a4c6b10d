"""Hostile tests against services (red team round 5): what a sandboxed test can make a service's commands do,
and what it can make pytest do by calling its services."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLEEPER = """
import pytest
from pytest_sandbox import service
from pytest_sandbox.runtime import test_process

svc = service("svc", command=["sleep", "300"], memory="{memory}", pids=16)
"""


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


def run_with_fd(pytester: pytest.Pytester, secret: Path) -> subprocess.CompletedProcess[str]:
    """pytest started with fd 7 open on a host file (a CI runner's or make's fd), as a user would."""
    return subprocess.run(
        ["sh", "-c", 'exec 7>>"$0"; exec "$1" -m pytest -p no:cacheprovider -q -s', str(secret), sys.executable],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_commands_run_in_a_service_get_no_fd_pytest_inherited(pytester: pytest.Pytester, tmp_path: Path) -> None:
    secret = tmp_path / "host-file"
    secret.write_text("")
    pytester.makepyfile(
        SLEEPER.format(memory="256M")
        + """
@pytest.mark.container
def test_write_fd_7(svc):
    result = svc.exec(["sh", "-c", "ls /proc/self/fd; echo pwned >&7"])
    print("FDS", result.stdout.split(), "CODE", result.returncode)
"""
    )
    result = run_with_fd(pytester, secret)
    assert "1 passed" in result.stdout, result.stdout + result.stderr
    assert secret.read_text() == ""
    fds = result.stdout.split("FDS ")[1].split("]")[0]
    assert "'7'" not in fds


def test_commands_run_in_a_service_are_under_its_limits(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SLEEPER.format(memory="64M")
        + """
@pytest.mark.container
def test_exec_limits(svc):
    grab = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('allocated')"
    result = svc.exec(["python3", "-c", grab])
    assert result.returncode != 0 and "allocated" not in result.stdout, result
"""
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_a_sparse_log_bomb_does_not_take_pytest_down(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SLEEPER.format(memory="256M")
        + """
@pytest.mark.container
def test_bomb(svc):
    assert svc.exec(["python3", "-c", "import os; os.truncate('/proc/2/fd/1', 1 << 40)"]).returncode == 0
    text = svc.logs()
    assert len(text) < 64 * 2**20 and "bytes of the log left out" in text

def test_after():
    pass
"""
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


@pytest.mark.parametrize("timeout", ["float('nan')", "10 ** 400", "float('inf')", "'soon'"])
def test_a_bad_timeout_in_a_forged_call_is_refused(pytester: pytest.Pytester, timeout: str) -> None:
    pytester.makepyfile(
        SLEEPER.format(memory="256M")
        + f"""
@pytest.mark.container
def test_forged(svc):
    answer = test_process.ask_pytest(
        {{"type": "service-call", "name": "svc", "call": "exec", "argv": ["true"], "timeout": {timeout}}}
    )
    assert "error" in answer, answer

def test_after():
    pass
"""
    )
    result = pytester.runpytest_subprocess()
    # a str timeout is a malformed message (the schema says a number): that test fails, the session goes on
    result.assert_outcomes(passed=1 if timeout == "'soon'" else 2, failed=1 if timeout == "'soon'" else 0)


def test_calls_end_with_their_test(pytester: pytest.Pytester) -> None:
    """An exec longer than the test's timeout, and calls queued behind it, do not hold pytest after the test."""
    pytester.makepyfile(
        SLEEPER.format(memory="256M")
        + """
import time
from pytest_sandbox import protocol

@pytest.mark.container(timeout=2)
def test_long_exec(svc):
    svc.exec(["sleep", "60"], timeout=3600)

@pytest.mark.container(timeout=2)
def test_queued_calls(svc):
    for _ in range(3):
        protocol.send(test_process._channel, {"type": "service-call", "name": "svc", "call": "exec",
                                              "argv": ["sleep", "60"], "timeout": 3600})
    time.sleep(100)
"""
    )
    result = pytester.runpytest_subprocess(timeout=100)  # 60 s each if calls outlived their tests
    result.assert_outcomes(failed=2)


def test_exec_output_is_bounded_in_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SLEEPER.format(memory="256M")
        + """
@pytest.mark.container
def test_flood(svc):
    result = svc.exec(["sh", "-c", "head -c 100000000 /dev/zero | tr '\\\\0' a"], timeout=120)
    assert result.returncode == 0 and len(result.stdout) == 16 * 2**20
"""
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_restart_from_a_sandbox_with_the_handle_pytest_made(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_sandbox import service, wait
        echo = service("echo", command=["sh", "-c", "echo up; exec sleep 300"], ready=wait.log("up"))

        def test_host(echo):
            assert echo.running

        @pytest.mark.container
        def test_sandboxed(echo):
            echo.restart()
            assert echo.logs().count("up") == 2
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_sandbox_on_the_host_network_gets_no_answer_from_a_workers_service_socket(pytester: pytest.Pytester) -> None:
    """Under xdist the worker that started a session service answers the others on an abstract socket. A
    sandboxed test with network="host" shares that namespace and can find the socket in /proc/net/unix; it
    must get nothing from it (no exec in the service, no stop)."""
    pytest.importorskip("xdist")
    pytester.makeconftest(SLEEPER.replace("{memory}", "64M"))
    pytester.makepyfile("""
        import socket, time
        import pytest
        from pytest_sandbox import protocol

        def test_starts_it(svc):
            time.sleep(0.5)

        @pytest.mark.container(network="host")
        def test_attacker(svc):
            names = [line.split()[-1] for line in open("/proc/net/unix").read().splitlines()[1:]
                     if "@pytest-sandbox-service-" in line]
            assert names, "the worker's socket is visible on the host network"
            for name in names:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                    conn.settimeout(10)
                    try:
                        conn.connect("\\0" + name[1:])
                    except PermissionError:  # Landlock scopes (Linux 6.12+): no abstract socket outside it
                        continue
                    try:
                        protocol.send(conn, {"call": "stop"})
                        answer, _ = protocol.recv(conn)
                    except (BrokenPipeError, ConnectionResetError):  # closed before the request
                        answer = None
                    assert answer is None, answer  # closed without a word
            assert svc.running

        def test_after(svc):
            time.sleep(0.5)
            assert svc.running
    """)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_exec_in_an_image_service_gets_no_more_than_the_service_itself(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Red team round 6: as root, exec() in a service of a non-FROM host image ran its command with every id
    mapped and Docker's whole default set (the service's own command gets one id and the restricted set), so
    a sandboxed test planted a setuid-root binary in a host directory the service mounted."""
    volume = tmp_path / "vol"
    volume.mkdir()
    pytester.makepyfile(f"""
        import pytest
        from pytest_sandbox import service, wait

        OWN = "cat /proc/self/uid_map /proc/self/status > /tmp/own; echo up; exec sleep 300"
        svc = service("svc", image="busybox", volumes={{{str(volume)!r}: "/data"}}, stop_timeout=1,
                      command=["sh", "-c", OWN], ready=wait.log("^up$"))

        def caps_and_ids(text):
            lines = text.splitlines()
            wanted = ("CapEff", "CapBnd", "CapPrm")
            return lines[0].split(), [line for line in lines if line.startswith(wanted)]

        @pytest.mark.container
        def test_exec(svc):
            own = svc.exec(["cat", "/tmp/own"]).stdout
            mine = svc.exec(["sh", "-c", "cat /proc/self/uid_map /proc/self/status"]).stdout
            assert caps_and_ids(mine) == caps_and_ids(own)
            svc.exec(["sh", "-c", "cp /bin/busybox /data/planted; chown 0:0 /data/planted; chmod 4755 /data/planted"])

        def test_cleared_while_it_runs(svc):  # on the host, after the sandboxed test, the service still up
            import os, stat
            planted = os.path.join({str(volume)!r}, "planted")
            assert not os.path.exists(planted) or not os.stat(planted).st_mode & (stat.S_ISUID | stat.S_ISGID)
    """)
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)
    planted = volume / "planted"
    if planted.exists():
        assert not (planted.stat().st_uid == 0 and planted.stat().st_mode & 0o4000), oct(planted.stat().st_mode)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the set-id filter knows x86_64, aarch64")
@pytest.mark.parametrize("image", ["host", "busybox"])
def test_a_service_cannot_set_set_id_bits_between_clearings(
    pytester: pytest.Pytester, tmp_path: Path, image: str
) -> None:
    """Red team round 7: a process a service runs set the bits again between two clearings (and a kill of
    pytest left them). Its command, a process left in it and exec() all run under the set-id filter: a
    set-id program never appears in its volume, even while it runs; plain modes still work."""
    if image == "busybox":
        pytest.importorskip("oci_inputs").BUSYBOX or pytest.skip(
            "host lacks a static busybox (apt install busybox-static)"
        )
    volume = tmp_path / "vol"
    volume.mkdir()
    volume.chmod(0o777)
    data = "/data" if image == "busybox" else "/tmp/svcdata"  # the host view takes new targets under /tmp
    plant = f"cp /bin/busybox {data}/{{0}} 2>/dev/null || cp /bin/sh {data}/{{0}}; chmod 4755 {data}/{{0}}; "
    plant += f"chmod g+s {data}/{{0}}"
    loop = f"while true; do {plant.format('looped')}; sleep 0.05; done"
    pytester.makepyfile(f"""
        import os, stat, time
        import pytest
        from pytest_sandbox import service, wait

        svc = service("svc", image={image!r}, volumes={{{str(volume)!r}: {data!r}}}, stop_timeout=1,
                      command=["sh", "-c", {(loop + " & echo up; exec sleep 300")!r}], ready=wait.log("^up$"))

        def set_id(name):
            path = os.path.join({str(volume)!r}, name)
            return os.path.exists(path) and bool(os.stat(path).st_mode & (stat.S_ISUID | stat.S_ISGID))

        @pytest.mark.container
        def test_exec(svc):
            result = svc.exec(["sh", "-c", {plant.format("execed") + f"; chmod 0750 {data}/execed; echo done"!r}])
            assert result.stdout == "done\\n"
            assert "Operation not permitted" in result.stderr

        def test_while_it_runs(svc):
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                assert not set_id("looped") and not set_id("execed")
                time.sleep(0.01)
            assert os.path.exists(os.path.join({str(volume)!r}, "looped"))
            assert stat.S_IMODE(os.stat(os.path.join({str(volume)!r}, "execed")).st_mode) == 0o750
    """)
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)
    for planted in volume.iterdir():
        assert not planted.stat().st_mode & 0o6000, (planted, oct(planted.stat().st_mode))


def test_a_workers_service_socket_answers_again_after_running_out_of_fds() -> None:
    """Red team round 6: a test flooding a published port ran the owning xdist worker out of fds, its
    socket's accept failed once with EMFILE, and the worker never answered another worker again."""
    import resource
    import socket
    import types

    from pytest_sandbox import protocol
    from pytest_sandbox.services import shared

    instance = types.SimpleNamespace(definition=types.SimpleNamespace(name="x"), running=True, stopped=False,
                                     exit_code=None)  # fmt: skip
    owner = shared._Owner(instance)  # type: ignore[arg-type]
    address = "\0" + owner.address

    def ask(timeout: float) -> dict[str, object] | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(timeout)
            conn.connect(address)
            protocol.send(conn, {"call": "state"})
            return protocol.recv(conn)[0]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        with pytest.raises(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        os.close(fillers.pop())
        starved = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # the last free fd
        starved.connect(address)  # queued: the owner's accept fails with EMFILE
        time.sleep(0.3)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    starved.close()
    assert ask(timeout=10) == {"running": True, "stopped": False, "exit_code": None}
    owner.close()


SNIPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
log = open(sys.argv[1], "w", buffering=1)
log.write("ready\n")
deadline, pid = time.monotonic() + 60, os.getpid() + 1
while time.monotonic() < deadline:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        continue  # not born yet
    for fd in range(3, 128):
        stolen = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if stolen >= 0:
            log.write(f"pid {pid} fd {fd}: {os.readlink(f'/proc/self/fd/{stolen}')}\n")
            os.close(stolen)
    os.close(pidfd)
    pid += 1
"""


def test_a_process_left_in_a_service_takes_no_fd_from_an_exec(pytester: pytest.Pytester) -> None:
    """Red team round 7: a process a test left in a service took, with pidfd_getfd, the fds each exec()'s
    command inherited from the pod zygote for its first moments (its lines to pytest, the host's cgroup
    directories, pytest's sockets). The command now holds only its stdio from its first moment, and nobody
    can take that before it execs."""
    pytester.makepyfile(sniper=SNIPER)
    pytester.makepyfile(
        test_snipe=SLEEPER.format(memory="256M")
        + f"""
import os, sys, time

@pytest.mark.container(timeout=120)
def test_snipe(svc):
    sniper = os.path.join({str(pytester.path)!r}, "sniper.py")
    svc.exec(["sh", "-c", f"{{sys.executable}} {{sniper}} /tmp/sniper.log </dev/null >/dev/null 2>&1 &"])
    while svc.exec(["cat", "/tmp/sniper.log"]).stdout.strip() != "ready":
        time.sleep(0.05)
    for _ in range(40):
        svc.exec(["true"])
    print("STOLEN:", svc.exec(["cat", "/tmp/sniper.log"]).stdout.replace("ready", "").strip() or "nothing")
"""
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*STOLEN: nothing*"])
