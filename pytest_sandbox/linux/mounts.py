"""Mount building blocks: tree clones, the mount table, /dev, tmpfs scratch places.

``mknod`` is refused in a user namespace, so a /dev is host device nodes bound onto
a small tmpfs. Tree clones are ``open_tree`` fds: detached copies that can be
prepared first and attached later, after what they came from is covered.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

from . import syscalls

SCRATCH_PLACES = ("/tmp", "/var/tmp", "/run")  # a fresh empty tmpfs in every sandbox
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
TMPFS_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV


def clone_tree(path: str, recursive: bool = True) -> int:
    """A detached copy of the mount at ``path`` (with what is mounted below it when ``recursive``)."""
    flags = syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC | (syscalls.AT_RECURSIVE if recursive else 0)
    return syscalls.open_tree(path, flags)


def clone_tree_at(fd: int, recursive: bool = True) -> int:
    """``clone_tree`` of what the O_PATH fd ``fd`` opens: no path looked up again."""
    flags = syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC | syscalls.AT_EMPTY_PATH
    return syscalls.open_tree("", flags | (syscalls.AT_RECURSIVE if recursive else 0), fd)


def read_only_view(fd: int) -> int:
    """A read-only clone of the mount whose root ``fd`` opens, without what is mounted below it: reading
    through it is all its holder can do."""
    view = clone_tree_at(fd, recursive=False)
    read_only(view, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC)
    return view


def attach(fd: int, target: str, is_dir: bool = True) -> None:
    """Attach the detached mount ``fd`` at ``target`` (made if missing) and close it."""
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    syscalls.move_mount(fd, target)
    os.close(fd)


def read_only(fd: int, extra: int = 0) -> None:
    """Make a detached tree read-only and nosuid, recursively (plus ``extra`` MOUNT_ATTR_* flags)."""
    syscalls.mount_setattr(fd, syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | extra)


def cover_with_text(target: str, text: str, staging: str = "/run") -> None:
    """Cover the file ``target`` with a read-only file holding ``text``, on a tiny tmpfs of its own (a pod
    sandbox's /etc/hosts: the host's is read-only and shared). The tmpfs is attached for a moment under
    ``staging`` (the sandbox's own scratch tmpfs) to clone the file from it: Linux before 6.x refuses to
    clone out of a detached mount."""
    context = syscalls.fsopen("tmpfs")
    try:
        syscalls.fsconfig(context, "size", str(max(4096, 2 * len(text.encode()))))
        syscalls.fsconfig(context, "mode", "0755")
        tmpfs = syscalls.fsmount(context)
    finally:
        os.close(context)
    try:
        fd = os.open("file", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=tmpfs)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        place = tempfile.mkdtemp(prefix=".sandbox-staging-", dir=staging)
        try:
            syscalls.move_mount(tmpfs, place)
            try:
                tree = clone_tree(f"{place}/file", recursive=False)
            finally:
                syscalls.umount2(place, syscalls.MNT_DETACH)
        finally:
            os.rmdir(place)
    finally:
        os.close(tmpfs)
    read_only(tree, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC)
    syscalls.move_mount(tree, target)
    os.close(tree)


def bind_read_only(path: str) -> None:
    """Cover ``path`` (a file or a directory tree) with a read-only bind of itself."""
    fd = clone_tree(path)
    read_only(fd, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC)
    attach(fd, path, os.path.isdir(path))


def mask(path: str) -> None:
    """Hide what ``path`` holds: an empty read-only tmpfs over a directory, an empty file over a file."""
    if os.path.isdir(path):
        syscalls.mount(
            "sandbox-masked", path, "tmpfs", TMPFS_FLAGS | syscalls.MS_NOEXEC | syscalls.MS_RDONLY, "mode=0000,size=4k"
        )
        return
    fd = clone_tree("/dev/null", recursive=False)
    read_only(fd, syscalls.MOUNT_ATTR_NOEXEC)
    attach(fd, path, is_dir=False)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, backslash as \040 ...


@dataclasses.dataclass(frozen=True)
class MountPoint:
    target: str
    fstype: str
    options: str = ""  # the superblock's options (a v1 cgroup hierarchy names its controllers here)


def mount_table(path: str = "/proc/self/mountinfo") -> list[MountPoint]:
    """This mount namespace's mounts, from ``/proc/self/mountinfo`` (octal escapes decoded).

    ``path`` is another file in mountinfo format: tests feed it sample lines.
    """
    found = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            target = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            sep = fields.index("-")
            found.append(MountPoint(target, fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""))
    return found


def is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def mounts_under(path: str) -> list[str]:
    """Mount points strictly below ``path``.

    Without root such mounts are locked and overlayfs refuses a lower dir holding them
    (it would reveal what they cover): /etc of a container with bind-mounted /etc/hosts.
    """
    prefix = path.rstrip("/") + "/"
    return [m.target for m in mount_table() if m.target.startswith(prefix)]


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding ``path``: that of the deepest mount above it."""
    path = os.path.realpath(path)
    best = MountPoint("", "")
    for mount in mount_table():
        if is_under(path, mount.target) and len(mount.target) >= len(best.target):
            best = mount
    return best.fstype


def on_overlayfs(path: str) -> bool:
    """Whether ``path`` lies on overlayfs: one more overlay over it may pass the kernel's stacking limit."""
    return filesystem_of(path) == "overlay"


def default_scratch_size() -> int:
    """A quarter of the machine's RAM: each tmpfs a sandbox writes to is bounded, so a test cannot fill
    host memory through one (plain pytest would have filled the disk)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError):
        pass
    return 1 << 30


def mount_tmpfs(
    target: str, mode: str, name: str = "sandbox-tmp", flags: int = TMPFS_FLAGS, size: int | None = None
) -> None:
    options = f"mode={mode}" + (f",size={size}" if size else "")
    syscalls.mount(name, target, "tmpfs", flags, options)


def mount_scratch_places(root: str = "", size: int | None = None) -> None:
    """An empty tmpfs (at most ``size`` bytes) on each scratch place that is a directory under ``root``."""
    for place in SCRATCH_PLACES:
        path = root + place
        if os.path.isdir(path) and not os.path.islink(path):
            mount_tmpfs(path, "0755" if place == "/run" else "1777", size=size)


def populate_dev(dev: str) -> None:
    """A minimal /dev on ``dev``: host device nodes bound onto a tmpfs, /dev/fd and std* links,
    empty pts and shm for ``mount_dev_instances``. ``dev`` may be /dev itself: nodes are cloned first."""
    nodes = {name: clone_tree(f"/dev/{name}", recursive=False) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    for fd in nodes.values():  # the host's inodes: no chmod/chown of them (writing to a device still works)
        read_only(fd, syscalls.MOUNT_ATTR_NOEXEC)
    syscalls.mount("sandbox-dev", dev, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in nodes.items():
        attach(fd, f"{dev}/{name}", is_dir=False)
    os.mkdir(f"{dev}/pts")
    os.mkdir(f"{dev}/shm")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")


def mount_dev_instances(dev: str, shm_size: int | None = None) -> None:
    """What each sandbox gets of its own in /dev: a private devpts and /dev/shm."""
    syscalls.mount(
        "devpts", f"{dev}/pts", "devpts", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"
    )
    mount_tmpfs(f"{dev}/shm", "1777", name="sandbox-shm", size=shm_size)


def unix_socket_paths(table: str = "/proc/net/unix") -> list[str]:
    """Paths of the unix sockets bound in this network namespace (``table`` in /proc/net/unix format).

    A network namespace does not cover filesystem sockets and connect() needs no write access to
    the mount: a socket the read-only host view shows is reachable unless something covers it.
    """
    paths = set()
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[7].startswith("/"):
                    paths.add(fields[7].rstrip("\n"))  # printed as bound: no escapes, unlike mountinfo
    except OSError:
        pass
    return sorted(paths)
