"""pytest's handle on the session's zygote: start it, ask it for sandboxes, collect their exits."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from typing import Any

import pytest

from .. import protocol
from ..errors import SandboxError
from . import zygote


class Zygote:
    """Handle on the session's zygote process (see zygote.py)."""

    def __init__(
        self,
        items: dict[str, pytest.Item],
        stash_key: Any,
        paths: zygote.SessionPaths,
        epoch: int,
        limits: zygote.Limits,
    ) -> None:
        self.epoch = epoch
        self.limits = limits
        self.outputs = paths.outputs  # where sandboxes may write files pytest keeps
        self.paths = paths  # what the sandboxes show of the host
        self.finishing: list[socket.socket] = []  # finished sandboxes whose exit is not yet collected
        self.nodeids = frozenset(items)
        self.control, theirs = protocol.socketpair()
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # what pytest buffered would be written again by every sandbox
            stream.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process"
            self.pid = os.fork()
        if self.pid == 0:
            self.control.close()
            zygote.zygote_main(theirs, items, stash_key, paths, parent, limits)
        theirs.close()
        message, _ = protocol.recv(self.control)
        if message is None or message.get("op") != "ready":
            error = (message or {}).get("error", "the zygote exited during setup")
            self.close()
            raise SandboxError(f"cannot start sandboxes: {error}")
        self.scope_sandboxes = bool(message.get("scope_sandboxes"))  # as the zygote found this kernel

    def start(self, nodeid: str) -> tuple[socket.socket, socket.socket]:
        """Ask for a sandbox running ``nodeid``; returns its status channel (from the zygote) and its
        reports channel (from the test process)."""
        self.collect_exits(block=False)
        status, status_end = protocol.socketpair()
        reports, reports_end = protocol.socketpair()
        try:
            protocol.send(
                self.control, {"op": "run", "nodeid": nodeid}, fds=(status_end.fileno(), reports_end.fileno())
            )
        except OSError as exc:
            status.close()
            reports.close()
            raise SandboxError(f"the sandbox zygote of this session died unexpectedly ({exc})") from None
        finally:
            status_end.close()
            reports_end.close()
        return status, reports

    def kill(self, nodeid: str) -> None:
        """End the sandbox running ``nodeid`` now (its exit message follows as usual)."""
        try:
            protocol.send(self.control, {"op": "kill", "nodeid": nodeid})
        except OSError:
            pass

    def collect_exits(self, block: bool) -> None:
        """Collect the "gone" messages of finished sandboxes: every process of theirs has ended.

        A finished sandbox's processes leave while pytest reports and the next sandbox
        runs; ``block=True`` waits until all have left, which is done before pytest
        runs anything on the host and at the end of the session.
        """
        still = []
        for sock in self.finishing:
            while True:
                try:
                    message, fds = protocol.recv(sock, block=block)
                    for fd in fds:  # the crash memfd of a test whose reports did not need it
                        os.close(fd)
                except BlockingIOError:
                    still.append(sock)
                    break
                except protocol.ProtocolError:
                    message = None
                if message is None or message.get("type") == "gone":
                    sock.close()
                    break
        self.finishing = still

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self) -> None:
        """Stop the zygote and wait until it and every sandbox are gone."""
        try:
            self.collect_exits(block=True)
        except OSError:
            pass
        try:
            protocol.send(self.control, {"op": "exit"})
        except OSError:
            pass
        self.control.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
