"""Well-known plugins under --sandbox=all and -n 2 --sandbox=all give what they give in a plain run.

Each scenario runs the same suite three ways with the real plugin installed, and compares what a user
sees: the outcomes, the closing summary line (less its time), junit XML counts and the files pytest
leaves behind. A difference here is a broken promise of transparency, not a flaky test.
"""

from __future__ import annotations

import json
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


@pytest.fixture(autouse=True)
def _inner_runs_are_no_xdist_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under -n 2 this test runs in an xdist worker, whose variables its inner pytest would inherit:
    pytest-benchmark and syrupy take them for their own worker's and turn themselves off or go quiet."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


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
    runs = run_modes(pytester, "--reruns", "3", "--junitxml=junit.xml", off=("flaky",))  # flaky's protocol would
    # run the test instead of pytest-rerunfailures' (both are the first result of pytest_runtest_protocol)
    plain = assert_same(runs)
    assert plain.summary == "1 passed, 2 rerun"
    for mode, run in runs.items():
        assert run.junit == plain.junit, mode


DEPENDENCIES = """
    import pytest

    @pytest.mark.dependency()
    def test_a():
        pass

    @pytest.mark.dependency()
    def test_b():
        assert False

    @pytest.mark.dependency(depends=["test_a"])
    def test_after_a():
        pass

    @pytest.mark.dependency(depends=["test_b"])
    def test_after_b():
        pass

    @pytest.mark.container(memory="256M")  # a sandbox of its own
    @pytest.mark.dependency(depends=["test_a"])
    def test_alone_after_a():
        pass

    class TestK:
        @pytest.mark.dependency(name="first")
        def test_first(self):
            pass

        @pytest.mark.dependency(depends=["first"])
        def test_second(self):
            pass

    @pytest.mark.dependency(depends=["test_deps.py::test_a"], scope="session")
    def test_session_scope():
        pass
"""


@pytest.mark.parametrize("extra", [(), ("--sandbox-scope=module",), ("--sandbox-scope=session",)], ids=str)
def test_pytest_dependency_sees_earlier_outcomes(pytester: pytest.Pytester, extra: tuple[str, ...]) -> None:
    """pytest-dependency records each outcome in the test's process: a later test, in another sandbox, runs or
    is skipped as in a plain run. Under xdist each worker knows its own tests' outcomes only, sandboxed or not:
    with --dist loadfile one worker runs the file, as a plain run does."""
    pytester.makepyfile(test_deps=DEPENDENCIES)
    plain = pytester.runpytest_subprocess("-rs", *extra)
    assert plain.parseoutcomes() == {"passed": 6, "failed": 1, "skipped": 1}, plain.stdout.str()  # test_after_b
    for mode in (("--sandbox=all",), ("-n", "2", "--dist", "loadfile", "--sandbox=all")):
        result = pytester.runpytest_subprocess("-rs", *mode, *extra)
        assert result.parseoutcomes() == plain.parseoutcomes(), result.stdout.str()
        result.stdout.fnmatch_lines(["SKIPPED * test_after_b depends on test_b"])


def test_pytest_dependency_between_host_and_sandboxed_tests(pytester: pytest.Pytester) -> None:
    """In a marked run a host test depends on a sandboxed one, and a sandboxed one on a host test."""
    pytester.makepyfile(
        test_mixed="""
        import pytest

        @pytest.mark.container
        @pytest.mark.dependency()
        def test_in_sandbox():
            pass

        @pytest.mark.dependency(depends=["test_in_sandbox"])
        def test_on_host():
            pass

        @pytest.mark.container
        @pytest.mark.dependency(depends=["test_on_host"])
        def test_back_in_a_sandbox():
            pass
    """
    )
    pytester.runpytest_subprocess("-rs").assert_outcomes(passed=3)


def test_allure_results_are_a_plain_runs(pytester: pytest.Pytester) -> None:
    """allure-pytest writes each test's result in the sandbox, under --alluredir (an output): one result per
    test with its status, and no second, empty one from the relay in an xdist worker."""
    pytester.makepyfile("def test_ok(): pass\ndef test_bad(): assert 0\n")
    for mode in ((), ("--sandbox=all",), ("-n", "2", "--sandbox=all"), ("--sandbox=hermetic",)):
        results = pytester.path / "allure-results"
        shutil.rmtree(results, ignore_errors=True)
        pytester.runpytest_subprocess("--alluredir=allure-results", *mode).assert_outcomes(passed=1, failed=1)
        found = [json.loads(path.read_text()) for path in results.glob("*-result.json")]
        assert sorted((result["name"], result.get("status")) for result in found) == [
            ("test_bad", "failed"),
            ("test_ok", "passed"),
        ], mode


