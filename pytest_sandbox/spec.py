"""One frozen, validated description of a test's sandbox.

The session's defaults come from ``settings`` (command line > environment > ini);
``@pytest.mark.container(...)`` keywords beat them (closest marker wins) and
``--sandbox-stress`` beats the markers. Every error names where the bad value came
from and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any

import pytest

from . import volumes as _volumes
from .credentials import check_place, check_variable_pattern
from .layers import registry
from .layers.format import NAME_RE, NAME_RULE
from .linux import mounts

MARKER = "container"
NETWORK_MODES = ("none", "host", "pod")
# Always matched with fullmatch: "$" would let a trailing newline through.
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
HOSTNAME_MAX = 64  # the kernel's nodename holds 64 bytes; each DNS label at most 63
HOSTNAME_RULE = (
    "expected a host name of '.'-separated labels of 1 to 63 ASCII letters, digits and '-' "
    f"(not starting or ending with '-'), at most {HOSTNAME_MAX} characters in all"
)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_NAME_RULE = "names are ASCII letters, digits and '_', not starting with a digit"

# Bounds of the limits: each is what the kernel (or Python) can honour exactly, so a value
# inside them is never silently clamped or refused at run time.
MEMORY_MIN = 1024 * 1024
MEMORY_MAX = 2**62  # RLIMIT_AS adds the test's own mappings to it and must stay below 2**63
CPUS_MIN = 0.01  # a CFS quota is at least 1 ms per 100 ms period
CPUS_MAX = 1024
PIDS_MAX = 4194304  # PID_MAX_LIMIT: pids.max refuses more
TIMEOUT_MAX = 365 * 24 * 3600  # a year; far beyond it time arithmetic overflows
IO_BPS_MAX = 2**63 - 1
IO_IOPS_MAX = 2**32 - 2  # iops are 32-bit in the kernel, and 2**32 - 1 means unlimited
NOT_WRITABLE = ("/proc", "/sys", "/dev")  # each sandbox gets its own; host ones must never be writable
WRITABLE_RULE = "allowed: existing directories by absolute path, not the root, not under /proc, /sys or /dev"


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to build one test's sandbox; hashable so plans can be cached."""

    hostname: str = "sandbox"
    network: str = "none"
    writable: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    memory: int | None = None  # bytes
    tmpfs_size: int | None = None  # bytes each scratch tmpfs may hold (None: a quarter of RAM, or half of memory)
    cpus: float | None = None  # share of one CPU's time: 0.5 = half a core
    pids: int | None = None  # most processes and threads at once
    io: tuple[tuple[str, int], ...] = ()  # (read_bps|write_bps|read_iops|write_iops, value)
    timeout: float | None = None  # seconds for the whole runtest protocol
    image: str | None = None  # an image of images/ or of the store: sandbox.run() runs in it
    hide: tuple[str, ...] = ()  # credential places masked besides the defaults ("!place" un-hides a default)
    env_pass: tuple[str, ...] = ()  # credential-looking variables (names or patterns) let through
    volumes: tuple[tuple[str, str, str], ...] = ()  # (volume name or host path, target, "rw"|"ro"), by target

    @property
    def limits(self) -> tuple[str, ...]:
        """Names of the resource limits this spec sets."""
        names = [name for name in ("memory", "cpus", "pids", "timeout") if getattr(self, name) is not None]
        return tuple(names + (["io"] if self.io else []))

    @property
    def fits_scope_sandbox(self) -> bool:
        """Its tests may share a scope sandbox, each in a fork over a layer of its own (--sandbox-scope=test).
        Not with limits (a test's usage, OOM and timeout are its own cgroup's), nor in an image (no layer over
        its root yet), nor with writable= places on overlayfs (no room left to stack a layer)."""
        return not self.limits and self.image is None and not any(mounts.on_overlayfs(path) for path in self.writable)

    def replace(self, **changes: Any) -> SandboxSpec:
        """A copy with some fields changed and validated again (for ``pytest_sandbox_spec`` hooks)."""
        return validate(dataclasses.asdict(self) | changes, "pytest_sandbox_spec hook")


FIELDS = tuple(f.name for f in dataclasses.fields(SandboxSpec))


REPR_MAX = 100  # characters of a bad value an error shows


