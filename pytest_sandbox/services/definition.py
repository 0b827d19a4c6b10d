"""``service(...)``: a service's definition, validated where it is written, and the fixture that gives it."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest

from .. import spec as _spec
from .. import wait
from ..network import bridge
from ..wait import Condition

SCOPES = ("function", "class", "module", "package", "session")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
NAME_RULE = "a Python identifier of at most 63 characters (it is the fixture's name and the pod's host name)"
READY_TIMEOUT = 60.0  # seconds a service has to become ready, unless ready_timeout= says otherwise
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL when a service stops

REGISTRY: dict[str, ServiceDefinition] = {}  # by name: what the session's pod may start


@dataclasses.dataclass(frozen=True, eq=False)
class ServiceDefinition:
    name: str
    command: tuple[str, ...]
    setup: tuple[tuple[str, ...], ...]
    ports: tuple[int, ...]
    ready: Condition | None
    scope: str
    ready_timeout: float
    stop_timeout: float
    spec: _spec.SandboxSpec  # image, env, volumes, limits; network "pod"
    where: str  # "file:line: service('name')", for errors

    @property
    def readiness(self) -> Condition | None:
        """The condition to wait for: ``ready=``, else every published port listening, else none."""
        if self.ready is not None or not self.ports:
            return self.ready
        condition = wait.listening(self.ports[0])
        for port in self.ports[1:]:
            condition = condition & wait.listening(port)
        return condition


def define(where: str, **given: Any) -> ServiceDefinition:
    """A checked definition from ``service()``'s arguments; a usage error names ``where`` and the field."""
    name = given["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _spec.bad_value(where, "name", name, NAME_RULE)
    command = given["command"]
    if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command:
        raise _spec.bad_value(where, "command", command, "expected a non-empty list of str arguments")
    if not all(isinstance(arg, str) and "\0" not in arg for arg in command):
        raise _spec.bad_value(where, "command", command, "every argument must be a str without NUL")
    setup = []
    raw_setup = given["setup"]
    if isinstance(raw_setup, (str, bytes)) or not isinstance(raw_setup, Sequence):
        raise _spec.bad_value(where, "setup", raw_setup, "expected a list of shell lines or argument lists")
    for step in raw_setup:
        if isinstance(step, str):
            setup.append(("/bin/sh", "-c", step))
        elif isinstance(step, Sequence) and step and all(isinstance(arg, str) for arg in step):
            setup.append(tuple(step))
        else:
            raise _spec.bad_value(where, "setup", step, "each step is a shell line (str) or a list of str arguments")
    ports = given["ports"]
    if isinstance(ports, (str, bytes)) or not isinstance(ports, Sequence):
        raise _spec.bad_value(where, "ports", ports, "expected a list of TCP ports (1-65535)")
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _spec.bad_value(where, "ports", port, "each port is an int from 1 to 65535")
    if given["ready"] is not None and not isinstance(given["ready"], Condition):
        raise _spec.bad_value(where, "ready", given["ready"], "expected a wait.* condition (wait.listening(5432), ...)")
    if given["scope"] not in SCOPES:
        raise _spec.bad_value(where, "scope", given["scope"], f"allowed: {', '.join(SCOPES)}")
    for field in ("ready_timeout", "stop_timeout"):
        value = given[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise _spec.bad_value(where, field, value, "expected a positive number of seconds")
    image = given["image"]
    values = {
        "image": None if image == "host" else image,
        "hostname": name.replace("_", "-").strip("-") or "service",
        "network": "pod",
        "env": dict(given["env"] or {}),
        "volumes": given["volumes"] or {},
        "memory": given["memory"],
        "cpus": given["cpus"],
        "pids": given["pids"],
        "tmpfs_size": given["tmpfs_size"],
    }
    spec = _spec.validate(values, where)
    return ServiceDefinition(
        name=name,
        command=tuple(command),
        setup=tuple(setup),
        ports=tuple(dict.fromkeys(ports)),
        ready=given["ready"],
        scope=given["scope"],
        ready_timeout=float(given["ready_timeout"]),
        stop_timeout=float(given["stop_timeout"]),
        spec=spec,
        where=where,
    )


def used_by(item: pytest.Item) -> list[ServiceDefinition]:
    """The services an item asks for (directly or through its fixtures); a doctest asks for none."""
    return [REGISTRY[name] for name in getattr(item, "fixturenames", ()) if name in REGISTRY]


def resolved(definition: ServiceDefinition, rootdir: str) -> ServiceDefinition:
    """Relative host paths of its volumes are the rootdir's (checked to exist now, at the session's start)."""
    spec = _spec.with_resolved_volumes(definition.spec, rootdir, definition.where)
    return dataclasses.replace(definition, spec=spec) if spec is not definition.spec else definition


def hosts_text(names: Sequence[str], bridged: bool = True, host_hosts: str = "/etc/hosts") -> str:
    """A pod member's /etc/hosts: every service's name and its address in the pod (on the shared loopback,
    127.0.0.1), then the host's lines."""
    try:
        with open(host_hosts) as file:
            text = file.read()
    except OSError:
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    if not text.endswith("\n"):
        text += "\n"
    if not names:
        return text
    # Its services first: a name the host's lines give too (say the host's own name) is the service's.
    lines = (f"{bridge.name_address(names, name) if bridged else '127.0.0.1'}\t{name}\n" for name in sorted(set(names)))
    return "# pytest-sandbox pod: its services\n" + "".join(lines) + "# the host's\n" + text
