"""Reports of a sandboxed item: relayed as the sandbox sends them, and made up for what a dead one never sent."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import selectors
import signal
import socket
import sys
import termios
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal, NoReturn

import pytest

from . import credentials, outputs, plugin_results, plugin_state, protocol
from .runtime import live_log
from .runtime.handle import Zygote
from .services.pod import answer as service_call
from .spec import SandboxSpec


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_OWN = f"{os.sep}pytest_sandbox{os.sep}"
_PLUMBING = tuple(f"{os.sep}{name}{os.sep}" for name in ("_pytest", "pluggy", "pytest_sandbox"))  # below the test
GRACE = 5.0  # seconds past a timeout before pytest kills a sandbox whose own watchdog did not fire
REPORT_COST = 2048  # bytes of budget a report takes beyond its own: pytest keeps each as objects (stats, xdist)


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


class PrintedRepr:
    """A failure's representation that pytest sends as its text: a doctest's, a fixture lookup's (no crash
    location). In a plain run it is an object whose lines pytest prints, and the short summary adds no message
    after the test's id, as it would for text: so it is an object again here."""

    def __init__(self, text: str) -> None:
        self.text = text

    def toterminal(self, out: Any) -> None:
        out.line(self.text)

    def __str__(self) -> str:
        return self.text


class HookRaisedInSandbox(Exception):
    """A hook of pytest's runtest protocol raised in a test's sandbox (a plugin's bug). In a plain run the
    same exception leaves the protocol and ends the session as an INTERNALERROR: so does this one, with the
    sandbox's traceback as its message."""


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
        self.malformed: str | None = None  # what was wrong with a message the test process sent
        self.crash_output = ""  # what faulthandler wrote in the sandbox (its memfd comes with the exit status)

    @property
    def hook_raised(self) -> bool:
        """A plugin's hook raised in pytest's runtest protocol (it said so, in a message that was well-formed)."""
        return bool(self.setup_error and self.setup_error["phase"] in ("protocol", "usage") and not self.malformed)

    @property
    def usage(self) -> dict[str, Any]:
        """Measured by the sandbox's cgroup, else from the test process's rusage."""
        exit = self.exit or {}
        return dict(exit.get("usage") or exit.get("rusage") or {})

    def crash_text(self, crash_output: str | None = None) -> str:
        crash_output = self.crash_output if crash_output is None else crash_output
        if self.malformed:
            return f"sandbox sent a malformed message: {self.malformed}"
        if self.hook_raised:
            message = self.setup_error["message"] if self.setup_error else ""
            return f"a hook of pytest's runtest protocol raised in the sandbox of this test:\n{message}"
        if self.setup_error and self.setup_error["phase"] == "after the test":
            return f"the sandbox failed after the test: {self.setup_error['message']}"
        if self.setup_error:
            return f"sandbox setup failed in phase {self.setup_error['phase']!r}: {self.setup_error['message']}"
        if self.killed_after_timeout or (self.spec.timeout is not None and crash_output.startswith("Timeout (")):
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
            notes.append(
                f"the OOM killer ended {usage['oom_kills']} process(es) at the memory limit "
                f"{_mib(self.spec.memory or 0)}"
            )
        if usage.get("pids_limit_hits"):
            notes.append(f"the pids limit {self.spec.pids} refused {usage['pids_limit_hits']} fork(s)")
        return "\n".join(notes)


def _properties(usage: dict[str, Any]) -> list[tuple[str, object]]:
    return [(f"sandbox_{name}", value) for name, value in usage.items() if value is not None]


PHASES = ("setup", "call", "teardown")


