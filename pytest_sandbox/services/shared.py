"""Session services shared by the xdist workers of one run: started once, by the first worker that needs one.

The first worker to need a session-scoped service starts it in its own pod (it owns it) and leaves a record
in the run's directory: the published ports, and an abstract socket where it answers the other workers'
calls (logs, exec, restart, stop), for processes of its user in the host's user namespace only. The others
use it: their unsandboxed tests through the published ports, their sandboxed tests through a relay
listening on the service's ports in their own pod (the name resolves to that pod's loopback, as for a
service of their own). Each user holds a shared lock on the service for the rest of its session; the owner
stops the service at its session's end, once it can lock it exclusively: when no worker uses it any more.
A worker that dies drops its lock with it; a service whose owner died is started again by the next worker
that needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .. import protocol
from ..errors import SandboxError, ServiceError
from ..linux import process
from ..linux.files import write_json_atomic
from ..network.forward import RETRY_ACCEPT, Connector, Published
from ..volumes import VolumeStore
from . import handles
from .definition import ServiceDefinition


class Started(handles.Instance, Protocol):
    """What is shared of a service this worker started (pod.Instance)."""

    failed: str
    stopped: bool
    published: dict[int, Published]


_S = TypeVar("_S", bound=Started)


class _Pod(Protocol):
    """What a remote service needs of this worker's pod (pod.Pod): relays, and the volumes it clears."""

    connector: Connector
    volumes: VolumeStore


SO_PEERPIDFD = 77  # socket.SO_PEERPIDFD from Python 3.13 on; Linux 6.5+
CALL_TIMEOUT_MARGIN = 30.0  # seconds a call may take past its own timeout (a restart's readiness, a stop)


def _process_start(pid: int) -> str:
    """The start time of ``pid`` (field 22 of /proc/PID/stat): with the pid, names one process for good."""
    try:
        return process.stat_fields(pid)[19].decode()
    except (OSError, IndexError):
        return ""


def _user_namespace(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/user")
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SharedServices:
    """One worker's side: the services it owns and the ones of other workers it uses."""

    def __init__(self, directory: str, worker: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.worker = worker
        self._owned: dict[str, _Owner] = {}
        self._used: dict[str, int] = {}  # name -> fd of <name>.users, locked shared while this worker uses it

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{name}.{suffix}")

    def _open(self, name: str, suffix: str) -> int:
        """An fd of a lock file of ``name`` (``lock``: its record; ``users``: who uses it)."""
        return os.open(self._path(name, suffix), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name, "json")) as file:
                record: dict[str, Any] = json.load(file)
        except (OSError, ValueError):
            return None
        if record.get("start") != _process_start(int(record.get("pid", 0))):
            return None  # its owner is gone
        return record

    @contextlib.contextmanager
    def _locked(self, name: str) -> Any:
        fd = self._open(name, "lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another worker may be starting it: wait until it is ready or failed
            yield
        finally:
            os.close(fd)

    def acquire(self, pod: _Pod, definition: ServiceDefinition, scope_key: str, start: Callable[[], _S]) -> _S | Remote:
        """The service for this worker: another worker's (a ``Remote``) if one runs it, else the ``Instance``
        ``start()`` started here, shared from now on. If it failed (``Instance.failed``), the other workers
        hear the same reason instead of trying again."""
        name = definition.name
        with self._locked(name):
            record = self._read(name)
            if record is not None and record.get("state") == "failed":
                return Remote(self, pod, definition, scope_key, record, failed=str(record.get("failed")))
            if record is not None and record.get("state") == "ready" and self._use(name):
                return Remote(self, pod, definition, scope_key, record)
            instance = start()
            record = {
                "pid": os.getpid(),
                "start": _process_start(os.getpid()),
                "worker": self.worker,
                "state": "failed" if instance.failed else "ready",
                "failed": instance.failed,
                "ports": {str(port): published.port for port, published in instance.published.items()},
            }
            if not instance.failed:
                owner = self._owned[name] = _Owner(instance)
                record["socket"] = owner.address
            write_json_atomic(self._path(name, "json"), record)
        return instance

    def _use(self, name: str) -> bool:
        """Lock ``name`` shared for this worker's session; False while its owner is stopping it."""
        if name in self._used:
            return True
        fd = self._open(name, "users")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._used[name] = fd
        return True

    def owns(self, name: str) -> bool:
        return name in self._owned

    def release_used(self) -> None:
        """This worker is done with the services of others."""
        for fd in self._used.values():
            os.close(fd)
        self._used.clear()

    def wait_for_users(self, name: str) -> None:
        """Until no other worker uses the service ``name`` this worker owns (their sessions have ended); new
        users are turned away from then on. Called without the pod's lock: users may call it meanwhile."""
        with self._locked(name):
            record = self._read(name)
            if record is not None and record.get("pid") == os.getpid():
                record["state"] = "stopping"
                write_json_atomic(self._path(name, "json"), record)
        fd = self._open(name, "users")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)

    def forget(self, name: str) -> None:
        """The owned service ``name`` is stopped: its socket closes and its record goes."""
        owner = self._owned.pop(name, None)
        if owner is not None:
            owner.close()
        with self._locked(name):
            record = self._read(name)
            if record is not None and record.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name, "json"))