@pytest.mark.parametrize("mode", [(), ("--sandbox=all",), ("-n", "2", "--sandbox=all"), ("--sandbox=hermetic",)])
def test_pytest_regressions_writes_its_data_as_in_a_plain_run(pytester: pytest.Pytester, mode: tuple[str, ...]) -> None:
    """pytest-regressions writes a missing expected file beside the test module (and fails the test), and every
    one with --force-regen: the data directory is an output, so the next run compares with it."""
    pytester.makepyfile(test_r="def test_data(data_regression):\n    data_regression.check({'a': 1})\n")
    expected = pytester.path / "test_r" / "test_data.yml"
    pytester.runpytest_subprocess(*mode).assert_outcomes(failed=1)
    assert expected.read_text() == "a: 1\n"
    pytester.runpytest_subprocess(*mode).assert_outcomes(passed=1)
    expected.write_text("a: 2\n")
    pytester.runpytest_subprocess("--force-regen", *mode).assert_outcomes(failed=1)
    assert expected.read_text() == "a: 1\n"


def test_pytest_bdd_reports_its_scenarios(pytester: pytest.Pytester) -> None:
    """pytest-bdd keeps each report's scenario by report object, in the process that made the report: it comes
    with the report, so the gherkin terminal reporter and the cucumber JSON are a plain run's."""
    feature = "Feature: Cart\n  Scenario: Add\n    Given an empty cart\n    Then it is empty\n"
    pytester.makefile(".feature", cart=feature)
    pytester.makepyfile(
        test_cart="""
        from pytest_bdd import given, scenarios, then

        scenarios("cart.feature")

        @given("an empty cart", target_fixture="cart")
        def empty_cart():
            return []

        @then("it is empty")
        def is_empty(cart):
            assert cart == []
        """
    )
    seen = []
    for mode in ((), ("--sandbox=all",), ("--sandbox=hermetic",)):
        result = pytester.runpytest_subprocess("--gherkin-terminal-reporter", "-v", "--cucumberjson=c.json", *mode)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["Feature: Cart", "    Scenario: Add PASSED"])
        report = re.sub(r'"duration": \d+', "", (pytester.path / "c.json").read_text())
        (pytester.path / "c.json").unlink()
        seen.append(report)
    assert seen[1] == seen[0] and seen[2] == seen[0]
    assert '"name": "Add"' in seen[0]


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


@pytest.mark.skipif(not HAS_BUILTIN_SUBTESTS, reason="pytest < 9 has no builtin subtests (the subtests fixture)")
def test_a_rerun_counts_each_subtest_once(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-rerunfailures takes a rerun attempt's subtest reports out of the counts where it reruns."""
    monkeypatch.setenv("COLUMNS", "200")
    pytester.makepyfile("""
        def test_numbers(subtests):
            for n in range(3):
                with subtests.test(n=n):
                    assert n != 1
    """)
    runs = run_modes(pytester, "--reruns", "1", "-rf", off=("flaky",))
    plain = assert_same(runs)
    assert plain.summary == "2 failed, 1 rerun"
    for mode, run in runs.items():
        assert len(_subtest_lines(run.result)) == 1, f"{mode}:\n{run.text()}"


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


def test_coverage_with_relative_files_is_pytests(pytester: pytest.Pytester) -> None:
    """coverage's ``relative_files = True`` (wcwidth's tox.ini sets it) records paths relative to the cwd."""
    (pytester.path / ".coveragerc").write_text("[run]\nrelative_files = True\n")
    pytester.makepyfile(
        lib="def sign(n):\n    if n < 0:\n        return -1\n    return 1\n",
        test_lib="import lib\n\ndef test_negative():\n    assert lib.sign(-3) == -1\n",
    )
    runs = run_modes(pytester, "--cov=lib", "--cov-report=term")
    plain = assert_same(runs, files=True)
    assert plain.outcomes == {"passed": 1}
    for mode, run in runs.items():
        assert _total(run) == _total(plain), f"{mode}:\n{run.text()}"


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


BENCHMARKS = """
import time

import pytest


@pytest.mark.benchmark(group="sums")
@pytest.mark.parametrize("n", [10, 100])
def test_sum(benchmark, n):
    benchmark.extra_info["n"] = n
    benchmark.extra_info["unserializable"] = object  # pytest-benchmark's JSON holds its repr
    assert benchmark.pedantic(sum, args=(range(n),), rounds=5, iterations=2) == n * (n - 1) // 2


def test_sleep(benchmark):
    benchmark.pedantic(time.sleep, args=(0.0001,), rounds=3, warmup_rounds=1)


def test_timed(benchmark):
    benchmark(sum, range(10))


def test_not_a_benchmark():
    pass
"""


def _benchmark_table(run: Run) -> list[str]:
    """The tables pytest-benchmark printed, from its first dashed header to the legend, less what differs
    between two runs: the time unit (from the fastest timing) and test_timed's calibrated rounds."""
    lines = run.result.outlines
    start = next((i for i, line in enumerate(lines) if re.match(r"^-+ benchmark", line)), None)
    if start is None:
        return []
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("Legend:"))
    table = [re.sub(r"\(time in \w+\)", "(time in -)", line) for line in lines[start:end]]
    return [line.split()[0] if line.startswith("test_timed") else line.rstrip("-") for line in table]


