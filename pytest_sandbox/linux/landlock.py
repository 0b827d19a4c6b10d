"""Landlock scopes: a process that cannot signal, trace or reach the abstract sockets of processes outside
its own domain, whatever their user.

The hermetic session's tests run as processes of the session's sandbox, beside pytest, its zygote and its
layer helper, as the same user (``runtime/test_process.py``). Namespaces cannot put them out of those
processes' sight there (a pid namespace of their own needs capabilities nobody in the session may hold),
so each of the session's sandboxes is a Landlock domain of its own (Linux 6.12, ABI 6): ``kill``,
``pidfd_send_signal`` and friends fail with EPERM outside it, ptrace access (``/proc/PID/mem``, ``environ``,
``pidfd_getfd``) is refused outside it, and abstract unix sockets bound outside it cannot be connected to.
Nothing of the file system is restricted: no mount is denied, no file access changes.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import syscalls

_VERSION = 1  # LANDLOCK_CREATE_RULESET_VERSION
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1
SCOPES_SINCE_ABI = 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def abi_version() -> int:
    """The kernel's Landlock ABI; 0 where it has none (too old, or not among the LSMs it booted with)."""
    try:
        return syscalls.landlock_create_ruleset(None, _VERSION)
    except OSError:
        return 0


def scopes_available() -> bool:
    return abi_version() >= SCOPES_SINCE_ABI


def unavailable_reason() -> str | None:
    """Why this kernel cannot scope a process (for the doctor and the README's host table); None if it can."""
    try:
        version = syscalls.landlock_create_ruleset(None, _VERSION)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return "Landlock is built in but not enabled (add landlock to the lsm= boot parameter)"
        return "this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK, Linux 6.12 or later)"
    if version < SCOPES_SINCE_ABI:
        return f"this kernel's Landlock is ABI {version}; scoping signals needs ABI {SCOPES_SINCE_ABI} (Linux 6.12)"
    return None


def scope_self() -> None:
    """Make this process, and every process it forks from now on, a domain of its own, scoped for signals
    and abstract unix sockets. Needs no_new_privs (or CAP_SYS_ADMIN); OSError if the kernel refuses."""
    ruleset = syscalls.landlock_create_ruleset(_RulesetAttr(0, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL))
    try:
        syscalls.landlock_restrict_self(ruleset)
    finally:
        os.close(ruleset)
