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

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
from collections.abc import Sequence
from typing import NoReturn

from .. import protocol
from ..linux import mounts, overlay, process, syscalls
from ..linux.mounts import is_under

BEGIN, END, READY = b"b", b"e", b"ready"
ANSWER_TIMEOUT = 60.0  # seconds; the helper answers in milliseconds unless something stops it
OWN_SHM = "/dev/shm"  # a place of its own; what lies under it in the mount table is the covered scratch's


class LayerError(RuntimeError):
    """The helper could not put a test's layer in place (it says why)."""


def writable_places(overlays: Sequence[str], fresh: Sequence[str]) -> tuple[str, ...]:
    """Every place a test may write, overlays first (their index is their upper's, as outputs expect)."""
    return tuple(dict.fromkeys([*overlays, *fresh, OWN_SHM]))


def detached_layers_work() -> bool:
    """Whether this kernel builds an overlay on a detached tmpfs (newer kernels; older ones want uppers
    and lowers attached in the caller's mount namespace, where a test could reach them). Call with
    capabilities in a user namespace; nothing stays mounted."""
    try:
        tmpfs = _detached("tmpfs", mode="0700", size="65536")
    except OSError:
        return False
    try:
        for name in ("lower", "upper", "work"):
            os.mkdir(name, dir_fd=tmpfs)
        root = f"/proc/self/fd/{tmpfs}"
        os.close(overlay.detached_overlay([f"{root}/lower"], f"{root}/upper", f"{root}/work", f"{root}/merged"))
        return True
    except OSError:
        return False
    finally:
        os.close(tmpfs)


@dataclasses.dataclass
class Helper:
    """The scope process's line to its layer helper."""

    line: socket.socket
    pid: int

    def fileno(self) -> int:
        return self.line.fileno()

    def close(self) -> None:
        self.line.close()

    def ask(self, request: bytes) -> None:
        """Send a request. A test may have stopped the helper (SIGSTOP, same user); by now nothing of that
        test runs any more, so a SIGCONT makes it answer, and a helper that still does not fails the test. (In a
        Landlock domain, the hermetic session's, neither signal reaches it: EPERM.)"""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGCONT)
        self.line.sendall(request)


@dataclasses.dataclass(frozen=True)
class Inherited:
    """The hermetic session's layer helper as its pytest inherits it (session_process.py): the line's fd, the
    helper's pid, and where each declared output's writes lie in a layer's uppers (the session's order)."""

    fd: int
    pid: int
    uppers: tuple[tuple[str, str], ...]

    def to_text(self) -> str:
        return json.dumps({"fd": self.fd, "pid": self.pid, "uppers": self.uppers})

    @classmethod
    def from_text(cls, text: str) -> Inherited:
        data = json.loads(text)
        return cls(int(data["fd"]), int(data["pid"]), tuple((str(a), str(b)) for a, b in data["uppers"]))

    def helper(self) -> Helper:
        """A line of this process's own to the helper (a copy: each test process closes its own)."""
        line = socket.socket(fileno=os.dup(self.fd))
        line.settimeout(ANSWER_TIMEOUT)
        return Helper(line, self.pid)


def start_helper(places: tuple[str, ...], hidden: tuple[tuple[str, bool], ...], tmpfs_size: int | None) -> Helper:
    """Fork the helper (call with capabilities, before user code runs) and wait until it has found every
    place and built its mask layers; the line to it. ``hidden`` are the masked places (path, is a
    directory): no test layer may show what they cover."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    scope = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            if os.fork() == 0:  # not a child of the scope process: a fixture that ends every child of its
                _helper_main(theirs, places, hidden, tmpfs_size, scope)  # process (psutil's) would end it
        finally:
            os._exit(1)
    theirs.close()
    os.close(scope)
    os.waitpid(pid, 0)  # the helper's parent, gone at once: init adopts the helper
    try:
        answer = ours.recv(4096)
    except OSError as exc:
        answer = str(exc).encode()
    if not answer.startswith(READY) or not answer[len(READY) :].isdigit():
        ours.close()
        raise LayerError(answer.decode(errors="replace") or "the layer helper exited while starting")
    ours.settimeout(ANSWER_TIMEOUT)
    return Helper(ours, int(answer[len(READY) :]))


def begin(helper: Helper) -> int:
    """Mount the next test's layer; an fd of the tmpfs holding its uppers (``<index>/upper``)."""
    try:
        helper.ask(BEGIN)
        message, fds, _, _ = socket.recv_fds(helper.line, 4096, 1)
    except OSError as exc:
        raise LayerError(f"the layer helper is gone ({exc})") from None
    if message != b"ok" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise LayerError(message.decode(errors="replace") or "the layer helper is gone")
    return fds[0]


