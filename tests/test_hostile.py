"""Hostile tests: a sandboxed test acts as an attacker, and the host checks from the outside that nothing happened.

Each test writes a test file whose sandboxed test tries one escape or one attack on the
session, runs pytest on it in a subprocess and then looks at the host: marker files the
attack would create, host settings it would change, processes it would leave behind, and
whether the session still reports like a normal pytest run (no INTERNALERROR, the other
tests of the file unharmed).

A probe that finds a hole fails; the inner test's own assertion (what it could do) is
part of the failure message. Every marker carries a fresh uuid, so runs never see each
other's leftovers.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import time
import uuid
from pathlib import Path

import pytest

from pytest_sandbox.linux import landlock

INNER = "test_probe"  # the hostile test file is test_probe.py
BYSTANDER = """

@pytest.mark.container
def test_bystander():
    assert os.getpid() < 10  # a plain sandboxed test: the session must still run and report it
"""

# What the hostile tests share: find the fds of the test process, read a /proc status field.
INNER_COMMON = """
import ctypes, errno, os, pickle, socket, stat
import pytest

from pytest_sandbox.linux import landlock


def fd_links():
    links = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listing itself, closed by now
    return links


def status_fields():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\\n").split(":\\t", 1) for line in f if ":\\t" in line)
"""


def _source(template: str, **values: object) -> str:
    """``template`` with each ``__NAME__`` replaced by the repr of ``values[name]``."""
    text = INNER_COMMON + template + BYSTANDER
    for name, value in values.items():
        text = text.replace(f"__{name.upper()}__", repr(value))
    unfilled = set(re.findall(r"__([A-Z][A-Z0-9_]*)__", text))  # placeholders are upper case; the values are reprs
    assert not unfilled, f"placeholders not filled: {unfilled}"
    return text


# -- the host side: processes, outcomes -----------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").decode(errors="replace").splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return 0


def _sandbox_processes() -> dict[int, str]:
    """Host pids whose name starts with sandbox- (the zygote, its parent, test processes)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            comm = _read(f"/proc/{entry}/comm").decode(errors="replace").strip()
            if comm.startswith("sandbox-"):
                found[int(entry)] = comm
    return found


def _carrying(token: str) -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and token.encode() in _read(f"/proc/{e}/environ")}


def _leftovers(token: str, before: dict[int, str], timeout: float = 5.0) -> list[str]:
    """Processes of the inner run still alive: they carry its token, descend from one that does,
    or are sandbox-* processes that appeared during the run and descend from this process."""
    deadline = time.monotonic() + timeout
    while True:
        ours = _carrying(token) - {os.getpid()}
        left = []
        for pid, comm in _sandbox_processes().items():
            if pid in before or pid == os.getpid():
                continue
            chain, p = set(), pid
            while p > 1 and p not in chain:
                chain.add(p)
                p = _ppid(p)
            if chain & ours or os.getpid() in chain:
                left.append(f"{pid} ({comm})")
        left += [
            f"{pid} (carries the token: {_read(f'/proc/{pid}/comm').decode().strip()})"
            for pid in sorted(ours)
            if not any(s.startswith(f"{pid} ") for s in left)
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class Run:
    """One inner pytest run and what the host saw of it."""

    def __init__(self, result: pytest.RunResult, leftovers: list[str]) -> None:
        self.result = result
        self.leftovers = leftovers
        self.text = "\n".join(result.outlines + result.errlines)

    def outcome(self, test: str) -> str | None:
        """PASSED/FAILED/ERROR/... of ``test_probe.py::test`` from the -rA summary."""
        pattern = re.compile(rf"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::)?{re.escape(test)}\b")
        for line in self.result.outlines:
            m = pattern.match(line)
            if m:
                return m.group(1)
        return None

    def inner_failure(self) -> str:
        """The inner test's assertion lines, to show what the attack could do."""
        lines = []
        for line in self.result.outlines:
            if line.startswith("E "):
                if line[1:].strip().startswith("assert "):
                    break  # pytest's restatement of the same assertion
                lines.append(line[1:].strip())
        return "\n".join(lines[:25]) or self.text[-3000:]

    def session_problems(self) -> list[str]:
        """The session must end as a normal pytest run would: 0 or 1, no INTERNALERROR, nothing left running."""
        problems = []
        failed = any(self.outcome(t) in ("FAILED", "ERROR") for t in self._tests())
        expected = 1 if failed else 0
        internal = [line for line in self.text.splitlines() if "INTERNALERROR" in line][-4:]
        if self.result.ret != expected:
            problems.append(
                f"the session ended with return code {int(self.result.ret)} (a normal pytest run: {expected})"
            )
        if internal:
            problems.append("the session hit an INTERNALERROR:\n    " + "\n    ".join(internal))
        if self.outcome("test_bystander") != "PASSED":
            problems.append(f"the bystander test in the same file did not pass: {self.outcome('test_bystander')}")
        if self.leftovers:
            problems.append(f"processes left behind on the host: {', '.join(self.leftovers)}")
        return problems

    def _tests(self) -> list[str]:
        return re.findall(r"^(?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) \S+::(\w+)", self.text, re.M)


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, *args: str) -> Run:
    """Write the hostile test file, run it in a subprocess, then look at the host's processes."""
    pytester.makepyfile(**{INNER: source})
    token = f"hostile-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("HOSTILE_RUN_MARK", token)  # not *_TOKEN: sandboxes withhold those
    before = _sandbox_processes()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args, timeout=180)
    return Run(result, _leftovers(token, before))


