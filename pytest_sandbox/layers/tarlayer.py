"""OCI layer tars <-> overlay-native directories.

In a layer directory a deleted path is a 0:0 character device (creating one needs no
privilege since Linux 5.8) and an opaque directory carries ``user.overlay.opaque=y``:
the forms overlayfs reads with the ``userxattr`` option. Without root every file
belongs to the caller; the owner recorded in the tar is kept in
``user.pytest-sandbox.owner`` so an export gives it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from ..errors import SandboxError
from ..linux import syscalls
from ..linux.files import remove_tree
from .format import OPAQUE_MARKER, OPAQUE_XATTR, OWNER_XATTR, WHITEOUT_PREFIX, XWHITEOUT_XATTR, is_whiteout


class LayerError(SandboxError):
    """A layer tar is malformed or unsafe."""


@dataclasses.dataclass
class ApplyResult:
    skipped_devices: list[str] = dataclasses.field(default_factory=list)  # device nodes mknod refused


def clean_name(name: str) -> str:
    """A member name relative to the layer root, or LayerError for escapes."""
    parts = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"entry {name!r} leaves the layer ('..')")
        parts.append(part)
    return "/".join(parts)


def xattr_whiteouts_supported() -> bool:
    """Linux 6.8+ reads whiteouts from xattrs when a layer's filesystem refuses 0:0 devices."""
    return syscalls.kernel_at_least(6, 8)


