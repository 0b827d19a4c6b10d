"""Volumes: host directories a sandbox writes through to, so its data outlives it.

One form everywhere (marker, ini): ``{source: "target[:ro|:rw]"}``. ``source`` is a named volume
(``volume("pgdata")`` or a plain name), kept in the store under ``volumes/<name>/data`` and created on
first use, or a host path (absolute, or relative to pytest's rootdir) bound as it is.

Two sandboxes that write one named volume at once would corrupt what it holds (a database's files), so
its users are serialized: a sandbox that mounts it read/write holds an exclusive lock on it while its
test runs, read-only users a shared one; a second pytest session or xdist worker waits for its turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator

from .errors import SandboxError
from .linux import syscalls
from .linux.files import remove_tree, tree_size

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "a volume name is 1 to 128 ASCII letters, digits, '_', '.' and '-', starting with a letter or digit"
MODES = ("rw", "ro")
VOLUMES_RULE = (
    "expected a mapping of source to 'target[:ro|:rw]': source a volume name, volume('name') or a host path "
    "(absolute, or relative to the rootdir); target an absolute path, not / and not under /proc, /sys or /dev"
)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A named volume, as ``volume("pgdata")`` gives it: use it as a source in ``volumes={...}``."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid volume name {self.name!r}: {NAME_RULE}")

    def __str__(self) -> str:
        return self.name


def volume(name: str) -> Volume:
    """A named volume: kept in the store, created empty on first use, removed with ``pytest-sandbox volumes rm``."""
    return Volume(name)


def is_named(source: str) -> bool:
    """A source without a '/' (and not '.', '..' or '~...') names a volume; anything else is a host path."""
    return "/" not in source and NAME_RE.fullmatch(source) is not None


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    size: int  # bytes on disk
    created: float | None
    last_used: float | None  # when a sandbox last held it
    in_use: bool

    def as_json(self) -> dict[str, object]:
        shown = dataclasses.asdict(self)
        for key in ("created", "last_used"):
            if shown[key] is not None:
                shown[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(shown[key]))
        return shown


class VolumeError(SandboxError):
    """A volume cannot be used or removed as asked (in use, unknown, not a volume)."""


class VolumeStore:
    """The named volumes of one store root: ``<root>/volumes/<name>/{data,lock,volume.json}``."""

    def __init__(self, store_root: str) -> None:
        self.root = os.path.join(store_root, "volumes")
        # given each read/write volume's host directory before a sandbox uses it: the session's keeper,
        # which clears their set-id bits if pytest dies (runtime/cgroup_keeper.py)
        self.watcher: Callable[[str], None] | None = None

    def path(self, name: str) -> str:
        """Where a named volume's data lives (made on first use)."""
        return os.path.join(self.root, name, "data")

    def ensure(self, name: str) -> str:
        """The volume's data directory, made if new (with its record: when it was created)."""
        if not NAME_RE.fullmatch(name):
            raise VolumeError(f"invalid volume name {name!r}: {NAME_RULE}")
        home = os.path.join(self.root, name)
        data = os.path.join(home, "data")
        if not os.path.isdir(data):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(home, mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(data, 0o755)
            record = os.path.join(home, "volume.json")
            if not os.path.exists(record):
                with open(record, "w") as f:
                    json.dump({"name": name, "created": time.time()}, f)
        return data

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if NAME_RE.fullmatch(e) and os.path.isdir(os.path.join(self.root, e, "data")))

    def info(self, name: str) -> VolumeInfo:
        """Where a volume is, its size, when it was made and last used (a sandbox held it), whether in use."""
        home = self._existing(name)
        created = last_used = None
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(home, "volume.json")) as f:
                record = json.load(f)
            if isinstance(record, dict) and isinstance(record.get("created"), (int, float)):
                created = float(record["created"])
        with contextlib.suppress(OSError):
            last_used = os.stat(os.path.join(home, "lock")).st_mtime
        data = os.path.join(home, "data")
        return VolumeInfo(name, data, tree_size(data), created, last_used, self.in_use(name))

    def in_use(self, name: str) -> bool:
        try:
            with self._lock(name, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False
        except BlockingIOError:
            return True

    def remove(self, name: str) -> None:
        """Remove a volume and its data; refused while a sandbox uses it."""
        home = self._existing(name)
        try:
            with self._lock(name, fcntl.LOCK_EX | fcntl.LOCK_NB):
                remove_tree(home)  # never follows a symlink a test left in the data
        except BlockingIOError:
            raise VolumeError(
                f"volume {name} is in use by a running sandbox; try again when its test has ended"
            ) from None

    def prune(self) -> list[str]:
        """Remove every volume no sandbox uses now; returns their names."""
        removed = []
        for name in self.names():
            with contextlib.suppress(VolumeError):
                self.remove(name)
                removed.append(name)
        return removed

    @contextlib.contextmanager
    def held(self, mounts: Iterable[tuple[str, str, str]]) -> Iterator[None]:
        """Hold the named volumes of ``mounts`` (source, target, mode) while a test runs: exclusive for a
        read/write mount, shared for read-only ones; in name order, so two sessions never deadlock."""
        modes: dict[str, str] = {}
        for source, _target, mode in mounts:
            if is_named(source):
                modes[source] = "rw" if mode == "rw" or modes.get(source) == "rw" else "ro"
        with contextlib.ExitStack() as stack:
            for name in sorted(modes):
                self.ensure(name)
                stack.enter_context(self._lock(name, fcntl.LOCK_EX if modes[name] == "rw" else fcntl.LOCK_SH))
            if self.watcher is not None:  # its set-id bits are cleared even if pytest dies while it runs
                for top in self.writable_tops(mounts):
                    self.watcher(top)
            yield

    def clear_setid_bits(self, mounts: Iterable[tuple[str, str, str]]) -> list[str]:
        """After a test: clear set-user/group-ID bits it left on files of its read/write volumes (root's
        test makes root-owned files: one could be a set-user-ID root program in a directory others
        reach). Returns the files changed."""
        changed: list[str] = []
        for top in self.writable_tops(mounts):
            changed.extend(clear_setid_bits(top))
        return changed

    def writable_tops(self, mounts: Iterable[tuple[str, str, str]]) -> list[str]:
        """The host directories (or files) of the read/write volumes among ``mounts``."""
        return [
            os.path.realpath(self.path(source)) if is_named(source) else source
            for source, _target, mode in mounts
            if mode == "rw"
        ]

    def _existing(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise VolumeError(f"invalid volume name {name!r}: {NAME_RULE}")
        home = os.path.join(self.root, name)
        if not os.path.isdir(os.path.join(home, "data")) or os.path.islink(home):
            known = ", ".join(self.names()) or "none"
            raise VolumeError(f"no volume named {name} in {self.root} (volumes: {known})")
        return home

    @contextlib.contextmanager
    def _lock(self, name: str, how: int) -> Iterator[None]:
        path = os.path.join(self.root, name, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            if not how & fcntl.LOCK_NB:  # a sandbox's hold, not a check: "last used" is now
                with contextlib.suppress(OSError):
                    os.utime(fd)
            yield
        finally:
            os.close(fd)


class MountedVolumes(VolumeStore):
    """The named volumes as the hermetic session's pytest sees them: its sandbox has them mounted, and the
    supervisor made them and holds their locks and watches their set-id bits for the whole session
    (``VolumeStore.held`` around it). Nothing is left to do per test in there."""

    def ensure(self, name: str) -> str:
        return self.path(name)

    @contextlib.contextmanager
    def held(self, mounts: Iterable[tuple[str, str, str]]) -> Iterator[None]:
        yield

    def writable_tops(self, mounts: Iterable[tuple[str, str, str]]) -> list[str]:
        return []


def check_target(target: str) -> str | None:
    """Why ``target`` cannot take a volume, or None."""
    if not target.startswith("/") or "\0" in target:
        return "the target must be an absolute path"
    parts = target.split("/")
    if ".." in parts or "." in parts:
        return "the target may not contain '.' or '..'"
    normal = os.path.normpath(target)
    if normal == "/":
        return "a volume cannot cover the whole root"
    for place in ("/proc", "/sys", "/dev"):
        if normal == place or normal.startswith(place + "/"):
            return f"a volume cannot go on or under {place}"
    return None


def resolve_source(source: str, rootdir: str) -> str:
    """A host path source as the real path the sandbox binds (relative ones from the rootdir).

    Symlinks above the rootdir are the host's layout and are resolved; one inside it is refused: a test
    with a read/write volume there could have planted it to have a later run bind any host directory.
    """
    path = os.path.normpath(os.path.join(rootdir, source))
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", path)
    root = os.path.realpath(rootdir)
    real_parent = os.path.realpath(os.path.dirname(path))
    for current in _prefixes(os.path.join(real_parent, os.path.basename(path))):
        if current.startswith(root + os.sep) and os.path.islink(current):
            raise OSError(errno.ELOOP, "a symlink inside the rootdir; a volume binds real directories only", current)
    return os.path.realpath(path)


def _prefixes(path: str) -> list[str]:
    parts = path.split(os.sep)
    return [os.sep.join(parts[: i + 1]) or os.sep for i in range(1, len(parts))]


SETID = stat.S_ISUID | stat.S_ISGID


def open_top(top: str) -> int | None:
    """An ``O_PATH`` fd of a read/write volume's host path, reached from / without following any symlink:
    the path was resolved when the test was collected, and a test with a volume above it may have swapped
    a directory on it for a symlink since. None if it is not there that way."""
    try:
        return syscalls.openat2(
            syscalls.AT_FDCWD,
            top,
            os.O_PATH | os.O_CLOEXEC,
            syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS,
        )
    except OSError:
        return None


def clear_setid_bits(top: str) -> list[str]:
    """Clear the set-user-ID and set-group-ID bits of the regular files of ``top`` (a file, or a tree walked
    by fds without following symlinks: nothing is looked up by path twice); the files changed."""
    fd = open_top(top)
    return [] if fd is None else clear_setid_bits_at(fd, top)


def clear_setid_bits_at(fd: int, top: str) -> list[str]:
    """clear_setid_bits of the file or directory open at ``fd`` (any kind of open, ``O_PATH`` too; closed
    here); ``top`` names it in what is returned.

    A test shapes the tree: thousands of sibling directories, or a chain thousands deep, must not run the
    walk out of fds and leave a directory unvisited. So it holds fds only along one path, at most
    _OPEN_LEVELS deep; a directory deeper than that, or one it could not open for want of fds, is walked
    later, from a copy of its parent's fd where there is one to spare, else from ``top`` down, one name at
    a time, when the fds above it are closed again."""
    changed: list[str] = []
    later: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = []  # (a base fd or -1: top), names, from top
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_mode & SETID and _clear_file(fd, st):
                changed.append(top)
            return changed
        if not stat.S_ISDIR(st.st_mode):
            return changed
        start = _open_directory(fd, "")
        if start is None:
            return changed
        _clear_tree(start, (), top, changed, later)
        while later:
            base, names, full = later.pop()
            start = _open_below(base if base >= 0 else fd, names)
            if base >= 0:
                os.close(base)
            if start is not None:
                _clear_tree(start, full, top, changed, later)
    finally:
        os.close(fd)
        for base, _names, _full in later:
            if base >= 0:
                os.close(base)
    return changed


_OPEN_LEVELS = 64  # directories a walk holds open at once (two fds each: the directory and its listing)


def _clear_file(fd: int, st: os.stat_result) -> bool:
    """Clear the bits of the file open at ``fd``, through its /proc link: the file opened, not a name."""
    try:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) & ~SETID)
    except OSError:
        return False
    return True


def _open_below(fd: int, names: tuple[str, ...]) -> _Listing | None:
    """The directory at ``names`` below ``fd``, reached one name at a time without following symlinks (only
    the right to search each is needed) and opened for listing as _open_directory opens one."""
    current = os.dup(fd)
    for name in names:
        try:
            below = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
        except OSError:
            os.close(current)
            return None
        os.close(current)
        current = below
    try:
        return _open_directory(current, "")
    finally:
        os.close(current)


class _Listing:
    """An open directory being walked: its fd, its entries, and the mode to give it back (one its owner
    could not read or search was opened with u+rx added for the walk)."""

    def __init__(self, fd: int, restore: int | None) -> None:
        self.fd, self.restore = fd, restore
        self.entries = os.scandir(fd)

    def close(self) -> None:
        self.entries.close()
        if self.restore is not None:
            with contextlib.suppress(OSError):
                os.chmod(f"/proc/self/fd/{self.fd}", self.restore)
        os.close(self.fd)


def _open_directory(dir_fd: int, name: str) -> _Listing | None:
    """``name`` in ``dir_fd`` ("": ``dir_fd`` itself) opened for listing, without following a symlink. A
    directory of ours we may not read or search (a test's chmod 0311 to hide what is inside) is opened
    with u+rx added until the walk is done with it. None if it cannot be opened (gone, out of fds)."""
    target = f"/proc/self/fd/{dir_fd}" if not name else name
    at = None if not name else dir_fd
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if name else 0)
    restore = None
    try:
        fd = os.open(target, flags, dir_fd=at)
    except PermissionError:
        try:
            path_fd = os.open(target, os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if name else 0), dir_fd=at)
        except OSError:
            return None
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                return None
            restore = stat.S_IMODE(st.st_mode)
            os.chmod(f"/proc/self/fd/{path_fd}", restore | stat.S_IRUSR | stat.S_IXUSR)
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            if restore is not None:
                with contextlib.suppress(OSError):
                    os.chmod(f"/proc/self/fd/{path_fd}", restore)
            return None
        finally:
            os.close(path_fd)
    except OSError:
        return None
    try:
        return _Listing(fd, restore)
    except OSError:
        os.close(fd)
        return None


