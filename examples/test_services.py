"""A service for the examples: Python's own HTTP server, serving examples/data read-only.

Unsandboxed tests reach it on host loopback (its published port); sandboxed tests by its name, in the pod.
"""

from __future__ import annotations

import pathlib
import sys
import urllib.request

import pytest

from pytest_sandbox import Service, service, wait

DATA = pathlib.Path(__file__).parent / "data"

files = service(
    "files",
    command=[sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "/var/tmp/www"],
    volumes={str(DATA): "/var/tmp/www:ro"},
    ports=[8000],
    ready=wait.http(8000, "/"),
)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_from_the_host(files: Service) -> None:
    host, port = files.address(8000)
    assert host == "127.0.0.1" and port != 8000  # a free port of the host's, forwarded into the pod
    assert b"Directory listing" in fetch(files.url(8000) + "/")
    assert "GET / HTTP/1.1" in files.logs()


@pytest.mark.container
def test_from_a_sandbox_in_the_pod(files: Service) -> None:
    assert files.address(8000) == ("files", 8000)
    assert b"Directory listing" in fetch("http://files:8000/")
