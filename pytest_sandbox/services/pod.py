"""The session's pod: the zygote that runs services (in the pod's network namespace), their instances,
their published ports and scopes.

A service is started once per scope: by its fixture in pytest for unsandboxed tests, and by pytest before
a sandboxed test that needs it (the sandbox cannot start one: it has no line to any zygote). It is stopped
at its scope's end and, whatever happens, with the pod zygote: pytest's death kills the pod zygote, which
being pid 1 of its pid namespace takes every service with it (no reaper process).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pytest

from .. import protocol
from ..errors import SandboxError, ServiceError
from ..network.forward import Connector, Published
from ..runtime import service_process
from . import handles
from .definition import ServiceDefinition, used_by
from .records import Records

if TYPE_CHECKING:
    from ..runtime.handle import Zygote
    from ..volumes import VolumeStore
    from .shared import Remote, SharedServices

NOTIFY_MAX = 4096  # bytes of one sd_notify datagram read
LOG_READ_MAX = 16 * 2**20  # bytes of a service's log pytest reads at once
GONE_TIMEOUT = 30.0  # seconds a stopped service's namespace may take to empty
FIRST_POLL, LAST_POLL, BACKOFF = 0.002, 0.1, 1.25  # readiness checks: from 2 ms, a quarter longer each time


STARTER = pytest.StashKey[Callable[[], "Pod"]]()  # set by the plugin: the session's pod, started on first use


EXEC_TIMEOUT_MAX = 3600.0


def answer(item: pytest.Item, message: dict[str, Any], time_left: float | None) -> dict[str, Any]:
    """A sandboxed test's call on a service it uses (handles.PodMember): done here, in pytest, which owns
    the service; the answer goes back on the test's line. Only the services of the test's fixtures; an exec
    gets at most the test's time left, and its output at most EXEC_OUTPUT_MAX per stream."""
    try:
        return _answer(item, message, time_left)
    except Exception as exc:  # whatever the test sent, pytest goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _answer(item: pytest.Item, message: dict[str, Any], time_left: float | None) -> dict[str, Any]:
    name, call = message["name"], message["call"]
    if name not in {definition.name for definition in used_by(item)}:
        return {"error": f"this test does not use a service {name!r}"}
    try:
        instance = item.config.stash[STARTER]().instances.get(name)
        if instance is None:
            return {"error": f"service {name!r} is not running"}
        timeout = float(message["timeout"])
        if not math.isfinite(timeout):
            return {"error": f"timeout must be a finite number of seconds, not {message['timeout']!r}"}
        timeout = min(max(timeout, 0.0), EXEC_TIMEOUT_MAX, time_left if time_left is not None else math.inf)
        return handles.perform(instance, call, message["argv"], timeout)
    except (SandboxError, TypeError, ValueError, OverflowError) as exc:
        return {"error": str(exc)}


