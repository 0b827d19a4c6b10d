"""Red-team findings: attacks on the sandbox that succeed today, each as a failing test.

Same scheme as test_hostile.py (whose helpers it uses): a sandboxed test attacks, the host checks
from the outside. Every probe is harmless to the machine: markers carry a fresh uuid and are
removed, the keyring the probe reads and writes is a fresh session keyring of the outer test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import socket
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hostile import Run, _check, _run, _source, xdist

from pytest_sandbox.runtime import cgroups

__all__ = ["xdist"]  # the fixture every hostile test is parametrized with

# -- 1. the session keyring: pytest's, shared with the sandbox ------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_ADD_KEY, SYS_KEYCTL = 248, 250  # x86_64
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_READ = 0, 1, 11
KEY_SPEC_SESSION_KEYRING = -3


def _keyctl(*args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(SYS_KEYCTL, *converted))
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def _keyring_ids(keyring: int) -> list[int]:
    buf = ctypes.create_string_buffer(4096)
    size = _keyctl(KEYCTL_READ, keyring, buf, 4096)
    return [int.from_bytes(buf.raw[i : i + 4], "little") for i in range(0, min(size, 4096), 4)]


def _describe(key: int) -> str:
    buf = ctypes.create_string_buffer(4096)
    _keyctl(6, key, buf, 4096)  # KEYCTL_DESCRIBE: "type;uid;gid;perm;description"
    return buf.value.decode(errors="replace")


@pytest.fixture
def session_keyring() -> Iterator[int]:
    """A fresh anonymous session keyring for this test process (and the pytest it starts)."""
    _keyctl(KEYCTL_JOIN_SESSION_KEYRING, None)  # this process keeps it (holding only uuid-named keys)
    yield _keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)


KEYRING = """
SECRET_NAME = __SECRET_NAME__
HOST_SESSION = __HOST_SESSION__
PLANTED = __PLANTED__
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


@pytest.mark.container
def test_attack():
    session = libc.syscall(250, ctypes.c_long(0), ctypes.c_long(-3), ctypes.c_long(0))  # GET_KEYRING_ID @s
    found = []
    buf = ctypes.create_string_buffer(4096)
    size = libc.syscall(250, ctypes.c_long(11), ctypes.c_long(session), buf, ctypes.c_long(4096))
    for i in range(0, max(size, 0), 4):
        key = int.from_bytes(buf.raw[i:i + 4], "little")
        desc, payload = ctypes.create_string_buffer(4096), ctypes.create_string_buffer(4096)
        libc.syscall(250, ctypes.c_long(6), ctypes.c_long(key), desc, ctypes.c_long(4096))
        n = libc.syscall(250, ctypes.c_long(11), ctypes.c_long(key), payload, ctypes.c_long(4096))
        if SECRET_NAME.encode() in desc.value:
            found.append(f"read the host's key {desc.value.decode()!r}: {payload.raw[:max(n, 0)]!r}")
    if libc.syscall(248, b"user", PLANTED.encode(), b"x", ctypes.c_size_t(1), ctypes.c_long(session)) > 0:
        if session == HOST_SESSION:
            found.append(f"added key {PLANTED!r} to the host's session keyring")
    assert not found, f"uid {os.getuid()}, session keyring {session}: " + "; ".join(found)
"""


def test_session_keyring_is_the_hosts(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...], session_keyring: int
) -> None:
    """The test process keeps pytest's session keyring (keyrings go with credentials, not namespaces, and
    /proc/keys being masked does not stop keyctl): it reads the host's keys (Kerberos tickets, cifs/nfs
    credentials, secrets a CI agent keeps there) and adds or clears keys that outlive the sandbox.
    Fix: join a fresh anonymous session keyring (keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)) in the builder,
    as runc and systemd-nspawn do, before the test process exists."""
    secret_name, secret = f"hostile-secret-{uuid.uuid4().hex}", f"payload-{uuid.uuid4().hex}".encode()
    planted = f"hostile-planted-{uuid.uuid4().hex}"
    key = _libc.syscall(
        SYS_ADD_KEY, b"user", secret_name.encode(), secret, ctypes.c_size_t(len(secret)), ctypes.c_long(session_keyring)
    )
    assert key > 0, f"add_key: {os.strerror(ctypes.get_errno())}"
    run = _run(
        pytester,
        monkeypatch,
        _source(KEYRING, secret_name=secret_name, planted=planted, host_session=session_keyring),
        *xdist,
    )
    after = [_describe(k) for k in _keyring_ids(session_keyring)]
    problems = run.session_problems()
    if any(planted in d for d in after):
        problems.insert(0, f"keyring: the sandboxed test added {planted!r} to the host's session keyring: {after}")
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"keyring: {run.inner_failure()}")
    _check(problems)


LEFT_KEYS = """
import ctypes, pytest

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SESSION, USER, USER_SESSION = -3, -4, -5


def keyctl(*args):
    return libc.syscall(250, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])


def rings():
    return {"persistent": keyctl(22, -1, SESSION), "user": USER, "user-session": USER_SESSION}  # 22: GET_PERSISTENT


@pytest.mark.container(hostname="first")
def test_leaves_keys():
    for name, ring in rings().items():
        assert libc.syscall(248, b"user", f"left-{name}".encode(), b"x", ctypes.c_size_t(1), ctypes.c_long(ring)) > 0


