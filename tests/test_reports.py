"""What pytest reports for a sandbox: the crash texts, limit notes and made-up reports of a dead sandbox."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pytest_sandbox import reports
from pytest_sandbox.reports import Outcome, _crash_reports, _trim_crash_output, refused
from pytest_sandbox.spec import SandboxSpec

MIB = 2**20


def outcome(exit: dict[str, object] | None = None, **spec: object) -> Outcome:
    result = Outcome(SandboxSpec(**spec))  # type: ignore[arg-type]
    result.exit = exit
    return result


def _with_output(result: Outcome, crash_output: str) -> Outcome:
    result.crash_output = crash_output
    return result


# -- Outcome.crash_text ---------------------------------------------------------------------------


def test_setup_error_names_phase_and_message() -> None:
    result = outcome(timeout=3)
    result.setup_error = {"type": "error", "phase": "rootfs", "message": "cannot mount /data"}
    result.killed_after_timeout = True  # a setup error wins over everything else
    assert result.crash_text("Timeout (0:00:03)!") == "sandbox setup failed in phase 'rootfs': cannot mount /data"


def test_timeout_when_pytest_killed_the_sandbox() -> None:
    result = outcome({"type": "exit", "signal": signal.SIGKILL}, timeout=2.5)
    result.killed_after_timeout = True
    assert result.crash_text("") == "timeout after 2.5 s: the whole sandbox was killed"


def test_timeout_when_the_watchdog_dumped_the_stacks() -> None:
    result = outcome({"type": "exit", "code": 1}, timeout=10)
    dump = 'Timeout (0:00:10)!\nThread 0x00007f3a (most recent call first):\n  File "/src/test_x.py", line 4'
    assert result.crash_text(dump) == "timeout after 10 s: the whole sandbox was killed"


def test_timeout_text_only_at_the_start_of_the_output() -> None:
    result = outcome({"type": "exit", "code": 1}, timeout=10)
    assert result.crash_text("Fatal Python error: Timeout (0:00:10)!") == (
        "sandbox crashed: the test process exited with status 1"
    )


def test_no_exit_message_means_init_vanished() -> None:
    assert outcome(None).crash_text("") == (
        "sandbox crashed: its init process vanished without reporting the test's status"
    )


def test_sigkill_with_oom_kills_is_the_oom_killer() -> None:
    result = outcome(
        {"type": "exit", "signal": 9, "usage": {"oom_kills": 1, "memory_peak": 64 * MIB + MIB // 2}}, memory=64 * MIB
    )
    assert result.crash_text("") == "killed by the OOM killer: memory limit 64.0 MiB, peak 64.5 MiB"


def test_oom_killer_without_a_measured_peak() -> None:
    result = outcome({"type": "exit", "signal": 9, "usage": {"oom_kills": 2, "memory_peak": None}}, memory=3 * MIB // 2)
    assert result.crash_text("") == "killed by the OOM killer: memory limit 1.5 MiB"


def test_plain_sigkill() -> None:
    result = outcome({"type": "exit", "signal": 9, "usage": {"oom_kills": 0, "memory_peak": 5 * MIB}}, memory=64 * MIB)
    assert result.crash_text("") == "sandbox crashed: killed by SIGKILL"


def test_oom_kills_without_sigkill_are_not_the_cause() -> None:
    result = outcome({"type": "exit", "signal": int(signal.SIGSEGV), "usage": {"oom_kills": 1}}, memory=MIB)
    assert result.crash_text("") == "sandbox crashed: SIGSEGV"


def test_other_signal_by_name() -> None:
    assert outcome({"type": "exit", "signal": int(signal.SIGABRT)}).crash_text("") == "sandbox crashed: SIGABRT"


def test_unknown_signal_by_number() -> None:
    assert outcome({"type": "exit", "signal": 200}).crash_text("") == "sandbox crashed: signal 200"


def test_exit_status() -> None:
    assert outcome({"type": "exit", "code": 3}).crash_text("") == (
        "sandbox crashed: the test process exited with status 3"
    )


# -- Outcome.limit_notes and usage ----------------------------------------------------------------


def test_limit_notes_oom_kills_and_pids_hits() -> None:
    result = outcome(
        {"type": "exit", "code": 0, "usage": {"oom_kills": 2, "pids_limit_hits": 7}}, memory=256 * MIB, pids=16
    )
    assert result.limit_notes() == (
        "the OOM killer ended 2 process(es) at the memory limit 256.0 MiB\nthe pids limit 16 refused 7 fork(s)"
    )


def test_limit_notes_pids_only() -> None:
    result = outcome({"type": "exit", "code": 0, "usage": {"oom_kills": 0, "pids_limit_hits": 1}}, pids=4)
    assert result.limit_notes() == "the pids limit 4 refused 1 fork(s)"


def test_limit_notes_empty_without_hits() -> None:
    result = outcome({"type": "exit", "code": 0, "usage": {"oom_kills": 0, "pids_limit_hits": 0}}, memory=MIB, pids=4)
    assert result.limit_notes() == ""
    assert outcome(None).limit_notes() == ""


def test_usage_prefers_the_cgroup() -> None:
    result = outcome({"type": "exit", "code": 0, "usage": {"memory_peak": 10}, "rusage": {"memory_peak": 99}})
    assert result.usage == {"memory_peak": 10}


def test_usage_falls_back_to_rusage() -> None:
    rusage = {"memory_peak": 99, "cpu_user": 0.5}
    assert outcome({"type": "exit", "code": 0, "usage": None, "rusage": rusage}).usage == rusage
    assert outcome({"type": "exit", "code": 0, "usage": {}, "rusage": rusage}).usage == rusage
    assert outcome({"type": "exit", "code": 0}).usage == {}
    assert outcome(None).usage == {}


def test_usage_is_a_copy() -> None:
    result = outcome({"type": "exit", "code": 0, "usage": {"oom_kills": 1}})
    result.usage["oom_kills"] = 5
    assert result.usage == {"oom_kills": 1}


# -- _trim_crash_output ---------------------------------------------------------------------------

DUMP = """\
Fatal Python error: Segmentation fault

