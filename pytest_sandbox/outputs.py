"""Declared outputs: what a sandbox writes under them reaches the host; nothing else it writes does.

A sandbox's writable places are overlays whose writes die with it. Some writes are what the
user asked for: pytest's cache (``--lf``, ``config.cache.set``), hypothesis's example database,
the paths of the ``sandbox_outputs`` ini key. When its last test is over, the test process
sends the regular files its overlay uppers hold under those paths; pytest writes each one after
checking that it lies under a declared output, creating directories and never following a
symlink on the way. Deletions and symlinks are not carried: a sandbox can add and change
output files, never remove one.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from .linux.mounts import is_under
from .protocol import ProtocolError

MAX_FILE = 64 * 2**20  # bytes of one output file carried (a message holds it in base64, under protocol.MAX_MESSAGE)
KINDS = ("output", "output-too-large", "output-directory")  # the messages that carry outputs
# Below pytest's cache directory, records of processes the sandbox ran, which died with it: pytest-xprocess keeps
# each server's pid there to find it again in the next run, and a sandbox's pid names another process on the host
# (a later run would take that one for its server, and signal it at the end).
NOT_CARRIED = ("d/.xprocess/",)
# Files pytest or Python would run or read as configuration, from an output inside the project: a conftest.py
# or a test module there is collected by the next run (under --sandbox=all, in the pytest process), an
# __init__.py makes a package that shadows a module of the same name, a .pth runs in the next interpreter that
# has the directory in its site dirs, bytecode and extension modules load in place of sources, an ini file
# configures a run started there. No plugin's data (snapshots, expected files, caches, reports) is any of these.
# What a later run would execute, were an output to carry it: Python, pytest's configuration files (their addopts
# load plugins), and test files that plugins run (notebooks: nbval, nbmake; Robot Framework; Tavern).
RUN_AS_CODE = ("pytest.ini", ".pytest.ini", "pytest.toml", ".pytest.toml", "tox.ini", "setup.cfg", "pyproject.toml")
RUN_AS_CODE_SUFFIXES = (
    ".py",
    ".pyc",
    ".pyo",
    ".pyw",
    ".pyd",
    ".so",
    ".pth",
    ".ipynb",
    ".robot",
    ".tavern.yaml",
    ".tavern.yml",
)
# Text files that doctest runners collect (pytest's own takes test*.txt, and any .txt or .rst named on the
# command line; pytest-doctestplus, sybil, pytest-markdown-docs: .rst, .md, .tex): code only if they hold
# an example or a Python block, so data files of these kinds are still carried.
DOCTEST_SUFFIXES = (".txt", ".rst", ".md", ".markdown", ".tex")
_EXAMPLES = re.compile(
    rb"^\s*>>>|```\s*\{?\s*(py|python|pycon)\b|\.\.\s+(code-block|code|sourcecode)::\s*(py|python|pycon)\b"
    rb"|\.\.\s+(testcode|testsetup|doctest|ipython|invisible-code-block)::",
    re.MULTILINE | re.IGNORECASE,
)


def named_as_code(name: str) -> bool:
    """Whether a later pytest run would execute a file of this name, whatever it holds."""
    return name in RUN_AS_CODE or name.endswith(RUN_AS_CODE_SUFFIXES)


def holds_examples(name: str, data: bytes) -> bool:
    """Whether a text file of a doctest runner's kinds holds an example or a Python block, which it would run."""
    return name.lower().endswith(DOCTEST_SUFFIXES) and _EXAMPLES.search(data) is not None


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def declared(config: pytest.Config, extra: Iterable[str]) -> tuple[str, ...]:
    """The session's outputs as absolute paths: pytest's cache directory, hypothesis's database, and
    ``sandbox_outputs`` (relative to rootdir, inside it)."""
    rootdir = str(config.rootpath)
    found = []
    if config.pluginmanager.has_plugin("cacheprovider"):
        found.append(os.path.join(rootdir, str(config.getini("cache_dir"))))
    found.append(os.path.join(os.getcwd(), ".hypothesis"))
    for line in extra:
        path = os.path.normpath(os.path.join(rootdir, line))
        if os.path.isabs(line) or not is_under(path, rootdir) or path == rootdir:
            raise pytest.UsageError(
                f"sandbox_outputs: {line!r} is not a path inside the rootdir {rootdir} (a file or directory "
                "relative to it, not the rootdir itself)"
            )
        found.append(path)
    return tuple(dict.fromkeys(os.path.normpath(p) for p in found))


def in_uppers(overlays: Iterable[str], outputs: Iterable[str]) -> list[tuple[str, str]]:
    """(output, where its writes are in the scratch tmpfs) for each output inside a writable place
    (``<index>/upper/...``, as ``rootfs.build`` lays the uppers out)."""
    places = list(enumerate(overlays))
    found = []
    for output in outputs:
        holders = [(index, target) for index, target in places if is_under(output, target)]
        if holders:
            index, target = max(holders, key=lambda holder: len(holder[1]))
            relative = os.path.relpath(output, target)
            found.append((output, f"{index}/upper" + ("" if relative == "." else f"/{relative}")))
    return found


# -- in the test process -------------------------------------------------------------------------


