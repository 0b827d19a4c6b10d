"""What a test leaves in its scope sandbox besides files, ended before the next test.

Tests of a scope sandbox share its namespaces: a process, a System V IPC object or a key that one
test leaves would be the next one's. Taken in the scope process before each test's fork, a
snapshot says what was the scope's (the fixtures'); whatever is new after the test is removed.
The scope process is a child subreaper, so every process the test started, daemonized or not, is
its child once the test's fork has exited; one that exits while the test still runs is reaped at once,
as init would (a test waiting for its grandchild to be gone, as psutil's ``wait()`` does, would
otherwise wait for its zombie until the test ends). POSIX message queues live in an mqueue filesystem only
the layer helper can mount: it ends those (test_layers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

from ..linux import process, syscalls

SYSV_KINDS = ("shm", "sem", "msg")
REAP_INTERVAL = 0.01  # seconds between looks for exited orphans while a test runs
KEYRINGS = (syscalls.KEY_SPEC_USER_KEYRING, syscalls.KEY_SPEC_USER_SESSION_KEYRING)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    children: frozenset[int]
    sysv: frozenset[tuple[str, int]]
    keys: frozenset[tuple[int, int]]  # (keyring, key)


def take() -> Snapshot:
    return Snapshot(_children(), _sysv_objects(), _keys())


def end(before: Snapshot, besides: frozenset[int] = frozenset()) -> None:
    """Kill the test's processes (and the children they leave in turn) but ``besides`` (the next test's
    fork, made meanwhile), then remove its IPC objects and keys."""
    end_children(besides=before.children | besides)
    for kind, ident in _sysv_objects() - before.sysv:
        with contextlib.suppress(OSError):
            syscalls.remove_sysv_ipc(kind, ident)
    for keyring, key in _keys() - before.keys:
        with contextlib.suppress(OSError):
            syscalls.unlink_key(key, keyring)


def end_children(besides: frozenset[int]) -> None:
    """Kill every child of this process (a child subreaper) but ``besides``, and the children each leaves."""
    while True:
        left = _children() - besides
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def leaves_nothing(pid: int) -> bool:
    """Whether ``pid``, a child of this process that has been sent SIGKILL, has one thread and no child: then
    no process of it can come to this one when it ends (the kernel fails the fork of a process with SIGKILL
    pending), so it need not be waited for before what the test left is ended."""
    try:
        if os.listdir(f"/proc/{pid}/task") != [str(pid)]:
            return False
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return not f.read().strip()
    except OSError:
        return False


def reap_exited(besides: frozenset[int]) -> None:
    """Reap every orphan that has exited but ``besides`` (processes someone else waits for). An orphan is a
    child of another process group than this one's: tests run in their own (so do their descendants, unless
    they change it), while a process a fixture's thread starts here meanwhile is in this one's, and its
    Popen waits for it."""
    own_group = os.getpgid(0)
    for pid in _children() - besides:
        try:
            fields = process.stat_fields(pid)
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[2]) != own_group:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _children() -> frozenset[int]:
    """This process's children: its threads' child lists (a short read each, where a scan of /proc reads the
    stat file of every process of the sandbox), or that scan where the kernel keeps no such lists. A list
    read while another of this process's threads reaps a child of its own may skip a child (the kernel
    finds the next entry by its index then): two reads in a row must agree."""
    last: frozenset[int] | None = None
    for _ in range(_LIST_READS):
        listed = _listed_children()
        if listed is None:
            break
        if listed == last:
            return listed
        last = listed
    return _children_by_scan()


_LIST_READS = 5  # reads of the child lists before a scan of /proc answers instead (children come and go)


def _listed_children() -> frozenset[int] | None:
    found = set[int]()
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                found.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            if int(tid) == os.getpid():  # the main thread's is there unless the kernel keeps none
                return None  # (another thread's goes with it, and its children to this one)
    return frozenset(found)


def _children_by_scan() -> frozenset[int]:
    me, found = os.getpid(), set[int]()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            parent = int(process.stat_fields(name)[1])
        except OSError:
            continue
        if parent == me:
            found.add(int(name))
    return frozenset(found)


def _sysv_objects() -> frozenset[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for kind in SYSV_KINDS:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found.update((kind, int(row.split()[1])) for row in rows if row.strip())
    return frozenset(found)


def _keys() -> frozenset[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    persistent = syscalls.persistent_keyring()  # the user namespace's, like the user keyrings
    for keyring in (*KEYRINGS, *([persistent] if persistent is not None else [])):
        with contextlib.suppress(OSError):
            found.update((keyring, key) for key in syscalls.keyring_keys(keyring))
    return frozenset(found)
