"""--sandbox=all runs the whole session in one sandbox (conftest.py, collection, session hooks and fixtures
too) where that sandbox can hold it, and collects on the host, as before, where a test or a setting needs a
sandbox of its own. Each test compares with a plain run of the same suite."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_gone

# Writes at import time, as a conftest.py and a test module of a project nobody reviewed might.
CONFTEST = """
    import os, pathlib

    here = pathlib.Path(__file__).parent
    (here / "CONFTEST-WROTE-THE-ROOTDIR").write_text("x")
    pathlib.Path(os.path.expanduser("~"), "CONFTEST-WROTE-HOME").write_text("x")

    def pytest_sessionstart(session):
        (here / "SESSIONSTART-WROTE-THE-ROOTDIR").write_text("x")
"""
MODULE = """
    import pathlib, pytest

    pathlib.Path(__file__).with_name("MODULE-WROTE-THE-ROOTDIR").write_text("x")

    @pytest.fixture(scope="session")
    def session_value():
        print("SESSION-SETUP")
        yield 7
        print("SESSION-TEARDOWN")

    def test_pass(session_value):
        assert session_value == 7

    def test_fail(session_value):
        assert session_value == 8

    @pytest.mark.parametrize("n", [1, 2])
    def test_param(n, session_value):
        pass
"""
WRITTEN = ["CONFTEST-WROTE-THE-ROOTDIR", "SESSIONSTART-WROTE-THE-ROOTDIR", "MODULE-WROTE-THE-ROOTDIR"]


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


@pytest.fixture
def probe_home(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME for the runs: a directory of its own, outside the rootdir (pytester's is the rootdir)."""
    home = tmp_path / "probe-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _written(pytester: pytest.Pytester, home: Path) -> list[str]:
    found = [name for name in WRITTEN if (pytester.path / name).exists()]
    return found + [path.name for path in home.iterdir()]


