"""pytest's handle on the session's zygote: start it, ask it for sandboxes, collect their exits."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from .. import protocol
from ..errors import SandboxError
from . import zygote
from .service_process import ServiceLaunch
from .session_process import SessionLaunch

EXEC_OUTPUT_MAX = 16 * 2**20  # bytes of each of stdout and stderr an exec in a service keeps


class Zygote:
    """Handle on the session's zygote process (see zygote.py)."""

    def __init__(
        self,
        items: dict[str, pytest.Item],
        stash_key: Any,
        paths: zygote.SessionPaths,
        epoch: int,
        limits: zygote.Limits,
        namespaces: zygote.Namespaces | None = None,
        services: dict[str, ServiceLaunch] | None = None,
        session: SessionLaunch | None = None,
    ) -> None:
        self.epoch = epoch
        self.limits = limits
        self.userns = self.netns = -1  # its namespaces' fds, once it is ready
        self.outputs = paths.outputs  # where sandboxes may write files pytest keeps
        self.paths = paths  # what the sandboxes show of the host
        self.finishing: list[socket.socket] = []  # finished sandboxes whose exit is not yet collected
        # a sandbox's status line -> what runs once it is gone, one action per key (when_gone)
        self.after_exit: dict[socket.socket, dict[object, Callable[[], object]]] = {}
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
            zygote.zygote_main(
                theirs,
                items,
                stash_key,
                paths,
                parent,
                limits,
                namespaces or zygote.Namespaces(),
                services or {},
                session,
            )
        theirs.close()
        message, fds = protocol.recv(self.control)
        if message is None or message.get("op") != "ready" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            error = (message or {}).get("error", "the zygote exited during setup")
            self.close()
            raise SandboxError(f"cannot start sandboxes: {error}")
        self.scope_sandboxes = bool(message.get("scope_sandboxes"))  # as the zygote found this kernel
        self.pod_bridged = bool(message.get("pod_bridged"))  # the pod zygote's: a bridge, or one loopback
        self.userns, self.netns = fds  # its namespaces: the session's user namespace, and (the pod's) network

    def start(self, nodeid: str) -> tuple[socket.socket, socket.socket]:
        """Ask for a sandbox running ``nodeid``; returns its status channel (from the zygote) and its
        reports channel (from the test process). In the hermetic session's sandbox, the sandboxes before it are
        gone first: the zygote takes a test's layer off before it says "gone", in the one mount namespace."""
        self.collect_exits(block=self.paths.in_session)
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

    def start_session(self, stdio: list[int]) -> tuple[socket.socket, socket.socket]:
        """Start the hermetic session's sandbox (its launch came with the fork), pytest in it on ``stdio``
        (stdin, stdout, stderr); returns its status channel (from the zygote) and its own channel (outputs)."""
        status, status_end = protocol.socketpair()
        channel, channel_end = protocol.socketpair()
        try:
            protocol.send(self.control, {"op": "session"}, fds=(status_end.fileno(), channel_end.fileno(), *stdio))
        except OSError as exc:
            status.close()
            channel.close()
            raise SandboxError(f"the sandbox zygote of this session died unexpectedly ({exc})") from None
        finally:
            status_end.close()
            channel_end.close()
        return status, channel

    def start_service(self, name: str, log_fd: int, started_fd: int) -> socket.socket:
        """Ask the pod zygote to start service ``name`` (its launch came with the fork) writing to ``log_fd``;
        returns its status channel (exit, gone). ``started_fd`` closes when its command has started."""
        status, status_end = protocol.socketpair()
        try:
            protocol.send(self.control, {"op": "service", "name": name}, fds=(status_end.fileno(), log_fd, started_fd))
        except OSError as exc:
            status.close()
            raise SandboxError(f"the services' zygote of this session died unexpectedly ({exc})") from None
        finally:
            status_end.close()
        return status

    def exec_in_service(self, nodeid: str, argv: list[str], timeout: float) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the running service ``nodeid``'s sandbox: (exit code, stdout, stderr). Past
        ``timeout`` the command is left to the service (it ends with it) and the code is -1."""
        return self.start_exec(nodeid, argv).wait(timeout)

    def start_exec(self, nodeid: str, argv: list[str]) -> ServiceExec:
        """Start ``argv`` in the service ``nodeid``'s sandbox; its end is waited for apart (``wait``), so the
        zygote's line is free meanwhile."""
        status, status_end = protocol.socketpair()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            protocol.send(
                self.control, {"op": "exec", "nodeid": nodeid, "argv": argv}, fds=(status_end.fileno(), out_w, err_w)
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            status.close()
            raise SandboxError(f"the services' zygote of this session died unexpectedly ({exc})") from None
        finally:
            status_end.close()
            os.close(out_w)
            os.close(err_w)
        return ServiceExec(status, out_r, err_r)

    def signal(self, nodeid: str, signum: int) -> None:
        with contextlib.suppress(OSError):
            protocol.send(self.control, {"op": "signal", "nodeid": nodeid, "signal": signum})

    def connector(self) -> socket.socket:
        """A line to the pod zygote for connections into the pod and its listening ports (runtime/ports.py)."""
        line, theirs = protocol.socketpair()
        try:
            protocol.send(self.control, {"op": "connector"}, fds=(theirs.fileno(),))
        finally:
            theirs.close()
        return line

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
                    self.exited(sock)
                    break
        self.finishing = still

    def when_gone(self, status: socket.socket, key: object, action: Callable[[], object]) -> None:
        """Run ``action`` once the sandbox of ``status`` has no process left (its exit collected, or pytest
        gave up on it): a shared or scope sandbox outlives the test that used it. One action per ``key``:
        each test of a scope sandbox asks again."""
        self.after_exit.setdefault(status, {})[key] = action

    def exited(self, status: socket.socket) -> None:
        """The sandbox of ``status`` is gone (or given up): close its line, run what waited for that."""
        status.close()
        for action in self.after_exit.pop(status, {}).values():
            action()

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
        for status in [*self.finishing, *self.after_exit]:  # the zygote took every sandbox along
            self.exited(status)
        self.finishing = []
        for fd in (self.userns, self.netns):
            if fd >= 0:
                os.close(fd)
        self.userns = self.netns = -1


class ServiceExec:
    """A command started in a service (Zygote.start_exec): its exit comes on ``status``, its output on two
    pipes, each kept up to EXEC_OUTPUT_MAX bytes."""

    def __init__(self, status: socket.socket, out_r: int, err_r: int) -> None:
        self.status, self.out_r, self.err_r = status, out_r, err_r

    def wait(self, timeout: float) -> tuple[int, bytes, bytes]:
        """(exit code, stdout, stderr); -1 and what came so far past ``timeout``. Closes the lines."""
        out_r, err_r, status = self.out_r, self.err_r, self.status
        output = {out_r: bytearray(), err_r: bytearray()}
        deadline = time.monotonic() + timeout
        reading = [out_r, err_r]
        code: int | None = None
        try:
            while code is None or reading:
                left = deadline - time.monotonic()
                watched = [*reading, *([status.fileno()] if code is None else [])]
                readable = select.select(watched, [], [], max(left, 0))[0]
                if not readable and left <= 0:
                    return -1, bytes(output[out_r]), bytes(output[err_r])
                for source in readable:
                    if source == status.fileno():
                        message, fds = protocol.recv(status)
                        for extra in fds:
                            os.close(extra)
                        code = int((message or {}).get("code", -1))
                        continue
                    data = os.read(source, 65536)
                    if not data:
                        reading.remove(source)
                    elif len(output[source]) < EXEC_OUTPUT_MAX:  # past it, read and dropped: the command goes on
                        output[source].extend(data[: EXEC_OUTPUT_MAX - len(output[source])])
            return code, bytes(output[out_r]), bytes(output[err_r])
        finally:
            for fd in (out_r, err_r):
                os.close(fd)
            status.close()
