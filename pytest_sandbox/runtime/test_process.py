"""Inside one sandbox: the test process.

The zygote starts a sandbox *ahead of time*: pid 1 (init.py) and this process,
which builds its namespaces and mount tree and then waits until pytest asks for
a test. The fork and mount costs are paid while the previous test runs, not on
the critical path. Never imports plugin.py: everything comes as arguments.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import warnings
from typing import Any

import pytest

from .. import protocol
from ..errors import SetupError
from ..linux import rootfs, syscalls, userns
from ..spec import SandboxSpec
from . import cgroups

ACTIVE_SPEC: SandboxSpec | None = None  # set in the test process of a sandbox
ACTIVE_PLAN: rootfs.RootPlan | None = None
_channel: socket.socket | None = None  # the test process's line to pytest, while a test runs


def _exit(code: int = 0) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


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
        protocol.send(_channel, {"type": "report", "data": data})  # objects in user_properties go as their repr
        return report

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage, when: str, nodeid: str) -> None:
        if _channel is None:
            return
        category = warning_message.category
        protocol.send(
            _channel,
            {
                "type": "warning",
                "message": str(warning_message.message),
                "when": when,
                "category": (category.__module__, category.__qualname__),
                "filename": warning_message.filename,
                "lineno": warning_message.lineno,
            },
        )


def _build_sandbox(
    spec: SandboxSpec, plan: rootfs.RootPlan, cwd: str, layer_dir: str | None, crash_fd: int, backend: cgroups.Backend
) -> None:
    """The sandbox around this process, step by step; the user and pid namespaces come from the zygote."""
    # 1. A name on the host's ps, and out of pytest's session: killpg(0) in a test must not reach pytest.
    syscalls.set_process_name("sandbox-test")
    os.setsid()
    # 2. Own mount, uts, ipc and cgroup namespaces; a network namespace unless the test shares the host's.
    flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWCGROUP
    if spec.network == "none":
        flags |= syscalls.CLONE_NEWNET
    syscalls.unshare(flags)
    # 3. The mount tree (needs the new mount namespace; /proc last, for the new pid namespace).
    rootfs.build(plan, layer_dir)
    # 4. Host name and loopback of the new namespaces.
    socket.sethostname(spec.hostname)
    if spec.network == "none":
        syscalls.loopback_up()
    # 5. Where the test starts and the environment it sees (a FROM host image's ENV, then the spec's).
    os.chdir(cwd)
    if plan.image is not None and plan.image.host_based:
        os.environ.update(plan.image.env)
    os.environ.update(spec.env)
    # 6. Plain user permissions: the namespace's capabilities would let a test write its read-only files.
    if os.geteuid() != 0:
        userns.drop_capabilities()
    # 7. Crash dumps go to pytest's memfd; limits a process sets on itself (rlimits) come last,
    #    so nothing above runs under them.
    faulthandler.enable(file=crash_fd, all_threads=True)
    backend.in_test_process(spec)


def test_process(
    zygote: socket.socket,
    items: dict[str, pytest.Item],
    spec: SandboxSpec,
    plan: rootfs.RootPlan,
    cwd: str,
    crash_fd: int,
    kept_id: str | None,
    layer_dir: str | None,
    wait_for_cgroup: bool,
    backend: cgroups.Backend,
) -> None:
    """Build the sandbox, wait for a test, run pytest's own runtest protocol on it; never returns.

    With ``wait_for_cgroup`` nothing happens until the zygote has moved this process
    into the sandbox's cgroup, so every byte and cycle is accounted there. ``kept_id``
    names the read/write layer in ``layer_dir`` pytest keeps if the test fails.
    """
    global ACTIVE_SPEC, ACTIVE_PLAN, _channel
    from _pytest.runner import runtestprotocol
    from _pytest.warnings import catch_warnings_for_item

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until a test runs, ^C is pytest's business
    if wait_for_cgroup and protocol.recv(zygote)[0] is None:
        os._exit(0)
    error: dict[str, Any] | None = None
    try:
        _build_sandbox(spec, plan, cwd, layer_dir, crash_fd, backend)
    except BaseException as exc:
        phase = exc.phase if isinstance(exc, SetupError) else "namespaces"
        message = exc.message if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
        error = {"type": "error", "phase": phase, "message": message}
    request, fds = protocol.recv(zygote)
    zygote.close()
    if request is None:  # cancelled before it ran
        os._exit(0)
    _channel = socket.socket(fileno=fds[0])
    if error is not None:
        protocol.send(_channel, error)
        _exit(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if kept_id is not None:  # pytest keeps this read/write layer if the test fails
        protocol.send(_channel, {"type": "container", "id": kept_id})
    ACTIVE_SPEC, ACTIVE_PLAN = spec, plan
    item = items[request["nodeid"]]
    try:
        # What pytest's warnings plugin does around each test; recorded warnings go to pytest.
        if spec.timeout is not None:  # dump every thread's stack, then exit: pytest reports the timeout
            faulthandler.dump_traceback_later(spec.timeout, exit=True, file=crash_fd)
        with catch_warnings_for_item(item.config, ihook=item.ihook, when="runtest", item=item):
            runtestprotocol(item, log=False, nextitem=None)
        faulthandler.cancel_dump_traceback_later()
        protocol.send(_channel, {"type": "done"})
    except pytest.exit.Exception as exc:
        protocol.send(_channel, {"type": "exit-requested", "reason": exc.msg, "returncode": exc.returncode})
    except KeyboardInterrupt:
        protocol.send(_channel, {"type": "interrupted"})
    _exit(0)
