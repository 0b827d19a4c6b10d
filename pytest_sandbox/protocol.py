"""Every message between pytest, the session zygote and a test process.

All channels are ``SOCK_SEQPACKET`` socketpairs, so message boundaries survive. A message
is one JSON object (never pickle: unpickling is running code, and a test process is not
trusted); large ones are split into chunks whose 4-byte header says whether more follow,
and the whole is bounded by ``MAX_MESSAGE``. What a test process sends is checked against
``FROM_TEST`` on arrival; a kind not listed there is refused, not ignored.

Each sandbox has two channels to pytest: *reports*, which the test process holds (whatever
its code writes there is untrusted), and *status*, which only the zygote holds, so a test
cannot forge how it ended::

    pytest                     zygote (pid 1 of the session)     pid 1 of a sandbox     test process (pid 2)
      |                          |-- spawn (ahead of time) ------->|  waits on fd 3      |
      |                          |-- fork (ahead of time) ---------------------------------->|  namespaces, mounts
      |                          |-- attached (after the cgroup move) ---------------------->|  (only with a cgroup)
      |                          |                                 |<-- join {flags} ----|  (a pipe, 4 bytes)
      |                          |                                 |-- joined ---------->|  setns, no capabilities
      |                          |                                                       |  /proc, fds, caps dropped
      |-- run {nodeid} + [status, reports] -->|                                          |
      |                          |-- {nodeid} + [reports] ---------------------------------->|  runs the protocol
      |<============================================================ container {id} ========|  (keepable layer only)
      |<============================================================ report {data} =========|  (setup, call, teardown)
      |<============================================================ benchmarks {...} ======|  after each test: what
      |<============================================================ flaky-report {...} ====|  pytest-benchmark, flaky
      |<============================================================ snapshots {...} =======|  and syrupy recorded
      |<============================================================ warning {...} =========|
      |<============================================================ log {text} ============|  (pytest's log_file)
      |<============================================================ output {path, data} ===|  (declared outputs,
      |<============================================================ suite-property {...} ==|  junit suite properties,
      |<============================================================ coverage {...} ========|  coverage: at its end)
      |<============================================================ service-call {...} ====|  a service's logs, exec,
      |============================================================= {answer} ============>|  restart, stop (it waits)
      |<============================================================ done ==================|  exits
      |<-- exit {code|signal, usage} + [crash memfd] --|  test exited: SIGKILL its pid 1
      |<-- gone -----------------|  pid 1 reaped: the namespace is empty
      |-- kill {nodeid} -------->|  (pytest's timeout: end that sandbox now)
      |-- exit ----------------->|  (end of session: kill and reap everything)

    ===  the reports channel (untrusted)      ---  the status and control channels
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
import time
import traceback
from typing import Any

from .errors import SandboxError

CHUNK = 60 * 1024
MAX_MESSAGE = 128 * 2**20  # a report holds captured output; past this the test fails, pytest's memory is safe
MORE, LAST = b"\0sb+", b"\0sb."
HEADER = len(MORE)
MAX_FDS = 6  # the most one message carries: the hermetic session start (status, channel, stdio, collection)
NEXT_CHUNK_TIMEOUT = 10.0  # a sender writes a message's chunks at once: a stalled one must not block pytest


class ProtocolError(SandboxError):
    """A peer sent something that is not a valid message."""


# What a test process may send: kind -> field -> allowed types. Nothing else is accepted.
FROM_TEST: dict[str, dict[str, tuple[type, ...]]] = {
    "container": {"id": (str,)},
    "report": {"data": (dict,)},
    "warning": {"message": (str,), "when": (str,), "category": (list,), "filename": (str,), "lineno": (int,)},
    "log": {"text": (str,)},
    "live-log": {"call": (str,), "text": (str,), "sep": (str,), "markup": (list,)},  # runtime/live_log.py
    "coverage": {"arcs": (bool,), "contexts": (dict,)},
    "output": {"path": (str,), "data": (str,), "mode": (int,)},
    "output-too-large": {"path": (str,), "size": (int,)},  # an output file past outputs.MAX_FILE: not carried
    "output-directory": {"path": (str,)},  # an empty directory under an output
    "suite-property": {"name": (str,), "value": (str,)},
    "benchmarks": {"benchmarks": (list,)},  # pytest-benchmark, flaky, syrupy: see plugin_results.py
    "flaky-report": {"text": (str,), "had_flaky_tests": (bool,)},
    "snapshots": {"assertions": (list,), "writes": (list,)},
    "done": {},
    "error": {"phase": (str,), "message": (str,)},
    "exit-requested": {"reason": (str,), "returncode": (int, type(None))},
    "interrupted": {"path": (str,), "lineno": (int,)},  # where ^C landed: see interrupt_location
    "interact": {"when": (str,)},  # --pdb: pdb is about to start on this phase's report (runtime/interact.py)
    # A scope sandbox's process relays each test's line: what it could not read there (the test's is dropped).
    "malformed": {"error": (str,)},
    # A sandboxed test calls a service it uses (logs, exec, restart, stop): pytest answers on the same line.
    "service-call": {"name": (str,), "call": (str,), "argv": (list,), "timeout": (int, float)},
}
PRINTED_REPR = "sandbox_printed_repr"  # in a report's data: its longrepr was a printable object, sent as its text
# What the zygote sends on a sandbox's status channel.
FROM_ZYGOTE: dict[str, dict[str, tuple[type, ...]]] = {
    "exit": {},
    "gone": {},
    "error": {"phase": (str,), "message": (str,)},
}


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(message: dict[str, Any]) -> bytes:
    """JSON; a value JSON cannot hold (an object in ``user_properties``) travels as its repr."""
    return json.dumps(message, default=repr, separators=(",", ":")).encode()


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = encode(message)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    for index, chunk in enumerate(chunks):
        marker = LAST if index == len(chunks) - 1 else MORE
        if index == 0 and fds:
            send_with_fds(sock, marker + chunk, fds)
        else:
            sock.sendall(marker + chunk)


FDS_IN_FLIGHT_WAIT = 10.0  # seconds a message with fds waits for the user's in-flight fds to drop


def send_with_fds(sock: socket.socket, data: bytes, fds: tuple[int, ...]) -> None:
    """Linux bounds the fds a user has in flight on unix sockets by RLIMIT_NOFILE (ETOOMANYREFS), for all
    of that user's processes together: a test that floods its channel with fds (pytest drops it and them)
    must not make another sandbox's start fail meanwhile. Wait, with backoff, for the count to drop."""
    deadline = time.monotonic() + FDS_IN_FLIGHT_WAIT
    pause = 0.001
    while True:
        try:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            return
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _take_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))


