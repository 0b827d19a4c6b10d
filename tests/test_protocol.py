"""The message channel: JSON only, boundaries, large messages, fd passing, end of stream, schema checks."""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys

import pytest

from pytest_sandbox import protocol as sync
from pytest_sandbox.protocol import FROM_TEST, ProtocolError, check


def test_round_trip_is_json() -> None:
    a, b = sync.socketpair()
    with a, b:
        sync.send(a, {"type": "report", "data": {"longrepr": ("file.py", 3, "Skipped: x"), "obj": object}})
        message, fds = sync.recv(b)
    # tuples arrive as lists; what JSON cannot hold arrives as its repr, never as an object
    assert message == {"type": "report", "data": {"longrepr": ["file.py", 3, "Skipped: x"], "obj": repr(object)}}
    assert fds == []


def test_large_message_is_chunked() -> None:
    a, b = sync.socketpair()
    big = "x" * (sync.CHUNK * 5 + 17)
    with a, b:
        import threading

        sender = threading.Thread(target=sync.send, args=(a, {"big": big}))
        sender.start()
        message, _ = sync.recv(b)
        sender.join()
    assert message == {"big": big}


def test_fds_travel_with_the_message() -> None:
    a, b = sync.socketpair()
    read_end, write_end = os.pipe()
    with a, b:
        sync.send(a, {"op": "run"}, fds=(write_end,))
        message, fds = sync.recv(b)
    os.close(write_end)
    assert message == {"op": "run"} and len(fds) == 1
    # close-on-exec, whatever the sender's was: pid 1 is spawned while channels are open in the zygote
    assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    os.write(fds[0], b"ok")
    os.close(fds[0])
    assert os.read(read_end, 2) == b"ok"
    os.close(read_end)


def test_end_of_stream_and_nonblocking() -> None:
    a, b = sync.socketpair()
    with pytest.raises(BlockingIOError):
        sync.recv(b, block=False)
    a.close()
    assert sync.recv(b) == (None, [])
    b.close()


def test_stray_bytes_cannot_merge_messages() -> None:
    a, b = sync.socketpair()
    with a, b:
        sync.send(a, {"n": 1})
        sync.send(a, {"n": 2})
        assert sync.recv(b)[0] == {"n": 1}
        assert sync.recv(b)[0] == {"n": 2}


class Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("touch /nonexistent-pwned",))


@pytest.mark.parametrize(
    "junk",
    [
        b"garbage",  # no header
        sync.LAST + b"not json",  # not JSON
        sync.LAST + pickle.dumps({"type": "done"}),  # a pickle is not JSON either
        sync.LAST + pickle.dumps(Evil()),
        sync.LAST + b"[1, 2]",  # JSON, but not an object
        sync.LAST + b"[" * 20_000 + b"]" * 20_000,  # deeper than json's recursion: RecursionError, not ValueError
    ],
)
def test_anything_but_a_json_object_is_refused(junk: bytes) -> None:
    a, b = sync.socketpair()
    with a, b:
        a.send(junk)
        with pytest.raises(ProtocolError):
            sync.recv(b)
        sync.send(a, {"n": 1})
        assert sync.recv(b)[0] == {"n": 1}  # the channel still works for whoever reads on


def test_an_unterminated_message_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync, "MAX_MESSAGE", 3 * sync.CHUNK)
    a, b = sync.socketpair()
    with a, b:
        for _ in range(4):
            a.send(sync.MORE + b"x" * sync.CHUNK)
        with pytest.raises(ProtocolError, match="larger than"):
            sync.recv(b)


def test_a_message_cut_short_is_refused() -> None:
    a, b = sync.socketpair()
    a.send(sync.MORE + b'{"type":')
    a.close()
    with b, pytest.raises(ProtocolError, match="before its last chunk"):
        sync.recv(b)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "shell", "cmd": "id"}, "unknown message type 'shell'"),
        ({"data": {}}, "unknown message type None"),
        ({"type": "report"}, "report message without 'data'"),
        ({"type": "report", "data": []}, "'data' is list, expected dict"),
        (
            {
                "type": "warning",
                "message": "m",
                "when": "runtest",
                "category": ["m", "W"],
                "filename": "f",
                "lineno": True,
            },
            "'lineno' is bool",
        ),
        ({"type": "container", "id": "abc", "path": "/etc"}, "unknown field(s) path"),
    ],
)
def test_schema_refuses_what_a_test_may_not_send(message: dict[str, object], error: str) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        check(message, FROM_TEST)
    assert error in str(excinfo.value)


def test_schema_accepts_every_kind_the_test_process_sends() -> None:
    assert check({"type": "done"}, FROM_TEST) == "done"
    assert check({"type": "exit-requested", "reason": "r", "returncode": None}, FROM_TEST) == "exit-requested"
    assert (
        check(
            {
                "type": "warning",
                "message": "m",
                "when": "runtest",
                "category": ["m", "W"],
                "filename": "f",
                "lineno": 3,
            },
            FROM_TEST,
        )
        == "warning"
    )


IN_FLIGHT_FLOOD = """
import array, errno, os, resource, socket, threading, time
from pytest_sandbox import protocol

resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
flood, flood_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
try:
    while True:  # fds in flight, unread, until this user is at its limit
        flood.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
except OSError as exc:
    assert exc.errno == errno.ETOOMANYREFS, exc
threading.Timer(0.3, flood_end.close).start()  # pytest drops the flooding sandbox's channel
mine, mine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
start = time.monotonic()
protocol.send(mine, {"op": "start"}, fds=(fds[0],))  # another sandbox's start meanwhile
message, got = protocol.recv(mine_end)
print(message, len(got), round(time.monotonic() - start, 1))
"""


@pytest.mark.skipif(os.geteuid() == 0, reason="root is exempt from the in-flight fd limit (CAP_SYS_RESOURCE)")
def test_a_message_with_fds_waits_out_a_flood_of_fds_in_flight() -> None:
    """Linux bounds a user's fds in flight on unix sockets by RLIMIT_NOFILE, for all its processes together:
    a test flooding its channel must not make another sandbox's start fail while pytest drops it."""
    assert os.geteuid() != 0
    result = subprocess.run([sys.executable, "-c", IN_FLIGHT_FLOOD], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{'op': 'start'} 1"), result.stdout
