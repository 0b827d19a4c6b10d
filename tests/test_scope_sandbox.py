"""Scope sandboxes (the default --sandbox-scope=test): fixtures of wider scope are set up once, in a
sandbox; each test runs in a fork of it over a layer of its own, which goes with the test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import carrying_the_token

WRITES_EVERYWHERE = """
    import os, pathlib, pytest

    PLACES = ("written", "/tmp/written", "/var/tmp/written", "/run/written", "/dev/shm/written",
              os.path.expanduser("~/written"))

    @pytest.fixture(scope="session")
    def shared(tmp_path_factory):
        with open("/tmp/setups", "a") as f:  # in the scope's own layer: every test of the scope sees it
            f.write("x")
        data = tmp_path_factory.mktemp("shared") / "data"
        data.write_text("from the fixture")
        pathlib.Path("fixture-wrote").write_text("yes")
        return {"path": data, "object": object()}

    def test_writes(shared, tmp_path):
        for place in PLACES:
            with open(place, "w") as f:
                f.write("test")
        shared["path"].write_text("changed by a test")
        (tmp_path / "mine").write_text("x")
        shared["seen"] = True  # in this test's process only

    def test_sees_the_fixture_not_the_other_test(shared):
        assert [p for p in PLACES if os.path.exists(p)] == []
        assert shared["path"].read_text() == "from the fixture"
        assert pathlib.Path("fixture-wrote").read_text() == "yes"
        assert "seen" not in shared
        with open("/tmp/setups") as f:
            assert f.read() == "x"
"""


def test_wider_fixtures_once_and_each_tests_writes_its_own(pytester: pytest.Pytester) -> None:
    home = pytester.path / "home"
    home.mkdir()
    pytester.makepyfile(WRITES_EVERYWHERE)
    result = pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    assert not [p for p in ("written", "fixture-wrote", "home/written") if (pytester.path / p).exists()]
    assert not os.path.exists("/tmp/setups") and not os.path.exists("/tmp/written")


def test_what_fixtures_change_between_tests_is_in_the_next_tests_layer(pytester: pytest.Pytester) -> None:
    """The layer helper builds each test's layer while the scope process tears down and sets up fixtures:
    what a module fixture writes, makes or removes after the previous test is what the next test sees, in
    a directory that test listed too."""
    pytester.makepyfile(
        test_a="""
            import os

            def test_lists_before():
                assert sorted(os.listdir("data")) == ["a", "kept"]
        """,
        test_b="""
            import os, pathlib, shutil, pytest

            @pytest.fixture(scope="module")
            def changed():
                pathlib.Path("data/b").write_text("b")
                os.makedirs("data/sub")
                pathlib.Path("data/sub/c").write_text("c")
                os.remove("data/a")
                pathlib.Path("data/kept").write_text("new")
                yield
                shutil.rmtree("data/sub")

            def test_sees_the_fixtures_changes(changed):
                assert sorted(os.listdir("data")) == ["b", "kept", "sub"]
                assert pathlib.Path("data/sub/c").read_text() == "c"
                assert pathlib.Path("data/kept").read_text() == "new"

            def test_and_so_does_the_next(changed):
                assert sorted(os.listdir("data")) == ["b", "kept", "sub"]
        """,
        test_c="""
            import os

            def test_after_the_teardown():
                assert sorted(os.listdir("data")) == ["b", "kept"]
        """,
    )
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "a").write_text("a")
    (pytester.path / "data" / "kept").write_text("old")
    result = pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=4)
    assert sorted(os.listdir(pytester.path / "data")) == ["a", "kept"]


def test_the_same_fixture_objects_and_setup_counts_as_plain(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def sess():
            print("SETUP-SESSION")
            yield object()
            print("TEARDOWN-SESSION")

        @pytest.fixture(scope="class")
        def klass():
            print("SETUP-CLASS")
            yield
            print("TEARDOWN-CLASS")

        @pytest.fixture(scope="module", params=[1, 2])
        def param(request):
            print(f"SETUP-PARAM-{request.param}")
            yield request.param
            print(f"TEARDOWN-PARAM-{request.param}")
    """)
    pytester.makepyfile(
        test_a="""
            import unittest

            class TestK:
                def test_1(self, sess, klass): pass
                def test_2(self, sess, klass): pass

            def test_param(sess, param): pass

            class Case(unittest.TestCase):
                @classmethod
                def setUpClass(cls):
                    print("SETUP-UNITTEST-CLASS")
                def test_a(self): pass
                def test_b(self): pass
        """,
        test_b="def test_3(sess): pass",
    )
    counts = {}
    for args in ((), ("--sandbox=all",)):
        result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
        result.assert_outcomes(passed=7)
        text = result.stdout.str()
        counts[args] = {
            word: text.count(word)
            for word in (
                "SETUP-SESSION",
                "TEARDOWN-SESSION",
                "SETUP-CLASS",
                "TEARDOWN-CLASS",
                "SETUP-PARAM-1",
                "TEARDOWN-PARAM-1",
                "SETUP-PARAM-2",
                "SETUP-UNITTEST-CLASS",
            )
        }
    assert counts[("--sandbox=all",)] == counts[()]
    assert counts[()]["SETUP-SESSION"] == 1 and counts[()]["SETUP-UNITTEST-CLASS"] == 1


