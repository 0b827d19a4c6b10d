"""Small file helpers every phase needs: write a file, write JSON atomically, remove any tree."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Any


def write_file(path: str, text: str) -> None:
    """One write of ``text``: /proc files (id maps, setgroups) take their content in a single write."""
    with open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str, data: Any) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def open_no_symlinks(path: str) -> int:
    """An O_PATH fd of ``path`` (absolute) reached without following any symlink on the way: what another
    sandbox could have swapped in under a directory it may write is refused (ELOOP), never followed."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            step = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = step
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(
                    errno.ELOOP, "a symlink on its path, never followed (one may have been planted there)", path
                )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_tree(path: str) -> None:
    """rmtree that also removes read-only directories a layer or overlay work dir may hold."""

    def fix(func: Any, target: str, _exc: Any) -> None:
        parent = os.path.dirname(target)
        for p in (parent, target):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(p).st_mode):
                    os.chmod(p, 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            _rmtree(target, fix)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)

    if os.path.lexists(path):
        _rmtree(path, fix)


def _rmtree(path: str, handler: Any) -> None:
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=handler)
    else:  # onerror is deprecated from 3.12 on: a warning there would fail suites run with -W error
        shutil.rmtree(path, onerror=handler)


def tree_size(path: str) -> int:
    """Bytes a tree occupies on disk."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