@pytest.fixture(params=[(), ("-n", "2")], ids=["plain", "xdist"])
def xdist(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """Every hostile test runs in a plain session and under xdist (execnet's pipes are one more target)."""
    if request.param:
        pytest.importorskip("xdist")
    return tuple(request.param)


def _run_keeping_core_pattern(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, *args: str
) -> tuple[Run, str]:
    """``_run``, then the host's core_pattern put back if the attack changed it; returns the run and
    what the attack changed it to ("" if it did not)."""
    core_pattern = Path("/proc/sys/kernel/core_pattern")
    before = core_pattern.read_text()
    try:
        run = _run(pytester, monkeypatch, source, *args)
        after = core_pattern.read_text()
    finally:
        if core_pattern.read_text() != before and os.geteuid() == 0:
            core_pattern.write_text(before)  # put the host back
    return run, "" if after == before else after.strip()


def _check(problems: list[str]) -> None:
    assert not problems, "\n\n".join(problems)


# -- 1 and 10: the report channel ----------------------------------------------------------------

CHANNEL = """
MARK = __MARK__


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


def channels():
    \"\"\"Every SOCK_SEQPACKET unix socket of this process: the line to pytest is one of them.\"\"\"
    found = []
    for fd, link in fd_links().items():
        if not link.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and \\
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_SEQPACKET:
            found.append(sock)
        else:
            sock.close()
    return found


@pytest.mark.container
def test_attack():
    sent = 0
    for sock in channels():
        for payload in __PAYLOADS__:
            try:
                sock.send(b"\\0sb." + (pickle.dumps(Evil()) if payload == "rce" else payload))
                sent += 1
            except OSError:
                pass
    assert sent, "no SEQPACKET socket found: nothing to attack"
"""

GARBAGE = [b"\xffhostile garbage, not a pickle", pickle.dumps({"type": "report", "data": {}})[:-3]]  # bad, truncated


def _channel_attack(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    problems = []
    # A malformed message (garbage after a valid header) may fail the test that sent it (return code 1),
    # but never the session (INTERNALERROR, return code 3) nor the other tests.
    garbage = _run(pytester, monkeypatch, _source(CHANNEL, mark="/nonexistent", payloads=GARBAGE), *args)
    problems += [f"garbage on the report channel: {p}" for p in garbage.session_problems()]
    if garbage.outcome("test_attack") is None:
        problems.append("garbage on the report channel: the sending test has no outcome at all")
    # A pickle whose __reduce__ runs a command: pytest must never unpickle what a sandbox sends.
    mark = Path(f"/tmp/hostile-pwned-{uuid.uuid4().hex}")
    try:
        rce = _run(pytester, monkeypatch, _source(CHANNEL, mark=str(mark), payloads=["rce"]), *args)
        if mark.exists():
            problems.append(
                f"pickle RCE: the sandboxed test ran `touch {mark}` in the pytest process on the host "
                "(pytest unpickles whatever arrives on the report channel)"
            )
        problems += [f"pickle on the report channel: {p}" for p in rce.session_problems()]
    finally:
        mark.unlink(missing_ok=True)
    _check(problems)


def test_report_channel_pickle_rce(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    _channel_attack(pytester, monkeypatch, *xdist)


# -- 2. the memfd holding pid 1's binary ----------------------------------------------------------

MEMFD = """
@pytest.mark.container
def test_attack():
    writable = []
    for fd, link in fd_links().items():
        if not link.startswith("/memfd:sandbox-init"):
            continue
        for how, target in (("inherited fd", fd), ("reopened through /proc/self/fd", None)):
            try:
                if target is None:
                    target = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                first = os.pread(target, 1, 0)
                if first:  # the same byte back: proves write access, changes nothing
                    os.pwrite(target, first, 0)
                    writable.append(f"fd {fd} ({link}) via {how}")
            except OSError:
                pass
    assert not writable, (f"uid {os.getuid()}: can write the binary the zygote starts as pid 1 of the next "
                          f"sandboxes: {writable}")
"""


def test_init_memfd_not_writable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    run = _run(pytester, monkeypatch, _source(MEMFD), *xdist)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"inherited memfd: {run.inner_failure()}")
    _check(problems)


# -- 3. capabilities ------------------------------------------------------------------------------

CAPS = """
@pytest.mark.container
def test_attack():
    fields = status_fields()
    held = {name: fields.get(name) for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")
            if int(fields.get(name, "0"), 16) != 0}
    nnp = fields.get("NoNewPrivs")
    assert not held and nnp == "1", f"uid {os.getuid()}: capabilities {held}, NoNewPrivs {nnp}"
"""


def test_capabilities_dropped(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    run = _run(pytester, monkeypatch, _source(CAPS), *xdist)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"capabilities: {run.inner_failure()}")
    _check(problems)


# -- 4. remount the read-only host view -----------------------------------------------------------

REMOUNT = """
HOST_FILE = __HOST_FILE__
MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2


@pytest.mark.container
def test_attack():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    done = []
    if libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None) == 0:
        done.append("remounted / read-write")
    elif ctypes.get_errno() not in (errno.EPERM, errno.EINVAL):
        done.append(f"remount of / failed with {errno.errorcode.get(ctypes.get_errno())}, not EPERM/EINVAL")
    if libc.umount2(b"/tmp", MNT_DETACH) == 0:
        done.append(f"unmounted /tmp (under it: {sorted(os.listdir('/tmp'))[:8]})")
    elif ctypes.get_errno() not in (errno.EPERM, errno.EINVAL):
        done.append(f"umount2 of /tmp failed with {errno.errorcode.get(ctypes.get_errno())}, not EPERM/EINVAL")
    try:
        with open(HOST_FILE, "w") as f:
            f.write("hostile")
        done.append(f"wrote {HOST_FILE}")
    except OSError:
        pass
    assert not done, f"uid {os.getuid()}: {'; '.join(done)}"
"""


def test_remount_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]) -> None:
    host_file = Path(f"/etc/hostile-{uuid.uuid4().hex}")
    try:
        run = _run(pytester, monkeypatch, _source(REMOUNT, host_file=str(host_file)), *xdist)
        problems = run.session_problems()
        if host_file.exists():
            problems.insert(0, f"remount: {host_file} now exists on the host: the sandbox wrote the host's /etc")
        if run.outcome("test_attack") != "PASSED":
            problems.insert(0, f"remount: {run.inner_failure()}")
    finally:
        host_file.unlink(missing_ok=True)
    _check(problems)