def recv(sock: socket.socket, block: bool = True) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the fds that came with it; (None, []) at end of stream.

    With ``block=False`` raises BlockingIOError when no message has arrived yet. Raises
    ProtocolError for anything that is not a framed JSON object within ``MAX_MESSAGE``.
    """
    data, fds = _receive(sock, block)
    try:
        return (None if data is None else decode(data)), fds
    except ProtocolError:
        for fd in fds:
            _close(fd)
        raise


def _receive(sock: socket.socket, block: bool) -> tuple[bytes | None, list[int]]:
    parts: list[bytes] = []
    size = 0
    fds: list[int] = []
    # Received fds are close-on-exec: pid 1 is spawned (exec) while a test's channels are open in the zygote,
    # and kept copies there held a channel open after the zygote let go of it (pytest waited for its end).
    flags = socket.MSG_CMSG_CLOEXEC | (0 if block else socket.MSG_DONTWAIT)
    try:
        while True:
            if parts and not select.select([sock], [], [], NEXT_CHUNK_TIMEOUT)[0]:
                raise ProtocolError(f"a message that stopped halfway (no next chunk in {NEXT_CHUNK_TIMEOUT:g} s)")
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(CHUNK + HEADER, socket.CMSG_SPACE(MAX_FDS * 4), flags)
            except ConnectionResetError:
                # The peer closed with a message of ours unread: Linux reports that once, before what the
                # peer sent is read. Its last words (a setup error) are still queued: read on.
                continue
            flags = socket.MSG_CMSG_CLOEXEC  # the rest of a chunked message is already on its way
            _take_fds(ancdata, fds)
            if not data:
                if parts:
                    raise ProtocolError("the message ended before its last chunk")
                return None, fds
            header = data[:HEADER]
            if header not in (MORE, LAST):
                raise ProtocolError(f"a datagram without a message header ({data[:16]!r})")
            size += len(data) - HEADER
            if size > MAX_MESSAGE:
                raise ProtocolError(f"a message larger than {MAX_MESSAGE // 2**20} MiB")
            parts.append(data[HEADER:])
            if header == LAST:
                return b"".join(parts), fds
    except ProtocolError:
        for fd in fds:
            _close(fd)
        raise


class Budget:
    """How many bytes of messages one sandbox may make pytest hold in all (reports, warnings, log records):
    a memory limit covers the sandbox, not the pytest process its messages land in."""

    def __init__(self, total: int) -> None:
        self.left = self.total = total

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise ProtocolError(f"more than {self.total // 2**20} MiB of messages in all")


def recv_untrusted(sock: socket.socket, budget: Budget, block: bool = True) -> dict[str, Any] | None:
    """The next message from a test process; None at end of stream. A test has no business sending
    file descriptors (kept, they would pin its namespaces in pytest or exhaust pytest's fd table):
    any that come are closed and the message is refused."""
    data, fds = _receive(sock, block)
    if fds:
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"a message with {len(fds)} file descriptor(s) attached")
    if data is None:
        return None
    budget.take(len(data))
    return decode(data)


def _close(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not JSON ({exc})") from None
    except RecursionError:  # arrays nested deeper than Python's recursion limit: an INTERNALERROR before
        raise ProtocolError("JSON nested deeper than Python can read") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object but {type(message).__name__}")
    return message


def check(message: dict[str, Any], schema: dict[str, dict[str, tuple[type, ...]]]) -> str:
    """The message's kind, after checking it has exactly the fields its kind allows."""
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in schema:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {', '.join(schema)}")
    fields = schema[kind]
    for name, allowed in fields.items():
        if name not in message:
            raise ProtocolError(f"{kind} message without {name!r}")
        value = message[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ProtocolError(
                f"{kind} message: {name!r} is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in allowed)}"
            )
    if fields:
        extra = sorted(set(message) - set(fields) - {"type"})
        if extra:
            raise ProtocolError(f"{kind} message with unknown field(s) {', '.join(extra)}")
    return kind


def interrupt_location(exc: BaseException, rootdir: str) -> dict[str, Any]:
    """Where a KeyboardInterrupt landed in the user's code: the innermost frame under pytest's rootdir
    (outside installed packages), else the innermost one; pytest's summary names it as it would
    without a sandbox."""
    frames = traceback.extract_tb(exc.__traceback__)
    root = os.path.join(rootdir, "")
    own = [f for f in frames if f.filename.startswith(root) and "/site-packages/" not in f.filename]
    if not (own or frames):
        return {"type": "interrupted", "path": "", "lineno": 0}
    frame = (own or frames)[-1]
    return {"type": "interrupted", "path": frame.filename, "lineno": frame.lineno or 0}
