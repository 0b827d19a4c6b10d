"""What this host supports, measured once per process, and the doctor's advice."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import socket
from collections.abc import Callable

from .linux import landlock, syscalls, userns
from .network import bridge
from .runtime import cgroups, ports


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _userns_blockers() -> list[tuple[str, str]]:
    """Every setting of this host known to refuse user namespaces, each with the command that fixes it."""
    found = []
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        found.append(("user.max_user_namespaces is 0", "sudo sysctl -w user.max_user_namespaces=15000"))
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        found.append(("kernel.unprivileged_userns_clone is 0", "sudo sysctl -w kernel.unprivileged_userns_clone=1"))
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        found.append(
            (
                "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+)",
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
            )
        )
    status = _read("/proc/self/status") or ""
    if "\nSeccomp:\t2" in status:
        found.append(
            (
                "a seccomp filter (this looks like a container) blocks unshare(CLONE_NEWUSER)",
                "run the container with --security-opt seccomp=unconfined, or use a VM/CI runner",
            )
        )
    return found


def _userns_blocker() -> tuple[str, str]:
    """The most likely reason user namespaces are refused, and how to fix it."""
    found = _userns_blockers()
    if found:
        return found[0]
    return (
        "unshare(CLONE_NEWUSER) was refused",
        "check that the kernel has CONFIG_USER_NS=y (grep CONFIG_USER_NS /boot/config-$(uname -r))",
    )


_NAMESPACE_LIMITS = {
    "mountns": "user.max_mnt_namespaces",
    "netns": "user.max_net_namespaces",
    "pidns": "user.max_pid_namespaces",
}
_KERNEL_FOR = {
    "host_view": (5, 12, "open_tree + mount_setattr"),
    "overlay": (5, 12, "overlayfs in a user namespace"),
    "tmpfs_xattr": (6, 6, "user xattrs on tmpfs"),
}


def _step_fix(step: str) -> str:
    """The command (or upgrade) that makes the failed setup step ``step`` work."""
    limit = _NAMESPACE_LIMITS.get(step)
    if limit is not None and _read(f"/proc/sys/{limit.replace('.', '/')}") == "0":
        return f"sudo sysctl -w {limit}=15000"
    if step == "pod_bridge":
        return "sudo modprobe -a bridge veth (optional: without them services share one loopback)"
    if step == "overlay" and "overlay" not in (_read("/proc/filesystems") or "overlay"):
        return "sudo modprobe overlay (and add overlay to /etc/modules-load.d/ to keep it)"
    needed = _KERNEL_FOR.get(step)
    if needed is not None and not _kernel_at_least(needed[0], needed[1]):
        return f"upgrade the kernel to Linux >= {needed[0]}.{needed[1]} ({needed[2]}; this is {os.uname().release})"
    blockers = _userns_blockers()
    if blockers:
        return "; ".join(fix for _, fix in blockers)
    if needed is not None:
        return f"needs Linux >= {needed[0]}.{needed[1]} with {needed[2]} enabled"
    return "check the kernel's namespace support (CONFIG_*_NS) and any seccomp or LSM policy of this machine"


def _kernel_at_least(major: int, minor: int) -> bool:
    return syscalls.kernel_at_least(major, minor)


_ahead: tuple[int, int] | None = None  # (pid, read end) of the child start_ahead() started


def start_ahead() -> None:
    """Start the probe's child now, to run beside what this process does next; checks() takes its answer
    (the supervisor reads the settings meanwhile: most of the probe is the kernel's work in the child)."""
    global _ahead
    if _ahead is None and checks.cache_info().currsize == 0:
        _ahead = _spawn(list(_STEPS))


def _try_in_child(steps: list[str]) -> dict[str, str]:
    """Run the setup steps in a throwaway child; map of step -> error ('' if it worked)."""
    global _ahead
    if _ahead is not None and steps == list(_STEPS):
        started, _ahead = _ahead, None
        return _collect(*started)
    return _collect(*_spawn(steps))


def _spawn(steps: list[str]) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            for step in steps:
                try:
                    _STEPS[step]()
                    result = ""
                except OSError as exc:
                    result = exc.strerror or str(exc)
                except Exception as exc:  # reported as the step's failure, not lost with the steps before it
                    result = f"{type(exc).__name__}: {exc}"
                os.write(write_fd, f"{step}={result}\n".encode())  # each at once: a crash keeps what was done
                if result and step not in OPTIONAL:
                    break
        finally:
            os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int) -> dict[str, str]:
    with os.fdopen(read_fd) as f:
        lines = f.read().splitlines()
    os.waitpid(pid, 0)
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _overlay_step() -> None:
    base = "/tmp"  # in the probe's own mount namespace
    syscalls.mount("probe", base, "tmpfs", 0, "mode=0700")
    for name in ("lower", "upper", "work"):
        os.mkdir(f"{base}/{name}")
    ofs = syscalls.fsopen("overlay")
    syscalls.fsconfig(ofs, "lowerdir", f"{base}/lower")
    syscalls.fsconfig(ofs, "upperdir", f"{base}/upper")
    syscalls.fsconfig(ofs, "workdir", f"{base}/work")
    syscalls.fsconfig(ofs, "userxattr")
    syscalls.fsmount(ofs)


