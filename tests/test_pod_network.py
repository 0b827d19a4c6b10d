"""The pod network: a bridge, a veth pair and an address per member, names that resolve to each service's
forwarded ports; as root and as a plain user."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pytest_sandbox.network import bridge, forward
from pytest_sandbox.services.definition import hosts_text

PYTHON = "/usr/bin/python3"  # the host's: services of image="host" run the host's programs
needs_python = pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed here")

# A service that answers with its name and the address it sees the client at; it listens on loopback only.
SERVER = (
    "import socket, sys\n"
    "server = socket.create_server(('127.0.0.1', int(sys.argv[2])))\n"
    "while True:\n"
    "    conn, peer = server.accept()\n"
    "    conn.sendall(('%s %s' % (sys.argv[1], peer[0])).encode())\n"
    "    conn.close()\n"
)

SERVICES = f'''
    import ipaddress, socket, sys
    import pytest
    from pytest_sandbox import service, wait

    SERVER = {SERVER!r}
    alpha = service("alpha", command=["{PYTHON}", "-c", SERVER, "alpha", "8000"], ports=[8000],
                    ready=wait.listening(8000))
    beta = service("beta", command=["{PYTHON}", "-c", SERVER, "beta", "8000"], ports=[8000],
                   ready=wait.listening(8000))
    # It listens on 8001, but publishes 8000 only
    hidden = service("hidden", command=["{PYTHON}", "-c", SERVER, "hidden", "8001"], ports=[8000],
                     ready=wait.listening(8001))

    def ask(host, port):
        with socket.create_connection((host, port), timeout=10) as conn:
            return conn.recv(100).decode()

    def own_address():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.89.0.1", 9))  # no packet: the route's source address
            return probe.getsockname()[0]
'''


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


@needs_python
def test_each_member_has_its_own_address_and_services_may_share_a_port(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            """
            seen = []

            # Two specs, two sandboxes (the tests of one spec share its scope sandbox, and so its address).
            @pytest.mark.parametrize("n", [pytest.param(n, marks=pytest.mark.container(hostname=f"t{n}"))
                                           for n in (1, 2)])
            def test_pod(alpha, beta, n):
                mine = own_address()
                assert ipaddress.ip_address(mine) in ipaddress.ip_network("10.89.128.0/17")
                assert sorted(name for _, name in socket.if_nameindex()) == ["eth0", "lo"]
                assert socket.gethostbyname("alpha") != socket.gethostbyname("beta")
                # Both listen on port 8000, each on its own loopback; each sees the client as local.
                assert ask("alpha", 8000) == "alpha 127.0.0.1"
                assert ask("beta", 8000) == "beta 127.0.0.1"
                print("ADDRESS", mine)

            def test_host(alpha, beta):
                assert ask(*alpha.address(8000)).startswith("alpha ")
                assert ask(*beta.address(8000)).startswith("beta ")
            """
        )
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    addresses = [line.split()[-1] for line in result.outlines if "ADDRESS 10.89." in line]
    assert len(addresses) == 2 and addresses[0] != addresses[1], result.outlines


@needs_python
def test_a_service_reaches_another_by_name_from_its_own_address(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            f"""
            CLIENT = ("import socket; c = socket.create_connection(('alpha', 8000), timeout=10); "
                      "print(c.recv(100).decode())")
            SOURCE = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                      "s.connect(('10.89.0.1', 9)); print(s.getsockname()[0])")

            def test_beta_to_alpha(alpha, beta):
                done = beta.exec(["{PYTHON}", "-c", CLIENT])
                assert done.returncode == 0, done.stderr
                assert done.stdout.strip() == "alpha 127.0.0.1"
                done = beta.exec(["{PYTHON}", "-c", SOURCE])
                assert ipaddress.ip_address(done.stdout.strip()) in ipaddress.ip_network("10.89.64.0/18")
            """
        )
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


@needs_python
def test_only_published_ports_answer_by_name_and_a_test_cannot_take_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            """
            @pytest.mark.container
            def test_unpublished(hidden):
                with pytest.raises(ConnectionRefusedError):  # 8001 is on its loopback, not published
                    socket.create_connection(("hidden", 8001), timeout=5)

            @pytest.mark.container
            def test_squat(alpha):
                squatter = socket.create_server(("0.0.0.0", 8000))  # this test's own namespace
                with squatter:
                    assert ask("alpha", 8000) == "alpha 127.0.0.1"
                    with pytest.raises(OSError):  # the name's address is not this test's to take
                        socket.create_server((socket.gethostbyname("alpha"), 8000))
            """
        )
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


@needs_python
def test_a_stopped_service_refuses_connections(pytester: pytest.Pytester) -> None:
    """As a port nothing listens on does: refused by name in the pod, reset on its published port (which
    stays, so that a restart keeps it)."""
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            """
            @pytest.mark.container
            def test_pod(alpha):
                assert ask("alpha", 8000) == "alpha 127.0.0.1"
                alpha.stop()
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("alpha", 8000), timeout=5)
                alpha.restart()
                assert ask("alpha", 8000) == "alpha 127.0.0.1"

            def test_host(beta):
                address = beta.address(8000)
                beta.stop()
                with pytest.raises(ConnectionResetError):
                    ask(*address)
                beta.restart()
                assert beta.address(8000) == address
                assert ask(*address).startswith("beta ")
            """
        )
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_addresses_follow_from_the_sorted_names() -> None:
    names = ["db", "cache", "web"]
    assert bridge.name_address(names, "cache") == "10.89.1.1"
    assert bridge.name_address(names, "db") == "10.89.1.2"
    assert bridge.service_address(names, "web") == "10.89.64.3"
    assert bridge.name_address(list(reversed(names)), "db") == "10.89.1.2"  # any order: every worker agrees
    assert bridge.member_address(1) == "10.89.128.1"
    assert bridge.member_address(bridge.MEMBER_SLOTS) == "10.89.255.254"
    with pytest.raises(ValueError):
        bridge.member_address(bridge.MEMBER_SLOTS + 1)
    assert len(bridge.peer_name(bridge.member_address(bridge.MEMBER_SLOTS))) <= 15
    lines = hosts_text(names, host_hosts="/nonexistent").splitlines()
    assert "10.89.1.2\tdb" in lines and "10.89.1.3\tweb" in lines
    assert lines.index("10.89.1.2\tdb") < lines.index("127.0.0.1\tlocalhost")  # a service's name beats the host's


PLUMBING = """
import os, socket, sys
from pytest_sandbox.linux import syscalls, userns
from pytest_sandbox.network import bridge, forward

