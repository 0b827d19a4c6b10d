"""--sandbox=hermetic: the whole run (conftest.py, collection, fixtures, tests, plugins) in one sandbox.

Each test compares with a plain run of the same suite where the mode promises a plain run's behaviour."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERMETIC = "--sandbox=hermetic"

SUITE = """
    import os, pytest

    @pytest.fixture(scope="session")
    def counted():
        print("SESSION-SETUP")
        yield 7
        print("SESSION-TEARDOWN")

    def test_pass(counted):
        assert counted == 7

    def test_fail(counted):
        assert counted == 8

    @pytest.mark.skip(reason="not today")
    def test_skip():
        pass

    @pytest.mark.xfail
    def test_xfail():
        assert False

    @pytest.mark.parametrize("n", [1, 2, 3])
    def test_param(n, counted):
        assert n < 3
"""


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


def _summary(result: pytest.RunResult) -> str:
    """The last line of the run without its time."""
    line = next(line for line in reversed(result.stdout.lines) if line.strip())
    return re.sub(r" in [0-9.]+s( \([^)]*\))?", "", line)


def _cases(path: Path) -> list[tuple[str, str, str]]:
    """(classname, name, outcome) of each testcase of a junit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append((case.get("classname", ""), case.get("name", ""), outcome))
    return sorted(cases)


def test_a_suite_runs_as_in_a_plain_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    plain = pytester.runpytest_subprocess("-p", "no:randomly", "-s", "--junitxml=plain.xml")
    hermetic = pytester.runpytest_subprocess("-p", "no:randomly", "-s", "--junitxml=hermetic.xml", HERMETIC)
    assert hermetic.ret == plain.ret == pytest.ExitCode.TESTS_FAILED
    assert hermetic.parseoutcomes() == plain.parseoutcomes() == {"passed": 3, "failed": 2, "skipped": 1, "xfailed": 1}
    assert _summary(hermetic) == _summary(plain)
    assert _cases(pytester.path / "hermetic.xml") == _cases(pytester.path / "plain.xml")  # an output: on the host
    # one session fixture setup for the whole session, as in a plain run
    assert hermetic.stdout.str().count("SESSION-SETUP") == plain.stdout.str().count("SESSION-SETUP") == 1
    assert hermetic.stdout.str().count("SESSION-TEARDOWN") == 1
    hermetic.stdout.fnmatch_lines(["sandbox: hermetic (this whole session runs in one sandbox*"])


def test_conftest_and_collection_run_in_the_sandbox_and_write_nothing_on_the_host(pytester: pytest.Pytester) -> None:
    home = Path(os.path.expanduser("~"))
    marks = [pytester.path / "by-conftest", home / "by-conftest-in-home", pytester.path / "by-module"]
    pytester.makeconftest(f"""
        import os
        open({str(marks[0])!r}, "w").write("x")
        open({str(marks[1])!r}, "w").write("x")
        print("CONFTEST-PID", os.getpid())

        def pytest_collection_modifyitems(items):
            open("by-collection-hook", "w").write("x")
    """)
    pytester.makepyfile(f"""
        import os
        open({str(marks[2])!r}, "w").write("x")

        def test_sees_its_own_writes():
            assert os.path.exists({str(marks[0])!r}) and os.path.exists("by-collection-hook")
            open("by-test", "w").write("x")
            open("/tmp/by-test-in-tmp", "w").write("x")
    """)
    result = pytester.runpytest_subprocess("-s", HERMETIC)
    result.assert_outcomes(passed=1)
    for mark in [*marks, pytester.path / "by-collection-hook", pytester.path / "by-test", Path("/tmp/by-test-in-tmp")]:
        assert not mark.exists(), f"{mark} reached the host"
    pid = int(re.search(r"CONFTEST-PID (\d+)", result.stdout.str()).group(1))  # type: ignore[union-attr]
    assert pid < 10  # pytest in a pid namespace of its own, not the supervisor (which imported no conftest)


