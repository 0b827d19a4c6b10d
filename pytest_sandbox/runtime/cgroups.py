"""Resource limits: one interface, three backends chosen by probing.

* ``CgroupV2``: a delegated cgroup v2 subtree (a systemd ``Delegate=yes`` scope, a
  path given by ``--sandbox-cgroup``, or the root cgroup for root).
* ``CgroupV1``: the v1 hierarchies (memory, cpu, cpuacct, pids, blkio), as root or in
  a subtree chowned to the user (the directory, ``cgroup.procs`` and ``tasks``).
* ``Rlimits``: where no cgroup is writable: memory as RLIMIT_AS, the timeout;
  cpus, pids and io cannot be enforced this way.

pytest opens a session cgroup (``pytest-sandbox-<pid>``) and keeps directory fds to
it; the zygote, whose mount namespace only has a read-only /sys, creates one child
per sandbox through those fds (``sb-<n>``), attaches the sandbox's pid 1 and test
process before the test runs, reads the usage after it and removes the child.

The limits are written in ``sb-<n>``; the sandbox's processes live in its leaf child
``sb-<n>/sandbox``, the root of the test's cgroup namespace. A test that mounts cgroup2
in a user namespace of its own reaches only that leaf (its files are the same user's):
it can make cgroups below it but never lift a limit. Removal (of a sandbox's group, of
the session's, of a dead session's) takes every cgroup below, deepest first, through
directory fds opened below the session's own, following no link.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import SandboxError
from ..linux.files import write_file
from ..linux.mounts import mount_table
from ..spec import SandboxSpec
from . import cgroup_keeper

CGROUP_ROOT = "/sys/fs/cgroup"
SESSION_PREFIX = "pytest-sandbox-"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")
UNIFIED = "unified"  # a hybrid host's cgroup2 hierarchy: no limits, but a test could mount and write it
CFS_PERIOD_US = 100_000
LEAF = "sandbox"  # sb-<n>/sandbox: the processes' cgroup, below the one holding the limits
MAX_DEPTH = 32  # how deep a test may nest cgroups below its leaf (v2's cgroup.max.depth on sb-<n>)
MAX_DESCENDANTS = 512
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CgroupUnavailable(SandboxError):
    """This backend cannot be used here; the message says why."""


@dataclasses.dataclass
class Usage:
    """What one sandbox used; None where the backend cannot tell."""

    memory_peak: int | None = None
    oom_kills: int = 0
    cpu_user: float | None = None
    cpu_system: float | None = None
    cpu_throttled: float | None = None
    pids_peak: int | None = None
    pids_limit_hits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read(dirfd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def _write(dirfd: int, name: str, value: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"writing {value.strip()!r} to {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _keyed(text: str | None) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, ...) as a dict."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _rmdir(dirfd: int, name: str) -> OSError | None:
    """Remove a cgroup directory; its last processes may take a moment to leave. The error, if it stays."""
    error: OSError | None = None
    for _ in range(200):
        try:
            os.rmdir(name, dir_fd=dirfd)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            error = exc
            time.sleep(0.005)
    return error


def _remove_group(dirfd: int, name: str, depth: int = 0) -> list[str]:
    """Remove the cgroup ``name`` below ``dirfd`` and every cgroup a test made below it, deepest first;
    what could not be removed, and why.

    Each level is opened relative to its parent's fd with O_NOFOLLOW: nothing outside the
    tree is reached. v2's cgroup.max.depth bounds the tree; past MAX_DEPTH * 2 levels it is left.
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"{name}: {exc.strerror}"]
    left: list[str] = []
    try:
        if depth < MAX_DEPTH * 2:
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    left += [f"{name}/{below}" for below in _remove_group(fd, entry.name, depth + 1)]
    except OSError:
        pass
    finally:
        os.close(fd)
    error = _rmdir(dirfd, name)
    return left if error is None else [*left, f"{name}: {error.strerror}"]