class Pod:
    def __init__(
        self,
        zygote: Zygote,
        definitions: dict[str, ServiceDefinition],
        volumes: VolumeStore,
        records: Records,
        refused: dict[str, str],
        shared: SharedServices | None = None,
        bridged: bool = True,
    ) -> None:
        self.zygote = zygote
        self.bridged = bridged  # an address per member (network/bridge.py); else one shared loopback
        self.shared = shared  # an xdist worker's: session services started once per run
        self.lock = threading.RLock()  # the shared services' socket threads call on instances too
        self.refused = refused  # services that cannot start here, and why (their image)
        self.definitions = definitions
        self.names = sorted(definitions)  # every service's address in the pod follows from these (network/bridge.py)
        self.volumes = volumes
        self.records = records
        self.connector = Connector(zygote.connector())
        self.instances: dict[str, Any] = {}  # by service name, one at a time: Instance, or shared.Remote

    def changed(self) -> None:
        """A service started or stopped: what ``pytest-sandbox services ls`` shows."""
        with contextlib.suppress(OSError):
            self.records.write([instance.record() for instance in self.instances.values()])

    def acquire(self, definition: ServiceDefinition, scope_key: str) -> Instance | Remote:
        """The service's instance for the scope node ``scope_key``, started (and ready) if it is not."""
        if definition.name not in self.definitions:
            raise ServiceError(
                f"{definition.where}: this session's pod was started without it (defined after the session "
                "started its pod?)"
            )
        if definition.name in self.refused:
            raise ServiceError(self.refused[definition.name])
        current = self.instances.get(definition.name)
        if current is not None and current.scope_key == scope_key and current.definition is definition:
            if current.failed:  # it did not start for this scope: every test of the scope hears why
                raise ServiceError(current.failed)
            if current.running or current.stopped:  # stopped by a test: stopped, as pytest's cached value is
                return current  # type: ignore[no-any-return]
            raise ServiceError(current.describe_exit("is no longer running"))
        if current is not None:
            current.stop()
            current.close()
        started: Instance | Remote
        if self.shared is not None and definition.scope == "session":  # once for all the run's xdist workers
            started = self.shared.acquire(self, definition, scope_key, lambda: self._start(definition, scope_key))
            self.instances[definition.name] = started
            self.changed()
        else:
            started = self._start(definition, scope_key)
        if started.failed:  # the reason, for this test and every other of the scope (the check above)
            raise ServiceError(started.failed)
        return started

    def _start(self, definition: ServiceDefinition, scope_key: str) -> Instance:
        instance = self.instances[definition.name] = Instance(self, definition, scope_key)
        with contextlib.suppress(ServiceError):  # the reason is in instance.failed
            instance.start()
        return instance

    def for_item(self, item: pytest.Item, definitions: Iterable[ServiceDefinition]) -> None:
        """Start what a sandboxed test needs before its sandbox runs (the fixture in there only names it)."""
        chain = item.listchain()
        for definition in definitions:
            self.acquire(definition, _scope_node(chain, definition.scope).nodeid)

    def end_scopes(self, nextitem: pytest.Item | None) -> None:
        """Stop each service whose scope does not hold the next test (all of them at the end)."""
        keep = {node.nodeid for node in nextitem.listchain()} if nextitem is not None else set()
        for instance in list(self.instances.values()):
            if instance.scope_key not in keep:
                instance.release()

    def after_test(self, item: pytest.Item) -> None:
        """A test that used services has ended: set-id bits on their read/write volumes are cleared (through a
        service, with exec() or the server's own means, a root test could leave a set-user-ID root file)."""
        for definition in used_by(item):
            instance = self.instances.get(definition.name)
            if instance is not None:
                instance.clear_setid_bits()

    def log_sections(self, item: pytest.Item) -> list[tuple[str, str]]:
        """A failed test's report sections: the recent log of each service it used."""
        sections = []
        for name in (definition.name for definition in used_by(item)):
            instance = self.instances.get(name)
            if instance is not None:
                sections.append((f"service {name} log", instance.log_tail()))
        return sections

    def close(self) -> None:
        if self.shared is not None:  # others' services first: their owners may be waiting for this worker
            self.shared.release_used()
        for instance in list(self.instances.values()):
            if self.shared is not None and self.shared.owns(instance.definition.name):
                self.shared.wait_for_users(instance.definition.name)
            if not instance.remote:
                with contextlib.suppress(Exception):
                    instance.stop()
            if self.shared is not None:
                self.shared.forget(instance.definition.name)
            instance.close()
        self.instances.clear()
        self.records.remove()
        self.connector.close()
        self.zygote.close()


def _scope_node(chain: list[Any], scope: str) -> Any:
    """The node whose end ends a service of ``scope`` started for the item at the end of ``chain``."""
    kinds = {"session": pytest.Session, "package": pytest.Package, "module": pytest.Module, "class": pytest.Class}
    if scope == "function":
        return chain[-1]
    wanted = kinds[scope]
    for node in reversed(chain):
        if isinstance(node, wanted):
            return node
    return chain[0] if scope in ("session", "package") else chain[-1]


