"""Hostile suites under --sandbox=hermetic: conftest.py, collection and tests that attack the supervisor,
the outputs or the host, crash, or outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import processes_with, start_pytest_until_running, wait_gone

from pytest_sandbox.linux import landlock

HERMETIC = "--sandbox=hermetic"


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


def test_a_conftest_cannot_reach_the_supervisor(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import os, signal

        for pid in range(1, 5000):  # every process it can see, its parents included
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    """)
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC)
    # pytest itself is the only process in its namespace it may signal besides the sandbox's pid 1 (which
    # ignores it): the supervisor lives on, outside, and says how the session ended
    assert result.ret in (pytest.ExitCode.OK, 128 + signal.SIGKILL)
    if result.ret == pytest.ExitCode.OK:
        result.assert_outcomes(passed=1)


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["plain", "xdist"])
def test_a_test_cannot_reach_the_memory_of_pytest_in_the_sandbox(
    pytester: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    """The session's pytest, its xdist workers and its zygote are processes of the test's user in its pid
    namespace: were they dumpable, a test would open their /proc/PID/mem (or ptrace them) and change what
    the run reports."""
    pytester.makepyfile("""
        import os

        def _ancestors():
            pid = os.getpid()
            while pid > 1:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
                if pid > 0:
                    yield pid

        def test_no_ancestor_is_open_to_it():
            reached = []
            for pid in _ancestors():
                try:
                    with open(f"/proc/{pid}/mem", "rb"):
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            reached.append((pid, f.read()[:80]))
                except OSError:
                    pass
            assert len(list(_ancestors())) >= 2, "pytest's processes are not this test's ancestors any more"
            assert reached == []
    """)
    pytester.runpytest_subprocess(HERMETIC, "-p", "no:cacheprovider", *xdist).assert_outcomes(passed=1)


def test_tests_of_other_xdist_workers_are_out_of_a_tests_reach(pytester: pytest.Pytester) -> None:
    """The session's xdist workers run their tests side by side in the session's pid namespace, as one user:
    a dumpable test was open to another (pidfd_getfd of its line to pytest, found by a red-team helper,
    forged its result as passed). Under xdist, tests here stay not dumpable."""
    pytester.makepyfile(
        test_a_prober="""
            import os, time

            def test_probe():
                deadline = time.monotonic() + 120
                while not os.path.exists("/tmp/sleeper-pid") and time.monotonic() < deadline:
                    time.sleep(0.05)  # the workers share the session's /tmp (no layer of their own)
                time.sleep(0.2)
                with open("/tmp/sleeper-pid") as f:
                    pid = int(f.read())
                assert os.path.exists(f"/proc/{pid}"), "the other worker's test is not running beside this one"
                for probe in (lambda: open(f"/proc/{pid}/mem", "rb").close(), lambda: os.readlink(f"/proc/{pid}/fd/0")):
                    try:
                        probe()
                    except PermissionError:
                        continue
                    raise AssertionError("the other worker's test is open to this one")
        """,
        test_b_sleeper="""
            import os, time

            def test_sleeps():
                with open("/tmp/sleeper-pid.part", "w") as f:
                    f.write(str(os.getpid()))
                os.rename("/tmp/sleeper-pid.part", "/tmp/sleeper-pid")
                time.sleep(5)
        """,
    )
    result = pytester.runpytest_subprocess(HERMETIC, "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=2)


@pytest.mark.skipif(landlock.unavailable_reason() is not None, reason=str(landlock.unavailable_reason()))
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["plain", "xdist"])
def test_a_test_cannot_stop_kill_or_call_what_runs_the_session(
    pytester: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    """pytest in the session's sandbox, its zygote, its layer helper and the sandbox's first processes share
    the tests' pid namespace and user: a test that stopped them hung the run, one that killed them ended it.
    Each sandbox of the session is a Landlock domain: signals, ptrace and abstract sockets stay inside it."""
    pytester.makeconftest("""
        import socket

        LISTENER = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # bound by pytest itself, at collection (under xdist by the first of its processes)
            LISTENER.bind("\\0pytest-sandbox-conftest-listener")
            LISTENER.listen()
        except OSError:
            pass
    """)
    pytester.makepyfile("""
        import os, signal, socket

        def test_stops_and_kills_every_process_it_sees():
            mine = {os.getpid(), os.getppid()}  # itself, and the scope process it is a fork of
            reached = []
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) not in mine:
                    for signum in (signal.SIGSTOP, signal.SIGKILL):
                        try:
                            os.kill(int(name), signum)
                            reached.append((int(name), signum))
                        except (PermissionError, ProcessLookupError):
                            pass
            assert len(os.listdir("/proc")) > 3, "no process of the session is in sight"
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect("\\0pytest-sandbox-conftest-listener")
                reached.append("pytest's abstract socket")
            except PermissionError:
                pass
            assert reached == []

        def test_after():
            pass
    """)
    result = pytester.runpytest_subprocess(HERMETIC, "-p", "no:cacheprovider", *xdist, timeout=120)
    result.assert_outcomes(passed=2)


def test_outputs_cannot_be_symlinks_out_of_them(pytester: pytest.Pytester, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    pytester.makeini("[pytest]\nsandbox_outputs = results\n")
    pytester.makepyfile(f"""
        import os

        def test_plants_links():
            os.makedirs("results", exist_ok=True)
            os.symlink({str(target)!r}, "results/escape")
            os.symlink({str(target / "file")!r}, "results/file-link")
            os.makedirs("results/sub", exist_ok=True)
            open("results/sub/ok.txt", "w").write("ok")
            os.symlink({str(target)!r}, ".pytest_cache")  # the cache directory itself a link, in the sandbox
    """)
    result = pytester.runpytest_subprocess(HERMETIC)
    result.assert_outcomes(passed=1)
    assert (pytester.path / "results" / "sub" / "ok.txt").read_text() == "ok"
    assert not (pytester.path / "results" / "escape").exists()
    assert list(target.iterdir()) == []  # nothing written through any link


def test_killing_the_supervisor_leaves_nothing(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, time

        def test_hangs():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", {token!r}],
                             start_new_session=True)
            print("RUNNING", flush=True)
            time.sleep(1000)
    """)
    proc = start_pytest_until_running(pytester.path, token, args=(HERMETIC,))
    assert len(processes_with(token)) >= 3  # the supervisor, pytest in the sandbox, the test's daemon
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []


def test_interrupt_reaches_pytest_in_the_sandbox(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, time

        def test_waits():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", {token!r}])
            print("RUNNING", flush=True)
            time.sleep(1000)
    """)
    proc = start_pytest_until_running(pytester.path, token, args=(HERMETIC,))
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    assert wait_gone(token) == []


def _leave_a_process_and_crash(token: str) -> str:
    """Code that starts a daemon named by ``token``, then segfaults."""
    return f"""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", {token!r}], start_new_session=True)
    ctypes.string_at(0)
"""


def test_a_crashing_test_is_reported_and_the_rest_run(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(
        "import ctypes, subprocess, sys\n\ndef test_segfaults():"
        + textwrap.indent(_leave_a_process_and_crash(token), "    ")
        + "\ndef test_after():\n    pass\n"
    )
    result = pytester.runpytest_subprocess(HERMETIC)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*sandbox crashed: SIGSEGV*", "*Fatal Python error: Segmentation fault*"])
    assert wait_gone(token) == []


def test_a_crash_of_pytest_in_the_sandbox_is_reported_and_contained(pytester: pytest.Pytester, token: str) -> None:
    pytester.makeconftest(
        "import ctypes, subprocess, sys\n\ndef pytest_sessionfinish():"
        + textwrap.indent(_leave_a_process_and_crash(token), "    ")
    )
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC)
    assert result.ret == 128 + signal.SIGSEGV
    result.stderr.fnmatch_lines(["*Fatal Python error: Segmentation fault*", "*killed by SIGSEGV*"])
    assert wait_gone(token) == []


def test_pytest_in_the_sandbox_never_holds_the_users_terminal(pytester: pytest.Pytester) -> None:
    """Its output goes to a pseudo-terminal of the supervisor's: TIOCSTI there pushes input to a terminal only
    the supervisor reads from, never into the user's shell."""
    pytester.makepyfile("""
        import fcntl, os, termios

        def test_injects():
            assert os.isatty(1)
            print("INNER-TTY", os.fstat(1).st_rdev)
            for byte in b"touch /tmp/pytest-sandbox-injected\\n":
                try:
                    fcntl.ioctl(1, termios.TIOCSTI, bytes([byte]))
                except OSError:
                    break
    """)
    launch = (
        "import os, sys; print('OUTER-TTY', os.fstat(1).st_rdev, flush=True); "
        "os.execv(sys.executable, [sys.executable, '-m', 'pytest', '-s', '-p', 'no:cacheprovider', sys.argv[1]])"
    )
    script = "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)"
    run = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-c", launch, HERMETIC],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert "1 passed" in run.stdout, run.stdout + run.stderr
    outer = run.stdout.split("OUTER-TTY ")[1].split()[0]
    inner = run.stdout.split("INNER-TTY ")[1].split()[0]
    assert outer != inner
    assert not os.path.exists("/tmp/pytest-sandbox-injected")


def test_a_projects_symlink_cannot_send_outputs_elsewhere(pytester: pytest.Pytester, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (pytester.path / "build").symlink_to(victim)
    pytester.makeconftest("""
        import os

        def pytest_unconfigure(config):
            os.unlink("build")
            os.makedirs("build/reports")
            open("build/reports/junit.xml", "w").write("<testsuites/>")
    """)
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC, "--junitxml=build/reports/junit.xml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the output */build/reports/junit.xml goes through the symlink */build*"])
    assert list(victim.iterdir()) == []


def test_outputs_stay_out_of_git_and_out_of_home(pytester: pytest.Pytester) -> None:
    (pytester.path / ".git" / "hooks").mkdir(parents=True)
    pytester.makepyfile("def test_a(): pass")
    pytester.makeini("[pytest]\nsandbox_outputs = .git/hooks\n")
    result = pytester.runpytest_subprocess(HERMETIC)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the output */.git/hooks lies in a .git directory*"])
    pytester.makeini("[pytest]\naddopts = --junitxml=../profile-by-pytest-sandbox-test\n")  # the project's ini
    result = pytester.runpytest_subprocess(HERMETIC)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the output *profile-by-pytest-sandbox-test lies outside the rootdir*"])
    assert not (pytester.path.parent / "profile-by-pytest-sandbox-test").exists()


def test_a_project_plugin_imported_before_the_takeover_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p project_plugin\n")
    pytester.makepyfile(project_plugin="RAN = True", test_a="def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC)  # python -m pytest: the cwd is on sys.path
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the plugin project_plugin (*project_plugin.py) is this project's code*"])


def test_outputs_the_supervisor_cannot_take_do_not_hang_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_outputs = results\n")
    pytester.makepyfile("""
        import os

        def test_writes():
            os.makedirs("results/deep", exist_ok=True)
            with open("results/" + "n" * 250, "w") as f:
                f.write("a long name")
            with open("results/unreadable", "w") as f:
                f.write("x")
            os.chmod("results/unreadable", 0)
            with open("results/deep/huge.bin", "wb") as f:
                f.truncate(100 * 2**20)  # past the largest output file carried
    """)
    result = pytester.runpytest_subprocess("-W", "error", HERMETIC)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    assert (pytester.path / "results" / ("n" * 250)).read_text() == "a long name"
    assert not (pytester.path / "results" / "deep" / "huge.bin").exists()
    result.stdout.fnmatch_lines(["*the output */results/deep/huge.bin is not carried: 104857600 bytes, past 67108864"])


def test_an_output_that_is_the_whole_rootdir_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ncache_dir = .\n")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess(HERMETIC)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the output * is all of *: name a file or directory there"])


