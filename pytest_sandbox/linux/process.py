"""Process lifetime helpers: die with the parent, a readable name."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C functions: their masks are sets of ints
import os
import signal
from collections.abc import Iterable

from . import syscalls

MAX_FD = 1 << 20  # above any fd limit: what close_fds_but closes goes up to here
_EVERY_SIGNAL: set[int] = _signal.valid_signals()


def block_every_signal() -> set[int]:
    """Block every signal; the mask before, for set_signal_mask. (signal.pthread_sigmask makes an enum of each
    signal of the mask it returns, and valid_signals of each signal: 0.2 ms for a block and its undoing.)"""
    mask: set[int] = _signal.pthread_sigmask(signal.SIG_BLOCK, _EVERY_SIGNAL)
    return mask


def set_signal_mask(mask: Iterable[int]) -> None:
    _signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stat_fields(pid: int | str = "self") -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name: index 0 is field 3 (state), 1 the parent's
    pid, and so on (the command name may hold spaces and parentheses). OSError if the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def become_helper(name: str, parent: int | None, keep: tuple[int, ...]) -> None:
    """Start of a privileged helper forked from a sandbox's test process before the test's code runs:
    it dies with that process (``parent``; None: the helper watches it itself), cannot be traced or have
    its fds taken, and holds nothing of the host's or the test's (stdio on /dev/null, every fd but
    ``keep`` closed)."""
    if parent is not None:
        die_with_parent(parent)
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    syscalls.set_process_name(name)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    close_fds_but((0, 1, 2, *keep))


def close_fds_but(keep: Iterable[int]) -> None:
    """Close every fd but ``keep``: close_range between them, a few calls whatever the fd limit."""
    start = 0
    for fd in sorted(set(keep)):
        if fd > start:
            os.closerange(start, fd)
        start = max(start, fd + 1)
    os.closerange(start, MAX_FD)


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Get ``sig`` when the parent goes; ``parent`` is its pid as this process sees it (0: outside our pid ns).

    The check after arming closes the race where the parent died before the signal was armed.
    """
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def die_as_signalled(status: int) -> None:
    """If ``status`` (a child's wait status) says a signal ended it, end this process by that signal too
    (not dumpable first: no core file of this process, which is not what crashed); else return."""
    if not os.WIFSIGNALED(status):
        return
    number = os.WTERMSIG(status)
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    try:
        signal.signal(number, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL has no handler to reset
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
    os.kill(os.getpid(), number)


def without_privileges() -> bool:
    """This process can gain no capability: none in its bounding set, and no_new_privs (a sandbox's own)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return False
    return fields.get("NoNewPrivs", "").strip() == "1" and int(fields.get("CapBnd", "1").strip(), 16) == 0