userns.enter_user_namespace()
syscalls.unshare(syscalls.CLONE_NEWNET)
bridge.make_bridge(["db"])
try:
    bridge.make_bridge(["db"])  # the same bridge again: the kernel's answer is read
except OSError as exc:
    print("AGAIN", exc.errno)
pod = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
server = socket.create_server((bridge.name_address(["db"], "db"), 5432))
syscalls.unshare(syscalls.CLONE_NEWNET)
bridge.join(pod, bridge.member_address(7))
with socket.create_connection(("10.89.1.1", 5432), timeout=5) as conn:
    print("SOURCE", conn.getsockname()[0])
print("LINKS", sorted(os.listdir("/sys/class/net")))
"""


def test_the_plumbing_in_a_user_namespace(tmp_path: Path) -> None:
    """What the zygotes do, step by step, in a throwaway user namespace (so also as a plain user)."""
    done = subprocess.run([sys.executable, "-c", PLUMBING], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"AGAIN {errno.EEXIST}" in done.stdout
    assert "SOURCE 10.89.128.7" in done.stdout
    assert "'eth0'" in done.stdout and "'pod0'" not in done.stdout  # the member sees its own end only


def test_forwarded_ports_carry_a_bounded_number_of_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that floods a service's port cannot take pytest's fds or threads: past the limit, connections
    wait in the backlog (as at a busy server) and go on when one ends. Nothing listening: a reset."""
    monkeypatch.setattr(forward, "_slots", threading.BoundedSemaphore(3))
    upstream_server = socket.create_server(("127.0.0.1", 0))
    upstream_server.settimeout(5)
    port = upstream_server.getsockname()[1]
    published = forward.Published(lambda: socket.create_connection(("127.0.0.1", port)))
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", published.port), timeout=5))
            upstream_server.accept()[0].sendall(b"hi")
            assert clients[-1].recv(2) == b"hi"  # forwarded
        waiting = socket.create_connection(("127.0.0.1", published.port), timeout=5)
        clients.append(waiting)
        upstream_server.settimeout(0.5)
        with pytest.raises(TimeoutError):  # not forwarded while three are open
            upstream_server.accept()
        clients.pop(0).close()  # one ends: the waiting one goes on
        upstream_server.settimeout(5)
        upstream_server.accept()[0].sendall(b"ok")
        assert waiting.recv(2) == b"ok"
    finally:
        for client in clients:
            client.close()
        published.close()
        upstream_server.close()
    gone = forward.Published(lambda: socket.create_connection(("127.0.0.1", port)))  # nothing listens there now
    try:
        with pytest.raises(ConnectionResetError):  # in connect() already, or at the first read
            with socket.create_connection(("127.0.0.1", gone.port), timeout=5) as client:
                client.recv(1)
    finally:
        gone.close()