def collect(scratch_fd: int, uppers: Iterable[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """One "output" message per regular file the sandbox wrote under an output, or as the output (an
    output may name a file), and an "output-directory" one per empty directory (pytest-benchmark makes its
    storage directory in every run, empty until a run is saved)."""
    for output, upper in uppers:
        *parents, name = upper.split("/")
        fd = _open_below(scratch_fd, parents, create=False)
        if fd is None:
            continue
        try:
            yield from _entry(fd, name, output)
        finally:
            os.close(fd)


def _entry(dir_fd: int, name: str, path: str) -> Iterator[dict[str, Any]]:
    """The regular files of ``name`` in ``dir_fd``: itself, or what a directory holds; nothing else."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(info.st_mode):
        try:
            sub = os.open(name, _DIRECTORY, dir_fd=dir_fd)
        except PermissionError:
            return
        try:
            entries = [entry.name for entry in os.scandir(sub)]
            if not entries:
                yield {"type": "output-directory", "path": path}
            for entry in entries:
                yield from _entry(sub, entry, f"{path}/{entry}")
        finally:
            os.close(sub)
    elif stat.S_ISREG(info.st_mode) and info.st_size > MAX_FILE:  # pytest hears of it, without its bytes
        yield {"type": "output-too-large", "path": path, "size": info.st_size}
    elif stat.S_ISREG(info.st_mode):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except PermissionError:  # a file the sandbox made unreadable to itself: not carried, the others are
            return
        with os.fdopen(fd, "rb") as file:
            data = file.read(MAX_FILE + 1)  # it may have grown since its size was read
        if len(data) > MAX_FILE:
            yield {"type": "output-too-large", "path": path, "size": len(data)}
            return
        yield {
            "type": "output",
            "path": path,
            "data": base64.b64encode(data).decode(),
            "mode": 0o755 if info.st_mode & stat.S_IXUSR else 0o644,
        }


def _open_below(dir_fd: int, parts: list[str], create: bool) -> int | None:
    """The directory ``parts`` below ``dir_fd``, each step without following a symlink; None if missing."""
    fd = os.dup(dir_fd)
    for part in parts:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
        try:
            next_fd = os.open(part, _DIRECTORY, dir_fd=fd)
        except FileNotFoundError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
        fd = next_fd
    return fd


# -- in pytest ------------------------------------------------------------------------------------


def write(
    message: dict[str, Any],
    outputs: Iterable[str],
    anchors: Iterable[str] | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """Write one output file a sandbox sent, if its path lies under a declared output.

    With ``anchors`` (places the user chose: the rootdir, the directory pytest started in), the file is reached
    from the anchor that holds it without following any symlink below it, directories made on the way;
    without, from the output itself (the suite's own configuration named it, symlinks and all). A file that
    cannot be written is a warning, or ``say``'s."""
    path = message["path"]
    root = next((out for out in outputs if is_under(path, out)), None)
    if not os.path.isabs(path) or os.path.normpath(path) != path or "\0" in path or root is None:
        raise ProtocolError(f"an output outside the declared outputs: {path!r}")
    relative = os.path.relpath(path, root)
    if relative.startswith(NOT_CARRIED) or "__pycache__" in relative.split("/"):
        return
    name = os.path.basename(path)
    if named_as_code(name):
        _tell(say, f"pytest-sandbox: the output {path} is not carried: a later run would execute it")
        return
    if path == root:  # an output that names a file: written in its directory, made as for any output
        root = os.path.dirname(root)
    if message["type"] == "output-directory":  # an empty one: made, as the directories files are written in
        try:
            os.close(_directory_for(path, root, os.path.relpath(path, root).split("/"), anchors))
        except (OSError, ValueError) as exc:
            _tell(say, f"pytest-sandbox: cannot make the output directory {path}: {exc}")
        return
    if message["type"] == "output-too-large":
        _tell(say, f"pytest-sandbox: the output {path} is not carried: {int(message['size'])} bytes, past {MAX_FILE}")
        return
    if message["mode"] not in (0o644, 0o755):
        raise ProtocolError(f"an output with mode {message['mode']!r}")
    try:
        data = base64.b64decode(message["data"], validate=True)
    except ValueError:
        raise ProtocolError(f"an output whose data is not base64: {path!r}") from None
    if holds_examples(name, data):
        _tell(say, f"pytest-sandbox: the output {path} is not carried: a later run would execute it")
        return
    parts = os.path.relpath(path, root).split("/")
    try:
        dir_fd = _directory_for(path, root, parts[:-1], anchors)
        try:
            _replace(dir_fd, parts[-1], data, message["mode"])
        finally:
            os.close(dir_fd)
    except (OSError, ValueError) as exc:  # ValueError: a name the file system's encoding cannot take
        _tell(say, f"pytest-sandbox: cannot write the output {path}: {exc}")


def _directory_for(path: str, root: str, below_root: list[str], anchors: Iterable[str] | None) -> int:
    """The directory ``below_root`` under ``root`` (made as needed), reached as ``write`` says."""
    if anchors is None:
        os.makedirs(root, exist_ok=True)
        base_fd = os.open(root, _DIRECTORY)
        below = below_root
    else:
        anchor = max((place for place in anchors if is_under(root, place)), key=len, default=None)
        if anchor is None:
            raise ProtocolError(f"an output outside the places outputs may be written: {path!r}")
        base_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        between = os.path.relpath(root, anchor)
        below = ([] if between == "." else between.split("/")) + below_root
        if ".git" in below:  # hooks there would run at the next commit
            os.close(base_fd)
            raise ProtocolError(f"an output in a .git directory: {path!r}")
    try:
        dir_fd = _open_below(base_fd, below, create=True)
    finally:
        os.close(base_fd)
    assert dir_fd is not None
    return dir_fd


def _tell(say: Callable[[str], None] | None, text: str) -> None:
    if say is not None:
        say(text)
    else:
        warnings.warn(pytest.PytestWarning(text), stacklevel=2)


def _replace(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    temporary = f".sandbox-output-{os.getpid()}-{secrets.token_hex(4)}"  # short: any name may be 255 bytes long
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise
