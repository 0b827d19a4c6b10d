"""A sandboxed run is pytest's run: the protocol runs in the sandbox, fixtures keep their scopes where
tests share a sandbox, and what the user asked to persist reaches the host (declared outputs)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys
from xml.etree import ElementTree

import pytest

from pytest_sandbox import outputs
from pytest_sandbox.linux import syscalls
from pytest_sandbox.protocol import ProtocolError

SCOPED_FIXTURES = """
    import os, pytest

    @pytest.fixture(scope="session")
    def sess():
        print("SETUP-SESSION", flush=True)  # flushed: a crash must not take it along
        yield
        print("TEARDOWN-SESSION", flush=True)

    @pytest.fixture(scope="module")
    def mod():
        print("SETUP-MODULE", flush=True)
        yield
        print("TEARDOWN-MODULE", flush=True)
"""


def _scoped_suite(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SCOPED_FIXTURES)
    pytester.makepyfile(
        test_a="""
            def test_1(sess, mod): pass
            def test_2(sess, mod): pass
            def test_3(sess): assert 0
        """,
        test_b="""
            def test_4(sess, mod): pass
            def test_5(sess, mod): pass
        """,
    )


@pytest.mark.parametrize(
    ("args", "sessions", "modules"),
    [
        ((), 1, 2),
        (("--sandbox=all", "--sandbox-scope=session"), 1, 2),
        (("--sandbox=all", "--sandbox-scope=module"), 2, 2),
        (("--sandbox=all",), 1, 2),  # a scope sandbox, each test in a fork of it
    ],
    ids=["plain", "session", "module", "test"],
)
def test_fixtures_keep_their_scopes_within_a_shared_sandbox(
    pytester: pytest.Pytester, args: tuple[str, ...], sessions: int, modules: int
) -> None:
    _scoped_suite(pytester)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=4, failed=1)
    text = result.stdout.str()
    assert (text.count("SETUP-SESSION"), text.count("SETUP-MODULE")) == (sessions, modules)
    assert (text.count("TEARDOWN-SESSION"), text.count("TEARDOWN-MODULE")) == (sessions, modules)


@pytest.mark.parametrize(
    "args",
    [
        ("--sandbox=all",),
        ("--sandbox=all", "--sandbox-collection=host"),
        ("--sandbox=all", "--sandbox-scope=session"),
        ("--sandbox=hermetic",),
    ],
    ids=["test", "host collection", "session", "hermetic"],
)
def test_the_garbage_collector_shows_a_test_every_object(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """The zygote freezes its objects before it forks sandboxes (fewer pages copied); frozen objects are
    hidden from gc.get_referrers and gc.get_objects. hypothesis's register_random asks gc.get_referrers
    whether anything holds the object it is given, and warned (an error under filterwarnings = error) in
    every sandboxed run of anyio's suite."""
    pytester.makepyfile(
        test_gc="""
            import gc

            THING = [1]

            def test_get_referrers_finds_the_modules_globals():
                assert any(referrer is globals() for referrer in gc.get_referrers(THING))

            def test_get_objects_holds_a_module_global():
                assert any(found is THING for found in gc.get_objects())
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=2)


@pytest.mark.parametrize("args", [(), ("--sandbox=all",), ("--sandbox=hermetic",)], ids=["plain", "all", "hermetic"])
def test_main_is_what_pytest_was_started_as(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """pytest in the session's sandbox is started with ``python -c``: its __main__ had no __file__ (anyio's
    tests patch it: AttributeError) and no spec (multiprocessing's spawn starts its children from them)."""
    pytester.makepyfile(
        test_main="""
            import __main__, importlib.util, multiprocessing

            def test_main():
                assert __main__.__file__ == importlib.util.find_spec("pytest.__main__").origin
                assert __main__.__spec__.name == "pytest.__main__" and __main__.__package__ == "pytest"

            def test_spawn():
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    assert pool.map(abs, [-1]) == [1]
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=2)


def test_pytest_started_from_a_directory_runs_sandboxed(pytester: pytest.Pytester) -> None:
    """``python DIR`` (or a zip) runs DIR/__main__.py as a module named __main__, with no spec to look up again:
    the session's pytest is started with the file alone."""
    pytester.mkpydir("runner").joinpath("__main__.py").write_text("import sys, pytest\nsys.exit(pytest.main())\n")
    pytester.makepyfile(
        test_main="""
            import __main__, os

            def test_main():
                assert os.path.basename(__main__.__file__) == "__main__.py"
        """
    )
    for args in ((), ("--sandbox=all",)):
        result = pytester.run(sys.executable, "runner", "-p", "no:cacheprovider", "test_main.py", *args)
        result.assert_outcomes(passed=1)


def test_lookups_of_loopback_that_ask_for_configured_families_answer_as_on_the_host(pytester: pytest.Pytester) -> None:
    """glibc's getaddrinfo(AI_ADDRCONFIG) answers for a family only where the network namespace has an address
    of it other than 127.0.0.1 or ::1; a sandbox's has only lo. anyio's listeners ask so for ``localhost``:
    about 125 of its tests failed sandboxed only (gaierror). A sandbox's lo gets a stand-in address of each
    family the namespace it left has."""
    pytester.makepyfile(
        test_lookups="""
            import socket, pytest

            @pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
            def test_lookup(host):
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                try:
                    socket.getaddrinfo(host, 0, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
                except socket.gaierror as exc:
                    pytest.fail(f"not found: {exc}")
        """
    )
    outcomes = {}
    for args in ((), ("--sandbox=all",), ("--sandbox=all", "--sandbox-collection=host"), ("--sandbox=hermetic",)):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)
        outcomes[args] = sorted(line for line in result.outlines if line.startswith(("PASSED", "FAILED")))
    assert len(outcomes[()]) == 3
    assert all(found == outcomes[()] for found in outcomes.values()), outcomes


def test_address_families_are_read_as_glibc_sees_them() -> None:
    """The namespace this runs in against the kernel's own lists: ``ip``-free, from /proc and SIOCGIFCONF."""
    families = syscalls.address_families()
    with open("/proc/net/if_inet6") as f:
        v6 = [line.split()[0] for line in f if line.strip()]
    assert families.v6 == any(address != "0" * 31 + "1" for address in v6)
    with open("/proc/net/fib_trie") as f:  # every local IPv4 address is a /32 host LOCAL leaf
        text = f.read()
    local = {
        line.split()[1]
        for line, after in zip(text.splitlines(), text.splitlines()[1:], strict=False)
        if "/32 host LOCAL" in after and line.strip().startswith("|--")
    }
    assert families.v4 == bool(local - {"127.0.0.1"})


def _outputs_by_test(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    """Each test's captured output (setup, call and teardown) as junitxml records it."""
    xml = pytester.path / "junit.xml"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_logging=all", *args)
    return {case.get("name", ""): case.findtext("system-out", "") for case in ElementTree.parse(xml).iter("testcase")}


def test_fixture_output_lands_on_the_tests_pytest_puts_it_on(pytester: pytest.Pytester) -> None:
    _scoped_suite(pytester)
    plain = _outputs_by_test(pytester)
    assert "TEARDOWN-MODULE" in plain["test_3"] and "TEARDOWN-SESSION" in plain["test_5"]
    assert _outputs_by_test(pytester, "--sandbox=all", "--sandbox-scope=session") == plain
    assert _outputs_by_test(pytester, "--sandbox=all") == plain
    module = _outputs_by_test(pytester, "--sandbox=all", "--sandbox-scope=module")
    assert "SETUP-MODULE" in module["test_4"] and "TEARDOWN-MODULE" in module["test_5"]


def test_a_crash_in_a_shared_sandbox_fails_that_test_and_the_rest_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SCOPED_FIXTURES)
    pytester.makepyfile("""
        import ctypes
        def test_1(mod): pass
        def test_2(mod): ctypes.string_at(0)
        def test_3(mod): pass
    """)
    result = pytester.runpytest_subprocess("-s", "--sandbox=all", "--sandbox-scope=module")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*sandbox crashed: SIGSEGV*"])
    assert result.stdout.str().count("test session starts") == 1  # no sandbox repeats what pytest had buffered
    assert result.stdout.str().count("SETUP-MODULE") == 2  # the rest of the module in a new sandbox


def test_exitfirst_ends_a_shared_sandbox_cleanly(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SCOPED_FIXTURES)
    pytester.makepyfile("""
        def test_1(mod): assert 0
        def test_2(mod): pass
    """)
    result = pytester.runpytest_subprocess("-x", "-s", "--sandbox=all", "--sandbox-scope=session", timeout=60)
    result.assert_outcomes(failed=1)
    assert "TEARDOWN-MODULE" in result.stdout.str()  # torn down as pytest's session end does


def test_a_plugins_protocol_wrapper_runs_once_in_the_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import os, pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_protocol(item, nextitem):
            with open("/proc/1/comm") as f:
                print(f"WRAPPER under {f.read().strip()}")
            return (yield)
    """)
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("-s", "--sandbox=all")
    result.assert_outcomes(passed=1)
    assert result.stdout.str().count("WRAPPER") == 1
    result.stdout.fnmatch_lines(["*WRAPPER under sandbox-init"])  # in the sandbox's pid namespace


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
def test_a_conftests_log_hooks_run_as_often_as_without_the_sandbox(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool
) -> None:
    """Each report reaches a conftest's log hooks in pytest and not a second time in the sandbox; under xdist
    both processes call them, as xdist does without the sandbox. Where pytest runs on the host
    (--sandbox-collection=host) what they write persists; in the session's sandbox, a test's layer lies over
    the rootdir while it runs, so only the calls are compared (README: Limits)."""
    pytester.makeconftest("""
        import os, pytest

        def _say(what):
            os.write(2, f"{what} pid={os.getpid()}\\n".encode())
            with open(os.path.join(os.environ["LOG_DIR"], "log.txt"), "a") as f:
                f.write(what + "\\n")

        def pytest_runtest_logstart(nodeid, location):
            _say(f"LOGSTART {nodeid}")

        def pytest_runtest_logreport(report):
            _say(f"LOGREPORT {report.when}")

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_logfinish(nodeid, location):
            _say(f"LOGFINISH {nodeid}")
            return (yield)
    """)
    pytester.makepyfile("""
        import warnings

        def test_one():
            warnings.warn(UserWarning("heard once"))

        def test_two():
            assert 0
    """)
    args = ["-p", "no:cacheprovider", *(["-n", "1"] if xdist else [])]
    runs = {}
    modes = {"plain": [], "host": ["--sandbox=all", "--sandbox-collection=host"], "contained": ["--sandbox=all"]}
    for mode, extra in modes.items():
        log_dir = pytester.mkdir(f"log-{mode}")
        monkeypatch.setenv("LOG_DIR", str(log_dir))
        result = pytester.runpytest_subprocess(*args, *extra)
        result.assert_outcomes(passed=1, failed=1, warnings=1)
        said = [line.split(" pid=")[0] for line in result.stderr.lines if " pid=" in line]
        log = log_dir / "log.txt"
        runs[mode] = (sorted(said), sorted(log.read_text().splitlines()) if log.exists() else None)
    assert runs["host"] == runs["plain"]
    assert runs["contained"][0] == runs["plain"][0]
    assert runs["contained"][1] is None  # nothing of the session's sandbox reaches the host unless declared
    assert runs["plain"][1] is not None and runs["plain"][1].count("LOGREPORT call") == (4 if xdist else 2)


def test_the_cache_and_declared_outputs_reach_the_host_and_nothing_else(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_outputs = reports\n")
    pytester.makepyfile("""
        import os
        def test_writes(request):
            request.config.cache.set("mine/key", {"a": 1})
            os.makedirs("reports/deep", exist_ok=True)
            open("reports/deep/r.txt", "w").write("kept")
            open("elsewhere.txt", "w").write("gone")
        def test_fails():
            assert 0
    """)
    result = pytester.runpytest_subprocess("--sandbox=all")
    result.assert_outcomes(passed=1, failed=1)
    assert (pytester.path / "reports/deep/r.txt").read_text() == "kept"
    assert not (pytester.path / "elsewhere.txt").exists()
    assert (pytester.path / ".pytest_cache/v/mine/key").exists()
    rerun = pytester.runpytest_subprocess("--sandbox=all", "--lf")
    rerun.assert_outcomes(failed=1)  # the host's lastfailed, from the relayed reports


@pytest.mark.parametrize("mode", ["--sandbox=all", "--sandbox=hermetic"])
def test_process_records_in_the_cache_stay_in_the_sandbox(pytester: pytest.Pytester, mode: str) -> None:
    """pytest-xprocess keeps its servers' pids under the cache's d/.xprocess: a sandbox's pid would name
    another process on the host, which a later run would signal. The rest of the cache reaches the host."""
    pytester.makepyfile("""
        import os
        def test_server(request):
            records = request.config.cache.mkdir(".xprocess")
            (records / "srv").mkdir()
            (records / "srv" / "xprocess.PID").write_text(str(os.getpid()))
            request.config.cache.set("mine/key", 1)
            (request.config.cache.mkdir("other") / "kept").write_text("x")
    """)
    pytester.runpytest_subprocess(mode).assert_outcomes(passed=1)
    cache = pytester.path / ".pytest_cache"
    assert (cache / "v/mine/key").exists()
    assert (cache / "d/other/kept").read_text() == "x"
    assert not (cache / "d/.xprocess").exists()


def test_a_declared_output_may_be_a_file(pytester: pytest.Pytester) -> None:
    """sandbox_outputs names files or directories: a file (pytest-django's --reuse-db database, a report)
    reaches the host as in a plain run, and the outputs declared after it too."""
    pytester.makeini("[pytest]\nsandbox_outputs =\n    build/result.txt\n    reports\n")
    pytester.makepyfile("""
        import os
        def test_writes():
            os.makedirs("build", exist_ok=True)
            open("build/result.txt", "w").write("file")
            os.makedirs("reports", exist_ok=True)
            open("reports/r.txt", "w").write("dir")
    """)
    for args in ((), ("--sandbox=all",)):
        result = pytester.runpytest_subprocess(*args)
        result.assert_outcomes(passed=1)
        assert (pytester.path / "build/result.txt").read_text() == "file", args
        assert (pytester.path / "reports/r.txt").read_text() == "dir", args
        shutil.rmtree(pytester.path / "build")
        shutil.rmtree(pytester.path / "reports")


def test_an_output_outside_the_rootdir_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_outputs = ../elsewhere\n")
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("--sandbox=all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sandbox_outputs: '../elsewhere' is not a path inside the rootdir*"])


def _message(path: str, data: str = "aGk=") -> dict[str, object]:
    return {"type": "output", "path": path, "data": data, "mode": 0o644}


def test_write_refuses_paths_outside_the_outputs(tmp_path: pathlib.Path) -> None:
    root = str(tmp_path / "out")
    for path in (f"{root}/../x", str(tmp_path / "x"), "relative", f"{root}x", f"{root}/a/./b"):
        with pytest.raises(ProtocolError):
            outputs.write(_message(path), [root])
    with pytest.raises(ProtocolError):
        outputs.write(_message(f"{root}/a", data="not base64!"), [root])
    outputs.write(_message(f"{root}/a/b"), [root])
    assert (tmp_path / "out/a/b").read_text() == "hi"
    file_output = str(tmp_path / "made/result.txt")  # an output that names a file
    outputs.write(_message(file_output), [root, file_output])
    assert (tmp_path / "made/result.txt").read_text() == "hi"
    with pytest.warns(pytest.PytestWarning, match="cannot write the output"):  # no file replaces a directory
        outputs.write(_message(root), [root])
    assert (tmp_path / "out/a/b").read_text() == "hi"


def test_an_empty_directory_under_an_output_is_carried_and_made(tmp_path: pathlib.Path) -> None:
    """pytest-benchmark makes its storage directory (.benchmarks) in every run, empty until a run is saved: a
    plain run leaves it, so the sandbox carries empty directories under outputs (those holding files come
    with their files)."""
    scratch = tmp_path / "scratch"
    (scratch / "u/.benchmarks").mkdir(parents=True)
    (scratch / "u/reports/empty").mkdir(parents=True)
    (scratch / "u/reports/full").mkdir()
    (scratch / "u/reports/full/r.txt").write_text("x")
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = list(outputs.collect(fd, [("/p/.benchmarks", "u/.benchmarks"), ("/p/reports", "u/reports")]))
    finally:
        os.close(fd)
    assert sorted((m["type"], m["path"]) for m in found) == [
        ("output", "/p/reports/full/r.txt"),
        ("output-directory", "/p/.benchmarks"),
        ("output-directory", "/p/reports/empty"),
    ]
    root = tmp_path / "project"
    root.mkdir()
    made = [str(root / ".benchmarks"), str(root / "reports")]
    outputs.write({"type": "output-directory", "path": made[0]}, made, anchors=[str(root)])
    outputs.write({"type": "output-directory", "path": f"{made[1]}/a/empty"}, made, anchors=[str(root)])
    assert (root / ".benchmarks").is_dir() and (root / "reports/a/empty").is_dir()
    with pytest.raises(ProtocolError):
        outputs.write({"type": "output-directory", "path": str(tmp_path / "elsewhere")}, made, anchors=[str(root)])
    (root / "reports/link").symlink_to(tmp_path)
    with pytest.warns(pytest.PytestWarning, match="cannot make the output directory"):
        outputs.write({"type": "output-directory", "path": f"{made[1]}/link/x"}, made, anchors=[str(root)])
    assert not (tmp_path / "x").exists()


def test_write_carries_nothing_a_later_run_would_execute(tmp_path: pathlib.Path) -> None:
    """An output directory inside the project (a syrupy snapshot directory) is collected by the next run: a
    conftest.py a sandbox wrote there would run in the pytest process. Not carried, nor any Python source, bytecode,
    extension module, .pth or ini file."""
    root = str(tmp_path / "tests/__snapshots__")
    for name in ("conftest.py", "sub/conftest.py", "evil.pth", "test_x.py", "pkg/__init__.pyc", "m.so", "tox.ini"):
        with pytest.warns(pytest.PytestWarning, match="a later run would execute it"):
            outputs.write(_message(f"{root}/{name}"), [root])
    outputs.write(_message(f"{root}/__pycache__/conftest.cpython-311.pyc"), [root])
    outputs.write(_message(f"{root}/test_x.ambr"), [root])
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()) == [
        "tests/__snapshots__/test_x.ambr"
    ]


def test_write_follows_no_symlink_on_the_host(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (root / "link").symlink_to(target)
    (root / "file").symlink_to(target / "victim")
    with pytest.warns(pytest.PytestWarning, match="cannot write the output"):
        outputs.write(_message(f"{root}/link/x"), [str(root)])
    outputs.write(_message(f"{root}/file"), [str(root)])  # replaces the link itself
    assert os.listdir(target) == []
    assert (root / "file").read_text() == "hi" and not (root / "file").is_symlink()


def test_uppers_of_outputs_follow_the_overlay_layout() -> None:
    found = outputs.in_uppers(["/home/u", "/home/u/proj"], ["/home/u/proj/.pytest_cache", "/srv/x", "/home/u/o"])
    assert found == [("/home/u/proj/.pytest_cache", "1/upper/.pytest_cache"), ("/home/u/o", "0/upper/o")]


def test_suite_properties_recorded_in_sandboxes_reach_junitxml(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_a(record_testsuite_property):
            record_testsuite_property("build", "42")
        def test_b(record_testsuite_property):
            record_testsuite_property("arch", "x86")
    """)
    xml = pytester.path / "junit.xml"
    pytester.runpytest_subprocess("--sandbox=all", f"--junitxml={xml}").assert_outcomes(passed=2)
    found = [(p.get("name"), p.get("value")) for p in ElementTree.parse(xml).iter("property")]
    assert found == [("build", "42"), ("arch", "x86")]


def test_snapshots_used_in_sandboxes_are_neither_unused_nor_deleted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_one(snapshot):
            assert {"a": 1} == snapshot
        def test_two(snapshot):
            assert "two" == snapshot
    """)
    pytester.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=2)  # plain: writes them
    snapshots = pytester.path / "__snapshots__" / "test_snapshots_used_in_sandboxes_are_neither_unused_nor_deleted.ambr"
    written = snapshots.read_text()
    pytester.runpytest_subprocess("--sandbox=all").assert_outcomes(passed=2)  # used, so no "unused" failure
    pytester.runpytest_subprocess("--sandbox=all", "--snapshot-update").assert_outcomes(passed=2)
    assert snapshots.read_text() == written  # nothing deleted as unused
    with open(pytester.path / "test_snapshots_used_in_sandboxes_are_neither_unused_nor_deleted.py", "a") as test:
        test.write("\ndef test_three(snapshot):\n    assert [3] == snapshot\n")
    pytester.runpytest_subprocess("--sandbox=all", "--snapshot-update").assert_outcomes(passed=3)
    assert "test_three" in snapshots.read_text()  # queued in the sandbox, written by pytest's syrupy
    pytester.runpytest_subprocess().assert_outcomes(passed=3)  # and plain pytest agrees


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["plain", "xdist"])
def test_snapshots_of_a_test_whose_sandbox_crashed_are_not_deleted(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """A sandbox that dies sends no record of the snapshots its test used: syrupy would count them unused
    and --snapshot-update delete them. Unused detection goes off for that session instead."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # an outer xdist worker's: syrupy would take them for its own
    source = """
        import os
        def test_one(snapshot):
            assert {"a": 1} == snapshot
        def test_crashes(snapshot):
            assert "kept" == snapshot
            CRASH
    """
    pytester.makepyfile(test_crash=source.replace("CRASH", "pass"))
    pytester.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=2)
    snapshots = pytester.path / "__snapshots__" / "test_crash.ambr"
    written = snapshots.read_text()
    pytester.makepyfile(test_crash=source.replace("CRASH", "os._exit(3)"))
    result = pytester.runpytest_subprocess("--sandbox=all", "--snapshot-update", *xdist)
    result.assert_outcomes(passed=1, failed=1)
    assert snapshots.read_text() == written  # test_crashes' snapshot is still there
    result.stdout.fnmatch_lines(["*Unused snapshot detection is disabled*"])


