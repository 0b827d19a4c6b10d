"""Fixtures a sandboxed test can ask for."""

from __future__ import annotations

import dataclasses

import pytest

from . import child
from .spec import SandboxSpec


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    """What the running test's sandbox is (``active`` is False when the test runs unsandboxed)."""

    active: bool
    spec: SandboxSpec | None


@pytest.fixture
def sandbox() -> SandboxInfo:
    """The sandbox this test runs in."""
    spec = child.ACTIVE_SPEC
    return SandboxInfo(active=spec is not None, spec=spec)