class _Relay:
    """Reads one sandbox's two channels and turns what arrives into reports.

    The reports channel is the test process's: every message is checked (``protocol.FROM_TEST``),
    reports must be this item's, in phase order. The first bad one ends the sandbox and fails
    the test with what was wrong; the session goes on.
    """

    READ_FROM_THE_PLACES = (*outputs.KINDS, "coverage", "snapshots")  # taken once its layer is off

    def __init__(
        self, item: pytest.Item, zyg: Zygote, spec: SandboxSpec, containers: dict[str, str] | None, shared: bool
    ) -> None:
        self.item, self.zyg, self.spec, self.containers = item, zyg, spec, containers
        self.outcome = Outcome(spec)
        # Reports wait for the usage and limit notes of a sandbox of one test (a shared one's are not its).
        self.hold = (bool(spec.limits) or zyg.limits.accounting) and not shared
        self.ready: list[pytest.TestReport] = []  # to hand to pytest now
        self.held: list[pytest.TestReport] = []
        self.done = False  # the test process said it finished its protocol
        # In the hermetic session's sandbox a test's layer lies over the places pytest reads and writes, in the
        # same mount namespace, until its scope process takes it off: its outputs, coverage and snapshots (whose
        # files pytest reads: syrupy walks its snapshot directory) are taken once it says "done" (after that).
        # A sandbox that ends before saying so took them along with its layer.
        self.later: list[dict[str, Any]] | None = [] if zyg.paths.in_session else None
        self.ended = False  # the zygote said how the test process ended
        self.last_failed: pytest.TestReport | None = None
        self.interact = False  # --pdb: the test process waits for a go before pdb starts
        self.service_calls: list[dict[str, Any]] = []  # the test waits for each answer
        # What its messages may make pytest hold: its memory limit where it has one, at most 128 MiB.
        self.budget = protocol.Budget(min(max(spec.memory or protocol.MAX_MESSAGE, 16 * 2**20), protocol.MAX_MESSAGE))

    # -- the reports channel -----------------------------------------------------------------
    def from_test(self, message: dict[str, Any]) -> None:
        kind = protocol.check(message, protocol.FROM_TEST)
        if kind == "report":
            self._report(message["data"])
        elif kind == "container":
            if self.containers is not None:
                self.containers[self.item.nodeid] = message["id"]
        elif kind in ("warning", "log", "live-log", "suite-property"):
            self._record(kind, message)
        elif kind == "done":
            self.done = True
            self._write_later()
        elif kind in self.READ_FROM_THE_PLACES and self.later is not None:
            self.later.append(message)
        elif kind in outputs.KINDS:
            self._output(message)
        elif kind == "coverage":
            self._coverage(message)
        elif kind in plugin_results.KINDS:
            plugin_results.receive(self.item, message)
        elif kind == "error":
            self.outcome.setup_error = message
        elif kind == "service-call":
            self.service_calls.append(message)
        elif kind == "malformed":  # what a test sent its scope process, which relays it (test_process.py)
            self.malformed(protocol.ProtocolError(message["error"]))
        elif kind == "interact":  # --pdb: pdb shows this report in the sandbox (runtime/interact.py)
            if self.last_failed is not None and getattr(self.item.config.option, "usepdb", False):
                self.last_failed._pdbshown = True  # type: ignore[attr-defined]  # as pdb marks its own
            self.interact = True
        else:  # exit-requested, interrupted
            self.outcome.stop = message

    def answer(self, reports: socket.socket, deadline: float | None) -> None:
        """What the test process waits for: answers to its service calls, pdb's go once pytest has shown the
        report (pdb may take the terminal then). A call is answered while its test runs, within its time
        left; one call at a time (the test waits for each), so more queued are refused."""
        calls, self.service_calls = self.service_calls, []
        for number, call in enumerate(calls):
            if self.ended:
                break  # its process is gone: nobody waits for the answer
            if number:
                answer: dict[str, Any] = {"error": "one service call at a time: wait for each answer"}
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                answer = service_call(self.item, call, left)
            with contextlib.suppress(OSError):
                protocol.send(reports, answer)
        if self.interact:
            self.interact = False
            with contextlib.suppress(OSError):
                protocol.send(reports, {"go": True})

    def _record(self, kind: str, message: dict[str, Any]) -> None:
        """What pytest records for the test as it would in a plain run: warnings, log lines (the log file's,
        the live ones), suite properties."""
        if kind == "warning":
            _record_warning(self.item, message)
        elif kind == "log":
            _write_log_file(self.item.config, message["text"])
        elif kind == "live-log":
            live_log.show(self.item.config, message)
        else:
            plugin_state.add_suite_property(self.item.config, message)

    def _coverage(self, message: dict[str, Any]) -> None:
        if self.spec.image is None:  # an image's paths are not the host's
            paths = self.zyg.paths
            hidden = credentials.hidden_places(os.environ.get("HOME"), self.spec.hide)
            if paths.keep_dir:
                hidden.append(paths.keep_dir)
            plugin_state.merge_coverage(message, hidden, (*paths.writable, *self.spec.writable, *paths.needed))

    def _report(self, data: dict[str, Any]) -> None:
        self.budget.take(REPORT_COST)  # reruns and subtests bound their number by no fixed three any more
        config = self.item.config
        printed = data.pop(protocol.PRINTED_REPR, False)
        extras = plugin_results.take_report_extras(data)
        try:
            report = config.hook.pytest_report_from_serializable(config=config, data=data)
        except Exception as exc:
            raise protocol.ProtocolError(f"a report pytest cannot read ({type(exc).__name__}: {exc})") from None
        if not isinstance(report, pytest.TestReport) or report.nodeid != self.item.nodeid:
            raise protocol.ProtocolError(
                f"a report for {getattr(report, 'nodeid', report)!r}, not for {self.item.nodeid!r}"
            )
        counts = self._check_order(report)
        _check_report_fields(report, config)
        _keep_subtest_values(report, data)
        if printed is True and isinstance(report.longrepr, str):
            report.longrepr = PrintedRepr(report.longrepr)  # type: ignore[assignment]
        plugin_results.apply_report_extras(report, extras)
        kept = (self.containers or {}).get(self.item.nodeid)
        if report.failed and kept:
            report.sections.append(
                (
                    "sandbox",
                    f"read/write layer kept as {kept}: pytest-sandbox shell {kept}  |  "
                    f"pytest-sandbox commit {kept} NAME",
                )
            )
        if counts:
            self.outcome.whens.add(report.when)
        self.last_failed = report if report.failed else self.last_failed
        if report.when == "setup" and report.passed:
            self.outcome.setup_passed = True
        (self.held if self.hold else self.ready).append(report)

    def _check_order(self, report: pytest.TestReport) -> bool:
        """Phases come in order; a plugin that reruns a test (pytest-rerunfailures) starts again at setup.
        A plugin's own call report (a SubtestReport) is logged as it happens, before the phases of a
        protocol run with log=False (pytest-rerunfailures'): it has no place in the order; False for it."""
        when = report.when
        if when not in PHASES:
            raise protocol.ProtocolError(f"a report for phase {when!r}")
        if type(report) is not pytest.TestReport:
            if when != "call":
                raise protocol.ProtocolError(f"a {type(report).__name__} for phase {when!r}")
            return False
        whens = self.outcome.whens
        seen = [w for w in PHASES if w in whens]
        if when == "setup" and "teardown" in whens:
            whens.clear()  # a rerun: a new cycle, whose crash is reported in its own phase
            self.outcome.setup_passed = False
        elif seen and PHASES.index(when) < PHASES.index(seen[-1]):
            raise protocol.ProtocolError(f"a {when!r} report after {', '.join(seen)}")
        return True

    def _output(self, message: dict[str, Any]) -> None:
        if self.spec.image is None:
            outputs.write(message, self.zyg.outputs, say=self._warn)

    def _warn(self, text: str) -> None:
        """An output not carried: a warning of the test's in pytest's summary (never raised mid-relay, as
        ``-W error`` would raise a warning issued here)."""
        warning = warnings.WarningMessage(pytest.PytestWarning(text), pytest.PytestWarning, str(self.item.path), 0)
        self.item.ihook.pytest_warning_recorded.call_historic(
            kwargs={"warning_message": warning, "when": "runtest", "nodeid": self.item.nodeid, "location": None}
        )

    def _write_later(self) -> None:
        later, self.later = self.later or [], ([] if self.later is not None else None)
        for message in later:
            if message["type"] == "coverage":
                self._coverage(message)
            elif message["type"] in plugin_results.KINDS:
                plugin_results.receive(self.item, message)
            else:
                self._output(message)

    def malformed(self, error: protocol.ProtocolError) -> None:
        self.outcome.malformed = str(error)
        self.zyg.kill(self.item.nodeid)

    # -- the status channel ------------------------------------------------------------------
    def from_zygote(self, message: dict[str, Any]) -> None:
        kind = protocol.check(message, protocol.FROM_ZYGOTE)
        if kind == "exit":
            self.outcome.exit = message
            self.ended = True
        elif kind == "error":
            self.outcome.setup_error = message

    def finished(self) -> bool:
        return self.ended or (self.done and not self.hold)


