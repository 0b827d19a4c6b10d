"""A service's process: a sandbox built like a test's, whose process execs the service's command.

The zygote builds the sandbox (test_process.py's steps: namespaces, mount tree, pid 1, no capabilities);
where a test's process would wait for a test, this one gets the service's command and its log, runs the
setup commands of a fresh service, and execs the command. Its exit is the service's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
from typing import Any, NoReturn

from .. import credentials
from ..layers import commands
from ..linux import process, rootfs, seccomp, syscalls, userns
from ..spec import SandboxSpec
from . import cgroups

SETUP_FAILED = 125  # the exit code of a service whose setup command failed (the log says which)
NOT_STARTED = 127  # the command could not be executed (the log says why)


@dataclasses.dataclass(frozen=True)
class ServiceCommand:
    argv: tuple[str, ...]
    setup: tuple[tuple[str, ...], ...] = ()  # run in order before argv while the service is fresh
    fresh_when_empty: tuple[str, ...] = ()  # named volumes' targets: fresh while all are empty (none: always)
    notify: bool = False  # it gets a NOTIFY_SOCKET (sd_notify) for wait.notify()


@dataclasses.dataclass(frozen=True)
class ServiceLaunch:
    """What the pod zygote needs to start a service: decided in pytest before the zygote was forked."""

    spec: SandboxSpec
    command: ServiceCommand


def nodeid(name: str) -> str:
    """The name the zygote knows a service's sandbox by (kill, signal): never a test's node id."""
    return f"service:{name}"


def exec_service(command: dict[str, Any], log_fd: int, started_fd: int, image: InImage | None = None) -> NoReturn:
    """Become the service: stdio to its log, setup while fresh, then exec. Never returns.

    ``started_fd`` (close-on-exec) tells pytest the command runs: it closes with the exec, or says "!" first
    when the command did not start (then the log says why). With ``image`` (not a FROM host one) the
    commands run in the image's root and this process stays as their waiter."""
    stdio_for_a_command(log_fd, log_fd)
    os.close(log_fd)
    if image is not None:
        _serve_in_image(command, image, started_fd)
    try:
        if _fresh(command.get("fresh_when_empty") or ()):
            for argv in command.get("setup") or ():
                code = subprocess.call(list(argv), stdin=subprocess.DEVNULL)
                if code != 0:
                    _say(f"pytest-sandbox: setup command {list(argv)} exited with {code}")
                    os.write(started_fd, b"!")
                    os._exit(SETUP_FAILED)
        argv = list(command["argv"])
        if command.get("notify_socket"):  # the pod zygote's, bound in the pod: the command's, not its setup's
            os.environ["NOTIFY_SOCKET"] = "@" + str(command["notify_socket"])
        os.execvp(argv[0], argv)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
        _say(f"pytest-sandbox: cannot run {list(command['argv'])}: {exc}")
    os.write(started_fd, b"!")
    os._exit(NOT_STARTED)


@dataclasses.dataclass(frozen=True)
class InImage:
    """How a service's commands run in its image (as ``sandbox.run()`` runs a test's): root, user, env."""

    root: str  # where the image's root is mounted in the service's sandbox
    config_json: str
    spec: SandboxSpec

    @classmethod
    def of(cls, plan: rootfs.RootPlan, spec: SandboxSpec) -> InImage | None:
        """For a service in an image other than a FROM host one (whose root is the service's own), else None."""
        if plan.image is None or plan.image.host_based:
            return None
        return cls(plan.image_root, plan.image.config_json, spec)

    def spawn(self, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the image (stdio inherited); ContainerError if it cannot start."""
        config = json.loads(self.config_json)
        uid, gid, home = commands.resolve_user(self.root, config.get("User") or "")
        env = commands.image_env(
            config.get("Env") or [], {**dict(self.spec.env), **(extra_env or {})}, home, self.spec.hostname
        )
        run = commands.RunSpec(
            argv=tuple(argv),
            env=env,
            workdir=config.get("WorkingDir") or "/",
            hostname=self.spec.hostname,
            network="inherit",  # the pod's
            share_dev=True,
            graceful=True,
        )
        root = self.root
        return commands.spawn(lambda: root, run, uid, gid, stdin=subprocess.DEVNULL)


def _serve_in_image(command: dict[str, Any], image: InImage, started_fd: int) -> NoReturn:
    """Setup and command in the image; stays their waiter: a stop's SIGTERM goes on to the command, and its
    end is this process's (a signal that ended it ends this process the same way)."""
    try:
        if _fresh(command.get("fresh_when_empty") or ()):
            for argv in command.get("setup") or ():
                code = image.spawn(list(argv)).wait()
                if code != 0:
                    _say(f"pytest-sandbox: setup command {list(argv)} exited with {code}")
                    os.write(started_fd, b"!")
                    os._exit(SETUP_FAILED)
        notify = {"NOTIFY_SOCKET": "@" + str(command["notify_socket"])} if command.get("notify_socket") else {}
        proc = image.spawn(list(command["argv"]), notify)
    except (commands.ContainerError, OSError, ValueError) as exc:
        _say(f"pytest-sandbox: cannot run {list(command['argv'])}: {exc}")
        os.write(started_fd, b"!")
        os._exit(NOT_STARTED)
    for signum in commands.STOP_SIGNALS:
        signal.signal(signum, lambda sig, _: proc.send_signal(sig))
    os.close(started_fd)  # it runs
    code = proc.wait()
    if code - 128 in (*commands.STOP_SIGNALS, signal.SIGKILL):  # ended by a signal: so does this process
        signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    os._exit(code & 0xFF)


def stdio_for_a_command(stdout: int, stderr: int) -> None:
    """What a program started in a service gets: stdin /dev/null, ``stdout`` and ``stderr``, default signal
    dispositions and no blocked signal (Python ignores SIGPIPE and others, and exec keeps what is ignored)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _fresh(targets: list[str] | tuple[str, ...]) -> bool:
    """A service without named volumes is fresh at each start (its writes go with it); one with them while
    they are all empty (a new volume), as a database's initdb needs."""
    for target in targets:
        try:
            if os.listdir(target):
                return False
        except OSError:
            pass
    return True


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode(errors="replace"))


