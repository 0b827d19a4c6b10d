"""One frozen, validated description of a test's sandbox.

Values come from three places, in increasing precedence: ini keys, command-line
options, ``@pytest.mark.container(...)`` keywords (closest marker wins). Every
error names where the bad value came from and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

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

    def replace(self, **changes: Any) -> SandboxSpec:
        """A copy with some fields changed and validated again (for ``pytest_sandbox_spec`` hooks)."""
        return validate(dataclasses.asdict(self) | changes, "pytest_sandbox_spec hook")


FIELDS = tuple(f.name for f in dataclasses.fields(SandboxSpec))


def _bad(where: str, field: str, value: object, allowed: str) -> pytest.UsageError:
    return pytest.UsageError(f"{where}: invalid {field}={value!r}: {allowed}")


def _check_hostname(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _HOSTNAME_RE.match(value):
        raise _bad(where, "hostname", value,
                   "expected a host name of letters, digits, '-' and '.', at most 64 characters")
    return value


def _check_network(value: object, where: str) -> str:
    if value not in NETWORK_MODES:
        raise _bad(where, "network", value, f"allowed: {', '.join(map(repr, NETWORK_MODES))}")
    return str(value)


def _check_writable(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _bad(where, "writable", value, "expected a list of absolute paths")
    paths = []
    for path in value:
        if not isinstance(path, (str, os.PathLike)) or not os.path.isabs(os.fspath(path)):
            raise _bad(where, "writable", path, "each entry must be an absolute path")
        normal = os.path.normpath(os.fspath(path))
        if normal == "/":
            raise _bad(where, "writable", path, "the whole root cannot be made writable")
        paths.append(normal)
    return tuple(sorted(set(paths)))


def _check_env(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
        value = dict(value)  # already normalized (SandboxSpec.env)
    if not isinstance(value, Mapping):
        raise _bad(where, "env", value, "expected a mapping of NAME to string value")
    items = []
    for name, val in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise _bad(where, "env", name, "names are letters, digits and '_', not starting with a digit")
        if not isinstance(val, str) or "\0" in val:
            raise _bad(where, "env", {name: val}, "values must be strings without NUL bytes")
        items.append((name, val))
    return tuple(sorted(items))


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "hostname": _check_hostname,
    "network": _check_network,
    "writable": _check_writable,
    "env": _check_env,
}


def validate(values: Mapping[str, Any], where: str) -> SandboxSpec:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise pytest.UsageError(
            f"{where}: unknown sandbox option(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}"
        )
    checked: dict[str, Any] = {key: _CHECKS[key](val, where) for key, val in values.items()}
    return SandboxSpec(**checked)


def defaults_from_config(config: pytest.Config) -> dict[str, Any]:
    """Ini keys and command-line options, already checked, as raw field values."""
    values: dict[str, Any] = {}
    hostname = config.getini("sandbox_hostname")
    if hostname:
        values["hostname"] = _check_hostname(hostname, "ini sandbox_hostname")
    network = config.getoption("sandbox_network") or config.getini("sandbox_network")
    if network:
        where = "--sandbox-network" if config.getoption("sandbox_network") else "ini sandbox_network"
        values["network"] = _check_network(network, where)
    writable = config.getini("sandbox_writable")
    if writable:
        values["writable"] = _check_writable(writable, "ini sandbox_writable")
    env_lines = config.getini("sandbox_env")
    if env_lines:
        env = {}
        for line in env_lines:
            name, sep, val = line.partition("=")
            if not sep:
                raise _bad("ini sandbox_env", "env", line, "each line must be NAME=VALUE")
            env[name.strip()] = val
        values["env"] = _check_env(env, "ini sandbox_env")
    validate(values, "ini")
    return values


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


def spec_for_item(item: pytest.Item, defaults: Mapping[str, Any], sandbox_all: bool) -> SandboxSpec | None:
    """The item's spec, or None when it runs unsandboxed."""
    marked = marker_values(item)
    if marked is None and not sandbox_all:
        return None
    values = dict(defaults)
    if marked:
        where = f"{item.nodeid}: @pytest.mark.{MARKER}"
        unknown = sorted(set(marked) - set(FIELDS))
        if unknown:
            raise pytest.UsageError(
                f"{where}: unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}"
            )
        values.update({key: _CHECKS[key](val, where) for key, val in marked.items()})
    return validate(values, item.nodeid)
