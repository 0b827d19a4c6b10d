"""A seccomp filter that keeps a process and everything it starts from setting set-user/group-ID bits.

A service runs for the whole of its scope with read/write volumes that are host directories, and root's
service makes root's files there: a set-user-ID root program in a directory other users reach would be
theirs to run. pytest clears such bits after each test and when the service stops, but the service (or
a process a test left in it) could set them again in between. So its processes cannot set them at all:
``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` and a file made by ``open``/``openat``/``creat``/
``mknod``/``mknodat`` with mode bits 06000 fail with EPERM. Calls whose mode the filter cannot read
(``openat2``'s lies in a struct, ``io_uring`` runs calls on the kernel's side) fail with ENOSYS, which
C libraries and servers answer by using the older calls. x32 calls on x86_64 fail the same way; i386
calls on x86_64 get the same checks as native ones.

Tests do not get it: setting those bits on their own files is something test suites do, and a test's
volumes are cleared when it ends (or, if pytest dies, by the session's keeper).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from . import syscalls

SETID_MODE_BITS = 0o6000

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_ARCH_X86_64 = 0xC000003E
_ARCH_I386 = 0x40000003
_ARCH_AARCH64 = 0xC00000B7
_X32_BIT = 0x40000000

_OFFSET_NR, _OFFSET_ARCH = 0, 4


def _offset_arg(index: int) -> int:
    return 16 + 8 * index  # struct seccomp_data: nr, arch, instruction pointer, then u64 args (low word first)


# syscall number -> the index of its mode argument, per architecture; then the calls refused with ENOSYS
_MODE_ARGS = {
    _ARCH_X86_64: {2: 2, 85: 1, 90: 1, 91: 1, 133: 1, 257: 3, 259: 2, 268: 2, 452: 2},
    _ARCH_I386: {5: 2, 8: 1, 15: 1, 94: 1, 14: 1, 295: 3, 297: 2, 306: 2, 452: 2},
    _ARCH_AARCH64: {56: 3, 33: 2, 52: 1, 53: 2, 452: 2},
}
_UNREADABLE = (437, 425)  # openat2, io_uring_setup: the same numbers on all three
_NATIVE = {"x86_64": (_ARCH_X86_64, _ARCH_I386), "aarch64": (_ARCH_AARCH64,)}


class _Program:
    """Instructions with forward jumps to named labels, resolved at the end (BPF jumps only forward)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def add(self, code: int, k: int, true: str | int = 0, false: str | int = 0) -> None:
        self.code.append((code, true, false, k))

    def assemble(self) -> bytes:
        out = b""
        for at, (code, true, false, k) in enumerate(self.code):
            jumps = [self.labels[j] - at - 1 if isinstance(j, str) else j for j in (true, false)]
            if not all(0 <= j < 256 for j in jumps):
                raise ValueError(f"seccomp filter: jump out of range at {at}")
            out += struct.pack("HBBI", code, jumps[0], jumps[1], k)
        return out


def _by_architecture(what: str, machine: str | None, otherwise: int) -> tuple[_Program, tuple[int, ...]]:
    """A program that jumps to ``arch-<AUDIT_ARCH>`` for each architecture of ``machine`` (default: this one)
    and returns ``otherwise`` for any other; ValueError for a machine without a filter."""
    arches = _NATIVE.get(machine or platform.machine())
    if arches is None:
        raise ValueError(f"no {what} filter for {machine or platform.machine()}")
    program = _Program()
    program.add(_LD_W_ABS, _OFFSET_ARCH)
    for arch in arches:
        program.add(_JEQ_K, arch, f"arch-{arch}")
    program.add(_RET_K, otherwise)
    return program, arches


def _install(code: bytes) -> None:
    program = _SockFprog(len(code) // 8, code)
    syscalls.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(program))


