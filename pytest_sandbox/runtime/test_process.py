"""One sandbox, from its namespaces to the end of its test: the setup path of every test sandbox.

The zygote starts a sandbox *ahead of time*: it spawns pid 1 (init.py) into a new pid namespace and
forks this process as pid 2. This process then builds the sandbox's namespaces and mount tree, has
pid 1 join them (pid 1 was born in the zygote's, whose network namespace is the host's), lets go of
everything of the host's it inherited (fds, capabilities), and waits until pytest asks for a test;
then it runs pytest's own runtest protocol on it. The fork and mount costs are paid while the
previous test runs. Never imports plugin.py: everything comes as arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import fcntl
import functools
import gc
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import tempfile
import threading
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from .. import credentials, outputs, plugin_results, plugin_state, protocol
from ..errors import ServiceError, SetupError
from ..layers import commands
from ..linux import landlock, mounts, process, rootfs, seccomp, syscalls, userns
from ..network import bridge
from ..spec import SandboxSpec
from . import (
    cgroups,
    interact,
    leftovers,
    live_log,
    scope_children,
    service_process,
    session_process,
    stack_depth,
    test_layers,
)

ACTIVE_SPEC: SandboxSpec | None = None  # set in the test process of a sandbox
ACTIVE_PLAN: rootfs.RootPlan | None = None
_channel: socket.socket | None = None  # the test process's line to pytest, while a test runs
_layers: test_layers.Helper | None = None  # a scope sandbox's line to its layer helper (test_layers.py)
_scope_pid = 0  # in a test's fork: the scope process it came from
_held_teardown: list[dict[str, Any]] | None = None  # in a test's fork: its teardown report, for the scope to finish
_relayed = False  # in a test's fork: the scope process relays its reports, and says when each is on its way
_cwd_after_the_layer: tuple[str, str] | None = None  # a test run in the scope process: where it left it, where it was
# pytest shares the scope's mount namespace (the hermetic session's): what it writes on a test's report (outputs,
# the cache) must not land in a test's layer, so a layer is on only while its test runs.
_pytest_sees_the_layers = False
_carried: Any = None  # the earlier tests' outcomes that came with the last test pytest asked for (pytest-dependency)
_scope_items: dict[str, pytest.Item] = {}  # a scope process's items, for its forks made ahead
_ahead: _Ahead | None = None  # in a scope process: the next test's fork, made ahead
_exiting: int | None = None  # in a scope process: the last test's fork, killed as it said it ends, not yet reaped
# Tests of other processes run beside this one's in its pid namespace, as the same user: the hermetic session's
# xdist workers. On a kernel without Landlock scopes a dumpable test would be open to them (ptrace,
# /proc/PID/mem, pidfd_getfd of its line to pytest).
_beside_other_tests = False


def _exit(code: int = 0) -> NoReturn:
    _flush_stdio()
    os._exit(code)


def _flush_stdio() -> None:
    """Before a fork or an exit: what Python holds in its stdio buffers is written once, not by every fork."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


LOG_HOOKS = (
    "pytest_runtest_logstart",
    "pytest_runtest_logreport",
    "pytest_runtest_logfinish",
    "pytest_warning_recorded",
)


def ask_pytest(message: dict[str, Any]) -> dict[str, Any]:
    """Send pytest a request from the running test and wait for its answer (a service call)."""
    if _channel is None:
        raise ServiceError("no test runs in this process: nothing to ask pytest")
    protocol.send(_channel, message)
    answer, fds = protocol.recv(_channel)
    for fd in fds:
        os.close(fd)
    if answer is None:
        raise ServiceError("pytest closed this test's line")
    return answer


def in_sandbox() -> bool:
    """True in a sandbox's test process, where pytest's protocol runs as in a plain run."""
    return ACTIVE_SPEC is not None


class ReportStreamer:
    """Registered once in the zygote: sends each report to pytest as soon as pytest logs it.

    Streaming means a crash later in the protocol loses nothing already reported.
    Outside a sandbox's test process it does nothing.
    """

    def __init__(self, config: pytest.Config, backend: cgroups.Backend) -> None:
        self.config = config
        self.backend = backend

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if ACTIVE_SPEC is None:
            return
        unenforced = [limit for limit in ACTIVE_SPEC.limits if limit not in self.backend.enforced]
        if unenforced:  # at the user's test, under its warning filters (an error with filterwarnings=error)
            line = item.location[1]
            warnings.warn_explicit(
                pytest.PytestWarning(
                    f"pytest-sandbox: {self.backend.describe()} cannot enforce {', '.join(unenforced)}; "
                    "this test runs without (sandbox_limits=strict makes this an error)"
                ),
                pytest.PytestWarning,
                str(item.path),
                (line or 0) + 1,
            )
        item.ihook.pytest_sandbox_setup(item=item, spec=ACTIVE_SPEC)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if _channel is not None and report.failed and ACTIVE_PLAN is not None:
            full = rootfs.full_places(ACTIVE_PLAN)
            if full:  # ENOSPC from a bounded tmpfs: say which one, and how to get more
                report.sections.append(
                    (
                        "sandbox scratch",
                        "\n".join(full) + "\n(more room: tmpfs_size= in the marker, --sandbox-tmpfs-size "
                        "or the sandbox_tmpfs_size ini key)",
                    )
                )
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Every report pytest or a plugin logs (reruns and subtests too) goes to pytest as it is logged."""
        if _channel is None:
            return
        # What the terminal reporter does first with each report: plugins may settle its outcome here
        # (a test with failed subtests fails); the muted reporter in here no longer does it.
        self.config.hook.pytest_report_teststatus(report=report, config=self.config)
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        if isinstance(data, dict):
            if isinstance(data.get("longrepr"), str) and not isinstance(report.longrepr, str):
                data[protocol.PRINTED_REPR] = True  # pytest sent a doctest's or fixture lookup's repr as its text
            data.update(plugin_results.report_extras(report))
        if _held_teardown is not None:
            # In a test's fork of a scope sandbox: the scope process may tear down fixtures after it, whose
            # errors and output pytest puts in this report; the last one waits (a rerun's earlier ones go).
            for held in _held_teardown:
                _send_report(held)
            _held_teardown.clear()
            if report.when == "teardown" and type(report) is pytest.TestReport:
                _held_teardown.append(data)
                return
        _send_report(data)

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


# The hooks pytest calls while it runs one test's protocol. A reporter's own implementations of these are part
# of running the test (pytest-json-report records streams and logs there and attaches them to the report in
# makereport): they run where the test runs, as in an xdist worker.
PROTOCOL_HOOKS = (
    "pytest_runtest_protocol",
    "pytest_runtest_setup",
    "pytest_runtest_call",
    "pytest_runtest_teardown",
    "pytest_runtest_makereport",
    "pytest_fixture_setup",
    "pytest_fixture_post_finalizer",
    "pytest_pyfunc_call",
)


class _Muted:
    """A plugin of which only its protocol hooks still run, still reachable by name (pdb asks for the terminal
    reporter). Those hooks are its own bound methods in this object's ``__dict__``: what pluggy registers."""

    def __init__(self, plugin: object) -> None:
        self._plugin = plugin
        for hook in PROTOCOL_HOOKS:
            method = getattr(plugin, hook, None)
            if callable(method):
                setattr(self, hook, method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plugin, name)


def prepare_plugins(config: pytest.Config, backend: cgroups.Backend) -> None:
    """Once, in the zygote, for every test process it forks: the report streamer in, the pytest
    process's reporters muted, plugins that talk to the pytest process pointed at local state."""
    config.pluginmanager.register(ReportStreamer(config, backend), "sandbox-report-streamer")
    plugin_state.adapt_in_sandbox(config)
    _mute_host_reporters(config)
    _mute_conftest_log_hooks(config)
    live_log.relay_in_sandbox(config, lambda: _channel)
    if getattr(config.option, "usepdb", False):
        config.pluginmanager.register(interact.PdbAfterReport(lambda: _channel), "sandbox-pdb-after-report")


