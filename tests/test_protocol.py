"""The message channel: boundaries, large messages, fd passing, end of stream."""

from __future__ import annotations

import os

import pytest

from pytest_sandbox import protocol as sync


def test_round_trip_keeps_types() -> None:
    a, b = sync.socketpair()
    with a, b:
        sync.send(a, {"type": "report", "data": {"longrepr": ("file.py", 3, "Skipped: x"), "n": [1, 2]}})
        message, fds = sync.recv(b)
    assert message == {"type": "report", "data": {"longrepr": ("file.py", 3, "Skipped: x"), "n": [1, 2]}}
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


def test_junk_on_the_socket_is_dropped() -> None:
    a, b = sync.socketpair()
    with a, b:
        a.send(b"garbage")
        a.send(sync.LAST + b"not a pickle")
        sync.send(a, {"n": 1})
        assert sync.recv(b)[0] == {"n": 1}
