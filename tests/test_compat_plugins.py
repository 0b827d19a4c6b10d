"""Well-known plugins under --sandbox=all and -n 2 --sandbox=all give what they give in a plain run.

Each scenario runs the same suite three ways with the real plugin installed, and compares what a user
sees: the outcomes, the closing summary line (less its time), junit XML counts and the files pytest
leaves behind. A difference here is a broken promise of transparency, not a flaky test.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODES: dict[str, tuple[str, ...]] = {
    "plain": (),
    "sandbox": ("--sandbox=all",),
    "xdist": ("-n", "2", "--sandbox=all"),
}


def _builtin_subtests() -> bool:
    """pytest 9 ships the subtests fixture and subTest reporting; pytest 8 needs the pytest-subtests plugin."""
    try:
        import _pytest.subtests  # noqa: F401
    except ImportError:
        return False
    return True


HAS_BUILTIN_SUBTESTS = _builtin_subtests()


class Run:
    """One mode's run: its result, the summary line less its time, junit counts and the files it left."""

    def __init__(self, result: pytest.RunResult, files: dict[str, bytes]) -> None:
        self.result = result
        self.files = files
        self.outcomes = result.parseoutcomes()
        self.summary = _summary_line(result)

    @property
    def junit(self) -> dict[str, str]:
        root = ET.fromstring(self.files["junit.xml"])
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert suite is not None
        return {key: suite.attrib[key] for key in ("tests", "failures", "errors", "skipped")}

    def text(self) -> str:
        return f"{self.result.stdout.str()}\n--- stderr ---\n{self.result.stderr.str()}"


def _summary_line(result: pytest.RunResult) -> str:
    """The last '=== 1 failed, 2 passed in 1.23s ===' line, its time and padding taken out."""
    for line in reversed(result.outlines):
        if re.match(r"^=+ .* in [\d.]+s.* =+$", line):
            return re.sub(r" in [\d.]+s( \([^)]*\))?", "", line).strip("= ")
    raise AssertionError("no summary line in:\n" + "\n".join(result.outlines))


def _left_files(path: Path, before: set[Path]) -> dict[str, bytes]:
    """Files a run added under ``path`` (pytester's own stdout/stderr and basetemp aside), then removed,
    so the next mode starts from the same tree."""
    left: dict[str, bytes] = {}
    for entry in sorted(path.iterdir()):
        if entry in before or entry.name in ("stdout", "stderr") or entry.name.startswith("runpytest-"):
            continue
        if entry.is_dir():
            for file in sorted(entry.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    left[str(file.relative_to(path))] = file.read_bytes()
            shutil.rmtree(entry)
        else:
            left[entry.name] = entry.read_bytes()
            entry.unlink()
    return left


def run_modes(pytester: pytest.Pytester, *args: str, timeout: float = 30, off: tuple[str, ...] = ()) -> dict[str, Run]:
    """The suite in pytester's directory, once per mode, each from the same files (``off``: plugins
    blocked with -p no:NAME)."""
    before = set(pytester.path.iterdir())
    runs = {}
    disabled = [arg for name in off for arg in ("-p", f"no:{name}")]
    for mode, extra in MODES.items():
        result = pytester.runpytest_subprocess(*disabled, *extra, *args, timeout=timeout)
        runs[mode] = Run(result, _left_files(pytester.path, before))
    return runs


def assert_same(runs: dict[str, Run], *, files: bool = False) -> Run:
    """Every mode's outcomes, summary line, exit code (and files left, if asked) are the plain run's."""
    plain = runs["plain"]
    for mode, run in runs.items():
        seen = (run.outcomes, run.summary, run.result.ret)
        wanted = (plain.outcomes, plain.summary, plain.result.ret)
        assert seen == wanted, f"{mode} differs from plain:\n{run.text()}\n=== plain ===\n{plain.text()}"
        if files:
            assert sorted(run.files) == sorted(plain.files), f"{mode} left other files:\n{run.text()}"
    return plain


def test_timeout_marker_fails_the_test_and_the_next_one_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time
        import pytest

        @pytest.mark.timeout(1)
        def test_slow():
            time.sleep(3)

        def test_next():
            pass
    """)
    runs = run_modes(pytester, "--junitxml=junit.xml")
    plain = assert_same(runs, files=True)
    assert plain.outcomes == {"failed": 1, "passed": 1}
    assert plain.result.ret == pytest.ExitCode.TESTS_FAILED
    for mode, run in runs.items():
        assert run.junit == {"tests": "2", "failures": "1", "errors": "0", "skipped": "0"}, mode
        run.result.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout.*"])
        assert run.files[".pytest_cache/v/cache/lastfailed"] == plain.files[".pytest_cache/v/cache/lastfailed"]


def test_faulthandler_timeout_does_not_hang_the_session(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfaulthandler_timeout = 5\n")
    pytester.makepyfile("""
        import time

        def test_one():
            time.sleep(0.2)

        def test_two():
            pass
    """)
    runs = run_modes(pytester, timeout=20)  # pytester raises TimeoutExpired if a session hangs
    plain = assert_same(runs)
    assert plain.outcomes == {"passed": 2}


def test_faulthandler_timeout_dumps_a_slow_test_and_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfaulthandler_timeout = 0.5\n")
    pytester.makepyfile("""
        import time

        def test_slow():
            time.sleep(1)

        def test_next():
            pass
    """)
    runs = run_modes(pytester, timeout=20)
    plain = assert_same(runs)
    assert plain.outcomes == {"passed": 2}
    for mode, run in runs.items():  # one dump, of the test (not also of pytest waiting for a sandbox)
        assert run.text().count("Timeout (0:00:00.500000)!") == 1, f"{mode}:\n{run.text()}"
        dump = run.text().split("Timeout (0:00:00.500000)!", 1)[1]
        assert re.search(r'File ".*\.py", line 4 in test_slow', dump), f"{mode}:\n{run.text()}"


def test_rerunfailures_reruns_until_it_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        calls = 0

        def test_third_time_lucky():
            global calls
            calls += 1
            assert calls == 3
    """)
    runs = run_modes(pytester, "--reruns", "3", "--junitxml=junit.xml")
    plain = assert_same(runs)
    assert plain.summary == "1 passed, 2 rerun"
    for mode, run in runs.items():
        assert run.junit == plain.junit, mode