class _Owner:
    """The owning worker's socket for one service: answers the calls of the other workers of the run."""

    def __init__(self, instance: Started) -> None:
        self._instance = instance
        self._me = _user_namespace("self")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(f"\0pytest-sandbox-service-{secrets.token_hex(16)}")  # abstract: no path to reach
        self.address: str = self._listener.getsockname()[1:].decode()
        self._listener.listen(16)
        self._closed = False
        threading.Thread(
            target=self._serve, name=f"pytest-sandbox-shared-{instance.definition.name}", daemon=True
        ).start()

    def _allowed(self, conn: socket.socket) -> bool:
        """Only a process of this user in the host's user namespace: a sandbox (another user namespace)
        that can see the socket is refused. The peer's pidfd (Linux 6.5+) pins the process its pid names
        while its namespace is read: a pid reused meanwhile cannot pass for it."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid = int.from_bytes(creds[0:4], "little"), int.from_bytes(creds[4:8], "little")
        if uid != os.geteuid():
            return False
        try:
            pidfd = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
        except OSError:
            return _user_namespace(pid) == self._me  # an older kernel: the pid as SO_PEERCRED gave it
        try:
            same = _user_namespace(pid) == self._me
            signal.pidfd_send_signal(pidfd, 0)  # still the process that connected: its pid was not reused
            return same
        except OSError:
            return False
        finally:
            os.close(pidfd)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(RETRY_ACCEPT)  # out of fds for a moment (connections flooding a port): go on
                continue
            try:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had now
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if not self._allowed(conn):
                return
            try:
                message, fds = protocol.recv(conn)
            except (protocol.ProtocolError, OSError):
                return
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            with contextlib.suppress(OSError):
                protocol.send(conn, self._call(message))

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            timeout = float(message.get("timeout", 0.0))
            return handles.perform(self._instance, str(message.get("call")), message.get("argv"), timeout)
        except (SandboxError, TypeError, ValueError, OverflowError) as exc:
            return {"error": str(exc)}

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


class Remote:
    """A session service another worker of the run owns, as this worker's pod and handles see it."""

    remote = True

    def __init__(
        self,
        shared: SharedServices,
        pod: _Pod,
        definition: ServiceDefinition,
        scope_key: str,
        record: dict[str, Any],
        failed: str = "",
    ) -> None:
        self.definition = definition
        self.volumes = pod.volumes
        self.scope_key = scope_key
        self.failed = failed
        self.owner = str(record.get("worker", "?"))
        self.ports = {int(port): int(published) for port, published in dict(record.get("ports") or {}).items()}
        self._socket = "\0" + str(record.get("socket", ""))
        self.handle = handles.Service(self)
        self.relays: dict[int, Published] = {}
        if not failed:  # this pod's sandboxed tests reach it by name, through a relay on its ports here
            for port, published in self.ports.items():
                connect = functools.partial(socket.create_connection, ("127.0.0.1", published))
                self.relays[port] = Published(connect, listener=pod.connector.listen(definition.name, port))

    def _ask(self, call: str, **fields: Any) -> dict[str, Any]:
        timeout = float(fields.get("timeout", 0.0)) + self.definition.ready_timeout + CALL_TIMEOUT_MARGIN
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(timeout)
                conn.connect(self._socket)
                protocol.send(conn, {"call": call, **fields})
                answer, _ = protocol.recv(conn)
        except (OSError, protocol.ProtocolError) as exc:
            raise ServiceError(
                f"service {self.definition.name!r} (shared, started by xdist worker {self.owner}): its worker "
                f"does not answer ({exc})"
            ) from None
        if answer is None:
            raise ServiceError(f"service {self.definition.name!r}: its worker ({self.owner}) is gone")
        if "error" in answer:
            raise ServiceError(f"service {self.definition.name!r}: {call}: {answer['error']}")
        return answer

    def _state(self) -> dict[str, Any]:
        try:
            return self._ask("state")
        except ServiceError:
            return {"running": False, "stopped": False, "exit_code": None}

    @property
    def running(self) -> bool:
        return not self.failed and bool(self._state().get("running"))

    @property
    def stopped(self) -> bool:
        return bool(self._state().get("stopped"))

    @property
    def exit_code(self) -> int | None:
        code = self._state().get("exit_code")
        return int(code) if code is not None else None

    def describe_exit(self, what: str, stopped: bool = False) -> str:
        return (
            f"{self.definition.where}: service {self.definition.name!r} (started by xdist worker {self.owner}) {what}"
        )

    def published_port(self, port: int) -> int:
        if port not in self.ports:
            raise ServiceError(
                f"service {self.definition.name!r} publishes no port {port}: ports={list(self.definition.ports)}"
            )
        return self.ports[port]

    def log_text(self) -> str:
        try:
            return str(self._ask("logs").get("text", ""))
        except ServiceError:
            return ""

    def log_tail(self, lines: int = handles.LOG_TAIL) -> str:
        return handles.last_lines(self.log_text(), lines)

    def exec(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        argv = handles.command_line(argv)
        return handles.completed(argv, self._ask("exec", argv=argv, timeout=timeout))

    def restart(self) -> None:
        self._ask("restart")

    def stop(self) -> None:
        self._ask("stop")

    def clear_setid_bits(self) -> None:
        """After a test of this worker that used it, as the owner does after its own: the volumes are this
        user's files wherever the service runs (the owner also clears after each exec() and at its stop)."""
        with contextlib.suppress(OSError):
            self.volumes.clear_setid_bits(self.definition.spec.volumes)

    def release(self) -> None:
        """Its scope ended here: the owner stops it once no worker uses it (SharedServices.wait_for_users)."""

    def close(self) -> None:
        for relay in self.relays.values():
            relay.close()
        self.relays.clear()

    def record(self) -> dict[str, Any]:
        return {
            "name": self.definition.name,
            "state": f"shared (started by {self.owner})" if not self.failed else "failed",
            "scope": self.definition.scope,
            "scope_node": self.scope_key,
            "ports": {str(port): published for port, published in self.ports.items()},
            "command": list(self.definition.command),
            "started": 0.0,
            "starts": 0,
            "where": self.definition.where,
        }
