"""Per-test layers of a scope sandbox.

At the default ``--sandbox-scope=test`` the tests of one spec share a *scope sandbox*: its test
process holds the fixtures of wider scope, and each test runs in a fork of it. What a test writes
must still vanish with it, as in a sandbox of its own, while what the fixtures wrote stays.

Mounting needs capabilities, and the test process has none once user code runs. So a helper,
forked while the sandbox is built (before any fixture or test runs), mounts a throwaway overlay
over every writable place before each test's fork (lower: the scope's view of the place; upper: a
fresh tmpfs) and takes it off after. The mounts inside those places (read-only host paths, masked
credentials, volumes) are cloned and put back on top, so the test sees the scope's view exactly.
The test process asks with one byte, begin or end: nothing a test chooses reaches a mount call.
The helper is not dumpable and holds capabilities the test lacks, so the test cannot trace it or
take its fds.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from typing import NoReturn

from ..linux import mounts, overlay, process, syscalls
from ..linux.mounts import is_under

BEGIN, END = b"b", b"e"
OWN_SHM = "/dev/shm"  # a place of its own; what lies under it in the mount table is the covered scratch's


class LayerError(RuntimeError):
    """The helper could not put a test's layer in place (it says why)."""


def writable_places(overlays: Sequence[str], fresh: Sequence[str]) -> tuple[str, ...]:
    """Every place a test may write, overlays first (their index is their upper's, as outputs expect)."""
    return tuple(dict.fromkeys([*overlays, *fresh, OWN_SHM]))


def start_helper(places: tuple[str, ...], scratch: int, tmpfs_size: int | None) -> socket.socket:
    """Fork the helper (call with capabilities, before user code runs); the line to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            _helper_main(theirs, places, scratch, tmpfs_size, parent)
        finally:
            os._exit(1)
    theirs.close()
    return ours


def begin(helper: socket.socket) -> int:
    """Mount the next test's layer; an fd of the tmpfs holding its uppers (``<index>/upper``)."""
    fds = array.array("i")
    try:
        helper.sendall(BEGIN)
        message, ancillary, _, _ = helper.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    except OSError as exc:
        raise LayerError(f"the layer helper is gone ({exc})") from None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if message != b"ok" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise LayerError(message.decode(errors="replace") or "the layer helper is gone")
    return fds[0]


def end(helper: socket.socket) -> None:
    """Take the test's layer off: the scope's view is back, as the fixtures left it."""
    try:
        helper.sendall(END)
        answer = helper.recv(4096)
    except OSError as exc:
        raise LayerError(f"the layer helper is gone ({exc})") from None
    if answer != b"ok":
        raise LayerError(answer.decode(errors="replace") or "the layer helper is gone")


def _helper_main(
    control: socket.socket, places: tuple[str, ...], scratch: int, tmpfs_size: int | None, parent: int
) -> NoReturn:
    process.die_with_parent(parent)
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    syscalls.set_process_name("sandbox-layers")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2 and int(name) not in (control.fileno(), scratch):
            with contextlib.suppress(OSError):
                os.close(int(name))
    layer = _Layer(places, f"/proc/self/fd/{scratch}/test", tmpfs_size)
    while True:
        try:
            request = control.recv(1)
        except OSError:
            os._exit(0)
        if not request:
            os._exit(0)
        try:
            if request == BEGIN:
                fd = layer.mount()
                try:
                    control.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                finally:
                    os.close(fd)
            elif request == END:
                layer.unmount()
                control.sendall(b"ok")
        except OSError as exc:
            with contextlib.suppress(OSError):
                control.sendall(f"{type(exc).__name__}: {exc}".encode()[:4000] or b"error")


class _Layer:
    """One test's mounts at a time, in the helper."""

    def __init__(self, places: tuple[str, ...], root: str, tmpfs_size: int | None) -> None:
        self.places, self.root, self.tmpfs_size = places, root, tmpfs_size
        self.attached: list[str] = []
        self.mounted = False

    def mount(self) -> int:
        if self.mounted:
            self.unmount()
        below = self._mounts_below_places()  # read before anything of ours is mounted
        os.makedirs(self.root, exist_ok=True)
        mounts.mount_tmpfs(self.root, "0700", name="sandbox-test-layer", size=self.tmpfs_size)
        self.mounted = True
        detached: list[tuple[str, bool, int]] = []
        try:
            for index, place in enumerate(self.places):
                upper, work = f"{self.root}/{index}/upper", f"{self.root}/{index}/work"
                os.makedirs(upper)
                os.makedirs(work)
                staging = f"{self.root}/{index}/root"
                detached.append((place, True, overlay.detached_overlay([place], upper, work, staging)))
            for target in below:
                try:
                    detached.append((target, os.path.isdir(target), mounts.clone_tree(target, recursive=False)))
                except FileNotFoundError:
                    continue
            # Shallowest first: a place's overlay, then what was mounted inside it.
            detached.sort(key=lambda entry: entry[0].count("/") if entry[0] != "/" else 0)
            while detached:
                target, is_dir, fd = detached.pop(0)
                mounts.attach(fd, target, is_dir)
                self.attached.append(target)
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            for _, _, fd in detached:
                os.close(fd)
            self.unmount()
            raise

    def _mounts_below_places(self) -> list[str]:
        found = []
        for mount in mounts.mount_table():
            target = mount.target
            if target in self.places or is_under(target, OWN_SHM):
                continue
            if any(is_under(target, place) for place in self.places):
                found.append(target)
        return list(dict.fromkeys(found))

    def unmount(self) -> None:
        while self.attached:
            with contextlib.suppress(OSError):
                syscalls.umount2(self.attached.pop(), syscalls.MNT_DETACH)
        if self.mounted:
            syscalls.umount2(self.root, syscalls.MNT_DETACH)
            self.mounted = False
