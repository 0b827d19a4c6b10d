"""The hermetic session's process (--sandbox=hermetic): a sandbox whose process runs pytest itself.

The zygote builds the sandbox as a test's (test_process.py's steps); where a test's process would wait for
a test, this one starts pytest (a fresh interpreter: nothing of the supervising pytest's memory) with the
supervisor's stdio lines, waits for it, then sends what it wrote under the declared outputs (read from the
sandbox's overlay uppers, as a test's sandbox sends them) and ends as pytest ended. pytest's conftest.py
files, collection, fixtures, tests and plugins all run in here; the supervisor only relays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
from typing import Any, NoReturn

from .. import outputs, protocol, settings
from ..linux import process, syscalls
from ..spec import SandboxSpec
from . import test_layers
from .service_process import NOT_STARTED, stdio_for_a_command

NODEID = "session:hermetic"  # the name the zygote knows the session's sandbox by (signal, kill)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the supervisor's ^C reaches pytest as in a shell


@dataclasses.dataclass(frozen=True)
class SessionLaunch:
    """What the zygote needs to start the session's sandbox, decided by the supervisor before the fork."""

    spec: SandboxSpec
    argv: tuple[str, ...]  # the interpreter and its arguments: pytest, with the supervisor's command line
    env: tuple[tuple[str, str], ...]  # added to the sandbox's environment (credentials already withheld)
    config: Any  # the supervisor's pytest.Config, as it was before any conftest.py: what the zygote sheds


def run(
    request: dict[str, Any],
    fds: list[int],
    error: dict[str, Any] | None,
    scratch: int | None,
    uppers: tuple[tuple[str, str], ...],
    layers: test_layers.Helper | None = None,
) -> NoReturn:
    """``fds``: the channel to the supervisor, then pytest's stdin, stdout and stderr, and for --sandbox=all its
    collection line (hermetic.py); ``layers``: the line to the session's layer helper, which pytest inherits
    for its tests' layers (--sandbox-scope=test). Never returns."""
    channel = socket.socket(fileno=fds[0])
    stdio = fds[1:4]
    collection = fds[4] if len(fds) == 5 else None
    if error is not None or len(stdio) != 3 or len(fds) > 5:
        with contextlib.suppress(OSError):
            protocol.send(channel, error or {"type": "error", "phase": "session", "message": "no stdio"})
        os._exit(NOT_STARTED)
    argv = [str(arg) for arg in request["argv"]]
    env = {**os.environ, **{str(k): str(v) for k, v in request["env"].items()}}
    # pytest in here runs the suite's code: it may not trace this process, whose line leads to the supervisor
    # (set before the fork: its exec makes pytest dumpable again, as any program).
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    pid = os.fork()
    if pid == 0:
        try:
            channel.close()
            if scratch is not None:
                os.close(scratch)
            stdio_for_a_command(stdio[1], stdio[2])
            os.dup2(stdio[0], 0)
            if layers is not None:
                os.set_inheritable(layers.fileno(), True)
                env[settings.LAYERS_ENV] = test_layers.Inherited(layers.fileno(), layers.pid, uppers).to_text()
            if collection is not None:
                os.set_inheritable(collection, True)
                env[settings.COLLECTION_ENV] = str(collection)
            os.execve(argv[0], argv, env)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"pytest-sandbox: cannot start pytest in the session's sandbox: {exc}\n".encode())
        finally:
            os._exit(NOT_STARTED)
    for fd in [*stdio, *([collection] if collection is not None else [])]:
        os.close(fd)
    for signum in FORWARDED:
        signal.signal(signum, lambda sig, _frame: _forward(pid, sig))
    status = _wait(pid)
    if scratch is not None:
        with contextlib.suppress(OSError, RecursionError):  # the supervisor refused one (it says why), or a
            for message in outputs.collect(scratch, uppers):  # tree deeper than Python's recursion limit
                protocol.send(channel, message)
    channel.close()
    _end_as(status)


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]  # PEP 475: retried after a forwarded signal
        except ChildProcessError:
            return 1 << 8


def _end_as(status: int) -> NoReturn:
    """Exit as pytest did: its exit code, or the signal that ended it (the supervisor says which)."""
    process.die_as_signalled(status)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)
