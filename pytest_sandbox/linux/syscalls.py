"""Thin ctypes bindings for the Linux syscalls Python 3.10 does not expose.

Every wrapper raises ``OSError`` with the errno and a short description of the
call, so a failed setup step says which syscall refused and why.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import dataclasses
import fcntl
import os
import platform
import socket
import struct
from typing import Any


def _load_libc() -> ctypes.CDLL:
    """glibc by its soname, or the C library this interpreter is linked with (musl); find_library runs
    ``ldconfig -p`` in a child process, a few milliseconds of every pytest start, only as the last resort."""
    for name in ("libc.so.6", None):
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.syscall  # noqa: B018  # the one symbol everything here needs
            return libc
        except (OSError, AttributeError):
            continue
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_libc = _load_libc()
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_NR = {
    "x86_64": {
        "pivot_root": 155,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "openat2": 437,
        "mount_setattr": 442,
        "keyctl": 250,
    },
    "aarch64": {
        "pivot_root": 41,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "openat2": 437,
        "mount_setattr": 442,
        "keyctl": 219,
    },
}
_nr = _NR.get(platform.machine(), _NR["x86_64"])


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def kernel_at_least(major: int, minor: int) -> bool:
    """Whether the running kernel's release (``6.8.0-...``) is at least ``major.minor``."""
    parts = os.uname().release.split("-")[0].split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit()) >= (major, minor)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """A new anonymous session keyring: keyrings go with credentials, not namespaces, so a sandbox
    would otherwise read and change the keys of pytest's session (Kerberos tickets, CI secrets)."""
    _check(_syscall(ctypes.c_long(_nr["keyctl"]), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None), "keyctl")


KEYCTL_CLEAR, KEYCTL_UNLINK, KEYCTL_READ, KEYCTL_GET_PERSISTENT = 7, 9, 11, 22
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
_keyctl = ctypes.c_long(_nr["keyctl"])


def persistent_keyring() -> int | None:
    """This user's persistent keyring (linked into the session keyring to reach it); None where the
    kernel has none."""
    rc = _syscall(
        _keyctl, ctypes.c_long(KEYCTL_GET_PERSISTENT), ctypes.c_long(-1), ctypes.c_long(KEY_SPEC_SESSION_KEYRING)
    )
    return rc if rc >= 0 else None


def clear_keyrings_of_the_user() -> None:
    """Empty the user's keyrings that every sandbox of the session shares: the user, user-session and
    persistent keyrings belong to the user namespace, not to a process, so a test would find what an
    earlier test left there. Best effort: a kernel without keys has nothing to leave."""
    rings = [KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING]
    persistent = persistent_keyring()
    if persistent is not None:
        rings.append(persistent)
    for ring in rings:
        _syscall(_keyctl, ctypes.c_long(KEYCTL_CLEAR), ctypes.c_long(ring))
    if persistent is not None:
        _syscall(
            _keyctl, ctypes.c_long(KEYCTL_UNLINK), ctypes.c_long(persistent), ctypes.c_long(KEY_SPEC_SESSION_KEYRING)
        )


def keyring_keys(keyring: int) -> list[int]:
    """The serials of the keys linked in ``keyring`` (a KEY_SPEC_* or a serial)."""
    size = 4096
    while True:
        buffer = ctypes.create_string_buffer(size)
        rc = _syscall(_keyctl, ctypes.c_long(KEYCTL_READ), ctypes.c_long(keyring), buffer, ctypes.c_long(size))
        length = _check(rc, "keyctl read")
        if length <= size:
            return list(array.array("i", buffer.raw[: length - length % 4]))
        size = length


def unlink_key(key: int, keyring: int) -> None:
    rc = _syscall(_keyctl, ctypes.c_long(KEYCTL_UNLINK), ctypes.c_long(key), ctypes.c_long(keyring))
    _check(rc, "keyctl unlink")


IPC_RMID = 0


def remove_sysv_ipc(kind: str, ident: int) -> None:
    """Remove a System V shared memory segment, semaphore set or message queue (``kind``: shm, sem, msg)."""
    if kind == "shm":
        rc = _libc.shmctl(ctypes.c_int(ident), ctypes.c_int(IPC_RMID), None)
    elif kind == "sem":
        rc = _libc.semctl(ctypes.c_int(ident), ctypes.c_int(0), ctypes.c_int(IPC_RMID))
    else:
        rc = _libc.msgctl(ctypes.c_int(ident), ctypes.c_int(IPC_RMID), None)
    _check(rc, f"remove {kind} {ident}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(rc, f"mount {fstype or source} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(_nr["pivot_root"], _b(new_root), _b(put_old)), f"pivot_root {new_root}")


def open_tree(path: str, flags: int, dirfd: int = AT_FDCWD) -> int:
    rc = _syscall(_nr["open_tree"], ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags))
    return _check(rc, f"open_tree {path}")