def test_outputs_reach_the_host_and_last_failed_works(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_outputs = results\n")
    pytester.makepyfile("""
        import os

        def test_ok(request):
            request.config.cache.set("mine/value", {"n": 3})
            os.makedirs("results", exist_ok=True)
            open("results/data.txt", "w").write("kept")
            open("not-an-output.txt", "w").write("dropped")

        def test_bad():
            assert False
    """)
    first = pytester.runpytest_subprocess(HERMETIC)
    first.assert_outcomes(passed=1, failed=1)
    assert (pytester.path / "results" / "data.txt").read_text() == "kept"
    assert not (pytester.path / "not-an-output.txt").exists()
    assert (pytester.path / ".pytest_cache" / "v" / "mine" / "value").exists()
    again = pytester.runpytest_subprocess(HERMETIC, "--lf")  # the cache pytest wrote in the sandbox
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*run-last-failure: rerun previous 1 failure*"])


ISOLATION = """
    import os, pytest, subprocess, sys

    @pytest.fixture(scope="module")
    def shared_file():
        open("by-fixture", "w").write("x")  # the scope's: every test of it sees it
        return "by-fixture"

    def test_first(shared_file):
        open("by-first", "w").write("x")
        open("/tmp/by-first-in-tmp", "w").write("x")
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", "LEFT-BY-FIRST"],
                         start_new_session=True)

    def test_second(shared_file):
        assert os.path.exists(shared_file)
        running = [p for p in os.listdir("/proc") if p.isdigit()
                   and b"LEFT-BY-FIRST" in open(f"/proc/{p}/cmdline", "rb").read()]
        print("SEES", os.path.exists("by-first"), os.path.exists("/tmp/by-first-in-tmp"), bool(running))
"""


def test_each_test_runs_over_a_layer_of_its_own_and_leaves_nothing_running(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_isolation=ISOLATION)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-s", HERMETIC)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*SEES False False False*"])


def test_at_module_scope_tests_share_their_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_isolation=ISOLATION)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-s", HERMETIC, "--sandbox-scope=module")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*SEES True True True*"])


def test_options_a_conftest_adds_are_understood(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import pytest

        def pytest_addoption(parser):
            parser.addoption("--runslow", action="store_true")

        @pytest.fixture
        def slow(request):
            return request.config.getoption("--runslow")
    """)
    pytester.makepyfile("""
        def test_flag(slow):
            assert slow
    """)
    pytester.runpytest_subprocess(HERMETIC, "--runslow").assert_outcomes(passed=1)


def test_xdist_runs_in_the_sessions_sandbox(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_suite=SUITE)
    plain = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "2")
    hermetic = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "2", HERMETIC)
    assert hermetic.ret == plain.ret
    assert hermetic.parseoutcomes() == plain.parseoutcomes()


def test_coverage_is_measured_as_in_a_plain_run(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(
        lib="""
            def sign(x):
                if x < 0:
                    return -1
                return 1
        """,
        test_lib="""
            from lib import sign

            def test_both():
                assert sign(-2) == -1 and sign(3) == 1
        """,
    )
    plain = pytester.runpytest_subprocess("--cov=lib", "--cov-report=term", "-p", "no:randomly")
    (pytester.path / ".coverage").unlink()
    hermetic = pytester.runpytest_subprocess("--cov=lib", "--cov-report=term", "--cov-report=xml", HERMETIC)
    line = [line for line in plain.stdout.lines if line.startswith("lib.py")]
    assert line and line == [line for line in hermetic.stdout.lines if line.startswith("lib.py")]
    assert "100%" in line[0]
    assert (pytester.path / ".coverage").exists() and (pytester.path / "coverage.xml").exists()


def test_exit_codes_are_pytests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    assert pytester.runpytest_subprocess(HERMETIC, "-k", "nothing").ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert pytester.runpytest_subprocess(HERMETIC, "--no-such-flag").ret == pytest.ExitCode.USAGE_ERROR
    assert pytester.runpytest_subprocess(HERMETIC).ret == pytest.ExitCode.OK


def test_the_ini_key_selects_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox = hermetic\n")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox: hermetic*"])


def test_a_marker_asking_for_its_own_sandbox_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_plain_marker_is_fine():
            pass

        @pytest.mark.container(memory="64M")
        def test_limited():
            pass
    """)
    result = pytester.runpytest_subprocess(HERMETIC)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_limited: @pytest.mark.container: memory=67108864: --sandbox=hermetic runs*"])


def test_options_that_need_a_sandbox_per_test_are_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC, "--sandbox-repeat=2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--sandbox=hermetic runs the whole session in one sandbox; --sandbox-repeat needs*"])


def test_an_output_outside_the_writable_places_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC, "--junitxml=/etc/pytest-sandbox-never.xml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the output /etc/pytest-sandbox-never.xml lies outside the rootdir*"])
    assert not os.path.exists("/etc/pytest-sandbox-never.xml")