def _tmpfs_xattr_step() -> None:
    os.setxattr("/tmp/upper", "user.sandbox-probe", b"1")  # the probe's tmpfs from the overlay step


def _pod_step() -> None:
    """What services need of the network namespace made in the step before: loopback up, and its TCP table
    (wait.listening reads it), which must show a socket listening in it."""
    syscalls.loopback_up()
    with socket.create_server(("127.0.0.1", 0)) as server:
        if server.getsockname()[1] not in ports.listening_ports():
            raise OSError("a listening socket is not in /proc/self/net/tcp")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:  # sd_notify's, for wait.notify()
        notify.bind(f"\0pytest-sandbox-probe-{os.getpid()}")
        notify.sendto(b"READY=1", notify.getsockname())
        if notify.recv(16) != b"READY=1":
            raise OSError("an abstract datagram socket did not get what was sent to it (wait.notify)")


def _pod_bridge_step() -> None:
    """The pod network's plumbing (network/bridge.py) in the namespace of the step before: the bridge, a
    member on a veth pair to it (this process becomes the member), and a connection across. Kernels built
    without bridge or veth (or with them as modules that cannot be loaded) refuse the first request."""
    bridge.make_bridge(["probe"])
    bridge_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    with socket.create_server((bridge.name_address(["probe"], "probe"), 0)) as server:
        syscalls.unshare(syscalls.CLONE_NEWNET)
        bridge.join(bridge_netns, bridge.member_address(1))
        os.close(bridge_netns)
        socket.create_connection(server.getsockname(), timeout=2).close()


_STEPS: dict[str, Callable[[], None]] = {
    "userns": userns.enter_user_namespace,
    "mountns": lambda: syscalls.unshare(syscalls.CLONE_NEWNS),
    "host_view": lambda: syscalls.mount_setattr(
        syscalls.open_tree("/", syscalls.OPEN_TREE_CLONE | syscalls.AT_RECURSIVE), syscalls.MOUNT_ATTR_RDONLY
    ),
    "overlay": _overlay_step,
    "tmpfs_xattr": _tmpfs_xattr_step,
    "netns": lambda: syscalls.unshare(syscalls.CLONE_NEWNET),
    "pod": _pod_step,
    "pod_bridge": _pod_bridge_step,
    "pidns": lambda: syscalls.unshare(syscalls.CLONE_NEWPID),
}


V1_HIERARCHIES = ("memory", "cpu", "pids", "blkio")