@needs_python
def test_the_loopback_pod_is_one_shared_loopback(pytester: pytest.Pytester) -> None:
    """--sandbox-pod-network=loopback (and auto where the kernel has no bridge or veth): every member is on
    the pod zygote's loopback, names resolve to 127.0.0.1, every port of a service is reached."""
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            """
            @pytest.mark.container
            def test_pod(alpha, hidden):
                assert socket.gethostbyname("alpha") == "127.0.0.1"
                assert ask("alpha", 8000) == "alpha 127.0.0.1"
                assert ask("hidden", 8001) == "hidden 127.0.0.1"  # not published, but on the shared loopback
                assert [name for _, name in socket.if_nameindex()] == ["lo"]

            def test_host(alpha):
                assert ask(*alpha.address(8000)).startswith("alpha ")
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-pod-network=loopback")
    result.assert_outcomes(passed=2)


def test_a_bad_pod_network_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--sandbox-pod-network=veth")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--sandbox-pod-network*veth*auto*bridge*loopback*"])


NO_BRIDGE = """
import errno
from pytest_sandbox.network import bridge

def _refused(names):  # what a kernel without bridge or veth answers (the cgroup v2 guest's)
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")

bridge.make_bridge = _refused  # the pod zygote is a fork of this pytest: it has this too
"""


@needs_python
@pytest.mark.parametrize("kind", ["auto", "bridge"])
def test_where_the_kernel_cannot_make_a_bridge(pytester: pytest.Pytester, kind: str) -> None:
    """auto: the pod zygote falls back to the shared loopback and says so; bridge: the tests that need the
    pod fail with the reason."""
    pytester.makeconftest(NO_BRIDGE)
    pytester.makepyfile(
        test_pod=textwrap.dedent(SERVICES)
        + textwrap.dedent(
            """
            @pytest.mark.container
            def test_pod(alpha):
                assert socket.gethostbyname("alpha") == "127.0.0.1"
                assert ask("alpha", 8000) == "alpha 127.0.0.1"
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandbox-pod-network={kind}")
    if kind == "auto":
        result.assert_outcomes(passed=1)
    else:
        assert result.ret != 0
        result.stdout.fnmatch_lines(["*cannot make the pod's bridge: Operation not supported*"])
