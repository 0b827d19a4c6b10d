"""The session's sandbox factory.

One process per pytest process that already sits in the user namespace, with a
private mount namespace whose root is the read-only host view, as pid 1 of its
own pid namespace. Each sandbox is one fork of it into a new pid namespace, so
the expensive setup happens once. If pytest dies, the zygote gets SIGKILL
(parent-death signal) and, being pid 1, takes every sandbox with it.

Process tree::

    pytest ── zygote-parent (holds the user ns, waits) ── zygote (pid 1) ─┬─ init (pid 1) ── test
                                                                          └─ init (pid 1) ── test
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import socket
from typing import Any

import pytest

from . import _linux, child, rootfs, sync, userns
from .spec import SandboxSpec


@dataclasses.dataclass(frozen=True)
class SessionPaths:
    """Host paths every sandbox of the session treats specially."""

    cwd: str
    writable: tuple[str, ...]  # overlays with ephemeral writes: rootdir, cwd, $HOME, basetemp
    needed: tuple[str, ...]    # must stay visible: interpreter, sys.path, ...


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent goes; ``parent`` is its pid as this process sees it (0: outside our pid ns)."""
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the signal was armed


def zygote_main(control: socket.socket, items: dict[str, pytest.Item], stash_key: Any,
                paths: SessionPaths, crash_fd: int, pytest_pid: int) -> None:
    """Entry point of the forked zygote-parent; never returns."""
    try:
        _die_with_parent(pytest_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _linux.set_process_name("sandbox-zygote")
        userns.enter_user_namespace()
        rootfs.enter_host_view()
        rootfs.build_dev_template()
        _linux.unshare(_linux.CLONE_NEWPID)
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001
        sync.send(control, {"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    if pid == 0:
        try:
            _die_with_parent(0)
            _serve(control, items, stash_key, paths, crash_fd)
        except BaseException as exc:  # noqa: BLE001
            try:
                sync.send(control, {"op": "failed", "error": f"zygote: {type(exc).__name__}: {exc}"})
            except OSError:
                pass
        finally:
            os._exit(0)
    control.close()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        except InterruptedError:
            continue


class _Prepared:
    """A sandbox built ahead of time, waiting for a test."""

    def __init__(self, pid: int, init: socket.socket, test: socket.socket, spec: SandboxSpec) -> None:
        self.pid, self.init, self.test, self.spec = pid, init, test, spec

    def start(self, nodeid: str, to_pytest: socket.socket) -> None:
        """Hand the test to the waiting test process first (it is on the critical path), then to init."""
        try:
            sync.send(self.test, {"nodeid": nodeid}, fds=(to_pytest.fileno(),))
        except OSError:
            pass  # no test process: init has a setup error to report
        sync.send(self.init, {"nodeid": nodeid}, fds=(to_pytest.fileno(),))

    def close(self) -> None:
        """Closing both ends cancels a sandbox that never ran: its processes see end of stream and exit."""
        self.test.close()
        self.init.close()


class _Factory:
    def __init__(self, control: socket.socket, items: dict[str, pytest.Item], paths: SessionPaths,
                 crash_fd: int) -> None:
        self.control = control
        self.items = items
        self.paths = paths
        self.crash_fd = crash_fd
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.plans: dict[SandboxSpec, rootfs.RootPlan] = {}
        self.sandboxes: set[int] = set()

    def prepare(self, spec: SandboxSpec) -> _Prepared:
        """Fork a new sandbox for ``spec`` in a pid namespace of its own; it builds itself in parallel."""
        plan = self.plans.get(spec)
        if plan is None:
            plan = self.plans[spec] = rootfs.make_plan(self.paths.writable + spec.writable, self.paths.needed)
        init, init_end = sync.socketpair()
        test, test_end = sync.socketpair()
        _linux.unshare(_linux.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            self.control.close()
            init.close()
            test.close()
            child.sandbox_init(init_end, test_end, self.items, spec, plan, self.paths.cwd, self.crash_fd)
        _linux.setns(self.own_pidns, _linux.CLONE_NEWPID)  # the next fork gets a pid namespace of its own
        init_end.close()
        test_end.close()
        self.sandboxes.add(pid)
        return _Prepared(pid, init, test, spec)

    def reap(self, block: bool) -> None:
        while self.sandboxes:
            try:
                pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.sandboxes.clear()
                return
            if pid == 0:
                return
            self.sandboxes.discard(pid)

    def kill_all(self) -> None:
        for pid in self.sandboxes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap(block=True)


def _serve(control: socket.socket, items: dict[str, pytest.Item], stash_key: Any,
           paths: SessionPaths, crash_fd: int) -> None:
    gc.freeze()  # keep the garbage collector from touching (and so copying) the zygote's pages in every fork
    factory = _Factory(control, items, paths, crash_fd)
    config = next(iter(items.values())).config
    config.pluginmanager.register(child.ReportStreamer(config), "sandbox-report-streamer")
    ready: _Prepared | None = None
    sync.send(control, {"op": "ready"})
    while True:
        message, fds = sync.recv(control)
        factory.reap(block=False)
        if message is None or message.get("op") != "run":
            break
        to_pytest = socket.socket(fileno=fds[0])
        spec: SandboxSpec = items[message["nodeid"]].stash[stash_key]
        if ready is not None and ready.spec != spec:
            ready.close()
            ready = None
        try:
            if ready is None:
                ready = factory.prepare(spec)
            ready.start(message["nodeid"], to_pytest)
        except OSError as exc:
            sync.send(to_pytest, {"type": "error", "phase": "fork", "message": str(exc)})
        finally:
            to_pytest.close()
            if ready is not None:
                ready.close()
            ready = None
        # Build the next one now, while this test runs.
        try:
            ready = factory.prepare(spec)
        except OSError:
            ready = None
    factory.kill_all()
