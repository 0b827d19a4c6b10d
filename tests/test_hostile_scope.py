"""A hostile test in a scope sandbox (the default scope): the layer helper keeps capabilities and the
scope process holds the fixtures; neither may give a test anything, and a test that kills them only
fails itself. The host checks the outcome and its files from the outside."""

from __future__ import annotations

import os

import pytest

ATTACK = """
    import ctypes, os, pathlib, signal, pytest

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.syscall.restype = ctypes.c_long
    PTRACE_ATTACH, SYS_PIDFD_GETFD = 16, 438

    def comm(pid):
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()

    @pytest.fixture(scope="session")
    def sess():
        return "scope"

    def test_attack(sess):
        helper = [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(p) == "sandbox-layers"]
        assert len(helper) == 1, "the scope sandbox's layer helper is visible in its pid namespace"
        got = []
        for pid in (helper[0], os.getppid()):
            for path in (f"/proc/{pid}/mem", f"/proc/{pid}/environ", f"/proc/{pid}/fd/0"):
                try:
                    with open(path, "rb") as f:
                        f.read(1)
                    got.append(path)
                except OSError:
                    pass
            if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
                got.append(f"ptrace {pid}")
            pidfd = os.pidfd_open(pid)
            for fd in range(64):
                taken = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
                if taken >= 0:
                    got.append(f"fd {fd} of {pid}")
                    os.close(taken)
            os.close(pidfd)
        with open("/proc/self/status") as f:
            caps = [line.split()[1] for line in f if line.startswith(("CapEff", "CapPrm"))]
        assert got == [] and caps == ["0000000000000000"] * 2, (got, caps)
        pathlib.Path("left-by-attack").write_text("x")
        os.kill(helper[0], signal.SIGKILL)

    def test_after(sess):
        assert not os.path.exists("left-by-attack")
"""


def test_the_layer_helper_and_the_scope_process_give_a_test_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ATTACK)
    result = pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider", "-rA")
    # The attack finds nothing; killing the helper fails that test at teardown (its layer cannot be
    # taken off), and the next test runs in a new scope sandbox, without the attacker's file.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_attack*", "*the test's layer*"])
    assert not (pytester.path / "left-by-attack").exists()


def test_a_fixture_cannot_reach_the_host_through_the_scope(pytester: pytest.Pytester) -> None:
    """The scope process runs the fixtures: what they write stays in the scope sandbox too."""
    marker = pytester.path / "written-by-a-session-fixture"
    pytester.makepyfile(f"""
        import pytest

        @pytest.fixture(scope="session")
        def writes():
            with open({str(marker)!r}, "w") as f:
                f.write("x")

        def test_one(writes):
            pass
    """)
    pytester.runpytest_subprocess("--sandbox=all", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert not marker.exists()
    assert os.listdir(pytester.path) != [] and "written-by-a-session-fixture" not in os.listdir(pytester.path)
