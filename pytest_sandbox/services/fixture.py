"""``service(...)``: the fixture a service definition becomes (the definition itself: definition.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from ..errors import SandboxError
from ..runtime import test_process
from ..wait import Condition
from . import handles, pod
from .definition import READY_TIMEOUT, REGISTRY, STOP_TIMEOUT, ServiceDefinition, define


def service(
    name: str,
    *,
    command: Sequence[str],
    image: str = "host",
    setup: Sequence[str | Sequence[str]] = (),
    env: Mapping[str, str] | None = None,
    volumes: Mapping[Any, str] | None = None,
    ports: Sequence[int] = (),
    ready: Condition | None = None,
    scope: str = "session",
    memory: int | str | None = None,
    cpus: float | None = None,
    pids: int | None = None,
    tmpfs_size: int | str | None = None,
    ready_timeout: float = READY_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Any:
    """A service container as a pytest fixture named ``name``: started once per ``scope`` in a sandbox of
    its own on the session's pod network, stopped when the scope ends. Assign it at module level of a test
    module or conftest.py (``db = service("db", ...)``); tests ask for it by name."""
    caller = sys._getframe(1)
    where = f"{caller.f_code.co_filename}:{caller.f_lineno}: service({name!r})"
    definition = define(
        where,
        name=name,
        command=command,
        image=image,
        setup=setup,
        env=env,
        volumes=volumes,
        ports=ports,
        ready=ready,
        scope=scope,
        memory=memory,
        cpus=cpus,
        pids=pids,
        tmpfs_size=tmpfs_size,
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
    )
    REGISTRY[name] = definition
    return _fixture(definition)


def _fixture(definition: ServiceDefinition) -> Any:
    def service_fixture(request: pytest.FixtureRequest) -> Iterator[Any]:
        if test_process.in_sandbox():  # a sandboxed test's view: pytest started the service before it
            yield handles.PodMember(definition, test_process.ACTIVE_SPEC)
            return
        failed = ""
        try:
            instance = request.config.stash[pod.STARTER]().acquire(definition, request.node.nodeid)
        except SandboxError as exc:
            failed = str(exc)
        if failed:  # its status and log say it all: no traceback of ours
            pytest.fail(failed, pytrace=False)
        try:
            yield instance.handle
        finally:
            if not test_process.in_sandbox():  # a sandbox forked with it set up tears down its copy
                instance.release()

    service_fixture.__doc__ = f"the service {definition.name!r} ({' '.join(definition.command)})"
    service_fixture.__module__ = "pytest_sandbox.services"
    service_fixture.__qualname__ = service_fixture.__name__ = f"service_{definition.name}"
    scope: Any = definition.scope  # one of SCOPES, checked
    return pytest.fixture(service_fixture, scope=scope, name=definition.name)