def shown(value: object) -> str:
    """``repr(value)``, shortened in the middle when long; huge ints (whose repr raises) by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except ValueError:  # an int too big for str(), nested in a container
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= REPR_MAX else f"{text[: REPR_MAX - 20]}...{text[-15:]}"


def bad_value(where: str, field: str, value: object, allowed: str) -> pytest.UsageError:
    return pytest.UsageError(f"{where}: invalid {field}={shown(value)}: {allowed}")


def _check_hostname(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) > HOSTNAME_MAX or not _HOSTNAME_RE.fullmatch(value):
        raise bad_value(where, "hostname", value, HOSTNAME_RULE)
    return value


def _check_network(value: object, where: str) -> str:
    if value not in NETWORK_MODES:
        raise bad_value(where, "network", value, f"allowed: {', '.join(map(repr, NETWORK_MODES))}")
    return str(value)


def _forbidden_place(path: str) -> str | None:
    """Why ``path`` (absolute, normalised) may not be writable, or None."""
    path = "/" + path.lstrip("/")  # normpath keeps a leading "//"
    if path == "/":
        return "the whole root cannot be made writable"
    for place in NOT_WRITABLE:
        if path == place or path.startswith(place + "/"):
            return f"{place} and everything under it cannot be made writable"
    return None


def _check_writable_path(path: object, where: str) -> str:
    """One ``writable`` entry as the real directory it names (symlinks resolved, as the sandbox mounts it)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or "\0" in text or not text.startswith("/"):
        raise bad_value(where, "writable", path, f"not an absolute path; {WRITABLE_RULE}")
    real = os.path.realpath(text)
    for place in (os.path.normpath(text), real):
        why = _forbidden_place(place)
        if why:
            raise bad_value(where, "writable", path, f"{why}; {WRITABLE_RULE}")
    if not os.path.isdir(real):
        raise bad_value(where, "writable", path, f"not an existing directory; {WRITABLE_RULE}")
    return real


def _check_writable(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable):
        raise bad_value(where, "writable", value, f"expected a list of paths; {WRITABLE_RULE}")
    return tuple(sorted({_check_writable_path(path, where) for path in value}))


