"""The root filesystems: a test sandbox's mount tree, and an image's root for commands.

A test sandbox's tree is built in two stages so the expensive part happens once per session:

* ``enter_host_view`` (zygote, once): a private mount namespace whose root is a
  recursive read-only clone of the host ``/`` (``lowerdir=/`` is refused in a
  user namespace, and a plain bind would keep host mounts writable), with a
  read-only minimal ``/dev`` (``build_dev_template``).
* ``build`` (each sandbox, after ``unshare(CLONE_NEWNS)``): fresh tmpfs on the
  scratch places, overlays with a tmpfs upper over the writable places, its own
  devpts and /dev/shm, credential places masked (``mask_places``); ``mount_proc`` then adds a
  ``/proc`` of the sandbox's pid namespace with the host-wide kernel knobs read-only.

Anything the test process needs that lives under a place that gets a fresh tmpfs
(a venv under /tmp, a pytester rootdir, the cwd) is cloned out of the host view
first and put back on top of the new tmpfs.

An image's root (``mount_image_root``, then ``enter_image_root`` as the command's pid 1)
serves RUN steps, ``sandbox.run()`` and ``pytest-sandbox run``/``shell``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence

from ..errors import SetupError
from ..layers.format import env_mapping
from . import mounts, overlay, syscalls
from .files import open_no_symlinks
from .mounts import SCRATCH_PLACES, clone_tree, is_under

SCRATCH = "/dev/shm"  # in the /dev template; never a lower, covered by the sandbox's own /dev/shm
MASK_STAGING = "/dev/shm"  # the empty dir and file masks are clones of lie under the sandbox's /dev/shm
MASK_SIZE = 4096  # bytes of the tmpfs that masks come from: it stays empty and read-only
IMAGE_ROOT_IN_RUN, IMAGE_ROOT_IN_TMP = "/run/pytest-sandbox/image", "/tmp/pytest-sandbox/image"


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

    @property
    def env(self) -> dict[str, str]:
        """The image's ENV as a mapping."""
        return env_mapping(json.loads(self.config_json).get("Env") or [])


# -- the session's host view -----------------------------------------------------------------


def enter_host_view(keep_writable: str = "") -> None:
    """Make the root of this (new) mount namespace a read-only view of the host.

    ``keep_writable`` (one host directory) stays writable: kept read/write layers go there.
    """
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    writable = clone_tree(keep_writable, recursive=False) if keep_writable else None
    host = clone_tree("/")
    mounts.read_only(host)
    # A staging tmpfs only this namespace sees gives pivot_root a place to start from.
    mounts.mount_tmpfs("/tmp", "0700", name="sandbox-stage")
    mounts.attach(host, "/tmp/root")
    os.chdir("/tmp/root")
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
    if writable is not None:
        mounts.attach(writable, keep_writable)


def build_dev_template() -> None:
    """A minimal /dev for the session, read-only; each sandbox only adds its own devpts and /dev/shm."""
    mounts.populate_dev("/dev")
    syscalls.mount(
        None,
        "/dev",
        None,
        syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
    )


# -- a test sandbox's tree ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VolumeMount:
    """A host file or directory bound at ``target``: what the test writes there reaches the host."""

    source: str  # real host path (a named volume's data directory, or the user's path)
    target: str
    read_only: bool
    named: bool = False  # empty, it starts with what an image holds at its target (as Docker's do)


@dataclasses.dataclass(frozen=True)
class RootPlan:
    """What one sandbox mounts, computed once per spec in the zygote."""

    overlays: tuple[str, ...]  # writable places: overlay with an ephemeral upper, shallowest first
    visible: tuple[str, ...]  # host paths re-exposed read-only on top of a fresh tmpfs
    fresh: tuple[str, ...]  # places that get an empty tmpfs
    image: ImageMount | None = None
    image_root: str = ""  # where the image's root is mounted in the test's view
    image_dirs: tuple[str, ...] = ()  # FROM host: the top-level directories its layers change
    tmpfs_size: int | None = None  # bytes each tmpfs the sandbox writes to may hold (None: the kernel's half of RAM)
    hidden: tuple[tuple[str, bool], ...] = ()  # (path, is a directory): masked by an empty read-only mount
    volumes: tuple[VolumeMount, ...] = ()  # host paths bound through, shallowest target first
    scrubbed: tuple[tuple[str, str], ...] = ()  # (path, text): a file masked by a read-only one with this text