@pytest.mark.container(hostname="second")
def test_finds_none():
    found = [name for name, ring in rings().items() if keyctl(10, ring, b"user", f"left-{name}".encode(), 0) >= 0]
    assert found == [], f"keys an earlier sandbox left in the {found} keyrings"
"""


def test_keys_a_test_leaves_in_the_users_keyrings_are_not_the_next_sandboxs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user, user-session and persistent keyrings belong to the user namespace, which every sandbox of
    the session shares: each sandbox empties them before its test. The host's own keyrings are other ones
    and keep their keys."""
    mine = f"host-key-{uuid.uuid4().hex}"
    key = _libc.syscall(SYS_ADD_KEY, b"user", mine.encode(), b"x", ctypes.c_size_t(1), ctypes.c_long(-4))
    assert key > 0, f"add_key: {os.strerror(ctypes.get_errno())}"
    try:
        run = _run(pytester, monkeypatch, _source(LEFT_KEYS))
        assert run.outcome("test_leaves_keys") == "PASSED", run.inner_failure()
        assert run.outcome("test_finds_none") == "PASSED", run.inner_failure()
        assert key in _keyring_ids(-4), "the host user's keyring lost its key"
    finally:
        _keyctl(9, key, -4)  # KEYCTL_UNLINK


# -- 2. root's commands namespace: every capability again ----------------------------------------

COMMANDS_NS = """
SECRET = __SECRET__
CGROUP = __CGROUP__


def user_namespace_fds():
    found = []
    for fd, link in fd_links().items():
        if link.startswith("user:["):
            found.append(fd)
    return found


def other_processes_user_namespaces():
    # fds of the user namespaces of every other process this test sees: its commands, their launcher
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                found.append(os.open(f"/proc/{name}/ns/user", os.O_RDONLY))
            except OSError:
                pass
    return found


@pytest.mark.container(image="busybox")
def test_attack(sandbox):
    done = []
    me, secret_owner = os.getuid(), os.stat(SECRET).st_uid
    command = sandbox.spawn(["sleep", "30"])  # root in the image: a user namespace that maps uid 0
    for fd in user_namespace_fds() + other_processes_user_namespaces():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # setns into a user namespace wants a single-threaded process
            out = ""
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, 0x10000000) == 0:
                entered = f"setns into the user namespace of fd {fd}: CapEff {status_fields()['CapEff']}"
                # A plain user may read a mode-000 file of its own there (the owner could chmod it anyway):
                # its commands' namespace, which its id owns, maps only that id. Root has no such right.
                if me == 0 or secret_owner != me:
                    try:
                        with open(SECRET) as f:
                            out = f"{entered}; read {SECRET} (mode 000, owner uid {secret_owner}): {f.read()!r}"
                    except OSError:
                        pass
                # Cgroups it makes in a cgroup2 mount of its own must lie below its sandbox's leaf cgroup:
                # the host side looks for any left behind.
                libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
                os.makedirs("/tmp/cg", exist_ok=True)
                unshared = libc.unshare(0x20000 | 0x02000000) == 0  # mount and cgroup namespaces
                if unshared and libc.mount(b"cgroup2", b"/tmp/cg", b"cgroup2", 0, None) == 0:
                    try:
                        os.mkdir(f"/tmp/cg/{CGROUP}")
                    except OSError:
                        pass
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        line = os.read(r, 65536).decode()
        if line:
            done.append(line)
    try:
        with open(SECRET) as f:
            done.append(f"read {SECRET} directly: {f.read()!r}")
    except OSError:
        pass
    command.kill()
    command.wait()
    assert not done, f"uid {os.getuid()}: " + "; ".join(done)
"""


