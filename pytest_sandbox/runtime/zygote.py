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
from ..network import bridge
from ..spec import SandboxSpec
from . import (
    cgroup_keeper,
    cgroups,
    init,
    leftovers,
    ports,
    service_process,
    session_process,
    test_layers,
    test_process,
)
from .service_process import ServiceLaunch
from .session_process import SessionLaunch

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
    # The store's lock files and records (volumes, staging and xdist records, store.lock): masked in every
    # sandbox, where the store is in the host view, so that no test can hold one of their locks
    store_private: tuple[str, ...] = ()
    scope_sandboxes: bool = False  # --sandbox-scope=test: a spec's tests share a sandbox, each in a fork over a layer
    # --sandbox=hermetic's pytest, in the session's sandbox already: its sandboxes are processes of that one
    # (no namespaces of their own, no capabilities to make them), each test over a layer of the session's
    # layer helper where it has one (``layers``)
    in_session: bool = False
    layers: test_layers.Inherited | None = None


@dataclasses.dataclass(frozen=True)
class Namespaces:
    """What a zygote shares with the session's other zygotes. Every zygote of a pytest process lives in one
    user namespace (the first one's), so a network="pod" test can join the pod's network namespace, which
    that user namespace owns; the pod zygote (services.py) is the one that makes and lives in it."""

    user: int | None = None  # an fd of the session's user namespace; None: this zygote makes it
    pod_net: int | None = None  # an fd of the pod's network namespace, which network="pod" tests join
    pod_hosts: str = ""  # /etc/hosts of pod members: each service's name and address, then the host's lines
    pod_names: tuple[str, ...] = ()  # every service of the session: their addresses (network/bridge.py)
    pod_bridged: bool = False  # the pod is a bridge with an address per member; else one shared loopback
    # The pod zygote: where the kernel cannot make the bridge, fall back to the shared loopback (with these
    # hosts) rather than fail (--sandbox-pod-network=auto); pytest hears which with "ready"
    pod_fallback_hosts: str | None = None
    is_pod: bool = False  # this zygote runs services: it makes the pod's bridge namespace and stays in it


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
    namespaces: Namespaces,
    services: dict[str, ServiceLaunch],
    session: SessionLaunch | None = None,
) -> None:
    """Entry point of the forked zygote-parent; never returns. ``session``: this zygote has no items, it
    runs one sandbox whose pytest collects and runs everything (--sandbox=hermetic)."""
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
                cgroup_keeper.say_left(limits.session.close())
        finally:
            os._exit(1)

    # 1. pytest's death, at any moment from here on, is a SIGTERM that ends the session; ^C is pytest's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, end_session)
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pytest_pid:
        end_session()
    pytest_pidfd = os.pidfd_open(pytest_pid)  # our parent: not a reused pid
    if limits.session is not None:
        limits.session.forget_keeper()  # pytest's line to the keeper

    def serve() -> bool:  # with the namespaces and paths as set up below (a closure reads them when called)
        return _serve(control, items, stash_key, paths, limits, namespaces, services, session)

    if paths.in_session:  # --sandbox=hermetic's pytest: the sandbox is the session's, built; this only forks tests
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)  # what a test leaves running comes back here, and ends
        _exit_unless_pytest_ends(pytest_pidfd, _zygote_loop(serve, control), end_session)
    controller_pidfd = _xdist_controller(pytest_pid)
    try:
        syscalls.set_process_name("sandbox-zygote")
        # 2. The user namespace: the right to mount and make namespaces, without root.
        _enter_session_user_namespace(namespaces)
        # 3. The read-only host view and the /dev template, once for every sandbox of the session.
        rootfs.enter_host_view(paths.keep_dir)
        rootfs.build_dev_template()
        #    The pod zygote's network namespace holds the pod's bridge.
        namespaces = _pod_network(namespaces)
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
            code = _zygote_loop(serve, control)
        finally:
            os._exit(code)
    zygote.append(os.pidfd_open(pid))
    control.close()
    _exit_unless_pytest_ends(pytest_pidfd, _zygote_exit(pid, zygote[0], controller_pidfd, end_session), end_session)


def _zygote_exit(pid: int, pidfd: int, controller_pidfd: int | None, end_session: Callable[[], NoReturn]) -> int:
    """The zygote's exit code once it exits; the session ends first if an xdist controller goes before."""
    try:
        if controller_pidfd is not None:
            if controller_pidfd in select.select([pidfd, controller_pidfd], [], [])[0]:
                end_session()
        _, status = os.waitpid(pid, 0)  # PEP 475: retried after the signal handler, unless it exits
        return os.waitstatus_to_exitcode(status) & 0xFF
    except BaseException:
        return 1