def _check_hide(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise bad_value(where, "hide", value, "expected a list of absolute paths or ~/paths")
    places = []
    for entry in value:
        normal = check_place(os.fspath(entry)) if isinstance(entry, (str, os.PathLike)) else None
        if normal is None:
            raise bad_value(
                where, "hide", entry, "each entry must be an absolute path or ~/path (not /), '!' first to un-hide"
            )
        places.append(normal)
    return tuple(sorted(set(places)))


def _check_env_pass(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise bad_value(where, "env_pass", value, "expected a list of variable names")
    names = []
    for name in value:
        if not isinstance(name, str) or not check_variable_pattern(name):
            raise bad_value(
                where, "env_pass", name, "each entry must be a variable name or shell pattern, no '=' or spaces"
            )
        names.append(name)
    return tuple(sorted(set(names)))


def _check_volumes(value: object, where: str) -> tuple[tuple[str, str, str], ...]:
    """``{source: "target[:ro|:rw]"}`` (or the normalized triples of a spec) as sorted triples; a relative
    host path stays relative here: ``resolve_volumes`` makes it the rootdir's."""
    pairs: list[tuple[object, object]]
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 3 for v in value):
        pairs = [(source, f"{target}:{mode}") for source, target, mode in value]
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise bad_value(where, "volumes", value, _volumes.VOLUMES_RULE)
    by_target: dict[str, tuple[str, str, str]] = {}
    for raw_source, raw_target in pairs:
        source = raw_source.name if isinstance(raw_source, _volumes.Volume) else raw_source
        source = os.fspath(source) if isinstance(source, os.PathLike) else source
        if not isinstance(source, str) or not source or "\0" in source:
            raise bad_value(where, "volumes", raw_source, f"not a volume name or path; {_volumes.VOLUMES_RULE}")
        if not _volumes.is_named(source):
            if "/" not in source:  # '.', '..', '~x', 'a b': neither a name nor a path
                raise bad_value(where, "volumes", raw_source, f"{_volumes.NAME_RULE}; a host path has a '/'")
            if ".." in source.split("/"):
                raise bad_value(where, "volumes", raw_source, "a host path may not contain '..'")
        if not isinstance(raw_target, str):
            raise bad_value(where, "volumes", {raw_source: raw_target}, _volumes.VOLUMES_RULE)
        target, mode = raw_target, "rw"
        head, sep, tail = raw_target.rpartition(":")
        if sep:
            target, mode = head, tail
        if mode not in _volumes.MODES:
            raise bad_value(where, "volumes", {raw_source: raw_target}, "unknown mode; allowed: ':ro', ':rw'")
        why = _volumes.check_target(target)
        if why:
            raise bad_value(where, "volumes", {raw_source: raw_target}, why)
        target = os.path.normpath(target)
        if target in by_target:
            raise bad_value(where, "volumes", {raw_source: raw_target}, f"two volumes on {target}; one each")
        if not _volumes.is_named(source):  # "out/" or "./out" stays a path, never becomes the volume "out"
            source = os.path.normpath(source)
            source = source if source.startswith("/") else f"./{source}"
        by_target[target] = (source, target, mode)
    return tuple(sorted(by_target.values(), key=lambda v: (v[1].count("/"), v[1])))


def resolve_volumes(
    volumes: tuple[tuple[str, str, str], ...], rootdir: str, where: str
) -> tuple[tuple[str, str, str], ...]:
    """Host path sources as the real paths the sandbox binds (relative ones from ``rootdir``); they must exist."""
    resolved = []
    for source, target, mode in volumes:
        if not _volumes.is_named(source):
            try:
                source = _volumes.resolve_source(source, rootdir)
            except FileNotFoundError:
                why = f"no such host path (relative ones are from {rootdir})"
                raise bad_value(where, "volumes", {source: f"{target}:{mode}"}, why) from None
            except OSError as exc:
                why = f"{exc.strerror}: {exc.filename}"
                raise bad_value(where, "volumes", {source: f"{target}:{mode}"}, why) from None
        resolved.append((source, target, mode))
    return tuple(resolved)


def with_resolved_volumes(spec: SandboxSpec, rootdir: str, where: str) -> SandboxSpec:
    """``spec`` with relative host path volumes (a hook's ``spec.replace(volumes=...)``) made the rootdir's."""
    if not any(source.startswith("./") for source, _, _ in spec.volumes):
        return spec
    return dataclasses.replace(spec, volumes=resolve_volumes(spec.volumes, rootdir, where))


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
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise bad_value(where, "env", name, ENV_NAME_RULE)
        if not isinstance(val, str) or "\0" in val:
            raise bad_value(where, "env", {name: val}, "values must be strings without NUL bytes")
        items.append((name, val))
    return tuple(sorted(items))


_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
IO_KEYS = ("read_bps", "write_bps", "read_iops", "write_iops")


def parse_size(value: object) -> int | None:
    """'256M', '1.5G', '512KiB', 1048576 -> bytes; None if it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        return None
    try:
        amount = Fraction(match.group(1))  # exact: no float overflow or rounding
    except ValueError:  # more digits than int() converts
        return None
    return int(amount * _UNITS[match.group(2).lower()])


def _size(value: object, where: str, field: str, allowed: str, least: int = MEMORY_MIN) -> int:
    size = parse_size(value)
    if size is None or not least <= size <= MEMORY_MAX:
        raise bad_value(where, field, value, allowed)
    return size


def _check_memory(value: object, where: str) -> int:
    return _size(
        value,
        where,
        "memory",
        f"expected a size from 1M to {MEMORY_MAX} bytes (4 EiB), like '256M', '1G' or a number of bytes",
    )


TMPFS_MIN = 1 << 20


def _check_tmpfs_size(value: object, where: str) -> int:
    return _size(
        value,
        where,
        "tmpfs_size",
        f"expected a size from 1M to {MEMORY_MAX} bytes, like '64M' or '2G' (each of /tmp, /var/tmp, /run, "
        "/dev/shm and the writable layer may hold that much)",
        least=TMPFS_MIN,
    )


def _number(value: object) -> int | float | None:
    """An int, a finite float, or a string of one; None otherwise (bools, inf, nan).

    Ints stay ints, so comparing a huge one with a bound is exact and never overflows.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _whole(value: object) -> int | None:
    """A whole number (an int, or a float or string with nothing after the point); None otherwise."""
    number = _number(value)
    if isinstance(number, float):
        return int(number) if number.is_integer() else None
    return number


def _check_cpus(value: object, where: str) -> float:
    number = _number(value)
    if number is None or not CPUS_MIN <= number <= CPUS_MAX:
        raise bad_value(where, "cpus", value, f"expected a number of CPUs from {CPUS_MIN} to {CPUS_MAX}, like 0.5 or 2")
    return float(number)


def _check_pids(value: object, where: str) -> int:
    number = _whole(value)
    if number is None or not 1 <= number <= PIDS_MAX:
        raise bad_value(where, "pids", value, f"expected a whole number of processes from 1 to {PIDS_MAX}")
    return number


def _check_timeout(value: object, where: str) -> float:
    number = _number(value)
    if number is None or not 0 < number <= TIMEOUT_MAX:
        raise bad_value(
            where, "timeout", value, f"expected a number of seconds greater than 0, at most {TIMEOUT_MAX} (a year)"
        )
    return float(number)


def _check_io(value: object, where: str) -> tuple[tuple[str, int], ...]:
    value = _as_mapping(value)
    if not isinstance(value, Mapping):
        raise bad_value(where, "io", value, f"expected a mapping with keys {', '.join(IO_KEYS)}")
    items = []
    for key, raw in value.items():
        if key not in IO_KEYS:
            raise bad_value(where, "io", key, f"unknown io key; allowed: {', '.join(IO_KEYS)}")
        bps = key.endswith("bps")
        amount = parse_size(raw) if bps else _whole(raw)
        most = IO_BPS_MAX if bps else IO_IOPS_MAX
        if amount is None or not 1 <= amount <= most:
            kind = "a size like '10M'" if bps else "a whole number of operations per second"
            raise bad_value(where, "io", {key: raw}, f"expected {kind}, from 1 to {most}")
        items.append((key, amount))
    return tuple(sorted(items))


IMAGE_RULE = f"expected an image name ({NAME_RULE}) or a registry's {registry.REFERENCE_RULE}"


def _check_image(value: object, where: str) -> str:
    """An image of images/ or the store, or a registry's (pulled once, as FROM pulls it)."""
    if isinstance(value, str) and registry.looks_like_registry(value):
        try:
            registry.parse_reference(value, "reference")
        except registry.RegistryError as exc:
            allowed = f"expected an image name ({NAME_RULE}); as a registry's, {exc}"
            raise bad_value(where, "image", value, allowed) from None
        return value
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):  # fullmatch: "$" allows a trailing newline
        raise bad_value(where, "image", value, IMAGE_RULE)
    return value


CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "image": _check_image,
    "hostname": _check_hostname,
    "network": _check_network,
    "writable": _check_writable,
    "env": _check_env,
    "memory": _check_memory,
    "tmpfs_size": _check_tmpfs_size,
    "cpus": _check_cpus,
    "pids": _check_pids,
    "io": _check_io,
    "timeout": _check_timeout,
    "hide": _check_hide,
    "env_pass": _check_env_pass,
    "volumes": _check_volumes,
}
LIMIT_FIELDS = ("memory", "cpus", "pids", "timeout")  # also settable by option, ini and --sandbox-stress
ADDED_FIELDS = ("hide", "env_pass")  # a marker adds to the session's list instead of replacing it


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
    env: dict[str, str] = {}
    for line in lines:
        name, sep, val = line.partition("=")
        if not sep:
            raise bad_value(where, "env", line, "each line must be NAME=VALUE")
        if name.strip() in env:
            raise bad_value(where, "env", line, f"{name.strip()} is set twice; each name once")
        env[name.strip()] = val
    return _check_env(env, where)


def check_volume_lines(lines: list[str], rootdir: str, where: str) -> tuple[tuple[str, str, str], ...]:
    """``SOURCE=TARGET[:ro|:rw]`` lines (the ``sandbox_volumes`` ini key) as checked, resolved volumes."""
    mapping: dict[str, str] = {}
    for line in lines:
        source, sep, target = line.partition("=")
        if not sep or not source.strip():
            raise bad_value(where, "volumes", line, "each line must be SOURCE=TARGET[:ro|:rw]")
        if source.strip() in mapping:
            raise bad_value(where, "volumes", line, f"{source.strip()} is given twice; each source once")
        mapping[source.strip()] = target.strip()
    return resolve_volumes(_check_volumes(mapping, where), rootdir, where)


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
        checked = {key: CHECKS[key](val, where) for key, val in marked.items()}
        for key in ADDED_FIELDS:
            if key in checked and key in values:
                checked[key] = tuple(sorted(set(values[key]) | set(checked[key])))
        if "volumes" in checked:  # the marker's volumes go with the session's; on one target, the marker's
            checked["volumes"] = resolve_volumes(checked["volumes"], str(item.config.rootpath), where)
            mine = {target for _, target, _ in checked["volumes"]}
            session = [v for v in values.get("volumes", ()) if v[1] not in mine]
            checked["volumes"] = _check_volumes((*session, *checked["volumes"]), where)
        values.update(checked)
    values.update(overrides or {})
    return validate(values, item.nodeid)
