"""Shared helpers for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def processes_with(token: str) -> list[int]:
    """Host pids whose command line or environment carries ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
                        break
            except OSError:
                pass
    return found


_CARRYING_THE_TOKEN = """
import os


def carrying_the_token():
    \"\"\"Pids this sandbox shows whose environment carries TOKEN.\"\"\"
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"TOKEN" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found

"""


def carrying_the_token(token: str, test_file: str) -> str:
    """A test file's source (``test_file``, dedented) after a function of it, ``carrying_the_token()``, that
    lists the processes its sandbox shows whose environment carries ``token``."""
    return _CARRYING_THE_TOKEN.replace("TOKEN", token) + textwrap.dedent(test_file)


def wait_gone(token: str, timeout: float = 5.0) -> list[int]:
    """Pids still carrying the token after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in processes_with(token) if pid != os.getpid()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def start_pytest_until_running(
    path: Path, token: str | None = None, word: str = "RUNNING", args: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """Start ``pytest -s ARGS`` in ``path`` and return once it printed ``word`` (a bound of 300 s: the cgroup v2
    guest runs Python ~8x slower, a loaded CI machine slower still)."""
    env = {**os.environ, "SANDBOX_TEST_MARK": token} if token else None  # not *_TOKEN: sandboxes withhold those
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", *args],
        cwd=path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if word in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"pytest never printed {word}:\n{''.join(seen)}")


def run_cli(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``pytest-sandbox ARGS`` as a user types it (this interpreter), optionally with ``--store STORE``
    and ``env`` over this environment."""
    prefix = ["--store", str(store)] if store is not None else []
    return subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", *prefix, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        stdin=subprocess.DEVNULL,
    )
