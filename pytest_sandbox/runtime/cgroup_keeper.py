"""The session cgroups' keeper: a small process that removes them when pytest dies, however it dies.

The zygote-parent removes them too when pytest's death reaches it, but it is not always there to do
it: pytest opens the session cgroup before it forks a zygote, and forks a new one when the old one
has gone (marked mode does this after each test pytest runs itself). A ``kill -9`` in such a gap
left the cgroups to the next session's sweep. The zygote-parent also lives in the session's user
namespace, whose id maps may not be written yet when pytest dies.

The keeper is forked before the first cgroup is made and never leaves the host's namespaces, so
pytest's ids and capabilities are its own. It holds only the parents' directory fds, a pidfd of
pytest and stderr (where it says what it could not remove). At a normal end pytest removes the
cgroups itself and then ends the keeper, so nothing outlives pytest.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
import warnings
from collections.abc import Callable, Iterable

from ..linux import process, syscalls

REMOVE_FOR = 30.0  # seconds the keeper goes on trying while the last sandboxes of a dead pytest die


def start(remove: Callable[[], list[str]], keep: Iterable[int]) -> int:
    """Fork the keeper; ``remove`` removes the session's cgroups and says what is left, through the fds in
    ``keep``. Returns its pid, for ``stop``."""
    pytest_pid = os.getpid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process": it runs no Python
        pid = os.fork()  # of pytest's, takes no lock and imports nothing
    if pid != 0:
        return pid
    try:  # a fork of pytest: nothing of pytest's may run here, and nothing may raise out of it
        _keep(pytest_pid, remove, frozenset(keep))
    finally:
        os._exit(0)


def stop(pid: int) -> None:
    """pytest removed its cgroups itself: the keeper has nothing left to do."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _keep(pytest_pid: int, remove: Callable[[], list[str]], keep: frozenset[int]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)  # a signal to pytest's process group is for pytest to handle
    pidfd = -1
    with contextlib.suppress(OSError):
        pidfd = os.pidfd_open(pytest_pid)
    process.close_fds_but({*keep, pidfd, 2})  # pytest's sockets and pipes: their other ends wait for pytest's end
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    syscalls.set_process_name("sandbox-cgroups")
    if pidfd >= 0 and os.getppid() == pytest_pid:  # else pytest is gone already
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        while not poll.poll():
            pass
    deadline = time.monotonic() + REMOVE_FOR
    while (left := remove()) and time.monotonic() < deadline:
        time.sleep(0.1)
    say_left(left)


def say_left(left: list[str]) -> None:
    """Name on stderr the cgroups a dead pytest's cleanup could not remove (nothing when there are none)."""
    if left:
        with contextlib.suppress(OSError):
            os.write(2, f"pytest-sandbox: cgroups left behind: {'; '.join(left)}\n".encode())