def cgroup_delegation(override: str | None = None) -> str:
    """Which controllers this user may manage (create child cgroups and move processes into them):
    in its own cgroups, or below ``override`` (``--sandbox-cgroup``)."""
    own = cgroups.own_cgroup_paths()
    if cgroup_mode() == "v2":
        base = f"/sys/fs/cgroup{override or own.get('', '/')}"
        if os.access(base, os.W_OK) and os.access(f"{base}/cgroup.procs", os.W_OK):
            enabled = (_read(f"{base}/cgroup.controllers") or "").split()
            return f"delegated ({' '.join(enabled) or 'no controllers'})"
        return "not delegated"
    writable = [
        name for name in V1_HIERARCHIES if os.access(f"/sys/fs/cgroup/{name}{override or own.get(name, '/')}", os.W_OK)
    ]
    return f"writable: {' '.join(writable)}" if writable else "not delegated"


def cgroup_mode() -> str:
    if _read("/sys/fs/cgroup/cgroup.controllers") is not None:
        return "v2"
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return "hybrid"  # v1 controllers, a v2 hierarchy without controllers
    if os.path.isdir("/sys/fs/cgroup/memory"):
        return "v1"
    return "none"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def cgroup_check(mode: str, delegation: str, user: str) -> Check:
    """The cgroup line: limits beyond rlimits need a cgroup this user may manage; the fix delegates one."""
    detail = f"cgroup {mode}, {delegation}"
    if mode == "none":
        return Check("cgroup", False, f"{detail}: no cgroup filesystem", "sudo mount -t cgroup2 none /sys/fs/cgroup")
    if mode == "v2":
        if delegation.startswith("delegated"):
            return Check("cgroup", True, detail)
        return Check(
            "cgroup",
            False,
            f"{detail}: limits fall back to rlimits",
            "systemd-run --user --scope -p Delegate=yes pytest ...  (or --sandbox-cgroup=PATH of a cgroup you own)",
        )
    writable = delegation.split(":", 1)[1].split() if delegation.startswith("writable:") else []
    missing = [name for name in V1_HIERARCHIES if name not in writable]
    if not missing:
        return Check("cgroup", True, detail)
    group = f"/pytest-{user}"
    recipe = (
        f"for c in {' '.join(missing)}; do d=/sys/fs/cgroup/$c{group}; "
        f"sudo mkdir -p $d && sudo chown {user} $d $d/cgroup.procs $d/tasks; done\n"
        f"then: pytest --sandbox-cgroup={group}  (check: pytest-sandbox doctor --cgroup {group})"
    )
    what = "limits fall back to rlimits" if not writable else f"no {', '.join(missing)} limits"
    return Check("cgroup", False, f"{detail}: {what}", recipe)


def build_checks(results: dict[str, str], cgroup: str | None = None) -> tuple[Check, ...]:
    """The doctor's checks from the setup steps' results (step -> error, '' if it worked) and this host."""
    out: list[Check] = []
    err = results.get("userns")
    if err is None or err:
        reason, fix = _userns_blocker()
        out.append(Check("userns", False, f"{reason} ({err or 'not tried'})", fix))
    else:
        out.append(Check("userns", True, "unprivileged user namespaces work"))
    labels = {
        "mountns": "mount namespace",
        "host_view": "read-only host view (open_tree + mount_setattr)",
        "overlay": "overlayfs with userxattr",
        "tmpfs_xattr": "user xattrs on tmpfs: host directories can be deleted in writable overlays",
        "netns": "network namespace",
        "pod": "pod network for services: loopback up; readiness: wait.listening (its TCP table), "
        "wait.notify (abstract datagram sockets), wait.log, wait.http, wait.command",
        "pod_bridge": "pod bridge: each member on a veth pair with an address of its own "
        "(else the pod is one shared loopback)",
        "pidns": "pid namespace",
    }
    first_failed = next((c.name for c in out if not c.ok), None)
    for step, label in labels.items():
        step_err = results.get(step)
        if step_err is None:
            out.append(
                Check(step, False, f"{label}: not tried (an earlier step failed)", f"the fix of {first_failed} above")
            )
        elif step_err:
            optional = " (optional)" if step in OPTIONAL else ""
            out.append(Check(step, False, f"{label}: {step_err}{optional}", _step_fix(step)))
            first_failed = first_failed or step
        else:
            out.append(Check(step, True, label))
    out.append(cgroup_check(cgroup_mode(), cgroup_delegation(cgroup), _user()))
    newuidmap = shutil.which("newuidmap")
    out.append(
        Check(
            "newuidmap",
            bool(newuidmap),
            f"newuidmap at {newuidmap}" if newuidmap else "newuidmap not installed (single-id maps only)",
            "" if newuidmap else "sudo apt-get install uidmap (optional)",
        )
    )
    out.append(landlock_check())
    return tuple(out)