def _clear_tree(
    start: _Listing,
    names: tuple[str, ...],
    top: str,
    changed: list[str],
    later: list[tuple[int, tuple[str, ...], tuple[str, ...]]],
) -> None:
    stack: list[tuple[_Listing, tuple[str, ...]]] = [(start, names)]
    try:
        while stack:
            listing, where = stack[-1]
            entry = next(listing.entries, None)
            if entry is None:
                stack.pop()
                listing.close()
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                below = (*where, entry.name)
                opened = _open_directory(listing.fd, entry.name) if len(stack) < _OPEN_LEVELS else None
                if opened is not None:
                    stack.append((opened, below))
                    continue
                try:  # too deep to hold open, or out of fds: later, from a copy of this directory's fd
                    later.append((os.dup(listing.fd), (entry.name,), below))
                except OSError:
                    later.append((-1, below, below))
            elif stat.S_ISREG(st.st_mode) and st.st_mode & SETID:
                with contextlib.suppress(OSError):
                    file_fd = os.open(entry.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=listing.fd)
                    try:
                        if _clear_file(file_fd, os.fstat(file_fd)):
                            changed.append(os.path.join(top, *where, entry.name))
                    finally:
                        os.close(file_fd)
    finally:
        for listing, _where in stack:
            listing.close()
