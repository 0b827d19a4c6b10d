"""Forwarded ports: listeners whose connections go to a port on a service's loopback in the pod.

Rootless, without a tun device or a proxy process: a thread of pytest accepts on a listener (on
``127.0.0.1:<free port>`` of the host for a published port, on the service's name address in the pod for
the pod's members), asks the pod zygote (runtime/ports.py) for a socket connected to the port in the
service's network namespace, and two threads copy bytes between the pair until each side has shut down.
The listeners stay while their service restarts, so a port does not change.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import protocol
from ..errors import SandboxError

CHUNK = 256 * 1024
CONNECT_TIMEOUT = 10.0  # seconds a connection into the pod may take to be accepted or refused
RETRY_ACCEPT = 0.05  # seconds before accepting again after an error (EMFILE: connections pile up meanwhile)
FD_RESERVE = 256  # of pytest's open-file limit, left to pytest and the tests' own files
_slots: threading.BoundedSemaphore | None = None


def _connection_slots() -> threading.BoundedSemaphore:
    """Connections all forwarded ports of this pytest carry at once: each holds two fds and two threads of
    pytest, so they are counted against its open-file limit (1024 by default: 384 connections). Past that,
    the next connections wait in their listener's backlog, as at a busy server; a flood cannot take pytest's
    fds or threads."""
    global _slots
    if _slots is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = 4096 if soft == resource.RLIM_INFINITY else soft
        _slots = threading.BoundedSemaphore(max(16, min(4096, (limit - FD_RESERVE) // 2)))
    return _slots


def _refuse(client: socket.socket) -> None:
    """Close with a reset, not an end of stream: the client hears its connection refused, as it would hear
    from a port nothing listens on."""
    with contextlib.suppress(OSError):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


class Connector:
    """pytest's line to the pod zygote: one request and its answer at a time, from any thread."""

    def __init__(self, line: socket.socket) -> None:
        self._line = line
        self._lock = threading.Lock()

    def ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                protocol.send(self._line, request)
                answer, fds = protocol.recv(self._line)
            except OSError as exc:
                raise SandboxError(f"the pod is gone ({exc})") from None
        if answer is None:
            raise SandboxError("the pod is gone")
        return answer, fds

    def listening(self, service: str, port: int) -> bool:
        """Whether something listens on ``port`` in the service's network namespace."""
        answer, _ = self.ask({"op": "listening", "service": service, "port": port})
        return bool(answer.get("listening"))

    def _socket(self, op: str, service: str, port: int) -> socket.socket | str:
        """The socket the pod zygote made for ``op`` on the service's ``port``, or why it made none."""
        answer, fds = self.ask({"op": op, "service": service, "port": port})
        if not fds:
            return str(answer.get("error", "no socket"))
        for extra in fds[1:]:
            os.close(extra)
        return socket.socket(fileno=fds[0])

    def listen(self, service: str, port: int) -> socket.socket:
        """A socket listening on ``port`` of the service's name address in the pod (its forwarder's, or a
        relay's to a service of another xdist worker)."""
        sock = self._socket("listen", service, port)
        if isinstance(sock, str):
            raise SandboxError(f"cannot listen on {service}:{port} in the pod: {sock}")
        return sock

    def connect(self, service: str, port: int) -> socket.socket:
        """A socket connected (or connecting) to ``port`` on the service's loopback; OSError when nothing
        listens there."""
        sock = self._socket("connect", service, port)
        if isinstance(sock, str):
            raise ConnectionRefusedError(f"{service}:{port} in the pod: {sock}")
        poll = select.poll()  # the pod zygote only started it: a refusal shows once it is done
        poll.register(sock, select.POLLOUT)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if poll.poll(CONNECT_TIMEOUT * 1000) else 0
        if error:
            sock.close()
            raise OSError(error, f"{service}:{port} in the pod: {os.strerror(error)}")
        sock.setblocking(True)
        return sock

    def close(self) -> None:
        self._line.close()


class Published:
    """One forwarded port: a listener (a new one on host loopback, or ``listener``: one on a service's name
    address in the pod) whose connections go to what ``connect`` reaches."""

    def __init__(self, connect: Callable[[], socket.socket], listener: socket.socket | None = None) -> None:
        self._connect = connect
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
        self._listener = listener
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._slots = _connection_slots()  # the budget its connections are counted in, and given back to
        threading.Thread(target=self._accept, name=f"pytest-sandbox-port-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        slots = self._slots
        while True:
            while not slots.acquire(timeout=0.2):  # all taken: new connections wait in the backlog
                if self._closed:
                    return
            if not self._forward_one():
                slots.release()
                if self._closed:
                    return

    def _forward_one(self) -> bool:
        """Accept one connection and start copying it; False if there was none to copy (its slot is free)."""
        try:
            client, _ = self._listener.accept()
        except OSError:
            if not self._closed:
                time.sleep(RETRY_ACCEPT)  # out of fds for a moment, a client gone before it was taken: go on
            return False
        try:
            upstream = self._connect()
        except (OSError, SandboxError):
            _refuse(client)  # nothing listens (yet, or any more)
            return False
        with self._lock:
            self._open.update((client, upstream))
        pair = _Pair(client, upstream, self._forget)
        try:
            threading.Thread(target=pair.copy, args=(client, upstream), daemon=True).start()
        except RuntimeError:  # no thread to be had now: this connection is dropped, the port stays
            with self._lock:
                self._open.difference_update((client, upstream))
            for sock in (client, upstream):
                sock.close()
            return False
        try:
            threading.Thread(target=pair.copy, args=(upstream, client), daemon=True).start()
        except RuntimeError:
            for sock in (client, upstream):  # the first thread stops; the pair ends with it, and frees its slot
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            pair.one_done()
        return True

    def _forget(self, *socks: socket.socket) -> None:
        """A pair is done: its sockets are closed, and its slot is free."""
        with self._lock:
            self._open.difference_update(socks)
        self._slots.release()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()


class _Pair:
    """Two connected sockets; closed once both directions are done."""

    def __init__(self, a: socket.socket, b: socket.socket, forget: Callable[..., None]) -> None:
        self._socks = (a, b)
        self._done = 0
        self._lock = threading.Lock()
        self._forget = forget

    def copy(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        self.one_done()

    def one_done(self) -> None:
        """One direction is over; the second closes the pair."""
        with self._lock:
            self._done += 1
            last = self._done == 2
        if last:
            self._forget(*self._socks)
            for sock in self._socks:
                sock.close()
