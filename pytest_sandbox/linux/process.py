"""Process lifetime helpers: die with the parent, a readable name."""

from __future__ import annotations

import os
import signal

from . import syscalls


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Get ``sig`` when the parent goes; ``parent`` is its pid as this process sees it (0: outside our pid ns).

    The check after arming closes the race where the parent died before the signal was armed.
    """
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)
