"""The local image store: unpacked layers keyed by ChainID, image records, build cache.

Layout under the store root (``$XDG_CACHE_HOME/pytest-sandbox`` by default)::

    layers/<chain-id>/diff/       the layer, overlay-native (0:0 whiteouts, user.overlay.opaque)
    layers/<chain-id>/layer.json  diff id, parent, size
    images/<name>.json            ordered layer chain + image config
    cache/<step-key>.json         build cache: step -> resulting chain id and config
    containers/<id>/meta.json     a kept container (``--sandbox-keep``): what shell/commit need
    containers/<id>/layer/        its read/write layer, moved there from the session's dir
    tmp/<pid>-<random>/           staging (flock-held .owner); renamed into place: nothing is half-published
    store.lock                    held while anything is published or removed

Concurrent pytest sessions and xdist workers take ``store.lock`` (a filelock) around
publishing, so a layer is built once and readers never see a partial one.
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
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ..errors import SandboxError
from ..linux.files import read_json, remove_tree, tree_size, write_json_atomic
from ..linux.mounts import filesystem_of
from .format import EMPTY_CONFIG, HOST_BASE, NAME_RE, NAME_RULE, chain_id

FORMAT_VERSION = 1  # the layout above; a store records the one it was made with in its ``format`` file
FORMAT_FILE = "format"


class StoreError(SandboxError):
    """The store refused an operation (unknown image, bad name, corrupt entry)."""


def _creatable(path: str) -> bool:
    """Whether ``path`` exists as a directory or could be made: nothing is created to find out."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def default_root() -> str:
    """``$XDG_CACHE_HOME/pytest-sandbox`` (``~/.cache/...``); where that cannot be made (a CI user
    without a home directory), ``/var/tmp/pytest-sandbox-<uid>`` (checked to be this user's own
    when the store is first used)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    preferred = os.path.join(base, "pytest-sandbox")
    if _creatable(preferred):
        return preferred
    return f"/var/tmp/pytest-sandbox-{os.getuid()}"


def check_name(name: str, where: str = "image name") -> str:
    if not NAME_RE.match(name):
        raise StoreError(f"{where} {name!r} is not valid: use {NAME_RULE}")
    return name


OWNER_FILE = ".owner"
CONTAINER_META = "meta.json"  # containers/<id>/meta.json: written by pytest, never in reach of the test
CONTAINER_LAYER = "layer"  # containers/<id>/layer: the test's read/write layer, hostile as the test was
_ID_RE = re.compile(r"[0-9a-f]{4,32}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_STALE_WITHOUT_OWNER = 3600.0  # a dir whose creator died before it could lock it


def _hold(path: str) -> int:
    """Mark ``path`` as in use for as long as this process (or a child it forks) lives.

    An flock, not a pid: pids mean nothing across the pid namespaces sandboxes make.
    """
    return _lock_owner_file(path, fcntl.LOCK_EX)


def share(path: str) -> int:
    """Mark ``path``, made if new, as in use by this process among others (xdist workers of one run): a
    shared flock on its owner file, which the store's sweep cannot take while one of them lives."""
    os.makedirs(path, exist_ok=True)
    return _lock_owner_file(path, fcntl.LOCK_SH)


def _lock_owner_file(path: str, how: int) -> int:
    fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, how)
    return fd


def _abandoned(path: str) -> bool:
    try:
        # A session's .owner sat in reach of its sandboxes: open no link, no fifo or device that blocks
        fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return time.time() - os.lstat(path).st_mtime > _STALE_WITHOUT_OWNER
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _check_id(cid: str) -> None:
    if not _ID_RE.fullmatch(cid):
        raise StoreError(f"{cid!r} is not a container id (see pytest-sandbox containers)")