class _StdioState:
    """The terminal settings and file status flags of pytest's fds 0-2, which a test run with capture off
    shares (echo off or O_NONBLOCK would outlive it, in pytest and in the user's shell)."""

    def __init__(self) -> None:
        self.flags: dict[int, int] = {}
        self.modes: dict[int, list[Any]] = {}
        for fd in (0, 1, 2):
            try:
                self.flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)
                if os.isatty(fd):
                    self.modes[fd] = termios.tcgetattr(fd)
            except (OSError, termios.error):
                pass

    def restore(self) -> None:
        for fd, flags in self.flags.items():
            with contextlib.suppress(OSError):
                if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        for fd, mode in self.modes.items():
            with contextlib.suppress(OSError, termios.error):
                if termios.tcgetattr(fd) != mode:
                    termios.tcsetattr(fd, termios.TCSANOW, mode)


def _pairs(value: object, what: str, second: type | None = None) -> list[tuple[str, Any]]:
    """``value`` as a list of (str, x) pairs (JSON made the tuples lists), x of type ``second`` if given."""
    if not isinstance(value, (list, tuple)):
        raise protocol.ProtocolError(f"{what} that is not a list")
    pairs = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise protocol.ProtocolError(f"{what} that are not (name, value) pairs")
        if second is not None and not isinstance(pair[1], second):
            raise protocol.ProtocolError(f"{what} whose values are not {second.__name__}")
        pairs.append((pair[0], pair[1]))
    return pairs