def block_device(path: str) -> str | None:
    """'MAJ:MIN' of the disk holding ``path`` (the whole disk for a partition), None if not on a disk."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dir = f"/sys/dev/block/{major}:{minor}"
    if major == 0 or not os.path.exists(sys_dir):
        return None
    if os.path.exists(f"{sys_dir}/partition"):
        with open(os.path.join(os.path.realpath(sys_dir), "..", "dev")) as f:
            return f.read().strip()
    return f"{major}:{minor}"


class Group:
    """One sandbox's cgroup (a directory per hierarchy): limits and accounting in ``name``,
    processes in its leaf ``name/sandbox``."""

    def __init__(self, session: Session, name: str) -> None:
        self.session = session
        self.name = name

    @property
    def leaf(self) -> str:
        return f"{self.name}/{LEAF}"

    def attach(self, pid: int) -> None:
        for fd in self.session.dirs.values():
            _write(fd, f"{self.leaf}/cgroup.procs", str(pid))

    def usage(self) -> Usage:
        return self.session.backend.usage(self)

    def kill(self) -> None:
        """Every process in the group, where the cgroup can do it at once (v2's cgroup.kill)."""
        self.session.backend.kill(self)

    def remove(self) -> None:
        """The group, its leaf and whatever the test made below the leaf."""
        for fd in self.session.dirs.values():
            _remove_group(fd, self.name)


class Session:
    """The session cgroup: directory fds that keep working inside the zygote's namespaces."""

    def __init__(
        self,
        backend: Backend,
        dirs: dict[str, int],
        parents: dict[str, int],
        name: str,
        keeper: int = -1,
        keeper_line: int = -1,
    ) -> None:
        self.backend = backend
        self.dirs = dirs  # hierarchy -> fd of the session cgroup
        self.parents = parents  # hierarchy -> fd of its parent, to remove it at the end
        self.name = name
        self.keeper = keeper  # the pid of the process that removes them if pytest dies (cgroup_keeper.py)
        self.owner = os.getpid()  # pytest: only it ends the keeper (a zygote-parent closes a copy)
        self.keeper_line = socket.socket(fileno=keeper_line) if keeper_line >= 0 else None
        self.watched: set[str] = set()
        self.count = 0
        self.prefix = "sb"  # the pod zygote's services are "svc-<n>": both zygotes make groups at once

    def create(self, spec: SandboxSpec) -> Group:
        self.count += 1
        group = Group(self, f"{self.prefix}-{self.count}")
        try:
            for fd in self.dirs.values():
                os.mkdir(group.name, dir_fd=fd)
                os.mkdir(group.leaf, dir_fd=fd)
            self.backend.apply(group, spec)
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> list[str]:
        """Remove the session cgroup and all below it (every sandbox is gone by now) and let go of the fds;
        what could not be removed, and why."""
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        left = _remove_session(self.backend, self.parents, self.name)
        for fd in self.parents.values():
            os.close(fd)
        self.parents.clear()
        if self.keeper > 0 and os.getpid() == self.owner:
            cgroup_keeper.stop(self.keeper)
        self.keeper = -1
        self.forget_keeper()
        return left

    def watch(self, directory: str) -> None:
        """Have the keeper clear ``directory``'s set-id bits if pytest dies (a read/write volume's)."""
        if self.keeper_line is not None and os.getpid() == self.owner and directory not in self.watched:
            self.watched.add(directory)
            cgroup_keeper.watch(self.keeper_line, directory)

    def forget_keeper(self) -> None:
        """Close this process's line to the keeper (a zygote-parent's copy, or pytest's at the end)."""
        if self.keeper_line is not None:
            self.keeper_line.close()
            self.keeper_line = None


def _remove_session(backend: Backend, parents: dict[str, int], name: str) -> list[str]:
    """Remove a session's cgroups in each hierarchy; what is left, and why."""
    left = []
    for hierarchy, parent in parents.items():
        base = getattr(backend, "bases", {}).get(hierarchy, "")
        left += [f"{base}/{path}" for path in _remove_group(parent, name)]
    return left


def _remove_stale_sessions(parent_fd: int) -> None:
    """Session cgroups of pytest processes that died without cleaning up (kill -9)."""
    for entry in os.listdir(parent_fd):
        pid = entry[len(SESSION_PREFIX) :].split("-")[0]
        if entry.startswith(SESSION_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove_group(parent_fd, entry)


class Backend:
    """The interface: what it enforces, how to open a session, how to limit and measure a group."""

    name = "none"
    enforced: frozenset[str] = frozenset()
    where = ""

    def describe(self) -> str:
        limits = ", ".join(sorted(self.enforced)) or "nothing"
        return f"{self.name}{f' at {self.where}' if self.where else ''} (enforces {limits})"

    def open_session(self) -> Session | None:
        return None

    def apply(self, group: Group, spec: SandboxSpec) -> None:
        raise NotImplementedError

    def usage(self, group: Group) -> Usage:
        return Usage()

    def kill(self, group: Group) -> None:
        """Without cgroup.kill the sandbox's pid namespace does the job (killing its pid 1)."""

    def in_test_process(self, spec: SandboxSpec) -> None:
        """Limits the test process sets on itself (rlimits) before running the test."""


_LIMIT_OF_CONTROLLER = {"memory": "memory", "cpu": "cpus", "pids": "pids", "io": "io", "blkio": "io"}


def _enforced(controllers: Iterable[str], device: str | None) -> frozenset[str]:
    """The limits a set of controllers (v1 hierarchies or v2 controllers) can enforce; io needs a disk."""
    limits = {_LIMIT_OF_CONTROLLER[c] for c in controllers if c in _LIMIT_OF_CONTROLLER}
    if device is None:
        limits.discard("io")
    return frozenset(limits | {"timeout"})


class CgroupBackend(Backend):
    def __init__(self, bases: dict[str, str], device: str | None) -> None:
        self.bases = bases  # hierarchy -> directory that will hold the session cgroup
        self.device = device  # MAJ:MIN for io limits
        self.where = next(iter(bases.values())) if len(bases) == 1 else CGROUP_ROOT

    def open_session(self) -> Session:
        name = f"{SESSION_PREFIX}{os.getpid()}"
        dirs: dict[str, int] = {}
        parents: dict[str, int] = {}
        keeper, keeper_line = -1, -1
        try:
            for hierarchy, base in self.bases.items():
                parents[hierarchy] = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                _remove_stale_sessions(parents[hierarchy])
            # before the first mkdir: from here on, pytest's death at any moment removes what it made
            keeper, keeper_line = cgroup_keeper.start(lambda: _remove_session(self, parents, name), parents.values())
            for hierarchy, parent in parents.items():
                os.mkdir(name, dir_fd=parent)
                dirs[hierarchy] = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
            session = Session(self, dirs, parents, name, keeper, keeper_line)
            self.prepare_session(session)
        except OSError:
            for hierarchy, fd in dirs.items():
                os.close(fd)
                _rmdir(parents[hierarchy], name)
            for fd in parents.values():
                os.close(fd)
            if keeper > 0:
                cgroup_keeper.stop(keeper)
                os.close(keeper_line)
            raise
        for fd in (*dirs.values(), *parents.values()):
            os.set_inheritable(fd, True)
        return session

    def prepare_session(self, session: Session) -> None:
        """Hook for v2: enable controllers for the sandboxes' groups."""


class CgroupV1(CgroupBackend):
    name = "cgroup v1"

    def __init__(self, bases: dict[str, str], device: str | None) -> None:
        super().__init__(bases, device)
        self.enforced = _enforced(bases, device)

    def apply(self, group: Group, spec: SandboxSpec) -> None:
        """The limits in the group and again in its leaf: v1 throttles io (and cpu) where the tasks are, and a
        test cannot reach the leaf's files (it cannot mount v1; its view of them is read-only)."""
        if UNIFIED in group.session.dirs:
            _bound_nesting(group.session.dirs[UNIFIED], group.name)
        for name in (group.name, group.leaf):
            self._apply(group.session.dirs, name, spec)

    def _apply(self, dirs: dict[str, int], name: str, spec: SandboxSpec) -> None:
        if spec.memory is not None and "memory" in dirs:
            _write(dirs["memory"], f"{name}/memory.limit_in_bytes", str(spec.memory))
            try:  # no swapping around the limit, where swap accounting exists
                _write(dirs["memory"], f"{name}/memory.memsw.limit_in_bytes", str(spec.memory))
            except OSError:
                pass
        if spec.cpus is not None and "cpu" in dirs:
            _write(dirs["cpu"], f"{name}/cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(dirs["cpu"], f"{name}/cpu.cfs_quota_us", str(max(1000, int(spec.cpus * CFS_PERIOD_US))))
        if spec.pids is not None and "pids" in dirs:
            _write(dirs["pids"], f"{name}/pids.max", str(spec.pids))
        if spec.io and "blkio" in dirs and self.device:
            for key, value in spec.io:  # read_bps -> blkio.throttle.read_bps_device, ...
                _write(dirs["blkio"], f"{name}/blkio.throttle.{key}_device", f"{self.device} {value}")

    def usage(self, group: Group) -> Usage:
        dirs, name = group.session.dirs, group.name
        usage = Usage()
        if "memory" in dirs:
            usage.memory_peak = _int(_read(dirs["memory"], f"{name}/memory.max_usage_in_bytes"))
            usage.oom_kills = max(  # v1 counts a kill in the victim's cgroup (the leaf) and maybe up
                _keyed(_read(dirs["memory"], f"{path}/memory.oom_control")).get("oom_kill", 0)
                for path in (name, group.leaf)
            )
        if "cpuacct" in dirs:
            ticks = os.sysconf("SC_CLK_TCK")
            stat = _keyed(_read(dirs["cpuacct"], f"{name}/cpuacct.stat"))
            if stat:
                usage.cpu_user, usage.cpu_system = stat.get("user", 0) / ticks, stat.get("system", 0) / ticks
        if "cpu" in dirs:
            stats = [_keyed(_read(dirs["cpu"], f"{path}/cpu.stat")) for path in (name, group.leaf)]
            throttled = [s["throttled_time"] for s in stats if "throttled_time" in s]
            usage.cpu_throttled = max(throttled) / 1e9 if throttled else None
        if "pids" in dirs:
            usage.pids_peak = _int(_read(dirs["pids"], f"{name}/pids.peak"))
            usage.pids_limit_hits = _limit_hits(dirs["pids"], group)
        return usage


class CgroupV2(CgroupBackend):
    name = "cgroup v2"

    def __init__(self, base: str, controllers: set[str], device: str | None, to_enable: set[str]) -> None:
        super().__init__({"": base}, device)
        self.controllers = controllers
        self.to_enable = to_enable  # enabled in the base when the first session opens, not before
        self.enforced = _enforced(controllers, device)

    def open_session(self) -> Session:
        if self.to_enable:
            base = self.bases[""]
            try:
                _move_self_into_leaf(base)
            except CgroupUnavailable as exc:
                raise OSError(errno.EBUSY, str(exc)) from None
            write_file(f"{base}/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(self.to_enable)))
            self.to_enable = set()  # (idempotent: xdist workers may all do this)
        return super().open_session()

    def prepare_session(self, session: Session) -> None:
        wanted = " ".join(f"+{c}" for c in sorted(self.controllers))
        if wanted:
            _write(session.dirs[""], "cgroup.subtree_control", wanted)

    def apply(self, group: Group, spec: SandboxSpec) -> None:
        fd, name = group.session.dirs[""], group.name
        _bound_nesting(fd, name)
        if spec.memory is not None and "memory" in self.controllers:
            _write(fd, f"{name}/memory.max", str(spec.memory))
            try:
                _write(fd, f"{name}/memory.swap.max", "0")
            except OSError:
                pass
        if spec.cpus is not None and "cpu" in self.controllers:
            _write(fd, f"{name}/cpu.max", f"{max(1000, int(spec.cpus * CFS_PERIOD_US))} {CFS_PERIOD_US}")
        if spec.pids is not None and "pids" in self.controllers:
            _write(fd, f"{name}/pids.max", str(spec.pids))
        if spec.io and "io" in self.controllers and self.device:
            keys = {"read_bps": "rbps", "write_bps": "wbps", "read_iops": "riops", "write_iops": "wiops"}
            _write(fd, f"{name}/io.max", " ".join([self.device] + [f"{keys[k]}={v}" for k, v in spec.io]))

    def usage(self, group: Group) -> Usage:
        fd, name = group.session.dirs[""], group.name
        usage = Usage()
        usage.memory_peak = _int(_read(fd, f"{name}/memory.peak"))
        usage.oom_kills = _keyed(_read(fd, f"{name}/memory.events")).get("oom_kill", 0)
        cpu = _keyed(_read(fd, f"{name}/cpu.stat"))
        if "user_usec" in cpu:
            usage.cpu_user, usage.cpu_system = cpu["user_usec"] / 1e6, cpu.get("system_usec", 0) / 1e6
        if "throttled_usec" in cpu:
            usage.cpu_throttled = cpu["throttled_usec"] / 1e6
        usage.pids_peak = _int(_read(fd, f"{name}/pids.peak"))
        usage.pids_limit_hits = _limit_hits(fd, group)
        return usage

    def kill(self, group: Group) -> None:
        try:
            _write(group.session.dirs[""], f"{group.name}/cgroup.kill", "1")
        except OSError:
            pass  # before Linux 5.14: the pid namespace still ends them all


def _bound_nesting(fd: int, name: str) -> None:
    """cgroup2: how many cgroups, how deep, a test may make below its leaf (it reaches only the leaf)."""
    for key, value in (("cgroup.max.depth", MAX_DEPTH), ("cgroup.max.descendants", MAX_DESCENDANTS)):
        _write(fd, f"{name}/{key}", str(value))


def _limit_hits(fd: int, group: Group) -> int:
    """Forks refused by pids.max: counted in the limited cgroup (Linux >= 6.9 on v2) or, before, and on v1,
    in the forking one, the leaf (a cgroup a test made below it is not looked at)."""
    return max(_keyed(_read(fd, f"{path}/pids.events")).get("max", 0) for path in (group.name, group.leaf))


class Rlimits(Backend):
    """No writable cgroup: what the test process can limit on itself."""

    name = "rlimits"
    enforced = frozenset({"memory", "timeout"})

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self) -> str:
        return f"rlimits (enforces memory as address space, timeout; {self.reason})"

    def in_test_process(self, spec: SandboxSpec) -> None:
        """RLIMIT_AS counts address space, and the forked test starts with pytest's: allow that plus the limit."""
        if spec.memory is not None:
            with open("/proc/self/statm") as f:
                current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (current + spec.memory, current + spec.memory))


class SessionLimits(Backend):
    """--sandbox=hermetic's tests: the session's sandbox is limited as a whole (the supervisor set its
    cgroup or rlimits), and its tests run within it; nothing more to do per test."""

    name = "the session's sandbox"
    enforced = frozenset({"memory", "cpus", "pids", "io", "timeout"})

    def describe(self) -> str:
        return "the hermetic session's (its limits hold for all its tests together)"


# -- choosing a backend -------------------------------------------------------------------------


def own_cgroup_paths(source: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller (or \"\" for the v2 hierarchy) -> this process's cgroup path.

    ``source`` is another file in /proc/PID/cgroup format: tests feed it sample lines.
    """
    paths: dict[str, str] = {}
    with open(source) as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _v1_mounts() -> dict[str, str]:
    """v1 controller -> its hierarchy's mount point."""
    found: dict[str, str] = {}
    for mount in mount_table():
        if mount.fstype == "cgroup":
            options = set(mount.options.split(","))
            for controller in V1_CONTROLLERS:
                if controller in options:
                    found.setdefault(controller, mount.target)
    return found


def _writable_dir(path: str) -> bool:
    return (
        os.path.isdir(path)
        and os.access(path, os.W_OK | os.X_OK)
        and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)
    )


def _unified_mount() -> str | None:
    """A hybrid host's cgroup2 mount (no controllers there, but a test could mount it and make cgroups)."""
    return next((m.target for m in mount_table() if m.fstype == "cgroup2"), None)


def _v1(override: str | None, device: str | None) -> CgroupV1:
    mounts = _v1_mounts()
    unified = _unified_mount() if mounts else None
    if unified is not None:
        mounts[UNIFIED] = unified
    own = own_cgroup_paths()
    bases: dict[str, str] = {}
    for controller, mount in mounts.items():
        if controller == "cpuacct" and mounts.get("cpu") == mount:
            continue  # co-mounted with cpu: one directory serves both
        own_path = own.get("" if controller == UNIFIED else controller, "/")
        path = os.path.normpath(f"{mount}/{override if override else own_path}")
        if _writable_dir(path):
            bases[controller] = path
    if not bases.keys() & {"memory", "cpu", "pids"}:
        where = f"under {override}" if override else "in this process's own cgroups"
        raise CgroupUnavailable(f"no writable cgroup v1 memory, cpu or pids hierarchy {where}")
    return CgroupV1(bases, device)


def _uid_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _move_self_into_leaf(base: str) -> None:
    """cgroup v2 forbids processes in a cgroup whose children get controllers: move them down a level.

    The delegated cgroup holds pytest, maybe its xdist workers and the shell that
    started them, all this user's: they move into one leaf together. A process of
    another user means the cgroup is not ours to rearrange.
    """
    leaf = f"{base}/{SESSION_PREFIX}{os.getpid()}-pytest"
    for _ in range(20):
        with open(f"{base}/cgroup.procs") as f:
            procs = f.read().split()
        if not procs:
            return
        strangers = [p for p in procs if _uid_of(p) not in (None, os.getuid())]
        if strangers:
            raise CgroupUnavailable(
                f"{base} holds processes of other users, so controllers cannot be enabled for its children; "
                "run pytest in a scope of its own: systemd-run --user --scope -p Delegate=yes pytest ..."
            )
        os.makedirs(leaf, exist_ok=True)
        for pid in procs:
            try:
                write_file(f"{leaf}/cgroup.procs", pid)
            except OSError:
                pass  # exited meanwhile
    raise CgroupUnavailable(f"processes keep appearing in {base}; cannot empty it to enable controllers")


def _enabled(path: str) -> set[str]:
    try:
        with open(f"{path}/cgroup.subtree_control") as f:
            return set(f.read().split()) & set(V2_CONTROLLERS)
    except OSError:
        return set()


def _ready_ancestor(own: str) -> str | None:
    """The nearest writable cgroup at or above ``own`` that already hands controllers to its children.

    That is where a pytest started by another sandboxed pytest (pytester) finds the
    session cgroups of its parent: its own cgroup is the parent's leaf and busy.
    """
    path = own
    while path.startswith(CGROUP_ROOT) and path != CGROUP_ROOT:
        if _writable_dir(path) and _enabled(path) & {"memory", "cpu", "pids"}:
            return path
        path = os.path.dirname(path)
    return None


def _v2(override: str | None, device: str | None) -> CgroupV2:
    if override:
        base = os.path.normpath(f"{CGROUP_ROOT}/{override}")
    elif os.geteuid() == 0:
        base = CGROUP_ROOT  # root makes its own top-level cgroup beside the system's
    else:
        own = os.path.normpath(f"{CGROUP_ROOT}/{own_cgroup_paths().get('', '/')}")
        base = _ready_ancestor(own) or own
    if not _writable_dir(base):
        raise CgroupUnavailable(
            f"{base} is not delegated to this user (needs write access to it and its "
            "cgroup.procs: systemd-run --user --scope -p Delegate=yes, or --sandbox-cgroup)"
        )
    with open(f"{base}/cgroup.controllers") as f:
        available = set(f.read().split()) & set(V2_CONTROLLERS)
    enabled = _enabled(base)
    # What the base does not hand down yet is enabled when limits are first needed (moving pytest into a
    # leaf first); a root cgroup that is not ours is never changed.
    to_enable = available - enabled if base != CGROUP_ROOT else set()
    controllers = enabled | to_enable
    if not controllers & {"memory", "cpu", "pids"}:
        raise CgroupUnavailable(f"no memory, cpu or pids controller enabled in {base}/cgroup.subtree_control")
    return CgroupV2(base, controllers, device, to_enable)


BACKENDS = ("auto", "v2", "v1", "rlimit")


def choose(kind: str, override: str | None, rootdir: str) -> Backend:
    """The backend to use: ``kind`` is one of BACKENDS; failures of a forced kind raise CgroupUnavailable."""
    device = block_device(rootdir)
    v2_host = os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers")
    reasons = []
    attempts: dict[str, list[Callable[[str | None, str | None], Backend]]] = {
        "v2": [_v2],
        "v1": [_v1],
        "rlimit": [],
        "auto": [_v2] if v2_host else [_v1],
    }
    for attempt in attempts[kind]:
        try:
            return attempt(override, device)
        except (CgroupUnavailable, OSError) as exc:
            if kind != "auto":
                raise CgroupUnavailable(str(exc)) from None
            reasons.append(str(exc))
    return Rlimits("; ".join(reasons) or "rlimits chosen")