def landlock_check() -> Check:
    reason = landlock.unavailable_reason()
    if reason is None:
        detail = (
            f"Landlock scopes (ABI {landlock.abi_version()}): --sandbox=hermetic's tests cannot signal or trace pytest"
        )
        return Check("landlock", True, detail)
    return Check(
        "landlock",
        False,
        f"{reason}: --sandbox=hermetic's tests can signal pytest in the session's sandbox, network=host "
        "tests reach the host's abstract sockets (optional)",
        "a kernel of Linux 6.12 or later with landlock in its lsm= list (optional)",
    )


@functools.lru_cache(maxsize=4)
def checks(cgroup: str | None = None) -> tuple[Check, ...]:
    results = _try_in_child(list(_STEPS))
    if "userns" not in results:  # the probe's child died before its first step said anything: once more
        results = _try_in_child(list(_STEPS))
    return build_checks(results, cgroup)


OPTIONAL = ("tmpfs_xattr", "pod", "pod_bridge")
REQUIRED = ("userns", "mountns", "host_view", "overlay", "netns", "pidns")


def has(name: str) -> bool:
    """Whether the optional capability ``name`` (a doctor check) works here."""
    return any(check.name == name and check.ok for check in checks())


def unavailable_reason() -> str | None:
    """None when sandboxes can be built here, else the doctor's one-line reason and fix."""
    for check in checks():
        if check.name in REQUIRED and not check.ok:
            fix = f"; fix: {check.fix}" if check.fix else ""
            return f"{check.detail}{fix} (see `pytest-sandbox doctor`)"
    return None


def root_in_a_foreign_tree(rootdir: str) -> list[str]:
    """Root whose rootdir is another user's (a CI checkout): a sandboxed root has no CAP_DAC_OVERRIDE, so
    its tests cannot write in those directories, which a plain run as root can. Said up front."""
    if os.geteuid() != 0:
        return []
    try:
        owner = os.stat(rootdir).st_uid
    except OSError:
        return []
    if owner == 0:
        return []
    return [
        f"sandbox: running as root in a rootdir owned by uid {owner}: sandboxed tests have no capabilities, "
        "so they cannot write in its directories unless the mode lets root (chown -R root, or run as that user)"
    ]


def header_line() -> str:
    parts = []
    for check in checks():
        if check.name in ("userns", "overlay", "netns", "pod", "pod_bridge"):
            parts.append(f"{check.name} {'ok' if check.ok else 'MISSING'}")
    parts.append(next(c.detail for c in checks() if c.name == "cgroup"))
    reason = unavailable_reason()
    status = "available" if reason is None else f"UNAVAILABLE: {reason}"
    return f"sandbox: {status} [{', '.join(parts)}]"


def doctor_text(cgroup: str | None = None) -> str:
    """Every check, and under each that fails the command that fixes it; ``cgroup`` as --sandbox-cgroup."""
    lines = []
    for check in checks(cgroup):
        lines.append(f"{'ok' if check.ok else 'NO':>3}  {check.name:<12} {check.detail}")
        if check.fix and not check.ok:
            first, *rest = check.fix.splitlines()
            lines.append(f"      fix: {first}")
            lines.extend(f"           {line}" for line in rest)
    reason = unavailable_reason()
    lines.append("")
    lines.append("sandboxes: available" if reason is None else f"sandboxes: UNAVAILABLE: {reason}")
    return "\n".join(lines)
