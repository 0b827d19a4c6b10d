"""overlayfs: mounting a stack of lower dirs under an upper, with either kernel API,
and the lower dirs of a FROM host image's overlays.

Always with ``userxattr``: in a user namespace overlayfs reads whiteouts and opaque
markers from ``user.overlay.*`` xattrs. ``lowerdir+`` (Linux 6.8+) takes one layer
per call, so any number fits; older kernels get one string, with each layer named by
a short ``/proc/self/fd`` path (legacy option strings stop at 4095 bytes).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence

from ..layers.format import layer_copies
from . import mounts, syscalls

LEGACY_ENV = "PYTEST_SANDBOX_OVERLAY_LEGACY"  # set: use the option string even where lowerdir+ exists
_LEGACY_OPTIONS_MAX = 4095
_FSCONFIG_STRING_MAX = 255
# Top-level host directories a FROM host image never overlays: pseudo filesystems and scratch places.
NOT_OVERLAID = ("proc", "sys", "dev", "tmp", "run", "lost+found")


class OverlayError(OSError):
    """overlayfs refused a stack (too many layers for this kernel's interface)."""


def _configured(lowers: Sequence[str], upper: str, work: str, lower_key: str) -> int:
    """A detached overlay from the new mount API, each lower under ``lower_key``."""
    fs = syscalls.fsopen("overlay")
    try:
        for lower in lowers:
            syscalls.fsconfig(fs, lower_key, lower)
        syscalls.fsconfig(fs, "upperdir", upper)
        syscalls.fsconfig(fs, "workdir", work)
        syscalls.fsconfig(fs, "userxattr")
        return syscalls.fsmount(fs)
    finally:
        os.close(fs)


def _new_api(lowers: Sequence[str], upper: str, work: str) -> int | None:
    """A detached overlay, or None where this kernel needs the legacy string.

    One lower fits the plain ``lowerdir`` key on every kernel with the new API. Before
    Linux 6.5 overlayfs takes fsconfig keys as a legacy option string and only refuses
    ``lowerdir+`` when the superblock is created, so that is where it is judged.
    """
    if len(lowers) == 1 and len(lowers[0]) <= _FSCONFIG_STRING_MAX:
        return _configured(lowers, upper, work, "lowerdir")
    if os.environ.get(LEGACY_ENV):
        return None
    try:
        return _configured(lowers, upper, work, "lowerdir+")
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def _legacy_mount(lowers: Sequence[str], upper: str, work: str, target: str) -> None:
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in lowers]
    try:
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        options = f"lowerdir={lowerdir},upperdir={upper},workdir={work},userxattr"
        if len(options) > _LEGACY_OPTIONS_MAX:
            raise OverlayError(
                errno.E2BIG,
                f"the image has {len(fds)} layers: more than this kernel's overlay "
                f"option string holds ({_LEGACY_OPTIONS_MAX} bytes); Linux 6.8+ takes up to 500",
            )
        syscalls.mount("overlay", target, "overlay", 0, options)
    finally:
        for fd in fds:
            os.close(fd)


def mount_overlay(lowers_top_first: Sequence[str], upper: str, work: str, target: str) -> None:
    """Mount overlay(lowers, upper) on ``target``."""
    fd = _new_api(lowers_top_first, upper, work)
    if fd is None:
        _legacy_mount(lowers_top_first, upper, work, target)
    else:
        mounts.attach(fd, target)


def detached_overlay(lowers_top_first: Sequence[str], upper: str, work: str, staging: str) -> int:
    """overlay(lowers, upper) as a detached mount fd; the legacy API mounts it on ``staging`` (made here) first."""
    fd = _new_api(lowers_top_first, upper, work)
    if fd is not None:
        return fd
    os.makedirs(staging)
    _legacy_mount(lowers_top_first, upper, work, staging)
    return mounts.clone_tree(staging, recursive=False)


def host_based_lowers(layers_top_first: Sequence[str], path: str, empty_dir: str) -> list[str]:
    """Lower dirs for a FROM host image's overlay on the host directory ``path``: its layers' copies,
    then the host's own unless the image hides it; ``empty_dir`` (made here) if the image deleted it."""
    copies, host_shows = layer_copies(layers_top_first, path)
    lowers = [c for c in copies if os.path.isdir(c) and not os.path.islink(c)]
    if host_shows:
        lowers.append(path)
    if not lowers:
        os.makedirs(empty_dir, exist_ok=True)
        lowers = [empty_dir]
    return lowers


def image_top_dirs(layers_top_first: Iterable[str]) -> list[str]:
    """The top-level directories a FROM host image's layers change, as absolute paths."""
    names: set[str] = set()
    for layer in layers_top_first:
        names.update(os.listdir(layer))
    return sorted(f"/{n}" for n in names if n not in NOT_OVERLAID)


def top_level_dir(path: str) -> str:
    """``/root`` for ``/root/.cache/pytest-sandbox``: the top-level directory a path lies in."""
    return "/" + os.path.realpath(path).strip("/").split("/")[0]