def move_mount(from_fd: int, to_path: str, to_dirfd: int = AT_FDCWD) -> None:
    rc = _syscall(
        _nr["move_mount"],
        ctypes.c_int(from_fd),
        b"",
        ctypes.c_int(to_dirfd),
        _b(to_path),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    _check(rc, f"move_mount to {to_path}")


def move_mount_onto(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount ``from_fd`` on what ``to_fd`` opens: no path is looked up."""
    rc = _syscall(
        _nr["move_mount"],
        ctypes.c_int(from_fd),
        b"",
        ctypes.c_int(to_fd),
        b"",
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(rc, "move_mount onto an fd")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_LANDLOCK_CREATE_RULESET, _LANDLOCK_RESTRICT_SELF = 444, 446  # one number on every architecture


def landlock_create_ruleset(attr: ctypes.Structure | None, flags: int = 0) -> int:
    """A ruleset fd; with ``attr`` None and flags 1 (LANDLOCK_CREATE_RULESET_VERSION), the kernel's ABI."""
    size = 0 if attr is None else ctypes.sizeof(attr)
    pointer = None if attr is None else ctypes.byref(attr)
    rc = _syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), pointer, ctypes.c_size_t(size), ctypes.c_uint32(flags))
    return _check(rc, "landlock_create_ruleset")


def landlock_restrict_self(ruleset: int) -> None:
    _check(
        _syscall(ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
        "landlock_restrict_self",
    )


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    rc = _syscall(_nr["openat2"], ctypes.c_int(dirfd), _b(path), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(rc, f"openat2 {path}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(fd: int, attr_set: int, recursive: bool = True, attr_clr: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    rc = _syscall(
        _nr["mount_setattr"],
        ctypes.c_int(fd),
        b"",
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, "mount_setattr")


def fsopen(fstype: str) -> int:
    return _check(_syscall(_nr["fsopen"], _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), f"fsopen {fstype}")


def fsconfig(fd: int, key: str, value: str | None = None) -> None:
    if value is None:
        rc = _syscall(
            _nr["fsconfig"], ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_FLAG), _b(key), None, ctypes.c_int(0)
        )
    else:
        rc = _syscall(
            _nr["fsconfig"], ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING), _b(key), _b(value), ctypes.c_int(0)
        )
    _check(rc, f"fsconfig {key}={value}")


def fsmount(fs_fd: int, attr_flags: int = 0) -> int:
    """Create the superblock configured on ``fs_fd`` and return a detached mount fd."""
    rc = _syscall(_nr["fsconfig"], ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
    _check(rc, "fsconfig create")
    return _check(
        _syscall(_nr["fsmount"], ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attr_flags)),
        "fsmount",
    )


def prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        f"prctl({option})",
    )


def capset(header: ctypes.Structure, data: ctypes.Array[Any]) -> None:
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def set_process_name(name: str) -> None:
    """Name shown by ps/top, so a sandbox is recognisable on the host."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


_SIOCGIFCONF = 0x8912
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: a name of 16 bytes, a union of 24
_LOOPBACK_V6 = "0" * 31 + "1"
# Placeholders on lo for an address family the namespace left behind has beyond loopback: glibc's
# getaddrinfo(AI_ADDRCONFIG) answers for a family only where some address of it is not 127.0.0.1 or ::1.
# Both are host routes on lo (127.0.0.2/32, a /128 of the unique-local fd00::/8): they lead nowhere else.
_STAND_IN_V4 = "127.0.0.2"
_STAND_IN_V6 = "fd00:5b0c:5b0c::1"


@dataclasses.dataclass(frozen=True)
class AddressFamilies:
    """Whether this network namespace has an IPv4 and an IPv6 address other than loopback's."""

    v4: bool = False
    v6: bool = False


def address_families() -> AddressFamilies:
    """As glibc's getaddrinfo(AI_ADDRCONFIG) sees them: every IPv4 address (SIOCGIFCONF) but 127.0.0.1, every
    IPv6 address (/proc/net/if_inet6, this namespace's) but ::1."""
    v4 = v6 = False
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        buffer = ctypes.create_string_buffer(_IFREQ_SIZE * 64)
        request = struct.pack("iL", len(buffer), ctypes.addressof(buffer))
        length = struct.unpack("iL", fcntl.ioctl(sock, _SIOCGIFCONF, request))[0]
        for offset in range(0, length, _IFREQ_SIZE):
            address = socket.inet_ntoa(buffer.raw[offset + 20 : offset + 24])  # sockaddr_in's sin_addr
            v4 = v4 or address != "127.0.0.1"
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        v6 = any(line.split()[0] != _LOOPBACK_V6 for line in f if line.strip())
    return AddressFamilies(v4, v6)


def loopback_up(like: AddressFamilies = AddressFamilies()) -> None:
    """Bring ``lo`` up with one ioctl (opening a netlink socket costs far more per test), with a stand-in
    address for each family ``like`` (the namespace left behind) has beyond loopback, so that a lookup with
    AI_ADDRCONFIG finds ``localhost`` as it would there (anyio's listeners ask for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
        if like.v4:
            with contextlib.suppress(OSError):
                packed = socket.inet_aton(_STAND_IN_V4)
                fcntl.ioctl(sock, _SIOCSIFADDR, struct.pack("16sH2s4s8x", b"lo:1", socket.AF_INET, b"", packed))
                mask = socket.inet_aton("255.255.255.255")
                fcntl.ioctl(sock, _SIOCSIFNETMASK, struct.pack("16sH2s4s8x", b"lo:1", socket.AF_INET, b"", mask))
    if like.v6:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock6:
            in6_ifreq = socket.inet_pton(socket.AF_INET6, _STAND_IN_V6) + struct.pack(
                "Ii", 128, socket.if_nametoindex("lo")
            )
            fcntl.ioctl(sock6, _SIOCSIFADDR, in6_ifreq)
