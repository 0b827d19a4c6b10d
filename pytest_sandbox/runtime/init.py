"""The sandbox's pid 1: a reaper small enough to start for every test.

Every sandbox needs a pid 1 that reaps orphans (a test's double-forked daemon
must not linger as a zombie). Forking the ~40 MB pytest process for that job
would double the cost of each sandbox, so pid 1 is a tiny static program
(``init_x86_64.S``, 4 KiB) started with ``posix_spawn`` (vfork: no page tables
copied). Where no native build exists, a Python reaper does the same job more
slowly. Rebuild the embedded binary with ``python -m pytest_sandbox.runtime.init``.
"""

from __future__ import annotations

import base64
import fcntl
import os
import platform
import subprocess
import sys
import tempfile
import zlib

_NATIVE = {
    "x86_64": (
        "eNqrd/VxY2JkZIABJgY7BjBPwAHMd4CKTxCEKwGKWQDVOTAwA0mQWhYGZOCAQm+A8mA0gwCEAuljReLD7IPRdVAnwWi4ulEwCkbBKBgF"
        "o2AUjIJRMApGwSgYBaNgFJAM9vMDCY9eU1tgP9vwkisIHdgxFyjGz7of1K83/IYm6tF6gL+VCajao/mNwH5mkO7OZ7vASg8AZZt/sPC3"
        "Pgbymm1UGEqs9jOBzdixiRGmt+MYUMSz84hP5/NuE5UdJnCJ1rVACaDoDmaIPb22+yBO2w+kdtQhLG8FOZsFIgdi7wINEexghCho/sFY"
        "mg52FtQcsEoo2/A/UEsCyEWXHHdxgMT5ILqOH/8PBIbfQEY5AL27wxZmXf1joEN0oQEB1dQAlnx9cn89iPccYnRxYl5KUn6FbmZeZgl0"
        "fIOBQYmVQwFv8OsVZxSXFJUkJjHolaRWlFAen9xQu9kY0MdV0MZToACNC+YzYzG3Djr+I8iAXz8ArN9tlA=="
    ),
}

PYTHON_REAPER = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"sandbox-init", 0, 0, 0)  # PR_SET_NAME, as the native one: ps shows what it is
# As the native one (see init_x86_64.S): not dumpable, join the test process's namespaces, no capabilities.
if libc.prctl(4, 0, 0, 0, 0) != 0:
    os._exit(127)
data = os.read(3, 4)
flags = int.from_bytes(data, "little")
if len(data) != 4 or (flags and libc.setns(os.pidfd_open(2), flags) != 0):
    os._exit(127)
if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0 or os.write(4, b"1") != 1:
    os._exit(127)
os.close(3)
os.close(4)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    signal.sigwaitinfo({signal.SIGCHLD})
"""


NAME = "sandbox-init"  # pid 1's argv[0] and comm: what ps shows for it


def command() -> tuple[str, list[str], int | None]:
    """The program and argv that start pid 1, and the memfd holding the native binary (None for the
    Python reaper). argv[0] is NAME, not the /proc/self/fd path the program is run from."""
    blob = _NATIVE.get(platform.machine())
    if blob is None:
        return sys.executable, [sys.executable, "-S", "-I", "-c", PYTHON_REAPER], None
    created = os.memfd_create("sandbox-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fd = fcntl.fcntl(created, fcntl.F_DUPFD_CLOEXEC, 10)  # above 3 and 4, where pid 1 gets its pipes
    os.close(created)
    os.write(fd, zlib.decompress(base64.b64decode(blob)))
    # Sealed: whoever holds the fd (a forked test process, before it lets go of it) cannot change
    # the program every later sandbox's pid 1 runs.
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return f"/proc/self/fd/{fd}", [NAME], fd


def build_native(source: str) -> bytes:
    """Assemble ``init_x86_64.S`` (needs gcc); used to check and refresh the embedded copy."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "init")
        subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,--build-id=none", "-s", "-o", out, source], check=True)
        with open(out, "rb") as f:
            return f.read()


def embedded(machine: str = "x86_64") -> bytes:
    return zlib.decompress(base64.b64decode(_NATIVE[machine]))


if __name__ == "__main__":
    binary = build_native(os.path.join(os.path.dirname(__file__), "init_x86_64.S"))
    print(base64.b64encode(zlib.compress(binary, 9)).decode())
