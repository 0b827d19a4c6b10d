"""The sandbox's mount tree.

Built in two stages so the expensive part happens once per session:

* ``enter_host_view`` (zygote, once): a private mount namespace whose root is a
  recursive read-only clone of the host ``/`` (``lowerdir=/`` is refused in a
  user namespace, and a plain bind would keep host mounts writable).
  It also gets a read-only minimal ``/dev`` (``build_dev_template``).
* ``build`` (each sandbox, after ``unshare(CLONE_NEWNS)``): fresh tmpfs on the
  scratch places, overlays with a tmpfs upper over the writable places, its own
  devpts and /dev/shm, and a ``/proc`` of the sandbox's pid namespace.

Anything the test process needs that lives under a place that gets a fresh tmpfs
(a venv under /tmp, a pytester rootdir, the cwd) is cloned out of the host view
first and put back on top of the new tmpfs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from . import _linux
from .errors import SetupError

FRESH_PLACES = ("/tmp", "/var/tmp", "/run")
SCRATCH = "/dev/shm"  # in the /dev template; never a lower, covered by the sandbox's own /dev/shm
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_TMPFS_FLAGS = _linux.MS_NOSUID | _linux.MS_NODEV


def enter_host_view(keep_writable: str = "") -> None:
    """Make the root of this (new) mount namespace a read-only view of the host.

    ``keep_writable`` (one host directory) stays writable: kept read/write layers go there.
    """
    _linux.unshare(_linux.CLONE_NEWNS)
    _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
    writable = _linux.open_tree(keep_writable, _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC) \
        if keep_writable else None
    host = _linux.open_tree("/", _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC | _linux.AT_RECURSIVE)
    _linux.mount_setattr(host, _linux.MOUNT_ATTR_RDONLY | _linux.MOUNT_ATTR_NOSUID)
    # A staging tmpfs only this namespace sees gives pivot_root a place to start from.
    _linux.mount("sandbox-stage", "/tmp", "tmpfs", _TMPFS_FLAGS, "mode=0700")
    os.mkdir("/tmp/root")
    _linux.move_mount(host, "/tmp/root")
    os.close(host)
    os.chdir("/tmp/root")
    _linux.pivot_root(".", ".")
    _linux.umount2(".", _linux.MNT_DETACH)
    os.chdir("/")
    if writable is not None:
        _linux.move_mount(writable, keep_writable)
        os.close(writable)


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _real(path: str) -> str:
    return os.path.realpath(path)


@dataclasses.dataclass(frozen=True)
class ImageMount:
    """An image as a sandbox mounts it: its layer dirs (top first) and its config.

    A ``host_based`` image (``FROM host``) has the sandbox's view of the host as its
    lowest layer: its layers go over the host's top-level directories and the test
    itself runs in it.
    """

    name: str
    lowers: tuple[str, ...]
    config_json: str  # JSON text, so the plan stays hashable
    host_based: bool = False


def image_env(image: ImageMount) -> dict[str, str]:
    """The image's ENV as a mapping."""
    import json

    from .container import env_mapping

    return env_mapping(json.loads(image.config_json).get("Env") or [])


WHITEOUT_XATTR = "user.overlay.opaque"
# Top-level host directories a FROM host image never overlays: pseudo filesystems and scratch places.
NOT_OVERLAID = ("proc", "sys", "dev", "tmp", "run", "lost+found")


def _is_whiteout(path: str) -> bool:
    from .layers.tarlayer import is_whiteout

    try:
        return is_whiteout(path)
    except OSError:
        return False


def subpath_lowers(layers_top_first: Iterable[str], path: str) -> tuple[list[str], bool]:
    """Lower dirs for an overlay on ``path`` alone: each layer's copy of it, top first.

    Whiteouts and opaque directories on the way end the search; the flag says whether
    the host's own ``path`` still shows through underneath.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    found: list[str] = []
    for layer in layers_top_first:
        hidden = False
        for depth in range(1, len(parts) + 1):
            here = os.path.join(layer, *parts[:depth])
            if _is_whiteout(here):
                return found, False
            if not os.path.isdir(here) or os.path.islink(here):
                if os.path.lexists(here):
                    return found, False  # replaced by a file or link: nothing below shows
                break
            try:
                opaque = os.getxattr(here, WHITEOUT_XATTR) == b"y"
            except OSError:
                opaque = False
            if depth == len(parts):
                found.append(here)
            if opaque:
                hidden = True
        if hidden:
            return found, False
    return found, True


def host_based_lowers(layers_top_first: Iterable[str], path: str, empty_dir: str) -> list[str]:
    """Lower dirs for a FROM host image's overlay on the host directory ``path``: its layers' copies,
    then the host's own unless the image hides it; ``empty_dir`` (made here) if the image deleted it."""
    lowers, host_shows = subpath_lowers(layers_top_first, path)
    if host_shows:
        lowers.append(path)
    if not lowers:
        os.makedirs(empty_dir, exist_ok=True)
        lowers = [empty_dir]
    return lowers


