"""Messages between pytest, the session zygote and each sandbox.

All channels are ``SOCK_SEQPACKET`` socketpairs, so message boundaries survive.
Each message is one pickled dict of plain data (tuples survive, unlike JSON);
large ones are split into chunks whose 4-byte header says whether more follow.
Anything else on a socket (a test writing to an inherited fd) is dropped.

::

    pytest                         zygote (pid 1 of the session)           test process (pid 2 of a sandbox)
      |                              |-- spawn init, fork test (ahead) -->  |  builds namespaces + mounts, waits
      |-- run {nodeid} + [sock] ---->|                                      |
      |                              |-- {nodeid} + [sock] ---------------->|  runs the protocol
      |<-------------------------------------------------- report {data} ---|  (setup, call, teardown)
      |<-------------------------------------------------- warning {...} ---|
      |<-------------------------------------------------- done ------------|  exits
      |<-- exit {code|signal, usage}-|  test exited: SIGKILL its init
      |<-- gone ---------------------|  init reaped: the namespace is empty
      |-- exit --------------------->|  (end of session: kill and reap everything)
"""

from __future__ import annotations

import array
import pickle
import socket
from typing import Any

CHUNK = 60 * 1024
MORE, LAST = b"\0sb+", b"\0sb."  # a test scribbling on an inherited fd cannot forge these by accident
HEADER = len(MORE)


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    for index, chunk in enumerate(chunks):
        marker = LAST if index == len(chunks) - 1 else MORE
        if index == 0 and fds:
            sock.sendmsg([marker + chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.sendall(marker + chunk)


def recv(sock: socket.socket, block: bool = True) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the fds that came with it; (None, []) at end of stream.

    With ``block=False`` raises BlockingIOError when no message has arrived yet.
    """
    parts: list[bytes] = []
    fds: list[int] = []
    flags = 0 if block else socket.MSG_DONTWAIT
    while True:
        data, ancdata, _flags, _addr = sock.recvmsg(CHUNK + HEADER, socket.CMSG_SPACE(16 * 4), flags)
        flags = 0  # the rest of a chunked message is already on its way
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if not data:
            return None, fds
        header = data[:HEADER]
        if header not in (MORE, LAST):
            parts.clear()  # junk, not ours
            continue
        parts.append(data[HEADER:])
        if header == LAST:
            try:
                return pickle.loads(b"".join(parts)), fds
            except Exception:
                parts.clear()