def setid_filter(machine: str | None = None) -> bytes:
    """The filter for this machine (``platform.machine()``) as BPF instructions; ValueError if unknown."""
    # An architecture not listed: every call of it is refused.
    program, arches = _by_architecture("set-id", machine, _RET_ERRNO | errno.ENOSYS)
    for arch in arches:
        program.label(f"arch-{arch}")
        program.add(_LD_W_ABS, _OFFSET_NR)
        if arch == _ARCH_X86_64:
            program.add(_JSET_K, _X32_BIT, "x32")
        for nr in _UNREADABLE:
            program.add(_JEQ_K, nr, f"enosys-{arch}")
        for nr, arg in sorted(_MODE_ARGS[arch].items()):
            program.add(_JEQ_K, nr, f"mode-{arch}-{arg}")
        program.add(_RET_K, _RET_ALLOW)
        if arch == _ARCH_X86_64:
            program.label("x32")
        program.label(f"enosys-{arch}")
        program.add(_RET_K, _RET_ERRNO | errno.ENOSYS)
        for arg in sorted(set(_MODE_ARGS[arch].values())):
            program.label(f"mode-{arch}-{arg}")
            program.add(_LD_W_ABS, _offset_arg(arg))
            program.add(_JSET_K, SETID_MODE_BITS, f"eperm-{arch}-{arg}")
            program.add(_RET_K, _RET_ALLOW)
            program.label(f"eperm-{arch}-{arg}")
            program.add(_RET_K, _RET_ERRNO | errno.EPERM)
    return program.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def refuse_setid_modes() -> bool:
    """Install the filter on this process (inherited by its children, for good); False on a machine it
    does not know. Needs no_new_privs or CAP_SYS_ADMIN in this process's user namespace; OSError if the
    kernel refuses it."""
    if platform.machine() not in _NATIVE:
        return False
    _install(setid_filter())
    return True


# -- AF_VSOCK -------------------------------------------------------------------------------------------
# A network namespace does not cover vsock: a sandbox without the host's network could still talk to the
# hypervisor and bind ports the whole VM shares. socket(AF_VSOCK, ...) fails there with EAFNOSUPPORT, as on
# a machine without vsock; i386's socketcall(SYS_SOCKET), whose arguments lie in memory, with ENOSYS.
AF_VSOCK = 40
_SOCKET = {_ARCH_X86_64: 41, _ARCH_I386: 359, _ARCH_AARCH64: 198}
_I386_SOCKETCALL, _SYS_SOCKET = 102, 1


def vsock_filter(machine: str | None = None) -> bytes:
    """The filter for this machine as BPF instructions; ValueError if unknown."""
    program, arches = _by_architecture("vsock", machine, _RET_ALLOW)
    for arch in arches:
        program.label(f"arch-{arch}")
        program.add(_LD_W_ABS, _OFFSET_NR)
        program.add(_JEQ_K, _SOCKET[arch], "family")
        if arch == _ARCH_X86_64:
            program.add(_JEQ_K, _X32_BIT | _SOCKET[arch], "family")
        if arch == _ARCH_I386:
            program.add(_JEQ_K, _I386_SOCKETCALL, "socketcall")
        program.add(_RET_K, _RET_ALLOW)
    _refused_if_first_argument_is(program, "family", AF_VSOCK, errno.EAFNOSUPPORT)
    if _ARCH_I386 in arches:
        _refused_if_first_argument_is(program, "socketcall", _SYS_SOCKET, errno.ENOSYS)
    return program.assemble()


def _refused_if_first_argument_is(program: _Program, label: str, value: int, error: int) -> None:
    """At ``label``: the call fails with ``error`` if its first argument is ``value``, else it runs."""
    program.label(label)
    program.add(_LD_W_ABS, _offset_arg(0))
    program.add(_JEQ_K, value, f"{label}-refused")
    program.add(_RET_K, _RET_ALLOW)
    program.label(f"{label}-refused")
    program.add(_RET_K, _RET_ERRNO | error)


def refuse_vsock() -> bool:
    """Install the vsock filter on this process and its children; False on a machine it does not know."""
    if platform.machine() not in _NATIVE:
        return False
    _install(vsock_filter())
    return True
