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


def clear_setid_bits(top: str) -> list[str]:
    """Walk ``top`` without following symlinks (by fds: nothing is looked up by path twice) and clear the
    set-user-ID and set-group-ID bits of regular files."""
    try:
        fd = os.open(top, _DIRECTORY)
    except OSError:
        return []  # a file volume, or gone
    return clear_setid_bits_at(fd, top)


def clear_setid_bits_at(fd: int, top: str) -> list[str]:
    """clear_setid_bits in the directory open at ``fd`` (closed here); ``top`` names it in what is returned.

    A test shapes the tree: thousands of sibling directories, or a chain thousands deep, must not run the
    walk out of fds and leave a directory unvisited. So it holds fds only along one path, at most
    _OPEN_LEVELS deep; a directory deeper than that, or one it could not open for want of fds, is walked
    later from ``top`` down, one name at a time, when the fds above it are closed again."""
    changed: list[str] = []
    later: list[tuple[str, ...]] = [()]  # directories to walk, as names below top
    try:
        while later:
            names = later.pop()
            start = _open_below(fd, names)
            if start is not None:
                _clear_tree(start, names, top, changed, later)
    finally:
        os.close(fd)
    return changed


_OPEN_LEVELS = 64  # directories a walk holds open at once (two fds each: the directory and its listing)


def _open_below(fd: int, names: tuple[str, ...]) -> int | None:
    """The directory at ``names`` below ``fd``, opened one name at a time without following symlinks."""
    current = os.dup(fd)
    for name in names:
        try:
            below = os.open(name, _DIRECTORY, dir_fd=current)
        except OSError:
            os.close(current)
            return None
        os.close(current)
        current = below
    return current


def _clear_tree(start: int, names: tuple[str, ...], top: str, changed: list[str], later: list[tuple[str, ...]]) -> None:
    stack: list[tuple[int, tuple[str, ...], Iterator[os.DirEntry[str]]]] = []
    try:
        stack.append((start, names, os.scandir(start)))
    except OSError:
        os.close(start)
        return
    try:
        while stack:
            dir_fd, where, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                entries.close()  # type: ignore[attr-defined]
                os.close(dir_fd)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                below = (*where, entry.name)
                if len(stack) >= _OPEN_LEVELS:
                    later.append(below)
                    continue
                opened = _open_listing(dir_fd, entry.name)
                if opened is None:
                    later.append(below)  # out of fds, or gone (then it is not found later either)
                else:
                    stack.append((opened[0], below, opened[1]))
            elif stat.S_ISREG(st.st_mode) and st.st_mode & SETID:
                with contextlib.suppress(OSError):
                    file_fd = os.open(entry.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:  # chmod through the fd's /proc link: the file opened, not a name
                        os.chmod(f"/proc/self/fd/{file_fd}", stat.S_IMODE(os.fstat(file_fd).st_mode) & ~SETID)
                    finally:
                        os.close(file_fd)
                    changed.append(os.path.join(top, *where, entry.name))
    finally:
        for dir_fd, _where, entries in stack:
            entries.close()  # type: ignore[attr-defined]
            os.close(dir_fd)


def _open_listing(dir_fd: int, name: str) -> tuple[int, Iterator[os.DirEntry[str]]] | None:
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return fd, os.scandir(fd)
    except OSError:
        os.close(fd)
        return None


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
