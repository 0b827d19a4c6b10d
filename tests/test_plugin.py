"""End to end: real pytest runs (pytester, in a subprocess because sandboxes fork) with the plugin."""

from __future__ import annotations

import os
import re
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from pytest_sandbox import probe

OUTCOMES_SUITE = """
    import pytest

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    @pytest.fixture
    def bad_teardown():
        yield
        raise RuntimeError("teardown broke")

    def test_pass():
        print("hello from the test")

    def test_fail():
        assert 1 + 1 == 3

    def test_error(broken):
        pass

    def test_teardown_error(bad_teardown):
        pass

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.skipif(True, reason="static skip")
    def test_skipif():
        pass

    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert False

    @pytest.mark.xfail(reason="fixed already")
    def test_xpass():
        pass

    @pytest.mark.parametrize("n", [1, 2])
    def test_param(n):
        assert n
"""


def _summary(result: pytest.RunResult) -> list[str]:
    return sorted(
        line
        for line in result.outlines
        if line.split(" ")[0] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
    )


def test_report_shapes_match_unsandboxed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(OUTCOMES_SUITE)
    plain = pytester.runpytest_subprocess("-rA", "--sandbox=off", "--junitxml=plain.xml")
    boxed = pytester.runpytest_subprocess("-rA", "--sandbox=all", "--junitxml=boxed.xml")
    assert plain.parseoutcomes() == boxed.parseoutcomes()
    assert boxed.parseoutcomes() == {"passed": 4, "failed": 1, "errors": 2, "skipped": 2, "xfailed": 1, "xpassed": 1}
    assert _summary(plain) == _summary(boxed)
    boxed.stdout.fnmatch_lines_random(["*hello from the test*", "*assert (1 + 1) == 3*", "*fixture broke*"])

    def cases(path: str) -> list[tuple[str, tuple[str, ...]]]:
        root = ET.parse(pytester.path / path).getroot()
        return sorted(
            (case.get("name", ""), tuple(sorted(child.tag for child in case))) for case in root.iter("testcase")
        )

    assert cases("plain.xml") == cases("boxed.xml")


def test_marked_tests_only_by_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, pytest

        @pytest.mark.container
        def test_boxed():
            assert os.getpid() < 10

        def test_host():
            assert os.getpid() > 10
    """)
    # -W error: the plugin itself must not leak a warning (unclosed file, socket) into a test
    pytester.runpytest_subprocess("-W", "error").assert_outcomes(passed=2)


@pytest.mark.guest
def test_writes_vanish(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path_factory.mktemp("home")
    pytester.makepyfile(f"""
        import os, pathlib, pytest

        @pytest.mark.container
        def test_write_everywhere(tmp_path):
            pathlib.Path("in_rootdir.txt").write_text("x")
            pathlib.Path({str(home)!r}, "in_home.txt").write_text("x")
            pathlib.Path("/tmp/sandbox-was-here").write_text("x")
            (tmp_path / "in_tmp_path").write_text("x")
            assert pathlib.Path("in_rootdir.txt").read_text() == "x"

        def test_host_sees_nothing():
            assert not os.path.exists("in_rootdir.txt")
            assert not os.path.exists({str(home)!r} + "/in_home.txt")
            assert not os.path.exists("/tmp/sandbox-was-here")
    """)
    monkeypatch.setenv("HOME", str(home))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    assert not (pytester.path / "in_rootdir.txt").exists()
    assert list(home.iterdir()) == []


@pytest.mark.guest
def test_delete_rename_in_overlay(pytester: pytest.Pytester) -> None:
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "keep.txt").write_text("k")
    (pytester.path / "gone.txt").write_text("g")
    pytester.makepyfile("""
        import os, shutil, pytest

        @pytest.mark.container
        def test_change_tree():
            os.remove("gone.txt")
            assert not os.path.exists("gone.txt")
            # Renaming a directory that came from the host gives EXDEV on an unprivileged
            # overlay (no redirect_dir in a user namespace); shutil.move copies instead.
            with pytest.raises(OSError) as info:
                os.rename("data", "moved")
            assert info.value.errno == 18
            os.rename("data/keep.txt", "data/renamed.txt")
            assert open("data/renamed.txt").read() == "k"
            os.remove("data/renamed.txt")
            assert os.listdir("data") == []
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert (pytester.path / "gone.txt").read_text() == "g"
    assert (pytester.path / "data" / "keep.txt").read_text() == "k"