def _host_cgroups_named(name: str) -> list[Path]:
    """Directories called ``name`` in the host's cgroup2 hierarchies (a few levels deep)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        roots = [line.split()[4] for line in f if " - cgroup2 " in line]
    for root in roots:
        for path, dirs, _ in os.walk(root):
            if path.count("/") - root.count("/") >= 4:
                dirs.clear()
            if name in dirs:
                found.append(Path(path, name))
    return found


@contextlib.contextmanager
def _unreadable_secret(prefix: str) -> Iterator[Path]:
    """A mode-000 file of the runner's under $HOME: an overlay in the sandbox, with this file below, which the
    sandboxed test (root too: it has no capabilities) cannot read."""
    secret_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=Path.home()))
    secret = secret_dir / "secret"
    try:
        secret.write_text(f"root-only-{uuid.uuid4().hex}")
        secret.chmod(0)
        os.chmod(secret_dir, 0o755)
        yield secret
    finally:
        secret.unlink(missing_ok=True)
        secret_dir.rmdir()


def test_commands_namespace_gives_capabilities_back(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """A root test with ``image=`` whose commands need a user namespace that maps uid 0 (since Linux 5.12 a
    process without CAP_SETFCAP cannot map uid 0 in a namespace of its own). Were that namespace within the
    test's reach (an fd it holds, /proc/PID/ns/user of a command) and owned by its euid, setns() would give it
    every capability there: CAP_DAC_OVERRIDE over the files of every id the namespace maps, a root file of
    mode 000 included. The test finds no such fd, reads nothing, makes no cgroup, and the session ends
    normally. (It fails on the version that kept the namespace's fd in the test process.)
    """
    cgroup = f"hostile-cgroup-{uuid.uuid4().hex}"
    try:
        with _unreadable_secret("hostile-commands-ns-") as secret:
            run = _run(pytester, monkeypatch, _source(COMMANDS_NS, secret=str(secret), cgroup=cgroup), *xdist)
    finally:
        left = _host_cgroups_named(cgroup)
        for path in left:
            path.rmdir()  # put the host back
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"commands namespace: {run.inner_failure()}")
    if left:
        problems.insert(0, f"commands namespace: the test left cgroup(s) on the host: {[str(p) for p in left]}")
    _check(problems)


COMMAND_HELPERS = """
SECRET = __SECRET__
RENAME_EXCHANGE = 2


def leaked(text):
    return "root-only-" in text


@pytest.mark.container(image="busybox")
def test_attack(sandbox):
    import subprocess
    me, owner = os.getuid(), os.stat(SECRET).st_uid
    judged = me == 0 or owner != me  # a plain user's commands may read a mode-000 file of its own
    done = []
    # 1. A directory of the test's view handed to a command as its stdin: its rights, not the test's, apply.
    view = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    proc = sandbox.spawn(["cat", "/proc/self/fd/0" + SECRET], stdin=view, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=30)
    if judged and leaked(out):
        done.append(f"a command read {SECRET} (mode 000) through the test's / as its stdin: {out!r}")
    # 2. The way to the image root swapped for a symlink to / while a command starts, many times.
    parent = os.path.dirname(sandbox.root)
    try:
        os.rename(parent, parent + "-moved")
    except OSError:
        pass  # a mount point: nothing on the way can move
    else:
        os.makedirs(sandbox.root)
        os.symlink("/", parent + "/other")
        libc = ctypes.CDLL(None, use_errno=True)
        swapper = os.fork()
        if swapper == 0:
            while True:
                libc.renameat2(-100, sandbox.root.encode(), -100, (parent + "/other").encode(), RENAME_EXCHANGE)
        try:
            for _ in range(300):
                try:
                    r = sandbox.run(["cat", SECRET])
                except Exception:
                    continue
                if judged and leaked(r.stdout):
                    done.append(f"a command started in the test's whole view read {SECRET}: {r.stdout!r}")
                    break
        finally:
            os.kill(swapper, 9)
            os.waitpid(swapper, 0)
    assert not done, f"uid {me}: " + "; ".join(done)
"""


def test_commands_have_no_rights_over_the_tests_view(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """Root's commands in an image run as root with Docker's capabilities in a user namespace of their own;
    the test chooses their argv and stdio. Handed a directory fd of the test's view, or started while the
    test swaps the way to the image root for a symlink to / (its launcher would mount and pivot into the
    whole view), they must not read a mode-000 file the test cannot read. Fails on the version whose
    commands held CAP_DAC_OVERRIDE over a namespace mapping every id, and whose image root's parent was a
    plain directory of the test's /run (both found by a red-team pass: 1 of ~27 starts won the race)."""
    with _unreadable_secret("hostile-command-fds-") as secret:
        run = _run(pytester, monkeypatch, _source(COMMAND_HELPERS, secret=str(secret)), *xdist)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"commands: {run.inner_failure()}")
    _check(problems)


# -- 3. fds sent over the report channel stay in pytest ------------------------------------------

FD_FLOOD = """
@pytest.mark.container
def test_attack():
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    # Each fd pins this sandbox's mount namespace (its tmpfs and everything written there) in pytest.
    fds = tuple(os.open("/proc/self/ns/mnt", os.O_RDONLY) for _ in range(4))
    for _ in range(400):
        protocol.send(test_process._channel, {"type": "log", "text": ""}, fds=fds)
"""

FD_CONFTEST = """
import os, resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the usual default soft limit


def pytest_unconfigure(config):
    held = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{name}").startswith("mnt:")
        except OSError:
            pass
    with open(config.rootpath / f"held-{os.getpid()}.txt", "w") as f:  # xdist workers print nowhere
        f.write(str(held))
"""


def test_fds_sent_over_the_report_channel_stay_in_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """pytest receives whatever fds arrive with a message on the reports channel and never closes them
    (``_read_reports``/``_drain`` drop ``fds``). A test fills pytest's fd table (EMFILE: later sandboxes and
    pytest's own files fail) and pins its sandbox's namespaces, with their tmpfs contents, in pytest for the
    rest of the session, past the per-sandbox scratch bound. Fix: close every fd that comes on the
    reports channel (better: refuse a message from the test that carries any, as malformed)."""
    pytester.makeconftest(FD_CONFTEST)
    run = _run(pytester, monkeypatch, _source(FD_FLOOD), "-s", *xdist)
    problems = run.session_problems()
    held = [int(p.read_text()) for p in pytester.path.glob("held-*.txt")]
    if any(held):
        problems.insert(0, f"fds: pytest holds {max(held)} fds of sandbox mount namespaces the test sent it")
    _check(problems)


# -- 4. unix sockets of the host, reached from a sandbox without network -------------------------

SOCKET = """
PATH = __PATH__


@pytest.mark.container
def test_attack():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(PATH)
        said = s.recv(200)
    except OSError:
        return
    assert not said, f"uid {os.getuid()}, network none: connected to the host's {PATH}, which said {said!r}"
"""


def _socket_dir() -> Path:
    """A host directory the sandbox sees through its read-only view (not scratch, not an overlay)."""
    for candidate in (os.environ.get("HOSTILE_SOCKET_DIR", ""), "/var/lib", "/srv", "/opt"):
        if candidate and os.access(candidate, os.W_OK):
            return Path(tempfile.mkdtemp(prefix="hostile-sock-", dir=candidate))
    pytest.skip(
        "this user can write no host directory that sandboxes show read-only (outside /tmp, /var/tmp, /run, "
        "$HOME and the rootdir): nowhere to bind a probe socket; set HOSTILE_SOCKET_DIR to one"
    )


