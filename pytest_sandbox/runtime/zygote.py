"""The session's sandbox factory.

One process per pytest process that already sits in the user namespace, with a
private mount namespace whose root is the read-only host view, as pid 1 of its
own pid namespace. Each sandbox is one fork of it into a new pid namespace, so
the expensive setup happens once. If pytest dies, the
zygote-parent gets SIGTERM (parent-death signal), kills the zygote, which being
pid 1 takes every sandbox with it, and removes the session's cgroups; if the zygote
sees pytest's end first (its control socket closes without "exit"), it ends and the
zygote-parent removes them all the same.

Process tree::

    pytest ── zygote-parent (holds the user ns, waits) ── zygote (pid 1) ─┬─ init (pid 1 of sandbox A)
                                                                          ├─ test (pid 2 of sandbox A)
                                                                          ├─ init (pid 1 of sandbox B)
                                                                          └─ test (pid 2 of sandbox B)

For each sandbox the zygote spawns pid 1 (a 4 KiB program, no fork of pytest) and
forks the test process as pid 2; the test process builds the sandbox's namespaces and
pid 1 joins them (see test_process.py). The zygote sees the test process exit (pidfd),
sends pytest the exit status and kills that sandbox's pid 1, which ends every process left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import os
import secrets
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from .. import credentials, outputs, protocol, volumes
from ..linux import mounts, process, rootfs, syscalls, userns
from ..spec import SandboxSpec
from . import cgroups, init, test_layers, test_process

PYTEST_GONE = 3  # the zygote's exit code when pytest closed the control socket without saying "exit"
PYTEST_END_GRACE = 3.0  # seconds the zygote-parent waits for a pytest that closed the zygote's socket to end


@dataclasses.dataclass(frozen=True)
class SessionPaths:
    """Host paths every sandbox of the session treats specially."""

    cwd: str
    writable: tuple[str, ...]  # overlays with ephemeral writes: rootdir, cwd, $HOME, basetemp
    needed: tuple[str, ...]  # must stay visible: interpreter, sys.path, ...
    images: dict[str, rootfs.ImageMount] = dataclasses.field(default_factory=dict)  # built before tests run
    keep_dir: str = ""  # --sandbox-keep: image tests' read/write layers go here instead of a tmpfs
    outputs: tuple[str, ...] = ()  # declared outputs: what sandboxes write there reaches the host
    volumes_root: str = ""  # the store's named volumes (volumes.VolumeStore)
    scope_sandboxes: bool = False  # --sandbox-scope=test: a spec's tests share a sandbox, each in a fork over a layer


@dataclasses.dataclass
class Limits:
    """How limits are enforced in this session; ``accounting`` measures sandboxes without limits too."""

    backend: cgroups.Backend
    session: cgroups.Session | None
    accounting: bool


def zygote_main(
    control: socket.socket,
    items: dict[str, pytest.Item],
    stash_key: Any,
    paths: SessionPaths,
    pytest_pid: int,
    limits: Limits,
) -> None:
    """Entry point of the forked zygote-parent; never returns."""
    zygote: list[int] = []  # a pidfd of the zygote, once forked

    def end_session(*_: object) -> NoReturn:
        """pytest is gone: end every sandbox, then remove the session's cgroups. Never returns: this is a
        fork of pytest, and whatever it raised would run pytest's code on."""
        try:
            for pidfd in zygote:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            if limits.session is not None:
                limits.session.close()
        finally:
            os._exit(1)

    # 1. pytest's death, at any moment from here on, is a SIGTERM that ends the session; ^C is pytest's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, end_session)
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pytest_pid:
        end_session()
    pytest_pidfd = os.pidfd_open(pytest_pid)  # our parent: not a reused pid
    try:
        syscalls.set_process_name("sandbox-zygote")
        # 2. The user namespace: the right to mount and make namespaces, without root.
        userns.enter_user_namespace()
        # 3. The read-only host view and the /dev template, once for every sandbox of the session.
        rootfs.enter_host_view(paths.keep_dir)
        rootfs.build_dev_template()
        if paths.scope_sandboxes and not test_layers.detached_layers_work():
            paths = dataclasses.replace(paths, scope_sandboxes=False)  # pytest hears it with "ready"
        # 4. The zygote proper is pid 1 of a pid namespace: when it dies, every sandbox dies with it.
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = os.fork()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            protocol.send(control, {"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        _exit_unless_pytest_ends(pytest_pidfd, 1, end_session)
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            process.die_with_parent(0)
            code = 0 if _serve(control, items, stash_key, paths, limits) else PYTEST_GONE
        except BaseException as exc:
            try:
                protocol.send(control, {"op": "failed", "error": f"zygote: {type(exc).__name__}: {exc}"})
            except OSError:
                pass
        finally:
            os._exit(code)
    zygote.append(os.pidfd_open(pid))
    control.close()
    try:
        _, status = os.waitpid(pid, 0)  # PEP 475: retried after the signal handler, unless it exits
        code = os.waitstatus_to_exitcode(status) & 0xFF
    except BaseException:
        code = 1
    _exit_unless_pytest_ends(pytest_pidfd, code, end_session)


def _exit_unless_pytest_ends(pytest_pidfd: int, code: int, end_session: Callable[[], NoReturn]) -> NoReturn:
    """The zygote has ended (or never started). Said pytest "exit", this process ends too. Otherwise pytest is
    probably dying: the zygote sees its socket close before the kernel sends us pytest's death signal, and
    a zygote that failed on a closed socket ends before that too. Wait a moment for pytest's end and clean up
    after it; a pytest still alive then (the zygote crashed) keeps its cgroups and starts another zygote."""
    if code != 0:
        readable, _, _ = select.select([pytest_pidfd], [], [], PYTEST_END_GRACE)
        if readable:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            end_session()
    os._exit(code)


def _pipes_above(least: int) -> tuple[int, int, int, int]:
    """Two pipes (read, write, read, write) on fds above ``least``: posix_spawn puts pid 1's ends on 3
    and 4, which must not be any of them."""
    fds = []
    for fd in (*os.pipe2(os.O_CLOEXEC), *os.pipe2(os.O_CLOEXEC)):
        fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, least + 1))
        os.close(fd)
    return fds[0], fds[1], fds[2], fds[3]