def top_level_dir(path: str) -> str:
    """``/root`` for ``/root/.cache/pytest-sandbox``: the top-level directory a path lies in."""
    return "/" + os.path.realpath(path).strip("/").split("/")[0]


def mounts_under(path: str) -> list[str]:
    """Mount points strictly below ``path`` in this mount namespace.

    Without root such mounts are locked and overlayfs refuses a lower dir holding them
    (it would reveal what they cover): /etc of a container with bind-mounted /etc/hosts.
    """
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(target)
    return found


def image_top_dirs(layers_top_first: Iterable[str]) -> list[str]:
    """The top-level directories a FROM host image's layers change, as absolute paths."""
    names: set[str] = set()
    for layer in layers_top_first:
        names.update(os.listdir(layer))
    return sorted(f"/{n}" for n in names if n not in NOT_OVERLAID)


@dataclasses.dataclass(frozen=True)
class RootPlan:
    """What one sandbox mounts, computed once per spec in the zygote."""

    overlays: tuple[str, ...]  # writable places: overlay with an ephemeral upper, shallowest first
    visible: tuple[str, ...]   # host paths re-exposed read-only on top of a fresh tmpfs
    fresh: tuple[str, ...]     # places that get an empty tmpfs
    image: ImageMount | None = None
    image_root: str = ""       # where the image's root is mounted in the test's view
    image_dirs: tuple[str, ...] = ()  # FROM host: the top-level directories its layers change


def make_plan(writable: Iterable[str], needed: Iterable[str], image: ImageMount | None = None) -> RootPlan:
    """Decide the mounts: ``writable`` become overlays, ``needed`` must stay visible."""
    fresh = tuple(p for p in FRESH_PLACES if os.path.isdir(p) and not os.path.islink(p))
    overlays = sorted({_real(p) for p in writable if os.path.isdir(p) and _real(p) != "/"},
                      key=lambda p: (p.count("/"), p))
    visible: set[str] = set()
    for path in needed:
        if not os.path.exists(path):
            continue
        real = _real(path)
        if any(_is_under(real, f) for f in fresh) and not any(_is_under(real, o) for o in overlays):
            visible.add(real)
    # A visible path inside another visible path comes along with its parent.
    kept = tuple(sorted(p for p in visible if not any(p != q and _is_under(p, q) for q in visible)))
    image_root = ""
    image_dirs: tuple[str, ...] = ()
    if image is not None and image.host_based:
        image_root, image_dirs = "/", tuple(d for d in image_top_dirs(image.lowers) if os.path.isdir(d))
        overlays = sorted(set(overlays) | set(image_dirs), key=lambda p: (p.count("/"), p))
    elif image is not None:
        image_root = "/run/pytest-sandbox/image" if "/run" in fresh else "/tmp/pytest-sandbox/image"
    return RootPlan(overlays=tuple(overlays), visible=kept, fresh=fresh, image=image, image_root=image_root,
                    image_dirs=image_dirs)


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SetupError("rootfs", f"cannot create mount point {path}: {exc.strerror}") from None


def _attach(fd: int, target: str, is_dir: bool = True) -> None:
    if is_dir:
        _makedirs(target)
    elif not os.path.exists(target):
        _makedirs(os.path.dirname(target))
        open(target, "a").close()
    _linux.move_mount(fd, target)
    os.close(fd)


def _detached_overlay(lowers: list[str], scratch: str, index: int, layer_dir: str | None = None) -> int:
    """overlay(lowers, upper) as a detached mount; upper and work in ``layer_dir`` (default: scratch)."""
    layer_dir = layer_dir or f"{scratch}/{index}"
    upper, work = f"{layer_dir}/upper", f"{layer_dir}/work"
    os.makedirs(upper)
    os.makedirs(work)
    if len(lowers) > 1:  # several layers: container.overlay_mount knows both kernel interfaces
        from .container import overlay_mount

        target = f"{scratch}/{index}/root"
        os.makedirs(target)
        overlay_mount(lowers, upper, work, target)
        return _linux.open_tree(target, _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC)
    fs = _linux.fsopen("overlay")
    try:
        _linux.fsconfig(fs, "lowerdir", lowers[0])
        _linux.fsconfig(fs, "upperdir", upper)
        _linux.fsconfig(fs, "workdir", work)
        _linux.fsconfig(fs, "userxattr")
        return _linux.fsmount(fs)
    finally:
        os.close(fs)


