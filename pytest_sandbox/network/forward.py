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
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import protocol
from ..errors import SandboxError

CHUNK = 256 * 1024
RETRY_ACCEPT = 0.05  # seconds before accepting again after an error (EMFILE: connections pile up meanwhile)
# Connections one forwarded port carries at once (two threads of pytest each): a test that opens more gets
# the next ones closed at once, and pytest keeps its threads and fds.
MAX_CONNECTIONS = 128


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
        threading.Thread(target=self._accept, name=f"pytest-sandbox-port-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(RETRY_ACCEPT)  # out of fds for a moment, a client gone before it was taken: go on
                continue
            with self._lock:
                full = len(self._open) >= 2 * MAX_CONNECTIONS
            if full:
                client.close()
                continue
            try:
                upstream = self._connect()
            except (OSError, SandboxError):
                client.close()  # nothing listens (yet, or any more): the client sees the connection close
                continue
            with self._lock:
                self._open.update((client, upstream))
            pair = _Pair(client, upstream, self._forget)
            try:
                threading.Thread(target=pair.copy, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pair.copy, args=(upstream, client), daemon=True).start()
            except RuntimeError:  # no thread to be had now: this connection is dropped, the port stays
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(socks)

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
        with self._lock:
            self._done += 1
            last = self._done == 2
        if last:
            self._forget(*self._socks)
            for sock in self._socks:
                sock.close()