def test_host_unix_sockets_reachable_without_network(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """A network namespace does not cover filesystem sockets, and connect() needs no write access to
    the mount (the read-only host view does not stop it). Every host service listening on a socket
    outside the sandbox's scratch places and overlays is reachable by a test with network="none": LXD's
    /var/snap/lxd/common/lxd/unix.socket, a docker.sock not under /run, agents, databases. A socket
    reached through an overlay is refused (the overlay's inode is not the socket's), which is why $HOME
    and the rootdir are safe. Fix: serve the host view through overlayfs too (per top-level directory,
    as FROM host images do), or a seccomp/Landlock rule against connect() to pathname sockets."""
    directory = _socket_dir()
    path = directory / "service.sock"
    greeting = f"host-service-{uuid.uuid4().hex}".encode()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(directory, 0o755)
    path.chmod(stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(greeting)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        run = _run(pytester, monkeypatch, _source(SOCKET, path=str(path)), *xdist)
    finally:
        stop.set()
        thread.join()
        server.close()
        path.unlink()
        directory.rmdir()
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"host socket: {run.inner_failure()}")
    _check(problems)


# -- 5. memory= bounds the sandbox, not what it makes pytest hold ---------------------------------

MEMORY_FLOOD = """
@pytest.mark.container(memory="32M")
def test_attack():
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    text = "w" * (1 << 20)
    for lineno in range(200):  # 200 MiB in pytest, from a sandbox limited to 32 MiB
        protocol.send(test_process._channel, {"type": "warning", "message": text, "when": "runtest",
                      "category": ["builtins", "UserWarning"], "filename": "flood.py", "lineno": lineno})
"""

MEMORY_CONFTEST = """
def pytest_unconfigure(config):
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"PYTEST-PEAK-KIB={hwm}")
"""


def test_memory_limit_bypassed_through_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """Every warning (and log record) a sandbox sends is kept or written by pytest, each up to 128 MiB,
    their number unbounded: a test under memory="32M" makes the pytest process, which no limit covers,
    hold hundreds of MiB (860 MiB peak measured for 400 warnings), and so the host's RAM. Fix: a budget per
    sandbox for what its messages may make pytest hold (e.g. the memory limit, or a few MiB of warnings and
    logs in all), past which the test fails as malformed."""
    pytester.makeconftest(MEMORY_CONFTEST)
    run = _run(pytester, monkeypatch, _source(MEMORY_FLOOD), "--disable-warnings", "-s", *xdist)
    problems = run.session_problems()
    _check(_peak_problem(run.text) + problems)


def _peak_problem(text: str) -> list[str]:
    """pytest's peak memory (MEMORY_CONFTEST prints it) past what a 32 MiB sandbox may make it hold."""
    peaks = [int(n) // 1024 for n in re.findall(r"PYTEST-PEAK-KIB=(\d+)", text)]
    if peaks and max(peaks) > 150:
        return [f"memory: a sandbox limited to 32 MiB made pytest peak at {max(peaks)} MiB"]
    return []


# -- 6. a report pytest accepts, then cannot print --------------------------------------------------

BAD_SECTIONS = """
@pytest.fixture
def forged(request):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    data = {"$report_type": "TestReport", "nodeid": request.node.nodeid, "location": ["test_probe.py", 1, "x"],
            "keywords": {}, "outcome": "failed", "longrepr": "forged", "when": "setup", "user_properties": [],
            "sections": [["a", "b", "c"]], "duration": 0.0, "start": 0.0, "stop": 0.0}
    protocol.send(test_process._channel, {"type": "report", "data": data})


@pytest.mark.container
def test_attack(forged):
    pass
"""


def test_report_with_bad_sections_crashes_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """``sections`` is not checked (only ``user_properties`` is): a section of three strings passes
    ``_Relay._report`` and crashes pytest's terminal summary (ValueError in ``_outrep_summary``), so the
    session ends in a traceback without its summary; "a malformed message fails that test, the session
    goes on" does not hold. Fix: check that ``sections`` is a list of two strings each (and ``longrepr``,
    ``location``, ``outcome``, ``keywords`` against what pytest's own reports hold), else malformed."""
    run = _run(pytester, monkeypatch, _source(BAD_SECTIONS), *xdist)
    problems = run.session_problems()
    if "ValueError" in run.text and "_outrep_summary" in run.text:
        problems.insert(0, "report: a forged sections entry crashed pytest's terminal summary")
    _check(problems)


# -- 7. setuid-root executables on the host's disk, through a kept read/write layer -----------------

SETUID = """
@pytest.mark.container(image="busybox")
def test_attack(sandbox):
    import shutil
    planted = "/run/pytest-sandbox/image/bin/hostile-setuid"
    shutil.copy("/run/pytest-sandbox/image/bin/busybox", planted)
    os.chmod(planted, 0o6755)  # the owner may set these bits; no_new_privs only matters inside
    assert False, "failed, so that --sandbox-keep=failed keeps the read/write layer on the host's disk"
"""


def test_kept_layer_holds_setuid_root_executables(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A root test owns the image's files (uid 0), so it may chmod u+s them; with --sandbox-keep=failed its
    read/write layer is kept in the store on the host's disk, setuid-root busybox included (the store's
    directories are 0755; only /root's 0700 stands between it and every local user, and a store set with
    PYTEST_SANDBOX_STORE or --sandbox-store in a shared place has not even that). `pytest-sandbox commit`
    then puts it into an image. Fix: strip setuid/setgid bits (and security.capability xattrs) from a
    layer's files when keeping or committing it, or keep the store's containers/ directory 0700."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    try:
        run = _run(pytester, monkeypatch, _source(SETUID), "--sandbox-keep=failed")
        found = []
        for path, _, files in os.walk(store):
            for name in files:
                st = os.lstat(os.path.join(path, name))
                foreign = st.st_uid != os.getuid() or st.st_uid == 0
                if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID) and foreign:
                    found.append(f"{os.path.join(path, name)} ({stat.filemode(st.st_mode)}, uid {st.st_uid})")
    finally:
        for path, _, files in os.walk(store):
            for name in files:
                full = os.path.join(path, name)
                if not os.path.islink(full):
                    os.chmod(full, os.lstat(full).st_mode & 0o777)  # no setuid file left behind
    problems = [p for p in run.session_problems() if "did not pass" in p or "INTERNALERROR" in p]
    if found:
        problems.insert(0, f"setuid executables owned by another user (root) on the host's disk: {found}")
    _check(problems)


# -- 8. the host's terminal, shared with a test run with -s -----------------------------------------

TERMINAL = """
import fcntl, termios


@pytest.mark.container
def test_attack():
    done = []
    attrs = termios.tcgetattr(0)
    attrs[3] &= ~termios.ECHO
    try:
        termios.tcsetattr(0, termios.TCSANOW, attrs)
        done.append("turned the terminal's echo off")
    except termios.error:
        pass
    try:
        fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
        done.append("made pytest's stdout non-blocking")
    except OSError:
        pass
    assert not done, f"uid {os.getuid()}: " + "; ".join(done)
"""


def test_terminal_shared_with_capture_off(pytester: pytest.Pytester) -> None:
    """With -s (or --capture=sys/tee-sys) fds 0-2 of the test are pytest's own open files: the user's
    terminal or CI's pipe. The test changes the terminal's settings (echo off, raw mode: they outlive
    pytest, in the user's shell) and the shared file status flags (O_NONBLOCK on pytest's stdout, so
    pytest's and the shell's later writes fail with EAGAIN). TIOCSTI and TIOCSCTTY are refused. Fix:
    with capture off, give the test a pty (or pipe) of its own whose output pytest copies to its own
    stdout, as ``script`` does, never the host's fds."""
    import fcntl
    import pty
    import select
    import subprocess
    import sys
    import termios

    pytester.makepyfile(test_probe=_source(TERMINAL))
    master, slave = pty.openpty()
    output = b""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-s", "test_probe.py"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=pytester.path,
            start_new_session=True,
        )
        while True:  # the slave stays open here, so no EIO at the end: read until pytest is gone and quiet
            if select.select([master], [], [], 0.2)[0]:
                output += os.read(master, 65536)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
        echo = bool(termios.tcgetattr(slave)[3] & termios.ECHO)
        nonblocking = bool(fcntl.fcntl(slave, fcntl.F_GETFL) & os.O_NONBLOCK)
    finally:
        os.close(master)
        os.close(slave)
    text = output.decode(errors="replace")
    problems = []
    if not echo:
        problems.append("the terminal pytest ran on has echo turned off after the run")
    if nonblocking:
        problems.append("pytest's stdout (shared with the shell) is non-blocking after the run")
    if re.search(r"^PASSED \S*test_bystander", re.sub(r"\x1b\[[0-9;]*m", "", text), re.M) is None:
        problems.append(f"the bystander did not pass: {text[-1500:]}")
    _check(problems)