# What pytest's terminal reporter files under its own categories: it reads WarningReports from "warnings",
# wasxfail from "xfailed", counts "error" as failed. A report of another outcome may not land there.
_PYTEST_CATEGORIES = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "warnings", "error")


def _plugin_outcome(report: pytest.TestReport, config: pytest.Config) -> bool:
    """A plugin's own outcome (pytest-rerunfailures' "rerun"): one a plugin here knows, not only the terminal
    reporter, whose fallback files any outcome under its own name ("warnings", "xfailed" crash its summary)."""
    if not isinstance(report.outcome, str):
        return False
    terminal = config.pluginmanager.get_plugin("terminal")
    hook = config.pluginmanager.subset_hook_caller("pytest_report_teststatus", [terminal] if terminal else [])
    status = hook(report=report, config=config)
    return status is not None and status[0] not in _PYTEST_CATEGORIES


def _check_report_fields(report: pytest.TestReport, config: pytest.Config) -> None:
    """A report from a sandbox holds what pytest's own reports hold, in the shapes pytest's terminal
    reporter, junitxml and xdist expect: anything else would fail later, far from its cause."""
    if report.outcome not in ("passed", "failed", "skipped") and not _plugin_outcome(report, config):
        raise protocol.ProtocolError(f"a report with outcome {report.outcome!r}")
    location = report.location
    if (
        not isinstance(location, (list, tuple))
        or len(location) != 3
        or not isinstance(location[0], str)
        or not (location[1] is None or (isinstance(location[1], int) and not isinstance(location[1], bool)))
        or not isinstance(location[2], str)
    ):
        raise protocol.ProtocolError("a report whose location is not (path, line, name)")
    report.location = tuple(location)  # type: ignore[assignment]
    if not isinstance(report.keywords, dict) or not all(isinstance(k, str) for k in report.keywords):
        raise protocol.ProtocolError("a report whose keywords are not a mapping of names")
    if not isinstance(report.duration, (int, float)) or isinstance(report.duration, bool):
        raise protocol.ProtocolError("a report whose duration is not a number")
    if not isinstance(getattr(report, "wasxfail", ""), str):  # junitxml takes it for a string
        raise protocol.ProtocolError("a report whose xfail reason is not a string")
    longrepr = report.longrepr
    if isinstance(longrepr, list):  # a skip's (path, lineno, reason): JSON made the tuple a list
        if len(longrepr) != 3 or not isinstance(longrepr[0], str) or not isinstance(longrepr[2], str):
            raise protocol.ProtocolError("a report whose skip location is not (path, line, reason)")
        report.longrepr = tuple(longrepr)
    else:
        _check_failure_repr(report)
    report.sections = _pairs(report.sections, "sections", str)
    report.user_properties = _pairs(report.user_properties, "user_properties")