def _by_depth(paths: Iterable[str]) -> list[str]:
    return sorted(set(paths), key=lambda p: (p.count("/"), p))


def make_plan(
    writable: Iterable[str],
    needed: Iterable[str],
    image: ImageMount | None = None,
    tmpfs_size: int | None = None,
    hidden: Iterable[str] = (),
    volumes: Iterable[VolumeMount] = (),
    scrubbed: Iterable[tuple[str, str]] = (),
) -> RootPlan:
    """Decide the mounts: ``writable`` become overlays, ``needed`` must stay visible, ``hidden`` are masked."""
    fresh = tuple(p for p in SCRATCH_PLACES if os.path.isdir(p) and not os.path.islink(p))
    overlays = _by_depth(os.path.realpath(p) for p in writable if os.path.isdir(p) and os.path.realpath(p) != "/")
    visible: set[str] = set()
    for path in needed:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if any(is_under(real, f) for f in fresh) and not any(is_under(real, o) for o in overlays):
            visible.add(real)
    # A visible path inside another visible path comes along with its parent.
    kept = tuple(sorted(p for p in visible if not any(p != q and is_under(p, q) for q in visible)))
    image_root = ""
    image_dirs: tuple[str, ...] = ()
    if image is not None and image.host_based:
        image_root = "/"
        image_dirs = tuple(d for d in overlay.image_top_dirs(image.lowers) if os.path.isdir(d))
        overlays = _by_depth([*overlays, *image_dirs])
    elif image is not None:
        image_root = IMAGE_ROOT_IN_RUN if "/run" in fresh else IMAGE_ROOT_IN_TMP
    return RootPlan(
        overlays=tuple(overlays),
        visible=kept,
        fresh=fresh,
        image=image,
        image_root=image_root,
        image_dirs=image_dirs,
        tmpfs_size=tmpfs_size,
        hidden=_hidden_places(hidden, fresh, (*overlays, *kept)),
        volumes=tuple(volumes),
        scrubbed=tuple(scrubbed),
    )


def _hidden_places(hidden: Iterable[str], fresh: Sequence[str], shown: Sequence[str]) -> tuple[tuple[str, bool], ...]:
    """The places to mask, as (path, is a directory): not those a fresh tmpfs covers anyway (unless an
    overlay or visible path brings them back), nor those inside another masked directory."""
    places: dict[str, bool] = {}
    for path in hidden:
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if real == "/" or (any(is_under(real, f) for f in fresh) and not any(is_under(real, s) for s in shown)):
            continue
        places[real] = os.path.isdir(real)
    dirs = [p for p, is_dir in places.items() if is_dir]
    return tuple(
        sorted((p, is_dir) for p, is_dir in places.items() if not any(p != d and is_under(p, d) for d in dirs))
    )


def _writable_place(target: str, index: int, plan: RootPlan, scratch: str, layer_dir: str | None) -> int:
    """One writable place as a detached overlay; with a FROM host image, its layers come between
    the place and the host. With ``layer_dir``, the image's directories keep their uppers there
    (``<layer_dir>/<dir>/upper``), where pytest keeps them if the test fails."""
    image = plan.image
    place_dir = f"{scratch}/{index}"
    lowers = [target]
    if image is not None and image.host_based:
        lowers = overlay.host_based_lowers(image.lowers, target, f"{place_dir}/empty")
        if target in lowers and os.geteuid() != 0 and mounts.mounts_under(target):
            raise SetupError(
                "image",
                f"image {image.name} changes {target}, which holds other mounts on this "
                f"host ({', '.join(mounts.mounts_under(target)[:3])}): without root overlayfs "
                "cannot stack on it",
            )
        if layer_dir is not None and target in plan.image_dirs:
            place_dir = f"{layer_dir}{target}"
    os.makedirs(f"{place_dir}/upper")
    os.makedirs(f"{place_dir}/work")
    return overlay.detached_overlay(lowers, f"{place_dir}/upper", f"{place_dir}/work", f"{scratch}/{index}/root")