def _subtest_lines(result: pytest.RunResult) -> list[str]:
    return sorted(line for line in result.outlines if line.startswith("SUBFAILED"))


def assert_same_subtest_lines(pytester: pytest.Pytester, runs: dict[str, Run], *args: str) -> None:
    """A failed subtest shows its values as in a plain run; under xdist as in a plain run with -n 2, since
    pytest's subtests take the repr of each value again on the way from a worker (n=1 shows as n='1')."""
    xdist = pytester.runpytest_subprocess("-n", "2", *args)
    assert _subtest_lines(runs["plain"].result), runs["plain"].text()
    assert _subtest_lines(runs["sandbox"].result) == _subtest_lines(runs["plain"].result)
    assert _subtest_lines(runs["xdist"].result) == _subtest_lines(xdist)


@pytest.mark.skipif(not HAS_BUILTIN_SUBTESTS, reason="pytest < 9 has no builtin subtests (the subtests fixture)")
def test_subtests_fixture_with_a_failing_subtest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # whole short summary lines
    pytester.makepyfile("""
        def test_numbers(subtests):
            for n in range(3):
                with subtests.test(n=n):
                    assert n != 1

        def test_next():
            pass
    """)
    runs = run_modes(pytester, "--junitxml=junit.xml", "-rf")
    plain = assert_same(runs)
    assert plain.summary == "2 failed, 1 passed"  # the subtest and the test that contains it
    for mode, run in runs.items():
        run.result.stdout.fnmatch_lines(["FAILED *::test_numbers - contains 1 failed subtest"])
        assert run.junit == plain.junit, mode
    assert_same_subtest_lines(pytester, runs, "-rf")


def test_unittest_subtest_with_a_failing_subtest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # whole short summary lines
    pytester.makepyfile("""
        import unittest

        class T(unittest.TestCase):
            def test_numbers(self):
                for n in range(3):
                    with self.subTest(n=n):
                        self.assertNotEqual(n, 1)

            def test_next(self):
                pass
    """)
    runs = run_modes(pytester, "--junitxml=junit.xml", "-rf")
    plain = assert_same(runs)
    assert plain.result.ret == pytest.ExitCode.TESTS_FAILED
    for mode, run in runs.items():
        assert run.junit == plain.junit, mode
    if HAS_BUILTIN_SUBTESTS:  # pytest 8 reports a failing subTest as its test's failure only
        plain.result.stdout.fnmatch_lines(["SUBFAILED(n=1) *::T::test_numbers - AssertionError: 1 == 1"])
        assert_same_subtest_lines(pytester, runs, "-rf")