def test_fixture_errors_and_teardown_errors_land_as_in_a_plain_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.fixture(scope="module")
        def broken():
            raise RuntimeError("module fixture broke")

        @pytest.fixture(scope="session")
        def bad_teardown():
            yield
            print("tearing down the session fixture")
            raise ValueError("session teardown broke")

        def test_1(broken): pass
        def test_2(broken): pass
        def test_3(bad_teardown): pass
        def test_4(bad_teardown): pass
    """)
    outcomes = {}
    for args in ((), ("--sandbox=all",)):
        xml = pytester.path / f"junit{len(args)}.xml"
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={xml}", *args)
        outcomes[args] = result.parseoutcomes()
        text = result.stdout.str()
        assert text.count("module fixture broke") >= 2 and "session teardown broke" in text, text
        assert "ERROR at teardown of test_4" in text
    assert outcomes[("--sandbox=all",)] == outcomes[()] == {"passed": 2, "errors": 3}


def test_what_a_test_leaves_running_ends_before_the_next(pytester: pytest.Pytester, no_leftovers: str) -> None:
    pytester.makepyfile(
        carrying_the_token(
            no_leftovers,
            f"""
        import os, subprocess, time, pytest

        @pytest.fixture(scope="session")
        def server():
            proc = subprocess.Popen(["sleep", "600"])  # the scope's: it stays up for every test
            yield proc
            proc.kill()
            proc.wait()

        def test_leaves_some(server):
            os.environ["LEFTOVER"] = "{no_leftovers}"
            subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600 & wait"], start_new_session=True)
            subprocess.Popen(["sleep", "600"])
            deadline = time.monotonic() + 10
            # sh has started its two once four carry it, each exec'd (one between fork and exec may not be read)
            while len(found := carrying_the_token()) != 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(found) == 4

        def test_next(server):
            assert carrying_the_token() == []
            assert server.poll() is None  # the scope process's child, seen from the test's fork
    """,
        )
    )
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=2)


SERVED_FROM_A_THREAD = """
    import http.server, os, subprocess, threading, time, urllib.request, pytest

    class Server:  # pytest-httpserver's shape: tests tell a server thread of the fixture what to answer
        def __init__(self):
            self.routes, served = {}, self
            class Handler(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    body = served.routes.get(self.path)
                    self.send_response(200 if body else 500)
                    self.end_headers()
                    self.wfile.write((body or "no route").encode())
                def log_message(self, *args):
                    pass
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

        def get(self, path):
            return urllib.request.urlopen(f"http://127.0.0.1:{self.httpd.server_port}{path}").read()

    @pytest.fixture(scope="session")
    def server():
        print("SETUP-SERVER", flush=True)
        served = Server()
        yield served
        served.httpd.shutdown()

    @pytest.fixture
    def routes(server):
        yield server
        server.routes.clear()

    @pytest.mark.parametrize("n", [1, 2])
    def test_route(routes, n):
        routes.routes[f"/{n}"] = f"hello {n}"
        assert routes.get(f"/{n}") == f"hello {n}".encode()
        open("written", "w").write("test")
        os.mkdir("made")
        os.chdir("made")  # where a plain run would leave pytest: gone with the layer, so back where it was
        subprocess.Popen(["sleep", "600"], env={**os.environ, "LEFTOVER": "TOKEN"})

    def test_after(server):
        assert server.routes == {}  # the routes fixture's teardown ran in the process the thread serves
        assert not os.path.exists("written") and not os.path.exists("made")
        assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and b"TOKEN" in environ(pid)]

    def environ(pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f.read()
        except OSError:
            return b""
"""


def test_tests_of_a_scope_whose_fixtures_run_threads_reach_those_threads(
    pytester: pytest.Pytester, no_leftovers: str
) -> None:
    """A fork of the scope process would have none of its threads: a route a test adds would reach a copy no
    thread serves (pytest-httpserver: 93 of its own 191 tests failed). Such a scope's tests run in the scope
    process itself, each still over a layer of its own, its processes ended after it."""
    pytester.makepyfile(SERVED_FROM_A_THREAD.replace("TOKEN", no_leftovers))
    result = pytester.runpytest_subprocess("-s", "--sandbox=all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert result.stdout.str().count("SETUP-SERVER") == 1
    assert not (pytester.path / "written").exists()


def test_a_test_run_in_its_scope_process_that_crashes_fails_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import ctypes, threading, pytest

        @pytest.fixture(scope="session")
        def worker():
            print("SETUP-WORKER", flush=True)
            done = threading.Event()
            threading.Thread(target=done.wait, daemon=True).start()
            yield
            done.set()

        def test_1(worker): pass
        def test_2(worker): ctypes.string_at(0)
        def test_3(worker): pass
    """)
    result = pytester.runpytest_subprocess("-s", "--sandbox=all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*sandbox crashed: SIGSEGV*"])
    assert result.stdout.str().count("SETUP-WORKER") == 2  # after the crash, a new scope sandbox