@pytest.mark.skipif(not probe.has("tmpfs_xattr"), reason="host lacks user xattrs on tmpfs (Linux < 6.6)")
def test_delete_host_directory_in_overlay(pytester: pytest.Pytester) -> None:
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "keep.txt").write_text("k")
    pytester.makepyfile("""
        import os, shutil, pytest

        @pytest.mark.container
        def test_remove_and_recreate():
            shutil.move("data", "moved")
            shutil.rmtree("moved")
            os.mkdir("data")
            assert os.listdir("data") == []
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert (pytester.path / "data" / "keep.txt").read_text() == "k"


def test_host_view_is_read_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import errno, pytest

        @pytest.mark.container
        def test_usr_read_only():
            with pytest.raises(OSError) as info:
                open("/usr/sandbox-probe", "w")
            assert info.value.errno in (errno.EROFS, errno.EACCES)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on the host's loopback that answers "hi"."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hi")

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def test_host_loopback_unreachable_by_default(pytester: pytest.Pytester, host_server: int) -> None:
    pytester.makepyfile(f"""
        import socket, pytest

        @pytest.mark.container
        def test_isolated():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", {host_server}), timeout=2)

        @pytest.mark.container
        def test_own_loopback_works():
            server = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"

        @pytest.mark.container(network="host")
        def test_host_network():
            with socket.create_connection(("127.0.0.1", {host_server}), timeout=2) as conn:
                assert conn.recv(2) == b"hi"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=3)


