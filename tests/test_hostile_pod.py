"""Hostile pod members: a test on the pod network tries to change it, forge packets, reach another
namespace or a service's notify socket."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"
needs_python = pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed here")


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


@needs_python
def test_a_pod_member_cannot_change_the_pod_network_or_leave_its_namespace(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_attack=textwrap.dedent(
            f"""
            import ctypes, errno, os, socket
            import pytest
            from pyroute2 import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError
            from pytest_sandbox import service, wait

            SERVER = "import socket; s = socket.create_server(('127.0.0.1', 8000)); s.accept()"
            # wait.notify() gives it a NOTIFY_SOCKET, kept while it runs: an abstract socket of its namespace
            web = service("web", command=["{PYTHON}", "-c", SERVER], ports=[8000],
                          ready=wait.listening(8000) | wait.notify())

            @pytest.mark.container
            def test_netlink(web):
                with IPRoute() as ip:
                    eth0 = ip.link_lookup(ifname="eth0")[0]
                    attempts = {{
                        "address": lambda: ip.addr("add", index=eth0, address="10.89.1.1", prefixlen=16),
                        "down": lambda: ip.link("set", index=eth0, state="down"),
                        "mac": lambda: ip.link("set", index=eth0, address="02:00:00:00:00:01"),
                        "veth": lambda: ip.link("add", ifname="x0", kind="veth", peer={{"ifname": "x1"}}),
                        "route": lambda: ip.route("add", dst="10.0.0.0/8", gateway="10.89.0.1"),
                    }}
                    for what, attempt in attempts.items():
                        with pytest.raises(NetlinkError) as refused:
                            attempt()
                        assert refused.value.code == errno.EPERM, what

            @pytest.mark.container
            def test_raw_packets(web):
                for family, kind in ((socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW)):
                    with pytest.raises(PermissionError):
                        socket.socket(family, kind, socket.IPPROTO_RAW if family == socket.AF_INET else 0)

            @pytest.mark.container
            def test_no_other_namespace(web):
                own = os.readlink("/proc/self/ns/net")
                for fd in os.listdir("/proc/self/fd"):
                    try:
                        target = os.readlink(f"/proc/self/fd/{{fd}}")
                    except OSError:
                        continue
                    assert not target.startswith("net:[") or target == own, target
                libc = ctypes.CDLL(None, use_errno=True)
                assert libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0x40000000) == -1  # CLONE_NEWNET
                assert ctypes.get_errno() == errno.EPERM
                # the service's NOTIFY_SOCKET is not in this namespace: no member can say READY=1 for it
                assert "pytest-sandbox-notify" not in open("/proc/net/unix").read()
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


UDP_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.bind(('::', 9999))\n"
    "print('LISTENING', flush=True)\n"
    "while True:\n"
    "    data, peer = s.recvfrom(100)\n"
    "    print('GOT', data.decode(), peer[0], flush=True)\n"
)


@needs_python
def test_a_pod_member_cannot_send_ipv6_from_a_forged_address(pytester: pytest.Pytester) -> None:
    """IPV6_FREEBIND needs no capability: with IPv6 on the pod's links a member could send datagrams from
    any address (another member's, a service's) to every member. The pod's links have no IPv6."""
    pytester.makepyfile(
        test_attack=textwrap.dedent(
            f"""
            import socket, time
            import pytest
            from pytest_sandbox import service, wait
            from pytest_sandbox.network import bridge

            udp = service("udp", command=["{PYTHON}", "-c", {UDP_LISTENER!r}], ready=wait.log("LISTENING"))

            @pytest.mark.container
            def test_forge(udp):
                assert open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6").read().strip() == "1"
                eth0 = socket.if_nametoindex("eth0")
                for source in ("fe80::dead:beef", "fd00::66"):
                    forger = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    forger.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
                    try:
                        forger.bind((source, 0, 0, eth0))
                        forger.sendto(b"forged", ("ff02::1", 9999, 0, eth0))
                    except OSError:
                        pass  # refused outright: as good
                    finally:
                        forger.close()
                # The control: plain IPv4 from this member reaches the service's own address.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as honest:
                    honest.sendto(b"honest", (bridge.service_address(["udp"], "udp"), 9999))
                deadline = time.monotonic() + 10
                while "GOT honest" not in udp.logs() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                assert "GOT honest" in udp.logs()
                assert "forged" not in udp.logs()
                # loopback keeps IPv6
                with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
                    socket.create_connection(server.getsockname()[:2], timeout=5).close()
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