def _check_failure_repr(report: pytest.TestReport) -> None:
    """A failure's representation, as pytest's summaries and junitxml use it: crash locations of (path, line,
    message), and printable (pytest builds it from the JSON without checking a type: lines that are a number
    crashed the terminal summary). Printed once here, so a bad one fails its test, not pytest."""
    longrepr: Any = report.longrepr
    crashes = [getattr(longrepr, "reprcrash", None)]
    crashes += [element[1] for element in getattr(longrepr, "chain", ()) if isinstance(element, tuple)]
    for crash in crashes:
        if crash is not None and not (
            isinstance(crash.path, str) and isinstance(crash.lineno, int) and isinstance(crash.message, str)
        ):
            raise protocol.ProtocolError("a report whose crash location is not (path, line, message)")
    try:
        report.longreprtext  # noqa: B018 (renders it)
    except Exception as exc:
        raise protocol.ProtocolError(f"a report pytest cannot print ({type(exc).__name__}: {exc})") from None


def _keep_subtest_values(report: pytest.TestReport, data: dict[str, Any]) -> None:
    """pytest's subtests store each value of a subtest as its repr, and take the repr again of what they
    read back (n=1 shows as n='1'): the way from a sandbox shows the values as the sandbox made them."""
    context = getattr(report, "context", None)
    sent = data.get("_subtest.context")
    values = sent.get("kwargs") if isinstance(sent, dict) else None
    if (
        dataclasses.is_dataclass(context)
        and isinstance(getattr(context, "kwargs", None), dict)
        and isinstance(values, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
    ):
        object.__setattr__(context, "kwargs", dict(values))  # a frozen dataclass


def _drain(sock: socket.socket, relay: _Relay) -> None:
    """What the test process sent before it ended: already in the socket, so read without waiting."""
    while relay.outcome.malformed is None and sock.fileno() != -1:
        try:
            message = protocol.recv_untrusted(sock, relay.budget, block=False)
        except BlockingIOError:
            return
        except protocol.ProtocolError as exc:
            relay.malformed(exc)
            return
        if message is None:
            return
        try:
            relay.from_test(message)
        except protocol.ProtocolError as exc:
            relay.malformed(exc)


class Channels:
    """A running sandbox's two channels to pytest; ``name`` is its first test's, the zygote's name for it."""

    def __init__(self, status: socket.socket, reports: socket.socket, name: str, zygote: Zygote) -> None:
        self.status, self.reports, self.name, self.zygote = status, reports, name, zygote
        self.open = True  # it waits for the test named ``next`` (--sandbox-scope)
        self.next: str | None = None
        self.carried = 0  # earlier tests' outcomes it was sent (plugin_state.carried_since)

    def end(self, collect_exit: bool = True) -> None:
        """Let the sandbox go: a waiting one tears down what its tests left set up and exits. pytest collects
        its exit with the others' (``collect_exit``), or drops the status channel of one it gave up on."""
        if self.open:
            self.reports.close()
            if collect_exit:
                self.zygote.finishing.append(self.status)
            else:
                self.zygote.exited(self.status)
            self.open = False


def run_in_sandbox(
    item: pytest.Item,
    zyg: Zygote,
    spec: SandboxSpec,
    channels: Channels,
    containers: dict[str, str] | None = None,
    next_here: str | None = None,
) -> Iterator[pytest.TestReport]:
    """Run the item's whole runtest protocol in a sandbox, yielding reports as they arrive.

    ``channels`` are a new sandbox's, or those of the one that ran the previous tests of its scope.
    ``next_here`` names the next test if it runs in the same sandbox: the sandbox then stays
    (``channels.open``) with the fixtures they share.

    A sandbox whose read/write layer may be kept (``--sandbox-keep``) names it first;
    its id goes into ``containers`` and into the sections of failed reports.

    With limits or accounting the reports of a sandbox of one test wait for its end, so they
    can carry what it used and the limits it hit.
    """
    relay = _Relay(item, zyg, spec, containers, shared=channels.name != item.nodeid or next_here is not None)
    stdio = _StdioState()  # with capture off the test holds pytest's own terminal: it gets it back as it was
    status, reports = channels.status, channels.reports
    carried, channels.carried = plugin_state.carried_since(item.config, channels.carried)
    with contextlib.suppress(OSError):  # a sandbox that died says so on the status channel
        protocol.send(reports, {"nodeid": item.nodeid, "next": next_here, "dependency": carried})
    deadline = time.monotonic() + spec.timeout + GRACE if spec.timeout is not None else None
    status_open = True
    with selectors.DefaultSelector() as selector, _InterruptLatch() as latch:
        selector.register(status, selectors.EVENT_READ)
        selector.register(reports, selectors.EVENT_READ)
        try:
            while status_open and not relay.finished():
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    latch.waiting = True
                    if latch.pending:
                        raise KeyboardInterrupt
                    events = selector.select(timeout)
                except KeyboardInterrupt:  # ^C at the terminal: the test runs on, in a session of its own
                    _interrupt(item, "", 0)
                finally:
                    latch.waiting = False
                if not events:  # the sandbox's own watchdog did not end it: pytest does
                    zyg.kill(channels.name)
                    relay.outcome.killed_after_timeout, deadline = True, None
                for key, _ in events:
                    if key.fileobj is reports:
                        if _read_reports(reports, relay):
                            selector.unregister(reports)
                            if relay.outcome.malformed is not None:
                                reports.close()  # what else it queued (fds in flight too) goes with it
                    else:
                        status_open = _read_status(status, reports, relay)
                yield from relay.ready
                relay.ready.clear()
                relay.answer(reports, deadline)
        finally:
            stdio.restore()
            if next_here is not None and relay.done and not relay.ended and relay.outcome.malformed is None:
                channels.next = next_here
            else:
                channels.end(collect_exit=relay.finished())
    if latch.pending:  # ^C came while pytest showed the last report: still this test's interrupt
        _interrupt(item, "", 0)
    yield from _after_the_end(item, relay)
    if relay.outcome.hook_raised:
        _raise_as_in_a_plain_run(relay.outcome)


def _raise_as_in_a_plain_run(outcome: Outcome) -> NoReturn:
    """A hook raised in the sandbox's protocol: pytest.UsageError ends the session as a usage error ("ERROR:",
    exit code 4), anything else as an INTERNALERROR with the sandbox's traceback."""
    error = outcome.setup_error or {}
    if error.get("phase") == "usage":
        raise pytest.UsageError(error["message"])
    raise HookRaisedInSandbox(outcome.crash_text())


def _after_the_end(item: pytest.Item, relay: _Relay) -> list[pytest.TestReport]:
    """What pytest hears once the sandbox is gone: the held reports with usage and limit notes, the
    phases a dead sandbox never reported; or the test's own pytest.exit / ^C, raised here."""
    outcome = relay.outcome
    if outcome.stop and not outcome.malformed:
        if outcome.stop["type"] == "interrupted":
            _interrupt(item, outcome.stop["path"], outcome.stop["lineno"])
        pytest.exit(outcome.stop["reason"], outcome.stop["returncode"])
    held = relay.held
    if outcome.hook_raised:
        return held  # what it logged before; then the session's INTERNALERROR (_run raises it)
    if "teardown" not in outcome.whens or outcome.malformed:  # skipped/xfailed tests have no call report
        held.extend(_crash_reports(item, outcome))
    elif outcome.setup_error:
        # Failed after the test's last report (sending what persists): an error of that test, as a teardown
        # error shows, not nothing.
        late = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, "teardown"))
        late.outcome, late.longrepr = "failed", outcome.crash_text()
        held.append(late)
    if held:
        notes = outcome.limit_notes()
        for report in held:
            if notes and report.failed:
                report.sections.append(("sandbox limits", notes))
        held[-1].user_properties = [*held[-1].user_properties, *_properties(outcome.usage)]
    return held