DOCTEST_MODULE = '''
def add(a, b):
    """
    >>> add(1, 2)
    4
    """
    return a + b
'''


def test_doctest_and_fixture_errors_read_as_in_a_plain_run(pytester: pytest.Pytester) -> None:
    """A doctest's failure and a missing fixture's error have no crash location: pytest sends their text, and
    the short summary line of a plain run names the test only. The whole output is a plain run's."""
    pytester.makepyfile(mod=DOCTEST_MODULE, test_fx="def test_missing(nonexistent): pass\ndef test_fail(): assert 0\n")
    outputs = []
    for mode in ((), ("--sandbox=all",), ("--sandbox=hermetic",)):
        result = pytester.runpytest_subprocess("-p", "no:randomly", "--doctest-modules", *mode)
        result.assert_outcomes(failed=2, errors=1)
        result.stdout.fnmatch_lines(["FAILED mod.py::mod.add", "ERROR test_fx.py::test_missing"])
        text = re.sub(r" in [\d.]+s", "", result.stdout.str())
        outputs.append([line for line in text.splitlines() if not line.startswith(("sandbox", "rootdir"))])
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]


def _run_with_a_raising_hook(
    pytester: pytest.Pytester, mode: str, plugin_source: str, tests: tuple[str, ...]
) -> pytest.RunResult:
    if mode == "hermetic":  # where -p cannot name the project's code; all of a conftest.py runs in the sandbox
        pytester.makeconftest(plugin_source)
    else:  # a plugin module: a conftest's log hooks run in pytest, not in the test's sandbox
        pytester.makepyfile(raising_plugin=plugin_source)
    pytester.makepyfile(test_x="".join(f"def {name}():\n    pass\n\n" for name in tests))
    args = {
        "plain": (),
        "all": ("--sandbox=all",),
        "scope-module": ("--sandbox=all", "--sandbox-scope=module"),
        "hermetic": ("--sandbox=hermetic",),
    }[mode]
    plugin = () if mode == "hermetic" else ("-p", "raising_plugin")
    return pytester.runpytest_subprocess(*plugin, *args)