def end(helper: Helper) -> None:
    """Take the test's layer off: the scope's view is back, as the fixtures left it."""
    try:
        helper.ask(END)
        answer = helper.line.recv(4096)
    except OSError as exc:
        raise LayerError(f"the layer helper is gone ({exc})") from None
    if answer != b"ok":
        raise LayerError(answer.decode(errors="replace") or "the layer helper is gone")


def _helper_main(
    control: socket.socket,
    places: tuple[str, ...],
    hidden: tuple[tuple[str, bool], ...],
    tmpfs_size: int | None,
    scope: int,
) -> NoReturn:
    """The helper's life; ``scope`` is a pidfd of the scope process: the helper ends when it does."""
    process.become_helper("sandbox-layers", None, keep=(control.fileno(), scope))
    # Everything it mounts on is found now, before any user code runs: later, only through these fds.
    try:
        layer = _Layer(places, hidden, tmpfs_size)
    except OSError as exc:
        with contextlib.suppress(OSError):
            control.sendall(f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(1)
    control.sendall(READY + str(os.getpid()).encode())
    with contextlib.suppress(OSError):  # else the first test's begin builds it, and says what went wrong
        layer.build()
    while True:
        try:
            if scope in select.select([control.fileno(), scope], [], [])[0]:
                os._exit(0)
            request = control.recv(1)
        except OSError:
            os._exit(0)
        if not request:
            os._exit(0)
        try:
            if request == BEGIN:
                fd = layer.mount()
                try:
                    protocol.send_with_fds(control, b"ok", (fd,))  # waits out a flood of fds in flight
                finally:
                    os.close(fd)
                with contextlib.suppress(OSError):  # the next test's, while this one runs (else at its begin)
                    layer.build()
            elif request == END:
                layer.unmount()
                control.sendall(b"ok")
                layer.release()
                with contextlib.suppress(OSError):  # else the next begin builds it, and says what went wrong
                    layer.build()
        except OSError as exc:
            with contextlib.suppress(OSError):
                control.sendall(f"{type(exc).__name__}: {exc}".encode()[:4000] or b"error")


_PATH = os.O_PATH | os.O_CLOEXEC
_BENEATH = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS


@dataclasses.dataclass(frozen=True)
class _Below:
    """A mount inside a writable place (a read-only host path, a mask, a volume), put back over each layer."""

    place: int  # index of the deepest place holding it
    relative: str  # its path in that place
    depth: int
    source: int  # O_PATH fd of its root, opened before any user code ran


class _Layer:
    """One test's mounts at a time, in the helper.

    Nothing of it is found by a path a test could change: each place is an fd opened at the start, the
    mounts inside places are cloned from fds opened then too and attached beneath the new overlay
    (``openat2`` without symlinks), and every mount is taken off through its own fd. What only the helper
    may touch lives on detached mounts no other process holds: the mask layers (an opaque empty
    directory or an empty file per masked place, between the test's upper and the scope's view, so the
    overlay itself never shows what a mask covers, mounted or not), each test's tmpfs of uppers, and the
    IPC namespace's message queues.
    """

    def __init__(self, places: tuple[str, ...], hidden: tuple[tuple[str, bool], ...], size: int | None):
        self.places, self.size = places, size
        self.place_fds = [os.open(place, _PATH | os.O_DIRECTORY) for place in places]
        self.outer = [self._deepest_place(place, besides=index) for index, place in enumerate(places)]
        self.below = self._mounts_below_places()
        self.masks = self._mask_layers(hidden)
        self.tops: list[int] = []  # fds of this test's mounts on the scope's view (the rest lie inside them)
        self.ahead: _Built | None = None  # the next test's layer, built ahead
        self.attached: _Built | None = None  # the test's layer, attached
        self.queues = self._message_queues()
        self.queues_before: dict[str, int] = {}

    @staticmethod
    def _message_queues() -> int | None:
        """The sandbox's POSIX message queues, as files (the IPC namespace's mqueue filesystem, detached),
        so the ones a test leaves can be removed; None where that filesystem cannot be mounted."""
        try:
            return _detached("mqueue")
        except OSError:
            return None

    def _queues_now(self) -> dict[str, int]:
        """Queue name -> inode: a queue the test removed and made again under a fixture's name is the test's."""
        assert self.queues is not None
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.queues)
        found = {}
        try:
            for name in os.listdir(listing):
                with contextlib.suppress(OSError):
                    found[name] = os.stat(name, dir_fd=listing, follow_symlinks=False).st_ino
        finally:
            os.close(listing)
        return found

    def _deepest_place(self, path: str, besides: int = -1) -> int | None:
        holders = [
            (len(place), index) for index, place in enumerate(self.places) if index != besides and is_under(path, place)
        ]
        return max(holders)[1] if holders else None

    def _mounts_below_places(self) -> list[_Below]:
        found: dict[str, _Below] = {}
        for mount in mounts.mount_table():
            target = mount.target
            index = self._deepest_place(target)
            if index is None or target in self.places or is_under(target, OWN_SHM):
                continue
            with contextlib.suppress(OSError):
                source = os.open(target, _PATH)
                if target in found:
                    os.close(found[target].source)  # stacked: the top one is what the place shows
                relative = os.path.relpath(target, self.places[index])
                found[target] = _Below(index, relative, target.count("/"), source)
        return sorted(found.values(), key=lambda below: below.depth)

    def _mask_layers(self, hidden: tuple[tuple[str, bool], ...]) -> dict[int, int]:
        """Per place with masked paths inside: a directory with an opaque empty directory or an empty file
        at each, on a tmpfs of the helper's own, to lie between the test's upper and the scope's view."""
        layers: dict[int, int] = {}
        store: int | None = None
        for index, place in enumerate(self.places):
            inside = [(path, is_dir) for path, is_dir in hidden if path != place and is_under(path, place)]
            if not inside:
                continue
            if store is None:
                store = _detached("tmpfs", mode="0700", size=str(1 << 20))
            layer = f"/proc/self/fd/{store}/{index}"
            for path, is_dir in inside:
                target = os.path.join(layer, os.path.relpath(path, place))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if is_dir:
                    os.makedirs(target, exist_ok=True)
                    os.setxattr(target, "user.overlay.opaque", b"y")
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0))
            layers[index] = os.open(layer, _PATH | os.O_DIRECTORY)  # named to overlayfs by this fd only
        if store is not None:
            syscalls.mount_setattr(store, syscalls.MOUNT_ATTR_RDONLY)
        return layers

    def build(self) -> None:
        """Build the next test's layer, detached: its tmpfs of uppers, each place's overlay over the scope's
        view of it, a clone of each mount inside the places and the read-only view of the uppers. The helper
        does this after a test's layer is off, while the scope process tears down and sets up fixtures and
        pytest reads the reports: the next test's begin only attaches. A fixture that writes a place before
        then writes the overlay's lower, which the overlay reads as it is when the test looks (nothing of the
        detached overlay is looked up before it is attached)."""
        if self.ahead is not None:
            return
        options = {"mode": "0700", **({"size": str(self.size)} if self.size else {})}
        tmpfs = _detached("tmpfs", **options)
        built = _Built(tmpfs)
        try:
            for index in range(len(self.places)):
                root = f"/proc/self/fd/{tmpfs}/{index}"
                os.makedirs(f"{root}/upper")
                os.makedirs(f"{root}/work")
                lowers = [f"/proc/self/fd/{self.place_fds[index]}"]
                if index in self.masks:
                    lowers.insert(0, f"/proc/self/fd/{self.masks[index]}")
                built.overlays[index] = overlay.detached_overlay(
                    lowers, f"{root}/upper", f"{root}/work", f"{root}/root"
                )
            for below in self.below:
                built.clones.append((below, mounts.clone_tree_at(below.source, recursive=False)))
            # The test reads its uppers for outputs, nothing more. Were it to make this view writable (its own
            # user namespace can), it would reach only its own uppers, which it writes anyway.
            built.view = mounts.read_only_view(tmpfs)
        except BaseException:
            built.close()
            raise
        self.ahead = built

    def mount(self) -> int:
        """Attach the layer built ahead (or build it now); an fd of the read-only view of its uppers, for the
        test (the helper keeps none: the next layer has a view of its own)."""
        if self.attached is not None:
            self.unmount()
            self.release()
        self.build()
        built, self.ahead = self.ahead, None
        assert built is not None
        self.attached = built
        if self.queues is not None:
            self.queues_before = self._queues_now()
        try:
            tops: dict[int, int] = {}  # place index -> its overlay in this layer
            # Shallowest first: a place's overlay, then what lies inside it (mounts, places), in it.
            for _, _, index, below, clone in sorted(
                [(place.count("/"), 0, index, None, built.overlays[index]) for index, place in enumerate(self.places)]
                + [(below.depth, 1, below.place, below, clone) for below, clone in built.clones],
                key=lambda entry: entry[:2],
            ):
                if below is None:
                    self._attach_place(index, clone, tops)
                    tops[index] = clone
                else:
                    self._attach_below(below, clone, tops)
            view, built.view = built.view, -1
            return view
        except BaseException:
            self.unmount()
            self.release()
            raise

    def _attach_place(self, index: int, fd: int, tops: dict[int, int]) -> None:
        outer = self.outer[index]
        if outer is None:
            syscalls.move_mount_onto(fd, self.place_fds[index])  # over the scope's mount of the place
            self.tops.append(fd)
            return
        # A place inside another: in that one's overlay of this layer.
        relative = os.path.relpath(self.places[index], self.places[outer])
        onto = syscalls.openat2(tops[outer], relative, _PATH | os.O_DIRECTORY, _BENEATH)
        try:
            syscalls.move_mount_onto(fd, onto)
        finally:
            os.close(onto)

    def _attach_below(self, below: _Below, clone: int, tops: dict[int, int]) -> None:
        for _ in range(3):
            try:
                target = syscalls.openat2(tops[below.place], below.relative, _PATH, _BENEATH)
            except OSError:
                return  # gone, or a symlink now, in the scope's view: the test goes without it
            try:
                syscalls.move_mount_onto(clone, target)
                return
            except FileNotFoundError:
                continue  # a fixture's process removed it since (and may have made it again): look again
            finally:
                os.close(target)
        # Removed each time it was found: the test goes without it, as if gone (a mask's place still shows
        # its mask layer; anything else there is the test's own upper over the scope's view).

    def unmount(self) -> None:
        """Take the test's layer off: its message queues, then its mounts on the scope's view, each with
        every mount inside it (a lazy unmount takes the tree: one wait for the kernel's grace period a
        place, not one a mount, which took 1-2 ms a test). What remains (closing the fds, freeing the tmpfs)
        is release's, after the scope process has its answer."""
        if self.queues is not None:
            for name, inode in self._queues_now().items():
                if self.queues_before.get(name) == inode:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.queues)
        while self.tops:
            fd = self.tops.pop()
            with contextlib.suppress(OSError):
                syscalls.umount2(f"/proc/self/fd/{fd}", syscalls.MNT_DETACH)

    def release(self) -> None:
        if self.attached is not None:
            self.attached.close()  # detached, attached nowhere: each goes with its last reference
            self.attached = None


@dataclasses.dataclass
class _Built:
    """A test's layer, built ahead: the fds the helper alone holds until the test's begin attaches them."""

    tmpfs: int
    overlays: dict[int, int] = dataclasses.field(default_factory=dict)  # place index -> its overlay
    clones: list[tuple[_Below, int]] = dataclasses.field(default_factory=list)  # each mount inside a place
    view: int = -1  # the read-only view of the uppers, until the test's begin sends it

    def close(self) -> None:
        fds = [self.view, *self.overlays.values(), *(clone for _, clone in self.clones), self.tmpfs]
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.overlays, self.clones, self.view, self.tmpfs = {}, [], -1, -1


def _detached(fstype: str, **options: str) -> int:
    """A new filesystem as a detached mount that only this process holds (no path leads to it)."""
    context = syscalls.fsopen(fstype)
    try:
        for key, value in options.items():
            syscalls.fsconfig(context, key, value)
        return syscalls.fsmount(context)
    finally:
        os.close(context)