class _InterruptLatch:
    """^C at the terminal while pytest relays a sandbox: held until the relay waits again, so it is raised
    as the running test's interrupt and never lands in the relay's own code or in a reporter halfway.

    Only pytest's default handler is replaced (a user's or a plugin's own SIGINT handler is left alone),
    and only in the main thread, where Python runs signal handlers.
    """

    def __init__(self) -> None:
        self.pending = False
        self.waiting = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptLatch:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.pending = True
        if self.waiting:
            raise KeyboardInterrupt


def _interrupt(item: pytest.Item, path: str, lineno: int) -> NoReturn:
    """Raise the KeyboardInterrupt of a test that was running in its sandbox, naming the test, from a frame
    that stands for the user's line (``path:lineno`` where ^C landed there, else the test's own line):
    pytest's summary shows that location, as it would without a sandbox, instead of this module's.

    ``path`` comes from the test process: only a Python file under the rootdir (which the test sees
    anyway) is taken, as pytest may read and show its lines (--full-trace).
    """
    root = os.path.join(os.path.realpath(item.config.rootpath), "")
    real = os.path.realpath(path) if path else ""
    if not (real.startswith(root) and real.endswith(".py") and os.path.isfile(real) and 0 < lineno < 1_000_000):
        path, lineno = str(item.path), (item.location[1] or 0) + 1
    code = compile("\n" * (lineno - 1) + "raise KeyboardInterrupt(message) from None", path, "exec")
    exec(code, {"message": f"in {item.nodeid} (in its sandbox)"})
    raise AssertionError("unreachable: the code above raises")