RAISING_HOOKS = {
    "makereport": """
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            if call.when == "call" and item.name == "test_late":
                raise RuntimeError("a plugin broke in makereport")
            return report
    """,
    "logfinish": """
        def pytest_runtest_logfinish(nodeid, location):
            if nodeid.endswith("test_late"):
                raise RuntimeError("a plugin broke after the teardown report")
    """,
}


@pytest.mark.parametrize("hook", sorted(RAISING_HOOKS))
@pytest.mark.parametrize("mode", ["plain", "all", "scope-module", "hermetic"])
def test_a_hook_that_raises_in_the_protocol_is_an_internal_error(
    pytester: pytest.Pytester, hook: str, mode: str
) -> None:
    """A plugin's hook raising in pytest's runtest protocol ends the session as an INTERNALERROR with its
    traceback, after the reports logged before it: the same outcomes and exit code as a plain run."""
    result = _run_with_a_raising_hook(pytester, mode, RAISING_HOOKS[hook], ("test_first", "test_late", "test_other"))
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR, result.stdout.str()
    result.assert_outcomes(passed=2 if hook == "logfinish" else 1)  # test_other never runs
    result.stdout.fnmatch_lines(["INTERNALERROR> *RuntimeError: a plugin broke*"])
    assert "test_other" not in result.stdout.str()


