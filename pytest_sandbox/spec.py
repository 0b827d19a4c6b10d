"""One frozen, validated description of a test's sandbox.

The session's defaults come from ``settings`` (command line > environment > ini);
``@pytest.mark.container(...)`` keywords beat them (closest marker wins) and
``--sandbox-stress`` beats the markers. Every error names where the bad value came
from and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from .layers.format import NAME_RE, NAME_RULE

MARKER = "container"
NETWORK_MODES = ("none", "host")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to build one test's sandbox; hashable so plans can be cached."""

    hostname: str = "sandbox"
    network: str = "none"
    writable: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    memory: int | None = None  # bytes
    cpus: float | None = None  # share of one CPU's time: 0.5 = half a core
    pids: int | None = None  # most processes and threads at once
    io: tuple[tuple[str, int], ...] = ()  # (read_bps|write_bps|read_iops|write_iops, value)
    timeout: float | None = None  # seconds for the whole runtest protocol
    image: str | None = None  # an image of images/ or of the store: sandbox.run() runs in it

    @property
    def limits(self) -> tuple[str, ...]:
        """Names of the resource limits this spec sets."""
        names = [name for name in ("memory", "cpus", "pids", "timeout") if getattr(self, name) is not None]
        return tuple(names + (["io"] if self.io else []))

    def replace(self, **changes: Any) -> SandboxSpec:
        """A copy with some fields changed and validated again (for ``pytest_sandbox_spec`` hooks)."""
        return validate(dataclasses.asdict(self) | changes, "pytest_sandbox_spec hook")


FIELDS = tuple(f.name for f in dataclasses.fields(SandboxSpec))


def bad_value(where: str, field: str, value: object, allowed: str) -> pytest.UsageError:
    return pytest.UsageError(f"{where}: invalid {field}={value!r}: {allowed}")


