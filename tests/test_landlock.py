"""Landlock scopes (linux/landlock.py): a scoped process reaches the processes of its own domain only."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from pytest_sandbox import probe
from pytest_sandbox.linux import landlock, syscalls

needs_scopes = pytest.mark.skipif(landlock.unavailable_reason() is not None, reason=str(landlock.unavailable_reason()))


def _in_a_scoped_child(check: str) -> int:
    """Exit status of a fork that scopes itself, then runs ``check`` (1 if what it tried reached outside)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            landlock.scope_self()
            if check == "signal":
                os.kill(parent, 0)
            elif check == "mem":
                os.close(os.open(f"/proc/{parent}/mem", os.O_RDONLY))
            elif check == "own child":
                child = os.fork()
                if child == 0:
                    signal.pause()
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                code = 0
            else:
                raise AssertionError(check)
            code = code if check == "own child" else 1
        except PermissionError:
            code = 0 if check != "own child" else 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@needs_scopes
@pytest.mark.parametrize("check", ["signal", "mem"])
def test_a_scoped_process_cannot_reach_its_parent(check: str) -> None:
    assert _in_a_scoped_child(check) == 0


@needs_scopes
def test_a_scoped_process_signals_its_own_children() -> None:
    assert _in_a_scoped_child("own child") == 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (7, None),
        (6, None),
        (4, "ABI 4; scoping signals needs ABI 6"),
        (OSError(errno.EOPNOTSUPP, "disabled"), "built in but not enabled"),
        (OSError(errno.ENOSYS, "no such call"), "this kernel has no Landlock"),
    ],
)
def test_why_a_kernel_cannot_scope(
    monkeypatch: pytest.MonkeyPatch, answer: int | OSError, expected: str | None
) -> None:
    def create_ruleset(attr: object, flags: int = 0) -> int:
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(syscalls, "landlock_create_ruleset", create_ruleset)
    reason = landlock.unavailable_reason()
    assert reason is None if expected is None else expected in str(reason)
    check = probe.landlock_check()
    assert check.ok is (expected is None)
    if not check.ok:
        assert "6.12" in check.fix and "optional" in check.detail