def _clean(pytester: pytest.Pytester, home: Path) -> None:
    for name in WRITTEN:
        (pytester.path / name).unlink(missing_ok=True)
    for path in home.iterdir():
        path.unlink()


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_conftest_and_module_code_under_sandbox_all_cannot_write_the_host(
    pytester: pytest.Pytester, probe_home: Path, workers: list[str]
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=MODULE)
    args = ["-s", "-p", "no:randomly", "-p", "no:cacheprovider", *workers]
    plain = pytester.runpytest_subprocess(*args)
    assert sorted(_written(pytester, probe_home)) == sorted([*WRITTEN, "CONFTEST-WROTE-HOME"])  # the probe works
    _clean(pytester, probe_home)
    sandboxed = pytester.runpytest_subprocess(*args, "--sandbox=all")
    assert _written(pytester, probe_home) == []
    assert sandboxed.ret == plain.ret == pytest.ExitCode.TESTS_FAILED
    assert sandboxed.parseoutcomes() == plain.parseoutcomes() == {"passed": 3, "failed": 1}
    sandboxed.stdout.fnmatch_lines(["sandbox: all (this whole session runs in one sandbox*"])
    assert sandboxed.stdout.str().count("test session starts") == 1
    if not workers:  # a session fixture keeps its scope: one setup and one teardown, as in the plain run
        assert sandboxed.stdout.str().count("SESSION-SETUP") == plain.stdout.str().count("SESSION-SETUP") == 1


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_test_that_needs_its_own_sandbox_sends_collection_back_to_the_host(
    pytester: pytest.Pytester, probe_home: Path, workers: list[str]
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_suite=MODULE,
        test_limited="""
            import pytest

            @pytest.mark.container(memory="64M")
            def test_limited():
                pass
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *workers, "--sandbox=all")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.parseoutcomes() == {"passed": 4, "failed": 1}
    result.stdout.fnmatch_lines(
        [
            "sandbox: collection runs on the host, each test in a sandbox: test_limited.py::test_limited: "
            "@pytest.mark.container: memory=67108864 needs a sandbox of the test's own"
        ]
    )
    out = result.stdout.str()
    # What the session's sandbox printed before it went back is not shown: the run reads as one plain run.
    assert out.count("test session starts") == 1
    assert "sandbox: all (" not in out
    assert sorted(_written(pytester, probe_home)) == sorted([*WRITTEN, "CONFTEST-WROTE-HOME"])


def test_a_service_sends_collection_back_to_the_host(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        from pytest_sandbox import service

        idle = service("idle", command=["sleep", "60"])
    """)
    pytester.makepyfile("""
        def test_uses_it(idle):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all", "--co")
    result.stdout.fnmatch_lines(["sandbox: collection runs on the host*uses the service 'idle'*"])


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--sandbox-memory=1G"], "sandbox limits (memory): each test needs a sandbox of its own"),
        (["--sandbox-repeat=2"], "--sandbox-repeat needs a sandbox per test"),
        (["--junitxml={outside}/junit.xml"], "the output {outside}/junit.xml lies outside the rootdir*"),
    ],
    ids=["limits", "repeat", "output-elsewhere"],
)
def test_settings_for_each_test_collect_on_the_host(
    pytester: pytest.Pytester, probe_home: Path, tmp_path: Path, args: list[str], reason: str
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=MODULE)
    args = [arg.format(outside=outside) for arg in args]
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "--sandbox=all", *args)
    told = f"sandbox: collection runs on the host, each test in a sandbox: {reason.format(outside=outside)}"
    result.stdout.fnmatch_lines([told])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "CONFTEST-WROTE-HOME" in _written(pytester, probe_home)
    if "junit" in args[0]:
        assert (outside / "junit.xml").exists()  # the host's pytest wrote it where asked, as a plain run does


def test_the_ini_key_selects_it(pytester: pytest.Pytester, probe_home: Path) -> None:
    pytester.makeini("[pytest]\nsandbox = all\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=MODULE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["sandbox: all (this whole session runs in one sandbox*"])
    assert _written(pytester, probe_home) == []


def test_outputs_the_user_asked_for_reach_the_host(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_suite="""
        def test_records(record_property, request):
            record_property("seen", "yes")
            request.config.cache.set("probe/value", 42)
    """
    )
    result = pytester.runpytest_subprocess("--sandbox=all", "--junitxml=reports/junit.xml")
    result.assert_outcomes(passed=1)
    junit = (pytester.path / "reports" / "junit.xml").read_text()
    assert 'name="seen" value="yes"' in junit
    assert f'hostname="{socket.gethostname()}"' in junit  # the host's, as in a plain run (helper-37 saw "sandbox")
    assert "42" in (pytester.path / ".pytest_cache" / "v" / "probe" / "value").read_text()


def test_a_run_that_falls_back_leaves_nothing_behind(pytester: pytest.Pytester, token: str) -> None:
    """The session's sandbox a fallen-back run started is ended with what its conftest.py started there."""
    pytester.makeconftest(f"""
        import os, subprocess, sys

        if os.environ.get("PYTEST_SANDBOX_HERMETIC"):  # only in the session's sandbox, not on the host after
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {token!r}], start_new_session=True)
    """)
    pytester.makepyfile(
        test_limited="""
        import pytest

        @pytest.mark.container(memory="64M")
        def test_limited():
            pass
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox: collection runs on the host*test_limited*"])
    assert wait_gone(token, timeout=5) == []


def test_a_prompt_at_collection_is_shown_while_it_waits(pytester: pytest.Pytester) -> None:
    """The session's output is held until its collection is done (a run that falls back throws it away), but
    a pause shows it: a breakpoint() or input() at collection waits for the user, who must see its prompt
    (found by red-team helper-36: nothing showed until one typed blind)."""
    pytester.makeconftest("""
        import os, time

        os.write(1, b"PROMPT> ")  # as pdb's (Pdb) and input() leave it: no newline
        time.sleep(8)
    """)
    pytester.makepyfile("def test_a(): pass")
    command = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "--sandbox=all"]
    proc = subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + 6
    try:
        while b"PROMPT> " not in seen and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
        assert b"PROMPT> " in seen, "the prompt was held while collection waited"
        assert proc.poll() is None  # shown while it waits, not at the end
    finally:
        proc.kill()
        proc.wait()


def test_stdin_from_a_file_is_whole_after_a_fall_back(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The session's sandbox gets a sealed copy of a stdin file; reading it for that copy left the file at its
    end, so the host's run, after a fall-back, read nothing (found by red-team helper-36)."""
    pytester.makepyfile(
        test_reads="""
            import sys

            def test_reads_stdin():
                assert sys.stdin.read() == "hello\\n"
        """,
        test_limited="""
            import pytest

            @pytest.mark.container(memory="256M")
            def test_limited():
                pass
        """,
    )
    given = tmp_path / "in.txt"
    given.write_text("hello\n")
    command = [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "--sandbox=all"]
    with open(given) as stdin:
        run = subprocess.run(command, cwd=pytester.path, stdin=stdin, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


ENDING_CONFTEST = """
    import atexit, sys, threading, time

    atexit.register(lambda: print("ATEXIT-RAN", flush=True))

    def late():
        time.sleep(0.5)
        print("THREAD-DONE", flush=True)

    def pytest_sessionfinish(session):
        threading.Thread(target=late).start()  # not a daemon: Python waits for it
"""


@pytest.mark.parametrize("mode", ["all", "hermetic"])
def test_the_session_ends_as_python_ends_a_program(pytester: pytest.Pytester, mode: str) -> None:
    """The session's pytest and the supervisor exit without freeing each object (a fifth to a third of a second
    each): still, as at the end of any program, a thread that is no daemon is waited for, atexit handlers run
    and the exit code is pytest's."""
    pytester.makeconftest(ENDING_CONFTEST)
    pytester.makepyfile("def test_pass(): pass\ndef test_fail(): assert 0")
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    sandboxed = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandbox={mode}")
    for result in (plain, sandboxed):
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        assert result.stdout.lines[-2:] == ["THREAD-DONE", "ATEXIT-RAN"], result.stdout.str()


def test_pytest_main_in_a_program_returns_to_it(pytester: pytest.Pytester) -> None:
    """Only where pytest is the program does the supervisor end the process itself: a program that calls
    pytest.main goes on after it."""
    pytester.makepyfile(test_one="def test_pass(): pass")
    program = pytester.makepyfile(
        program="""
            import pytest

            try:
                code = pytest.main(["-q", "-p", "no:cacheprovider", "--sandbox=all", "test_one.py"])
            except SystemExit as exc:
                code = exc.code
            print("AFTER-PYTEST", int(code))
        """
    )
    result = pytester.run(sys.executable, program)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*1 passed*", "AFTER-PYTEST 0"])


def test_warnings_as_errors_hold_as_in_a_plain_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's pytest starts as a plain one does: with ``filterwarnings = error`` (python-dateutil's
    setting), nothing of the sandbox's own start warns. Its bootstrap once imported pytest_sandbox before
    pytest.main; where the plugin is installed from a wheel, pytest marks its modules for assert rewriting,
    found them imported already and warned, an error there: no test ran. A distribution whose RECORD lists
    pytest_sandbox's module, as a wheel's does, brings that marking here (an editable install lists none)."""
    site = pytester.path / "site"  # in the rootdir: the session's sandbox sees it
    info = site / "wheel_like-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wheel-like\nVersion: 1.0\n")
    # Its plugin is the standard library's json (no hooks; installed, so not the project's own plugin).
    (info / "entry_points.txt").write_text("[pytest11]\nwheel_like = json\n")
    (info / "RECORD").write_text("pytest_sandbox/__init__.py,,\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
    pytester.makepyfile("def test_pass(): assert True")
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    sandboxed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    assert plain.ret == sandboxed.ret == pytest.ExitCode.OK, sandboxed.stdout.str() + sandboxed.stderr.str()
    assert sandboxed.parseoutcomes() == plain.parseoutcomes() == {"passed": 1}
    sandboxed.stdout.fnmatch_lines(["sandbox: all (this whole session runs in one sandbox*"])  # not on the host


def test_a_benchmark_json_in_a_directory_reaches_the_host(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest-benchmark 5 keeps --benchmark-json as a path: its file name alone was declared as the output,
    so a JSON asked for in a directory was written in the sandbox and never reached the host."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # this suite's own worker's: pytest-benchmark would turn off
    pytester.mkdir("out")  # pytest-benchmark makes no directory
    pytester.makepyfile("def test_sum(benchmark):\n    benchmark.pedantic(sum, args=(range(9),), rounds=2)")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all", "--benchmark-json=out/b.json")
    result.stdout.fnmatch_lines(["sandbox: all (this whole session runs in one sandbox*", "*1 passed*"])
    written = json.loads((pytester.path / "out" / "b.json").read_text())
    assert [bench["name"] for bench in written["benchmarks"]] == ["test_sum"]


def test_pytest_benchmarks_storage_directory_is_left_as_in_a_plain_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest-benchmark makes .benchmarks (its --benchmark-storage) at every start, empty until a run is saved."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # this suite's own worker's: pytest-benchmark would turn off
    pytester.makepyfile("def test_sum(benchmark):\n    benchmark.pedantic(sum, args=(range(9),), rounds=2)")
    for args in ((), ("--benchmark-storage=file://stored",)):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all", *args)
        result.assert_outcomes(passed=1)
    assert (pytester.path / ".benchmarks").is_dir() and not list((pytester.path / ".benchmarks").iterdir())
    assert (pytester.path / "stored").is_dir()


def test_pytest_htmls_assets_are_declared_beside_its_report(pytester: pytest.Pytester) -> None:
    """pytest-html writes its style sheet in assets/ beside the report (unless --self-contained-html): the
    report reached the host without it and opened unstyled."""
    from pytest_sandbox import hermetic

    config = pytester.parseconfig()
    config.option.htmlpath = "reports/run.html"
    assert str(pytester.path / "reports" / "assets") in hermetic.plugin_outputs(config)
    config.option.self_contained_html = True
    assert str(pytester.path / "reports" / "assets") not in hermetic.plugin_outputs(config)


def test_a_markdown_report_is_declared(pytester: pytest.Pytester) -> None:
    """pytest-md-report's --md-report-output is an output as the other report files are."""
    from pytest_sandbox import hermetic

    config = pytester.parseconfig()
    config.option.md_report_output = "out/report.md"
    assert str(pytester.path / "out" / "report.md") in hermetic.plugin_outputs(config)
