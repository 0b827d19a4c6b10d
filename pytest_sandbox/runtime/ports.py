"""The pod zygote's side of published ports and readiness: it lives in the pod's network namespace.

pytest's forwarder accepts a connection on host loopback and asks here for a connection to the port in
the pod; this process connects (it sits in the pod's network namespace) and hands the connected socket
back over SCM_RIGHTS, and pytest copies bytes between the two. ``wait.listening`` asks here too: the
pod's TCP table (``/proc/self/net/tcp{,6}``) has the listening sockets of every member, whatever its image
holds (no shell, no netstat needed).
"""

from __future__ import annotations

import errno
import os
import socket

from .. import protocol

LISTEN = "0A"  # the state column of a listening socket in /proc/net/tcp


def answer(line: socket.socket) -> bool:
    """Answer one request on pytest's line; False when pytest closed it."""
    try:
        message, fds = protocol.recv(line)
    except (protocol.ProtocolError, OSError):
        return False
    for fd in fds:
        os.close(fd)
    if message is None:
        return False
    port = message.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        protocol.send(line, {"error": f"not a port: {port!r}"})
        return True
    if message.get("op") == "listening":
        protocol.send(line, {"listening": port in listening_ports()})
    elif message.get("op") == "listen":  # a relay to another xdist worker's service (services/shared.py)
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", port))
                listener.listen(128)
                protocol.send(line, {"listening": True}, fds=(listener.fileno(),))
        except OSError as exc:
            protocol.send(line, {"error": os.strerror(exc.errno) if exc.errno else str(exc)})
    elif message.get("op") == "connect":
        try:
            sock = connect(port)
        except OSError as exc:
            protocol.send(line, {"error": os.strerror(exc.errno) if exc.errno else str(exc)})
        else:
            with sock:
                protocol.send(line, {"connected": True}, fds=(sock.fileno(),))
    else:
        protocol.send(line, {"error": f"unknown request {message.get('op')!r}"})
    return True


def connect(port: int) -> socket.socket:
    """A socket connecting to ``port`` on the pod's loopback (IPv4, else IPv6); never blocks this process."""
    error = errno.ECONNREFUSED
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        error = sock.connect_ex((address, port))
        if error in (0, errno.EINPROGRESS):
            return sock
        sock.close()
    raise OSError(error, os.strerror(error))


def listening_ports(tables: tuple[str, ...] = ("/proc/self/net/tcp", "/proc/self/net/tcp6")) -> set[int]:
    """TCP ports something listens on in this process's network namespace."""
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
