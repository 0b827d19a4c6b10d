"""Inside one sandbox: the init (pid 1) and the test process.

Runs in a process forked by the zygote, already pid 1 of a fresh pid
namespace. Never imports plugin.py: everything it needs comes as arguments.
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


def _exit(code: int = 0) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _report_setup_error(sock: socket.socket, phase: str, exc: BaseException) -> None:
    message = exc.message if isinstance(exc, SetupError) else str(exc)
    phase = exc.phase if isinstance(exc, SetupError) else phase
    sync.send(sock, {"type": "error", "phase": phase, "message": message})


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


def sandbox_init(sock: socket.socket, item: pytest.Item, spec: SandboxSpec, plan: rootfs.RootPlan,
                 cwd: str, crash_fd: int) -> None:
    """pid 1 of the sandbox: build it, start the test, reap everything, report how the test ended."""
    phase = "namespaces"
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test gets ^C; init just reaps
        _linux.set_process_name("sandbox-init")
        enter_namespaces(spec, plan)
        phase = "fork"
        test_pid = os.fork()
    except BaseException as exc:  # noqa: BLE001 - any failure becomes a setup error report
        _report_setup_error(sock, phase, exc)
        _exit(0)
    if test_pid == 0:
        run_test(sock, item, spec, cwd, crash_fd)
    status = _reap_until(test_pid)
    message: dict[str, Any] = {"type": "exit"}
    if os.WIFSIGNALED(status):
        message["signal"] = os.WTERMSIG(status)
    else:
        message["code"] = os.waitstatus_to_exitcode(status)
    try:
        sync.send(sock, message)
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


class _ReportStreamer:
    """Sends each report to pytest as soon as it exists, so a later crash loses nothing."""

    def __init__(self, sock: socket.socket, config: pytest.Config, spec: SandboxSpec) -> None:
        self.sock = sock
        self.config = config
        self.spec = spec

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        item.ihook.pytest_sandbox_setup(item=item, spec=self.spec)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        try:
            sync.send(self.sock, {"type": "report", "data": data})
        except (pickle.PicklingError, TypeError, AttributeError):
            # user_properties may hold objects that cannot cross processes; keep their repr
            data["user_properties"] = [(name, repr(value)) for name, value in data.get("user_properties", ())]
            sync.send(self.sock, {"type": "report", "data": data})
        return report


def run_test(sock: socket.socket, item: pytest.Item, spec: SandboxSpec, cwd: str, crash_fd: int) -> None:
    """The test process: pytest's own runtest protocol, reports streamed to the parent."""
    from _pytest.runner import runtestprotocol

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _linux.set_process_name("sandbox-test")
        os.chdir(cwd)
        os.environ.update(spec.env)
        if os.geteuid() != 0:
            userns.drop_capabilities()
        faulthandler.enable(file=crash_fd, all_threads=True)
        global ACTIVE_SPEC
        ACTIVE_SPEC = spec
        item.config.pluginmanager.register(_ReportStreamer(sock, item.config, spec), "sandbox-report-streamer")
    except BaseException as exc:  # noqa: BLE001
        _report_setup_error(sock, "test-process", exc)
        _exit(0)
    try:
        runtestprotocol(item, log=False, nextitem=None)
        sync.send(sock, {"type": "done"})
    except pytest.exit.Exception as exc:
        sync.send(sock, {"type": "exit-requested", "reason": exc.msg, "returncode": exc.returncode})
    except KeyboardInterrupt:
        sync.send(sock, {"type": "interrupted"})
    _exit(0)
