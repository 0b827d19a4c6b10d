"""Inside one sandbox: the init (pid 1) and the test process.

The zygote forks a sandbox *ahead of time*: the init builds the namespaces and
mount tree and forks the test process, and both wait until pytest asks for a
test. The fork and mount costs are then paid while the previous test runs, not
on the critical path. Never imports plugin.py: everything comes as arguments.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import sys
from typing import Any

import pytest

from . import _linux, rootfs, sync, userns
from .errors import SetupError
from .spec import SandboxSpec

ACTIVE_SPEC: SandboxSpec | None = None  # set in the test process of a sandbox
_channel: socket.socket | None = None   # the test process's line to pytest, while a test runs


def _exit(code: int = 0) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def enter_namespaces(spec: SandboxSpec, plan: rootfs.RootPlan) -> None:
    """The per-test namespaces and mount tree; the user and pid namespaces come from the zygote."""
    flags = _linux.CLONE_NEWNS | _linux.CLONE_NEWUTS | _linux.CLONE_NEWIPC | _linux.CLONE_NEWCGROUP
    if spec.network == "none":
        flags |= _linux.CLONE_NEWNET
    _linux.unshare(flags)
    rootfs.build(plan)
    socket.sethostname(spec.hostname)
    if spec.network == "none":
        _linux.loopback_up()


def sandbox_init(zygote: socket.socket, test_end: socket.socket, items: dict[str, pytest.Item],
                 spec: SandboxSpec, plan: rootfs.RootPlan, cwd: str, crash_fd: int) -> None:
    """pid 1 of a sandbox: build it, fork the test process, then reap until the test is over.

    The zygote sends the test request straight to the test process over ``test_end``
    and a copy of pytest's socket here, for the exit status.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test gets ^C; init just reaps
    _linux.set_process_name("sandbox-init")
    error: dict[str, Any] | None = None
    test_pid = 0
    try:
        enter_namespaces(spec, plan)
        test_pid = os.fork()
        if test_pid == 0:
            zygote.close()
            test_process(test_end, items, spec, cwd, crash_fd)
    except BaseException as exc:  # noqa: BLE001 - any failure becomes a setup error report
        phase = exc.phase if isinstance(exc, SetupError) else "namespaces"
        error = {"type": "error", "phase": phase, "message": exc.message if isinstance(exc, SetupError) else str(exc)}
    test_end.close()
    request, fds = sync.recv(zygote)
    zygote.close()
    if request is None:  # the zygote cancelled this sandbox
        os._exit(0)
    to_pytest = socket.socket(fileno=fds[0])
    if error is not None:
        sync.send(to_pytest, error)
        os._exit(0)
    status = _reap_until(test_pid)
    message: dict[str, Any] = {"type": "exit"}
    if os.WIFSIGNALED(status):
        message["signal"] = os.WTERMSIG(status)
    else:
        message["code"] = os.waitstatus_to_exitcode(status)
    try:
        sync.send(to_pytest, message)
    finally:
        os._exit(0)  # init leaving tears down the whole pid namespace


def _reap_until(pid: int) -> int:
    """Reap every child (orphans land here too) until ``pid`` has ended; return its status."""
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if reaped == pid:
            return status


class ReportStreamer:
    """Registered once in the zygote: sends each report to pytest as soon as it exists.

    Streaming means a crash later in the protocol loses nothing already reported.
    Outside a sandbox's test process it does nothing.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if ACTIVE_SPEC is not None:
            item.ihook.pytest_sandbox_setup(item=item, spec=ACTIVE_SPEC)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if _channel is None:
            return report
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        try:
            sync.send(_channel, {"type": "report", "data": data})
        except (pickle.PicklingError, TypeError, AttributeError):
            # user_properties may hold objects that cannot cross processes; keep their repr
            data["user_properties"] = [(name, repr(value)) for name, value in data.get("user_properties", ())]
            sync.send(_channel, {"type": "report", "data": data})
        return report


def test_process(zygote: socket.socket, items: dict[str, pytest.Item], spec: SandboxSpec, cwd: str,
                 crash_fd: int) -> None:
    """The test process: get ready, wait for a test, run pytest's own runtest protocol on it."""
    global ACTIVE_SPEC, _channel
    from _pytest.runner import runtestprotocol

    setup_error = ""
    try:
        _linux.set_process_name("sandbox-test")
        os.chdir(cwd)
        os.environ.update(spec.env)
        if os.geteuid() != 0:
            userns.drop_capabilities()
        faulthandler.enable(file=crash_fd, all_threads=True)
    except BaseException as exc:  # noqa: BLE001
        setup_error = f"{type(exc).__name__}: {exc}"
    request, fds = sync.recv(zygote)
    if request is None:
        os._exit(0)
    _channel = socket.socket(fileno=fds[0])
    zygote.close()
    if setup_error:
        sync.send(_channel, {"type": "error", "phase": "test-process", "message": setup_error})
        _exit(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ACTIVE_SPEC = spec
    try:
        runtestprotocol(items[request["nodeid"]], log=False, nextitem=None)
        sync.send(_channel, {"type": "done"})
    except pytest.exit.Exception as exc:
        sync.send(_channel, {"type": "exit-requested", "reason": exc.msg, "returncode": exc.returncode})
    except KeyboardInterrupt:
        sync.send(_channel, {"type": "interrupted"})
    _exit(0)
