"""A first tour of pytest-sandbox: run `pytest examples -v` and read along.

Each marked test runs in its own rootless container: a read-only view of the
host, private /tmp, writable-but-throwaway project dir and $HOME, no network
but its own loopback, its own pid namespace. The unmarked tests after them run
on the host and show that nothing leaked out.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from pytest_sandbox import Sandbox

MARKER_FILE = pathlib.Path("sandbox-wrote-this.txt")
TMP_FILE = pathlib.Path("/tmp/pytest-sandbox-example.txt")


@pytest.mark.container
def test_writes_are_thrown_away(tmp_path: pathlib.Path) -> None:
    MARKER_FILE.write_text("only inside the sandbox")  # the project dir is writable...
    TMP_FILE.write_text("private /tmp")  # ...and /tmp is a fresh tmpfs
    (tmp_path / "scratch").write_text("tmp_path works as usual")
    assert MARKER_FILE.exists() and TMP_FILE.exists()


def test_host_did_not_change() -> None:
    assert not MARKER_FILE.exists()  # the overlay's upper layer is gone
    assert not TMP_FILE.exists()


@pytest.mark.container
def test_system_is_read_only() -> None:
    with pytest.raises(OSError):
        pathlib.Path("/usr/local/pytest-sandbox-example").write_text("nope")


@pytest.mark.container
def test_own_process_tree() -> None:
    names = []
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        with open(f"/proc/{pid}/comm") as f:
            names.append(f.read().strip())
    # pid 1 is the sandbox's reaper, pid 2 its scope process (this test runs in a fork of it) and a helper
    # mounts each test's layer: no host process in sight
    assert names == ["sandbox-init", "sandbox-test", "sandbox-layers", "sandbox-test"]


@pytest.mark.container
def test_no_network_but_loopback() -> None:
    server = socket.create_server(("127.0.0.1", 0))  # loopback is up and private
    with socket.create_connection(server.getsockname()) as client:
        client.sendall(b"ping")
        conn, _ = server.accept()
        assert conn.recv(4) == b"ping"
    with pytest.raises(OSError):  # everything else is unreachable
        socket.create_connection(("192.0.2.1", 80), timeout=1)


@pytest.mark.container
def test_background_processes_die_with_the_test() -> None:
    subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)", "pytest-sandbox-example-daemon"], start_new_session=True
    )
    time.sleep(0.1)  # no cleanup needed: the namespace ends with the test


def test_no_daemon_left_on_the_host() -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"pytest-sandbox-example-daemon" not in cmdline


@pytest.mark.container(hostname="build-box", env={"APP_MODE": "test"})
def test_options(sandbox: Sandbox) -> None:
    assert socket.gethostname() == "build-box"
    assert os.environ["APP_MODE"] == "test"
    assert sandbox.active and sandbox.spec.hostname == "build-box"
