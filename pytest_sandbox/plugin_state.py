"""What well-known plugins keep in the pytest process, carried into and out of a sandbox.

A plugin's session state lives in the pytest process; a sandbox is a fork that ends with its test.
What the sandbox measured for such a plugin comes back as a checked message (coverage); what a
plugin would send to the pytest process over an inherited socket (pytest-rerunfailures' xdist
database) is served by a local copy, since the sandbox keeps no host socket.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterable
from typing import Any

from . import protocol
from .linux.mounts import is_under


def adapt_in_sandbox(config: Any) -> None:
    """Point plugins that talk to the pytest process at local state instead."""
    database = getattr(config, "failures_db", None)
    if type(database).__name__ == "ClientStatusDB":  # pytest-rerunfailures under xdist
        connection = getattr(database, "sock", None)
        if isinstance(connection, socket.socket):
            # Its fd went with the host's others; closed again when the object is dropped, it would
            # close whatever reuses that number and warn (an error under filterwarnings=error).
            connection.detach()
        config.failures_db = sys.modules[type(database).__module__].StatusDB()


def _active_coverage() -> Any:
    coverage = sys.modules.get("coverage")
    current = getattr(getattr(coverage, "Coverage", None), "current", None)
    return current() if callable(current) else None


def coverage_message() -> dict[str, Any] | None:
    """What coverage measured in this process (a fork of pytest's, whose collector it inherited), as lines
    or arcs per context; None without an active coverage."""
    cov = _active_coverage()
    if cov is None:
        return None
    data = cov.get_data()  # a fork starts its own data file, in the sandbox's throwaway layer
    arcs = data.has_arcs()
    contexts: dict[str, dict[str, list[Any]]] = {}
    for context in sorted(data.measured_contexts()):
        data.set_query_contexts([f"^{re.escape(context)}$"] if context else None)
        files = {}
        for path in data.measured_files():
            found = data.arcs(path) if arcs else data.lines(path)
            if found:
                files[path] = sorted(found)
        if files:
            contexts[context] = files
    data.set_query_contexts(None)
    return {"type": "coverage", "arcs": arcs, "contexts": contexts}


def _checked_files(files: object, arcs: bool, hidden: Iterable[str]) -> dict[str, list[Any]]:
    """Measured files as coverage takes them; only paths the sandbox could see (nothing under a hidden
    place), so a report built from them shows no file the test could not have read itself."""
    if not isinstance(files, dict):
        raise protocol.ProtocolError("coverage whose files are not a mapping")
    checked: dict[str, list[Any]] = {}
    for path, numbers in files.items():
        real = os.path.realpath(path) if os.path.isabs(path) and "\0" not in path else ""
        if not real or any(is_under(real, place) for place in hidden):
            raise protocol.ProtocolError(f"coverage of a file the sandbox cannot see: {path!r}")
        if not isinstance(numbers, list) or not all(_is_measure(n, arcs) for n in numbers):
            raise protocol.ProtocolError(f"coverage of {path!r} that is not a list of {'arcs' if arcs else 'lines'}")
        checked[path] = [tuple(n) for n in numbers] if arcs else numbers
    return checked


def _is_measure(value: object, arcs: bool) -> bool:
    if arcs:
        return isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)
    return _is_int(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_coverage(message: dict[str, Any], hidden: Iterable[str]) -> None:
    """Add a sandbox's coverage to the pytest process's data, which pytest-cov saves and combines."""
    cov = _active_coverage()
    if cov is None or not isinstance(message["contexts"], dict):
        return
    hidden = [os.path.realpath(place) for place in hidden]
    checked = {
        context: _checked_files(files, message["arcs"], hidden) for context, files in message["contexts"].items()
    }
    data = cov.get_data()
    if data.measured_files() and data.has_arcs() != message["arcs"]:
        raise protocol.ProtocolError("coverage of lines where pytest measures arcs, or the reverse")
    for context, files in checked.items():
        if context:
            data.set_context(context)
        if message["arcs"]:
            data.add_arcs(files)
        else:
            data.add_lines(files)
    if any(checked):
        data.set_context(None)