# -- 4b. capabilities regained in a user namespace of the test's own: the mounts stay locked ---------

REGAIN = """
CORE_PATTERN = __CORE_PATTERN__
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 32, 4096, 2


def attempts():
    \"\"\"In a child: a user namespace of its own (every capability in it), then each escape.\"\"\"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) != 0:
        return [f"(no user namespace: {errno.errorcode.get(ctypes.get_errno())})"]
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass  # root may not map uid 0 without CAP_SETFCAP: the capabilities hold anyway
    done = []
    if libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None) == 0:
        done.append("remounted / read-write")
    for path in (b"/tmp", b"/proc/sys", b"/proc/sysrq-trigger", b"/proc"):
        if libc.umount2(path, MNT_DETACH) == 0:
            done.append(f"unmounted {path.decode()}")
    if os.fork() == 0:  # pid 1 of the new pid namespace: a fresh procfs would be its own
        os.makedirs("/tmp/newproc", exist_ok=True)
        code = 0
        if libc.mount(b"proc", b"/tmp/newproc", b"proc", 0, None) == 0:
            code = 1
            try:
                with open("/tmp/newproc/sys/kernel/core_pattern", "w") as f:
                    f.write(CORE_PATTERN)
                code = 2
            except OSError:
                pass
        os._exit(code)
    status = os.wait()[1]
    if os.WEXITSTATUS(status) == 1:
        done.append("mounted a fresh read-write procfs")
    elif os.WEXITSTATUS(status) == 2:
        done.append("mounted a fresh procfs and wrote the host's core_pattern through it")
    os.makedirs("/tmp/newsys", exist_ok=True)
    if libc.mount(b"sysfs", b"/tmp/newsys", b"sysfs", 0, None) == 0:
        done.append("mounted a fresh read-write sysfs")
    return done


@pytest.mark.container
def test_attack():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, "\\n".join(attempts()).encode())
        finally:
            os._exit(0)
    os.close(w)
    done = [line for line in os.read(r, 65536).decode().splitlines() if line and not line.startswith("(")]
    os.waitpid(pid, 0)
    assert not done, f"uid {os.getuid()}, capabilities regained in a user namespace: {'; '.join(done)}"
"""


