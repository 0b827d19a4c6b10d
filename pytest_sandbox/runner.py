"""pytest's side of a sandbox: start the zygote, ask it for sandboxes, turn what comes back into reports."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from . import sync, zygote
from .errors import SandboxError
from .spec import SandboxSpec


class Zygote:
    """Handle on the session's zygote process (see zygote.py)."""

    def __init__(self, items: dict[str, pytest.Item], stash_key: Any, paths: zygote.SessionPaths,
                 epoch: int, limits: zygote.Limits) -> None:
        self.epoch = epoch
        self.limits = limits
        self.finishing: list[socket.socket] = []  # finished sandboxes whose exit is not yet collected
        self.nodeids = frozenset(items)
        self.crash_fd = os.memfd_create("sandbox-faulthandler", os.MFD_CLOEXEC)
        os.set_inheritable(self.crash_fd, True)
        self.control, theirs = sync.socketpair()
        parent = os.getpid()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process"
            self.pid = os.fork()
        if self.pid == 0:
            self.control.close()
            zygote.zygote_main(theirs, items, stash_key, paths, self.crash_fd, parent, limits)
        theirs.close()
        message, _ = sync.recv(self.control)
        if message is None or message.get("op") != "ready":
            error = (message or {}).get("error", "the zygote exited during setup")
            self.close()
            raise SandboxError(f"cannot start sandboxes: {error}")

    def start(self, nodeid: str) -> socket.socket:
        """Ask for a sandbox running ``nodeid``; returns the socket its messages arrive on."""
        self.collect_exits(block=False)
        ours, theirs = sync.socketpair()
        try:
            sync.send(self.control, {"op": "run", "nodeid": nodeid}, fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            raise SandboxError(f"the sandbox zygote of this session died unexpectedly ({exc})") from None
        finally:
            theirs.close()
        return ours

    def kill(self, nodeid: str) -> None:
        """End the sandbox running ``nodeid`` now (its exit message follows as usual)."""
        try:
            sync.send(self.control, {"op": "kill", "nodeid": nodeid})
        except OSError:
            pass

    def collect_exits(self, block: bool) -> None:
        """Collect the "gone" messages of finished sandboxes: every process of theirs has ended.

        A finished sandbox's processes leave while pytest reports and the next sandbox
        runs; ``block=True`` waits until all have left, which is done before pytest
        runs anything on the host and at the end of the session.
        """
        still = []
        for sock in self.finishing:
            while True:
                try:
                    message, _ = sync.recv(sock, block=block)
                except BlockingIOError:
                    still.append(sock)
                    break
                if message is None or message.get("type") == "gone":
                    sock.close()
                    break
        self.finishing = still

    def read_crash_output(self) -> str:
        size = os.fstat(self.crash_fd).st_size
        return os.pread(self.crash_fd, min(size, 256 * 1024), 0).decode(errors="replace")

    def reset_crash_output(self) -> None:
        os.ftruncate(self.crash_fd, 0)
        os.lseek(self.crash_fd, 0, os.SEEK_SET)

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self) -> None:
        """Stop the zygote and wait until it and every sandbox are gone."""
        try:
            self.collect_exits(block=True)
        except OSError:
            pass
        try:
            sync.send(self.control, {"op": "exit"})
        except OSError:
            pass
        self.control.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.crash_fd)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
                message, _ = sync.recv(sock)
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
        if "pytest_sandbox/child.py" in line:
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


def session_paths(config: pytest.Config, basetemp: str | None) -> zygote.SessionPaths:
    """Which host paths sandboxes must keep writable or visible for this pytest process."""
    cwd = os.getcwd()
    writable = [str(config.rootpath), cwd]
    home = os.environ.get("HOME")
    if home and os.path.isabs(home) and os.path.isdir(home):
        writable.append(home)
    if basetemp:
        writable.append(basetemp)
    needed = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              str(config.invocation_params.dir), *[p for p in sys.path if p]]
    if config.inipath:
        needed.append(str(config.inipath.parent))
    return zygote.SessionPaths(cwd=cwd, writable=tuple(writable), needed=tuple(needed))


__all__ = ["SandboxSpec", "Zygote", "run_in_sandbox", "session_paths"]
