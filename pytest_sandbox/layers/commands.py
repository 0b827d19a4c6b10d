"""Commands inside an image: the process that runs in an image root (``linux.rootfs`` mounts it).

Used three ways: ``RUN`` steps of a build (the overlay's upper dir becomes the new
layer), ``sandbox.run()``/``spawn()`` in a test marked with ``image=`` (the image
root is mounted once per test, every command sees the same read/write layer), and
``pytest-sandbox shell``.

A command gets its own user, mount, pid, uts and ipc namespaces, and a network
namespace unless ``network="host"``; the image root is pivoted to, with a fresh /proc
(/proc/sys and the like read-only or masked), a minimal /dev and a read-only /sys.
The caller's uid is the image's user (root by default) inside; root maps every id
onto itself. The image's root keeps Docker's default capabilities, valid only in
its own user namespace; any other user none; no_new_privs either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from .. import protocol
from ..errors import SandboxError, SetupError
from ..linux import process, rootfs, syscalls, userns
from .format import env_mapping

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a waiter's: passed on to a graceful command


class ContainerError(SandboxError):
    """A command could not be started in an image."""


# -- the process ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How one command runs in an image root."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str = "/"
    hostname: str = "sandbox"
    network: str = "none"
    share_dev: bool = False  # inside a sandbox: its minimal /dev is bound in whole (one mount, not ten)
    graceful: bool = False  # SIGTERM, SIGINT and SIGHUP to the waiter go on to the command (a service's stop)


def _passwd_lookup(root: str, user: str) -> tuple[int, int, str]:
    """uid, gid and home of ``user`` (a name or number, optionally ':group') in the image."""
    name, _, group = user.partition(":")
    uid = gid = -1
    home = "/"
    try:
        with open(os.path.join(root, "etc/passwd")) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and (fields[0] == name or fields[2] == name):
                    uid, gid, home = int(fields[2]), int(fields[3]), fields[5]
                    break
    except (OSError, ValueError):
        pass
    if uid < 0:
        if not name.isdigit():
            raise ContainerError(f"user {name!r} is not in the image's /etc/passwd")
        uid, gid = int(name), int(name)
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                with open(os.path.join(root, "etc/group")) as f:
                    matches = [int(line.split(":")[2]) for line in f if line.split(":")[0] == group]
            except (OSError, ValueError, IndexError):
                matches = []
            if not matches:
                raise ContainerError(f"group {group!r} is not in the image's /etc/group")
            gid = matches[0]
    return uid, gid, home


def is_root_user(user: str) -> bool:
    """Whether an image's ``USER`` is root (also when unset), which needs no /etc/passwd."""
    return not user or user in ("root", "0", "0:0")


def resolve_user(root: str, user: str) -> tuple[int, int, str]:
    if is_root_user(user):
        return 0, 0, "/root"
    return _passwd_lookup(root, user)


def _namespace_flags(run: RunSpec) -> int:
    """The namespaces a command gets besides its user and pid ones: a network one unless it shares the caller's."""
    flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
    return flags | syscalls.CLONE_NEWNET if run.network == "none" else flags


def _report_setup_failure(error_w: int, exc: BaseException) -> NoReturn:
    """In the child that sets a command up: say on ``error_w`` why it did not start, and exit 127."""
    message = str(exc) if isinstance(exc, (ContainerError, SetupError)) else f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        os.write(error_w, message.encode()[:4000])
    os._exit(127)


def _read_to_end(fd: int) -> bytes:
    """What a setup child wrote on its error pipe; empty once the command's exec closed it."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _exit_code(status: int) -> int:
    """A command's exit status as its waiter passes it on: 128 + the signal that ended it, as a shell says."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _become_command(
    root: str, run: RunSpec, uid: int, gid: int, every_id: bool, root_capabilities: tuple[int, ...]
) -> None:
    """As pid 1 of the command's pid namespace: pseudo filesystems and pivot, host name, network, then the
    user. ``every_id``: every id is mapped, so the image's user is switched to here."""
    rootfs.enter_image_root(root, run.share_dev)
    socket.sethostname(run.hostname)
    if run.network == "none":
        syscalls.loopback_up()
    # Capabilities: ``root_capabilities`` (Docker's default set) for the image's root, none for any other
    # user; the bounding set first, while CAP_SETPCAP is held.
    keep = root_capabilities if uid == 0 else ()
    userns.trim_bounding_set(keep)
    if every_id and (uid, gid) != (0, 0):
        with contextlib.suppress(PermissionError):  # denied where only one id could be mapped
            os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    try:
        os.chdir(run.workdir or "/")
    except OSError as exc:
        raise ContainerError(f"working directory {run.workdir}: {exc.strerror}") from None
    userns.limit_capabilities(keep)