def _total(run: Run) -> list[str]:
    """The coverage report's TOTAL row: statements, misses, branches, partial branches, percent."""
    rows = [line.split() for line in run.result.outlines if line.startswith("TOTAL")]
    assert len(rows) == 1, run.text()
    return rows[0]


def test_coverage_measured_in_sandboxes_is_pytests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        lib="""
            def sign(n):
                if n < 0:
                    return -1
                return 1

            def unused():
                return 0
        """,
        test_lib="""
            import lib

            def test_negative():
                assert lib.sign(-3) == -1

            def test_positive():
                assert lib.sign(3) == 1
        """,
    )
    runs = run_modes(pytester, "--cov=lib", "--cov-branch", "--cov-report=term")
    plain = assert_same(runs, files=True)
    assert plain.outcomes == {"passed": 2}
    assert _total(plain) == ["TOTAL", "6", "1", "2", "0", "88%"]  # everything but unused()'s body
    for mode, run in runs.items():
        assert _total(run) == _total(plain), f"{mode}:\n{run.text()}"
        assert ".coverage" in run.files, mode


def test_warnings_summary_counts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import warnings

        def test_one():
            warnings.warn(UserWarning("first"))

        def test_two():
            warnings.warn(DeprecationWarning("second"))
            warnings.warn(UserWarning("third"))
    """)
    runs = run_modes(pytester, "--junitxml=junit.xml")
    plain = assert_same(runs)
    assert plain.summary == "2 passed, 3 warnings"
    for mode, run in runs.items():
        for line in ("*UserWarning: first", "*DeprecationWarning: second", "*UserWarning: third"):
            run.result.stdout.fnmatch_lines([line])  # one at a time: xdist orders them as its tests finish
        assert run.junit == plain.junit, mode


def test_unenforceable_limit_under_filterwarnings_error_is_the_tests_error(pytester: pytest.Pytester) -> None:
    """The marked test runs in a sandbox in every mode (plain too): the limit rlimits cannot enforce
    warns at that test, filterwarnings=error makes it that test's error and never an INTERNALERROR."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(pids=32)
        def test_limited():
            pass

        def test_other():
            pass
    """)
    runs = run_modes(pytester, "--sandbox-cgroup-backend=rlimit", "--junitxml=junit.xml")
    plain = assert_same(runs)
    assert plain.outcomes == {"passed": 1, "errors": 1}
    for mode, run in runs.items():
        assert "INTERNALERROR" not in run.text(), mode
        run.result.stdout.fnmatch_lines(["*PytestWarning: pytest-sandbox: rlimits*cannot enforce pids*"])
        assert run.junit == {"tests": "2", "failures": "0", "errors": "1", "skipped": "0"}, mode


def test_a_reporter_plugins_protocol_hooks_run_in_the_sandbox(pytester: pytest.Pytester) -> None:
    """pytest-json-report's way: one plugin object records streams and logs in its runtest hooks, attaches them
    to the report in makereport and reads them back in logreport. In the sandbox only its logreport is the
    pytest process's; its protocol hooks run where the test runs."""
    pytester.makeconftest("""
        import pytest

        class Recorder:
            def __init__(self):
                self.notes = {}

            @pytest.hookimpl(hookwrapper=True)
            def pytest_runtest_call(self, item):
                item.seen = "called"
                yield

            @pytest.hookimpl(hookwrapper=True)
            def pytest_runtest_makereport(self, item, call):
                report = (yield).get_result()
                report.note = f"{call.when}: {getattr(item, 'seen', '-')}"

            def pytest_runtest_logreport(self, report):
                self.notes.setdefault(report.nodeid, []).append(getattr(report, "note", None))

            def pytest_terminal_summary(self, terminalreporter):
                for nodeid, notes in sorted(self.notes.items()):
                    terminalreporter.write_line(f"NOTES {nodeid} {notes}")

        def pytest_configure(config):
            config.pluginmanager.register(Recorder(), "recorder")
    """)
    module = pytester.makepyfile("""
        def test_pass():
            pass

        def test_fail():
            assert 0
    """)
    runs = run_modes(pytester)
    assert_same(runs)
    notes = "['setup: -', 'call: called', 'teardown: called']"
    wanted = [f"NOTES {module.name}::{name} {notes}" for name in ("test_fail", "test_pass")]
    for mode, run in runs.items():
        assert [line for line in run.result.outlines if line.startswith("NOTES")] == wanted, f"{mode}:\n{run.text()}"
