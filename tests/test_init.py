"""The native pid 1: it must match its source and really reap orphans."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pytest_sandbox.runtime import init


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("gcc") is None,
    reason="host has no x86_64 gcc to assemble init_x86_64.S",
)
def test_embedded_binary_matches_source() -> None:
    source = os.path.join(os.path.dirname(init.__file__), "init_x86_64.S")
    assert init.build_native(source) == init.embedded(), "run `python -m pytest_sandbox.runtime.init` to refresh"


def _zombies_of(pid: int) -> list[str]:
    states = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                states.append(fields[0])
    return states


@contextlib.contextmanager
def _running_init(children: int = 0) -> Iterator[int]:
    """The init started as the zygote starts it (its go pipe on fd 3, its ack on fd 4, by a tiny launcher that
    first forks ``children`` that exit at once), told to join nothing; yields its pid once it said it locked
    itself down."""
    path, argv, fd = init.command()
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    launcher = (
        "import os, sys\nos.dup2(int(sys.argv[1]), 3)\nos.dup2(int(sys.argv[2]), 4)\n"
        f"for _ in range({children}):\n    if os.fork() == 0:\n        os._exit(0)\n"
        "os.execv(sys.argv[3], sys.argv[4:])\n"
    )
    pass_fds = (go_r, ack_w, *((fd,) if fd is not None else ()))
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(go_r), str(ack_w), path, *argv], pass_fds=pass_fds)
    os.close(go_r)
    os.close(ack_w)
    try:
        os.write(go_w, bytes(4))
        assert os.read(ack_r, 1) == b"1", "pid 1 did not say it locked itself down"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        os.close(go_w)
        os.close(ack_r)
        if fd is not None:
            os.close(fd)


def test_init_reaps_orphans() -> None:
    """Run the init as a subreaper-free parent of short-lived children; none may stay a zombie. It first waits
    for its go (no namespaces to join here), locks itself down and says so."""
    with _running_init(children=3) as pid:
        with open(f"/proc/{pid}/status") as f:
            caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("CapEff", "CapPrm")}
        assert all(int(v, 16) == 0 for v in caps.values()), caps
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.05)
            states = _zombies_of(pid)
            if states and "Z" not in states:
                break
            if not states:
                break
        assert "Z" not in _zombies_of(pid)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python-reaper"])
def test_init_is_named_sandbox_init(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ps shows pid 1 as sandbox-init (comm, and argv[0] for the native one), not the fd number it ran as."""
    if not native:
        monkeypatch.setattr(init, "_NATIVE", {})
    elif platform.machine() not in init._NATIVE:
        pytest.fail(f"no native init for {platform.machine()}: the native case cannot be checked here")
    with _running_init() as pid:
        with open(f"/proc/{pid}/comm") as f:
            assert f.read() == "sandbox-init\n"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if native:
            assert cmdline == b"sandbox-init\0"
        else:
            assert cmdline.startswith(sys.executable.encode() + b"\0")