class _Launch:
    """The preexec step of Popen: namespaces, ids, root; then a fork so the command is pid 1.

    The first process stays outside the new pid namespace as a waiter with every fd
    closed (so pipes see EOF when the command's do); it exits with the command's
    status. Killing it kills the namespace (PDEATHSIG on pid 1).
    """

    def __init__(
        self,
        prepare_root: Callable[[], str],
        run: RunSpec,
        uid: int,
        gid: int,
        error_w: int,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.prepare_root = prepare_root
        self.after = after  # run by the waiter once the command is gone, in the mounts prepare_root made
        self.run = run
        self.uid, self.gid = uid, gid
        self.error_w = error_w
        self.outer_uid, self.outer_gid = os.geteuid(), os.getegid()
        self.parent_pid = os.getpid()

    def __call__(self) -> None:
        try:
            os.set_inheritable(self.error_w, False)  # EOF at exec tells the caller the command started
            self._setup()
        except BaseException as exc:
            _report_setup_failure(self.error_w, exc)

    def _setup(self) -> None:
        """The steps, in order; each must happen before the next."""
        # 1. Die with the caller: a pytest killed with -9 takes the command along.
        process.die_with_parent(self.parent_pid)
        # 2. root builds the image's root with its own rights (overlayfs on the host's directories as a
        #    FROM host image needs them), in a mount namespace of its own first. A sandboxed root has no
        #    capabilities and may not map uid 0: its sandbox's launcher starts the command (below).
        privileged = self.outer_uid == 0 and userns.has_capabilities()
        if not privileged and _launcher is not None:
            _delegate(_launcher, self.run, self.uid, self.gid)  # root in a sandbox: never returns
        root = None
        if privileged:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            root = self.prepare_root()
        # 3. Always a user namespace that is not the caller's, which owns the new mount, uts, ipc (and
        #    network) namespaces: every mount inherited from outside is locked (no umount, no read-write
        #    remount), and capabilities only count inside. root maps every id onto itself (chown works),
        #    anyone else their one id to the image's user.
        userns.unshare_mapped(_namespace_flags(self.run), (0, 0) if privileged else (self.uid, self.gid))
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        if root is None:
            root = self.prepare_root()
        # 4. The command becomes pid 1 of its own pid namespace (a fork: unshare applies to children).
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = os.fork()
        if pid != 0:
            self._wait(pid)
        # 5. As pid 1: die with the waiter, pseudo filesystems and pivot, host name, network, then the user.
        process.die_with_parent(0)
        if self.after is not None:  # keep the waiter's view of the mounts: pivot in a namespace of our own
            syscalls.unshare(syscalls.CLONE_NEWNS)
        _become_command(root, self.run, self.uid, self.gid, privileged, userns.CONTAINER_CAPABILITIES)

    def _wait(self, pid: int) -> NoReturn:
        """The waiter: outside the command's pid namespace, every fd closed; exits with its status."""
        # Signals first: Popen returns once the fds are closed, and terminate() may come at once.
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda sig, _: os.kill(pid, sig if self.run.graceful else signal.SIGKILL))
        # Not via /proc: pid 1 is about to pivot this shared mount namespace away from it.
        os.closerange(0, 0x7FFFFFFF)
        _, status = os.waitpid(pid, 0)  # PEP 475: retried after a signal handler
        code = _exit_code(status)
        if self.after is not None:
            try:
                self.after()
            except BaseException:  # the hook reports its own failures
                code = AFTER_FAILED
        os._exit(code)


AFTER_FAILED = 125  # exit status of a spawn whose ``after`` hook raised


# -- root's commands in a sandbox: the launcher ---------------------------------------------
#
# A command's image root needs uid 0 mapped in the command's user namespace, which since Linux 5.12
# takes CAP_SETFCAP, and a sandboxed root test has no capability. A user namespace made for it while
# the sandbox was built would do, but the test could enter it too (its euid owns it) and hold every
# capability over every file owned by a mapped id it can see: a mode-000 file of the rootdir, another
# user's files. So that namespace stays in the launcher: a process forked while the sandbox is built,
# before any code of the test runs, with the capabilities the test lacks, not dumpable (no ptrace,
# no /proc/PID/fd, mem or environ for the test). The test's side only asks it to start a command.