def _open_own_dir(name: str, dir_fd: int | None, where: str) -> int:
    """An fd of the directory ``name`` (relative to ``dir_fd``), refused if it is a symlink or not this user's."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{where} is a symlink or not a directory (planted by a test?): refused") from None
        raise
    uid = os.fstat(fd).st_uid
    if uid != os.getuid():
        os.close(fd)
        raise StoreError(f"{where} belongs to uid {uid}, not to you: refused")
    return fd


def check_layer(layer_fd: int, host_based: bool, where: str) -> None:
    """Every directory of a read/write layer that the host mounts or reads is a directory of ours.

    A plain image's layer has ``upper``, ``work`` (and ``.empty`` for an image without layers); a FROM host
    image's has ``<top-level dir>/{upper,work}`` (and ``.empty``). Other entries are never used. What lies
    below an upper is the test's and stays as it is (a symlink there is committed as a symlink).
    """
    names = os.listdir(layer_fd)
    used = [n for n in names if n in ("upper", "work", ".empty") or (host_based and not n.startswith("."))]
    for name in used:
        fd = _open_own_dir(name, layer_fd, f"{where}: {name}")
        try:
            if host_based and name != ".empty":
                for sub in ("upper", "work"):
                    with contextlib.suppress(FileNotFoundError):
                        os.close(_open_own_dir(sub, fd, f"{where}: {name}/{sub}"))
        finally:
            os.close(fd)


def _write_json_at(dir_fd: int, name: str, data: Any) -> None:
    """A new file ``name`` in ``dir_fd`` (no symlink followed, none replaced: it must not exist)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def _read_json_at(dir_fd: int, name: str) -> Any:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Image:
    """An image record: the layer chain (lowest first) and the config a container starts with."""

    name: str
    layers: tuple[str, ...]  # chain ids, lowest first
    diff_ids: tuple[str, ...]
    config: dict[str, Any]
    source: str
    created: float
    build_key: str | None = None
    base: str = ""  # HOST_BASE: the sandbox's view of the host is the lowest layer
    origin: dict[str, str] | None = None  # pulled: the registry's manifest and config, as text (registry.py)

    @property
    def host_based(self) -> bool:
        return self.base == HOST_BASE

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "diff_ids": list(self.diff_ids),
            "config": self.config,
            "source": self.source,
            "created": self.created,
            "build_key": self.build_key,
            "base": self.base,
            **({"origin": self.origin} if self.origin else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        config = dict(EMPTY_CONFIG)
        config.update(data.get("config") or {})
        return cls(
            name=data["name"],
            layers=tuple(data["layers"]),
            diff_ids=tuple(data["diff_ids"]),
            config=config,
            source=data.get("source", ""),
            created=data.get("created", 0.0),
            build_key=data.get("build_key"),
            base=data.get("base", ""),
            origin=data.get("origin") if isinstance(data.get("origin"), dict) else None,
        )


class Store:
    """One store root. Cheap to create; directories are made on first use."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.layers_dir = os.path.join(self.root, "layers")
        self.images_dir = os.path.join(self.root, "images")
        self.cache_dir = os.path.join(self.root, "cache")
        self.containers_dir = os.path.join(self.root, "containers")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self._ready = False

    # -- setup ---------------------------------------------------------------------------
    def ensure(self) -> Store:
        if self._ready:
            return self
        try:
            for d in (self.root, self.layers_dir, self.images_dir, self.cache_dir, self.containers_dir, self.tmp_dir):
                os.makedirs(d, mode=0o755, exist_ok=True)
            os.chmod(self.tmp_dir, 0o700)
            shared = self.root.startswith("/var/tmp/")
            st = os.lstat(self.root) if shared else os.stat(self.root)
            if shared and (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()):  # never another's there
                raise StoreError(
                    f"the image store {self.root} belongs to uid {st.st_uid}, not to you "
                    "(set --sandbox-store, the sandbox_store ini key or PYTEST_SANDBOX_STORE)"
                )
        except OSError as exc:
            raise StoreError(
                f"cannot create the image store at {self.root}: {exc.strerror} "
                "(set --sandbox-store, the sandbox_store ini key or PYTEST_SANDBOX_STORE)"
            ) from None
        self._ready = True
        if not os.path.exists(os.path.join(self.root, FORMAT_FILE)):
            with contextlib.suppress(OSError):  # a store shared read-only still works
                write_json_atomic(os.path.join(self.root, FORMAT_FILE), FORMAT_VERSION)
                os.chmod(os.path.join(self.root, FORMAT_FILE), 0o644)
        self._remove_stale_staging()
        return self

    def format_version(self) -> int | None:
        """The layout version the store was made with (None: no store there yet, or made before it was recorded)."""
        try:
            value = read_json(os.path.join(self.root, FORMAT_FILE))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, int) else None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive store lock: publishing, removing and pruning happen under it."""
        import filelock  # here: its import is a few ms of every pytest start, and most runs never lock

        self.ensure()
        with filelock.FileLock(os.path.join(self.root, "store.lock")):
            yield

    def _remove_stale_staging(self) -> None:
        """Staging dirs nobody holds any more (a build killed with -9, a killed session) are debris."""
        for entry in os.listdir(self.tmp_dir):
            if _abandoned(os.path.join(self.tmp_dir, entry)):
                remove_tree(os.path.join(self.tmp_dir, entry))
        for entry in os.listdir(self.containers_dir):
            if entry.startswith(".session-") and _abandoned(os.path.join(self.containers_dir, entry)):
                remove_tree(os.path.join(self.containers_dir, entry))

    def filesystem(self) -> str:
        """The type of the filesystem holding the store (from mountinfo: the deepest mount above it)."""
        return filesystem_of(self.ensure().root)

    # -- kept containers (--sandbox-keep) ----------------------------------------------------
    def session_containers(self, pid: int) -> str:
        """Where one pytest session's image tests put their read/write layers; removed at its end."""
        path = os.path.join(self.ensure().containers_dir, f".session-{pid}")
        os.makedirs(path, exist_ok=True)
        _hold(path)  # held by pytest and the zygote it forks, until both are gone
        return path

    def keep_container(self, session_fd: int, cid: str, image: Image, nodeid: str, hostname: str) -> None:
        """A failed test's read/write layer (``cid`` in the session dir ``session_fd``, opened before any test
        ran) becomes the kept container ``cid``: ``containers/<cid>/layer``, with what ``shell``, ``commit`` and
        ``prune`` need in ``containers/<cid>/meta.json`` beside it, a file the test never could reach.

        The id and the layer come from the sandbox: the id must be one, the layer a directory of ours (no
        symlink, at any level the host later uses), or nothing is kept."""
        _check_id(cid)
        meta = {
            "id": cid,
            "nodeid": nodeid,
            "image": image.name,
            "layers": list(image.layers),
            "config": image.config,
            "hostname": hostname,
            "created": time.time(),
            "base": image.base,
        }
        where = f"the read/write layer {cid}"
        layer_fd = _open_own_dir(cid, session_fd, where)
        try:
            check_layer(layer_fd, image.host_based, where)
            layer_st = os.fstat(layer_fd)
        finally:
            os.close(layer_fd)
        _strip_privileges(os.path.join(self.session_dir_path(session_fd), cid))
        containers_fd = _open_own_dir(self.ensure().containers_dir, None, self.containers_dir)
        try:
            os.mkdir(cid, 0o755, dir_fd=containers_fd)  # EEXIST: an id of a container kept before
            box_fd = _open_own_dir(cid, containers_fd, f"kept container {cid}")
            try:
                _write_json_at(box_fd, CONTAINER_META, meta)
                os.rename(cid, CONTAINER_LAYER, src_dir_fd=session_fd, dst_dir_fd=box_fd)
                moved = os.stat(CONTAINER_LAYER, dir_fd=box_fd, follow_symlinks=False)
                if (moved.st_dev, moved.st_ino) != (layer_st.st_dev, layer_st.st_ino):
                    raise StoreError(f"{where} changed while it was kept")
            except BaseException:
                os.close(box_fd)
                box_fd = -1
                remove_tree(os.path.join(self.containers_dir, cid))
                raise
            finally:
                if box_fd >= 0:
                    os.close(box_fd)
        finally:
            os.close(containers_fd)

    @staticmethod
    def session_dir_path(session_fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{session_fd}")

    def container(self, cid: str) -> dict[str, Any]:
        """A kept container's metadata; ``path`` is its read/write layer (not checked: see ``checked_container``)."""
        _check_id(cid)
        box = os.path.join(self.containers_dir, cid)
        try:
            box_fd = _open_own_dir(box, None, f"kept container {cid}")
        except FileNotFoundError:
            raise StoreError(f"no kept container {cid!r} in {self.containers_dir}") from None
        try:
            meta = dict(_read_json_at(box_fd, CONTAINER_META))
        except (OSError, ValueError):
            raise StoreError(
                f"kept container {cid!r} has no readable {CONTAINER_META} (kept by an older pytest-sandbox?): "
                f"remove it with pytest-sandbox containers rm {cid}"
            ) from None
        finally:
            os.close(box_fd)
        meta["path"] = os.path.join(box, CONTAINER_LAYER)
        return meta

    def checked_container(self, cid: str) -> dict[str, Any]:
        """A kept container whose layer may be mounted or read: every directory of it the host uses is a
        directory of ours, never a symlink (a failed test left that layer behind; it may have planted some)."""
        meta = self.container(cid)
        where = f"kept container {cid}"
        fd = _open_own_dir(meta["path"], None, f"{where}: {CONTAINER_LAYER}")
        try:
            check_layer(fd, meta.get("base") == HOST_BASE, where)
        finally:
            os.close(fd)
        return meta

    def container_ids(self) -> list[str]:
        """Every kept container, also those whose metadata is unreadable."""
        self.ensure()
        return sorted(e for e in os.listdir(self.containers_dir) if not e.startswith(".") and _ID_RE.fullmatch(e))

    def containers(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.container_ids():
            with contextlib.suppress(StoreError):
                out.append(self.container(entry))
        return out

    def remove_container(self, cid: str) -> None:
        """Remove the whole ``containers/<cid>``: rmtree follows no symlink in it (one there is unlinked)."""
        _check_id(cid)
        path = os.path.join(self.containers_dir, cid)
        if not os.path.lexists(path):
            raise StoreError(f"no kept container {cid!r} in {self.containers_dir}")
        remove_tree(path)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A private directory on the store's filesystem, removed afterwards whatever happens."""
        self.ensure()
        path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp_dir)
        owner = _hold(path)
        try:
            yield path
        finally:
            remove_tree(path)
            os.close(owner)

    # -- layers --------------------------------------------------------------------------
    def layer_path(self, chain: str) -> str:
        return os.path.join(self.layers_dir, chain.split(":", 1)[-1])

    def diff_path(self, chain: str) -> str:
        return os.path.join(self.layer_path(chain), "diff")

    def has_layer(self, chain: str) -> bool:
        return os.path.isfile(os.path.join(self.layer_path(chain), "layer.json"))

    def layer_info(self, chain: str) -> dict[str, Any]:
        return dict(read_json(os.path.join(self.layer_path(chain), "layer.json")))

    def publish_layer(
        self, staged_diff: str, chain: str, diff_id: str, parent: str | None, extra: dict[str, Any] | None = None
    ) -> str:
        """Move a finished diff dir into the store under ``chain`` (caller holds the lock)."""
        if self.has_layer(chain):
            return chain  # someone else published the same content first
        holder = tempfile.mkdtemp(prefix=f"{os.getpid()}-layer-", dir=self.tmp_dir)
        os.rename(staged_diff, os.path.join(holder, "diff"))
        os.chmod(holder, 0o755)
        info = {
            "chain_id": chain,
            "diff_id": diff_id,
            "parent": parent,
            "created": time.time(),
            "size": tree_size(os.path.join(holder, "diff")),
        }
        info.update(extra or {})
        write_json_atomic(os.path.join(holder, "layer.json"), info)
        final = self.layer_path(chain)
        if os.path.lexists(final):  # a leftover without layer.json: never published, replace it
            remove_tree(final)
        os.rename(holder, final)
        return chain

    def stack_layer(self, diff: str, diff_id: str, parent: str | None, created_by: str) -> str:
        """Publish the finished diff dir ``diff`` (whose tar has ``diff_id``) on top of ``parent``; its chain id."""
        chain = chain_id(parent, diff_id)
        self.publish_layer(diff, chain, diff_id, parent, {"created_by": created_by})
        return chain

    def all_layers(self) -> list[str]:
        self.ensure()
        out = []
        for entry in os.listdir(self.layers_dir):
            if os.path.isfile(os.path.join(self.layers_dir, entry, "layer.json")):
                out.append("sha256:" + entry)
        return out

    # -- images --------------------------------------------------------------------------
    def _image_file(self, name: str) -> str:
        return os.path.join(self.images_dir, check_name(name) + ".json")

    def get(self, name: str) -> Image | None:
        path = self._image_file(name)
        try:
            image = Image.from_json(read_json(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"image record {path} is unreadable: {exc}") from None
        missing = [c for c in image.layers if not self.has_layer(c)]
        if missing:
            return None  # a layer was removed behind its back: treat as absent, rebuild/re-import
        return image

    def require(self, name: str) -> Image:
        image = self.get(name)
        if image is None:
            known = ", ".join(i.name for i in self.images()) or "none"
            raise StoreError(f"no image {name!r} in the store {self.root} (images there: {known})")
        return image

    def put(self, image: Image) -> None:
        """Record an image (caller holds the lock; its layers are already published)."""
        self.ensure()
        for chain in image.layers:
            if not self.has_layer(chain):
                raise StoreError(f"image {image.name}: layer {chain} is not in the store")
        write_json_atomic(self._image_file(image.name), image.to_json())

    def images(self) -> list[Image]:
        self.ensure()
        out = []
        for entry in sorted(os.listdir(self.images_dir)):
            if entry.endswith(".json") and not entry.startswith("."):
                with contextlib.suppress(StoreError):
                    image = self.get(entry[:-5])
                    if image is not None:
                        out.append(image)
        return out

    def remove_image(self, name: str) -> None:
        with self.locked():
            path = self._image_file(name)
            if not os.path.exists(path):
                raise StoreError(f"no image {name!r} in the store {self.root}")
            os.unlink(path)

    # -- build cache ---------------------------------------------------------------------
    def cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = dict(read_json(os.path.join(self.cache_dir, key + ".json")))
        except (OSError, ValueError):
            return None
        if any(not self.has_layer(c) for c in entry.get("layers", [])):
            return None
        return entry

    def cache_put(self, key: str, entry: dict[str, Any]) -> None:
        write_json_atomic(os.path.join(self.cache_dir, key + ".json"), entry)

    # -- housekeeping --------------------------------------------------------------------
    def prune(self) -> tuple[list[str], int]:
        """Remove layers no image or kept container uses, cache entries pointing at them, and stale staging."""
        with self.locked():
            used = {c for image in self.images() for c in image.layers}
            used |= {c for kept in self.containers() for c in kept.get("layers", [])}  # shell/commit need them
            removed, freed = [], 0
            for chain in self.all_layers():
                if chain not in used:
                    path = self.layer_path(chain)
                    freed += tree_size(path)
                    remove_tree(path)
                    removed.append(chain)
            for entry in os.listdir(self.layers_dir):  # debris without layer.json
                path = os.path.join(self.layers_dir, entry)
                if not os.path.isfile(os.path.join(path, "layer.json")):
                    remove_tree(path)
            for entry in os.listdir(self.cache_dir):
                if entry.endswith(".json") and self.cache_get(entry[:-5]) is None:
                    os.unlink(os.path.join(self.cache_dir, entry))
            self._remove_stale_staging()
            return removed, freed


def _strip_privileges(layer: str) -> None:
    """No setuid/setgid bit and no file capability in a kept layer: a test that owns its files (root's does)
    may set them, and a kept layer lies on the host's disk, where they would mean something.

    Runs once every process of the sandbox is gone, so nothing changes the tree under the walk; it never
    follows a symlink (``os.walk`` does not, and only regular files are changed).
    """
    for path, _dirs, files in os.walk(layer):
        for name in files:
            full = os.path.join(path, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(full, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            with contextlib.suppress(OSError):
                os.removexattr(full, "security.capability", follow_symlinks=False)