Current thread 0x00007f0c8d5fe740 (most recent call first):
  File "/src/tests/test_crash.py", line 7 in crash
  File "/src/tests/test_crash.py", line 11 in test_segfault
  File "/venv/lib/python3.12/site-packages/_pytest/python.py", line 157 in pytest_pyfunc_call
  File "/venv/lib/python3.12/site-packages/pluggy/_callers.py", line 121 in _multicall
  File "/venv/lib/python3.12/site-packages/pytest_sandbox/runtime/test_process.py", line 154 in test_process
  File "/venv/lib/python3.12/site-packages/pytest_sandbox/runtime/zygote.py", line 80 in serve
"""


def test_trim_cuts_below_the_outermost_user_frame() -> None:
    assert _trim_crash_output(DUMP) == (
        "Fatal Python error: Segmentation fault\n\n"
        "Current thread 0x00007f0c8d5fe740 (most recent call first):\n"
        '  File "/src/tests/test_crash.py", line 7 in crash\n'
        '  File "/src/tests/test_crash.py", line 11 in test_segfault'
    )


def test_trim_keeps_everything_without_plumbing_and_strips_the_end() -> None:
    text = 'Fatal Python error: Aborted\n\n  File "/src/test_a.py", line 3 in test_a\n\n\n'
    assert _trim_crash_output(text) == 'Fatal Python error: Aborted\n\n  File "/src/test_a.py", line 3 in test_a'


def test_trim_of_a_dump_that_is_all_plumbing_keeps_only_the_header() -> None:
    text = (
        'Fatal Python error: Aborted\n\n  File "/venv/lib/python3.12/site-packages/_pytest/runner.py", line 9 in run\n'
    )
    assert _trim_crash_output(text) == "Fatal Python error: Aborted"


def test_trim_keeps_pytest_frames_the_test_called_and_drops_the_watchdog_thread() -> None:
    text = (
        "Timeout (0:00:01)!\n"
        "Current thread 0x01 (most recent call first):\n"
        '  File "/venv/lib/python3.12/site-packages/pytest_sandbox/runtime/test_process.py", line 3 in expire\n'
        '  File "/usr/lib/python3.12/threading.py", line 1 in run\n'
        "\n"
        "Thread 0x02 (most recent call first):\n"
        '  File "/venv/lib/python3.12/site-packages/_pytest/python_api.py", line 8 in approx\n'
        '  File "/src/test_a.py", line 3 in test_a\n'
        '  File "/venv/lib/python3.12/site-packages/_pytest/python.py", line 157 in pytest_pyfunc_call\n'
    )
    assert _trim_crash_output(text) == (
        "Timeout (0:00:01)!\n"
        "Thread 0x02 (most recent call first):\n"
        '  File "/venv/lib/python3.12/site-packages/_pytest/python_api.py", line 8 in approx\n'
        '  File "/src/test_a.py", line 3 in test_a'
    )


# -- reports made up for a dead or refused sandbox --------------------------------------------------


@pytest.fixture
def item(pytester: pytest.Pytester) -> pytest.Item:
    pytester.makeini("[pytest]\naddopts = -p no:syrupy\n")  # its session-end hook needs a real session's exitstatus
    return pytester.getitem("def test_it():\n    pass\n", funcname="test_it")


def test_crash_before_setup_reported_fails_setup(item: pytest.Item) -> None:
    result = outcome({"type": "exit", "signal": int(signal.SIGSEGV)})
    reports = list(_crash_reports(item, _with_output(result, DUMP)))
    assert [(r.when, r.outcome) for r in reports] == [("setup", "failed"), ("teardown", "passed")]
    assert reports[0].longrepr == (
        "sandbox crashed: SIGSEGV\n\n"
        "Fatal Python error: Segmentation fault\n\n"
        "Current thread 0x00007f0c8d5fe740 (most recent call first):\n"
        '  File "/src/tests/test_crash.py", line 7 in crash\n'
        '  File "/src/tests/test_crash.py", line 11 in test_segfault'
    )
    assert {r.nodeid for r in reports} == {item.nodeid}


def test_crash_after_passed_setup_fails_call(item: pytest.Item) -> None:
    result = outcome({"type": "exit", "code": 4})
    result.whens, result.setup_passed = {"setup"}, True
    reports = list(_crash_reports(item, _with_output(result, "  \n")))
    assert [(r.when, r.outcome) for r in reports] == [("call", "failed"), ("teardown", "passed")]
    assert reports[0].longrepr == "sandbox crashed: the test process exited with status 4"


def test_crash_after_failed_setup_fails_teardown(item: pytest.Item) -> None:
    result = outcome({"type": "exit", "code": 4})
    result.whens = {"setup"}  # setup failed, so there is no call phase
    reports = list(_crash_reports(item, _with_output(result, "")))
    assert [(r.when, r.outcome) for r in reports] == [("teardown", "failed")]


def test_crash_after_call_fails_teardown(item: pytest.Item) -> None:
    result = outcome(None)
    result.whens, result.setup_passed = {"setup", "call"}, True
    reports = list(_crash_reports(item, _with_output(result, "")))
    assert [(r.when, r.outcome) for r in reports] == [("teardown", "failed")]
    assert reports[0].longrepr == "sandbox crashed: its init process vanished without reporting the test's status"


def test_refused_as_skip(item: pytest.Item) -> None:
    setup, teardown = refused(item, "no user namespaces here", skip=True)
    assert (setup.when, setup.outcome, teardown.when, teardown.outcome) == ("setup", "skipped", "teardown", "passed")
    assert isinstance(setup.longrepr, tuple)
    assert setup.longrepr[2] == "Skipped: no user namespaces here"


def test_refused_as_failure(item: pytest.Item) -> None:
    setup, teardown = refused(item, "no user namespaces here", skip=False)
    assert (setup.when, setup.outcome, teardown.when, teardown.outcome) == ("setup", "failed", "teardown", "passed")
    assert str(setup.longrepr) == "no user namespaces here"


# -- reports of plugins that run the protocol themselves ------------------------------------------------

DEFERRED_LOGGING = """
import pytest
from _pytest.runner import runtestprotocol


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    # What pytest-rerunfailures does: run the protocol without logging, then log its reports.
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in runtestprotocol(item, nextitem=nextitem, log=False):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
"""


@pytest.mark.skipif(not hasattr(pytest, "Subtests"), reason="pytest < 9 has no builtin subtests (the subtests fixture)")
def test_subtest_reports_logged_before_the_setup_report(pytester: pytest.Pytester) -> None:
    """Subtests log their reports during the call; a plugin that logs the protocol's reports afterwards
    (pytest-rerunfailures) makes them come before setup's: as without a sandbox, not a malformed message."""
    pytester.makeconftest(DEFERRED_LOGGING)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.container
        def test_sub(subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i != 1
        """
    )
    args = ("-p", "no:cacheprovider", "-p", "no:rerunfailures", "-rA")  # the conftest's plugin only
    plain = pytester.runpytest_subprocess(*args, "--sandbox=off")
    sandboxed = pytester.runpytest_subprocess(*args)
    assert "malformed" not in sandboxed.stdout.str()
    assert sandboxed.parseoutcomes() == plain.parseoutcomes() == {"failed": 2}
    sandboxed.stdout.fnmatch_lines(["SUBFAILED*::test_sub*", "FAILED *::test_sub - con*"])


def test_interrupt_latch_holds_a_ctrl_c_until_the_relay_waits() -> None:
    """^C while the relay reads or pytest shows a report is not raised there: the relay raises it where it
    waits, as the running test's interrupt (a ^C in the middle of protocol.py once named that file)."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with reports._InterruptLatch() as latch:
        os.kill(os.getpid(), signal.SIGINT)
        assert latch.pending  # held, nothing raised while the relay is busy
        latch.waiting = True
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs between bytecodes: it raises long before this ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_latch_leaves_a_users_own_handler_alone() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with reports._InterruptLatch() as latch:
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT] and not latch.pending
    finally:
        signal.signal(signal.SIGINT, previous)