def test_a_crash_fails_its_test_and_the_rest_run_in_a_new_scope_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def sess():
            print("SETUP-SESSION", flush=True)
            yield
    """)
    pytester.makepyfile("""
        import ctypes, os, signal, time

        def test_1(sess): pass
        def test_2(sess): ctypes.string_at(0)
        def test_3(sess): pass
        def test_4(sess):  # kills the scope process: the test ends with it
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(30)
        def test_5(sess): pass
    """)
    result = pytester.runpytest_subprocess("-s", "--sandbox=all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*sandbox crashed: SIGSEGV*"])
    assert result.stdout.str().count("SETUP-SESSION") == 3  # after each crash, a new scope sandbox


def test_limits_and_durations_keep_a_sandbox_per_test(pytester: pytest.Pytester) -> None:
    """A test's usage, OOM and timeout are its own cgroup's: with limits or --sandbox-durations, a sandbox
    of its own, as before (and the session fixture in each)."""
    pytester.makepyfile("""
        import os, pytest

        @pytest.fixture(scope="session")
        def sess():
            print("SETUP-SESSION")

        @pytest.mark.container(pids=200)
        def test_1(sess): assert os.getpid() == 2

        @pytest.mark.container(pids=200)
        def test_2(sess): assert os.getpid() == 2
    """)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert result.stdout.str().count("SETUP-SESSION") == 2


def test_outputs_of_every_test_reach_the_host(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_outputs = results\n")
    pytester.makepyfile("""
        import os, pytest

        @pytest.fixture(scope="session")
        def results():
            os.makedirs("results", exist_ok=True)
            with open("results/fixture.txt", "w") as f:
                f.write("fixture")
            return "results"

        @pytest.mark.parametrize("n", range(3))
        def test_writes(results, n):
            with open(f"{results}/test{n}.txt", "w") as f:
                f.write(str(n))
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=3)
    assert sorted(os.listdir(pytester.path / "results")) == ["fixture.txt", "test0.txt", "test1.txt", "test2.txt"]


