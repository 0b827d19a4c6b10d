"""What the terminal summary shows: resource use per test, and failure rates of repeated runs.

Fed from reports (their ``sandbox_*`` user properties and outcomes), so it also
works on the pytest-xdist controller, where no sandbox runs.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import pytest

USAGE_PREFIX = "sandbox_"
_RUN_ID = re.compile(r"-?run\d+-of-\d+")


@dataclasses.dataclass
class Record:
    nodeid: str
    failed: bool = False
    message: str | None = None
    usage: dict[str, Any] = dataclasses.field(default_factory=dict)


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(report.longrepr)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:160] if lines else "(no message)"


class Records:
    def __init__(self) -> None:
        self.by_nodeid: dict[str, Record] = {}

    def add(self, report: pytest.TestReport) -> None:
        record = self.by_nodeid.setdefault(report.nodeid, Record(report.nodeid))
        if report.failed:
            record.failed = True
            record.message = record.message or f"{report.when}: {_first_line(report)}"
        for name, value in report.user_properties:
            if isinstance(name, str) and name.startswith(USAGE_PREFIX):
                record.usage[name[len(USAGE_PREFIX) :]] = value


def _mib(value: Any) -> str:
    return f"{value / 2**20:8.1f}M" if isinstance(value, (int, float)) else f"{'-':>9}"


def _seconds(value: Any) -> str:
    return f"{value:8.2f}s" if isinstance(value, (int, float)) else f"{'-':>9}"


def write_durations(terminal: Any, records: Records, count: int) -> None:
    measured = [r for r in records.by_nodeid.values() if r.usage]
    if not measured:  # every sandboxed test's reports carry usage (oom_kills at least)
        terminal.write_sep("=", "sandbox resources")
        terminal.write_line(
            "no test ran in a sandbox: nothing was measured "
            "(mark tests @pytest.mark.container, or run with --sandbox=all)"
        )
        return
    measured.sort(key=lambda r: (r.usage.get("memory_peak") or 0, r.usage.get("cpu_user") or 0), reverse=True)
    shown = measured if count == 0 else measured[:count]
    title = "sandbox resources" + ("" if count == 0 else f" (top {len(shown)} by peak memory)")
    terminal.write_sep("=", title)
    terminal.write_line(f"{'peak mem':>9} {'cpu user':>9} {'cpu sys':>9} {'throttled':>9} {'pids':>5}  test")
    for record in shown:
        usage = record.usage
        pids = usage.get("pids_peak")
        terminal.write_line(
            f"{_mib(usage.get('memory_peak'))} {_seconds(usage.get('cpu_user'))} {_seconds(usage.get('cpu_system'))} "
            f"{_seconds(usage.get('cpu_throttled'))} {pids if pids is not None else '-':>5}  {record.nodeid}"
        )


def base_nodeid(nodeid: str) -> str:
    """The test a repeated run belongs to: its node id without the run-k-of-N part."""
    return _RUN_ID.sub("", nodeid).replace("[]", "")


def write_repeats(terminal: Any, records: Records, runs: int) -> None:
    groups: dict[str, list[Record]] = collections.defaultdict(list)
    for record in records.by_nodeid.values():
        groups[base_nodeid(record.nodeid)].append(record)
    terminal.write_sep("=", f"sandbox repeat: {runs} runs per test, each in a fresh sandbox")
    terminal.write_line(f"{'runs':>5} {'failed':>6} {'rate':>6}  test")
    for nodeid, group in sorted(groups.items(), key=lambda kv: -sum(r.failed for r in kv[1])):
        failures = [r for r in group if r.failed]
        terminal.write_line(f"{len(group):>5} {len(failures):>6} {len(failures) / len(group):>6.0%}  {nodeid}")
        for message, seen in collections.Counter(r.message for r in failures).most_common():
            terminal.write_line(f"{'':>20}{seen} x {message}")
