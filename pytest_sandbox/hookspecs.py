"""Hooks for plugins that extend pytest-sandbox.

Implement them in a ``conftest.py`` or a plugin; they are added to pytest's
hook namespace when pytest-sandbox loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .spec import SandboxSpec


@pytest.hookspec(firstresult=True)
def pytest_sandbox_spec(item: pytest.Item, spec: SandboxSpec) -> SandboxSpec | None:
    """Adjust the sandbox of one test before anything runs.

    Called once per sandboxed item after collection, in the pytest process.
    Return ``spec.replace(field=value, ...)`` to change it (the result is
    validated again), or None to keep it. The first non-None result wins.

    :param item: the test item.
    :param spec: the spec built from ini keys, options and markers.
    """


@pytest.hookspec
def pytest_sandbox_start(item: pytest.Item, spec: SandboxSpec) -> None:
    """Called in the pytest process when the item is handed to a sandbox.

    The sandbox may already exist: the zygote builds the next one ahead of time, while
    the previous test runs. Not called for items that cannot get a sandbox at all.
    """


@pytest.hookspec
def pytest_sandbox_setup(item: pytest.Item, spec: SandboxSpec) -> None:
    """Called inside the sandbox, in the test process, before the test's setup phase.

    The sandbox's mounts, hostname and network are in place; use it to prepare
    files or environment the test expects. An exception here is reported as a
    setup error of the test.
    """


@pytest.hookspec
def pytest_sandbox_finish(item: pytest.Item, spec: SandboxSpec, reports: list[pytest.TestReport]) -> None:
    """Called in the pytest process once the test process has reported its last phase (or died),
    with every report of the item.

    Processes the test left behind may still be ending: pytest waits for the sandbox to be
    empty only before it next runs anything on the host, and at the end of the session.
    """