@pytest.mark.guest
def test_session_limits_apply_to_the_whole_session(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_pids = 40\n")
    pytester.makepyfile("""
        import subprocess, sys

        def test_fork_bomb_is_stopped():
            procs = []
            try:
                for _ in range(200):
                    procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
            except (BlockingIOError, OSError):
                pass
            finally:
                for proc in procs:
                    proc.kill()
            assert len(procs) < 60
    """)
    pytester.runpytest_subprocess(HERMETIC).assert_outcomes(passed=1)


def test_snapshot_updates_reach_the_host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("syrupy")
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # under -n, syrupy would take the run for a worker's: no report
    pytester.mkpydir("pkg")
    pytester.makepyfile(
        **{
            "pkg/test_snap": """
                def test_value(snapshot):
                    assert {"a": 1} == snapshot
            """
        }
    )
    update = pytester.runpytest_subprocess(HERMETIC, "--snapshot-update")
    update.assert_outcomes(passed=1)
    update.stdout.fnmatch_lines(["*1 snapshot generated*"])
    assert (pytester.path / "pkg" / "__snapshots__" / "test_snap.ambr").exists()
    check = pytester.runpytest_subprocess(HERMETIC)
    check.assert_outcomes(passed=1)
    check.stdout.fnmatch_lines(["*1 snapshot passed*"])


def test_a_terminals_input_reaches_the_tests(pytester: pytest.Pytester) -> None:
    """Where pytest runs on a terminal, what the user types goes on to pytest in the sandbox (input(), --pdb)."""
    pytester.makepyfile("""
        import sys

        def test_reads():
            assert sys.stdin.isatty() and sys.stdout.isatty()
            print("PROMPT", flush=True)
            assert input() == "hello"
            print("GOT-IT", flush=True)
    """)
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.chdir(pytester.path)
            os.execv(sys.executable, [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", HERMETIC])
        finally:
            os._exit(127)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while b"PROMPT" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        os.write(master, b"hello\n")
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: pytest has ended
                    break
                if not chunk:
                    break
                seen += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "GOT-IT" in text and "1 passed" in text, text
    assert os.waitstatus_to_exitcode(status) == 0, text


def test_code_imported_from_anywhere_stays_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest in the sandbox is a new interpreter: packages an editable install maps under /var/tmp (a fresh
    tmpfs there) must stay visible, as must every package imported so far (the CI's user lane installs so)."""
    from pytest_sandbox import hermetic

    package = tmp_path / "mapped_pkg"
    package.mkdir()
    finder_module = types.ModuleType("fake_editable_finder")
    finder_module.MAPPING = {"mapped_pkg": str(package)}  # type: ignore[attr-defined]
    finder = type("Finder", (), {"__module__": "fake_editable_finder"})
    monkeypatch.setitem(sys.modules, "fake_editable_finder", finder_module)
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    places = hermetic._import_places()
    assert str(package) in places
    assert os.path.dirname(hermetic.__file__) in places


def test_a_volume_target_the_sandbox_cannot_make_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Red team round 33: the session's sandbox failed to build and the run ended with 127, silently."""
    pytester.makepyfile("def test_a(): pass")
    missing = f"/pytest-sandbox-no-such-dir-{os.getpid()}"
    result = pytester.runpytest_subprocess("--sandbox=hermetic", "-o", f"sandbox_volumes={tmp_path}={missing}:rw")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: sandbox_volumes: invalid volumes=*{missing} does not exist on this host*"])


@pytest.mark.parametrize("refused_settings", [False, True])
def test_a_host_that_cannot_build_sandboxes_is_said_first(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, refused_settings: bool
) -> None:
    """The probe's child runs while the settings are read, but its answer comes first, as before: hermetic
    refuses with the host's reason (not the settings'), --sandbox=all collects on the host and says so."""
    from pytest_sandbox import hermetic, probe
    from pytest_sandbox import session as session_module

    monkeypatch.setattr(probe, "unavailable_reason", lambda: "user.max_user_namespaces is 0")
    if refused_settings:

        def refuse(config: pytest.Config) -> None:
            raise pytest.UsageError("--sandbox-memory: not a size")

        monkeypatch.setattr(session_module, "configure", refuse)
    monkeypatch.delenv("PYTEST_SANDBOX_HOST_COLLECTION", raising=False)
    config = pytester.parseconfig()
    with pytest.raises(pytest.UsageError, match=r"this host cannot build sandboxes: user\.max_user_namespaces is 0"):
        hermetic.supervise(config, hermetic.MODE)
    assert hermetic.supervise(config, hermetic.FALLS_BACK) is None
    assert "this host cannot build sandboxes: user.max_user_namespaces is 0" in config.stash[hermetic.FELL_BACK]
    os.environ.pop("PYTEST_SANDBOX_HOST_COLLECTION", None)


def test_nothing_is_left_unclosed_for_pythons_resource_warnings(pytester: pytest.Pytester) -> None:
    """attrs' suite sets ``filterwarnings = once::Warning``: a socket the session's zygote left open was shown
    after the summary line (its line to the layer helper)."""
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider", "-W", "default::ResourceWarning")
    result.assert_outcomes(passed=1)
    assert "ResourceWarning" not in result.stdout.str() + result.stderr.str()
