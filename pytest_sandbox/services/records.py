"""What running sessions have up, for ``pytest-sandbox services ls``: one JSON record per pytest process,
in the store's ``services/`` directory, rewritten as its services start and stop and removed at its end. A
record whose pytest is gone (killed before it could remove it) is dropped by the next reader."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from ..linux import process

DIRECTORY = "services"


def _identity(pid: int | str = "self") -> str:
    """The process's start time (field 22 of its stat): a reused pid has another."""
    return process.stat_fields(pid)[19].decode()


class Records:
    """This pytest process's record."""

    def __init__(self, store_root: str, rootdir: str) -> None:
        self.directory = os.path.join(store_root, DIRECTORY)
        self.path = os.path.join(self.directory, f"{os.getpid()}.json")
        self.rootdir = rootdir

    def write(self, services: list[dict[str, Any]]) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        record = {"pid": os.getpid(), "identity": _identity(), "rootdir": self.rootdir, "services": services}
        partial = f"{self.path}.partial"
        with open(partial, "w") as file:
            json.dump(record, file)
        os.replace(partial, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def running(store_root: str) -> list[dict[str, Any]]:
    """The records of pytest processes still running; those of ended ones are removed."""
    directory = os.path.join(store_root, DIRECTORY)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if not name.endswith(".json"):
            continue
        try:
            with open(path) as file:
                record = json.load(file)
            alive = _identity(int(record["pid"])) == record["identity"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            alive = False
        if alive:
            found.append(record)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return found
