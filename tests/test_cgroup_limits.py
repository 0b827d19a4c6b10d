"""Real enforcement through cgroups (v1 as root or delegated here; v2 in the guest lane).

Set PYTEST_SANDBOX_CGROUP to a delegated cgroup to run these as a plain user.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest
from helpers import start_pytest_until_running, wait_gone

from pytest_sandbox.runtime import cgroups


def _backend() -> cgroups.Backend:
    return cgroups.choose("auto", os.environ.get("PYTEST_SANDBOX_CGROUP"), os.getcwd())


BACKEND = _backend()
pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        isinstance(BACKEND, cgroups.Rlimits),
        reason=f"host gives this user no writable cgroup: {getattr(BACKEND, 'reason', '')}",
    ),
]


def _no_session_cgroups_left() -> list[str]:
    left = []
    for root, dirs, _ in os.walk(cgroups.CGROUP_ROOT):
        # pytest's own leaf (a delegated v2 cgroup cannot hold pytest and sandboxes side by side) stays
        left += [
            os.path.join(root, d)
            for d in dirs
            if d.startswith(f"{cgroups.SESSION_PREFIX}{os.getpid()}") and not d.endswith("-pytest")
        ]
        if root.count("/") > 6:
            dirs.clear()
    return left


def test_memory_limit_oom_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(memory="64M")
        def test_hog():
            data = bytearray(200 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1

        @pytest.mark.container(memory="64M")
        def test_fits():
            data = bytearray(16 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*killed by the OOM killer: memory limit 64.0 MiB, peak 6*.* MiB*"])


def test_pids_limit_stops_a_fork_loop(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, pytest

        SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)", {token!r}]

        @pytest.mark.container(pids=16)
        def test_fork_loop():
            started = 0
            with pytest.raises(BlockingIOError):
                for _ in range(100):
                    subprocess.Popen(SLEEPER)
                    started += 1
            assert started < 16

        @pytest.mark.container(pids=16)
        def test_fork_loop_fails():
            for _ in range(100):
                subprocess.Popen(SLEEPER)
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*sandbox limits*", "*the pids limit 16 refused * fork(s)*"])
    assert wait_gone(token, timeout=2) == []


def test_cpu_limit_throttles_a_busy_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(cpus=0.2)
        def test_busy():
            start, cpu = time.monotonic(), time.process_time()
            while time.monotonic() - start < 2:
                pass
            ratio = (time.process_time() - cpu) / (time.monotonic() - start)
            print(f"cpu seconds per wall second: {ratio:.2f}")
            assert ratio <= 0.3
    """)
    result = pytester.runpytest_subprocess("--sandbox-durations=0", "-s")
    result.assert_outcomes(passed=1)
    lines = [line for line in result.outlines if line.endswith("test_busy")]
    throttled = float(lines[0].split()[3].rstrip("s"))
    assert throttled > 0.5, lines