# -- 9. memory= as RLIMIT_AS (no cgroup): a tmpfs of the test's own is RAM outside it ------------------

TMPFS_MEMORY = """
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000


@pytest.mark.container(memory="64M")
def test_attack():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a user and mount namespace of its own: mounting a tmpfs of any size is allowed there
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
        uid, gid = os.getuid(), os.getgid()
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            try:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            except OSError:
                pass
        os.makedirs("/tmp/big", exist_ok=True)
        if libc.mount(b"tmpfs", b"/tmp/big", b"tmpfs", 0, b"size=1g") == 0:
            chunk = b"x" * (1 << 20)
            try:
                with open("/tmp/big/fill", "wb") as f:
                    for _ in range(256):
                        f.write(chunk)
                        f.flush()
                        os.write(w, b".")  # progress, in case the OOM killer ends this process
            except OSError:
                pass
        os._exit(0)
    os.close(w)
    written = 0
    while True:
        got = os.read(r, 4096)
        if not got:
            break
        written += len(got)
    os.waitpid(pid, 0)
    assert written <= 128, (f"uid {os.getuid()}, memory=64M: wrote {written} MiB of RAM into a tmpfs "
                            "mounted in a user namespace of its own")
"""


def test_memory_limit_bypassed_with_a_tmpfs_of_its_own(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    backend = cgroups.choose("auto", os.environ.get("PYTEST_SANDBOX_CGROUP"), str(pytester.path))
    if not isinstance(backend, cgroups.CgroupBackend):
        pytest.skip(
            "host gives this user no cgroup: memory= is then RLIMIT_AS, which cannot bound tmpfs pages "
            "(README: Limits by host)"
        )
    """Where memory= is RLIMIT_AS (a plain user without a delegated cgroup: the rlimit backend), file pages
    are not address space: a test mounts a tmpfs of any size in a user namespace of its own and fills RAM
    (256 MiB written under memory=64M; the bound on the sandbox's own tmpfs does not reach this one). With a
    cgroup the pages are charged to the sandbox and this holds. Fix: with the rlimit backend, refuse
    CLONE_NEWUSER to the test (seccomp) or say in the README that memory= then bounds address space only."""
    run = _run(pytester, monkeypatch, _source(TMPFS_MEMORY), *xdist)
    problems = run.session_problems()
    if "wrote" in run.inner_failure() and "tmpfs" in run.inner_failure():
        problems.insert(0, f"memory: {run.inner_failure()}")
    _check(problems)


# -- 10. half a message: pytest blocks in recv and the timeout never fires -------------------------------

STALL = """
@pytest.mark.container(timeout=2)
def test_attack():
    import faulthandler, time
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    faulthandler.cancel_dump_traceback_later()  # the sandbox's own watchdog is the test's to stop
    test_process._channel.send(protocol.MORE + b"{")  # the first chunk of a message that never ends
    time.sleep(3600)
"""


def test_half_a_message_defeats_the_timeout(pytester: pytest.Pytester) -> None:
    """pytest reads a message with a blocking ``protocol.recv`` once the reports channel is readable; after a
    first chunk marked "more" it waits in recvmsg for the rest, outside the select() that enforces the
    deadline (timeout + 5 s). A test with timeout=2 that cancels its faulthandler watchdog and sends one
    such chunk hangs pytest, and the session, forever. Fix: reassemble chunks across select() wake-ups
    (non-blocking reads into a per-channel buffer) so the deadline keeps running, or give the reports
    socket a timeout equal to the time left."""
    pytester.makepyfile(test_probe=_source(STALL))
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=40)
    except pytester.TimeoutExpired:
        pytest.fail("a test with timeout=2 hung the session for 40 s (killed by pytester)")
    text = "\n".join(result.outlines)
    assert "PASSED test_probe.py::test_bystander" in text, text[-2000:]