def _benchmark_json(run: Run, name: str) -> list[dict[str, object]]:
    """What --benchmark-json wrote of each benchmark, less the timings that differ from run to run."""
    import json

    benchmarks = json.loads(run.files[name])["benchmarks"]
    for bench in benchmarks:
        stats = bench.pop("stats")
        bench["rounds"] = stats["rounds"] if bench["name"] != "test_timed" else "varies"
        bench["iterations"] = stats["iterations"] if bench["name"] != "test_timed" else "varies"
        bench["data"] = len(stats["data"]) == stats["rounds"]
    return benchmarks


def test_benchmark_table_and_json_are_pytests(pytester: pytest.Pytester) -> None:
    """pytest-benchmark keeps what each test measured in pytest's process: a sandbox sends it back, the
    table and the JSON are a plain run's (rounds and iterations fixed with pedantic; timings differ).
    Under xdist pytest-benchmark turns itself off, with a warning, in a plain run and sandboxed alike."""
    pytester.makepyfile(test_bench=BENCHMARKS)
    args = ("--benchmark-columns=rounds,iterations", "--benchmark-sort=name", "--benchmark-json=bench.json")
    args += ("--benchmark-max-time=0.01",)  # test_timed's calibration: rounds vary, as in any two runs
    runs = run_modes(pytester, *args, "--benchmark-autosave")
    plain = assert_same(runs)
    assert plain.summary == "5 passed"
    table = _benchmark_table(plain)
    assert any("test_sum[10]" in line for line in table) and any("test_sleep" in line for line in table), table
    for mode in ("sandbox",):
        assert _benchmark_table(runs[mode]) == table, f"{mode}:\n{runs[mode].text()}"
        assert _benchmark_json(runs[mode], "bench.json") == _benchmark_json(plain, "bench.json"), mode
        saved = [name for name in runs[mode].files if name.startswith(".benchmarks/")]
        assert len(saved) == 1 and saved[0].endswith(".json"), runs[mode].files.keys()
    plain_xdist = pytester.runpytest_subprocess("-n", "2", *args)
    for result in (plain_xdist, runs["xdist"].result):
        output = result.stdout.str() + result.stderr.str()  # its logger writes to stderr
        assert "Benchmarks are automatically disabled because xdist plugin is active" in output, output
        assert not _benchmark_table(Run(result, {})), result.stdout.str()
    assert "bench.json" not in runs["xdist"].files and not (pytester.path / "bench.json").exists()


FLAKY = """
from flaky import flaky

calls = {"n": 0}


@flaky(max_runs=3)
def test_second_time_lucky():
    calls["n"] += 1
    assert calls["n"] >= 2


@flaky(max_runs=2)
def test_never():
    assert False, "never"


def test_plain():
    pass
"""