def test_regained_capabilities_cannot_unlock_mounts(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    source = _source(REGAIN, core_pattern=f"hostile-{uuid.uuid4().hex}")
    run, changed = _run_keeping_core_pattern(pytester, monkeypatch, source, *xdist)
    problems = run.session_problems()
    if changed:
        problems.insert(0, f"regained capabilities: the host's core_pattern changed to {changed!r}")
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"regained capabilities: {run.inner_failure()}")
    _check(problems)


# -- 5. pid 1: its root, its namespaces, ptrace -------------------------------------------------

PID1 = """
HOST_MARKER = __HOST_MARKER__


def readlink(path):
    try:
        return os.readlink(path)
    except OSError as exc:
        return f"unreadable ({errno.errorcode.get(exc.errno)})"


@pytest.mark.container
def test_attack():
    found = []
    try:
        through_pid1 = sorted(os.listdir("/proc/1/root/tmp"))
    except OSError:
        through_pid1 = None  # no access to pid 1's root: fine
    own = sorted(os.listdir("/tmp"))
    if through_pid1 is not None and through_pid1 != own:
        found.append(f"/proc/1/root/tmp is not this sandbox's /tmp: {through_pid1[:10]} (own: {own[:10]})")
    if through_pid1 is not None and os.path.basename(HOST_MARKER) in through_pid1:
        found.append(f"the host's {HOST_MARKER} is visible through /proc/1/root")
    # Positively inside (its ns links are unreadable: it is not dumpable): the same interfaces and mounts.
    def interfaces(pid):
        with open(f"/proc/{pid}/net/dev") as f:
            return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])

    def mount_points(pid):
        with open(f"/proc/{pid}/mountinfo") as f:
            return sorted(line.split()[4] for line in f)

    if interfaces(1) != interfaces("self"):
        found.append(f"pid 1 sees the network interfaces {interfaces(1)} (this test: {interfaces('self')})")
    if mount_points(1) != mount_points("self"):
        theirs, mine = len(mount_points(1)), len(mount_points("self"))
        found.append(f"pid 1 is in another mount namespace: {theirs} mounts, here {mine}")
    for ns in ("net", "mnt"):
        theirs, mine = readlink(f"/proc/1/ns/{ns}"), readlink(f"/proc/self/ns/{ns}")
        if theirs != mine and not theirs.startswith("unreadable"):
            found.append(f"pid 1 is in another {ns} namespace ({theirs}, this test: {mine})")
    try:
        os.close(os.open("/proc/1/mem", os.O_RDWR))
        found.append("/proc/1/mem opens read-write (ptrace access to pid 1)")
    except OSError:
        pass
    with open("/proc/1/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("CapEff", "CapPrm")}
    if any(int(v, 16) for v in caps.values()):
        found.append(f"pid 1 holds capabilities {caps}")
    assert not found, f"uid {os.getuid()}: " + "; ".join(found)
"""