# -- 11. an outcome of the test's own, which pytest's terminal files under one of its categories ------------

OUTCOME = """
@pytest.fixture
def forged(request):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    data = {"$report_type": "TestReport", "nodeid": request.node.nodeid, "location": ["test_probe.py", 1, "x"],
            "keywords": {}, "outcome": __OUTCOME__, "longrepr": None, "when": "call", "user_properties": [],
            "sections": [], "duration": 0.0, "start": 0.0, "stop": 0.0, **__EXTRA__}
    protocol.send(test_process._channel, {"type": "report", "data": data})


@pytest.mark.container
def test_attack(forged):
    pass
"""


@pytest.mark.parametrize(
    ("outcome", "extra"), [("warnings", {}), ("xfailed", {}), ("skipped", {"wasxfail": 5})], ids=str
)
def test_report_with_an_outcome_pytest_files_as_its_own(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    xdist: tuple[str, ...],
    outcome: str,
    extra: dict[str, object],
) -> None:
    """Reports may carry a plugin's own outcome (pytest-rerunfailures' "rerun") if pytest_report_teststatus
    knows it; but the terminal reporter's fallback answers for any outcome, filing it under its own name.
    "warnings" then crashes the warnings summary (a TestReport has no .message), "xfailed" the -rx summary
    (no .wasxfail). An xfail reason that is not a string made junitxml an INTERNALERROR."""
    run = _run(pytester, monkeypatch, _source(OUTCOME, outcome=outcome, extra=extra), "--junitxml=junit.xml", *xdist)
    problems = run.session_problems()
    if "AttributeError" in run.text and "terminal.py" in run.text:
        problems.insert(0, f"report: outcome {outcome!r} crashed pytest's terminal summary")
    _check(problems)


# -- 12. coverage pytest merges: a file only the host has, line numbers coverage cannot store ------------

COVERAGE = """
@pytest.mark.container
def test_attack(request):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    probe = str(request.node.path)
    path = {"probe": probe, "long": "/x/" + "a/" * 1_000_000}.get(__PATH__, __PATH__)
    assert path == probe or not os.path.exists(path), "the sandbox sees the host's /tmp"
    files = {probe: [1], path: __LINES__}
    protocol.send(test_process._channel, {"type": "coverage", "arcs": False, "contexts": {"": files}})
"""
SECRET = f"host_only_secret_{uuid.uuid4().hex}"


@pytest.mark.parametrize("attack", ["host-only file", "negative line", "huge line", "long path"])
def test_coverage_message_reaches_the_host(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...], attack: str
) -> None:
    """pytest merges a sandbox's coverage into its own: a path was refused only under a hidden place, so a
    host file the sandbox never saw (its /tmp is a fresh tmpfs) went into the html report, source and all;
    a negative line number (IndexError) or a huge one (MemoryError, a bit per line) broke pytest, and
    os.path.realpath of a path of a million components took pytest minutes (quadratic)."""
    pytest.importorskip("pytest_cov")  # a dev dependency
    secret = Path(tempfile.gettempdir()) / f"hostile-secret-{uuid.uuid4().hex}.py"
    secret.write_text(f"{SECRET} = 1\n")
    path, lines = {
        "host-only file": (str(secret), [1]),
        "negative line": ("probe", [-5]),
        "huge line": ("probe", [2**60]),
        "long path": ("long", [1]),
    }[attack]
    try:
        run = _run(
            pytester, monkeypatch, _source(COVERAGE, path=path, lines=lines), "--cov", "--cov-report=html", *xdist
        )
    except pytester.TimeoutExpired:
        pytest.fail(f"coverage: {attack} hung pytest for 180 s")
    finally:
        secret.unlink()
    problems = run.session_problems()
    shown = [p.name for p in (pytester.path / "htmlcov").glob("*.html") if SECRET in p.read_text()]
    if shown:
        problems.insert(0, f"coverage: the html report shows a file only the host has: {shown}")
    if attack != "host-only file" and run.outcome("test_attack") != "FAILED":
        problems.insert(0, f"coverage: {attack} was not refused: {run.outcome('test_attack')}")
    _check(problems)


