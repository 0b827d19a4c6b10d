from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from helpers import processes_with

from pytest_sandbox import probe


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rootless: needs a non-root user (the unprivileged CI lane runs these)")
    config.addinivalue_line("markers", "guest: also run in the cgroup v2 guest lane (slow emulated VM: keep it few)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Rootless tests assert they are not root, so running them as root proves nothing: deselect them."""
    if os.geteuid() != 0:
        return
    deselected = [item for item in items if item.get_closest_marker("rootless")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("rootless")]


@pytest.fixture(autouse=True, scope="session")
def _sandboxes_available() -> None:
    reason = probe.unavailable_reason()
    if reason is not None:
        pytest.fail(f"this host cannot build sandboxes, so the suite cannot run: {reason}", pytrace=False)


@pytest.fixture
def token() -> str:
    """A string unique to this test, to find every process a sandbox started."""
    return f"sbtoken-{uuid.uuid4().hex}"


@pytest.fixture
def no_leftovers(token: str) -> Iterator[str]:
    """Fails the test if any process carrying the token outlives it."""
    yield token
    left = [pid for pid in processes_with(token) if pid != os.getpid()]
    assert not left, f"processes left behind: {left}"