def _read_reports(reports: socket.socket, relay: _Relay) -> bool:
    """One message from the test process; True when nothing more will be read from it."""
    try:
        message = protocol.recv_untrusted(reports, relay.budget)
        if message is None:
            return True
        relay.from_test(message)
    except protocol.ProtocolError as exc:
        relay.malformed(exc)
        return True
    return relay.outcome.malformed is not None


def _read_status(status: socket.socket, reports: socket.socket, relay: _Relay) -> bool:
    """One message from the zygote; False at the end of the channel."""
    try:
        message, fds = protocol.recv(status)
    except protocol.ProtocolError:
        message, fds = None, []
    for fd in fds:  # the exit status comes with the sandbox's crash memfd
        try:
            relay.outcome.crash_output = _read_crash_output(fd)
        finally:
            os.close(fd)
    if message is None:
        return False
    relay.from_zygote(message)
    if relay.ended:
        _drain(reports, relay)
    return True


def _warning_category(named: list[Any]) -> type[Warning]:
    """The warning class a sandbox names as [module, qualname], if pytest has it: looked up in the modules'
    and classes' own dicts (no property, no module ``__getattr__`` runs on a sandbox's say), else UserWarning."""
    if len(named) != 2 or not all(isinstance(part, str) for part in named):
        return UserWarning
    found: Any = sys.modules.get(named[0])
    for part in named[1].split("."):
        namespace = getattr(found, "__dict__", None)
        found = namespace.get(part) if isinstance(namespace, dict) else None
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def _record_warning(item: pytest.Item, message: dict[str, Any]) -> None:
    """Show a warning the sandboxed test raised in pytest's warnings summary."""
    category = _warning_category(message["category"])
    try:
        instance = category(message["message"])
    except Exception:  # a class whose constructor wants other arguments: shown as what it says
        category = UserWarning
        instance = category(message["message"])
    warning = warnings.WarningMessage(instance, category, message["filename"], message["lineno"])
    item.ihook.pytest_warning_recorded.call_historic(
        kwargs={"warning_message": warning, "when": message["when"], "nodeid": item.nodeid, "location": None}
    )