# -- 13. reports in any number: reruns and subtests ---------------------------------------------------

REPORT_FLOOD = """
@pytest.mark.container(memory="32M")
def test_attack(request):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    data = {"$report_type": "TestReport", "nodeid": request.node.nodeid, "location": ["test_probe.py", 1, "x"],
            "keywords": {}, "outcome": "passed", "longrepr": None, "when": "call", "user_properties": [],
            "sections": [], "duration": 0.0, "start": 0.0, "stop": 0.0}
    for _ in range(150_000):  # call reports may repeat now (subtests), a few hundred bytes each
        protocol.send(test_process._channel, {"type": "report", "data": data})
"""


def test_report_flood_bypasses_the_memory_limit_through_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    """Reports were three at most; with rerun cycles and subtests their number is the test's. The budget
    counted their bytes, but pytest keeps every report as objects several times that size (terminal stats):
    a test under memory="32M" sending 150,000 small call reports made pytest peak at 190 MiB (215 under
    xdist). Each report now takes a fixed share of the budget too."""
    pytester.makeconftest(MEMORY_CONFTEST)
    run = _run(pytester, monkeypatch, _source(REPORT_FLOOD), "-s", *xdist)
    # Its forged PASSED lines come first in -rA: the session's 1 is the refused flood's, not a problem.
    problems = [p for p in run.session_problems() if "return code 1 " not in p]
    _check(_peak_problem(run.text) + problems)


# -- 14. a failure's representation pytest builds from the JSON without checking a type ---------------------

BAD_LONGREPR = """
@pytest.fixture
def forged(request):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    data = {"$report_type": "TestReport", "nodeid": request.node.nodeid, "location": ["test_probe.py", 1, "x"],
            "keywords": {}, "outcome": "failed", "longrepr": __LONGREPR__, "when": "call", "user_properties": [],
            "sections": [], "duration": 0.0, "start": 0.0, "stop": 0.0}
    protocol.send(test_process._channel, {"type": "report", "data": data})


@pytest.mark.container
def test_attack(forged):
    pass
"""
_ENTRY = {"reprfuncargs": None, "reprfileloc": None, "reprlocals": None, "style": "long"}
_TRACEBACK = {"extraline": None, "style": "long"}


@pytest.mark.parametrize(
    "longrepr",
    [
        {  # an entry whose lines are a number
            "reprcrash": None,
            "reprtraceback": {"reprentries": [{"type": "ReprEntry", "data": {**_ENTRY, "lines": 123}}], **_TRACEBACK},
            "sections": [],
            "chain": None,
        },
        {  # a crash location of numbers
            "reprcrash": {"path": 1, "lineno": "x", "message": 5},
            "reprtraceback": {"reprentries": [], **_TRACEBACK},
            "sections": [],
            "chain": None,
        },
    ],
    ids=["lines", "reprcrash"],
)
def test_report_with_a_bad_failure_repr_crashes_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...], longrepr: dict[str, object]
) -> None:
    """Only a skip's longrepr was checked; pytest builds a failure's (ReprExceptionInfo) from the JSON as it
    comes, and its terminal summary crashed printing it (TypeError, AttributeError): no summary, return 1."""
    run = _run(pytester, monkeypatch, _source(BAD_LONGREPR, longrepr=longrepr), "--junitxml=junit.xml", *xdist)
    _check(run.session_problems())


# -- 15. stdin closed when pytest started: fd 0 is whatever the host opened first ---------------------------

CLOSED_STDIN = """
@pytest.mark.container
def test_attack():
    link = os.readlink("/proc/self/fd/0") if os.path.exists("/proc/self/fd/0") else "closed"
    assert link in ("closed", "/dev/null"), f"fd 0, closed when pytest started, is the host's {link}"
"""


def test_stdin_closed_when_pytest_started(pytester: pytest.Pytester, xdist: tuple[str, ...]) -> None:
    """A sandbox keeps fds 0-2 as its stdio. With pytest started without stdin (cron, a daemon, CI), fd 0
    is the first fd pytest opened for itself: a listening TCP socket of the host (pytest-rerunfailures'),
    a zygote socket, a capture file. One that was closed at pytest's start is /dev/null in a sandbox."""
    pytester.makepyfile(test_probe=_source(CLOSED_STDIN))
    script = 'exec "$0" -m pytest -p no:cacheprovider -rA -s "$@" 0<&-'  # -s: capture would take fd 0
    run = Run(pytester.run("sh", "-c", script, sys.executable, *xdist, timeout=180), [])
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"stdin: {run.inner_failure()}")
    _check(problems)


# -- 16. what plugins recorded in a sandbox: pytest-benchmark's timings, flaky's report, syrupy's snapshots -----