def _mute_host_reporters(config: pytest.Config) -> None:
    """Plugin objects that listen to logged reports belong to the pytest process: its terminal reporter,
    junitxml, xdist's worker, report logs. pytest hears every report from the sandbox and calls them
    there; here they would print twice or write through fds the sandbox no longer has. Their protocol hooks
    keep running. The session (-x, --maxfail) and the logging plugin (live logs) keep listening."""
    manager = config.pluginmanager
    for plugin in list(manager.get_plugins()):
        name = manager.get_name(plugin)
        if (
            isinstance(plugin, (types.ModuleType, ReportStreamer))
            or name in ("session", "logging-plugin")
            or not any(callable(getattr(plugin, hook, None)) for hook in LOG_HOOKS)
        ):
            continue
        manager.unregister(plugin)
        manager.register(_Muted(plugin), name)


def _mute_conftest_log_hooks(config: pytest.Config) -> None:
    """A conftest's log hooks run in pytest, which hears every report of the sandbox: running them here too
    ran them twice per report (a conftest that prints or counts its reports did it twice). Only those hooks:
    the conftest's others (setup, makereport, assertrepr_compare) are part of running the test.

    A conftest cannot be unregistered and registered again without losing the directory its hooks are bound
    to, so its implementations of these hooks are replaced by ones that do nothing, in this process only."""
    for hook_name in LOG_HOOKS:
        for impl in getattr(config.pluginmanager.hook, hook_name).get_hookimpls():
            if isinstance(impl.plugin, types.ModuleType) and _is_conftest(impl.plugin):
                replacement = _pass_through if impl.wrapper or impl.hookwrapper else _do_nothing
                try:
                    setattr(impl, "function", replacement)  # noqa: B010 (pluggy types it Final)
                except AttributeError:  # a pluggy whose implementations cannot change: they run twice
                    return


def _is_conftest(module: types.ModuleType) -> bool:
    return os.path.basename(getattr(module, "__file__", None) or "") == "conftest.py"


def _do_nothing(*args: object) -> None:
    return None


def _pass_through(*args: object) -> Any:
    return (yield)


@dataclasses.dataclass(frozen=True)
class Network:
    """A sandbox's network namespace: a new one (loopback only, or on the pod's bridge), the zygote's, or
    one to join (a service's, kept across its restarts)."""

    new: bool = True
    join: int | None = None  # an fd of the namespace to join
    pod: int | None = None  # an fd of the pod's bridge namespace: the new one gets a veth pair to it
    address: str = ""  # its address on the pod's bridge
    pod_link: bool = False  # it has (or gets) a veth to the pod's bridge: no IPv6 on it (bridge.without_ipv6)


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """What the zygote decided for one sandbox before forking its test process."""

    spec: SandboxSpec
    plan: rootfs.RootPlan
    cwd: str
    crash_fd: int  # this sandbox's own memfd for faulthandler: pytest reads it once the test is over
    kept_id: str | None  # the read/write layer pytest keeps if the test fails, in layer_dir
    layer_dir: str | None
    wait_for_cgroup: bool
    backend: cgroups.Backend
    outputs: tuple[tuple[str, str], ...] = ()  # (declared output, its writes in the scratch tmpfs)
    per_test_layers: bool = False  # a scope sandbox: each test runs in a fork, over a layer of its own
    network: Network = Network()
    hosts: str = ""  # this sandbox's /etc/hosts (a pod member's: the services' names); empty: the host's
    service: bool = False  # a service's sandbox: its processes cannot set set-id bits (linux/seccomp.py)
    in_session: bool = False  # a process of --sandbox=hermetic's session sandbox, which is built already
    layers: test_layers.Inherited | None = None  # there: the session's layer helper, for tests' layers


def _enter(box: Sandbox, config: pytest.Config, pid1: tuple[int, int], keep: set[int]) -> int | None:
    """The test process's steps, in order; each must happen before the next."""
    # 1. A name on the host's ps; out of pytest's session (killpg(0) in a test must not reach pytest)
    #    and out of its session keyring (keyrings go with credentials, not namespaces).
    syscalls.set_process_name("sandbox-test")
    os.setsid()
    syscalls.join_new_session_keyring()
    # 2. Own mount, UTS, IPC and cgroup namespaces (the cgroup one after the zygote moved this process
    #    into the sandbox's cgroup: its root is that), and a network namespace unless the test shares
    #    the zygote's or joins the pod's. All are owned by the session's user namespace, where this process
    #    still holds every capability.
    flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWCGROUP
    families = syscalls.AddressFamilies()
    if box.network.new:
        flags |= syscalls.CLONE_NEWNET
        families = syscalls.address_families()  # the namespace left behind's, for the new one's loopback
    syscalls.unshare(flags)
    if box.network.join is not None:
        syscalls.setns(box.network.join, syscalls.CLONE_NEWNET)
        flags |= syscalls.CLONE_NEWNET  # pid 1 joins it too
    # 3. The mount tree (needs the new mount namespace), then a /proc of the pid namespace (only a
    #    process inside it can mount that) with the kernel knobs read-only; a pod member's /etc/hosts.
    scratch = rootfs.build(box.plan, box.layer_dir)
    rootfs.mount_proc(
        while_writable=bridge.without_ipv6 if box.network.pod_link else None,
        image_commands=box.plan.image is not None,
    )
    if box.hosts:
        mounts.cover_with_text("/etc/hosts", box.hosts)
    # 4. Host name and loopback of the new namespaces; a pod member's veth pair to the pod's bridge.
    socket.sethostname(box.spec.hostname)
    if box.network.new and box.network.pod is not None:
        try:
            bridge.join(box.network.pod, box.network.address)
        except OSError as exc:
            raise SetupError("namespaces", f"cannot join the pod's network: {exc}") from None
    elif box.network.new:
        syscalls.loopback_up(like=families)
    # 5. pid 1 joins every namespace above (its /proc/1/root, /proc/1/net become the sandbox's), then
    #    gives up its capabilities; nothing of the test runs before it says it has.
    _pid1_joins(flags, *pid1)
    #    A service runs with its read/write volumes for its whole scope: none of its processes (this one,
    #    the launcher below, whatever either starts) may set set-id bits there (linux/seccomp.py).
    if box.service:
        try:
            seccomp.refuse_setid_modes()  # not on a machine it does not know (README: Limits by host)
        except OSError as exc:
            raise SetupError("namespaces", f"cannot install the set-id filter: {exc}") from None
    # 6. Root will have no capability left to map uid 0 in a user namespace of its own: the commands it
    #    starts in an image go through a launcher forked now, which keeps one the test cannot enter.
    if box.plan.image is not None and not box.plan.image.host_based and os.geteuid() == 0:
        with contextlib.suppress(OSError):  # not where root lacks the full id range: commands say why
            keep.add(commands.start_launcher(box.plan.image_root))
    #    A scope sandbox's tests each write to a layer of their own, which a helper forked now (with the
    #    capabilities, before user code) mounts in this namespace before each test's fork and takes off after.
    if box.per_test_layers:
        global _layers
        places = test_layers.writable_places(box.plan.overlays, box.plan.fresh)
        try:
            _layers = test_layers.start_helper(places, box.plan.hidden, box.plan.tmpfs_size)
        except test_layers.LayerError as exc:
            raise SetupError("layers", f"cannot start the layer helper: {exc}") from None
        keep.add(_layers.fileno())
    if box.outputs:  # what the test wrote under declared outputs is read there at its end: read only
        view = mounts.read_only_view(scratch)
        os.close(scratch)
        scratch = view
        keep.add(scratch)
    else:
        os.close(scratch)
    # 7. Where the test starts and the environment it sees (credential variables withheld, a FROM
    #    host image's ENV, then the spec's).
    os.chdir(box.cwd)
    credentials.scrub_environment(credentials.withheld_variables(os.environ, box.spec.env_pass))  # env= may set them
    if box.plan.image is not None and box.plan.image.host_based:
        os.environ.update(box.plan.image.env)
    os.environ.update(box.spec.env)
    # 8. Let go of every fd of the host's it inherited: log files, xdist's pipes, the zygote's sockets and
    #    cgroup dirs, other sandboxes' channels. Capture and the log file restart on its own.
    _shed_host_fds(config, keep)
    # 9. No capabilities at all, root included, and none to regain; no vsock; a Landlock domain.
    _confine(box)
    # 10. Crash dumps go to this sandbox's memfd; limits a process sets on itself (rlimits) come last,
    #     so nothing above runs under them.
    faulthandler.enable(file=box.crash_fd, all_threads=True)
    box.backend.in_test_process(box.spec)
    return scratch if box.outputs else None