def _check_hostname(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _HOSTNAME_RE.match(value):
        raise bad_value(
            where, "hostname", value, "expected a host name of letters, digits, '-' and '.', at most 64 characters"
        )
    return value


def _check_network(value: object, where: str) -> str:
    if value not in NETWORK_MODES:
        raise bad_value(where, "network", value, f"allowed: {', '.join(map(repr, NETWORK_MODES))}")
    return str(value)


def _check_writable(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise bad_value(where, "writable", value, "expected a list of absolute paths")
    paths = []
    for path in value:
        if not isinstance(path, (str, os.PathLike)) or not os.path.isabs(os.fspath(path)):
            raise bad_value(where, "writable", path, "each entry must be an absolute path")
        normal = os.path.normpath(os.fspath(path))
        if normal == "/":
            raise bad_value(where, "writable", path, "the whole root cannot be made writable")
        paths.append(normal)
    return tuple(sorted(set(paths)))


def _as_mapping(value: object) -> object:
    """A normalized tuple of pairs (SandboxSpec.env, .io) back as a mapping; anything else unchanged."""
    if isinstance(value, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
        return dict(value)
    return value


def _check_env(value: object, where: str) -> tuple[tuple[str, str], ...]:
    value = _as_mapping(value)
    if not isinstance(value, Mapping):
        raise bad_value(where, "env", value, "expected a mapping of NAME to string value")
    items = []
    for name, val in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise bad_value(where, "env", name, "names are letters, digits and '_', not starting with a digit")
        if not isinstance(val, str) or "\0" in val:
            raise bad_value(where, "env", {name: val}, "values must be strings without NUL bytes")
        items.append((name, val))
    return tuple(sorted(items))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
IO_KEYS = ("read_bps", "write_bps", "read_iops", "write_iops")


def parse_size(value: object) -> int | None:
    """'256M', '1.5G', '512KiB', 1048576 -> bytes; None if it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _check_memory(value: object, where: str) -> int:
    size = parse_size(value)
    if size is None or size < 1024 * 1024:
        raise bad_value(
            where, "memory", value, "expected a size of at least 1M, like '256M', '1G' or a number of bytes"
        )
    return size


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_cpus(value: object, where: str) -> float:
    number = _number(value)
    if number is None or not number > 0 or number > 1024:
        raise bad_value(where, "cpus", value, "expected a number of CPUs greater than 0, like 0.5 or 2")
    return number


def _check_pids(value: object, where: str) -> int:
    number = _number(value)
    if number is None or number != int(number) or number < 1:
        raise bad_value(where, "pids", value, "expected a whole number of processes, at least 1")
    return int(number)


def _check_timeout(value: object, where: str) -> float:
    number = _number(value)
    if number is None or not number > 0:
        raise bad_value(where, "timeout", value, "expected a number of seconds greater than 0")
    return number


def _check_io(value: object, where: str) -> tuple[tuple[str, int], ...]:
    value = _as_mapping(value)
    if not isinstance(value, Mapping):
        raise bad_value(where, "io", value, f"expected a mapping with keys {', '.join(IO_KEYS)}")
    items = []
    for key, raw in value.items():
        if key not in IO_KEYS:
            raise bad_value(where, "io", key, f"unknown io key; allowed: {', '.join(IO_KEYS)}")
        amount = parse_size(raw) if key.endswith("bps") else _number(raw)
        if amount is None or amount < 1 or amount != int(amount):
            kind = "a size like '10M'" if key.endswith("bps") else "a whole number of operations per second"
            raise bad_value(where, "io", {key: raw}, f"expected {kind}, at least 1")
        items.append((key, int(amount)))
    return tuple(sorted(items))


def _check_image(value: object, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise bad_value(where, "image", value, f"expected an image name: {NAME_RULE}")
    return value


CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "image": _check_image,
    "hostname": _check_hostname,
    "network": _check_network,
    "writable": _check_writable,
    "env": _check_env,
    "memory": _check_memory,
    "cpus": _check_cpus,
    "pids": _check_pids,
    "io": _check_io,
    "timeout": _check_timeout,
}
LIMIT_FIELDS = ("memory", "cpus", "pids", "timeout")  # also settable by option, ini and --sandbox-stress


def validate(values: Mapping[str, Any], where: str) -> SandboxSpec:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise pytest.UsageError(
            f"{where}: unknown sandbox option(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}"
        )
    checked: dict[str, Any] = {key: CHECKS[key](val, where) for key, val in values.items() if val is not None}
    return SandboxSpec(**checked)


def check_env_lines(lines: list[str], where: str) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` lines (the ``sandbox_env`` ini key) as a checked env."""
    env = {}
    for line in lines:
        name, sep, val = line.partition("=")
        if not sep:
            raise bad_value(where, "env", line, "each line must be NAME=VALUE")
        env[name.strip()] = val
    return _check_env(env, where)


def marker_values(item: pytest.Item) -> dict[str, Any] | None:
    """Merged keywords of all ``container`` markers on the item, closest first; None if unmarked."""
    markers = list(item.iter_markers(MARKER))
    if not markers:
        return None
    merged: dict[str, Any] = {}
    for marker in reversed(markers):  # farthest first, so the closest marker overrides
        if marker.args:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.{MARKER} takes keyword arguments only, got {marker.args!r}"
            )
        merged.update(marker.kwargs)
    return merged


def spec_for_item(
    item: pytest.Item, defaults: Mapping[str, Any], sandbox_all: bool, overrides: Mapping[str, Any] | None = None
) -> SandboxSpec | None:
    """The item's spec, or None when it runs unsandboxed. ``overrides`` beat the markers (stress runs)."""
    marked = marker_values(item)
    if marked is None and not sandbox_all:
        return None
    values = dict(defaults)
    if marked:
        where = f"{item.nodeid}: @pytest.mark.{MARKER}"
        unknown = sorted(set(marked) - set(FIELDS))
        if unknown:
            raise pytest.UsageError(f"{where}: unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
        values.update({key: CHECKS[key](val, where) for key, val in marked.items()})
    values.update(overrides or {})
    return validate(values, item.nodeid)