def _detached_image_root(image: ImageMount, scratch: str, layer_dir: str | None) -> int:
    """The image's overlay as a detached mount; its upper on the scratch tmpfs or in ``layer_dir``."""
    layer_dir = layer_dir or f"{scratch}/image"
    os.makedirs(f"{layer_dir}/upper")
    os.makedirs(f"{layer_dir}/work")
    try:
        return overlay.detached_overlay(
            image.lowers, f"{layer_dir}/upper", f"{layer_dir}/work", f"{scratch}/image-root"
        )
    except OSError as exc:
        raise SetupError("image", f"cannot mount image {image.name}: {exc}") from None


def build(plan: RootPlan, layer_dir: str | None = None) -> int:
    """Mount one sandbox's tree in the current (fresh) mount namespace.

    ``layer_dir``: where an image test's read/write layer goes (kept if the test fails);
    without it the layer lives on the scratch tmpfs and dies with the sandbox. /proc comes later
    (``mount_proc``), from inside the sandbox's pid namespace. Returns an fd of the scratch tmpfs,
    which the test's view covers: the overlay uppers (what the test wrote) stay reachable through it.
    """
    # 1. Everything that refers to host paths is prepared detached, before anything covers it.
    #    Uppers live on a scratch tmpfs that must be attached in this namespace (Linux < 6.6
    #    refuses a detached upper); /dev/shm is covered by the sandbox's own tmpfs later.
    mounts.mount_tmpfs(SCRATCH, "0700", name="sandbox-upper", size=plan.tmpfs_size)
    scratch_fd = os.open(SCRATCH, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    overlay_fds = [(t, _writable_place(t, i, plan, SCRATCH, layer_dir)) for i, t in enumerate(plan.overlays)]
    visible_fds = [(path, os.path.isdir(path), clone_tree(path)) for path in plan.visible]
    image_fd = None
    if plan.image is not None and not plan.image.host_based:
        image_fd = _detached_image_root(plan.image, SCRATCH, layer_dir)
    volume_fds = [(v, target, _detached_volume(v)) for v in plan.volumes for target in _volume_targets(v, plan)]
    # 2. Cover the scratch places; an overlay holding one (an image's /var holds /var/tmp) goes first,
    #    or it would cover the fresh tmpfs.
    for target, fd in [(t, f) for t, f in overlay_fds if any(is_under(p, t) and p != t for p in plan.fresh)]:
        mounts.attach(fd, target)
        overlay_fds.remove((target, fd))
    mounts.mount_scratch_places(size=plan.tmpfs_size)
    mounts.mount_dev_instances("/dev", shm_size=plan.tmpfs_size)
    # 3. Put writable and needed host paths back on top of the fresh places.
    for target, fd in overlay_fds:
        mounts.attach(fd, target)
    for path, is_dir, fd in visible_fds:
        mounts.attach(fd, path, is_dir)
    if image_fd is not None:
        # Its parent a mount point of its own too (/run and /tmp are): no directory on the way to the image
        # root can be renamed or swapped for a symlink while root's launcher mounts and pivots there.
        os.makedirs(os.path.dirname(plan.image_root), exist_ok=True)
        mounts.mount_tmpfs(os.path.dirname(plan.image_root), "0755", name="sandbox-image", size=4096)
        mounts.attach(image_fd, plan.image_root)
    # 4. Volumes over all of that (an image test's also inside its image, where its commands run).
    for volume, target, fd in volume_fds:
        _attach_volume(volume, fd, target)
    # 5. Hidden places masked (credentials, host sockets, the session's kept layers), over the overlays
    #    and visible paths that may hold them; an image test's own layer is already its upper by now.
    mask_places(plan)
    return scratch_fd


def _detached_volume(volume: VolumeMount) -> int:
    """A clone of the volume's source from the host view, writable again unless ``:ro``; never suid or devices.

    Only the source's own mount loses read-only: mounts below it that the host has read-only stay so.
    """
    try:
        where = open_no_symlinks(volume.source)  # resolved when collected: a symlink since then is an attack
        try:
            fd = mounts.clone_tree_at(where)
        finally:
            os.close(where)
        safe = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        if volume.read_only:
            mounts.read_only(fd, safe)
        else:
            syscalls.mount_setattr(fd, safe)
            syscalls.mount_setattr(fd, 0, recursive=False, attr_clr=syscalls.MOUNT_ATTR_RDONLY)  # EPERM: host's ro
    except OSError as exc:
        raise SetupError("volumes", f"cannot bind {volume.source} at {volume.target}: {exc.strerror}") from None
    return fd


def _volume_targets(volume: VolumeMount, plan: RootPlan) -> list[str]:
    """Where a volume goes: its target in the test's view; for an image test also (or, where the host has
    no such path, only) inside the image's root, where its commands run."""
    if plan.image is None or plan.image.host_based:
        return [volume.target]
    return [t for t in (volume.target,) if os.path.lexists(t)] + [plan.image_root + volume.target]


def _attach_volume(volume: VolumeMount, fd: int, target: str) -> None:
    """Attach a volume at its target, made if missing where the sandbox can write (a fresh place, a writable
    overlay, an image's root); a missing target on the read-only host view is the test's setup error.

    An empty named volume going over a directory of an image first gets that directory's content."""
    if volume.named and not volume.read_only and target != volume.target and os.path.isdir(target):
        data = f"/proc/self/fd/{fd}"
        if not os.listdir(data) and os.listdir(target):
            shutil.copytree(target, data, symlinks=True, dirs_exist_ok=True)
    try:
        mounts.attach(fd, target, os.path.isdir(f"/proc/self/fd/{fd}"))
    except OSError as exc:
        os.close(fd)
        raise SetupError(
            "volumes",
            f"cannot mount {volume.source} at {volume.target}: {exc.strerror} (a target must exist in the "
            "sandbox, or lie where it can be made: under /tmp, /var/tmp, /run, $HOME, the rootdir, a writable= "
            "place or an image's root)",
        ) from None


def full_places(plan: RootPlan, slack: int = 1 << 20) -> list[str]:
    """The sandbox's writable places with less than ``slack`` bytes left, as lines for a report.

    Places that share one filesystem (every overlay's upper lives on one tmpfs) come as one line.
    """
    by_fs: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for place in (*plan.fresh, "/dev/shm", *plan.overlays):
        try:
            st = os.statvfs(place)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < slack:
            by_fs.setdefault(st.f_fsid, []).append(place)
            sizes[st.f_fsid] = st.f_blocks * st.f_frsize
    return [
        f"{' and '.join(places)} {'is' if len(places) == 1 else 'are'} full: "
        f"{'its' if len(places) == 1 else 'their'} tmpfs holds {sizes[fsid] / 2**20:.0f} MiB"
        for fsid, places in by_fs.items()
    ]


# Kernel knobs under /proc that are host-wide whatever namespace writes them (core_pattern runs a program as
# real root; sysrq-trigger reboots): read-only, as Docker does. What only leaks the host's state is masked.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
PROC_MASKED = (
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
)


PROC_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def mount_proc(while_writable: Callable[[], None] | None = None, image_commands: bool = False) -> None:
    """A /proc of the caller's pid namespace with the host-wide knobs read-only (``while_writable`` runs
    before they are: the network namespace's own sysctls are written through them); with
    ``image_commands`` (a sandbox with an image), a spare one for the commands run in it.

    Mounted by the test process itself (the first process of the sandbox's mount namespace that
    is *in* its pid namespace). The covering mounts also make this procfs not "fully visible", so
    a test that gains capabilities in a user namespace of its own cannot mount a fresh, writable one.
    """
    syscalls.mount("proc", "/proc", "proc", PROC_FLAGS)
    if while_writable is not None:
        while_writable()
    for path in PROC_READ_ONLY:
        if os.path.exists(path):
            mounts.bind_read_only(path)
    for path in PROC_MASKED:
        if os.path.exists(path):
            mounts.mask(path)
    if image_commands:  # else the mount table would list a procfs at a path the test cannot see (psutil checks)
        _spare_read_only_proc()


def _spare_read_only_proc() -> None:
    """A read-only procfs, unreachable under the sandbox's /dev/shm, so commands the test starts in
    images (their own user and pid namespaces) may mount a /proc of their own: the kernel allows a new
    procfs only where one is fully visible, and read-only only where that one is read-only."""
    shm = mounts.clone_tree("/dev/shm", recursive=False)
    mounts.mount_tmpfs("/dev/shm", "0000", name="sandbox-spare", size=4096)
    os.mkdir("/dev/shm/proc")
    syscalls.mount("proc", "/dev/shm/proc", "proc", PROC_FLAGS | syscalls.MS_RDONLY)
    mounts.attach(shm, "/dev/shm")  # the sandbox's own /dev/shm again, on top


def mount_command_proc(target: str) -> None:
    """/proc for a command in an image: read-only where only a read-only one may be mounted (in a sandbox)."""
    try:
        syscalls.mount("proc", target, "proc", PROC_FLAGS)
    except PermissionError:
        syscalls.mount("proc", target, "proc", PROC_FLAGS | syscalls.MS_RDONLY)


def mask_places(plan: RootPlan) -> None:
    """Cover each of ``plan.hidden``: a directory with an empty directory, a file with an empty file,
    both read-only, nosuid, nodev, noexec. Runs after everything that could hold them is attached.

    The empty pair lives on one small tmpfs under the sandbox's own /dev/shm (``MASK_STAGING``),
    unreachable: Linux before 6.15 cannot clone from a detached mount, and unmounting a staging
    place would wait for an RCU grace period (about 15 ms here). A place gone since the plan was
    made has nothing left to hide.
    """
    if not plan.hidden and not plan.scrubbed:
        return
    shm = clone_tree(MASK_STAGING, recursive=False)
    size = MASK_SIZE + sum(len(text.encode(errors="surrogateescape")) + 4096 for _, text in plan.scrubbed)
    mounts.mount_tmpfs(MASK_STAGING, "0700", name="sandbox-hidden", size=size)
    os.mkdir(f"{MASK_STAGING}/dir", 0o700)
    os.close(os.open(f"{MASK_STAGING}/file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    covers = [(path, "dir" if is_dir else "file") for path, is_dir in plan.hidden]
    for index, (path, text) in enumerate(plan.scrubbed):
        fd = os.open(f"{MASK_STAGING}/scrubbed-{index}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            f.write(text.encode(errors="surrogateescape"))
        covers.append((path, f"scrubbed-{index}"))
    for path, cover in covers:
        fd = clone_tree(f"{MASK_STAGING}/{cover}", recursive=False)
        try:
            mounts.read_only(fd, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC)
            syscalls.move_mount(fd, path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    mounts.attach(shm, MASK_STAGING)  # the sandbox's own /dev/shm again, on top


# -- an image's root, for commands --------------------------------------------------------------


def host_based_root(
    lowers_top_first: Sequence[str], layer_dir: str, merged: str, keep_out: str, unprivileged: bool
) -> str:
    """Mount a FROM host image's root on ``merged``: the host read-only, each top-level directory
    an overlay of the image's layers over the host's, with uppers in ``layer_dir/<dir>/upper``.

    ``keep_out`` (the image store) must not be under an overlaid directory: overlayfs refuses
    layers inside other layers, so the top-level directory holding it stays read-only. So do
    directories with mounts below them when ``unprivileged`` (the caller's uid outside).
    """
    host = clone_tree("/")
    mounts.read_only(host)
    mounts.attach(host, merged)
    store_top = overlay.top_level_dir(keep_out)
    for name in sorted(os.listdir("/")):
        path = f"/{name}"
        if name in overlay.NOT_OVERLAID or path == store_top or os.path.islink(path) or not os.path.isdir(path):
            continue
        if unprivileged and mounts.mounts_under(path):
            continue  # locked mounts below: overlayfs refuses it without root; stays read-only
        lowers = overlay.host_based_lowers(lowers_top_first, path, f"{layer_dir}/.empty")
        os.makedirs(f"{layer_dir}/{name}/upper", exist_ok=True)  # exists for a kept container
        os.makedirs(f"{layer_dir}/{name}/work", exist_ok=True)
        overlay.mount_overlay(lowers, f"{layer_dir}/{name}/upper", f"{layer_dir}/{name}/work", merged + path)
    mounts.mount_scratch_places(merged)
    return merged


def mount_image_root(
    lowers_top_first: Sequence[str],
    layer_dir: str,
    merged: str,
    *,
    host_based: bool,
    store_root: str,
    unprivileged: bool,
    on_tmpfs: bool,
) -> str:
    """In a new mount namespace: an image's root on ``merged`` with its read/write layer in ``layer_dir``
    (``upper``/``work``; per top-level directory for FROM host), on a tmpfs mounted there with ``on_tmpfs``
    (overlayfs refuses an upper dir on overlayfs, as in a store inside a container's root)."""
    if on_tmpfs:
        mounts.mount_tmpfs(layer_dir, "0755", name="image-upper")
    if host_based:
        return host_based_root(lowers_top_first, layer_dir, merged, store_root, unprivileged)
    upper, work = os.path.join(layer_dir, "upper"), os.path.join(layer_dir, "work")
    for path in (upper, work):
        os.makedirs(path, exist_ok=True)  # exists for a kept container
    if not lowers_top_first:  # an image with no layer yet (FROM scratch)
        lowers_top_first = [os.path.join(layer_dir, ".empty")]
        os.makedirs(lowers_top_first[0], exist_ok=True)
    overlay.mount_overlay(lowers_top_first, upper, work, merged)
    return merged


def layer_uppers(layer_dir: str, host_based: bool) -> list[tuple[str, str]]:
    """(where it goes in a layer, upper dir) for each upper of ``mount_image_root`` that holds changes."""
    if not host_based:
        upper = os.path.join(layer_dir, "upper")
        return [("", upper)] if os.listdir(upper) else []
    found = []
    for name in sorted(os.listdir(layer_dir)):
        upper = os.path.join(layer_dir, name, "upper")
        if not name.startswith(".") and os.path.isdir(upper) and os.listdir(upper):
            found.append((name, upper))
    return found


def _usable_dir(path: str) -> bool:
    """``path`` is a directory now (made if missing); False where the image has a file there."""
    if os.path.isdir(path) and not os.path.islink(path):
        return True
    if os.path.lexists(path):
        return False
    os.makedirs(path, mode=0o755, exist_ok=True)
    return True


SYS_MASKED = ("/sys/firmware", "/sys/devices/virtual/powercap")  # as Docker masks them


def _mask_pseudo_filesystems(root: str) -> None:
    """In a command's /proc and /sys under ``root``: the host-wide knobs read-only, the host's state masked.

    Root's commands map every id onto the host's, so they would pass the owner checks of
    /proc/sys and /proc/sysrq-trigger; the covering mounts also keep the /proc from being
    "fully visible", so a user namespace of the command's own cannot mount a fresh one.
    """
    for path in PROC_READ_ONLY:
        if os.path.exists(root + path):
            mounts.bind_read_only(root + path)
    for path in (*PROC_MASKED, *SYS_MASKED):
        if os.path.exists(root + path):
            mounts.mask(root + path)


def enter_image_root(root: str, share_dev: bool) -> None:
    """As pid 1 of a command's pid namespace: /proc, /dev and a read-only /sys in ``root``, then pivot.

    ``share_dev``: inside a sandbox, its minimal /dev is bound in whole (one mount, not ten).
    The root is bound onto itself first: a mount inherited from a more privileged namespace is
    locked and pivot_root refuses it, while its copy is not (what is below it stays locked). The
    copy is nodev: root's image root was mounted outside the user namespace, where device nodes
    would open (a block device shipped in a layer would be the host's disk).
    """
    root_fd = clone_tree(root)
    syscalls.mount_setattr(root_fd, syscalls.MOUNT_ATTR_NODEV)  # a device node in a layer opens nothing
    mounts.attach(root_fd, root)
    if _usable_dir(f"{root}/proc"):
        mount_command_proc(f"{root}/proc")
    if _usable_dir(f"{root}/dev"):
        if share_dev:
            mounts.attach(clone_tree("/dev"), f"{root}/dev")
        else:
            mounts.populate_dev(f"{root}/dev")
            mounts.mount_dev_instances(f"{root}/dev")
    if os.path.isdir("/sys") and _usable_dir(f"{root}/sys"):
        sys_fd = clone_tree("/sys")
        mounts.read_only(sys_fd, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC)
        mounts.attach(sys_fd, f"{root}/sys")
    _mask_pseudo_filesystems(root)
    os.chdir(root)
    # No chroot fallback: chroot can be left again with CAP_SYS_CHROOT, to what lies under the image.
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