_launcher: socket.socket | None = None  # this process's line to its sandbox's launcher

_LAUNCH_FIELDS: dict[str, tuple[type, ...]] = {
    "argv": (list,),
    "env": (dict,),
    "workdir": (str,),
    "hostname": (str,),
    "network": (str,),
    "share_dev": (bool,),
    "uid": (int,),
    "gid": (int,),
}


def start_launcher(image_root: str, joined_pid_namespace: bool = False) -> int:
    """Fork the launcher of this sandbox (call with capabilities, before the test's code runs); the fd of
    this process's end of the line to it. Commands this process or its children spawn go through it.
    ``joined_pid_namespace``: this process joined the sandbox's pid namespace for its children (setns), so
    the launcher is born there and sees it as a parent outside (pid 0)."""
    global _launcher
    namespace = userns.commands_namespace()
    ours, theirs = protocol.socketpair()
    parent = 0 if joined_pid_namespace else os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            _launcher_main(theirs, namespace, image_root, parent)
        finally:
            os._exit(1)
    os.close(namespace)
    theirs.close()
    _launcher = ours
    return ours.fileno()


def _launcher_main(control: socket.socket, namespace: int, image_root: str, parent: int) -> NoReturn:
    process.become_helper("sandbox-launcher", parent, keep=(control.fileno(), namespace))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # each request's handler reaps itself away
    while True:
        try:
            request, fds = protocol.recv(control)
        except protocol.ProtocolError:
            continue
        if request is None:
            os._exit(0)
        if len(fds) != 4 or not _valid_launch(request):
            for fd in fds:  # the asking side sees its line close: an error
                os.close(fd)
            continue
        if os.fork() == 0:
            try:
                # A command starts with the dispositions Popen gives one (Python ignores these two).
                for signum in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(signum, signal.SIG_DFL)
                control.close()
                _handle_launch(request, fds, namespace, image_root)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)


def _valid_launch(request: dict[str, Any]) -> bool:
    try:
        protocol.check({"type": "launch", **request}, {"launch": _LAUNCH_FIELDS})
    except protocol.ProtocolError:
        return False
    return (
        bool(request["argv"])
        and all(isinstance(arg, str) for arg in request["argv"])
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
        and request["network"] in ("none", "inherit")
        and all(0 <= request[name] < 2**32 - 1 for name in ("uid", "gid"))
    )


def _handle_launch(request: dict[str, Any], fds: list[int], namespace: int, image_root: str) -> NoReturn:
    """One command: its namespaces in the launcher's user namespace, pid 1 with the test's stdio; then
    wait for it, kill it when the asking side goes or asks, and tell that side how it ended."""
    conn = socket.socket(fileno=fds[0])
    stdio = fds[1:]
    run = RunSpec(
        argv=tuple(request["argv"]),
        env=request["env"],
        workdir=request["workdir"],
        hostname=request["hostname"],
        network=request["network"],
        share_dev=request["share_dev"],
    )
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    try:
        syscalls.setns(namespace, syscalls.CLONE_NEWUSER)
        syscalls.unshare(_namespace_flags(run))
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = os.fork()
    except OSError as exc:
        protocol.send(conn, {"error": f"cannot start {run.argv[0]!r}: {exc}"})
        os._exit(1)
    if pid == 0:
        try:
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            os.closerange(3, error_w)
            os.closerange(error_w + 1, 0x7FFFFFFF)
            process.die_with_parent(0)
            if (request["uid"], request["gid"]) != (0, 0):
                raise ContainerError(
                    f"user {request['uid']}:{request['gid']}: a root test's commands run as root only "
                    "(its sandbox maps no other id for them)"
                )
            _become_command(image_root, run, 0, 0, False, userns.SANDBOXED_ROOT_CAPABILITIES)
            _exec(run)
        except BaseException as exc:
            _report_setup_failure(error_w, exc)
    os.close(error_w)
    for fd in stdio:
        os.close(fd)
    failure = _read_to_end(error_r)
    if failure:
        os.waitpid(pid, 0)
        protocol.send(conn, {"error": failure.decode(errors="replace")})
        os._exit(0)
    protocol.send(conn, {"started": True})
    command = os.pidfd_open(pid)
    while True:
        readable, _, _ = select.select([conn.fileno(), command], [], [])
        if command in readable:
            _, status = os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                protocol.send(conn, {"code": _exit_code(status)})
            os._exit(0)
        try:
            asked, _ = protocol.recv(conn)
        except protocol.ProtocolError:
            asked = {}
        if asked is not None and asked.get("signal") in STOP_SIGNALS:  # a graceful command's stop
            os.kill(pid, asked["signal"])
            continue
        os.kill(pid, signal.SIGKILL)  # asked to, or the asking side is gone
        if asked is None:
            os._exit(0)