def _read_crash_output(fd: int) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, 256 * 1024), 0).decode(errors="replace")


def _write_log_file(config: pytest.Config, text: str) -> None:
    """A log record the test wrote to its log file handler goes into pytest's own (``log_file``)."""
    handler = getattr(config.pluginmanager.getplugin("logging-plugin"), "log_file_handler", None)
    stream = getattr(handler, "stream", None)
    if stream is not None:
        stream.write(text)
        stream.flush()


def _is_plumbing(line: str) -> bool:
    return line.lstrip().startswith("File ") and any(part in line for part in _PLUMBING)


def _trim_crash_output(text: str) -> str:
    """The faulthandler dump down to the user's frames: each thread's stack loses the pytest, pluggy and
    sandbox frames below the outermost frame of the user's code; a thread that is all plumbing (the
    timeout watchdog, pytest waiting) is left out."""
    blocks: list[list[str]] = [[]]  # the text before the first thread, then one block per thread
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])
        blocks[-1].append(line)
    kept: list[str] = []
    for block in blocks:
        frames = [i for i, line in enumerate(block) if line.lstrip().startswith("File ")]
        if not frames:
            kept.extend(block)
            continue
        if _OWN in block[frames[0]] and block[0].startswith(("Thread", "Current")):
            continue  # a thread that was running the sandbox's own code (the watchdog)
        users = [i for i in frames if not _is_plumbing(block[i])]
        if users:
            kept.extend(line for i, line in enumerate(block) if i <= users[-1] or not line.strip())
        else:
            kept.extend(block[: frames[0]])
    return "\n".join(kept).rstrip()


def _crash_reports(item: pytest.Item, outcome: Outcome) -> Iterator[pytest.TestReport]:
    """Fill in the phases a dead sandbox never reported: the crash where it happened, then teardown."""
    when: Literal["setup", "call", "teardown"]
    if "setup" not in outcome.whens:
        when = "setup"
    elif "call" not in outcome.whens and outcome.setup_passed:
        when = "call"
    else:
        when = "teardown"
    text = outcome.crash_text()
    if outcome.crash_output.strip():
        text += "\n\n" + _trim_crash_output(outcome.crash_output)
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
