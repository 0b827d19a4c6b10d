"""The terminal summary: per-test resource table and failure rates of repeated runs, fed with plain reports."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from pytest_sandbox.summary import Records, base_nodeid, write_durations, write_repeats

MIB = 2**20


class Terminal:
    """Collects what the summary writes, separators as '=== title ===' lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str) -> None:
        self.lines.append(f"{sep * 3} {title} {sep * 3}")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def report(
    nodeid: str,
    outcome: Literal["passed", "failed", "skipped"] = "passed",
    when: Literal["setup", "call", "teardown"] = "call",
    longrepr: Any = None,
    **usage: object,
) -> pytest.TestReport:
    properties = [(f"sandbox_{name}", value) for name, value in usage.items()]
    return pytest.TestReport(
        nodeid, ("test_x.py", 0, nodeid), {}, outcome, longrepr, when, user_properties=[("other", 1), *properties]
    )


def records(*reports: pytest.TestReport) -> Records:
    result = Records()
    for one in reports:
        result.add(one)
    return result


# -- Records ----------------------------------------------------------------------------------------


def test_records_collect_usage_of_all_phases_without_prefix() -> None:
    result = records(
        report("t.py::a", when="setup", pids_peak=3),
        report("t.py::a", when="teardown", memory_peak=5 * MIB, cpu_user=0.25),
    )
    assert list(result.by_nodeid) == ["t.py::a"]
    record = result.by_nodeid["t.py::a"]
    assert record.usage == {"pids_peak": 3, "memory_peak": 5 * MIB, "cpu_user": 0.25}
    assert (record.failed, record.message) == (False, None)


def test_records_keep_the_first_failure_with_its_phase() -> None:
    result = records(
        report("t.py::a", "failed", "call", longrepr="\n\nAssertionError: assert 1 == 2\nmore"),
        report("t.py::a", "failed", "teardown", longrepr="RuntimeError: later"),
    )
    record = result.by_nodeid["t.py::a"]
    assert record.failed
    assert record.message == "call: AssertionError: assert 1 == 2"


def test_records_take_the_crash_message_of_a_repr() -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        info = pytest.ExceptionInfo.from_current()
    longrepr = info.getrepr()
    result = records(report("t.py::a", "failed", "setup", longrepr=longrepr))
    assert result.by_nodeid["t.py::a"].message == "setup: ValueError: bad value"


def test_records_cut_long_messages_and_name_empty_ones() -> None:
    result = records(report("t.py::a", "failed", longrepr="x" * 300), report("t.py::b", "failed", longrepr="  \n"))
    assert result.by_nodeid["t.py::a"].message == "call: " + "x" * 160
    assert result.by_nodeid["t.py::b"].message == "call: (no message)"


# -- write_durations --------------------------------------------------------------------------------

HEADER = " peak mem  cpu user   cpu sys throttled  pids  test"


def test_durations_sorted_by_peak_memory_then_cpu() -> None:
    result = records(
        report("t.py::small", memory_peak=1 * MIB, cpu_user=9.0),
        report(
            "t.py::big",
            memory_peak=300 * MIB + MIB // 2,
            cpu_user=0.5,
            cpu_system=0.125,
            cpu_throttled=0.0,
            pids_peak=12,
        ),
        report("t.py::tie_slow", memory_peak=1 * MIB, cpu_user=20.0),
        report("t.py::unmeasured"),
    )
    terminal = Terminal()
    write_durations(terminal, result, 0)
    assert terminal.lines == [
        "=== sandbox resources ===",
        HEADER,
        "   300.5M     0.50s     0.12s     0.00s    12  t.py::big",
        "     1.0M    20.00s         -         -     -  t.py::tie_slow",
        "     1.0M     9.00s         -         -     -  t.py::small",
    ]


def test_durations_top_count() -> None:
    result = records(*(report(f"t.py::m{n}", memory_peak=n * MIB) for n in range(1, 6)))
    terminal = Terminal()
    write_durations(terminal, result, 2)
    assert terminal.lines == [
        "=== sandbox resources (top 2 by peak memory) ===",
        HEADER,
        "     5.0M         -         -         -     -  t.py::m5",
        "     4.0M         -         -         -     -  t.py::m4",
    ]


def test_durations_top_count_larger_than_measured() -> None:
    terminal = Terminal()
    write_durations(terminal, records(report("t.py::a", memory_peak=None, pids_peak=0)), 10)
    assert terminal.lines == [
        "=== sandbox resources (top 1 by peak memory) ===",
        HEADER,
        "        -         -         -         -     0  t.py::a",
    ]


def test_durations_say_so_when_no_test_ran_sandboxed() -> None:
    terminal = Terminal()
    write_durations(terminal, records(report("t.py::a"), report("t.py::b", "failed", longrepr="x")), 0)
    assert terminal.lines == [
        "=== sandbox resources ===",
        "no test ran in a sandbox: nothing was measured (mark tests @pytest.mark.container, or run with --sandbox=all)",
    ]


# -- write_repeats ----------------------------------------------------------------------------------


def test_base_nodeid_drops_the_run_id() -> None:
    assert base_nodeid("t.py::test_a[run3-of-10]") == "t.py::test_a"
    assert base_nodeid("t.py::test_a[x1-run3-of-10]") == "t.py::test_a[x1]"
    assert base_nodeid("t.py::Test::test_a") == "t.py::Test::test_a"


@pytest.mark.xfail(
    strict=True,
    reason="known bug: the plugin's run-k-of-N id comes first for parametrized "
    "tests ('[run1-of-2-1]'), and removing it leaves '[-1]'",
)
def test_base_nodeid_of_a_parametrized_repeat() -> None:
    assert base_nodeid("t.py::test_a[run1-of-2-1]") == "t.py::test_a[1]"


def test_repeats_most_failing_first_with_messages_by_count() -> None:
    nodeids = [f"t.py::{name}[run{k}-of-4]" for name in ("steady", "flaky", "broken") for k in range(1, 5)]
    failures = {
        "t.py::flaky[run2-of-4]": "AssertionError: timing",
        "t.py::broken[run1-of-4]": "OSError: port in use",
        "t.py::broken[run2-of-4]": "KeyError: 'x'",
        "t.py::broken[run3-of-4]": "OSError: port in use",
        "t.py::broken[run4-of-4]": "OSError: port in use",
    }
    result = records(*(report(n, "failed", longrepr=failures[n]) if n in failures else report(n) for n in nodeids))
    terminal = Terminal()
    write_repeats(terminal, result, 4)
    assert terminal.lines == [
        "=== sandbox repeat: 4 runs per test, each in a fresh sandbox ===",
        " runs failed   rate  test",
        "    4      4   100%  t.py::broken",
        "                    3 x call: OSError: port in use",
        "                    1 x call: KeyError: 'x'",
        "    4      1    25%  t.py::flaky",
        "                    1 x call: AssertionError: timing",
        "    4      0     0%  t.py::steady",
    ]


def test_repeats_count_a_run_failing_in_two_phases_once() -> None:
    result = records(
        report("t.py::a[run1-of-3]", "failed", "call", longrepr="boom"),
        report("t.py::a[run1-of-3]", "failed", "teardown", longrepr="cleanup"),
        report("t.py::a[run2-of-3]"),
        report("t.py::a[run3-of-3]"),
    )
    terminal = Terminal()
    write_repeats(terminal, result, 3)
    assert terminal.lines[2:] == ["    3      1    33%  t.py::a", "                    1 x call: boom"]