def test_a_file_as_stdin_is_read_but_cannot_be_written(pytester: pytest.Pytester, tmp_path: Path) -> None:
    given = tmp_path / "input.txt"
    given.write_text("hello from a file\n")
    pytester.makepyfile("""
        import os, sys

        def test_reads_and_tries_to_write():
            assert sys.stdin.read() == "hello from a file\\n"
            try:
                with open("/proc/self/fd/0", "w") as again:
                    again.write("overwritten")
            except OSError:
                pass
    """)
    with open(given) as stdin:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", HERMETIC],
            cwd=pytester.path,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert "1 passed" in run.stdout, run.stdout + run.stderr
    assert given.read_text() == "hello from a file\n"


def test_a_closed_stdin_is_no_trouble(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    closes_stdin = "import os, sys; os.close(0); os.execv(sys.executable, sys.argv[1:])"
    run = subprocess.run(
        [sys.executable, "-c", closes_stdin, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", HERMETIC],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_the_projects_ini_cannot_widen_the_sessions_sandbox(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team round 33: under this mode the project is what is not trusted, yet its ini file opened the
    host's network, let credential variables through, took the mask off ~/.ssh and bound a host directory
    in read/write (a conftest.py appended to a real ~/.bashrc). Only the user's command line may."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (pytester.path / ".ssh").mkdir()
    (pytester.path / ".ssh" / "id_rsa").write_text("PRIVATE-KEY")
    pytester.makeini(f"""
        [pytest]
        addopts = --sandbox-network=host
        sandbox_env_pass = *
        sandbox_hide = !~/.ssh
        sandbox_volumes =
            {victim}=/mnt/victim:rw
    """)
    pytester.makepyfile("""
        import os, socket

        def test_nothing_widened():
            assert socket.if_nameindex() == [(1, "lo")]
            assert "HERMETIC_RED_TEAM_TOKEN" not in os.environ
            assert not os.path.exists(os.path.expanduser("~/.ssh/id_rsa"))  # ~/.ssh is an empty directory
            assert not os.path.exists("/mnt/victim")
    """)
    monkeypatch.setenv("HERMETIC_RED_TEAM_TOKEN", "secret")
    result = pytester.runpytest_subprocess(HERMETIC, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stderr.fnmatch_lines(
        ["*ignored the project's sandbox_network, sandbox_env_pass, sandbox_volumes, sandbox_hide (its ! entries)*"]
    )
    assert list(victim.iterdir()) == []
    # The user's own command line still can: the variable is passed when the user says so.
    pytester.makepyfile("""
        import os

        def test_passed():
            assert os.environ["HERMETIC_RED_TEAM_TOKEN"] == "secret"
    """)
    result = pytester.runpytest_subprocess(
        HERMETIC, "-p", "no:cacheprovider", "-o", "sandbox_env_pass=HERMETIC_RED_TEAM_TOKEN"
    )
    result.assert_outcomes(passed=1)


def test_pytest_sandbox_hermetic_keeps_the_plugin_the_project_switches_off(pytester: pytest.Pytester) -> None:
    """Red team round 33: a project's ini can switch the plugin off (addopts = -p no:sandbox); pytest then
    loads its conftest.py on the host before it finds --sandbox=hermetic unknown (or a conftest.py that adds
    the option takes it). `pytest-sandbox hermetic` names the plugin on the command line, after the ini's
    addopts, so it loads and takes over before any conftest.py."""
    marker = pytester.path.parent / f"conftest-ran-on-the-host-{os.getpid()}"
    pytester.makeini("""
        [pytest]
        addopts = -p no:sandbox -p no:pytest_sandbox.plugin
    """)
    pytester.makeconftest(f"open({str(marker)!r}, 'w').close()")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.run(sys.executable, "-m", "pytest_sandbox", "hermetic", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox: hermetic*"])
    assert not marker.exists()


def test_a_fall_back_after_collection_is_not_heard(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The project's code reaches the collection line of --sandbox=all too: a fall-back it sends once the run
    has settled (here at its very end, also from a process that outlives pytest) would run the suite a second
    time on the host, after the first, and carry the discarded run's outputs (found by red-team helper-36)."""
    pytester.makeini("[pytest]\nsandbox_outputs = out\n")
    pytester.makeconftest("""
        import json, os, socket
        from pytest_sandbox import hermetic

        def pytest_configure(config):
            line = config.stash.get(hermetic._COLLECTION_LINE, None)
            if line is not None:
                config._stolen = os.dup(line.fileno())

        def pytest_unconfigure(config):
            stolen = getattr(config, "_stolen", None)
            if stolen is not None:
                os.makedirs("out", exist_ok=True)
                open("out/from-the-sandbox.txt", "w").write("x")
                message = json.dumps({"type": "fall-back", "reason": "LATE"}).encode()
                try:
                    socket.socket(fileno=stolen).send(message)
                except OSError:
                    pass
    """)
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert out.count("test session starts") == 1
    assert "collection runs on the host" not in out and "LATE" not in out
    assert (pytester.path / "out" / "from-the-sandbox.txt").exists()  # the run was the sandbox's, carried once


@pytest.mark.parametrize("mode", ["--sandbox=all", HERMETIC])
def test_an_output_the_project_names_outside_the_rootdir_is_not_written_there(
    pytester: pytest.Pytester, tmp_path: Path, mode: str
) -> None:
    """Started from a directory above the project (the user's $HOME, say), the project's addopts named a file
    there as --junitxml (~/.bashrc) and its conftest.py wrote it: outputs may lie in the start directory,
    so the sandboxed run carried it (found by red-team helper-36). The project may name outputs only in its
    rootdir: --sandbox=all collects on the host instead (as a plain run does, it writes what the project
    asks), --sandbox=hermetic refuses; the user's own command line may still name one there."""
    home = tmp_path / "home"
    project = home / "proj"
    project.mkdir(parents=True)
    (home / ".bashrc").write_text("ORIGINAL\n")
    (project / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider --junitxml=~/.bashrc\n")
    (project / "conftest.py").write_text(
        "import os\n\ndef pytest_unconfigure(config):\n"
        "    open(os.path.expanduser(config.option.xmlpath), 'w').write('echo PLANTED\\n')\n"
    )
    (project / "test_a.py").write_text("def test_a(): pass\n")
    env = {**os.environ, "HOME": str(home)}
    command = [sys.executable, "-m", "pytest", mode, "proj"]
    run = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=300)
    if mode == HERMETIC:
        assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
        assert "was named by the project (its ini file or addopts), not on your command line" in run.stderr
        assert (home / ".bashrc").read_text() == "ORIGINAL\n"
    else:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "sandbox: collection runs on the host, each test in a sandbox: the output" in run.stdout
    # The user's own --junitxml in the start directory is an output of the sandboxed run, written there.
    (home / ".bashrc").write_text("ORIGINAL\n")
    (project / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (project / "conftest.py").write_text("")
    mine = [sys.executable, "-m", "pytest", mode, "--junitxml=mine.xml", "proj"]
    run = subprocess.run(mine, cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "collection runs on the host" not in run.stdout
    assert 'tests="1"' in (home / "mine.xml").read_text()
