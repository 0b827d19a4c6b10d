"""Commands inside an image: the overlay root and the process that runs in it.

Used three ways: ``RUN`` steps of a build (the overlay's upper dir becomes the new
layer), ``sandbox.run()``/``spawn()`` in a test marked with ``image=`` (the image
root is mounted once per test, every command sees the same read/write layer), and
``pytest-sandbox shell``.

A command gets its own user (unless root), mount, pid, uts and ipc namespaces, and
a network namespace unless ``network="host"``; the image root is pivoted to, with a
fresh /proc, a minimal /dev and a read-only /sys. The caller's uid is the image's
user (root by default) inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _linux
from .errors import SandboxError, SetupError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_LEGACY_OPTIONS_MAX = 4095
LEGACY_ENV = "PYTEST_SANDBOX_OVERLAY_LEGACY"  # set: use the option string even where lowerdir+ exists


class ContainerError(SandboxError):
    """A command could not be started in an image."""


# -- the overlay root -----------------------------------------------------------------------

def _mount_with_lowerdir_plus(lowers_top_first: Sequence[str], upper: str, work: str, target: str) -> bool:
    """The new mount API with one ``lowerdir+`` per layer; False where the kernel lacks it.

    Before Linux 6.5 overlayfs takes fsconfig keys as a legacy option string and only
    refuses ``lowerdir+`` when the superblock is created, so that is where it is judged.
    """
    fs = _linux.fsopen("overlay")
    try:
        try:
            for lower in lowers_top_first:
                _linux.fsconfig(fs, "lowerdir+", lower)
            _linux.fsconfig(fs, "upperdir", upper)
            _linux.fsconfig(fs, "workdir", work)
            _linux.fsconfig(fs, "userxattr")
            mnt = _linux.fsmount(fs)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
    finally:
        os.close(fs)
    try:
        _linux.move_mount(mnt, target)
    finally:
        os.close(mnt)
    return True


def overlay_mount(lowers_top_first: Sequence[str], upper: str, work: str, target: str) -> None:
    """Mount overlay(lowers, upper) on ``target``.

    ``lowerdir+`` (Linux 6.8+) takes one layer per call, so any number fits; older
    kernels get the legacy option string, with each layer named by a short
    ``/proc/self/fd`` path to stay under the 4095-byte limit.
    """
    if not os.environ.get(LEGACY_ENV) and _mount_with_lowerdir_plus(lowers_top_first, upper, work, target):
        return
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in lowers_top_first]
    try:
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        options = f"lowerdir={lowerdir},upperdir={upper},workdir={work},userxattr"
        if len(options) > _LEGACY_OPTIONS_MAX:
            raise ContainerError(f"the image has {len(fds)} layers: more than this kernel's overlay option string "
                                 "holds (Linux 6.8+ has no such limit)")
        _linux.mount("overlay", target, "overlay", 0, options)
    finally:
        for fd in fds:
            os.close(fd)


def host_based_root(lowers_top_first: Sequence[str], layer_dir: str, merged: str, keep_out: str,
                    unprivileged: bool) -> str:
    """Mount a FROM host image's root on ``merged``: the host read-only, each top-level directory
    an overlay of the image's layers over the host's, with uppers in ``layer_dir/<dir>/upper``.

    ``keep_out`` (the image store) must not be under an overlaid directory: overlayfs refuses
    layers inside other layers, so the top-level directory holding it stays read-only. So do
    directories with mounts below them when ``unprivileged`` (the caller's uid outside).
    """
    from .rootfs import NOT_OVERLAID, host_based_lowers, mounts_under, top_level_dir

    clone = _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC | _linux.AT_RECURSIVE
    host = _linux.open_tree("/", clone)
    _linux.mount_setattr(host, _linux.MOUNT_ATTR_RDONLY | _linux.MOUNT_ATTR_NOSUID)
    _linux.move_mount(host, merged)
    os.close(host)
    store_top = top_level_dir(keep_out)
    for name in sorted(os.listdir("/")):
        path = f"/{name}"
        if name in NOT_OVERLAID or path == store_top or os.path.islink(path) or not os.path.isdir(path):
            continue
        if unprivileged and mounts_under(path):
            continue  # locked mounts below: overlayfs refuses it without root; stays read-only
        lowers = host_based_lowers(lowers_top_first, path, f"{layer_dir}/.empty")
        os.makedirs(f"{layer_dir}/{name}/upper", exist_ok=True)  # exists for a kept container
        os.makedirs(f"{layer_dir}/{name}/work", exist_ok=True)
        overlay_mount(lowers, f"{layer_dir}/{name}/upper", f"{layer_dir}/{name}/work", merged + path)
    for place in ("/tmp", "/var/tmp", "/run"):
        if os.path.isdir(merged + place) and not os.path.islink(merged + place):
            _linux.mount("sandbox-tmp", merged + place, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV,
                         "mode=0755" if place == "/run" else "mode=1777")
    return merged


def mount_image_root(lowers_top_first: Sequence[str], layer_dir: str, merged: str, *, host_based: bool,
                     store_root: str, unprivileged: bool, on_tmpfs: bool) -> str:
    """In a new mount namespace: an image's root on ``merged`` with its read/write layer in ``layer_dir``
    (``upper``/``work``; per top-level directory for FROM host), on a tmpfs mounted there with ``on_tmpfs``
    (overlayfs refuses an upper dir on overlayfs, as in a store inside a container's root)."""
    if on_tmpfs:
        _linux.mount("image-upper", layer_dir, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "mode=0755")
    if host_based:
        return host_based_root(lowers_top_first, layer_dir, merged, store_root, unprivileged)
    upper, work = os.path.join(layer_dir, "upper"), os.path.join(layer_dir, "work")
    for path in (upper, work):
        os.makedirs(path, exist_ok=True)  # exists for a kept container
    if not lowers_top_first:  # an image with no layer yet (FROM scratch)
        lowers_top_first = [os.path.join(layer_dir, ".empty")]
        os.makedirs(lowers_top_first[0], exist_ok=True)
    overlay_mount(lowers_top_first, upper, work, merged)
    return merged


def layer_uppers(layer_dir: str, host_based: bool) -> list[tuple[str, str]]:
    """(where it goes in a layer, upper dir) for each upper of ``mount_image_root`` that holds changes."""
    if host_based:
        return host_based_uppers(layer_dir)
    upper = os.path.join(layer_dir, "upper")
    return [("", upper)] if os.listdir(upper) else []


def host_based_uppers(layer_dir: str) -> list[tuple[str, str]]:
    """(top-level directory, its upper dir) for each upper of ``host_based_root`` that holds changes."""
    found = []
    for name in sorted(os.listdir(layer_dir)):
        upper = os.path.join(layer_dir, name, "upper")
        if not name.startswith(".") and os.path.isdir(upper) and os.listdir(upper):
            found.append((name, upper))
    return found


# -- the process ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How one command runs in an image root."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str = "/"
    user: str = ""
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


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _populate_dev(dev: str) -> None:
    """A minimal /dev: host nodes bound onto a tmpfs (mknod is refused in a user namespace)."""
    _linux.mount("sandbox-dev", dev, "tmpfs", _linux.MS_NOSUID | _linux.MS_NOEXEC, "mode=0755,size=64k")
    for node in DEV_NODES:
        if os.path.exists(f"/dev/{node}"):
            open(f"{dev}/{node}", "w").close()
            _linux.mount(f"/dev/{node}", f"{dev}/{node}", None, _linux.MS_BIND)
    for sub in ("pts", "shm"):
        os.mkdir(f"{dev}/{sub}")
    _linux.mount("devpts", f"{dev}/pts", "devpts", _linux.MS_NOSUID | _linux.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
    _linux.mount("shm", f"{dev}/shm", "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "mode=1777")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")


def _ensure_dir(path: str) -> bool:
    if os.path.isdir(path) and not os.path.islink(path):
        return True
    if os.path.lexists(path):
        return False
    os.makedirs(path, mode=0o755, exist_ok=True)
    return True


def _enter_root(root: str, run: RunSpec, uid: int, gid: int, privileged: bool) -> None:
    """In the new namespaces, as pid 1: mount the pseudo filesystems, pivot, become the user."""
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if _ensure_dir(f"{root}/proc"):
        _linux.mount("proc", f"{root}/proc", "proc", _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC)
    if _ensure_dir(f"{root}/dev"):
        if run.share_dev:
            dev = _linux.open_tree("/dev", _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC | _linux.AT_RECURSIVE)
            _linux.move_mount(dev, f"{root}/dev")
            os.close(dev)
        else:
            _populate_dev(f"{root}/dev")
    if os.path.isdir("/sys") and _ensure_dir(f"{root}/sys"):
        sys_fd = _linux.open_tree("/sys", _linux.OPEN_TREE_CLONE | _linux.OPEN_TREE_CLOEXEC | _linux.AT_RECURSIVE)
        _linux.mount_setattr(sys_fd, _linux.MOUNT_ATTR_RDONLY | _linux.MOUNT_ATTR_NOSUID | _linux.MOUNT_ATTR_NODEV
                             | _linux.MOUNT_ATTR_NOEXEC)
        _linux.move_mount(sys_fd, f"{root}/sys")
        os.close(sys_fd)
    os.chdir(root)
    try:
        _linux.pivot_root(".", ".")
        _linux.umount2(".", _linux.MNT_DETACH)
    except OSError as exc:
        # Inside a sandbox without root the mounts inherited from it are locked and pivot_root
        # refuses them; chroot keeps the command in the image (what lies under is the sandbox).
        if exc.errno != errno.EINVAL:
            raise
        os.chroot(".")
    os.chdir("/")
    socket.sethostname(run.hostname)
    if run.network == "none":
        _linux.loopback_up()
    if privileged and (uid, gid) != (0, 0):
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    try:
        os.chdir(run.workdir or "/")
    except OSError as exc:
        raise ContainerError(f"working directory {run.workdir}: {exc.strerror}") from None


class _Launch:
    """The preexec step of Popen: namespaces, ids, root; then a fork so the command is pid 1.

    The first process stays outside the new pid namespace as a waiter with every fd
    closed (so pipes see EOF when the command's do); it exits with the command's
    status. Killing it kills the namespace (PDEATHSIG on pid 1).
    """

    def __init__(self, prepare_root: Callable[[], str], run: RunSpec, uid: int, gid: int, error_w: int,
                 after: Callable[[], None] | None = None) -> None:
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
        _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # the caller killed -9: the command goes too
        if os.getppid() != self.parent_pid:
            os._exit(137)
        privileged = self.outer_uid == 0
        flags = _linux.CLONE_NEWNS | _linux.CLONE_NEWUTS | _linux.CLONE_NEWIPC
        if not privileged:
            flags |= _linux.CLONE_NEWUSER
        if self.run.network == "none":
            flags |= _linux.CLONE_NEWNET
        _linux.unshare(flags)
        if not privileged:  # one id: the caller is the image's user inside
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{self.uid} {self.outer_uid} 1\n")
            _write("/proc/self/gid_map", f"{self.gid} {self.outer_gid} 1\n")
        _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
        root = self.prepare_root()
        _linux.unshare(_linux.CLONE_NEWPID)
        pid = os.fork()
        if pid != 0:
            # Not via /proc: pid 1 is about to pivot this shared mount namespace away from it.
            os.closerange(0, 0x7FFFFFFF)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, lambda *_: os.kill(pid, signal.SIGKILL))
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            if self.after is not None:
                try:
                    self.after()
                except BaseException:  # the hook reports its own failures
                    code = AFTER_FAILED
            os._exit(code)
        if self.after is not None:  # keep the waiter's view of the mounts: pivot in a namespace of our own
            _linux.unshare(_linux.CLONE_NEWNS)
        _enter_root(root, self.run, self.uid, self.gid, privileged)


AFTER_FAILED = 125  # exit status of a spawn whose ``after`` hook raised


def spawn(prepare_root: Callable[[], str], run: RunSpec, uid: int = 0, gid: int = 0,
          after: Callable[[], None] | None = None, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``run.argv`` in the root ``prepare_root`` returns (called in the new mount namespace).

    Returns once the command has been exec'd, or raises ContainerError saying why it was not.
    """
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            proc = subprocess.Popen(list(run.argv), env=dict(run.env),
                                    preexec_fn=_Launch(prepare_root, run, uid, gid, error_w, after),
                                    pass_fds=(error_w,), **popen_kwargs)
        except FileNotFoundError:
            raise ContainerError(f"{run.argv[0]!r}: no such command in the image "
                                 f"(PATH={run.env.get('PATH', '')})") from None
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


def env_mapping(config_env: Sequence[str]) -> dict[str, str]:
    """An image config's ``Env`` (``KEY=VALUE`` items) as a mapping."""
    env = {}
    for item in config_env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
    return env


def image_env(config_env: Sequence[str], extra: Mapping[str, str], home: str, hostname: str) -> dict[str, str]:
    """The environment a command starts with: PATH/HOME defaults, the image's ENV, then ``extra``."""
    return {"PATH": DEFAULT_PATH, "HOME": home, "HOSTNAME": hostname, **env_mapping(config_env), **extra}
