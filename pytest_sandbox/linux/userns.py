"""User namespace entry and capability handling.

The default map is a single id: the caller's uid and gid map to themselves, so
files keep their owners and ``os.getuid()`` is unchanged inside the sandbox.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import syscalls
from .files import write_file

_CAP_VERSION_3 = 0x20080522
FULL_RANGE = 4294967295


def write_id_maps(pid: str, uid: int, gid: int) -> None:
    """Map the caller's ids onto themselves.

    root maps every id when it may (so ``chown`` and file owners behave as on the
    host); anyone else maps just their own uid and gid, which needs ``setgroups``
    denied before ``gid_map`` is written.
    """
    if uid == 0:
        try:
            write_file(f"/proc/{pid}/uid_map", f"0 0 {FULL_RANGE}\n")
            write_file(f"/proc/{pid}/gid_map", f"0 0 {FULL_RANGE}\n")
            return
        except OSError:
            pass  # root of a container without the full range: fall back to one id
    map_one_id(pid, (uid, gid), (uid, gid))


def map_one_id(pid: str, inside: tuple[int, int], outside: tuple[int, int]) -> None:
    """Map the single (uid, gid) ``outside`` to ``inside``; ``setgroups`` is denied first, as the kernel requires.

    The uid map may already be written (a failed full-range attempt wrote it): it is written once.
    """
    write_file(f"/proc/{pid}/setgroups", "deny")
    with open(f"/proc/{pid}/uid_map") as f:
        uid_map_written = bool(f.read())
    if not uid_map_written:
        write_file(f"/proc/{pid}/uid_map", f"{inside[0]} {outside[0]} 1\n")
    write_file(f"/proc/{pid}/gid_map", f"{inside[1]} {outside[1]} 1\n")


COMMANDS_OWNER = FULL_RANGE - 1  # owns root's command namespaces: an id no process of a sandbox has


def commands_namespace() -> int:
    """An fd of a new child user namespace that maps uid and gid 0 only and is owned by ``COMMANDS_OWNER``
    (call as root with capabilities, in a namespace that maps that id).

    Since Linux 5.12 a process without capabilities cannot map uid 0 in a user namespace it makes (that
    needs CAP_SETFCAP), so root's test processes cannot make one for the commands they start in images.
    A namespace a root test's euid owned would give the test every capability in it (the owner's right):
    entered, over every file of a mapped id it can see, a mode-000 file included. Owned by another id,
    only a process with capabilities in the parent namespace (the sandbox's launcher) can enter it. One
    id only: a command able to become any host user could read their files through an fd the test
    hands it (a directory of the host view as its stdin).
    """
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        try:
            os.setresuid(COMMANDS_OWNER, COMMANDS_OWNER, COMMANDS_OWNER)  # also clears its capabilities
            syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)  # the uid change unset it: /proc/PID/ns/user opens
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            # Its pid as /proc numbers it: a caller that joined another pid namespace (setns: its children
            # are born there) sees /proc of that namespace, where the pid fork returned is not this one.
            os.write(unshared_w, b"u" + os.readlink("/proc/self").encode())
            os.read(mapped_r, 1)
        finally:
            os._exit(0)
    os.close(unshared_w)
    os.close(mapped_r)
    try:
        said = os.read(unshared_r, 32)
        if not said.startswith(b"u") or not said[1:].isdigit():
            raise OSError(errno.EPERM, "the user namespace for root's commands cannot be made here")
        seen_as = int(said[1:])
        write_file(f"/proc/{seen_as}/uid_map", "0 0 1\n")
        write_file(f"/proc/{seen_as}/gid_map", "0 0 1\n")
        return os.open(f"/proc/{seen_as}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(unshared_r)
        os.close(mapped_w)
        os.waitpid(pid, 0)


def enter_user_namespace() -> None:
    """unshare a user namespace and map the caller's ids into it: root every id (a helper of the parent
    namespace writes that map: a process cannot write more than its one id into its own), anyone else
    their own."""
    unshare_mapped(0, (os.geteuid(), os.getegid()))


def join_user_namespace(fd: int) -> None:
    """Join the session's user namespace (made by an earlier zygote): its owner, this process's euid, has
    every capability in it. Every zygote of a pytest process shares one, so a test can join the pod's network
    namespace, which that user namespace owns."""
    syscalls.setns(fd, syscalls.CLONE_NEWUSER)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# Docker's default set: what an image build needs, valid only inside the command's own user namespace.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_SETFCAP = 1, 2, 3, 31
CONTAINER_CAPABILITIES = (
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    13,  # NET_RAW
    18,  # SYS_CHROOT
    27,  # MKNOD
    29,  # AUDIT_WRITE
    31,  # SETFCAP
)
# A sandboxed root's commands: no capability that overrides a file's mode or owner (the test hands them fds
# of its view of the host, where root's files are of their id) and none that writes file capabilities
# valid outside (a volume is a host directory).
SANDBOXED_ROOT_CAPABILITIES = tuple(
    c for c in CONTAINER_CAPABILITIES if c not in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_SETFCAP)
)


def drop_capabilities() -> None:
    """Give up the namespace's capabilities so a non-root test sees plain user permissions.

    The creator of a user namespace holds every capability in it, which would let a
    test write to its own read-only files (CAP_DAC_OVERRIDE) and break tests that
    check permission errors.
    """
    limit_capabilities(())


def limit_capabilities(keep: tuple[int, ...]) -> None:
    """Keep only ``keep`` (< 64) in every set: bounding, permitted, effective; none inheritable or ambient.

    The bounding set first (dropping needs CAP_SETPCAP, held until the capset below): a nested
    user namespace plus execve would otherwise give capabilities back, and a root process gets
    its bounding set as permitted at execve. Then no ambient capabilities and no_new_privs (no
    setuid or file-capability gain), then the sets themselves.
    """
    trim_bounding_set(keep)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    data = (_CapData * 2)()
    for cap in keep:
        bit = 1 << (cap % 32)
        data[cap // 32].effective |= bit
        data[cap // 32].permitted |= bit
    syscalls.capset(_CapHeader(_CAP_VERSION_3, 0), data)


def trim_bounding_set(keep: tuple[int, ...]) -> None:
    """Drop every capability but ``keep`` from the bounding set; needs CAP_SETPCAP for those still in it,
    so it comes before a change to a non-root uid (which empties the effective set)."""
    for cap in range(_last_cap() + 1):
        if cap not in keep and syscalls.prctl(syscalls.PR_CAPBSET_READ, cap):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)


def unshare_mapped(flags: int, inside: tuple[int, int]) -> None:
    """unshare a user namespace (with the namespaces in ``flags``, which it then owns) and map ids into it.

    root maps every id onto itself (``chown`` in an image works, files keep their owners), which only a
    process of the parent namespace may write: a helper forked before the unshare does it. Anyone else
    maps their own uid and gid to ``inside`` (the image's user), which the process writes itself.
    """
    outer = (os.geteuid(), os.getegid())
    if outer[0] != 0:
        syscalls.unshare(syscalls.CLONE_NEWUSER | flags)
        map_one_id("self", inside, outer)
        return
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # in the parent namespace, until the unshare happened
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1):
                write_id_maps(str(os.getppid()), 0, 0)
                code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER | flags)
        os.write(ready_w, b"x")
    finally:
        os.close(ready_w)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError(errno.EPERM, "the id maps of the command's user namespace could not be written")


CAP_SYS_CHROOT, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 18, 19, 21
PR_CAP_AMBIENT_RAISE = 2


def keep_across_exec(*caps: int) -> None:
    """Make ``caps`` (held now) ambient, so a program this process starts keeps them without being root."""
    sets = _capability_sets()
    permitted, effective = sets["CapPrm"], sets["CapEff"]
    inheritable = sum(1 << cap for cap in caps)
    data = (_CapData * 2)()
    for word in (0, 1):
        data[word].permitted = (permitted >> (32 * word)) & 0xFFFFFFFF
        data[word].effective = (effective >> (32 * word)) & 0xFFFFFFFF
        data[word].inheritable = (inheritable >> (32 * word)) & 0xFFFFFFFF
    syscalls.capset(_CapHeader(_CAP_VERSION_3, 0), data)
    for cap in caps:
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def has_capabilities() -> bool:
    """Whether this process holds any effective capability (in its own user namespace)."""
    return _capability_sets().get("CapEff", 0) != 0


def _capability_sets() -> dict[str, int]:
    """This process's capability sets from /proc/self/status: CapInh, CapPrm, CapEff, CapBnd, CapAmb."""
    with open("/proc/self/status") as f:
        return {name: int(value, 16) for name, value in (line.split(":", 1) for line in f if line.startswith("Cap"))}


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40
