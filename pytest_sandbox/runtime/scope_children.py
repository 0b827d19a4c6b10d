"""``subprocess.Popen`` objects a test inherits from its scope sandbox's fixtures.

A fixture of wider scope that starts a server keeps its ``Popen`` in the scope process, whose child
the server is; the test runs in a fork, which may not wait for its parent's children. CPython reads
ECHILD as "it exited with 0": ``poll()`` says the server is gone, ``wait()`` returns at once and
``terminate()`` then does nothing. In the fork, a ``Popen`` whose process is not the fork's child
is watched through ``/proc`` instead: running while it runs, and once it has exited (a zombie of
the scope process, which reaps it later) its exit status from ``/proc/PID/stat``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from typing import Any

from ..linux import process

_POLL_INTERVAL = 0.005


def _zombie_status(pid: int) -> int | None:
    """The wait status of ``pid`` if it has exited (not reaped yet), else None; ChildProcessError if gone."""
    try:
        fields = process.stat_fields(pid)
    except FileNotFoundError:
        raise ChildProcessError(errno.ECHILD, f"process {pid} is gone") from None
    if fields[0] not in (b"Z", b"X"):
        return None
    return int(fields[49]) if len(fields) > 49 else 0  # field 52 of the line: exit_code (Linux 3.5+)


def _waitpid(pid: int, flags: int) -> tuple[int, int]:
    """``os.waitpid`` for a child, and for a child of the scope process seen from the fork."""
    try:
        return os.waitpid(pid, flags)
    except ChildProcessError:
        pass
    while True:
        status = _zombie_status(pid)
        if status is not None:
            return pid, status
        if flags & os.WNOHANG:
            return 0, 0
        time.sleep(_POLL_INTERVAL)


def adopt() -> None:
    """In a test's fork: ``Popen`` watches the processes it inherited from the scope through ``/proc``."""
    popen: Any = subprocess.Popen
    if getattr(popen, "_sandbox_adopted", False) or not hasattr(popen, "_internal_poll"):
        return
    internal_poll = popen._internal_poll

    def _internal_poll(self: subprocess.Popen[Any], _deadstate: object = None, **kwargs: Any) -> int | None:
        kwargs["_waitpid"] = _waitpid
        return internal_poll(self, _deadstate, **kwargs)  # type: ignore[no-any-return]

    def _try_wait(self: subprocess.Popen[Any], wait_flags: int) -> tuple[int, int]:
        try:
            return _waitpid(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0  # gone, status unknown: what CPython says too

    popen._internal_poll = _internal_poll
    popen._try_wait = _try_wait
    popen._sandbox_adopted = True
