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
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from ..errors import SandboxError, SetupError
from ..linux import process, rootfs, syscalls, userns
from .format import env_mapping

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
            message = str(exc) if isinstance(exc, (ContainerError, SetupError)) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                os.write(self.error_w, message.encode()[:4000])
            os._exit(127)

    def _setup(self) -> None:
        """The steps, in order; each must happen before the next."""
        # 1. Die with the caller: a pytest killed with -9 takes the command along.
        process.die_with_parent(self.parent_pid)
        # 2. root builds the image's root with its own rights (overlayfs on the host's directories as a
        #    FROM host image needs them), in a mount namespace of its own first. A test process has no
        #    capabilities, root's neither: it enters the user namespace made for its commands below.
        privileged = self.outer_uid == 0 and userns.has_capabilities()
        prepared = None if privileged else userns.commands_namespace()
        root = None
        if privileged:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            root = self.prepare_root()
        # 3. Always a user namespace that is not the caller's, which owns the new mount, uts, ipc (and
        #    network) namespaces: every mount inherited from outside is locked (no umount, no read-write
        #    remount), and capabilities only count inside. root maps every id onto itself (chown works),
        #    anyone else their one id to the image's user.
        flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
        if self.run.network == "none":
            flags |= syscalls.CLONE_NEWNET
        if prepared is not None:
            syscalls.setns(prepared, syscalls.CLONE_NEWUSER)
            syscalls.unshare(flags)
        else:
            userns.unshare_mapped(flags, (0, 0) if privileged else (self.uid, self.gid))
        every_id = privileged or prepared is not None  # then the image's user is switched to below
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
        rootfs.enter_image_root(root, self.run.share_dev)
        socket.sethostname(self.run.hostname)
        if self.run.network == "none":
            syscalls.loopback_up()
        # 6. Capabilities: Docker's default set for the image's root, none for any other user; the
        #    bounding set first, while CAP_SETPCAP is held.
        keep = userns.CONTAINER_CAPABILITIES if self.uid == 0 else ()
        userns.trim_bounding_set(keep)
        if every_id and (self.uid, self.gid) != (0, 0):
            with contextlib.suppress(PermissionError):  # denied where only one id could be mapped
                os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        try:
            os.chdir(self.run.workdir or "/")
        except OSError as exc:
            raise ContainerError(f"working directory {self.run.workdir}: {exc.strerror}") from None
        userns.limit_capabilities(keep)

    def _wait(self, pid: int) -> NoReturn:
        """The waiter: outside the command's pid namespace, every fd closed; exits with its status."""
        # Not via /proc: pid 1 is about to pivot this shared mount namespace away from it.
        os.closerange(0, 0x7FFFFFFF)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: os.kill(pid, signal.SIGKILL))
        _, status = os.waitpid(pid, 0)  # PEP 475: retried after a signal handler
        code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if self.after is not None:
            try:
                self.after()
            except BaseException:  # the hook reports its own failures
                code = AFTER_FAILED
        os._exit(code)


AFTER_FAILED = 125  # exit status of a spawn whose ``after`` hook raised


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
        chunks = []
        while chunk := os.read(error_r, 4096):
            chunks.append(chunk)
    finally:
        os.close(error_r)
    if chunks:
        proc.wait()
        raise ContainerError(b"".join(chunks).decode(errors="replace"))
    return proc


def image_env(config_env: Sequence[str], extra: Mapping[str, str], home: str, hostname: str) -> dict[str, str]:
    """The environment a command starts with: PATH/HOME defaults, the image's ENV, then ``extra``."""
    return {"PATH": DEFAULT_PATH, "HOME": home, "HOSTNAME": hostname, **env_mapping(config_env), **extra}