def _confine(box: Sandbox) -> None:
    """The last steps before user code: what the test process may do from now on, for good."""
    # No capabilities at all, root included, and none to regain by execve (bounding set, no_new_privs):
    # the mounts it inherited cannot be remounted or unmounted, kernel knobs stay read-only.
    userns.drop_capabilities()
    # vsock is no network namespace's: without the host's network, no AF_VSOCK socket (linux/seccomp.py).
    if box.spec.network != "host":
        try:
            seccomp.refuse_vsock()  # not on a machine it does not know (README: Limits by host)
        except OSError as exc:
            raise SetupError("namespaces", f"cannot install the vsock filter: {exc}") from None
    # A Landlock domain of its own where the kernel has scopes: with network="host" the host's abstract
    # unix sockets (a network namespace's, which no mount masks) stay out of reach, and so do this
    # sandbox's pid 1 and layer helper for signals. A service's is not: it answers its NOTIFY_SOCKET.
    if not box.service:
        _scope_in_a_domain()


def _enter_in_session(box: Sandbox, config: pytest.Config, keep: set[int]) -> None:
    """The steps left for a test process of --sandbox=hermetic, whose sandbox (namespaces, mounts, no
    capabilities, withheld variables) is the session's, built before pytest started."""
    global _layers, _beside_other_tests, _pytest_sees_the_layers
    syscalls.set_process_name("sandbox-test")
    _pytest_sees_the_layers = True
    scoped = _scope_in_a_domain()
    _beside_other_tests = bool(os.environ.get("PYTEST_XDIST_WORKER")) and not scoped
    if not _beside_other_tests:  # pytest here is not (hermetic.out_of_the_tests_reach); the test may be
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
    os.setsid()
    syscalls.join_new_session_keyring()
    process.die_with_parent(os.getppid())  # the zygote: the tests' fixtures go with it
    if box.per_test_layers and box.layers is not None:  # without one (an xdist worker's), no layer per test
        _layers = box.layers.helper()
        keep.add(_layers.fileno())
    os.chdir(box.cwd)
    _shed_host_fds(config, keep)
    faulthandler.enable(file=box.crash_fd, all_threads=True)
    box.backend.in_test_process(box.spec)


def _scope_in_a_domain() -> bool:
    """A Landlock domain of its own (linux/landlock.py): the processes of this sandbox cannot signal, trace
    or reach the abstract sockets of any process outside it. In the hermetic session those are pytest, its
    zygote, its layer helper and other sandboxes, which share their pid namespace and user; those of this
    sandbox still reach each other (a test its scope's fixtures' processes). False where the kernel cannot
    (the README's host table says what is open then)."""
    if not landlock.scopes_available():
        return False
    landlock.scope_self()
    return True


def _pid1_joins(flags: int, go: int, ack: int) -> None:
    """Tell pid 1 (init.py) which namespaces to join; it answers once it has, without capabilities."""
    try:
        os.write(go, flags.to_bytes(4, "little"))
        answer = os.read(ack, 1)
    finally:
        os.close(go)
        os.close(ack)
    if answer != b"1":
        raise SetupError("init", "pid 1 could not join the sandbox's namespaces")


def _send_report(data: dict[str, Any]) -> None:
    """A report to pytest (objects in user_properties go as their repr). In a test's fork of a scope sandbox,
    the scope process relays it: the test goes on once it is on its way, so a test that then kills the scope
    process (its parent) does not take its earlier reports along."""
    assert _channel is not None
    protocol.send(_channel, {"type": "report", "data": data})
    if _relayed:
        with contextlib.suppress(protocol.ProtocolError, OSError):
            protocol.recv(_channel)  # {"type": "relayed"}; nothing if the scope process is gone


class _ChannelLog:
    """The log file's stream in a test process: records go to pytest, which writes its own log file."""

    def write(self, text: str) -> int:
        if _channel is not None and text:
            protocol.send(_channel, {"type": "log", "text": text})
        return len(text)

    def flush(self) -> None:
        pass


def _shed_host_fds(config: pytest.Config, keep: set[int]) -> None:
    """Close every fd above stdio but ``keep``; pytest's capture and log file go on with fds of this process."""
    capture = config.pluginmanager.getplugin("capturemanager")
    capturing = capture is not None and capture.is_globally_capturing()
    restarted = False
    if capturing:
        capture.suspend_global_capture()  # stdio is the real one again; the capture's files are spare fds
        capture_fds = _own_capture_files(capture)
        if capture_fds is None:  # a capture this module does not know: a fresh one (new stream objects)
            capture.stop_global_capturing()
            restarted = True
        else:
            keep = keep | capture_fds
    handler = getattr(config.pluginmanager.getplugin("logging-plugin"), "log_file_handler", None)
    if isinstance(handler, logging.StreamHandler):
        old = handler.setStream(_ChannelLog())
        if old is not None:
            old.close()
    config.trace.root.setwriter(None)  # --debug's file
    for fd, identity in _STDIO_AT_START.items():
        if identity is None:  # closed when pytest started: what the host opened on it since is not stdio
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
    stdio = {_identity(fd) for fd in (0, 1, 2)} - {None}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep and _identity(fd) not in stdio:
            try:
                os.close(fd)
            except OSError:
                pass
    if restarted:
        capture.start_global_capturing()
        capture.suspend_global_capture()


def _own_capture_files(capture: Any) -> set[int] | None:
    """Give pytest's global fd capture files of this process under the same fds and stream objects.

    The capture's temporary files are open file descriptions shared with the host's pytest (fork): a test
    writing there would write into the host's captured output. A module that bound ``sys.stdout`` or a
    ``logging.StreamHandler`` at collection holds the capture's stream object, so that object must stay open
    and usable, as in a plain run: a fresh file is put under its fd (dup2). pytest has no public API for
    this; None where its capture is not built as expected (the caller then restarts the capture).
    """
    multi = getattr(capture, "_global_capturing", None)
    if multi is None:
        return None
    fds: set[int] = set()
    for part in (getattr(multi, "in_", None), getattr(multi, "out", None), getattr(multi, "err", None)):
        if part is None or not hasattr(part, "targetfd"):
            continue  # sys capture and no capture: streams in this process's memory, nothing shared
        saved, invalid, stream = (getattr(part, n, None) for n in ("targetfd_save", "targetfd_invalid", "tmpfile"))
        if not isinstance(saved, int) or stream is None:
            return None
        try:
            fd = stream.fileno()
            if part.targetfd != 0:  # fd 0's is /dev/null, opened for reading
                stream.flush()
                with tempfile.TemporaryFile(buffering=0) as fresh:
                    os.dup2(fresh.fileno(), fd)
        except (OSError, ValueError):
            return None
        fds |= {fd, saved} | ({invalid} if isinstance(invalid, int) else set())
    return fds


