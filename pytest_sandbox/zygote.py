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


def _serve(control: socket.socket, items: dict[str, pytest.Item], stash_key: Any,
           paths: SessionPaths, crash_fd: int) -> None:
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    plans: dict[SandboxSpec, rootfs.RootPlan] = {}
    sandboxes: set[int] = set()
    sync.send(control, {"op": "ready"})
    while True:
        message, fds = sync.recv(control)
        _reap(sandboxes, block=False)
        if message is None or message.get("op") != "run":
            break
        sock = socket.socket(fileno=fds[0])
        item = items[message["nodeid"]]
        spec: SandboxSpec = item.stash[stash_key]
        plan = plans.get(spec)
        if plan is None:
            plan = plans[spec] = rootfs.make_plan(paths.writable + spec.writable, paths.needed)
        try:
            _linux.unshare(_linux.CLONE_NEWPID)
            pid = os.fork()
        except OSError as exc:
            sync.send(sock, {"type": "error", "phase": "fork", "message": str(exc)})
            sock.close()
            _linux.setns(own_pidns, _linux.CLONE_NEWPID)
            continue
        if pid == 0:
            control.close()
            child.sandbox_init(sock, item, spec, plan, paths.cwd, crash_fd)
        _linux.setns(own_pidns, _linux.CLONE_NEWPID)  # the next fork gets a pid namespace of its own
        sock.close()
        sandboxes.add(pid)
    for pid in sandboxes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(sandboxes, block=True)


def _reap(pids: set[int], block: bool) -> None:
    while pids:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pids.clear()
            return
        if pid == 0:
            return
        pids.discard(pid)
