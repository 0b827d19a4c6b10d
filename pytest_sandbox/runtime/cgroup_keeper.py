"""The session cgroups' keeper: a small process that removes them when pytest dies, however it dies.

The zygote-parent removes them too when pytest's death reaches it, but it is not always there to do
it: pytest opens the session cgroup before it forks a zygote, and forks a new one when the old one
has gone (marked mode does this after each test pytest runs itself). A ``kill -9`` in such a gap
left the cgroups to the next session's sweep. The zygote-parent also lives in the session's user
namespace, whose id maps may not be written yet when pytest dies.

The keeper is forked before the first cgroup is made and never leaves the host's namespaces, so
pytest's ids and capabilities are its own. It holds only the parents' directory fds, a pidfd of
pytest, stderr (where it says what it could not remove) and a line from pytest. At a normal end
pytest removes the cgroups itself and then ends the keeper, so nothing outlives pytest.

On that line pytest hands it an fd of each read/write volume's host directory before a sandbox
uses it. pytest clears the set-id bits a sandbox leaves there when the sandbox ends (a root
sandbox's files are root's: a set-user-ID root program in a directory other users reach); if
pytest dies first, the keeper clears them once the session's sandboxes are gone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterable

from ..linux import process, syscalls
from ..volumes import clear_setid_bits_at, open_top

REMOVE_FOR = 30.0  # seconds the keeper goes on trying while the last sandboxes of a dead pytest die


def start(remove: Callable[[], list[str]], keep: Iterable[int]) -> tuple[int, int]:
    """Fork the keeper; ``remove`` removes the session's cgroups and says what is left, through the fds in
    ``keep``. Returns its pid, for ``stop``, and pytest's end of its line, for ``watch``."""
    pytest_pid = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process": it runs no Python
        pid = os.fork()  # of pytest's, takes no lock and imports nothing
    if pid != 0:
        theirs.close()
        return pid, ours.detach()  # a plain fd: zygotes, forks of pytest, close it with the session's others
    try:  # a fork of pytest: nothing of pytest's may run here, and nothing may raise out of it
        _keep(pytest_pid, remove, frozenset(keep), theirs)
    finally:
        os._exit(0)


def watch(line: socket.socket, top: str) -> None:
    """Hand the keeper ``top`` (a read/write volume's directory or file, on the host) to clear if pytest dies."""
    fd = open_top(top)
    if fd is None:  # gone, or a symlink on its path: its sandbox is refused that volume
        return
    with contextlib.suppress(OSError):  # a keeper gone: nobody to tell
        socket.send_fds(line, [os.fsencode(top)], [fd])
    os.close(fd)


def stop(pid: int) -> None:
    """pytest removed its cgroups itself: the keeper has nothing left to do."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _keep(pytest_pid: int, remove: Callable[[], list[str]], keep: frozenset[int], line: socket.socket) -> None:
    gc.disable()  # pytest's objects are never collected here: none closes an fd number that is ours now
    gc.freeze()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)  # a signal to pytest's process group is for pytest to handle
    pidfd = -1
    with contextlib.suppress(OSError):
        pidfd = os.pidfd_open(pytest_pid)
    process.close_fds_but({*keep, pidfd, line.fileno(), 2})  # pytest's sockets and pipes wait for pytest's end
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    syscalls.set_process_name("sandbox-cgroups")
    watched: dict[bytes, int] = {}  # a read/write volume's host path -> an O_PATH fd of it
    if pidfd >= 0 and os.getppid() == pytest_pid:  # else pytest is gone already
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        poll.register(line, select.POLLIN)
        while not any(fd == pidfd for fd, _ in poll.poll()):
            if not _receive(line, watched):  # pytest closed its end (it is ending): its pidfd only
                poll.unregister(line)
        line.setblocking(False)
        while _receive(line, watched):  # what pytest sent just before it died
            pass
    deadline = time.monotonic() + REMOVE_FOR
    while (left := remove()) and time.monotonic() < deadline:
        time.sleep(0.1)
    say_left(left)
    cleared = []
    for name, fd in watched.items():  # the sandboxes are gone (or REMOVE_FOR has passed)
        with contextlib.suppress(OSError):
            cleared.extend(clear_setid_bits_at(fd, os.fsdecode(name)))
    if cleared:  # repr: a name may hold a line break or bytes that are not UTF-8
        with contextlib.suppress(OSError):
            named = " ".join(repr(path) for path in cleared)
            os.write(2, f"pytest-sandbox: set-id bits cleared after pytest died: {named}\n".encode())


def _receive(line: socket.socket, watched: dict[bytes, int]) -> bool:
    """One volume's path and fd from pytest into ``watched``; False when there is none (line closed, or
    nothing yet)."""
    try:
        message, fds, _, _ = socket.recv_fds(line, 4096, 1)
    except OSError:
        return False
    for fd in fds:
        if message in watched:
            os.close(fd)
        else:
            watched[message] = fd
    return bool(message)


def say_left(left: list[str]) -> None:
    """Name on stderr the cgroups a dead pytest's cleanup could not remove (nothing when there are none)."""
    if left:
        with contextlib.suppress(OSError):
            os.write(2, f"pytest-sandbox: cgroups left behind: {'; '.join(left)}\n".encode())