def _identity(fd: int) -> tuple[int, int, int] | None:
    """What an fd opens; a copy of stdio (faulthandler's dup of stderr) stays open: the test has stdio."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_rdev)


_STDIO_AT_START = {fd: _identity(fd) for fd in (0, 1, 2)}  # imported as pytest loads its plugins


def test_process(
    zygote: socket.socket,
    items: dict[str, pytest.Item],
    config: pytest.Config,
    box: Sandbox,
    pid1: tuple[int, int] | None,
) -> None:
    """Enter the sandbox, wait for a test, run pytest's own runtest protocol on it; never returns.

    ``pid1`` is the pair of pipe ends (go, ack) to the sandbox's pid 1 (see init_x86_64.S); None in the
    hermetic session's sandbox, whose processes these are.

    With a cgroup nothing happens until the zygote has moved this process into the
    sandbox's cgroup, so every byte and cycle is accounted there.
    """
    global ACTIVE_SPEC, ACTIVE_PLAN, _channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until a test runs, ^C is pytest's business
    if box.wait_for_cgroup and protocol.recv(zygote)[0] is None:
        os._exit(0)
    error: dict[str, Any] | None = None
    scratch: int | None = None
    try:
        if pid1 is None:
            _enter_in_session(box, config, keep={zygote.fileno(), box.crash_fd})
        else:
            scratch = _enter(box, config, pid1, keep={zygote.fileno(), box.crash_fd})
    except BaseException as exc:
        phase = exc.phase if isinstance(exc, SetupError) else "namespaces"
        message = exc.message if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
        error = {"type": "error", "phase": phase, "message": message}
    request, fds = protocol.recv(zygote)
    zygote.close()
    if request is None:  # cancelled before it ran
        os._exit(0)
    if pid1 is None and error is None:  # built ahead in the hermetic session, whose mounts it shares: while
        with contextlib.suppress(OSError):  # it waited, a test's layer may have been on (now gone, and its
            os.chdir(box.cwd)  # working directory with it): looked up again, now that no test runs
    if "service" in request:  # the pod zygote's: this sandbox is a service's
        if error is not None:
            failed = f"pytest-sandbox: the service's sandbox failed ({error['phase']}): {error['message']}\n"
            os.write(fds[0], failed.encode())
            os.write(fds[1], b"!")
            os._exit(service_process.NOT_STARTED)
        in_image = service_process.InImage.of(box.plan, box.spec)
        service_process.exec_service(request["service"], fds[0], fds[1], in_image)
    if "session" in request:  # --sandbox=hermetic: this sandbox runs the whole pytest session
        session_process.run(request["session"], fds, error, scratch, box.outputs, _layers)
    _channel = socket.socket(fileno=fds[0])
    if error is not None:
        with contextlib.suppress(protocol.ProtocolError, OSError):
            protocol.recv(_channel)  # the test pytest asks for, read: closing on it unread would reset the line
        protocol.send(_channel, error)
        _exit(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    syscalls.clear_keyrings_of_the_user()  # now: the test before this one has ended
    if box.kept_id is not None:  # pytest keeps this read/write layer if the test fails
        protocol.send(_channel, {"type": "container", "id": box.kept_id})
    ACTIVE_SPEC, ACTIVE_PLAN = box.spec, box.plan
    # The zygote froze its objects so that forking it copies fewer pages; frozen objects are hidden from
    # gc.get_objects() and gc.get_referrers() (hypothesis asks the latter whether anything else holds an
    # object), so the test's code sees them again, as in a plain run.
    gc.unfreeze()
    _run_items(box, items, scratch)
    _exit(0)


def _run_items(box: Sandbox, items: dict[str, pytest.Item], scratch: int | None) -> None:
    """Run the items pytest sends, one after another, until one whose next item is not for this sandbox.

    Each runs pytest's protocol hook, so every plugin's wrappers (warnings, faulthandler, timeout,
    reruns, subtests) run here as in a plain run. With the next item here (--sandbox-scope), fixtures
    it shares stay set up, as pytest keeps them; without, everything is torn down.
    """
    assert _channel is not None
    if box.per_test_layers:
        _run_scope(box, items, scratch)
        return
    item: pytest.Item | None = None
    while True:
        asked = _next_request(items, item)
        if asked is None:
            return
        item, nextitem = asked
        try:
            _run_protocol(box, item, nextitem)
            if nextitem is None:
                _send_what_persists(item.config, scratch, box.outputs)
            protocol.send(_channel, {"type": "done"})
        except BaseException as exc:
            protocol.send(_channel, _ended_early(exc, item))
            return
        if nextitem is None:
            return


def _run_protocol(box: Sandbox, item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """pytest's protocol for ``item`` under the spec's timeout, then what plugins recorded for it (benchmarks,
    flaky, syrupy records)."""
    assert _channel is not None
    watchdog = _watchdog(box.spec.timeout, box.crash_fd) if box.spec.timeout is not None else None
    stack_depth.as_in_pytests_loop()
    try:
        item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
    except (pytest.exit.Exception, KeyboardInterrupt, test_layers.LayerError):
        raise
    except BaseException as exc:
        raise _HookRaised() from exc
    if watchdog is not None:
        watchdog.cancel()
    for message in plugin_results.after_test(item.config, item):
        protocol.send(_channel, message)


class _HookRaised(Exception):
    """A hook of pytest's runtest protocol raised (its ``__cause__``): in a plain run, an INTERNALERROR."""


def _ended_early(exc: BaseException, item: pytest.Item) -> dict[str, Any]:
    """What pytest hears when running ``item`` ended this sandbox's loop: pytest.exit, ^C, a layer the helper
    could not build, a plugin's hook that raised (pytest ends the session with an INTERNALERROR, or a usage
    error for a pytest.UsageError, as in a plain run), or sending what the test wrote failed (the test's error)."""
    if isinstance(exc, pytest.exit.Exception):
        return {"type": "exit-requested", "reason": exc.msg, "returncode": exc.returncode}
    if isinstance(exc, KeyboardInterrupt):
        return protocol.interrupt_location(exc, str(item.config.rootpath))
    if isinstance(exc, test_layers.LayerError):
        return {"type": "error", "phase": "layer", "message": f"the test's layer: {exc}"}
    if isinstance(exc, _HookRaised) and isinstance(exc.__cause__, pytest.UsageError):
        return {"type": "error", "phase": "usage", "message": str(exc.__cause__)}  # pytest's "ERROR: ...", rc 4
    if isinstance(exc, _HookRaised) and exc.__cause__ is not None:
        return {"type": "error", "phase": "protocol", "message": "".join(traceback.format_exception(exc.__cause__))}
    return {"type": "error", "phase": "after the test", "message": "".join(traceback.format_exception(exc))}


def _next_request(
    items: dict[str, pytest.Item], last: pytest.Item | None, before_teardown: Callable[[], None] = lambda: None
) -> tuple[pytest.Item, pytest.Item | None] | None:
    """The item pytest asks for and its next item if that one runs here; None when pytest asks for none
    (it stopped early: -x, ^C), after tearing down what the last one left set up, as its session end would
    (``before_teardown``: a layer put on for a test that does not come is taken off first)."""
    assert _channel is not None
    request, _ = protocol.recv(_channel)
    if request is None or request.get("nodeid") not in items:
        with contextlib.suppress(Exception):
            before_teardown()
        if last is not None:
            with contextlib.suppress(Exception):
                last.session._setupstate.teardown_exact(None)
        return None
    global _carried
    _carried = request.get("dependency")
    plugin_state.apply_carried(items, _carried)  # here: a scope process's forks inherit them
    return items[request["nodeid"]], items.get(request.get("next") or "")


