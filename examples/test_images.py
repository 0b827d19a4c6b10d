"""Tests that run commands in images: run `pytest examples -v` and read along.

`busybox` is a tiny image shipped with pytest-sandbox, made from the host's static
busybox; `images/tools.Containerfile` builds on it. Both are built before the first test
that needs them (watch the "sandbox image:" lines the first time) and cached in
~/.cache/pytest-sandbox afterwards. Each test gets the image with a read/write
layer of its own that is thrown away when the test ends.
"""

from __future__ import annotations

import os

import pytest

from pytest_sandbox import Sandbox


@pytest.mark.container(image="tools")
def test_in_image(sandbox: Sandbox) -> None:
    r = sandbox.run(["sh", "-c", "cat /var/lib/app/state; echo $APP_MODE"])
    assert r.stdout == "ready\ntest\n"
    assert sandbox.run("cat fixtures/greeting.txt").stdout == "hello from images/fixtures\n"  # WORKDIR /srv


@pytest.mark.container(image="tools")
def test_state_lasts_for_the_test(sandbox: Sandbox) -> None:
    sandbox.run("echo 42 > /var/lib/app/answer", check=True)
    assert sandbox.run("cat /var/lib/app/answer").stdout == "42\n"  # every command sees it
    with open(sandbox.path("/var/lib/app/answer")) as f:  # and so does the test
        assert f.read() == "42\n"


@pytest.mark.container(image="tools")
def test_and_is_gone_afterwards(sandbox: Sandbox) -> None:
    assert not os.path.exists(sandbox.path("/var/lib/app/answer"))


@pytest.mark.container(image="busybox", hostname="box")
def test_a_service_in_the_image(sandbox: Sandbox) -> None:
    """A background command shares the test's private network: talk to it over loopback."""
    import socket
    import time

    if sandbox.run("command -v nc").returncode != 0:
        pytest.skip("no nc in this host's busybox image: the host has no busybox (apt install busybox-static)")
    server = sandbox.spawn(["sh", "-c", "echo pong | nc -l -p 8765"])
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", 8765), timeout=1) as conn:
                assert conn.recv(16) == b"pong\n"
                break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert server.wait(timeout=10) == 0
    assert sandbox.run("hostname").stdout == "box\n"