class _Sandbox:
    """One sandbox: its pid 1 and its test process, both children of the zygote."""

    def __init__(
        self,
        spec: SandboxSpec,
        init_pid: int,
        test_pid: int,
        test: socket.socket,
        group: cgroups.Group | None,
        crash_fd: int,
    ) -> None:
        self.spec, self.init_pid, self.test_pid, self.test = spec, init_pid, test_pid, test
        self.group, self.crash_fd = group, crash_fd
        self.test_pidfd = os.pidfd_open(test_pid)
        self.init_pidfd = os.pidfd_open(init_pid)
        self.to_pytest: socket.socket | None = None
        self.nodeid = ""
        self.exit: dict[str, Any] = {"type": "exit"}

    def start(self, nodeid: str, to_pytest: socket.socket, reports: socket.socket) -> None:
        """Hand the test its reports channel; the status channel stays here, out of the test's reach."""
        self.nodeid = nodeid
        self.to_pytest = to_pytest
        for wait in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 0.0):
            try:
                protocol.send(self.test, {"nodeid": nodeid}, fds=(reports.fileno(),))
                break
            except OSError as exc:
                # ETOOMANYREFS: this user has more fds in flight than its fd limit, for a moment (a test
                # flooding its channel with fds until pytest drops them): try again before giving up.
                if exc.errno != errno.ETOOMANYREFS or not wait:
                    raise
                time.sleep(wait)
        self.test.close()

    def kill(self) -> None:
        """SIGKILL to pid 1 from outside its namespace ends every process in it (and so does cgroup.kill)."""
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.group is not None:
            self.group.kill()