def make_whiteout(path: str) -> None:
    """Record a deletion. Where mknod of 0:0 is refused (a store on overlayfs, as in a container's
    root), use the xattr form: an empty file marked ``user.overlay.whiteout`` in a directory whose
    ``user.overlay.opaque`` is ``x`` ("holds xattr whiteouts", unless it is opaque already)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, 0)
        return
    except PermissionError:
        if not xattr_whiteouts_supported():
            raise LayerError(
                "this store's filesystem refuses whiteout devices (overlayfs?) and Linux < 6.8 has "
                "no xattr whiteouts: put the store on another filesystem (--sandbox-store)"
            ) from None
    open(path, "wb").close()
    os.setxattr(path, XWHITEOUT_XATTR, b"y", follow_symlinks=False)
    parent = os.path.dirname(path)
    try:
        current = os.getxattr(parent, OPAQUE_XATTR)
    except OSError:
        current = b""
    if current != b"y":
        os.setxattr(parent, OPAQUE_XATTR, b"x")


def _setxattr(path: str, name: str, value: bytes) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, name, value, follow_symlinks=False)


def _remove(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)


class _Applier:
    def __init__(self, dest: str, as_root: bool) -> None:
        self.dest = os.path.realpath(dest)
        self.as_root = as_root
        self.result = ApplyResult()
        self.dir_meta: dict[str, tarfile.TarInfo] = {}

    def _parent(self, rel: str) -> str:
        """The real directory an entry goes in, created if missing, never through a symlink."""
        parent = os.path.dirname(rel)
        path = os.path.join(self.dest, parent) if parent else self.dest
        if parent:
            os.makedirs(path, mode=0o755, exist_ok=True)
            if not os.path.realpath(path).startswith(self.dest + "/"):
                raise LayerError(f"entry {rel!r} goes through a symlink out of the layer")
        return path

    def _owner(self, path: str, info: tarfile.TarInfo) -> None:
        if self.as_root:
            with contextlib.suppress(OSError):
                os.lchown(path, info.uid, info.gid)
        elif (info.uid, info.gid) != (0, 0) and not info.issym():
            _setxattr(path, OWNER_XATTR, f"{info.uid}:{info.gid}".encode())

    def apply(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = clean_name(info.name)
        if not rel:
            return
        base = os.path.basename(rel)
        parent = self._parent(rel)
        if self._apply_marker(rel, base, parent):
            return
        path = os.path.join(parent, base)
        if os.path.lexists(path) and not (info.isdir() and os.path.isdir(path) and not os.path.islink(path)):
            _remove(path)
        if info.isdir():
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.dir_meta[path] = info
            self._owner(path, info)
            return
        if not self._create(rel, path, info, tar):
            return
        self._owner(path, info)
        if not info.issym():
            os.chmod(path, info.mode & 0o7777)
        with contextlib.suppress(OSError):
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)

    @staticmethod
    def _apply_marker(rel: str, base: str, parent: str) -> bool:
        """An opaque-dir marker or a whiteout becomes its overlay-native form; True if ``base`` was one."""
        if base == OPAQUE_MARKER:
            try:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
            except OSError as exc:
                raise LayerError(
                    f"cannot mark /{os.path.dirname(rel)} opaque: the store's filesystem keeps no "
                    f"user xattrs ({exc.strerror}); put the store elsewhere (--sandbox-store)"
                ) from None
            return True
        if base.startswith(WHITEOUT_PREFIX):
            target = os.path.join(parent, base[len(WHITEOUT_PREFIX) :])
            if os.path.lexists(target):
                _remove(target)
            make_whiteout(target)
            return True
        return False

    def _create(self, rel: str, path: str, info: tarfile.TarInfo, tar: tarfile.TarFile) -> bool:
        """Make the non-directory entry at ``path``; False if it needs no owner, mode or times (skipped, hard link)."""
        if info.isreg():
            src = tar.extractfile(info)
            assert src is not None
            with open(path, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        elif info.issym():
            os.symlink(info.linkname, path)
        elif info.islnk():
            target = os.path.join(self.dest, clean_name(info.linkname))
            if not os.path.realpath(target).startswith(self.dest + "/"):
                raise LayerError(f"hard link {rel!r} points out of the layer")
            try:
                os.link(target, path)
            except FileNotFoundError:
                raise LayerError(f"hard link {rel!r} -> {info.linkname!r}: target not in this layer") from None
            return False
        elif info.isfifo():
            os.mkfifo(path)
        elif info.ischr() or info.isblk():
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            try:
                os.mknod(path, kind | (info.mode & 0o7777), os.makedev(info.devmajor, info.devminor))
            except PermissionError:
                self.result.skipped_devices.append("/" + rel)
                return False
        else:
            raise LayerError(f"entry {rel!r} has an unsupported tar type {info.type!r}")
        return True

    def finish(self) -> None:
        # Directory modes last (a read-only dir would refuse its children), deepest first.
        for path in sorted(self.dir_meta, key=lambda p: -p.count("/")):
            info = self.dir_meta[path]
            os.chmod(path, info.mode & 0o7777)
            with contextlib.suppress(OSError):
                os.utime(path, (info.mtime, info.mtime))


def apply_tar(stream: IO[bytes], dest: str, as_root: bool | None = None) -> ApplyResult:
    """Unpack one (uncompressed) layer tar stream into the empty directory ``dest``."""
    applier = _Applier(dest, os.geteuid() == 0 if as_root is None else as_root)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                applier.apply(info, tar)
    except tarfile.TarError as exc:
        raise LayerError(f"not a valid tar stream: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise LayerError(f"cannot unpack: {exc}") from None
    applier.finish()
    return applier.result


# -- directory -> tar ------------------------------------------------------------------------


def _walk(root: str, rel: str = "") -> Iterator[tuple[str, str]]:
    """(relative, absolute) paths below ``root/rel``, parents before children, names sorted."""
    for name in sorted(os.listdir(os.path.join(root, rel))):
        child_rel = f"{rel}/{name}" if rel else name
        child_abs = os.path.join(root, child_rel)
        yield child_rel, child_abs
        if stat.S_ISDIR(os.lstat(child_abs).st_mode):
            yield from _walk(root, child_rel)


def _recorded_owner(path: str, st: os.stat_result) -> tuple[int, int]:
    try:
        text = os.getxattr(path, OWNER_XATTR, follow_symlinks=False).decode()
        uid, gid = text.split(":")
        return int(uid), int(gid)
    except (OSError, ValueError):
        pass
    if os.geteuid() != 0:
        return 0, 0  # unprivileged store: the caller stands for the image's root
    return st.st_uid, st.st_gid


def write_tar(root: str, out: Any) -> None:
    """Write the layer directory ``root`` as an OCI layer tar (whiteouts back to ``.wh.`` files)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        hardlinks: dict[tuple[int, int], str] = {}
        for rel, path in _walk(root):
            st = os.lstat(path)
            if is_whiteout(path, st):
                head, base = os.path.split(rel)
                info = tarfile.TarInfo(os.path.join(head, WHITEOUT_PREFIX + base))
                info.mtime = int(st.st_mtime)
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(rel)
            info.uid, info.gid = _recorded_owner(path, st)
            info.uname = info.gname = ""
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                with contextlib.suppress(OSError):
                    if os.getxattr(path, OPAQUE_XATTR) == b"y":
                        marker = tarfile.TarInfo(f"{rel}/{OPAQUE_MARKER}")
                        marker.mtime = info.mtime
                        tar.addfile(marker)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in hardlinks:
                    info.type = tarfile.LNKTYPE
                    info.linkname = hardlinks[key]
                    tar.addfile(info)
                    continue
                hardlinks[key] = rel
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)


class HashingWriter:
    """A write-only sink that hashes (and optionally forwards) what goes through it."""

    def __init__(self, target: Any = None) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.target = target

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def diff_id_of(root: str) -> str:
    """The diff id a directory would have as an uncompressed layer tar."""
    sink = HashingWriter()
    write_tar(root, sink)
    return sink.digest


def copy_tree(source: str, dest: str) -> None:
    """Copy a layer-shaped tree (whiteouts, opaque dirs, owners) into the existing dir ``dest``."""
    with tempfile.TemporaryFile(dir=dest) as spool:
        write_tar(source, spool)
        spool.seek(0)
        apply_tar(spool, dest)