def _xdist_controller(worker: int) -> int | None:
    """A pidfd of the xdist controller when pytest is its worker. Killed (``timeout`` sends SIGTERM to the
    process it started), the controller leaves its workers running a hanging test, as they would without
    sandboxes; their sandboxes end with it all the same: nothing of a sandbox outlives the pytest run."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    try:
        controller = int(process.stat_fields(worker)[1])
        if controller <= 1:
            return None  # gone already: adopted by init, or in a namespace we cannot see it from
        return os.pidfd_open(controller)
    except (OSError, ValueError):
        return None


def _zygote_loop(serve: Callable[[], bool], control: socket.socket) -> int:
    """Run the zygote's loop; its exit code. What went wrong is said on the control line first."""
    try:
        syscalls.set_process_name("sandbox-zygote")
        return 0 if serve() else PYTEST_GONE
    except BaseException as exc:
        with contextlib.suppress(OSError):
            protocol.send(control, {"op": "failed", "error": f"zygote: {type(exc).__name__}: {exc}"})
        return 1


def _enter_session_user_namespace(namespaces: Namespaces) -> None:
    """The session's first zygote makes it; later ones (and the pod's) join it. Between the unshare and the
    id maps this process's capabilities reach no cgroup (root's are in the new namespace, which maps no id
    yet), so pytest's death, the SIGTERM that removes the session's cgroups, waits for the maps."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if namespaces.user is not None:
            userns.join_user_namespace(namespaces.user)
        else:
            userns.enter_user_namespace()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _pod_network(namespaces: Namespaces) -> Namespaces:
    """The pod zygote makes the namespace of the pod's bridge and stays in it; each member gets a namespace of
    its own with a veth pair to it (network/bridge.py). Returns the namespaces as made: where the bridge cannot
    be made and a fallback is allowed, the shared loopback."""
    if not namespaces.is_pod:
        return namespaces
    families = syscalls.address_families()
    syscalls.unshare(syscalls.CLONE_NEWNET)
    if namespaces.pod_bridged:
        try:
            bridge.make_bridge(namespaces.pod_names)
            return namespaces
        except OSError as exc:
            if namespaces.pod_fallback_hosts is None:
                raise OSError(exc.errno, f"cannot make the pod's bridge: {exc.strerror}") from None
            syscalls.unshare(syscalls.CLONE_NEWNET)  # a clean one, without what was made of the bridge
            namespaces = dataclasses.replace(namespaces, pod_bridged=False, pod_hosts=namespaces.pod_fallback_hosts)
    syscalls.loopback_up(like=families)  # the shared loopback: services and members all live in this namespace
    return namespaces


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
        self.init_pidfd = os.pidfd_open(init_pid) if init_pid else -1  # none in the hermetic session's
        self.to_pytest: socket.socket | None = None
        self.nodeid = ""
        self.slot = 0  # its pod address's (network/bridge.py), if it has one
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
        """SIGKILL to pid 1 from outside its namespace ends every process in it (and so does cgroup.kill). In
        the hermetic session's (no pid 1) the test process goes; the zygote ends what it left (test_ended)."""
        try:
            if self.init_pid:
                os.kill(self.init_pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(self.test_pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
        if self.group is not None:
            self.group.kill()


class _Factory:
    def __init__(
        self,
        control: socket.socket,
        items: dict[str, pytest.Item],
        paths: SessionPaths,
        limits: Limits,
        namespaces: Namespaces,
        config: pytest.Config,
    ) -> None:
        self.control = control
        self.items = items
        self.config = config
        self.paths = paths
        self.limits = limits
        self.namespaces = namespaces
        if limits.session is not None and namespaces.is_pod:
            limits.session.prefix = "svc"
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        if not paths.in_session:
            self.init_path, self.init_argv, self.init_fd = init.command()
            # pid 1 joins each sandbox's namespaces after its exec (setns through a pidfd of the test process,
            # which also asks for ptrace access to it): it needs these capabilities across the exec, which
            # without root only ambient ones keep. It drops them once it has joined.
            userns.keep_across_exec(userns.CAP_SYS_ADMIN, userns.CAP_SYS_CHROOT, userns.CAP_SYS_PTRACE)
        self.scratch_size = mounts.default_scratch_size()
        self.host_sockets = mounts.unix_socket_paths()  # the host's, as the session starts
        self.plans: dict[SandboxSpec, rootfs.RootPlan] = {}
        self.running: dict[int, _Sandbox] = {}  # by pidfd of the test process
        self.test_pids: set[int] = set()  # every test process not yet reaped (the hermetic session's zygote)
        # There, a line to the session's layer helper: a scope process that died with its test's layer on leaves
        # it over the session's places, where pytest writes; taken off before pytest hears "gone"
        self.layer_line = paths.layers.helper() if paths.in_session and paths.layers is not None else None
        self.ending: dict[int, _Sandbox] = {}  # test over, pid 1 tearing the namespace down; by its pidfd
        self.execs: dict[int, tuple[int, socket.socket]] = {}  # commands run in services, by pidfd
        # The pod zygote: its own network namespace (the bridge's), and each service's, made at its first
        # start and kept across restarts (its address, as a container keeps its network on restart).
        self.bridge_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC) if namespaces.is_pod else -1
        self.service_nets: dict[str, int] = {}
        self.member_slots: set[int] = set()  # pod addresses of this zygote's live sandboxes
        # From anywhere: the namespaces of a zygote that just ended may still be going, with their veths.
        self.last_slot = secrets.randbelow(bridge.MEMBER_SLOTS)

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
                    *self.paths.store_private,
                ],
                scrubbed=credentials.scrubbed_git_configs(self.paths.writable + spec.writable, os.environ.get("HOME")),
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

    def _network(self, spec: SandboxSpec) -> tuple[test_process.Network, int]:
        """Where a test's network namespace comes from, and its pod address slot (0: none): a new one
        (loopback only), the zygote's (the host's), or a new one on the pod's bridge."""
        if spec.network == "host":
            return test_process.Network(new=False), 0
        if spec.network == "pod" and self.namespaces.pod_net is not None and not self.namespaces.pod_bridged:
            return test_process.Network(new=False, join=self.namespaces.pod_net), 0  # the shared loopback
        if spec.network == "pod" and self.namespaces.pod_net is not None:
            slot = self._free_slot()
            address = bridge.member_address(slot)
            return test_process.Network(new=True, pod=self.namespaces.pod_net, address=address, pod_link=True), slot
        return test_process.Network(new=True), 0  # a pod without services: loopback of its own

    def _free_slot(self) -> int:
        """The next pod address no live sandbox of this zygote holds (round robin: an address, and its veth's
        name on the bridge, come back only long after their namespace is gone)."""
        if len(self.member_slots) >= bridge.MEMBER_SLOTS:
            raise OSError(errno.EADDRNOTAVAIL, "every address of the pod is taken")
        slot = self.last_slot
        while True:
            slot = slot % bridge.MEMBER_SLOTS + 1
            if slot not in self.member_slots:
                self.last_slot = slot
                return slot

    def service_netns(self, name: str) -> int:
        """The network namespace of the pod zygote's service ``name``: made at its first start, on the
        bridge with its own address, and kept while the pod lives."""
        netns = self.service_nets.get(name)
        if netns is None and not self.namespaces.pod_bridged:  # the shared loopback: the pod zygote's own
            netns = self.service_nets[name] = self.bridge_netns
        if netns is None:
            syscalls.unshare(syscalls.CLONE_NEWNET)
            try:
                bridge.join(self.bridge_netns, bridge.service_address(self.namespaces.pod_names, name))
                netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                syscalls.setns(self.bridge_netns, syscalls.CLONE_NEWNET)
            self.service_nets[name] = netns
        return netns

    def _host_sockets(self, spec: SandboxSpec) -> list[str]:
        """The host's listening unix sockets a sandbox's read-only view would show (not those under its
        writable places: through an overlay a socket cannot be connected to)."""
        writable = [os.path.realpath(p) for p in (*self.paths.writable, *spec.writable)]
        return [p for p in self.host_sockets if not any(mounts.is_under(p, w) for w in writable)]

    def prepare(self, spec: SandboxSpec, service: str = "") -> _Sandbox:
        """Start pid 1 in a new pid namespace and fork the test process into it; it builds itself.
        ``service``: the sandbox is this service's (its network namespace, and the set-id filter).

        With a cgroup, both are moved into it before the test process may go on.
        """
        plan = self.plan(spec)
        session = self.limits.session
        # Every sandbox gets a cgroup where there are cgroups: whatever cgroups a test makes in a cgroup
        # filesystem of its own then lie below its leaf and go with it.
        if service:
            netns = self.service_netns(service)
            network = test_process.Network(new=False, join=netns, pod_link=self.namespaces.pod_bridged)
            slot = 0
        else:
            network, slot = self._network(spec)
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
            outputs=self._outputs(plan),
            per_test_layers=self.paths.scope_sandboxes and spec.fits_scope_sandbox,
            in_session=self.paths.in_session,
            layers=self.paths.layers,
            network=network,
            hosts=self.namespaces.pod_hosts if spec.network == "pod" else "",
            service=bool(service),
        )
        test, test_end = protocol.socketpair()
        if self.paths.in_session:
            return self._fork_in_session(spec, box, test, test_end)
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
                    test_process.test_process(test_end, self.items, self.config, box, (go_w, ack_r))
                finally:
                    os._exit(1)  # test_process ends the process itself; this only catches what escaped it
        finally:
            syscalls.setns(self.own_pidns, syscalls.CLONE_NEWPID)  # the next sandbox gets a namespace of its own
            for fd in (go_r, go_w, ack_r, ack_w):
                os.close(fd)
        test_end.close()
        sandbox = _Sandbox(spec, init_pid, test_pid, test, group, box.crash_fd)
        if slot:
            sandbox.slot = slot
            self.member_slots.add(slot)
        if group is not None:
            try:
                group.attach(sandbox.init_pid)
                group.attach(sandbox.test_pid)
                protocol.send(test, {"op": "attached"})
            except OSError:
                self.cancel(sandbox)
                raise
        return sandbox

    def _outputs(self, plan: rootfs.RootPlan) -> tuple[tuple[str, str], ...]:
        """Each declared output and where its writes lie in the sandbox's uppers; in the hermetic session's
        sandboxes, in a test's layer (the session's layer helper's order)."""
        if self.paths.in_session:
            return self.paths.layers.uppers if self.paths.layers is not None else ()
        return tuple(outputs.in_uppers(plan.overlays, self.paths.outputs)) if plan.image is None else ()

    def _fork_in_session(
        self, spec: SandboxSpec, box: test_process.Sandbox, test: socket.socket, test_end: socket.socket
    ) -> _Sandbox:
        """A sandbox of the hermetic session: a test process in the session's sandbox, no pid 1 of its own."""
        test_pid = os.fork()
        if test_pid == 0:
            try:
                self.control.close()
                test.close()
                test_process.test_process(test_end, self.items, self.config, box, None)
            finally:
                os._exit(1)
        test_end.close()
        self.test_pids.add(test_pid)
        return _Sandbox(spec, 0, test_pid, test, None, box.crash_fd)

    def _end_leftovers(self) -> None:
        """The hermetic session's zygote: kill what ended tests left (orphans come to it, a subreaper)."""
        leftovers.end_children(besides=frozenset(self.test_pids))

    def wait(self, watched: list[int]) -> list[int]:
        """The fds of ``watched`` that are readable. While the hermetic session's tests run, what they
        orphaned comes to this process (a subreaper): it is reaped as it exits, as init would."""
        orphans_come_here = any(sandbox.init_pidfd < 0 for sandbox in self.running.values())
        readable, _, _ = select.select(watched, [], [], leftovers.REAP_INTERVAL if orphans_come_here else None)
        if orphans_come_here:
            leftovers.reap_exited(besides=frozenset(self.test_pids | {pid for pid, _ in self.execs.values()}))
        return readable

    def test_ended(self, sandbox: _Sandbox) -> None:
        """The test process has ended: end its namespace and tell pytest how the test ended.

        pytest hears "exit" now and "gone" once pid 1 is reaped, which happens only when
        every process of the namespace is gone; it waits for that before host work.
        """
        _, status, rusage = os.wait4(sandbox.test_pid, 0)
        self.test_pids.discard(sandbox.test_pid)
        sandbox.kill()
        os.close(sandbox.test_pidfd)
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
        self._gone_or_ending(sandbox)

    def _gone_or_ending(self, sandbox: _Sandbox) -> None:
        """pid 1 ends its namespace (namespace_ended, once reapable); without one, its leftovers end now."""
        if sandbox.init_pidfd >= 0:
            self.ending[sandbox.init_pidfd] = sandbox
            return
        self._end_leftovers()
        if self.layer_line is not None and sandbox.spec.fits_scope_sandbox and self.paths.scope_sandboxes:
            with contextlib.suppress(test_layers.LayerError):
                test_layers.end(self.layer_line)
        self._tell(sandbox, {"type": "gone"})
        if sandbox.to_pytest is not None:
            sandbox.to_pytest.close()

    def namespace_ended(self, sandbox: _Sandbox) -> None:
        """pid 1 is reapable only once every process of its namespace is gone."""
        os.waitpid(sandbox.init_pid, 0)
        os.close(sandbox.init_pidfd)
        self.member_slots.discard(sandbox.slot)
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
        self.test_pids.discard(sandbox.test_pid)
        os.close(sandbox.test_pidfd)
        self._gone_or_ending(sandbox)

    def ready_fd(self, fd: int, connectors: dict[int, socket.socket]) -> None:
        """Something ended (a test, a namespace, a command in a service) or a published port asks."""
        if fd in self.execs:
            self.exec_ended(fd)
        elif fd in self.running:
            self.test_ended(self.running.pop(fd))
        elif fd in self.ending:
            self.namespace_ended(self.ending.pop(fd))
        elif fd in connectors and not ports.answer(
            connectors[fd], self.service_nets, self.namespaces.pod_names, self.namespaces.pod_bridged
        ):
            connectors.pop(fd).close()

    def service_request(
        self,
        message: dict[str, Any],
        fds: list[int],
        services: dict[str, ServiceLaunch],
        connectors: dict[int, socket.socket],
        session: SessionLaunch | None = None,
    ) -> None:
        """pytest's requests besides "run": end a test's sandbox (kill), and the pod zygote's: start, signal
        and exec in services, and lines for published ports."""
        op = message["op"]
        if op == "kill":
            self.kill(message["nodeid"])
        elif op == "signal":
            self.signal(message["nodeid"], int(message["signal"]))
        elif op == "connector":
            connectors[fds[0]] = socket.socket(fileno=fds[0])
        elif op == "exec":
            argv = [str(arg) for arg in message["argv"]]
            self.exec_in(message["nodeid"], argv, socket.socket(fileno=fds[0]), fds[1:])
        elif op == "service":
            name = message["name"]
            self.start_service(name, services[name], socket.socket(fileno=fds[0]), fds[1], fds[2])
        elif op == "session" and session is not None:
            self.start_session(session, socket.socket(fileno=fds[0]), fds[1:])

    def start_service(
        self, name: str, launch: ServiceLaunch, to_pytest: socket.socket, log_fd: int, started_fd: int
    ) -> None:
        """A service's sandbox, built now (services start rarely: none waits ready ahead); its process execs
        the service's command with ``log_fd`` as its stdout and stderr. pytest hears its exit like a test's."""
        try:
            sandbox = self.prepare(launch.spec, service=name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                protocol.send(to_pytest, {"type": "error", "phase": "fork", "message": str(exc)})
            to_pytest.close()
            os.close(log_fd)
            os.close(started_fd)
            return
        self.running[sandbox.test_pidfd] = sandbox
        sandbox.nodeid, sandbox.to_pytest = service_process.nodeid(name), to_pytest
        command = dataclasses.asdict(launch.command)
        try:
            if launch.command.notify:  # sd_notify: an abstract socket of the service's network namespace
                command["notify_socket"] = f"pytest-sandbox-notify-{secrets.token_hex(8)}"
                with bridge.entered(self.service_nets[name]):
                    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                with notify:
                    notify.bind("\0" + command["notify_socket"])
                    protocol.send(to_pytest, {"type": "notify"}, fds=(notify.fileno(),))
            protocol.send(sandbox.test, {"service": command}, fds=(log_fd, started_fd))
        except OSError:
            sandbox.kill()
        finally:
            sandbox.test.close()
            os.close(log_fd)
            os.close(started_fd)

    def start_session(self, launch: SessionLaunch, to_pytest: socket.socket, fds: list[int]) -> None:
        """The hermetic session's sandbox: its process runs pytest (``launch.argv``) with ``fds`` (its channel
        to pytest, then stdin, stdout and stderr, and --sandbox=all's collection line). pytest hears its exit like
        a test's."""
        try:
            sandbox = self.prepare(launch.spec)
        except OSError as exc:
            with contextlib.suppress(OSError):
                protocol.send(to_pytest, {"type": "error", "phase": "fork", "message": str(exc)})
            to_pytest.close()
            for fd in fds:
                os.close(fd)
            return
        self.running[sandbox.test_pidfd] = sandbox
        sandbox.nodeid, sandbox.to_pytest = session_process.NODEID, to_pytest
        try:
            request = {"session": {"argv": list(launch.argv), "env": dict(launch.env)}}
            protocol.send(sandbox.test, request, fds=tuple(fds))
        except OSError:
            sandbox.kill()
        finally:
            sandbox.test.close()
            for fd in fds:
                os.close(fd)

    def exec_in(self, nodeid: str, argv: list[str], to_pytest: socket.socket, stdio: list[int]) -> None:
        """Run ``argv`` in a running service's sandbox (``Service.exec``, ``wait.command``): a child joins
        every namespace of the service's process, drops its capabilities and forks the command, which is
        then a process of the service's pid namespace (it ends with the service); pytest hears its exit."""
        sandbox = next((s for s in self.running.values() if s.nodeid == nodeid), None)
        if sandbox is None:
            with contextlib.suppress(OSError):
                protocol.send(to_pytest, {"type": "exit", "code": service_process.NOT_STARTED, "error": "not running"})
            to_pytest.close()
            for fd in stdio:
                os.close(fd)
            return
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = service_process.NOT_STARTED
            try:
                self.control.close()
                os.close(go_w)
                backend = self.limits.backend
                image = service_process.InImage.of(self.plan(sandbox.spec), sandbox.spec)
                code = service_process.exec_child(sandbox.test_pidfd, sandbox.spec, argv, stdio, backend, go_r, image)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(stdio[-1], f"pytest-sandbox: cannot enter the service: {exc}\n".encode(errors="replace"))
            finally:
                os._exit(code)
        os.close(go_r)
        for fd in stdio:
            os.close(fd)
        try:  # into the service's cgroup before it runs anything: the command is under the service's limits
            if sandbox.group is not None:
                sandbox.group.attach(pid)
            os.write(go_w, b"1")
        except OSError:
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(go_w)
        self.execs[os.pidfd_open(pid)] = (pid, to_pytest)

    def exec_ended(self, pidfd: int) -> None:
        pid, to_pytest = self.execs.pop(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            protocol.send(to_pytest, {"type": "exit", "code": os.waitstatus_to_exitcode(status)})
        to_pytest.close()

    def signal(self, nodeid: str, signum: int) -> None:
        """A signal to a sandbox's main process (a service's graceful stop)."""
        for sandbox in self.running.values():
            if sandbox.nodeid == nodeid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sandbox.test_pid, signum)

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
        if self.layer_line is not None:  # its copy of the line to the session's layer helper
            self.layer_line.close()


def _serve(
    control: socket.socket,
    items: dict[str, pytest.Item],
    stash_key: Any,
    paths: SessionPaths,
    limits: Limits,
    namespaces: Namespaces,
    services: dict[str, ServiceLaunch],
    session: SessionLaunch | None,
) -> bool:
    """Run sandboxes until pytest says "exit" (True) or its end of the control socket closes (False)."""
    if session is not None:
        config = session.config  # pytest's, before any conftest.py: there is nothing to prepare
    else:
        config = next(iter(items.values())).config
        test_process.prepare_plugins(config, limits.backend)
    factory = _Factory(control, items, paths, limits, namespaces, config)
    gc.freeze()  # keep the garbage collector from touching (and so copying) the zygote's pages in every fork
    ready: _Sandbox | None = None
    shared = [os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in ("user", "net")]
    try:
        said = {"op": "ready", "scope_sandboxes": paths.scope_sandboxes, "pod_bridged": namespaces.pod_bridged}
        protocol.send(control, said, fds=tuple(shared))
    finally:
        for fd in shared:
            os.close(fd)
    connectors: dict[int, socket.socket] = {}  # pytest's lines for published ports (pod zygote)
    while True:
        watched: list[int] = [control.fileno(), *factory.running, *factory.ending, *factory.execs, *connectors]
        readable = factory.wait(watched)
        for fd in readable:
            factory.ready_fd(fd, connectors)
        if control.fileno() not in readable:
            continue
        message, fds = protocol.recv(control)
        op = message.get("op") if message is not None else None
        if message is not None and op in ("kill", "signal", "connector", "exec", "service", "session"):
            factory.service_request(message, fds, services, connectors, session)
            continue
        if op != "run":
            said_exit = message is not None
            break
        assert message is not None
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