class _Factory:
    def __init__(
        self, control: socket.socket, items: dict[str, pytest.Item], paths: SessionPaths, limits: Limits
    ) -> None:
        self.control = control
        self.items = items
        self.paths = paths
        self.limits = limits
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.init_path, self.init_argv, self.init_fd = init.command()
        # pid 1 joins each sandbox's namespaces after its exec (setns through a pidfd of the test process,
        # which also asks for ptrace access to it): it needs these capabilities across the exec, which
        # without root only ambient ones keep. It drops them once it has joined.
        userns.keep_across_exec(userns.CAP_SYS_ADMIN, userns.CAP_SYS_CHROOT, userns.CAP_SYS_PTRACE)
        self.scratch_size = mounts.default_scratch_size()
        self.host_sockets = mounts.unix_socket_paths()  # the host's, as the session starts
        self.plans: dict[SandboxSpec, rootfs.RootPlan] = {}
        self.running: dict[int, _Sandbox] = {}  # by pidfd of the test process
        self.ending: dict[int, _Sandbox] = {}  # test over, pid 1 tearing the namespace down; by its pidfd

    def tmpfs_size(self, spec: SandboxSpec) -> int:
        """``tmpfs_size`` if set; else a quarter of RAM, or half the memory limit where that is less
        (tmpfs pages count against the limit: the test hears ENOSPC before the OOM killer comes)."""
        if spec.tmpfs_size is not None:
            return spec.tmpfs_size
        return min(self.scratch_size, spec.memory // 2) if spec.memory else self.scratch_size

    def plan(self, spec: SandboxSpec) -> rootfs.RootPlan:
        plan = self.plans.get(spec)
        if plan is None:
            image = self.paths.images.get(spec.image) if spec.image else None
            plan = self.plans[spec] = rootfs.make_plan(
                self.paths.writable + spec.writable,
                self.paths.needed,
                image,
                tmpfs_size=self.tmpfs_size(spec),
                hidden=[
                    *credentials.hidden_places(os.environ.get("HOME"), spec.hide),
                    *self._host_sockets(spec),
                    # The session's kept layers are writable in the host view; a test sees only its own
                    # (as its upper, mounted before the masks).
                    *([self.paths.keep_dir] if self.paths.keep_dir else []),
                ],
                volumes=[
                    rootfs.VolumeMount(
                        os.path.realpath(os.path.join(self.paths.volumes_root, source, "data"))
                        if volumes.is_named(source)
                        else source,
                        target,
                        mode == "ro",
                        named=volumes.is_named(source),
                    )
                    for source, target, mode in spec.volumes
                ],
            )
        return plan

    def _host_sockets(self, spec: SandboxSpec) -> list[str]:
        """The host's listening unix sockets a sandbox's read-only view would show (not those under its
        writable places: through an overlay a socket cannot be connected to)."""
        writable = [os.path.realpath(p) for p in (*self.paths.writable, *spec.writable)]
        return [p for p in self.host_sockets if not any(mounts.is_under(p, w) for w in writable)]

    def prepare(self, spec: SandboxSpec) -> _Sandbox:
        """Start pid 1 in a new pid namespace and fork the test process into it; it builds itself.

        With a cgroup, both are moved into it before the test process may go on.
        """
        plan = self.plan(spec)
        session = self.limits.session
        # Every sandbox gets a cgroup where there are cgroups: whatever cgroups a test makes in a cgroup
        # filesystem of its own then lie below its leaf and go with it.
        group = session.create(spec) if session is not None else None
        kept_id = secrets.token_hex(6) if self.paths.keep_dir and plan.image else None
        box = test_process.Sandbox(
            spec=spec,
            plan=plan,
            cwd=self.paths.cwd,
            crash_fd=os.memfd_create("sandbox-crash", os.MFD_CLOEXEC),
            kept_id=kept_id,
            layer_dir=f"{self.paths.keep_dir}/{kept_id}" if kept_id else None,
            wait_for_cgroup=group is not None,
            backend=self.limits.backend,
            outputs=tuple(outputs.in_uppers(plan.overlays, self.paths.outputs)) if plan.image is None else (),
            per_test_layers=self.paths.scope_sandboxes and spec.fits_scope_sandbox,
        )
        test, test_end = protocol.socketpair()
        go_r, go_w, ack_r, ack_w = _pipes_above(4)  # pid 1 waits on these until the sandbox's namespaces exist
        pid1_fds = [(os.POSIX_SPAWN_DUP2, go_r, 3), (os.POSIX_SPAWN_DUP2, ack_w, 4)]
        syscalls.unshare(syscalls.CLONE_NEWPID)
        try:
            init_pid = os.posix_spawn(self.init_path, self.init_argv, {}, setsid=True, file_actions=pid1_fds)
            test_pid = os.fork()
            if test_pid == 0:
                try:
                    self.control.close()
                    test.close()
                    test_process.test_process(test_end, self.items, box, (go_w, ack_r))
                finally:
                    os._exit(1)  # test_process ends the process itself; this only catches what escaped it
        finally:
            syscalls.setns(self.own_pidns, syscalls.CLONE_NEWPID)  # the next sandbox gets a namespace of its own
            for fd in (go_r, go_w, ack_r, ack_w):
                os.close(fd)
        test_end.close()
        sandbox = _Sandbox(spec, init_pid, test_pid, test, group, box.crash_fd)
        if group is not None:
            try:
                group.attach(sandbox.init_pid)
                group.attach(sandbox.test_pid)
                protocol.send(test, {"op": "attached"})
            except OSError:
                self.cancel(sandbox)
                raise
        return sandbox

    def test_ended(self, sandbox: _Sandbox) -> None:
        """The test process has ended: end its namespace and tell pytest how the test ended.

        pytest hears "exit" now and "gone" once pid 1 is reaped, which happens only when
        every process of the namespace is gone; it waits for that before host work.
        """
        _, status, rusage = os.wait4(sandbox.test_pid, 0)
        os.close(sandbox.test_pidfd)
        sandbox.kill()
        message = sandbox.exit
        if os.WIFSIGNALED(status):
            message["signal"] = os.WTERMSIG(status)
        else:
            message["code"] = os.waitstatus_to_exitcode(status)
        message["rusage"] = cgroups.Usage(
            memory_peak=rusage.ru_maxrss * 1024, cpu_user=rusage.ru_utime, cpu_system=rusage.ru_stime
        ).as_dict()
        if sandbox.group is not None:
            message["usage"] = sandbox.group.usage().as_dict()
        self._tell(sandbox, message, fds=(sandbox.crash_fd,))
        os.close(sandbox.crash_fd)
        self.ending[sandbox.init_pidfd] = sandbox

    def namespace_ended(self, sandbox: _Sandbox) -> None:
        """pid 1 is reapable only once every process of its namespace is gone."""
        os.waitpid(sandbox.init_pid, 0)
        os.close(sandbox.init_pidfd)
        if sandbox.group is not None:
            sandbox.group.remove()
        self._tell(sandbox, {"type": "gone"})
        if sandbox.to_pytest is not None:
            sandbox.to_pytest.close()

    @staticmethod
    def _tell(sandbox: _Sandbox, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        if sandbox.to_pytest is not None:
            try:
                protocol.send(sandbox.to_pytest, message, fds=fds)
            except OSError:
                with contextlib.suppress(OSError):  # ETOOMANYREFS: the user has too many fds in flight
                    protocol.send(sandbox.to_pytest, message)

    def cancel(self, sandbox: _Sandbox) -> None:
        """Drop a sandbox that never ran a test."""
        sandbox.test.close()
        os.close(sandbox.crash_fd)
        sandbox.kill()
        os.waitpid(sandbox.test_pid, 0)
        os.close(sandbox.test_pidfd)
        self.ending[sandbox.init_pidfd] = sandbox

    def kill(self, nodeid: str) -> None:
        """pytest gave up on a test (timeout): end its sandbox now."""
        for sandbox in self.running.values():
            if sandbox.nodeid == nodeid:
                sandbox.kill()

    def shutdown(self, ready: _Sandbox | None) -> None:
        if ready is not None:
            self.cancel(ready)
        for sandbox in list(self.running.values()):
            sandbox.kill()
            self.test_ended(sandbox)
        for sandbox in list(self.ending.values()):
            self.namespace_ended(sandbox)


def _serve(
    control: socket.socket,
    items: dict[str, pytest.Item],
    stash_key: Any,
    paths: SessionPaths,
    limits: Limits,
) -> bool:
    """Run sandboxes until pytest says "exit" (True) or its end of the control socket closes (False)."""
    factory = _Factory(control, items, paths, limits)
    config = next(iter(items.values())).config
    test_process.prepare_plugins(config, limits.backend)
    gc.freeze()  # keep the garbage collector from touching (and so copying) the zygote's pages in every fork
    ready: _Sandbox | None = None
    protocol.send(control, {"op": "ready", "scope_sandboxes": paths.scope_sandboxes})
    while True:
        watched: list[int] = [control.fileno(), *factory.running, *factory.ending]
        readable, _, _ = select.select(watched, [], [])
        for fd in readable:
            if fd in factory.running:
                factory.test_ended(factory.running.pop(fd))
            elif fd in factory.ending:
                factory.namespace_ended(factory.ending.pop(fd))
        if control.fileno() not in readable:
            continue
        message, fds = protocol.recv(control)
        if message is not None and message.get("op") == "kill":
            factory.kill(message["nodeid"])
            continue
        if message is None or message.get("op") != "run":
            said_exit = message is not None
            break
        to_pytest, reports = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        spec: SandboxSpec = items[message["nodeid"]].stash[stash_key]
        if ready is not None and ready.spec != spec:
            factory.cancel(ready)
            ready = None
        try:
            if ready is None:
                ready = factory.prepare(spec)
            factory.running[ready.test_pidfd] = ready
            ready.start(message["nodeid"], to_pytest, reports)
        except OSError as exc:
            if ready is not None and factory.running.pop(ready.test_pidfd, None) is not None:
                factory.cancel(ready)  # it never got its test: it would wait for it forever
                ready = None
            protocol.send(
                to_pytest, {"type": "error", "phase": "cgroup" if "cgroup" in str(exc) else "fork", "message": str(exc)}
            )
            to_pytest.close()
        finally:
            reports.close()
        ready = None
        try:
            ready = factory.prepare(spec)  # the next one builds while this test runs
        except OSError:
            ready = None
    factory.shutdown(ready)
    return said_exit