def exec_child(
    service_pidfd: int,
    spec: SandboxSpec,
    argv: list[str],
    stdio: list[int],
    backend: cgroups.Backend,
    go: int,
    image: InImage | None = None,
) -> int:
    """In a child of the pod zygote: join the service's namespaces, give up every capability, and run
    ``argv`` as a child (it is born in the service's pid namespace); returns its exit code. With ``image``
    the child starts it in the image's root, as the service's command runs: root's through a launcher
    started here with the capabilities (Docker's restricted set and a single-id map, as in the service),
    anyone else's in a user namespace of its own.

    It waits on ``go`` until the zygote has moved it into the service's cgroup (where there is one), so the
    command runs under the service's limits; without cgroups it sets the rlimits a service's process has."""
    if os.read(go, 1) != b"1":
        return NOT_STARTED
    os.close(go)
    # The command's fork below is a process of the service's pid namespace, where whatever a test left in
    # the service runs as the same user: from its first moment it holds nothing of the zygote's (its lines
    # to pytest, the host's cgroup directories, pytest's sockets). Root's also holds its launcher's line
    # (the launcher has capabilities): nobody may trace it or take its fds (pidfd_getfd).
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    stdio_for_a_command(*stdio)
    process.close_fds_but((0, 1, 2, service_pidfd))
    flags = (
        syscalls.CLONE_NEWNS
        | syscalls.CLONE_NEWUTS
        | syscalls.CLONE_NEWIPC
        | syscalls.CLONE_NEWNET
        | syscalls.CLONE_NEWCGROUP
        | syscalls.CLONE_NEWPID
    )
    # The command gets a fresh environment block (execve): only this copy needs the credentials left out.
    withheld = set(credentials.withheld_variables(os.environ, spec.env_pass))
    environment = {**{k: v for k, v in os.environ.items() if k not in withheld}, **dict(spec.env)}
    syscalls.setns(service_pidfd, flags)
    seccomp.refuse_setid_modes()  # as the service's processes: the launcher and the command inherit it
    launcher = -1
    if image is not None and os.geteuid() == 0:  # root's command in an image: as the service's own commands
        with contextlib.suppress(OSError):  # not where root lacks the full id range: spawn says why
            launcher = commands.start_launcher(image.root, joined_pid_namespace=True)
    userns.drop_capabilities()  # before the fork: the service never sees a process of ours with any
    os.close(service_pidfd)
    pid = os.fork()
    if pid == 0:
        try:
            if launcher < 0:  # it holds only its stdio; a user's command in an image writes its own id maps
                syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
            backend.in_test_process(spec)
            if image is not None:
                code = image.spawn(argv).wait()
                os._exit(code & 0xFF)
            os.execvpe(argv[0], argv, environment)
        except (OSError, ValueError, commands.ContainerError) as exc:  # ValueError: a NUL in an argument
            os.write(2, f"pytest-sandbox: cannot run {argv}: {exc}\n".encode(errors="replace"))
        finally:
            os._exit(NOT_STARTED)
    _, status = os.waitpid(pid, 0)
    if launcher >= 0:  # its line closed, the launcher ends; reaped here: a zombie of the service's pid
        os.close(launcher)  # namespace left to the zygote would hold up that namespace's end
        with contextlib.suppress(ChildProcessError):
            while True:
                os.wait()
    return os.waitstatus_to_exitcode(status) & 0xFF