USAGE_ERROR_IN_A_HOOK = """
    import pytest

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if call.when == "call" and item.name == "test_late":
            raise pytest.UsageError("--frobnicate takes a number")
        return report
"""


@pytest.mark.parametrize("mode", ["plain", "all", "scope-module", "hermetic"])
def test_a_usage_error_raised_by_a_hook_in_the_protocol_is_a_usage_error(pytester: pytest.Pytester, mode: str) -> None:
    """pytest.UsageError from a hook in the protocol: "ERROR: <message>" and exit code 4, as in a plain run
    (an INTERNALERROR with exit code 3 before)."""
    result = _run_with_a_raising_hook(pytester, mode, USAGE_ERROR_IN_A_HOOK, ("test_first", "test_late"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: --frobnicate takes a number"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


COLLECTION_TIME_STREAMS = """
    import logging, sys

    STDOUT_AT_IMPORT = sys.stdout  # `from sys import stdout`, a handler made at import: pytest's capture
    log = logging.getLogger("collected")
    log.addHandler(logging.StreamHandler())
    log.propagate = False

    def test_the_stream_is_still_the_one_bound_at_collection():
        assert sys.stdout is STDOUT_AT_IMPORT

    def test_output_through_collection_time_streams_is_captured():
        STDOUT_AT_IMPORT.write("OUT-BOUND-AT-IMPORT\\n")
        log.warning("ERR-BOUND-AT-IMPORT")
        assert 0
"""


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--sandbox=all",),
        ("--sandbox=all", "--sandbox-scope=module"),
        ("--sandbox=hermetic",),
        ("--sandbox=all", "-n", "2"),
        ("--sandbox=all", "--capture=sys"),
    ],
    ids=["plain", "all", "scope-module", "hermetic", "xdist", "capture-sys"],
)
def test_streams_bound_at_collection_stay_open_and_captured(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """A module that bound sys.stdout or a logging.StreamHandler at import writes through pytest's capture,
    as in a plain run (structlog's suite: "I/O operation on closed file" in 36 tests before)."""
    pytester.makepyfile(test_streams=COLLECTION_TIME_STREAMS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*Captured stdout call*", "OUT-BOUND-AT-IMPORT", "*Captured stderr call*", "ERR-BOUND-AT-IMPORT"]
    )
    result.stdout.no_fnmatch_line("*closed file*")


ORPHAN_WAITER = """
    import os, subprocess, sys, time

    SPAWN_AND_LEAVE = (
        "import subprocess, sys; "
        "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3)']).pid)"
    )

    def test_an_exited_orphan_is_gone_while_the_test_runs():
        orphan = int(subprocess.run([sys.executable, "-c", SPAWN_AND_LEAVE], capture_output=True, text=True,
                                    check=True).stdout)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:  # psutil's wait() of a non-child
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{orphan}"), "its zombie waits for the test to end"
"""


@pytest.mark.parametrize(
    "args",
    [(), ("--sandbox=all",), ("--sandbox=all", "-n", "2"), ("--sandbox=hermetic",)],
    ids=["plain", "all", "xdist", "hermetic"],
)
def test_an_orphan_that_exits_is_reaped_while_the_test_runs(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """Orphans come to the scope process (or the hermetic session's zygote), a subreaper: it reaps them as
    init does on the host (psutil's suite hung waiting for its grandchildren before)."""
    pytester.makepyfile(test_orphan=ORPHAN_WAITER)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=1)


HEADROOM = """
    import sys

    def _down(n):
        return n if n == 0 else _down(n - 1)

    def headroom():
        reachable, step = 0, 512
        while step:  # the deepest recursion that does not raise, found by bisection
            try:
                _down(reachable + step)
                reachable += step
            except RecursionError:
                pass
            step //= 2
        print(f"HEADROOM={reachable} LIMIT={sys.getrecursionlimit()}")
        return reachable

    def test_headroom():
        headroom()

    def test_headroom_again():  # in a scope sandbox, a fork made while the first test ended
        reachable = headroom()
        sys.setrecursionlimit(sys.getrecursionlimit() + 100)  # the numbers a test sees are a plain run's
        _down(reachable + 50)
"""


def _headroom(pytester: pytest.Pytester, *args: str) -> tuple[int, int]:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rP", *args)
    result.assert_outcomes(passed=2)
    found = set(re.findall(r"HEADROOM=(\d+) LIMIT=(\d+)", result.stdout.str()))
    assert len(found) == 1, result.stdout.str()  # both tests alike
    headroom, limit = found.pop()
    return int(headroom), int(limit)


@pytest.mark.parametrize(
    "args",
    [
        ("--sandbox=all",),
        ("--sandbox=all", "--sandbox-scope=module"),
        ("--sandbox=all", "--sandbox-collection=host"),
        ("--sandbox=all", "--sandbox-collection=host", "--sandbox-scope=module"),
        ("--sandbox=hermetic",),
        ("--sandbox=all", "-n", "2"),
    ],
    ids=["all", "scope-module", "host-collection", "host-collection-scope-module", "hermetic", "xdist"],
)
def test_a_test_recurses_as_deep_as_in_a_plain_run(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """The sandbox's own frames under pytest's protocol (about 14) do not eat the test's recursion headroom,
    and sys.getrecursionlimit() says what it says in a plain run (tomli's nesting tests under -n 2 raised
    RecursionError before)."""
    pytester.makepyfile(test_deep=HEADROOM)
    xdist = ("-n", "2") if "-n" in args else ()
    plain, sandboxed = _headroom(pytester, *xdist), _headroom(pytester, *args)
    if "--sandbox-collection=host" in args:
        assert sandboxed == plain
    else:  # the session's pytest starts from `python -c`: a few frames fewer than the script; xdist's loop has
        assert sandboxed[0] >= plain[0] and sandboxed[1] == plain[1]  # one frame more


def test_every_mount_a_test_sees_listed_is_there(pytester: pytest.Pytester) -> None:
    """A spare procfs for image commands lay under a /dev/shm mounted over it: /proc/self/mounts listed a
    mount point that did not exist (psutil's disk_partitions test). Only sandboxes with an image have it."""
    pytester.makepyfile("""
        import os

        def test_every_mount_point_exists():
            with open("/proc/self/mounts") as f:
                points = [line.split()[1].replace("\\\\040", " ") for line in f]
            assert [point for point in points if not os.path.exists(point)] == []
    """)
    for mode in ("--sandbox=all", "--sandbox=hermetic"):
        pytester.runpytest_subprocess("-p", "no:cacheprovider", mode).assert_outcomes(passed=1)


LIVE_LOGS = """
    import logging, pytest

    @pytest.fixture
    def logs():
        logging.getLogger("t").warning("setup log")
        yield
        logging.getLogger("t").warning("teardown log")

    def test_fails(logs):
        logging.getLogger("t").warning("call log")
        assert 0

    def test_quiet():
        pass
"""


def _run_body(result: pytest.RunResult) -> list[str]:
    """The lines from 'collected' to the summary line (without its time): what the run printed as it ran."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if line.startswith("collected "))
    return [re.sub(r" in [0-9.]+s ", " ", line) for line in lines[start:]]


@pytest.mark.parametrize(
    "args",
    [("--sandbox=all",), ("--sandbox=all", "--sandbox-scope=module"), ("--sandbox=hermetic",)],
    ids=["all", "scope-module", "hermetic"],
)
def test_live_logs_read_as_in_a_plain_run(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """Found by a real-suites helper: a test's live log lines reached the terminal past pytest's writer, so
    the [ 50%] column came out shifted by the test's id and the call's status came after the teardown's logs."""
    pytester.makepyfile(LIVE_LOGS)
    options = ("-p", "no:cacheprovider", "-o", "log_cli=true", "-o", "log_cli_level=INFO")
    plain = pytester.runpytest_subprocess(*options)
    sandboxed = pytester.runpytest_subprocess(*options, *args)
    sandboxed.assert_outcomes(passed=1, failed=1)
    assert "live log call" in plain.stdout.str()
    assert _run_body(sandboxed) == _run_body(plain)


def test_a_scopes_teardown_output_joins_its_last_tests_teardown_section(pytester: pytest.Pytester) -> None:
    """Found by a real-suites helper: the output of a module fixture's teardown, reported on the module's last
    test, came as a second section after the test's 'Captured log teardown'; pytest captures the whole
    teardown phase in one section per stream, before the log's."""
    pytester.makepyfile("""
        import logging, pytest

        @pytest.fixture(scope="module")
        def module_fixture():
            yield
            print("module teardown")

        @pytest.fixture
        def function_fixture(module_fixture):
            yield
            print("function teardown")
            logging.getLogger("t").warning("function teardown log")

        def test_fails(function_fixture):
            assert 0
    """)
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    sandboxed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    sandboxed.assert_outcomes(failed=1)
    assert "module teardown" in plain.stdout.str()
    assert _run_body(sandboxed) == _run_body(plain)