def _flaky_report(run: Run | pytest.RunResult) -> list[str]:
    result = run.result if isinstance(run, Run) else run
    lines = result.outlines
    if "===Flaky Test Report===" not in lines:
        return []
    start, end = lines.index("===Flaky Test Report==="), lines.index("===End Flaky Test Report===")
    return lines[start : end + 1]


def test_flaky_report_is_pytests(pytester: pytest.Pytester) -> None:
    """flaky reruns in the sandbox, where its report is written: each test's part comes back to pytest's
    report. Under xdist each worker's part comes in the order the workers end, as in a plain run."""
    pytester.makepyfile(test_flaky=FLAKY)
    runs = run_modes(pytester, "--junitxml=junit.xml")
    plain = assert_same(runs)
    assert plain.summary == "1 failed, 2 passed"
    report = _flaky_report(plain)
    assert "test_second_time_lucky failed (2 runs remaining out of 3)." in report, report
    assert "test_never failed; it passed 0 out of the required 1 times." in report, report
    assert _flaky_report(runs["sandbox"]) == report, runs["sandbox"].text()
    plain_xdist = pytester.runpytest_subprocess("-n", "2", "--junitxml=junit.xml")
    assert sorted(_flaky_report(runs["xdist"])) == sorted(_flaky_report(plain_xdist)) == sorted(report)
    for mode, run in runs.items():
        assert run.junit == plain.junit, mode


SNAPSHOTS_BEFORE = """
def test_kept(snapshot):
    assert {"a": 1} == snapshot

def test_removed(snapshot):
    assert "removed" == snapshot

def test_changed(snapshot):
    assert "before" == snapshot
"""
SNAPSHOTS_AFTER = """
import pytest

def test_kept(snapshot):
    assert {"a": 1} == snapshot

def test_changed(snapshot):
    assert "after" == snapshot

def test_new(snapshot):
    assert [3] == snapshot

@pytest.mark.xfail(reason="known")
def test_expected_to_fail(snapshot):
    assert "missing" == snapshot

def test_no_snapshot():
    pass
"""


def _snapshot_summary(result: pytest.RunResult) -> list[str]:
    lines = result.outlines
    start = next((i for i, line in enumerate(lines) if "snapshot report summary" in line), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("=")), len(lines))
    return [line for line in lines[start + 1 : end] if line.strip()]


def test_snapshot_counts_are_pytests(pytester: pytest.Pytester) -> None:
    """syrupy counts in pytest's process what each test compared: sandboxes send it back, so the summary
    (passed, failed, written, unused), the exit status and what --snapshot-update deletes as unused are a
    plain run's. The snapshot file too: under xdist two sandboxes rewrote it at once, each without the
    other's new snapshot; pytest now writes what they queued, as syrupy does, once and under its lock."""
    pytester.makepyfile(test_snap=SNAPSHOTS_BEFORE)
    pytester.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=3)
    ambr = pytester.path / "__snapshots__" / "test_snap.ambr"
    written = ambr.read_text()
    pytester.makepyfile(test_snap=SNAPSHOTS_AFTER)
    seen: dict[tuple[str, str], tuple[list[str], int, str]] = {}
    for update in ("", "--snapshot-update"):
        for mode, extra in {**MODES, "plain xdist": ("-n", "2")}.items():
            ambr.write_text(written)
            result = pytester.runpytest_subprocess(*extra, *filter(None, [update]), timeout=60)
            seen[mode, update] = (_snapshot_summary(result), int(result.ret), ambr.read_text())
    check = {
        "": [
            "2 snapshots failed. 1 snapshot xfailed. 1 snapshot passed. 1 snapshot unused.",
            "Re-run pytest with --snapshot-update to delete unused snapshots.",
        ],
        "--snapshot-update": [
            "1 snapshot passed. 2 snapshots generated. 1 snapshot updated. 1 unused snapshot deleted.",
            "Deleted test_removed (__snapshots__/test_snap.ambr)",
        ],
    }
    for update, lines in check.items():
        plain = seen["plain", update]
        assert plain[0] == lines, plain
        for mode in ("sandbox", "xdist", "plain xdist"):
            assert seen[mode, update][:2] == plain[:2], f"{mode} {update}: {seen[mode, update]}\nplain: {plain}"
            assert seen[mode, update][2] == plain[2], f"{mode} {update}: the snapshot file differs"
    assert "test_removed" not in seen["plain", "--snapshot-update"][2]