GO_ANSWER_TIMEOUT = 30.0  # seconds a fork made ahead has to answer its go (it answers at once unless stopped)
STOP = 100  # a test's fork says the sandbox ends now (pytest.exit, ^C, a plugin's error: already reported)
FINISHED, STOPPED = "finished", "finished, stop"  # a test's fork says it exits now (0, STOP)


def _run_scope(box: Sandbox, items: dict[str, pytest.Item], scratch: int | None) -> None:
    """A scope sandbox: this process sets up the fixtures of wider scope and keeps them; each test runs
    pytest's protocol in a fork of it, over a layer of its own, and tears down only its own fixtures. When
    the next test needs fewer of them, this process tears those down after the test, as pytest would, and
    what that teardown raised or printed goes into the test's teardown report. The next test's fork may be
    made while a test ends (_relay_the_fork): then nothing is set up for it here."""
    global _scope_items
    assert _channel is not None
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)  # what a test leaves running comes back to this process
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)  # a test cannot trace it or read its memory (each fork is again)
    stack_depth.measure_for_forks()
    _scope_items = items
    try:
        _run_scope_loop(box, items, scratch)
    finally:
        if _ahead is not None:  # its copy of the fixtures' pipes would keep their teardown waiting for EOF
            _ahead.cancel()


def _run_scope_loop(box: Sandbox, items: dict[str, pytest.Item], scratch: int | None) -> None:
    global _ahead
    assert _channel is not None
    item: pytest.Item | None = None
    prepared: _Prepared | None = None
    while True:
        asked = _next_request(items, item, before_teardown=functools.partial(_let_go, prepared))
        if asked is None:
            return
        item, nextitem = asked
        try:
            _ahead = _ready(_ahead, item)
            if _ahead is None:
                _unprepared(prepared)  # the fixtures it sets up write the scope's view, not a layer
                prepared = None
                _set_up_wider_fixtures(item)
            if _ahead is None and _threads_run_here():
                status, held, left = _run_here(box, item, nextitem, prepared or _prepare())
            else:
                status, held, _ahead, left = _run_fork(box, item, nextitem, scratch, _ahead, prepared or _prepare())
            prepared = None
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == STOP:  # pytest.exit, ^C: the session ends
                with contextlib.suppress(Exception):  # the fork reported why (a layer the helper lost, too)
                    _end_what_it_left(left, _ahead)
                _reap_the_last_fork()
                with contextlib.suppress(Exception):
                    _let_go(None)
                with contextlib.suppress(Exception):  # what pytest's session end tears down after them
                    item.session._setupstate.teardown_exact(None)
                return
            if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                _end_as(status)  # a crash, a timeout: pytest reports the test as if this process had it
            if held and nextitem is not None and _may_report_first(box) and _nothing_to_tear_down(item, nextitem):
                # pytest reads the reports while this process ends what the test left and readies the next
                # test's layer (its fork waits already, or is made after pytest asks: nothing is set up for it)
                protocol.send(_channel, {"type": "report", "data": held[-1]})
                protocol.send(_channel, {"type": "done"})
                _end_what_it_left(left, _ahead)
                _reap_the_last_fork()
                prepared = _prepare() if _ahead is not None else None
                continue
            _end_what_it_left(left, _ahead)
            _finish_teardown(item, nextitem, held)
            if nextitem is None:
                _send_what_persists(item.config, scratch, box.outputs)
            protocol.send(_channel, {"type": "done"})
            _reap_the_last_fork()
        except BaseException as exc:
            protocol.send(_channel, _ended_early(exc, item))
            return
        if nextitem is None:
            return


def _let_go(prepared: _Prepared | None) -> None:
    """When pytest asks for no more tests, before the scope's fixtures are torn down: the fork made ahead goes
    (its copies of the fixtures' pipes would keep a teardown waiting for EOF), and so does the layer put on."""
    global _ahead
    if _ahead is not None:
        _ahead.cancel()
        _ahead = None
    _unprepared(prepared)


def _capture(item: pytest.Item, when: str) -> contextlib.AbstractContextManager[None]:
    """pytest's capture of one phase, whose output it adds to the item's report sections."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    return capman.item_capture(when, item) if capman is not None else contextlib.nullcontext()


def _set_up_wider_fixtures(item: pytest.Item) -> None:
    """The collectors above the item and its fixtures of wider scope, set up here so that every test's
    fork inherits them. An error is left for the test's own setup: pytest keeps a collector's and a
    fixture's error and raises it again there, in the test's setup report."""
    setup_state = item.session._setupstate
    request = getattr(item, "_request", None)
    info = getattr(item, "_fixtureinfo", None)
    with _capture(item, "setup"):
        try:
            if item.parent is not None:
                setup_state.setup(item.parent)  # type: ignore[arg-type]  # a node's chain, like an item's
            if request and info is not None:
                setup_state.stack[item] = ([], None)  # the request is the item's, which pytest checks is set up
                try:
                    for name in item.fixturenames:  # type: ignore[attr-defined]  # pytest's order: wider scopes first
                        definitions = info.name2fixturedefs.get(name)
                        if definitions and definitions[-1].scope != "function":
                            request.getfixturevalue(name)
                finally:
                    setup_state.stack.pop(item, None)
        except (pytest.exit.Exception, KeyboardInterrupt):
            raise
        except BaseException:
            pass


def _run_fork(
    box: Sandbox,
    item: pytest.Item,
    nextitem: pytest.Item | None,
    scope_scratch: int | None,
    ahead: _Ahead | None,
    prepared: _Prepared,
) -> tuple[int, list[dict[str, Any]], _Ahead | None, leftovers.Snapshot]:
    """Run the item in a fork (``ahead``: the fork made for it while the test before it ended) over its
    layer (``prepared``); its exit status, held teardown report, the next test's fork if one was made ahead,
    and what was there before it (for _end_what_it_left). The fork lets go of the scope's scratch view (the
    scope's uppers, read for the scope's outputs): nothing of it is the test's. Without a layer helper (the
    hermetic session's xdist workers) the test writes to the scope's view."""
    global _scope_pid
    _scope_pid = os.getpid()
    layer, before = prepared.layer, prepared.before
    _empty_crash_report(box)
    following: _Ahead | None = None
    fork = ahead
    try:
        if fork is not None and not fork.go(nextitem, layer):
            fork.cancel()  # the test before it left it otherwise than a fork made now: one is made now
            fork = None
        if fork is None:
            fork = _fork(box, item, scope_scratch, not_its=())
            fork.go(nextitem, layer)
        if layer is not None:
            os.close(layer)
            layer = None
        following = _relay_the_fork(fork, item, nextitem, before.children, box, scope_scratch)
        status = _ending(fork)
        with open(fork.held_fd, "rb", closefd=False) as held:
            held.seek(0)
            text = held.read()
    except BaseException:
        if following is not None:
            following.cancel()
        if ahead is not None and ahead.waiting:
            ahead.cancel()
        raise
    finally:
        if layer is not None:
            os.close(layer)
        if fork is not None:
            fork.close()
    left = dataclasses.replace(before, children=before.children - {fork.pid})  # a fork made ahead: in it
    return status, _held_reports(text), following, left


def _ending(fork: _Ahead) -> int:
    """The fork's exit status. One that said it is finished is killed (a test could say so and go on), and
    where nothing of it can outlive it, not waited for: its copy of this process's memory is taken down
    (about 2 ms for a pytest-sized one) while this process ends the test; _reap_the_last_fork reaps it."""
    global _exiting
    if fork.said is None:
        _, status = os.waitpid(fork.pid, 0)
        return status
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fork.pidfd, signal.SIGKILL)
    if leftovers.leaves_nothing(fork.pid):
        _exiting = fork.pid
    else:  # what it started comes to this process once it has exited, to be ended with the rest
        os.waitpid(fork.pid, 0)
    return fork.said << 8  # not the SIGKILL: it was exiting


def _reap_the_last_fork() -> None:
    """Before anything of the next test: the last test's fork has ended (its fds closed, its locks and ports
    let go) and is reaped."""
    global _exiting
    if _exiting is not None:
        pid, _exiting = _exiting, None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _empty_crash_report(box: Sandbox) -> None:
    """What an earlier test wrote in the crash memfd is no part of this one's crash report."""
    os.ftruncate(box.crash_fd, 0)
    os.lseek(box.crash_fd, 0, os.SEEK_SET)