def test_pid1_inside_sandbox(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    marker = Path(f"/tmp/hostile-marker-{uuid.uuid4().hex}")
    marker.write_text("host only")
    try:
        run = _run(pytester, monkeypatch, _source(PID1, host_marker=str(marker)), *xdist)
    finally:
        marker.unlink(missing_ok=True)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"pid 1: {run.inner_failure()}")
    _check(problems)


# -- 6. kernel knobs -------------------------------------------------------------------------------

KNOBS = """
PATTERN = __PATTERN__


@pytest.mark.container
def test_attack():
    written = []
    for path, value in (("/proc/sys/kernel/core_pattern", PATTERN), ("/proc/sysrq-trigger", "h")):
        try:  # sysrq h only prints the help to the kernel log
            with open(path, "w") as f:
                f.write(value)
            written.append(f"{path} <- {value!r}")
        except OSError:
            pass
    assert not written, f"uid {os.getuid()}: wrote host kernel settings: {written}"
"""


def test_kernel_knobs_read_only(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]
) -> None:
    source = _source(KNOBS, pattern=f"hostile-{uuid.uuid4().hex}-core")
    run, changed = _run_keeping_core_pattern(pytester, monkeypatch, source, *xdist)
    problems = run.session_problems()
    if changed:
        problems.insert(0, f"kernel knobs: the host's core_pattern changed to {changed!r}")
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"kernel knobs: {run.inner_failure()}")
    _check(problems)


# -- 7. fds pytest opened on the host ---------------------------------------------------------------

FDS = """
FOREIGN = ("pipe:", "anon_inode:", "/memfd:sandbox-init", "/proc/")
LOG_FILE = __LOG_FILE__
STAMP = __STAMP__


@pytest.mark.container
def test_attack():
    import logging

    logging.getLogger("probe").warning(STAMP + "-logged")  # pytest's log file still gets the test's records
    found = []
    stdio = {link for fd, link in fd_links().items() if fd <= 2}
    for fd, link in sorted(fd_links().items()):
        if link == LOG_FILE:
            try:
                os.write(fd, STAMP.encode())  # into pytest's own log file on the host
                found.append(f"fd {fd} is pytest's log file {link}, and writable")
            except OSError:
                found.append(f"fd {fd} is pytest's log file {link}")
        elif link.startswith("/sys/fs/cgroup"):
            found.append(f"fd {fd} is the host cgroup directory {link}")
        elif fd > 2 and link.startswith(FOREIGN) and link not in stdio:
            found.append(f"fd {fd} is {link}: not stdio, not the test's own")
    sockets = [fd for fd, link in fd_links().items() if fd > 2 and link.startswith("socket:")]
    if len(sockets) > 1:
        found.append(f"{len(sockets)} sockets beyond stdio (only the report channel is expected)")
    assert not found, f"uid {os.getuid()}: inherited host fds:\\n" + "\\n".join(found) + \\
        f"\\nall fds: {sorted(fd_links().items())}"
"""


def test_no_inherited_host_fds(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    xdist: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    log_file = tmp_path_factory.mktemp("hostile-log") / "log.txt"
    stamp = f"HOSTILE-STAMP-{uuid.uuid4().hex}"
    # -s: with capture off, fds 0-2 are the originals, so any other pipe is someone else's (xdist's execnet).
    run = _run(
        pytester,
        monkeypatch,
        _source(FDS, log_file=str(log_file), stamp=stamp),
        "-o",
        f"log_file={log_file}",
        "-s",
        *xdist,
    )
    problems = run.session_problems()
    logged = log_file.read_text(errors="replace") if log_file.exists() else ""
    if stamp + "-logged" not in logged:
        problems.insert(0, f"log_file: the sandboxed test's log record is not in {log_file}: {logged[-500:]!r}")
    if stamp in logged.replace(stamp + "-logged", ""):
        problems.insert(0, f"inherited fds: the sandboxed test wrote into the host's {log_file}")
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"inherited fds: {run.inner_failure()}")
    _check(problems)