def test_children_gone_and_cgroups_removed(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(f"""
        import subprocess, sys, pytest

        @pytest.mark.container(memory="128M", pids=64, cpus=1)
        def test_spawns():
            for _ in range(5):
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {token!r}],
                                 start_new_session=True)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert wait_gone(token, timeout=2) == []
    assert _no_session_cgroups_left() == []


def _session_dirs(pid: int) -> list[str]:
    """The session cgroup directories of the pytest process ``pid`` (one per hierarchy)."""
    name = f"{cgroups.SESSION_PREFIX}{pid}"
    return [path for path, _, _ in os.walk(cgroups.CGROUP_ROOT) if os.path.basename(path) == name]


def _wait_no_session_dirs(pid: int) -> list[str]:
    """The session's cgroups left after a wait, each with what is in it and below it (empty when none is)."""
    deadline = time.monotonic() + 60  # a bound, not a speed goal: the cgroup v2 guest runs Python ~8x slower
    while (left := _session_dirs(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{path}: {_what_holds(path)}" for path in left]


def _kill_after(pytester: pytest.Pytester, token: str, word: str, delay: float = 0.0) -> None:
    """Run a sandboxed test with limits and ``kill -9`` pytest ``delay`` s after it printed ``word`` (the test's
    conftest prints it): no process of its and none of its cgroups may be left."""
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(memory="128M")
        def test_waits():
            time.sleep(600)
    """)
    proc = start_pytest_until_running(pytester.path, token, word=word)
    assert _session_dirs(proc.pid)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    assert _wait_no_session_dirs(proc.pid) == [], _rest_of_output(proc)


def _rest_of_output(proc: subprocess.Popen[str]) -> str:
    """What a killed pytest's processes wrote after the word the test waited for (the zygote-parent says which
    cgroups it could not remove), as far as it comes within a few seconds."""
    assert proc.stdout is not None
    fd, chunks, deadline = proc.stdout.fileno(), [], time.monotonic() + 5
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _what_holds(path: str) -> str:
    """The processes in a cgroup tree and its groups, for a failure message; this user's processes too."""
    held = []
    for root, _subdirs, _ in os.walk(path):
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError as exc:
            pids = [f"unreadable ({exc.strerror})"]
        held.append(f"{os.path.relpath(root, path)} {pids}")
    mine = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == os.getuid():
                with open(f"/proc/{entry}/stat") as f:
                    mine.append(f.read().split(")")[0].split(" (")[1] + f"[{entry}]")
        except OSError:
            pass
    return f"groups {held}; this user's processes {mine}"


def test_pytest_killed_removes_its_cgroups(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(memory="128M")
        def test_waits():
            print("RUNNING", flush=True)
            time.sleep(600)
    """)
    proc = start_pytest_until_running(pytester.path, token)
    assert _session_dirs(proc.pid)
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    assert _wait_no_session_dirs(proc.pid) == [], _rest_of_output(proc)


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_pytest_killed_while_its_sandboxes_start_removes_its_cgroups(
    pytester: pytest.Pytester, token: str, delay: float
) -> None:
    """Killed while the zygote starts or builds the first sandbox (each delay lands in another step): the
    zygote then fails on pytest's closed socket before the kernel tells its parent that pytest died."""
    pytester.makeconftest("""
        def pytest_sandbox_start(item, spec):
            print("STARTING", flush=True)
    """)
    _kill_after(pytester, token, "STARTING", delay)


def test_pytest_killed_while_the_zygote_maps_its_ids_removes_its_cgroups(pytester: pytest.Pytester, token: str) -> None:
    """The zygote-parent removes the session's cgroups when pytest dies. Between its unshare of the user
    namespace and the writing of the id maps its ids are unmapped and it may not rmdir anything: pytest's
    death in that window (the CI guest lane's slow interpreter hit it) must wait for the maps. The conftest
    holds the zygote-parent in the window (it is a fork of pytest, so the patch is there too)."""
    pytester.makeconftest("""
        import time
        from pytest_sandbox.linux import syscalls

        real_unshare = syscalls.unshare

        def slow_unshare(flags):
            real_unshare(flags)
            with open("/proc/self/comm") as f:
                zygote_parent = f.read().strip() == "sandbox-zygote"
            if zygote_parent and flags & syscalls.CLONE_NEWUSER:
                print("UNSHARED", flush=True)
                time.sleep(2)

        syscalls.unshare = slow_unshare
    """)
    _kill_after(pytester, token, "UNSHARED")


def test_pytest_killed_before_it_forks_a_zygote_removes_its_cgroups(pytester: pytest.Pytester, token: str) -> None:
    """The session cgroup exists before any zygote-parent does (and between one zygote and the next): a pytest
    killed then has no zygote-parent to clean up after it, so the session's keeper does."""
    pytester.makeconftest("""
        import time
        from pytest_sandbox import session

        real_zygote = session.Zygote

        def slow_zygote(*args, **kwargs):
            print("FORKING", flush=True)
            time.sleep(2)
            return real_zygote(*args, **kwargs)

        session.Zygote = slow_zygote
    """)
    _kill_after(pytester, token, "FORKING")


def test_pytest_killed_while_a_test_holds_set_id_files_in_a_volume_clears_them(
    pytester: pytest.Pytester, token: str
) -> None:
    """A test makes a set-user-ID program in its read/write volume (a host directory: root's would be a
    set-user-ID root program there) and pytest is killed before the test ends, so pytest cannot clear the
    bits: the session's keeper does, once the sandbox is gone, and says so."""
    volume = pytester.path / "vol"
    volume.mkdir()
    (volume / "plain").write_text("x")
    pytester.makepyfile(f"""
        import os, shutil, time, pytest

        @pytest.mark.container(volumes={{"./vol": "/tmp/{token}"}})
        def test_plants():
            os.mkdir("/tmp/{token}/deeper")
            for path in ("/tmp/{token}/prog", "/tmp/{token}/deeper/prog", "/tmp/{token}/new\\nline"):
                shutil.copy("/bin/sh", path)
                os.chmod(path, 0o6755)
            os.symlink("/bin/sh", "/tmp/{token}/link")
            print("RUNNING", flush=True)
            time.sleep(600)
    """)
    proc = start_pytest_until_running(pytester.path, token)
    assert (volume / "prog").stat().st_mode & 0o6000 == 0o6000  # the test runs with its bits set
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    assert _wait_no_session_dirs(proc.pid) == [], _rest_of_output(proc)
    deadline = time.monotonic() + 60  # a bound: the keeper clears once the cgroups are gone
    while (volume / "deeper/prog").stat().st_mode & 0o6000 and time.monotonic() < deadline:
        time.sleep(0.1)
    rest = _rest_of_output(proc)
    assert [oct((volume / name).stat().st_mode & 0o7777) for name in ("prog", "deeper/prog")] == ["0o755"] * 2, rest
    assert os.stat("/bin/sh").st_mode & 0o6000 == 0  # the symlink was not followed
    assert "set-id bits cleared after pytest died:" in rest and "deeper/prog" in rest
    assert "new\\nline'" in rest  # named as repr() does: a name cannot write lines of its own


def test_stress_overrides_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.container(cpus=4)
        def test_busy():
            start, cpu = time.monotonic(), time.process_time()
            while time.monotonic() - start < 1:
                pass
            assert (time.process_time() - cpu) / (time.monotonic() - start) <= 0.3
    """)
    pytester.runpytest_subprocess("--sandbox-stress=cpus=0.2").assert_outcomes(passed=1)


@pytest.mark.skipif("io" not in BACKEND.enforced, reason="the rootdir is not on a block device this host can throttle")
def test_io_limit_throttles_direct_reads(pytester: pytest.Pytester) -> None:
    big = max(
        (
            os.path.join(d, f)
            for d, _, files in os.walk("/usr/lib")
            for f in files
            if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
        ),
        key=lambda p: os.path.getsize(p),
    )
    assert os.path.getsize(big) > 8 * 2**20, big
    pytester.makepyfile(f"""
        import mmap, os, time, pytest

        @pytest.mark.container(io={{"read_bps": "2M"}})
        def test_read():
            buf = mmap.mmap(-1, 1 << 20)
            fd = os.open({big!r}, os.O_RDONLY | os.O_DIRECT)
            start, done = time.monotonic(), 0
            while done < 6 * 2**20:
                done += os.readv(fd, [buf])
            rate = done / (time.monotonic() - start)
            print(f"read {{rate / 2**20:.1f}} MiB/s")
            assert rate < 3 * 2**20
    """)
    pytester.runpytest_subprocess("-s").assert_outcomes(passed=1)


def test_limits_under_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        @pytest.mark.container(memory="64M", pids=32)
        def test_small(n):
            bytearray(8 * 1024 * 1024)

        @pytest.mark.container(memory="64M")
        def test_hog():
            data = bytearray(200 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*killed by the OOM killer: memory limit 64.0 MiB*"])


def _cgroup_dirs_named(token: str) -> list[str]:
    found = []
    for root, dirs, _ in os.walk(cgroups.CGROUP_ROOT):
        found += [os.path.join(root, d) for d in dirs if token in d]
        if root.count("/") > 10:
            dirs.clear()
    return found


def test_a_test_cannot_lift_its_limits_nor_leave_cgroups_behind(pytester: pytest.Pytester, token: str) -> None:
    """The test mounts cgroup2 in namespaces of its own (or uses what cgroup mounts it sees), makes cgroups
    wherever it can and tries to lift its limits there: the memory limit still holds, and when the session
    ends no cgroup it made is left."""
    parents = sorted(set(getattr(BACKEND, "bases", {}).values()))
    before = {p: set(os.listdir(p)) for p in parents}
    pytester.makepyfile(f"""
        import ctypes, os, pytest

        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWCGROUP = 0x00020000, 0x10000000, 0x02000000

        def reachable():
            '''cgroup dirs this process reaches: its cgroup mounts, and a cgroup2 it mounts itself.'''
            places = [line.split()[4] for line in open("/proc/self/mountinfo") if " - cgroup" in line]
            uid, gid = os.getuid(), os.getgid()
            if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP) == 0:
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")):
                    try:  # root may not map uid 0 without CAP_SETFCAP; the capabilities hold anyway
                        with open(f"/proc/self/{{name}}", "w") as f:
                            f.write(text)
                    except OSError:
                        pass
            elif libc.unshare(CLONE_NEWNS | CLONE_NEWCGROUP) != 0:
                return places
            libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE
            os.makedirs("/tmp/cg2", exist_ok=True)
            if libc.mount(b"none", b"/tmp/cg2", b"cgroup2", 0, None) == 0:
                places.append("/tmp/cg2")
            return places

        @pytest.mark.container(memory="64M", pids=64)
        def test_escapes():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                made, lifted = [], []
                for place in reachable():
                    for sub in ("", "/a"):
                        try:
                            os.mkdir(f"{{place}}{{sub}}/{token}-x")
                            os.mkdir(f"{{place}}{{sub}}/{token}-x/{token}-deeper")
                            made.append(place + sub)
                        except OSError:
                            pass
                    for name in ("memory.max", "memory.limit_in_bytes", "pids.max"):
                        try:
                            with open(f"{{place}}/{{name}}", "w") as f:
                                f.write("max" if "max" in name else "-1")
                            lifted.append(f"{{place}}/{{name}}")
                        except OSError:
                            pass
                os.write(w, repr((made, lifted)).encode())
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            print("REACHED", os.read(r, 65536).decode(), flush=True)
            data = bytearray(200 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*REACHED *", "*killed by the OOM killer: memory limit 64.0 MiB*"])
    assert _cgroup_dirs_named(token) == []
    assert _no_session_cgroups_left() == []
    for parent in parents:  # nothing new but other sessions still running (xdist workers of this suite)
        new = set(os.listdir(parent)) - before[parent]
        assert all(e.startswith(cgroups.SESSION_PREFIX) and os.path.exists(f"/proc/{e.split('-')[2]}") for e in new)


SERVICE_UNDER_LIMITS = """
    import sys
    from pytest_sandbox import service, wait

    PY = sys.executable
    hog = service("hog", command=[PY, "-c", "import time; print('up', flush=True); time.sleep(300)"],
                  memory="64M", ready=wait.log("^up$"))

    def test_memory(hog):
        done = hog.exec([PY, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('survived')"])
        assert "survived" not in done.stdout and done.returncode != 0, done
        assert hog.running  # the exec'd hog was killed, not the service

    def test_cpu(hog):  # CPU seconds per wall second of a busy loop (the interpreter's start left out)
        code = ("import time\\nstart, cpu = time.monotonic(), time.process_time()\\n"
                "while time.monotonic() - start < 2: pass\\n"
                "print((time.process_time() - cpu) / (time.monotonic() - start))")
        assert float(hog.exec([PY, "-c", code]).stdout) <= 0.3
"""


def test_a_service_runs_under_its_limits_and_a_stress_runs(pytester: pytest.Pytester) -> None:
    """A service's own memory limit, and --sandbox-stress's cpus, hold for it and for what exec() runs in it
    (its cgroup); readiness still comes (wait.log) under a fifth of a CPU."""
    pytester.makepyfile(test_hog=SERVICE_UNDER_LIMITS)
    result = pytester.runpytest_subprocess("--sandbox-stress=cpus=0.2", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
