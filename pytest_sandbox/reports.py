"""Reports of a sandboxed item: relayed as the sandbox sends them, and made up for what a dead one never sent."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from . import protocol
from .runtime.handle import Zygote
from .spec import SandboxSpec


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_PLUMBING = os.path.join("pytest_sandbox", "runtime", "test_process.py")  # frames below the test's
GRACE = 5.0  # seconds past a timeout before pytest kills a sandbox whose own watchdog did not fire


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


class Outcome:
    """What one sandbox sent back."""

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.whens: set[str] = set()
        self.setup_passed = False
        self.exit: dict[str, Any] | None = None
        self.setup_error: dict[str, Any] | None = None
        self.stop: dict[str, Any] | None = None
        self.killed_after_timeout = False

    @property
    def usage(self) -> dict[str, Any]:
        """Measured by the sandbox's cgroup, else from the test process's rusage."""
        exit = self.exit or {}
        return dict(exit.get("usage") or exit.get("rusage") or {})

    def crash_text(self, crash_output: str) -> str:
        if self.setup_error:
            return f"sandbox setup failed in phase {self.setup_error['phase']!r}: {self.setup_error['message']}"
        if self.killed_after_timeout or crash_output.startswith("Timeout ("):
            return f"timeout after {self.spec.timeout:g} s: the whole sandbox was killed"
        if self.exit is None:
            return "sandbox crashed: its init process vanished without reporting the test's status"
        usage = self.usage
        if "signal" in self.exit:
            name = _signal_name(self.exit["signal"])
            if name == "SIGKILL" and usage.get("oom_kills"):
                peak = f", peak {_mib(usage['memory_peak'])}" if usage.get("memory_peak") else ""
                return f"killed by the OOM killer: memory limit {_mib(self.spec.memory or 0)}{peak}"
            if name == "SIGKILL":
                return "sandbox crashed: killed by SIGKILL"
            return f"sandbox crashed: {name}"
        return f"sandbox crashed: the test process exited with status {self.exit.get('code')}"

    def limit_notes(self) -> str:
        """Limits the sandbox ran into, for the report of a failed test."""
        usage, notes = self.usage, []
        if usage.get("oom_kills"):
            notes.append(f"the OOM killer ended {usage['oom_kills']} process(es) at the memory limit "
                         f"{_mib(self.spec.memory or 0)}")
        if usage.get("pids_limit_hits"):
            notes.append(f"the pids limit {self.spec.pids} refused {usage['pids_limit_hits']} fork(s)")
        return "\n".join(notes)


def _properties(usage: dict[str, Any]) -> list[tuple[str, object]]:
    return [(f"sandbox_{name}", value) for name, value in usage.items() if value is not None]


def run_in_sandbox(item: pytest.Item, zyg: Zygote, spec: SandboxSpec,
                   containers: dict[str, str] | None = None) -> Iterator[pytest.TestReport]:
    """Run the item's whole runtest protocol in a new sandbox, yielding reports as they arrive.

    A sandbox whose read/write layer may be kept (``--sandbox-keep``) names it first;
    its id goes into ``containers`` and into the sections of failed reports.

    With limits or accounting the reports wait for the sandbox's end, so they can
    carry what it used and the limits it hit.
    """
    config = item.config
    zyg.reset_crash_output()
    outcome = Outcome(spec)
    hold = bool(spec.limits) or zyg.limits.accounting
    held: list[pytest.TestReport] = []
    sock = zyg.start(item.nodeid)
    deadline = time.monotonic() + spec.timeout + GRACE if spec.timeout is not None else None
    finished = False
    try:
        while True:
            if deadline is not None:
                sock.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                message, _ = protocol.recv(sock)
            except TimeoutError:
                zyg.kill(item.nodeid)
                outcome.killed_after_timeout, deadline = True, None
                sock.settimeout(None)
                continue
            if message is None:
                break
            kind = message["type"]
            if kind == "container" and containers is not None:
                containers[item.nodeid] = message["id"]
            elif kind == "report":
                report = config.hook.pytest_report_from_serializable(config=config, data=message["data"])
                if report.failed and containers and item.nodeid in containers:
                    kept = containers[item.nodeid]
                    report.sections.append(("sandbox", f"read/write layer kept as {kept}: "
                                                       f"pytest-sandbox shell {kept}  |  pytest-sandbox commit "
                                                       f"{kept} NAME"))
                outcome.whens.add(report.when)
                if report.when == "setup" and report.passed:
                    outcome.setup_passed = True
                if hold:
                    held.append(report)
                else:
                    yield report
            elif kind == "warning":
                _record_warning(item, message)
            elif kind == "done" and not hold:
                finished = True
                break
            elif kind == "error":
                outcome.setup_error = message
            elif kind in ("exit-requested", "interrupted"):
                outcome.stop = message
            elif kind == "exit":
                outcome.exit = message
                finished = True
                break
    finally:
        if finished:
            zyg.finishing.append(sock)
        else:
            sock.close()
    if outcome.stop:
        if outcome.stop["type"] == "interrupted":
            raise KeyboardInterrupt
        pytest.exit(outcome.stop["reason"], outcome.stop["returncode"])
    if "teardown" not in outcome.whens:  # skipped/xfailed tests have no call report; all have teardown
        held.extend(_crash_reports(item, outcome, zyg.read_crash_output()))
    if held:
        notes = outcome.limit_notes()
        for report in held:
            if notes and report.failed:
                report.sections.append(("sandbox limits", notes))
        held[-1].user_properties = [*held[-1].user_properties, *_properties(outcome.usage)]
    yield from held


def _warning_category(module: str, qualname: str) -> type[Warning]:
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def _record_warning(item: pytest.Item, message: dict[str, Any]) -> None:
    """Show a warning the sandboxed test raised in pytest's warnings summary."""
    category = _warning_category(*message["category"])
    warning = warnings.WarningMessage(category(message["message"]), category, message["filename"], message["lineno"])
    item.ihook.pytest_warning_recorded.call_historic(
        kwargs={"warning_message": warning, "when": message["when"], "nodeid": item.nodeid, "location": None})


def _trim_crash_output(text: str) -> str:
    """The faulthandler dump down to the test's own frames (the rest is pytest and sandbox plumbing)."""
    kept = []
    for line in text.splitlines():
        if _PLUMBING in line:
            break
        kept.append(line)
    return "\n".join(kept).rstrip()


def _crash_reports(item: pytest.Item, outcome: Outcome, crash_output: str) -> Iterator[pytest.TestReport]:
    """Fill in the phases a dead sandbox never reported: the crash where it happened, then teardown."""
    when: Literal["setup", "call", "teardown"]
    if "setup" not in outcome.whens:
        when = "setup"
    elif "call" not in outcome.whens and outcome.setup_passed:
        when = "call"
    else:
        when = "teardown"
    text = outcome.crash_text(crash_output)
    if crash_output.strip():
        text += "\n\n" + _trim_crash_output(crash_output)
    report = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, when))
    report.outcome = "failed"
    report.longrepr = text
    yield report
    if when != "teardown" and "teardown" not in outcome.whens:
        yield pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, "teardown"))


def refused(item: pytest.Item, reason: str, skip: bool) -> list[pytest.TestReport]:
    """Reports of an item no sandbox could run: skipped or failed in setup with ``reason``, then teardown."""

    def refuse() -> None:
        if skip:
            pytest.skip(reason)
        pytest.fail(reason, pytrace=False)

    setup = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(refuse, "setup"))
    teardown = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, "teardown"))
    return [setup, teardown]