PLUGIN_RECORDS = """
import json


def send_raw(text):
    from pytest_sandbox import protocol
    from pytest_sandbox.runtime import test_process
    data = text.encode()
    chunks = [data[i : i + protocol.CHUNK] for i in range(0, len(data), protocol.CHUNK)]
    for index, chunk in enumerate(chunks):
        test_process._channel.sendall((protocol.LAST if index == len(chunks) - 1 else protocol.MORE) + chunk)


@pytest.mark.container
def test_attack():
    message = json.loads(__MESSAGE__)  # NaN too
    if __FLOOD__:
        message["benchmarks"][0]["data"] = [0.0] * (2**22 + 1)
    text = json.dumps(message)
    if __NESTED__:
        text = text.replace('"NESTED"', "[" * 100_000 + "]" * 100_000)
    send_raw(text)
"""
_BENCH = {
    "group": None,
    "extra_info": {},
    "options": {"min_rounds": 5},
    "iterations": 1,
    "data": [1e-6],
    "has_error": False,
    "cprofile": None,
}
_ASSERTION = {
    "extension": ["syrupy.extensions.amber", "AmberSnapshotExtension"],
    "xfail": False,
    "results": [
        {"location": "/x/__snapshots__/t.ambr", "name": "t", "created": False, "updated": False, "success": True}
    ],
}


def _benchmarks(**changes: object) -> dict[str, object]:
    return {"type": "benchmarks", "benchmarks": [_BENCH, {**_BENCH, **changes}]}  # a good one first: none is kept


_WRITE = {"extension": _ASSERTION["extension"], "index": 0, "data": "'x'", "binary": False}


def _snapshots(**changes: object) -> dict[str, object]:
    result = {**_ASSERTION["results"][0], **changes.pop("result", {})}  # type: ignore[dict-item]
    writes = [{**_WRITE, **changes.pop("write")}] if "write" in changes else []  # type: ignore[dict-item]
    assertions = [_ASSERTION, {**_ASSERTION, "results": [result], **changes}]
    return {"type": "snapshots", "assertions": assertions, "writes": writes}


PLUGIN_ATTACKS: dict[str, tuple[str, dict[str, object]]] = {
    "benchmark NaN timing": ("pytest_benchmark", _benchmarks(data=[float("nan")])),
    "benchmark rounds flood": ("pytest_benchmark", _benchmarks()),
    "benchmark unknown option": ("pytest_benchmark", _benchmarks(options={"__class__": 1})),
    "benchmark zero iterations": ("pytest_benchmark", _benchmarks(iterations=0)),
    "benchmark bad profile": ("pytest_benchmark", _benchmarks(cprofile=[["f.py", "1", "f", 1, 1, 0.0, 0.0]])),
    "benchmark nested extra_info": ("pytest_benchmark", _benchmarks(extra_info={"x": "NESTED"})),
    "benchmark while disabled": ("pytest_benchmark", _benchmarks()),  # with --benchmark-disable
    "flaky report not text": ("flaky", {"type": "flaky-report", "text": 5, "had_flaky_tests": True}),
    "snapshot extension not loaded": ("syrupy", _snapshots(extension=["this", "Extension"])),
    "snapshot extension not an extension": ("syrupy", _snapshots(extension=["os", "system"])),
    "snapshot relative location": ("syrupy", _snapshots(result={"location": "../../etc/passwd"})),
    "snapshot name with NUL": ("syrupy", _snapshots(result={"name": "a\0b"})),
    "snapshot write without --snapshot-update": ("syrupy", _snapshots(write={})),
    "snapshot write of an unloaded extension": ("syrupy", _snapshots(write={"extension": ["this", "X"]})),
    "snapshot write of bad base64": ("syrupy", _snapshots(write={"data": "not base64!", "binary": True})),
}


@pytest.mark.parametrize("attack", PLUGIN_ATTACKS)
def test_forged_plugin_records(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...], attack: str
) -> None:
    """What pytest-benchmark, flaky and syrupy recorded in a sandbox comes back as plain data that pytest
    rebuilds their records from (plugin_results.py). Each forged record fails its test, adds nothing (a
    good record sent with it neither), imports nothing the sandbox names (importing ``this`` prints the
    Zen of Python) and leaves the session as a plain one."""
    plugin, message = PLUGIN_ATTACKS[attack]
    pytest.importorskip(plugin)  # a dev dependency
    source = _source(
        PLUGIN_RECORDS,
        message=json.dumps(message),
        flood=attack == "benchmark rounds flood",
        nested="nested" in attack,
    )
    options = ["--snapshot-update"] if "snapshot write of" in attack else []
    options += ["--benchmark-disable"] if attack == "benchmark while disabled" else []
    run = _run(pytester, monkeypatch, source, "--benchmark-json=bench.json", *options, *xdist)
    problems = run.session_problems()
    written = list(pytester.path.rglob("*.ambr"))
    if written:
        problems.insert(0, f"{attack}: pytest wrote a forged snapshot: {written}")
    if run.outcome("test_attack") != "FAILED":
        problems.insert(0, f"{attack}: not refused: {run.outcome('test_attack')}")
    elif "sandbox sent a malformed message" not in run.text:
        problems.insert(0, f"{attack}: failed for another reason:\n{run.text[-3000:]}")
    if "Beautiful is better than ugly" in run.text:
        problems.insert(0, f"{attack}: pytest imported a module the sandbox named")
    if re.search(r"^-+ benchmark", run.text, re.M):
        problems.insert(0, f"{attack}: pytest-benchmark's table shows forged timings")
    _check(problems)