def _tear_down_its_own_fixtures_only(item: pytest.Item) -> None:
    """pytest's teardown after the item goes no wider than its parent: the scope process tears down the rest
    after the test's layer is off (_finish_teardown), as the next test needs."""
    setup_state = item.session._setupstate
    teardown_exact = setup_state.teardown_exact
    scope = item.parent
    setup_state.teardown_exact = lambda nextitem: teardown_exact(scope)  # type: ignore[method-assign,arg-type]


def _threads_run_here() -> bool:
    """Whether a thread besides this one runs in the scope process (a fixture's server, a pool's workers): a
    fork would have none of them, so what a test asks of such a thread (pytest-httpserver's handlers) would
    reach a copy that no thread serves."""
    try:
        return len(os.listdir("/proc/self/task")) > 1
    except OSError:
        return threading.active_count() > 1


def _run_here(
    box: Sandbox, item: pytest.Item, nextitem: pytest.Item | None, prepared: _Prepared
) -> tuple[int, list[dict[str, Any]], leftovers.Snapshot]:
    """Run the item in this process, as a fork would run it (over its layer, tearing down its own fixtures
    only, its teardown report held for _finish_teardown), for a scope whose fixtures run threads: the test
    shares this process with them, as in a plain run. What it leaves running is ended, and its layer taken
    off, as after a fork; its exit status as a fork's (STOP: pytest.exit or ^C, already reported)."""
    global _held_teardown, _cwd_after_the_layer
    assert _channel is not None
    _empty_crash_report(box)
    _tear_down_its_own_fixtures_only(item)
    try:
        cwd = os.getcwd()
    except OSError:  # a fixture's process removed it: the session's, where the test process started
        cwd = box.cwd
    _held_teardown = []
    status = 0
    try:
        with contextlib.suppress(OSError):
            os.chdir(cwd)  # looked up before the layer was mounted: through it now
        if not _beside_other_tests:  # as a test's fork is (this process is not dumpable between tests)
            syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
        try:
            _run_protocol(box, item, nextitem)
            if prepared.layer is not None:
                for message in outputs.collect(prepared.layer, box.outputs):
                    protocol.send(_channel, message)
        except BaseException as exc:
            protocol.send(_channel, _ended_early(exc, item))
            status = STOP << 8
    finally:
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        del item.session._setupstate.teardown_exact  # the instance's own, back to the class's method
        held, _held_teardown = _held_teardown, None
        if prepared.layer is not None:
            os.close(prepared.layer)
        try:
            left_in = os.getcwd()  # where the test left this process: a plain run stays there, if it is there
        except OSError:
            left_in = cwd
        _cwd_after_the_layer = (left_in, cwd)
        with contextlib.suppress(OSError):
            os.chdir("/")  # out of the layer: its directories go with it (_end_what_it_left comes back)
    return status, held, prepared.before


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A test's layer, attached (an fd of its uppers' view), and what the scope held before it: both made
    before the test's fork runs, while pytest still read the last test's reports if it could be."""

    layer: int | None
    before: leftovers.Snapshot


def _prepare() -> _Prepared:
    layer = test_layers.begin(_layers) if _layers is not None else None
    return _Prepared(layer, leftovers.take())


def _unprepared(prepared: _Prepared | None) -> None:
    """Take off a layer put on ahead, for a test that does not come or that has fixtures to set up first."""
    if prepared is not None:
        if prepared.layer is not None:
            os.close(prepared.layer)
        if _layers is not None:
            test_layers.end(_layers)


def _end_what_it_left(left: leftovers.Snapshot, following: _Ahead | None) -> None:
    """Kill what the test left running (not the next test's fork), and take its layer off: the scope's view
    is back, as the fixtures left it."""
    global _cwd_after_the_layer
    besides = {following.pid} if following is not None else set()
    if _exiting is not None:  # the test's fork, killed, with nothing left (_ending)
        besides.add(_exiting)
    leftovers.end(left, besides=frozenset(besides))
    if _layers is not None:
        test_layers.end(_layers)
    if _cwd_after_the_layer is not None:  # a test run in this process (_run_here): its working directory
        where, before = _cwd_after_the_layer
        _cwd_after_the_layer = None
        try:
            os.chdir(where)
        except OSError:
            with contextlib.suppress(OSError):
                os.chdir(before)


def _may_report_first(box: Sandbox) -> bool:
    """Whether a test may be reported done before what it left running is ended: not where pytest shares the
    scope's mounts (the hermetic session's: what it writes on the reports would land in the test's layer), nor
    with volumes (pytest lets go of a named volume's lock once a test is done: one writer at a time)."""
    return not _pytest_sees_the_layers and not box.spec.volumes


def _nothing_to_tear_down(item: pytest.Item, nextitem: pytest.Item) -> bool:
    """Whether pytest's teardown between the two tests (``teardown_exact(nextitem)``) would tear nothing down."""
    stack = list(item.session._setupstate.stack)
    return stack == nextitem.listchain()[: len(stack)]


@dataclasses.dataclass
class _Ahead:
    """A test's fork, seen from the scope process: made when its test is asked for, or ahead of it (while
    the test before it ends), and then waiting for its go (the test's next item, its layer)."""

    nodeid: str
    pid: int
    pidfd: int
    line: socket.socket  # the scope process's end of the fork's line
    held_fd: int  # where the fork leaves its teardown report for the scope process to finish
    made_ahead: bool
    waiting: bool = True
    closed: bool = False
    said: int | None = None  # the exit code it said it ends with, once it did ("finished")

    def go(self, nextitem: pytest.Item | None, layer: int | None) -> bool:
        """Send the go; for a fork made ahead, False unless it answers that it goes as a fork made now would.
        The test before it ran beside it, as the same user: it may have killed it, or signalled it, set its
        limits, nice value, CPUs or OOM score, or made it the owner of a shared file's SIGIO. Signals wait,
        blocked, and are dropped at the go; what else differs from this process's own settings, it says."""
        self.waiting = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)  # it could have been stopped
        go = {"type": "go", "next": nextitem.nodeid if nextitem is not None else None, "dependency": _carried}
        if self.made_ahead:
            go["settings"] = _process_settings()
        try:
            protocol.send(self.line, go, fds=(layer,) if layer is not None else ())
        except OSError:
            return not self.made_ahead  # one made now says that it is gone as it would have: by exiting
        if not self.made_ahead:
            return True
        answered = select.select([self.line.fileno(), self.pidfd], [], [], GO_ANSWER_TIMEOUT)[0]
        if not answered or self.pidfd in answered:
            return False
        try:
            answer, _ = protocol.recv(self.line)
        except (protocol.ProtocolError, OSError):
            return False
        return isinstance(answer, dict) and answer.get("type") == "going"

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def cancel(self) -> None:
        """A fork made ahead for a test that does not come (pytest asked for another, or for none), or that is
        not as a fork made now would be."""
        self.waiting = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self.pidfd, self.held_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.line.close()


def _ready(ahead: _Ahead | None, item: pytest.Item) -> _Ahead | None:
    """The fork made ahead for ``item``, if there is one and it still waits."""
    if ahead is not None and (ahead.nodeid != item.nodeid or not ahead.alive()):
        ahead.cancel()
        return None
    return ahead


_RLIMITS = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))


