"""The pod zygote's side of forwarded ports and readiness: it holds the pod's bridge and each service's
network namespace (network/bridge.py).

pytest's forwarders accept a connection (on host loopback for a published port, on a service's name
address in the pod for a pod member) and ask here for a connection to the port on the service's loopback:
this process enters the service's network namespace, starts the connection there and hands the socket back
over SCM_RIGHTS; pytest copies bytes between the two. ``wait.listening`` asks here too: the service's TCP
table (``/proc/thread-self/net/tcp{,6}`` in its namespace) lists its listening sockets, whatever its image
holds (no shell, no netstat needed).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from .. import protocol
from ..network import bridge

LISTEN = "0A"  # the state column of a listening socket in /proc/net/tcp


def answer(line: socket.socket, service_nets: dict[str, int], names: Sequence[str], bridged: bool) -> bool:
    """Answer one request on pytest's line; False when pytest closed it. ``names``: the pod's services;
    ``bridged``: the pod is a bridge (network/bridge.py), else one shared loopback."""
    try:
        message, fds = protocol.recv(line)
    except (protocol.ProtocolError, OSError):
        return False
    for fd in fds:
        os.close(fd)
    if message is None:
        return False
    port, name = message.get("port"), message.get("service")
    if not isinstance(port, int) or not 0 < port < 65536:
        protocol.send(line, {"error": f"not a port: {port!r}"})
        return True
    if not isinstance(name, str) or name not in names:
        protocol.send(line, {"error": f"not a service of the pod: {name!r}"})
        return True
    op = message.get("op")
    netns = service_nets.get(name)
    if op == "listening":
        if netns is None:
            protocol.send(line, {"listening": False})
        else:
            with bridge.entered(netns):
                protocol.send(line, {"listening": port in listening_ports()})
    elif op == "listen":  # on the service's name address: its forwarder, or a relay to another xdist worker's
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((bridge.name_address(names, name) if bridged else "127.0.0.1", port))
                listener.listen(128)
                protocol.send(line, {"listening": True}, fds=(listener.fileno(),))
        except OSError as exc:
            protocol.send(line, {"error": os.strerror(exc.errno) if exc.errno else str(exc)})
    elif op == "connect":
        try:
            if netns is None:
                raise OSError(errno.ECONNREFUSED, "the service has not started")
            with bridge.entered(netns):
                sock = connect(port, bridge.service_address(names, name) if bridged else "")
        except OSError as exc:
            protocol.send(line, {"error": os.strerror(exc.errno) if exc.errno else str(exc)})
        else:
            with sock:
                protocol.send(line, {"connected": True}, fds=(sock.fileno(),))
    else:
        protocol.send(line, {"error": f"unknown request {op!r}"})
    return True


def connect(port: int, own_address: str = "") -> socket.socket:
    """A socket connecting to ``port`` on this network namespace's loopback (IPv4, else IPv6), else on
    ``own_address`` (a server that listens on its pod address only); never blocks this process."""
    error = errno.ECONNREFUSED
    targets = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    if own_address:
        targets.append((socket.AF_INET, own_address))
    for family, address in targets:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6
        sock.setblocking(False)
        error = sock.connect_ex((address, port))
        if error in (0, errno.EINPROGRESS):
            return sock
        sock.close()
    raise OSError(error, os.strerror(error))


def listening_ports(
    tables: tuple[str, ...] = ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"),
) -> set[int]:
    """TCP ports something listens on in this thread's network namespace."""
    found: set[int] = set()
    for table in tables:
        try:
            with open(table) as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found