def _overlay_for(target: str, index: int, plan: RootPlan, scratch: str, keep: tuple[str, str] | None) -> int:
    """One writable place; with a FROM host image, the image's layers come between it and the host.

    With ``keep``, the image's top-level directories keep their upper dirs in the store
    (``<id>/<dir>/upper``), where pytest keeps them if the test fails.
    """
    image = plan.image
    if image is None or not image.host_based:
        return _detached_overlay([target], scratch, index)
    lowers = host_based_lowers(image.lowers, target, f"{scratch}/{index}/empty")
    if target in lowers and os.geteuid() != 0 and mounts_under(target):
        raise SetupError("image", f"image {image.name} changes {target}, which holds other mounts on this host "
                         f"({', '.join(mounts_under(target)[:3])}): without root overlayfs cannot stack on it")
    layer_dir = None
    if keep is not None and target in plan.image_dirs:
        layer_dir = f"{keep[0]}/{keep[1]}{target}"
    return _detached_overlay(lowers, scratch, index, layer_dir)


def _image_root(image: ImageMount, scratch: str, keep: tuple[str, str] | None) -> int:
    """The image's overlay as a detached mount to attach later.

    Its upper dir is on the scratch tmpfs, or with ``keep`` (dir, id) in the store's
    containers dir, where pytest keeps it if the test fails.
    """
    from .container import overlay_mount

    layer_dir = f"{keep[0]}/{keep[1]}" if keep is not None else f"{scratch}/image"
    upper, work, root = f"{layer_dir}/upper", f"{layer_dir}/work", f"{scratch}/image-root"
    for d in (upper, work, root):
        os.makedirs(d)
    try:
        overlay_mount(image.lowers, upper, work, root)
    except OSError as exc:
        raise SetupError("image", f"cannot mount image {image.name}: {exc}") from None
    return _linux.open_tree(root, _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC)


def build_dev_template() -> None:
    """A minimal /dev for the session: host device nodes bound onto a tmpfs, then made read-only.

    Done once in the zygote; each sandbox only adds its own devpts and /dev/shm
    (``mknod`` is refused in a user namespace, so nodes are bind mounts of the host's).
    """
    clone = _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC
    nodes = {name: _linux.open_tree(f"/dev/{name}", clone) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    _linux.mount("sandbox-dev", "/dev", "tmpfs", _linux.MS_NOSUID | _linux.MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in nodes.items():
        _attach(fd, f"/dev/{name}", is_dir=False)
    os.mkdir("/dev/pts")
    os.mkdir("/dev/shm")
    os.symlink("pts/ptmx", "/dev/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    _linux.mount(None, "/dev", None, _linux.MS_REMOUNT | _linux.MS_BIND | _linux.MS_RDONLY | _linux.MS_NOSUID
                 | _linux.MS_NOEXEC)


def _fresh_dev_mounts() -> None:
    _linux.mount("devpts", "/dev/pts", "devpts", _linux.MS_NOSUID | _linux.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
    _linux.mount("sandbox-shm", "/dev/shm", "tmpfs", _TMPFS_FLAGS, "mode=1777")


def build(plan: RootPlan, keep: tuple[str, str] | None = None) -> None:
    """Mount the per-sandbox tree in the current (fresh) mount and pid namespace."""
    clone = _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC | _linux.AT_RECURSIVE
    # 1. Everything that refers to host paths is prepared detached, before any cover. Overlay
    #    uppers live on a scratch tmpfs that must be attached in this namespace (Linux < 6.6
    #    refuses a detached upper); /dev/shm is covered by the sandbox's own tmpfs later.
    scratch = SCRATCH
    _linux.mount("sandbox-upper", scratch, "tmpfs", _TMPFS_FLAGS, "mode=0700")
    overlay_fds = [(target, _overlay_for(target, i, plan, scratch, keep)) for i, target in enumerate(plan.overlays)]
    visible_fds = [(path, os.path.isdir(path), _linux.open_tree(path, clone)) for path in plan.visible]
    image_fd = None
    if plan.image is not None and not plan.image.host_based:
        image_fd = _image_root(plan.image, scratch, keep)
    # 2. Cover the scratch places; an overlay holding one (an image's /var holds /var/tmp) goes first.
    for target, fd in [(t, f) for t, f in overlay_fds if any(_is_under(p, t) and p != t for p in plan.fresh)]:
        _attach(fd, target)
        overlay_fds.remove((target, fd))
    for place in plan.fresh:
        _linux.mount("sandbox-tmp", place, "tmpfs", _TMPFS_FLAGS, "mode=0755" if place == "/run" else "mode=1777")
    _fresh_dev_mounts()
    # 3. Put writable and needed host paths back on top.
    for target, fd in overlay_fds:
        _attach(fd, target)
    for path, is_dir, fd in visible_fds:
        _attach(fd, path, is_dir)
    if image_fd is not None:
        _attach(image_fd, plan.image_root)
    _linux.mount("proc", "/proc", "proc", _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC)