@pytest.mark.skipif(os.getuid() == 0, reason="the plain-user lane's check")
def test_scope_sandbox_as_a_plain_user(pytester: pytest.Pytester) -> None:
    assert os.getuid() != 0
    pytester.makepyfile(WRITES_EVERYWHERE)
    (pytester.path / "home").mkdir()
    env = {**os.environ, "HOME": str(pytester.path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox=all", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [p for p in ("written", "fixture-wrote", "home/written") if (pytester.path / p).exists()]


def test_a_fixtures_popen_works_in_the_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import subprocess, pytest

        @pytest.fixture(scope="module")
        def server():
            return subprocess.Popen(["sleep", "600"])

        @pytest.fixture(scope="module")
        def quick():
            return subprocess.Popen(["sh", "-c", "exit 7"])

        def test_running(server, quick):
            assert server.poll() is None
            assert quick.wait(timeout=10) == 7

        def test_stop_it(server):
            server.terminate()
            assert server.wait(timeout=10) == -15

        def test_gone_for_the_next_test_too(server):
            assert server.wait(timeout=10) == -15
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_a_process_a_fixtures_thread_starts_is_left_to_its_popen(pytester: pytest.Pytester) -> None:
    """The scope process reaps what a test orphaned while the test runs; a process that a session fixture's
    thread starts there meanwhile is the thread's to wait for (its exit code, not ECHILD's 0)."""
    pytester.makepyfile("""
        import subprocess, threading, time, pytest

        RESULT = {}

        @pytest.fixture(scope="session")
        def watcher():
            def run():
                time.sleep(0.5)
                proc = subprocess.Popen(["sh", "-c", "exit 3"])
                time.sleep(1)  # a zombie of the scope process meanwhile
                RESULT["code"] = proc.poll()
            threading.Thread(target=run).start()

        def test_first(watcher):
            time.sleep(2.5)  # the fixture's thread runs its command meanwhile, in the scope process

        def test_second(watcher):
            assert RESULT == {"code": 3}
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_teardown_that_ends_every_child_of_its_process_leaves_the_next_test_alone(
    pytester: pytest.Pytester,
) -> None:
    """psutil's TestPopen.tearDownClass kills every child of its process: run in the scope process, it killed
    the layer helper, and the next test erred ("the layer helper is gone"). The helper is no child of it."""
    pytester.makepyfile("""
        import os, signal

        def _children_of(pid):
            for entry in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            yield int(entry)
                except OSError:
                    pass

        class TestReaps:
            @classmethod
            def teardown_class(cls):
                for pid in _children_of(os.getpid()):
                    os.kill(pid, signal.SIGKILL)

            def test_a(self):
                pass

        class TestAfter:
            def test_b(self):
                pass
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.parametrize(
    "ends_the_session",
    ["def test_a(mod):\n    pytest.exit('enough')", "def test_a(mod, interrupts):\n    pass"],
    ids=["pytest.exit", "KeyboardInterrupt at teardown"],
)
def test_a_session_ended_by_a_test_still_tears_down_the_scopes_fixtures(
    pytester: pytest.Pytester, ends_the_session: str
) -> None:
    """pytest.exit or ^C in a test ends the session, whose end tears down every fixture still set up: the scope
    process does it too before it ends (found by red-team helper-35: a module fixture's teardown never ran)."""
    pytester.makepyfile(
        "import os, pytest\n\n"
        "@pytest.fixture(scope='module')\n"
        "def mod():\n    yield\n    os.write(2, b'MODULE TEARDOWN\\n')\n\n"
        "@pytest.fixture\n"
        "def interrupts():\n    yield\n    raise KeyboardInterrupt\n\n"
        f"{ends_the_session}\n\n"
        "def test_b(mod):\n    pass\n"
    )
    for mode in ((), ("--sandbox=all",)):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", *mode)
        assert result.stderr.str().count("MODULE TEARDOWN") + result.stdout.str().count("MODULE TEARDOWN") == 1, mode
