"""Readiness conditions for services: ``ready=wait.listening(5432) | wait.log(r"ready")``.

Each condition is checked from outside the service, without a shell in its image:
``listening`` reads the pod's own TCP table, ``log`` the service's captured output from its first byte
(no early line is missed), ``http`` sends one request through the pod, ``command`` runs a program in the
service's sandbox, ``notify`` waits for sd_notify's READY=1. ``|`` means either, ``&`` both.
"""

from __future__ import annotations

import re
import socket
from typing import Protocol

HTTP_TIMEOUT = 2.0  # seconds one readiness request may take


class Probe(Protocol):
    """What a condition may look at: given by the service being started (services/pod.py)."""

    def listening(self, port: int) -> bool: ...

    def log_text(self) -> str: ...

    def connect(self, port: int) -> socket.socket: ...

    def run(self, argv: list[str]) -> int: ...

    def notified(self) -> bool: ...


class Condition:
    """A readiness check; compose with ``|`` (either) and ``&`` (both)."""

    def check(self, probe: Probe) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __or__(self, other: Condition) -> Condition:
        return _Either(self, _checked(other))

    def __and__(self, other: Condition) -> Condition:
        return _Both(self, _checked(other))

    def __repr__(self) -> str:
        return f"wait.{self.describe()}"


def _checked(other: object) -> Condition:
    if not isinstance(other, Condition):
        raise TypeError(f"a readiness condition combines with another wait.* condition, not {other!r}")
    return other


class _Either(Condition):
    def __init__(self, *parts: Condition) -> None:
        self.parts = parts

    def check(self, probe: Probe) -> bool:
        return any(part.check(probe) for part in self.parts)

    def describe(self) -> str:
        return " | ".join(part.describe() for part in self.parts)


class _Both(Condition):
    def __init__(self, *parts: Condition) -> None:
        self.parts = parts

    def check(self, probe: Probe) -> bool:
        return all(part.check(probe) for part in self.parts)

    def describe(self) -> str:
        return " & ".join(
            f"({part.describe()})" if isinstance(part, _Either) else part.describe() for part in self.parts
        )


def _port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"wait.{what}: port must be an int from 1 to 65535, not {port!r}")
    return port


class _Listening(Condition):
    def __init__(self, port: int) -> None:
        self.port = _port(port, "listening")

    def check(self, probe: Probe) -> bool:
        return probe.listening(self.port)

    def describe(self) -> str:
        return f"listening({self.port})"


class _Log(Condition):
    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise TypeError(f"wait.log: a regular expression as a str, not {pattern!r}")
        try:
            self.regex = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"wait.log: {pattern!r} is not a regular expression: {exc}") from None

    def check(self, probe: Probe) -> bool:
        return self.regex.search(probe.log_text()) is not None

    def describe(self) -> str:
        return f"log({self.regex.pattern!r})"


class _Http(Condition):
    def __init__(self, port: int, path: str, status: int) -> None:
        self.port = _port(port, "http")
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ValueError(f"wait.http: path must start with '/' and hold no spaces or line breaks, not {path!r}")
        self.path, self.status = path, status

    def check(self, probe: Probe) -> bool:
        try:
            with probe.connect(self.port) as sock:
                sock.settimeout(HTTP_TIMEOUT)
                sock.sendall(f"GET {self.path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                head = sock.recv(1024).split(b"\r\n", 1)[0].split()
        except OSError:
            return False
        return len(head) >= 2 and head[0].startswith(b"HTTP/") and head[1] == str(self.status).encode()

    def describe(self) -> str:
        return f"http({self.port}, {self.path!r}, status={self.status})"


class _Command(Condition):
    def __init__(self, argv: list[str]) -> None:
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"wait.command: a non-empty list of str arguments, not {argv!r}")
        self.argv = list(argv)

    def check(self, probe: Probe) -> bool:
        return probe.run(self.argv) == 0

    def describe(self) -> str:
        return f"command({self.argv!r})"


class _Notify(Condition):
    def check(self, probe: Probe) -> bool:
        return probe.notified()

    def describe(self) -> str:
        return "notify()"


def uses_notify(condition: Condition | None) -> bool:
    """Whether ``condition`` waits for sd_notify: the service then gets a NOTIFY_SOCKET."""
    if isinstance(condition, _Notify):
        return True
    return any(uses_notify(part) for part in getattr(condition, "parts", ()))


def listening(port: int) -> Condition:
    """Ready once something in the pod listens on TCP ``port`` (the kernel's table, not a connection)."""
    return _Listening(port)


def log(pattern: str) -> Condition:
    """Ready once the service's output (stdout and stderr, from its start) matches ``pattern``."""
    return _Log(pattern)


def http(port: int, path: str = "/", status: int = 200) -> Condition:
    """Ready once ``GET path`` on ``port`` answers with ``status``."""
    return _Http(port, path, status)


def command(argv: list[str]) -> Condition:
    """Ready once ``argv``, run in the service's sandbox, exits with 0 (each try a new process)."""
    return _Command(argv)


def notify() -> Condition:
    """Ready once the service says ``READY=1`` on the socket in its ``NOTIFY_SOCKET`` (sd_notify: systemd's
    protocol, which Debian's redis with ``--supervised systemd`` and postgres speak)."""
    return _Notify()