class Instance:
    """One run of a service (restarts included) for one scope node."""

    def __init__(self, pod: Pod, definition: ServiceDefinition, scope_key: str) -> None:
        self.pod = pod
        self.definition = definition
        self.scope_key = scope_key
        self.nodeid = service_process.nodeid(definition.name)
        self.log = os.memfd_create(f"service-{definition.name}-log", os.MFD_CLOEXEC)
        self.status: socket.socket | None = None
        self.exit: dict[str, Any] | None = None
        self.stopped = False
        self._gone = False
        self.failed = ""  # why its last start failed
        self.notify: socket.socket | None = None  # sd_notify's socket, for wait.notify()
        self.notified = False
        self.published: dict[int, Published] = {}  # on host loopback, for the host and unsandboxed tests
        self.in_pod: dict[int, Published] = {}  # on its name address in the pod, for the pod's members
        self.handle = handles.Service(self)
        self.starts = 0
        self.started_at = 0.0
        self._volumes = contextlib.ExitStack()

    # -- life ------------------------------------------------------------------------------------

    remote = False  # shared.Remote: another xdist worker's

    def start(self) -> None:
        with self.pod.lock:
            try:
                self._start()
            except ServiceError as exc:
                self.failed = str(exc)
                raise

    def _start(self) -> None:
        if not self.published:  # first start: hold its named volumes while it may run
            self._volumes.enter_context(self.pod.volumes.held(self.definition.spec.volumes))
        self.exit, self.stopped, self._gone, self.failed = None, False, False, ""
        log_start = self.log_size()  # a restart's wait.log looks at what this start writes, not the last's
        started, started_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.status = self.pod.zygote.start_service(self.definition.name, self.log, started_end)
        except SandboxError as exc:
            os.close(started)
            raise ServiceError(f"service {self.definition.name!r} cannot start: {exc}") from None
        finally:
            os.close(started_end)
        try:
            self._wait_started(started)
        finally:
            os.close(started)
        self.starts += 1
        self.started_at = time.time()
        self._wait_ready(log_start)
        name, connector = self.definition.name, self.pod.connector
        for port in self.definition.ports:  # forwarded once it is ready; kept across restarts
            if port not in self.published:
                self.published[port] = Published(functools.partial(connector.connect, name, port))
            if port not in self.in_pod and self.pod.bridged:  # on a shared loopback it listens there itself
                try:
                    listener = connector.listen(name, port)
                except SandboxError as exc:
                    raise ServiceError(f"service {name!r}: {exc}") from None
                self.in_pod[port] = Published(functools.partial(connector.connect, name, port), listener)
        self.pod.changed()

    def _wait_started(self, started: int) -> None:
        """Until its command runs (the pipe closes on exec) or did not start ("!": then its exit follows)."""
        if not select.select([started], [], [], self.definition.ready_timeout)[0]:
            return  # still in its setup commands: the readiness timeout below applies
        if os.read(started, 1) == b"!":
            self._wait_exit(GONE_TIMEOUT)
            raise ServiceError(self.describe_exit("did not start"))

    def _wait_ready(self, log_start: int) -> None:
        condition = self.definition.readiness
        deadline = time.monotonic() + self.definition.ready_timeout
        delay = FIRST_POLL
        while True:
            self._poll()
            if self.exit is not None:
                raise ServiceError(self.describe_exit("exited before it was ready"))
            try:
                if condition is None or condition.check(_Probe(self, log_start)):
                    return
            except SandboxError as exc:
                raise ServiceError(f"service {self.definition.name!r}: {exc}") from None
            if time.monotonic() > deadline:
                self.stop()
                what = condition.describe() if condition is not None else "its start"
                raise ServiceError(
                    self.describe_exit(
                        f"was not ready ({what}) within {self.definition.ready_timeout:g} s", stopped=True
                    )
                )
            time.sleep(delay)
            delay = min(delay * BACKOFF, LAST_POLL)

    def restart(self) -> None:
        with self.pod.lock:
            self.stop()
            self.start()

    def release(self) -> None:
        """Its scope ended: stopped, unless other xdist workers may still use it (the pod stops it at the
        end, when they are done)."""
        if self.pod.shared is None or not self.pod.shared.owns(self.definition.name):
            self.stop()

    def stop(self) -> None:
        with self.pod.lock:
            self._stop()

    def _stop(self) -> None:
        """SIGTERM, SIGKILL after the stop timeout, then wait until its namespace is empty."""
        if self.status is None:
            return
        if self.exit is None:
            self.pod.zygote.signal(self.nodeid, signal.SIGTERM)
            self._wait_exit(self.definition.stop_timeout)
        if self.exit is None:
            self.pod.zygote.kill(self.nodeid)
            self._wait_exit(GONE_TIMEOUT)
        self._wait_exit(GONE_TIMEOUT, gone=True)
        self.status.close()
        self.status = None
        self.stopped = True
        for forwarded in self.in_pod.values():  # its name refuses connections until it is ready again
            forwarded.close()
        self.in_pod.clear()
        self._close_notify()
        self.clear_setid_bits()
        self.pod.changed()

    def clear_setid_bits(self) -> None:
        """Clear set-user/group-ID bits on its read/write volumes (as a test's are after it ends)."""
        with contextlib.suppress(OSError):
            self.pod.volumes.clear_setid_bits(self.definition.spec.volumes)

    def _close_notify(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def read_notify(self) -> bool:
        """Whether the service said READY=1 on its NOTIFY_SOCKET since it started (datagrams read now)."""
        while self.notify is not None and not self.notified:
            try:
                datagram = self.notify.recv(NOTIFY_MAX)
            except BlockingIOError:
                break
            self.notified = b"READY=1" in datagram.split(b"\n")
        return self.notified

    def close(self) -> None:
        self._close_notify()
        for forwarded in (*self.published.values(), *self.in_pod.values()):
            forwarded.close()
        self.published.clear()
        self.in_pod.clear()
        self._volumes.close()
        if self.log >= 0:
            os.close(self.log)
            self.log = -1

    # -- state -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        self._poll()
        return self.status is not None and self.exit is None

    @property
    def exit_code(self) -> int | None:
        self._poll()
        if self.exit is None:
            return None
        return -int(self.exit["signal"]) if "signal" in self.exit else int(self.exit.get("code", 1))

    def _poll(self) -> None:
        with self.pod.lock:
            if self.status is not None and self.exit is None:
                self._read_status(block=False)

    def _read_status(self, block: bool) -> bool:
        """Read one status message; True if there was one."""
        assert self.status is not None
        try:
            message, fds = protocol.recv(self.status, block=block)
        except BlockingIOError:
            return False
        except (protocol.ProtocolError, OSError):
            message, fds = None, []
        kind = message.get("type") if message is not None else "gone"
        if kind == "notify" and fds:
            self._close_notify()
            self.notify, self.notified = socket.socket(fileno=fds.pop(0)), False
            self.notify.setblocking(False)
        for fd in fds:
            os.close(fd)
        if kind in ("exit", "error") and self.exit is None:
            self.exit = message
        elif kind == "gone":
            if self.exit is None:
                self.exit = {"type": "exit", "code": 1}
            self._gone = True
        return True

    def _wait_exit(self, timeout: float, gone: bool = False) -> None:
        assert self.status is not None
        deadline = time.monotonic() + timeout
        while not (self._gone if gone else self.exit is not None):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.status], [], [], left)[0]:
                return
            self._read_status(block=True)

    def describe_exit(self, what: str, stopped: bool = False) -> str:
        exit = self.exit or {}
        if stopped or not exit:
            how = ""
        elif exit.get("type") == "error":
            how = f": {exit.get('message')}"
        elif "signal" in exit:
            how = f" (killed by signal {exit['signal']})"
        else:
            how = f" (exit code {exit.get('code')})"
        tail = self.log_tail()
        shown = f"; its last log lines:\n{tail}" if tail.strip() else "; it wrote nothing"
        return f"{self.definition.where}: service {self.definition.name!r} {what}{how}{shown}"

    def record(self) -> dict[str, Any]:
        return {
            "name": self.definition.name,
            "state": "running" if self.running else ("stopped" if self.stopped else f"exited ({self.exit_code})"),
            "scope": self.definition.scope,
            "scope_node": self.scope_key,
            "ports": {str(port): published.port for port, published in self.published.items()},
            "command": list(self.definition.command),
            "started": self.started_at,
            "starts": self.starts,
            "where": self.definition.where,
        }

    # -- what tests use --------------------------------------------------------------------------

    def published_port(self, port: int) -> int:
        if port not in self.published:
            raise ServiceError(
                f"service {self.definition.name!r} publishes no port {port}: ports={list(self.definition.ports)}"
            )
        return self.published[port].port

    def log_text(self, since: int = 0) -> str:
        """Its output since its first start (or from byte ``since``); past LOG_READ_MAX its beginning and its
        end (the service writes its log: it may be huge, or sparse)."""
        if self.log < 0:
            return ""
        end = os.fstat(self.log).st_size
        size = max(end - since, 0)
        if size <= LOG_READ_MAX:
            return os.pread(self.log, size, since).decode(errors="replace")
        half = LOG_READ_MAX // 2
        head = os.pread(self.log, half, since).decode(errors="replace")
        tail = os.pread(self.log, half, end - half).decode(errors="replace")
        return f"{head}\n[... pytest-sandbox: {size - 2 * half} bytes of the log left out ...]\n{tail}"

    def log_size(self) -> int:
        return os.fstat(self.log).st_size if self.log >= 0 else 0

    def log_tail(self, lines: int = handles.LOG_TAIL) -> str:
        return handles.last_lines(self.log_text(), lines)

    def exec(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        argv = handles.command_line(argv)
        with self.pod.lock:  # held to start it, not while it runs (another xdist worker may call meanwhile)
            if not self.running:
                raise ServiceError(self.describe_exit("is not running"))
            started = self.pod.zygote.start_exec(self.nodeid, argv)
        code, out, err = started.wait(timeout)
        self.clear_setid_bits()
        return subprocess.CompletedProcess(argv, code, out.decode(errors="replace"), err.decode(errors="replace"))


class _Probe:
    """What readiness conditions see of a starting service."""

    def __init__(self, instance: Instance, log_start: int) -> None:
        self._instance = instance
        self._log_start = log_start  # where this start's output begins in the service's log

    def listening(self, port: int) -> bool:
        return self._instance.pod.connector.listening(self._instance.definition.name, port)

    def log_text(self) -> str:
        return self._instance.log_text(self._log_start)

    def connect(self, port: int) -> socket.socket:
        return self._instance.pod.connector.connect(self._instance.definition.name, port)

    def run(self, argv: list[str]) -> int:
        code, _, _ = self._instance.pod.zygote.exec_in_service(self._instance.nodeid, argv, 10.0)
        return code

    def notified(self) -> bool:
        self._instance._poll()  # the notify socket comes on the status line
        return self._instance.read_notify()