# -- 8. credentials ---------------------------------------------------------------------------------

CREDENTIALS = """
FILES = __FILES__
VARIABLES = ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")


@pytest.mark.container
def test_attack():
    stolen = []
    for path in FILES:
        try:
            with open(path) as f:
                stolen.append(f"{path}: {f.read()[:40]!r}")
        except OSError:
            pass
    stolen += [f"${name}={os.environ[name]!r}" for name in VARIABLES if name in os.environ]
    assert not stolen, f"uid {os.getuid()}: the sandboxed test read {stolen}"
"""


def test_credentials_hidden(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    xdist: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("hostile-home")
    secret = uuid.uuid4().hex
    files = [home / ".ssh" / "id_rsa", home / ".aws" / "credentials"]
    for path in files:
        path.parent.mkdir(mode=0o700)
        path.write_text(f"hostile-secret-{secret}\n")
        path.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hostile-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "x")
    run = _run(pytester, monkeypatch, _source(CREDENTIALS, files=[str(p) for p in files]), *xdist)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"credentials: {run.inner_failure()}")
    _check(problems)


# -- 9. scratch space ---------------------------------------------------------------------------------

SCRATCH = """
@pytest.mark.container
def test_attack():
    with open("/proc/meminfo") as f:
        ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    sizes = {}
    for place in ("/tmp", "/var/tmp", "/run", "/dev/shm"):
        if os.path.isdir(place):
            st = os.statvfs(place)
            sizes[place] = st.f_blocks * st.f_frsize
    unbounded = {p: f"{s / 2**30:.1f} GiB" for p, s in sizes.items() if s >= ram // 2}
    assert not unbounded, (f"uid {os.getuid()}: scratch places as big as half the RAM ({ram / 2**30:.1f} GiB "
                           f"total), each fillable on its own: {unbounded}")
"""


def test_scratch_bounded(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]) -> None:
    run = _run(pytester, monkeypatch, _source(SCRATCH), *xdist)
    problems = run.session_problems()
    if run.outcome("test_attack") != "PASSED":
        problems.insert(0, f"scratch: {run.inner_failure()}")
    _check(problems)


