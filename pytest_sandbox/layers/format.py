"""What a layer directory and an image record look like: the names and the one layer-stack walk.

Layers are stored overlay-native so overlayfs (with ``userxattr``) reads them as they are:
a deleted path is a 0:0 character device, or on Linux 6.8+ an empty file marked
``user.overlay.whiteout``; an opaque directory carries ``user.overlay.opaque=y``. This
module imports nothing of the project, so the Linux layer may use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from typing import Any

# -- overlay-native layer directories --------------------------------------------------------
OPAQUE_XATTR = "user.overlay.opaque"  # "y": the directory hides what lower layers hold there
XWHITEOUT_XATTR = "user.overlay.whiteout"  # on an empty file: a deletion (where 0:0 devices are refused)
OWNER_XATTR = "user.pytest-sandbox.owner"  # "uid:gid" the image gave a file, kept where we cannot chown
OVERLAY_XATTR_PREFIX = "user.overlay."  # overlayfs's own bookkeeping, stripped from finished layers

# -- the same in OCI layer tars --------------------------------------------------------------
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# -- image records -----------------------------------------------------------------------------
HOST_BASE = "host"  # Image.base of an image built FROM host: the sandbox's host view is its lowest layer
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}(:[A-Za-z0-9_.-]{1,128})?$")
NAME_RULE = "lower-case letters, digits, '.', '_', '-', optionally ':tag'"
EMPTY_CONFIG: dict[str, Any] = {
    "Env": [],
    "WorkingDir": "",
    "User": "",
    "Cmd": None,
    "Entrypoint": None,
    "Labels": {},
    "ExposedPorts": {},
}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI ChainID: the diff id for the first layer, else sha256(parent + " " + diff id)."""
    if parent is None:
        return diff_id
    return "sha256:" + sha256_hex(f"{parent} {diff_id}".encode())


def env_mapping(config_env: Iterable[str]) -> dict[str, str]:
    """An image config's ``Env`` (``KEY=VALUE`` items) as a mapping."""
    env = {}
    for item in config_env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
    return env


def is_whiteout(path: str, st: os.stat_result | None = None) -> bool:
    """A 0:0 character device, or an xattr whiteout (an empty file marked ``user.overlay.whiteout``)."""
    try:
        st = st or os.lstat(path)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            os.getxattr(path, XWHITEOUT_XATTR, follow_symlinks=False)
            return True
        except OSError:
            return False
    return False


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def layer_copies(layers_top_first: Sequence[str], path: str) -> tuple[list[str], bool]:
    """Each layer's copy of ``path`` (top first) as overlayfs would merge them, and whether what lies
    below the last layer (the host, for a FROM host image) still shows through.

    The walk stops at the first layer that hides everything under it: a whiteout of ``path`` or of a
    directory on the way, a non-directory on the way or at ``path``, or an opaque directory.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    found: list[str] = []
    for layer in layers_top_first:
        hides_below = False
        for depth in range(1, len(parts) + 1):
            here = os.path.join(layer, *parts[:depth])
            last = depth == len(parts)
            if is_whiteout(here):
                return found, False
            if not os.path.lexists(here):
                break  # this layer does not touch it
            if not os.path.isdir(here) or os.path.islink(here):
                if last:
                    found.append(here)
                return found, False  # replaced by a file or link: nothing below shows
            if last:
                found.append(here)
            if is_opaque(here):
                hides_below = True
        if hides_below:
            return found, False
    return found, True


def topmost_copy(layers_top_first: Sequence[str], path: str) -> str | None:
    """The copy of ``path`` a merged view shows, or None if no layer has it (or one deleted it)."""
    if not path.strip("/"):
        return layers_top_first[0] if layers_top_first else None
    copies, _ = layer_copies(layers_top_first, path)
    return copies[0] if copies else None
