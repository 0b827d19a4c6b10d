"""The set-id filter of service processes (linux/seccomp.py), in a fork of this interpreter."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox.linux import seccomp, syscalls

pytestmark = pytest.mark.skipif(
    os.uname().machine not in ("x86_64", "aarch64"), reason="the set-id filter knows x86_64 and aarch64 only"
)

UNDER_THE_FILTER = """
import ctypes, errno, os, stat, subprocess, sys
from pytest_sandbox.linux import seccomp, syscalls
syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
seccomp.refuse_setid_modes()
where = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)

def outcome(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

def raw(number, *args):
    if libc.syscall(number, *args) == -1:
        raise OSError(ctypes.get_errno(), "")

plain = os.path.join(where, "plain")
results = {
    "chmod 4755": outcome(lambda: os.chmod(plain, 0o4755)),
    "chmod 2755": outcome(lambda: os.chmod(plain, 0o2755)),
    "chmod 0755": outcome(lambda: os.chmod(plain, 0o755)),
    "fchmod 4755": outcome(lambda: os.fchmod(os.open(plain, os.O_RDONLY), 0o4755)),
    "open O_CREAT 4755": outcome(lambda: os.open(os.path.join(where, "new1"), os.O_CREAT | os.O_WRONLY, 0o4755)),
    "open O_CREAT 0644": outcome(lambda: os.open(os.path.join(where, "new2"), os.O_CREAT | os.O_WRONLY, 0o644)),
    "mknod 2644": outcome(lambda: os.mknod(os.path.join(where, "new3"), stat.S_IFREG | 0o2644)),
    "mknod 0644": outcome(lambda: os.mknod(os.path.join(where, "new4"), stat.S_IFREG | 0o644)),
    "openat2": outcome(lambda: raw(437, -100, b"/", None, 0)),
    "io_uring_setup": outcome(lambda: raw(425, 1, None)),
    "chmod program": str(subprocess.run(["chmod", "u+s", plain], capture_output=True).returncode != 0),
}
print(results)
"""


def test_set_id_modes_are_refused_and_others_work(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    result = subprocess.run(
        [sys.executable, "-c", UNDER_THE_FILTER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == {
        "chmod 4755": "EPERM",
        "chmod 2755": "EPERM",
        "chmod 0755": "ok",
        "fchmod 4755": "EPERM",
        "open O_CREAT 4755": "EPERM",
        "open O_CREAT 0644": "ok",
        "mknod 2644": "EPERM",
        "mknod 0644": "ok",
        "openat2": "ENOSYS",
        "io_uring_setup": "ENOSYS",
        "chmod program": "True",  # inherited across fork and exec
    }
    assert not (tmp_path / "new1").exists() and stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o755


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 calls exist on x86_64 only")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="host lacks gcc (apt install gcc)")
def test_i386_calls_get_the_same_checks(tmp_path: Path) -> None:
    """A 32-bit chmod (int 0x80) through the compat table: refused with set-id bits, allowed without."""
    source = tmp_path / "chmod32.c"
    source.write_text(
        "#include <string.h>\n"
        "static char path[4096];  /* in .bss of a non-PIE program: below 4 GiB, as int 0x80 needs */\n"
        "int main(int argc, char **argv) {\n"
        "  int mode = argv[2][0] == 's' ? 04755 : 0755, ret;\n"
        "  strncpy(path, argv[1], sizeof path - 1);\n"
        '  __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(15), "b"(path), "c"(mode) : "memory");\n'
        "  return ret == 0 ? 0 : -ret;\n"
        "}\n"
    )
    binary = tmp_path / "chmod32"
    built = subprocess.run(
        ["gcc", "-O0", "-static", "-no-pie", "-o", str(binary), str(source)], capture_output=True, text=True
    )
    if built.returncode != 0:
        pytest.skip(f"host cannot build a static x86_64 program: {built.stderr.strip()[:200]}")
    target = tmp_path / "plain"
    target.write_text("x")
    script = (
        "import subprocess, sys\n"
        "from pytest_sandbox.linux import seccomp, syscalls\n"
        "syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)\n"
        "seccomp.refuse_setid_modes()\n"
        "print([subprocess.run([sys.argv[1], sys.argv[2], m]).returncode for m in ('s', 'p')])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(binary), str(target)], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[1, 0]", result.stderr  # EPERM is 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_the_filter_is_well_formed_for_each_machine() -> None:
    for machine in ("x86_64", "aarch64"):
        code = seccomp.setid_filter(machine)
        assert len(code) % 8 == 0 and 0 < len(code) // 8 < 4096
    with pytest.raises(ValueError, match="no set-id filter for riscv64"):
        seccomp.setid_filter("riscv64")
    assert ctypes.sizeof(seccomp._SockFprog) == 16


def _vsock_works_here() -> bool:
    try:
        socket.socket(seccomp.AF_VSOCK, socket.SOCK_STREAM).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _vsock_works_here(), reason="this host has no vsock transport (AF_VSOCK sockets refused)")
def test_vsock_stays_out_of_a_sandbox_without_the_hosts_network(pytester: pytest.Pytester) -> None:
    """Red team round 33: a network namespace does not cover AF_VSOCK; a sandboxed test bound a vsock port
    the whole VM shares (and could have talked to the hypervisor). With network="host" it is the host's."""
    pytester.makepyfile("""
        import errno, socket
        import pytest

        @pytest.mark.container
        def test_none():
            with pytest.raises(OSError) as refused:
                socket.socket(40, socket.SOCK_STREAM)
            assert refused.value.errno == errno.EAFNOSUPPORT

        @pytest.mark.container(network="host")
        def test_host():
            socket.socket(40, socket.SOCK_STREAM).close()
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_the_vsock_filter_refuses_only_vsock_sockets() -> None:
    code = seccomp.vsock_filter("x86_64")
    assert len(code) % 8 == 0 and len(code) // 8 < 64
    assert seccomp.vsock_filter("aarch64")
    with pytest.raises(ValueError, match="no vsock filter"):
        seccomp.vsock_filter("sparc")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            assert seccomp.refuse_vsock()
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
            try:
                socket.socket(seccomp.AF_VSOCK, socket.SOCK_STREAM)
            except OSError as exc:
                code = 0 if exc.errno == errno.EAFNOSUPPORT else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