def test_a_symlink_swapped_into_a_volume_never_binds_another_host_path(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that may write ./shared replaces ./shared/sub, another test's volume, with a symlink to a host
    directory of secrets: that test's sandbox refuses to bind it (ELOOP), it never shows the secrets."""
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    token = uuid.uuid4().hex
    (secrets_dir / "key").write_text(token)
    (pytester.path / "shared" / "sub").mkdir(parents=True)
    pytester.makepyfile(
        test_probe=f"""
        import os, pytest

        @pytest.mark.container(volumes={{"./shared": "/tmp/shared"}})
        def test_a_swap():
            os.rmdir("/tmp/shared/sub")
            os.symlink({str(secrets_dir)!r}, "/tmp/shared/sub")

        @pytest.mark.container(volumes={{"./shared/sub": "/tmp/sub"}})
        def test_b_reads():
            print("SAW", os.listdir("/tmp/sub"), open("/tmp/sub/key").read())
    """
    )
    # Both in one run: test_b's sandbox (built once test_a ran) refuses the path it was given at collection.
    result = pytester.runpytest_subprocess("-s", "-p", "no:xdist")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1, result.stdout.str()
    if outcomes.get("error"):  # built after the swap (else it was built ahead and bound the real, empty dir)
        result.stdout.fnmatch_lines(["*cannot bind */shared/sub at /tmp/sub: a symlink on its path, never followed*"])
    assert token not in result.stdout.str()
    # A later run resolves the volumes it is given afresh: a symlink inside the rootdir is refused there.
    assert (pytester.path / "shared" / "sub").is_symlink()
    later = pytester.runpytest_subprocess("-s", "-k", "b_reads")
    assert later.ret == pytest.ExitCode.USAGE_ERROR
    later.stderr.fnmatch_lines(
        ["*invalid volumes=*a symlink inside the rootdir; a volume binds real directories only*"]
    )
    assert token not in later.stdout.str() + later.stderr.str()
    assert (secrets_dir / "key").read_text() == token


def test_a_set_user_id_program_left_in_a_volume_loses_its_bit(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root's test writes root-owned files into a read/write volume: a set-user-ID copy of a shell there
    would be root for anyone who reaches the directory. The bits are cleared when the test ends."""
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))
    (pytester.path / "out" / "deep").mkdir(parents=True)
    pytester.makepyfile(
        test_probe="""
        import os, shutil, stat, pytest

        @pytest.mark.container(volumes={"./out": "/tmp/out", "named": "/tmp/named"})
        def test_plant():
            for place in ("/tmp/out/deep/sh", "/tmp/named/sh"):
                shutil.copy("/bin/sh", place)
                os.chmod(place, 0o6755)
                assert os.stat(place).st_mode & stat.S_ISUID  # allowed: the owner may set it
            os.symlink("/bin/sh", "/tmp/out/link")  # a symlink is never followed by the clean-up
    """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    for planted in (pytester.path / "out" / "deep" / "sh", tmp_path / "store" / "volumes" / "named" / "data" / "sh"):
        mode = planted.stat().st_mode
        assert not mode & 0o6000 and mode & 0o777 == 0o755, oct(mode)


def test_the_stores_locks_are_out_of_a_sandboxes_reach(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team round 7: with the store in the host view (here in the rootdir; often a CI cache mount), a test
    could open a named volume's lock read-only and flock it (a read-only fd takes an flock), and the next
    test that mounts the volume, in this session or another, waited forever. The store's lock files and
    records are masked in every sandbox."""
    store = pytester.path / "store"
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    pytester.makepyfile(
        test_probe=f"""
        import fcntl, os, pytest
        STORE = {str(store)!r}

        @pytest.mark.container(volumes={{"victim": "/tmp/data:rw"}})
        def test_1_makes_the_volume():
            open("/tmp/data/x", "w").write("x")

        @pytest.mark.container
        def test_2_reaches_for_the_locks():
            lock = os.path.join(STORE, "volumes", "victim", "lock")
            with pytest.raises(FileNotFoundError):
                fcntl.flock(os.open(lock, os.O_RDONLY), fcntl.LOCK_EX)
            assert os.listdir(os.path.join(STORE, "volumes")) == []
            assert not os.path.exists(os.path.join(STORE, "tmp")) or os.listdir(os.path.join(STORE, "tmp")) == []
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)
    assert (store / "volumes" / "victim" / "lock").exists()  # it was there to take


PLANTED_CODE = (
    "conftest.py",
    "test_planted.py",
    "sub/__init__.py",
    "sub/__init__.pyc",
    "pytest.ini",
    "pytest.toml",  # pytest 9's own
    "test_planted.txt",  # a doctest: pytest collects test*.txt (found by red-team helper-33)
    "sub/README.md",  # a Python block, run by pytest-markdown-docs or sybil
    "notebook.ipynb",  # nbval, nbmake
)


def test_an_output_directory_cannot_plant_code_for_the_next_run(pytester: pytest.Pytester) -> None:
    """A syrupy snapshot directory is an output, inside the tests, and the next run collects it: a conftest.py
    or a test module a sandboxed test wrote there ran in the next run's pytest process, on the host
    (--sandbox=all collects there); an __init__.py makes a package that shadows a module of its name. None of
    it is carried (each a warning); the test's data files there are."""
    marker = pytester.path.parent / f"planted-{uuid.uuid4().hex}"
    pytester.makepyfile(
        test_probe=f"""
        import os

        PLANTED = {PLANTED_CODE!r}

        def test_plants(snapshot):
            here = os.path.join(os.path.dirname(__file__), "__snapshots__")
            os.makedirs(os.path.join(here, "__pycache__"), exist_ok=True)
            os.makedirs(os.path.join(here, "sub"), exist_ok=True)
            code = "open({str(marker)!r}, 'w').write('ran on the host')"
            for name in PLANTED:
                with open(os.path.join(here, name), "w") as f:
                    f.write(f"```python\\n{{code}}\\n```\\n" if name.endswith(".md") else f">>> {{code}}\\n")
            with open(os.path.join(here, "__pycache__", "conftest.cpython-311.pyc"), "w") as f:
                f.write("x")
            for data in ("data.txt", "test_data.txt", "notes.md"):  # text without examples is data
                with open(os.path.join(here, data), "w") as f:
                    f.write("x >> y\\n")
        """
    )
    host_collects = ("--sandbox=all", "--sandbox-collection=host")  # the next run's conftest.py would run on the host
    result = pytester.runpytest_subprocess(*host_collects)
    result.assert_outcomes(passed=1, warnings=len(PLANTED_CODE))
    for name in PLANTED_CODE:
        result.stdout.fnmatch_lines([f"*{name} is not carried: a later run would execute it*"])
    snapshots = pytester.path / "__snapshots__"
    carried = sorted(str(path.relative_to(snapshots)) for path in snapshots.rglob("*") if path.is_file())
    assert carried == ["data.txt", "notes.md", "test_data.txt"]
    pytester.runpytest_subprocess(*host_collects).assert_outcomes(passed=1, warnings=len(PLANTED_CODE))
    pytester.runpytest_subprocess("-p", "no:sandbox", "-p", "no:randomly").assert_outcomes(passed=1)  # plain
    assert not marker.exists()


MESSAGE_THAT_BROKE_PYTEST = {
    "category-of-three": """
        from pytest_sandbox import protocol
        from pytest_sandbox.runtime import test_process

        def test_attack():
            protocol.send(test_process._channel, {"type": "warning", "message": "m", "when": "runtest",
                                                  "category": ["a", "b", "c"], "filename": "f", "lineno": 1})
    """,
    "category-via-getattr": """
        from pytest_sandbox import protocol
        from pytest_sandbox.runtime import test_process

        def test_attack():  # a property or a module __getattr__ in pytest would run on the sandbox's say
            protocol.send(test_process._channel, {"type": "warning", "message": "m", "when": "runtest",
                                                  "category": ["pytest", "Config.rootpath"], "filename": "f",
                                                  "lineno": 1})
    """,
    "timeout-text-without-a-timeout": """
        import os

        def test_attack():
            for fd in map(int, os.listdir("/proc/self/fd")):
                try:
                    if "sandbox-crash" in os.readlink(f"/proc/self/fd/{fd}"):
                        os.write(fd, b"Timeout (0:00:01)!\\n")
                except OSError:
                    pass
            os._exit(1)
    """,
}


@pytest.mark.parametrize("attack", sorted(MESSAGE_THAT_BROKE_PYTEST))
def test_a_message_pytest_cannot_use_fails_no_more_than_its_test(pytester: pytest.Pytester, attack: str) -> None:
    """A warning naming no (module, qualname) pair, or a crash dump that reads like a timeout's where the
    test had none, raised in pytest (TypeError): an INTERNALERROR, and the later tests never ran."""
    pytester.makepyfile(test_a=MESSAGE_THAT_BROKE_PYTEST[attack])
    pytester.makepyfile(test_b="def test_later():\n    assert False, 'really ran'\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox=all")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*really ran*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.skipif(landlock.unavailable_reason() is not None, reason=str(landlock.unavailable_reason()))
def test_the_hosts_abstract_sockets_are_out_of_reach_on_the_host_network(pytester: pytest.Pytester) -> None:
    """An abstract unix socket belongs to a network namespace, not to a file a mount could mask: with
    network="host" a test shared the host's (a containerd shim's, a desktop's X11 and D-Bus). Each test
    sandbox is a Landlock domain scoped for abstract sockets."""
    name = f"pytest-sandbox-host-listener-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen()
        pytester.makepyfile(f"""
            import os, socket
            import pytest

            @pytest.mark.container(network="host")
            def test_attack():
                assert os.readlink("/proc/self/ns/net") == "{os.readlink("/proc/self/ns/net")}"
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    with pytest.raises(PermissionError):
                        conn.connect("\\0{name}")
        """)
        pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