def _process_settings() -> list[Any]:
    """What one process of the sandbox may change in another of the same user without tracing it: its
    resource limits, nice value, scheduling, CPUs and OOM score (as JSON: the fork compares them)."""
    limits = [resource.getrlimit(kind) for kind in _RLIMITS]
    try:
        with open("/proc/self/oom_score_adj") as f:
            oom = f.read().strip()
    except OSError:
        oom = ""
    settings: list[Any] = json.loads(
        json.dumps(
            [
                limits,
                os.getpriority(os.PRIO_PROCESS, 0),
                os.sched_getscheduler(0),
                os.sched_getparam(0).sched_priority,
                sorted(os.sched_getaffinity(0)),
                oom,
            ]
        )
    )
    return settings


def _signals_aimed_at_me() -> bool:
    """Whether a file this process holds sends its SIGIO (or F_SETSIG's signal) to it or to its group: only
    the test that ran beside a fork made ahead could have set that (a fork made now had no pid to aim at)."""
    me = os.getpid()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if abs(fcntl.fcntl(int(name), fcntl.F_GETOWN)) == me:
                return True
    return False


def _fork(box: Sandbox, item: pytest.Item, scope_scratch: int | None, not_its: tuple[int, ...]) -> _Ahead:
    """Fork the item's test process, which waits for its go with every signal blocked. One made ahead closes
    ``not_its`` (the fds of the running test's fork) and waits not dumpable, as the scope process is: that
    test cannot trace it."""
    held_fd = os.memfd_create("sandbox-teardown", os.MFD_CLOEXEC)
    mine, theirs = protocol.socketpair()
    _flush_stdio()  # a fixture's print under -s, in a pipe's buffer: each fork would write it again at its end
    mask = process.block_every_signal()
    pid = os.fork()
    if pid == 0:
        try:
            mine.close()
            for fd in (*not_its, *([scope_scratch] if scope_scratch is not None else [])):
                with contextlib.suppress(OSError):
                    os.close(fd)
            _test_fork(box, item, held_fd, theirs, mask)
        finally:
            os._exit(1)  # never back into the scope process's frames
    process.set_signal_mask(mask)
    theirs.close()
    return _Ahead(item.nodeid, pid, os.pidfd_open(pid), mine, held_fd, made_ahead=bool(not_its))


def _alike(item: pytest.Item, nextitem: pytest.Item) -> bool:
    """Whether the scope process sets up and tears down nothing between the two tests: the same collectors,
    and no fixture of wider scope the next one uses that the first did not (same definition, same parameter).
    Then a fork made for the next test while the first one ends is what a fork made after it would be."""
    if nextitem.parent is not item.parent:
        return False
    first, then = _wider_fixtures(item), _wider_fixtures(nextitem)
    return first is not None and then is not None and then <= first


def _wider_fixtures(item: pytest.Item) -> frozenset[tuple[str, int, object]] | None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    callspec = getattr(item, "callspec", None)
    indices = getattr(callspec, "indices", {}) if callspec is not None else {}
    found = set()
    for name in getattr(item, "fixturenames", ()):
        definitions = info.name2fixturedefs.get(name)
        if definitions and definitions[-1].scope != "function":
            found.add((name, id(definitions[-1]), indices.get(name)))
    return frozenset(found)


def _held_reports(text: bytes) -> list[dict[str, Any]]:
    """The teardown reports the fork held, as it wrote them; none if what is there is not that (the memfd is
    the test's too: a test that scribbles on its fds writes there)."""
    try:
        held = json.loads(text)["held"] if text else []
    except (ValueError, TypeError, KeyError):
        return []
    return held if isinstance(held, list) and all(isinstance(report, dict) for report in held) else []


def _relay_the_fork(
    fork: _Ahead,
    item: pytest.Item,
    nextitem: pytest.Item | None,
    fixtures: frozenset[int],
    box: Sandbox,
    scope_scratch: int | None,
) -> _Ahead | None:
    """Until the test's fork exits: relay its messages to pytest and pytest's answers to it, and reap what it
    orphaned as that exits (orphans come to this process, a subreaper; the fixtures' processes stay, for
    their Popen objects to wait for). Once the test's call is reported, and if the next test needs nothing
    set up or torn down here, fork the next test's process meanwhile (its teardown and exit take about as
    long as a fork); that fork is returned.

    The fork has a line of its own, never the scope's: on the scope's, pytest takes what comes after a test's
    "done" for the next test, so a test could report every later test of its scope as passed without running
    it. Here only this process says "done", and a report passes only for the test that runs."""
    scope = _channel
    assert scope is not None
    line, pid, nodeid = fork.line, fork.pid, item.nodeid
    following: _Ahead | None = None
    wanted = nextitem is not None and _alike(item, nextitem)
    watched = {fork.pidfd, line.fileno(), scope.fileno()}
    try:
        while True:
            readable = select.select(list(watched), [], [], leftovers.REAP_INTERVAL)[0]
            if not readable:
                leftovers.reap_exited(besides=fixtures | {pid, *([following.pid] if following else [])})
                continue
            if scope.fileno() in readable and not _forward(scope, line, None):
                watched.discard(scope.fileno())  # pytest ended the session's line: the fork's reports go nowhere
            if line.fileno() in readable:
                called = _forward(line, scope, nodeid, pid)
                if not called:
                    watched.discard(line.fileno())
                elif called in (FINISHED, STOPPED):
                    fork.said = STOP if called == STOPPED else 0
                    return following
                elif called == "call" and wanted and following is None:
                    assert nextitem is not None
                    following = _fork(box, nextitem, scope_scratch, not_its=(line.fileno(), fork.pidfd, fork.held_fd))
            if fork.pidfd in readable:  # what it sent before it exited, then no more
                while line.fileno() in watched and select.select([line], [], [], 0)[0]:
                    if not _forward(line, scope, nodeid, pid):
                        watched.discard(line.fileno())
                return following
    except BaseException:
        if following is not None:
            following.cancel()
        raise


def _forward(source: socket.socket, target: socket.socket, nodeid: str | None, pid: int = 0) -> bool | str:
    """One message from ``source`` to ``target``; False once ``source`` is closed or broken, else True, or the
    phase of a report of the test's. From a test (``nodeid`` set): "done" and another test's reports are
    dropped, a malformed message ends the test."""
    try:
        message, fds = protocol.recv(source)
    except protocol.ProtocolError as exc:
        if pid:  # the test's line: pytest says so as if it had read it, and ends the sandbox
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                protocol.send(target, {"type": "malformed", "error": str(exc)})
        return False
    if message is None:
        return False
    from_test = nodeid is not None and isinstance(message, dict)
    try:
        if not from_test or _of_this_test(message, str(nodeid)):
            with contextlib.suppress(OSError):
                protocol.send(target, message, fds=tuple(fds))
        if from_test and message.get("type") == "finished":
            return STOPPED if message.get("code") == STOP else FINISHED
        if from_test and message.get("type") == "report":
            with contextlib.suppress(OSError):
                protocol.send(source, {"type": "relayed"})  # the fork waits for this (_send_report)
            when = message["data"].get("when") if isinstance(message.get("data"), dict) else None
            return when if when in ("setup", "call", "teardown") else True
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _of_this_test(message: dict[str, Any], nodeid: str) -> bool:
    if message.get("type") in ("done", "malformed", "finished"):
        return False  # only the scope process says a test is done (after its fork has ended), or malformed
    if message.get("type") == "report":
        data = message.get("data")
        return isinstance(data, dict) and data.get("nodeid") == nodeid
    return True


