"""The pod network: a bridge in the pod zygote's network namespace, and a veth pair per member.

Every namespace here is owned by the session's user namespace, so none of this needs root and none of it
is seen on the host (no interface, no route, nothing left when the session ends: the namespaces go with
their last process, and their interfaces with them). It is plumbed only from the zygote side, before a
sandbox gives up its capabilities; a test cannot add an address, an interface or a route.

Addresses (one /16, the same in every pod, so a name means the same in every xdist worker's pod):

- ``10.89.0.1``: the bridge, in the pod zygote's namespace;
- ``10.89.1.0`` + k: the name of the k-th service (sorted by name), also on the bridge: pytest listens
  there on the service's ports and forwards each connection to the port on the service's own loopback,
  as kube-proxy's userspace mode does for a Kubernetes Service. So a server that listens on 127.0.0.1 only
  (PostgreSQL's default, redis in protected mode) is reached by name, and only the ports it publishes;
- ``10.89.64.0`` + k: the k-th service's own address (its network namespace, kept across restarts);
- ``10.89.128.0`` + n: each other member (a test with ``network="pod"``), n chosen by its zygote.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator, Sequence

from ..linux import syscalls
from .rtnetlink import Route

BRIDGE = "pod0"
MEMBER_LINK = "eth0"  # the member's end of its veth pair
PREFIX = 16
GATEWAY = ipaddress.IPv4Address("10.89.0.1")
_NAMES = ipaddress.IPv4Address("10.89.1.0")
_SERVICES = ipaddress.IPv4Address("10.89.64.0")
_MEMBERS = ipaddress.IPv4Address("10.89.128.0")
MAX_SERVICES = 16000
MEMBER_SLOTS = 32766  # 10.89.128.1 .. 10.89.255.254


def _index(names: Sequence[str], name: str) -> int:
    index = sorted(set(names)).index(name)
    if index >= MAX_SERVICES:
        raise ValueError(f"a pod holds at most {MAX_SERVICES} services")
    return index


def name_address(names: Sequence[str], name: str) -> str:
    """The address ``name`` resolves to in the pod: where its published ports are forwarded from."""
    return str(_NAMES + 1 + _index(names, name))


def service_address(names: Sequence[str], name: str) -> str:
    """The service's own address (its network namespace's end of its veth pair)."""
    return str(_SERVICES + 1 + _index(names, name))


def member_address(slot: int) -> str:
    """The address of the member in ``slot`` (1 .. MEMBER_SLOTS)."""
    if not 1 <= slot <= MEMBER_SLOTS:
        raise ValueError(f"member slot {slot} out of 1..{MEMBER_SLOTS}")
    return str(_MEMBERS + slot)


def peer_name(address: str) -> str:
    """The bridge side's name of a member's veth: unique while its address is (at most 15 characters)."""
    return "v" + ipaddress.IPv4Address(address).packed.hex()


def make_bridge(names: Sequence[str]) -> None:
    """In the pod zygote's fresh network namespace: loopback, the bridge with its address and one address
    per service name (forwarded ports listen there)."""
    syscalls.loopback_up()
    with Route() as route:
        route.add_link(BRIDGE, "bridge")
        route.add_address(BRIDGE, str(GATEWAY), PREFIX)
        for name in sorted(set(names)):
            route.add_address(BRIDGE, name_address(names, name), PREFIX)
        route.set_link(BRIDGE)


@contextlib.contextmanager
def entered(netns: int) -> Iterator[None]:
    """This (single-threaded) process in the network namespace ``netns`` (an fd, or a pidfd), then back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(netns, syscalls.CLONE_NEWNET)
        try:
            yield
        finally:
            syscalls.setns(own, syscalls.CLONE_NEWNET)
    finally:
        os.close(own)


def without_ipv6() -> None:
    """No IPv6 on this network namespace's pod link (``eth0``, made now or later): the pod is IPv4, and a
    process without capabilities could otherwise send IPv6 from any source address it likes
    (``IPV6_FREEBIND``) to every member. Written through a writable /proc of the namespace; loopback keeps
    ``::1``."""
    for device in ("default", MEMBER_LINK):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6", "w") as knob:
                knob.write("1")
        except FileNotFoundError:
            pass  # no eth0 yet (a test's comes from "default"), or a kernel without IPv6


def join(bridge_netns: int, address: str) -> None:
    """From a new network namespace (this process holds CAP_NET_ADMIN in its owner): loopback up, and a
    veth pair whose ``eth0`` end has ``address`` here and whose other end is a port of the pod's bridge."""
    syscalls.loopback_up()
    peer = peer_name(address)
    with Route() as route:
        route.add_link(MEMBER_LINK, "veth", peer=peer, peer_netns=bridge_netns)
        route.add_address(MEMBER_LINK, address, PREFIX)
        route.set_link(MEMBER_LINK)
    with entered(bridge_netns), Route() as route:
        route.set_link(peer, master=BRIDGE)