def _exec(run: RunSpec) -> NoReturn:
    """execve ``run.argv`` as Popen would (a bare name searched on the command's PATH), with Popen's errors."""
    try:
        os.execvpe(run.argv[0], list(run.argv), dict(run.env))
    except (FileNotFoundError, NotADirectoryError):
        raise ContainerError(
            f"{run.argv[0]!r}: no such command in the image (PATH={run.env.get('PATH', '')})"
        ) from None
    except PermissionError:
        raise ContainerError(f"{run.argv[0]!r}: permission denied in the image") from None


def _delegate(launcher: socket.socket, run: RunSpec, uid: int, gid: int) -> NoReturn:
    """In the Popen child: have the launcher start the command with this process's stdio, then stay as its
    waiter (as ``_Launch._wait``), every other fd closed, so Popen sees the command start."""
    ours, theirs = protocol.socketpair()
    request = {
        "argv": list(run.argv),
        "env": dict(run.env),
        "workdir": run.workdir,
        "hostname": run.hostname,
        "network": run.network,
        "share_dev": run.share_dev,
        "uid": uid,
        "gid": gid,
    }
    # Signals first: Popen returns once the fds are closed, and terminate() may come at once. The
    # launcher reads a kill that comes before the command started once it has.
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda sig, _: protocol.send(ours, {"signal": sig} if run.graceful else {"kill": True}))
    protocol.send(launcher, request, fds=(theirs.fileno(), 0, 1, 2))
    theirs.close()
    reply, _ = protocol.recv(ours)
    if reply is None:
        raise ContainerError("the sandbox's command launcher is gone")
    if "error" in reply:
        raise ContainerError(str(reply["error"]))
    for fd in range(0, 3):
        os.close(fd)
    os.closerange(3, ours.fileno())
    os.closerange(ours.fileno() + 1, 0x7FFFFFFF)
    while True:
        reply, _ = protocol.recv(ours)
        if reply is None:
            os._exit(128 + signal.SIGKILL)
        if isinstance(reply.get("code"), int):
            os._exit(reply["code"])


def spawn(
    prepare_root: Callable[[], str],
    run: RunSpec,
    uid: int = 0,
    gid: int = 0,
    after: Callable[[], None] | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """Start ``run.argv`` in the root ``prepare_root`` returns (called in the new mount namespace).

    Returns once the command has been exec'd, or raises ContainerError saying why it was not.
    """
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            proc = subprocess.Popen(
                list(run.argv),
                env=dict(run.env),
                preexec_fn=_Launch(prepare_root, run, uid, gid, error_w, after),
                pass_fds=(error_w,),
                **popen_kwargs,
            )
        except FileNotFoundError:
            raise ContainerError(
                f"{run.argv[0]!r}: no such command in the image (PATH={run.env.get('PATH', '')})"
            ) from None
        except PermissionError:
            raise ContainerError(f"{run.argv[0]!r}: permission denied in the image") from None
        except subprocess.SubprocessError as exc:
            raise ContainerError(f"cannot start {run.argv[0]!r}: {exc}") from None
        finally:
            os.close(error_w)
        failure = _read_to_end(error_r)
    finally:
        os.close(error_r)
    if failure:
        proc.wait()
        raise ContainerError(failure.decode(errors="replace"))
    return proc


def image_env(config_env: Sequence[str], extra: Mapping[str, str], home: str, hostname: str) -> dict[str, str]:
    """The environment a command starts with: PATH/HOME defaults, the image's ENV, then ``extra``."""
    return {"PATH": DEFAULT_PATH, "HOME": home, "HOSTNAME": hostname, **env_mapping(config_env), **extra}