def _test_fork(box: Sandbox, item: pytest.Item, held_fd: int, line: socket.socket, mask: set[int]) -> NoReturn:
    """One test in a fork of the scope process, talking to pytest on ``line`` (relayed by the scope process);
    never returns. It waits for its go first: the next item, the test's layer and the earlier tests' outcomes
    (a fork made ahead was made before they were known)."""
    global _held_teardown, _channel, _relayed
    assert _channel is not None
    _channel.close()  # the scope's line to pytest: not this test's to write on
    _channel = line
    _relayed = True
    code = 0
    unready: BaseException | None = None  # reported once the test runs
    try:  # never back into the scope process's frames, whatever happens
        process.die_with_parent(_scope_pid)
        try:  # what needs neither the go nor the layer, done while a fork made ahead waits
            # Its own process group (killpg(0) ends the test's processes, not the fixtures'), and it ends with
            # the scope process: a test that kills that one fails with it, and leaves nothing behind.
            os.setpgid(0, 0)
            syscalls.join_new_session_keyring()  # keys it adds to its session go with it
            scope_children.adopt()  # a fixture's Popen: its process is the scope process's child, not this one's
            if _layers is not None:
                _layers.close()
            plugin_state.forget_inherited_suite_properties(item.config)
            _tear_down_its_own_fixtures_only(item)
        except Exception as exc:
            unready = exc
        go, fds = protocol.recv(line)
        if not isinstance(go, dict) or go.get("type") != "go":
            _exit(0)
        while pending := signal.sigpending():  # sent while it waited: none was meant for its test
            signal.sigtimedwait(pending, 0)
        if "settings" in go:  # made ahead: the test that ran beside it left it as a fork made now would be?
            alike = go["settings"] == _process_settings() and not _signals_aimed_at_me()
            protocol.send(line, {"type": "going" if alike else "spoilt"})
            if not alike:
                _exit(0)
        process.set_signal_mask(mask)
        layer = fds[0] if fds else None
        nextitem = _scope_items.get(go.get("next") or "")
        plugin_state.apply_carried(_scope_items, go.get("dependency"))
    except BaseException:
        _exit(0)
    try:
        if unready is not None:
            raise unready
        if not _beside_other_tests:  # its own /proc files, debuggers and py-spy work as usual (not dumpable
            syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)  # while it waited: the test before it could trace it)
        with contextlib.suppress(OSError):
            os.chdir(os.getcwd())  # looked up before the layer was mounted: through it now
        _held_teardown = []
        _run_protocol(box, item, nextitem)
        _send_what_persists(item.config, layer, box.outputs)
        os.write(held_fd, protocol.encode({"held": _held_teardown}))
    except BaseException as exc:
        protocol.send(_channel, _ended_early(exc, item))
        code = STOP
    _flush_stdio()
    with contextlib.suppress(Exception):  # the scope process goes on while this one's memory is taken down
        protocol.send(_channel, {"type": "finished", "code": code})
    os._exit(code)


def _finish_teardown(item: pytest.Item, nextitem: pytest.Item | None, held: list[dict[str, Any]]) -> None:
    """Tear down what the next test does not share and send the test's teardown report, with what that
    teardown raised or printed in it (pytest reports a scope's teardown on the scope's last test)."""
    assert _channel is not None
    if held and nextitem is not None and _nothing_to_tear_down(item, nextitem):
        protocol.send(_channel, {"type": "report", "data": held[-1]})  # as the test's fork logged it
        return
    _reap_the_last_fork()  # the fixtures are torn down once the test's process is gone, as in a plain run
    config = item.config
    setup_state = item.session._setupstate
    with _capture(item, "teardown"):
        call = pytest.CallInfo.from_call(
            lambda: setup_state.teardown_exact(nextitem), "teardown", reraise=(pytest.exit.Exception, KeyboardInterrupt)
        )
    ours = pytest.TestReport.from_item_and_call(item, call)
    sections = [section for section in ours.sections if section[0].endswith(" teardown")]
    if not held:  # the fork logged no teardown (pytest.exit): only an error of ours is worth a report
        if ours.failed:
            ours.sections = sections
            held = [config.hook.pytest_report_to_serializable(config=config, report=ours)]
        else:
            return
    data = held[-1]
    if ours.failed or sections:
        report = config.hook.pytest_report_from_serializable(config=config, data=data)
        if ours.failed and report.passed:
            report.outcome, report.longrepr = "failed", ours.longrepr
        elif ours.failed:
            report.sections.append(("teardown of wider fixtures", str(ours.longrepr)))
        report.sections = _merged_sections(report.sections, sections)
        report.duration += ours.duration
        config.hook.pytest_report_teststatus(report=report, config=config)
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
    protocol.send(_channel, {"type": "report", "data": data})


_SECTION_ORDER = ("Captured stdout teardown", "Captured stderr teardown", "Captured log teardown")


def _merged_sections(sections: list[tuple[str, str]], added: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The test's teardown sections with those of the scope's teardown in them, as one phase's capture: a
    section of the same name gets the text appended, a new one goes where pytest puts it (stdout, stderr,
    then log)."""
    merged = list(sections)
    for name, text in added:
        same = next((index for index, (other, _) in enumerate(merged) if other == name), None)
        if same is not None:
            merged[same] = (name, merged[same][1] + text)
            continue
        rank = _SECTION_ORDER.index(name) if name in _SECTION_ORDER else len(_SECTION_ORDER)
        later = (i for i, (other, _) in enumerate(merged) if other in _SECTION_ORDER[rank + 1 :])
        merged.insert(next(later, len(merged)), (name, text))
    return merged


def _end_as(status: int) -> NoReturn:
    """End this process as the test's fork ended, so pytest reports the crash or timeout as it would
    for a sandbox of one test (no core file of this process: it is not what crashed)."""
    process.die_as_signalled(status)
    _exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _send_what_persists(config: pytest.Config, scratch: int | None, uppers: tuple[tuple[str, str], ...]) -> None:
    """At the end of a sandbox or of a test's fork: the files written under declared outputs (``scratch``: the
    uppers' tmpfs), junit suite properties and what coverage measured."""
    assert _channel is not None
    if scratch is not None:
        for message in outputs.collect(scratch, uppers):
            protocol.send(_channel, message)
    for message in plugin_state.suite_properties(config):
        protocol.send(_channel, message)
    coverage = plugin_state.coverage_message()
    if coverage is not None:
        protocol.send(_channel, coverage)


def _watchdog(timeout: float, crash_fd: int) -> threading.Timer:
    """The marker's timeout: a thread, not faulthandler's one watchdog, which pytest's faulthandler_timeout
    (now running in here) re-arms. It dumps every thread's stack to the crash memfd and ends the test."""

    def expire() -> None:
        os.write(crash_fd, f"Timeout ({datetime.timedelta(seconds=timeout)})!\n".encode())  # as faulthandler says it
        faulthandler.dump_traceback(file=crash_fd, all_threads=True)
        os._exit(1)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.name = "sandbox-timeout"
    timer.start()
    return timer