def test_pid_namespace(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import os, pytest

        @pytest.mark.container
        def test_low_pid_and_no_host_processes():
            # pid 1 reaps, pid 2 holds the fixtures of wider scope and forks each test, a helper mounts
            # each test's layer: nothing else, nothing of the host's
            names = {{}}
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                with open(f"/proc/{{pid}}/comm") as f:
                    names[int(pid)] = f.read().strip()
            assert names[1] == "sandbox-init" and names[2] == "sandbox-test" and os.getppid() == 2, names
            assert sorted(names.values()) == ["sandbox-init", "sandbox-layers", "sandbox-test", "sandbox-test"], names
            assert not os.path.exists("/proc/{os.getpid()}/cmdline") or {os.getpid()} in names

        @pytest.mark.container
        def test_limits_get_a_sandbox_of_their_own():
            assert os.getpid() == 2  # its usage and its limits' effects are its own cgroup's

        test_limits_get_a_sandbox_of_their_own = pytest.mark.container(pids=100)(test_limits_get_a_sandbox_of_their_own)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


@pytest.mark.guest
def test_background_process_gone_after_test(
    pytester: pytest.Pytester, no_leftovers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = no_leftovers
    pytester.makepyfile(f"""
        import os, subprocess, sys, time, pytest

        @pytest.mark.container
        def test_starts_daemon():
            code = "import os, time\\nif os.fork(): os._exit(0)\\nos.setsid(); time.sleep(1000)"
            subprocess.run([sys.executable, "-c", code, {token!r}], check=True)
            time.sleep(0.2)

        def test_host_has_no_daemon():
            from helpers import processes_with
            assert processes_with({token!r}) == []
    """)
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)


def test_hostname_env_writable(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    shared = tmp_path_factory.mktemp("shared")
    (shared / "existing.txt").write_text("from host")
    pytester.makepyfile(f"""
        import os, socket, pytest

        @pytest.mark.container(hostname="box-1", env={{"APP_MODE": "test"}}, writable=[{str(shared)!r}])
        def test_options(sandbox):
            assert socket.gethostname() == "box-1"
            assert os.environ["APP_MODE"] == "test"
            assert open({str(shared)!r} + "/existing.txt").read() == "from host"
            open({str(shared)!r} + "/new.txt", "w").write("x")
            assert sandbox.active and sandbox.spec.hostname == "box-1"

        @pytest.mark.container
        def test_default_hostname(sandbox):
            assert socket.gethostname() == "sandbox"
            assert "APP_MODE" not in os.environ

        def test_unsandboxed(sandbox):
            assert not sandbox.active
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=3)
    assert sorted(p.name for p in shared.iterdir()) == ["existing.txt"]


def test_ini_defaults(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        sandbox = all
        sandbox_hostname = ci-box
        sandbox_env =
            FROM_INI=yes
    """)
    pytester.makepyfile("""
        import os, socket

        def test_ini():
            assert socket.gethostname() == "ci-box"
            assert os.environ["FROM_INI"] == "yes"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_segfault_reported_and_session_continues(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import ctypes, pytest

        @pytest.mark.container
        def test_crash():
            ctypes.string_at(0)

        @pytest.mark.container
        def test_after():
            pass
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*sandbox crashed: SIGSEGV*",
            "*Fatal Python error: Segmentation fault*",
            "*test_segfault_reported_and_session_continues.py*in test_crash*",
        ]
    )


def test_exit_status_and_sigkill(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, signal, pytest

        @pytest.mark.container
        def test_exit3():
            os._exit(3)

        @pytest.mark.container
        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)

        @pytest.fixture
        def dies_in_setup():
            os._exit(4)

        @pytest.mark.container
        def test_setup_crash(dies_in_setup):
            pass
    """)
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(failed=2, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*exited with status 3*",
            "*killed by SIGKILL*",
            "*ERROR at setup of test_setup_crash*",
            "*exited with status 4*",
        ]
    )


def test_exitfirst_lastfailed_keyword(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_a():
            pass

        def test_b():
            assert False

        def test_c():
            pass
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-x").assert_outcomes(passed=1, failed=1)
    result = pytester.runpytest_subprocess("--sandbox=all", "--lf")
    assert result.parseoutcomes() == {"failed": 1} or result.parseoutcomes().get("passed", 0) == 0
    result.stdout.fnmatch_lines(["*run-last-failure*"])
    pytester.runpytest_subprocess("--sandbox=all", "-k", "test_c").assert_outcomes(passed=1, deselected=2)


def test_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile("""
        import os, pytest

        @pytest.mark.parametrize("n", range(8))
        def test_n(n):
            with open("/proc/1/comm") as f:
                assert f.read().strip() == "sandbox-init"
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-n", "2").assert_outcomes(passed=8)


def test_fixture_scopes_and_mixed_modes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_one="""
        import pytest

        @pytest.fixture(scope="module")
        def resource():
            return {"count": 0}

        def test_host_first(resource):
            resource["count"] += 1

        @pytest.mark.container
        def test_boxed_sees_module_fixture(resource):
            resource["count"] += 10
            assert resource["count"] == 11

        def test_host_after(resource):
            assert resource["count"] == 1   # the sandbox's change stayed in the sandbox
    """,
        test_two="""
        import pytest

        @pytest.fixture(scope="session")
        def session_thing():
            return object()

        @pytest.mark.container
        def test_boxed(session_thing):
            assert session_thing is not None

        def test_host(session_thing):
            pass
    """,
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=5)


def test_capture_and_logging(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import logging, sys, pytest

        @pytest.mark.container
        def test_outputs(capsys, caplog):
            print("to stdout")
            sys.stderr.write("to stderr\\n")
            assert capsys.readouterr().out == "to stdout\\n"
            logging.getLogger("x").warning("logged")
            assert "logged" in caplog.text
            print("shown on failure")
            logging.getLogger("x").error("logged on failure")
            assert False
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*Captured stdout call*", "*shown on failure*", "*Captured log call*", "*logged on failure*"]
    )


def test_hooks_for_extenders(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import os

        def pytest_sandbox_spec(item, spec):
            if "renamed" in item.name:
                return spec.replace(hostname="from-hook")

        def pytest_sandbox_start(item, spec):
            print(f"\\nSTART {item.name} {spec.hostname}")

        def pytest_sandbox_setup(item, spec):
            os.environ["SET_IN_SANDBOX"] = str(os.getpid())

        def pytest_sandbox_finish(item, spec, reports):
            print(f"\\nFINISH {item.name} {[r.when for r in reports]}")
    """)
    pytester.makepyfile("""
        import os, socket, pytest

        @pytest.mark.container
        def test_renamed():
            assert socket.gethostname() == "from-hook"
            assert os.environ["SET_IN_SANDBOX"] == str(os.getpid())  # the hook ran in the test's own process
    """)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*START test_renamed from-hook*", "*FINISH test_renamed*setup*call*teardown*"])


def test_warnings_reach_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import warnings, pytest

        @pytest.mark.container
        def test_warns():
            warnings.warn("deprecated thing", DeprecationWarning)
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: deprecated thing*"])


def test_sandbox_off_and_plugin_removed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, pytest

        @pytest.mark.container
        def test_runs_on_host():
            assert os.getpid() > 10
    """)
    pytester.runpytest_subprocess("--sandbox=off").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:sandbox", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1)


def test_report_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["sandbox: available *userns ok*"])


@pytest.mark.skipif(os.geteuid() != 0, reason="chowning the rootdir to another user takes root")
def test_root_in_another_users_checkout_is_told_why_its_tests_cannot_write_there(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pathlib

        def test_writes_beside_its_data():
            (pathlib.Path(__file__).parent / "data" / "generated.txt").write_text("x")
    """)
    (pytester.path / "data").mkdir()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    result.assert_outcomes(passed=1)
    assert "owned by uid" not in result.stdout.str()
    for path in (pytester.path, pytester.path / "data"):
        os.chown(path, 1234, 1234)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    result.stdout.fnmatch_lines(["sandbox: running as root in a rootdir owned by uid 1234: *chown -R root*"])
    result.assert_outcomes(failed=1)  # the documented limit: no CAP_DAC_OVERRIDE in a sandbox
    assert pytester.runpytest_subprocess("-p", "no:cacheprovider").ret == 0  # plain root writes there


def test_venv_under_tmp(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An interpreter and sys.path under /tmp (pytester, many CI jobs) stay importable in the sandbox."""
    import subprocess
    import sys
    import venv

    env_dir = tmp_path_factory.mktemp("venvs") / "venv"  # outside the rootdir: only kept visible
    venv.create(env_dir, with_pip=False, symlinks=True)
    lib = next((env_dir / "lib").glob("python3.*")) / "site-packages"
    outer = [p for p in sys.path if p.endswith("site-packages")]
    (lib / "outer.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    (lib / "localmod.py").write_text("VALUE = 42\n")
    pytester.makepyfile("""
        import sys, pytest

        @pytest.mark.container
        def test_imports():
            import localmod
            assert localmod.VALUE == 42
            assert sys.prefix.endswith("venv")
    """)
    proc = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_unserializable_user_properties(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import threading, pytest

        @pytest.mark.container
        def test_props(record_property):
            record_property("lock", threading.Lock())
            record_property("plain", 3)
    """)
    result = pytester.runpytest_subprocess("--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    text = (pytester.path / "out.xml").read_text()
    assert "lock" in text and 'value="3"' in text


def test_large_output_crosses_the_channel(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_big():
            print("x" * 3_000_000)
            assert False
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert sum(len(line) for line in result.outlines) > 3_000_000


def test_pytest_exit_inside_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_stop():
            pytest.exit("enough", returncode=7)

        def test_never():
            pass
    """)
    result = pytester.runpytest_subprocess()
    assert result.ret == 7
    result.stdout.fnmatch_lines(["*enough*"])


def test_no_fd_left_in_pytest_per_sandbox(pytester: pytest.Pytester) -> None:
    """Each sandbox hands pytest its crash memfd with the exit status; pytest must close it whether it
    needed it or not, or a suite past the fd limit dies with EMFILE."""
    pytester.makeconftest("""
        import os, resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        counts = []

        def pytest_runtest_logfinish(nodeid):
            counts.append(len(os.listdir("/proc/self/fd")))

        def pytest_unconfigure(config):
            print(f"FDS first={counts[0]} last={counts[-1]}")
    """)
    pytester.makepyfile("\n".join(f"def test_{i}(): pass" for i in range(150)))
    result = pytester.runpytest_subprocess("--sandbox=all", "-s")
    result.assert_outcomes(passed=150)
    counted = re.search(r"FDS first=(\d+) last=(\d+)", result.stdout.str())
    assert counted, result.stdout.str()
    first, last = int(counted.group(1)), int(counted.group(2))
    assert last <= first + 4, f"pytest holds {last - first} more fds after 150 sandboxes"


RERUNFAILURES_CLIENT = """
import socket


class StatusDB:
    pass


SERVER_ENDS = []  # the controller's, in rerunfailures


class ClientStatusDB(StatusDB):
    # pytest-rerunfailures' database in an xdist worker: a connection to the controller's server.
    def __init__(self):
        self.sock, server_end = socket.socketpair()
        SERVER_ENDS.append(server_end)


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        config.failures_db = ClientStatusDB()
"""


def test_rerunfailures_client_database_is_let_go_quietly(pytester: pytest.Pytester) -> None:
    """In a sandbox the xdist worker's database client (a socket to the controller) is replaced
    by a local one: the dropped client must not warn of an unclosed socket (an error with -W error)."""
    pytest.importorskip("xdist")
    pytester.makeconftest(RERUNFAILURES_CLIENT)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_a(request):
            assert type(request.config.failures_db).__name__ == "StatusDB"
    """)
    result = pytester.runpytest_subprocess("-p", "no:rerunfailures", "-W", "error", "-n", "2")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["plain", "xdist"])
def test_coverage_warnings_stay_at_the_session_end(pytester: pytest.Pytester, xdist: tuple[str, ...]) -> None:
    """Coverage warns when it flushes data it has none of ("No data was collected"): pytest-cov's flush at the
    end warns as without a sandbox; the flushes of a sandbox's coverage (sent, merged) must not, or
    -W error makes every sandboxed test an error (an INTERNALERROR under xdist)."""
    pytest.importorskip("pytest_cov")  # a dev dependency
    if xdist:
        pytest.importorskip("xdist")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_a():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:rerunfailures", "-W", "error", "--cov=nosuchpkg", *xdist)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
