"""Signal masks as plain ints (linux/process.py): what each test's fork is made with, and unmade with."""

from __future__ import annotations

import os
import signal

from pytest_sandbox.linux import process


def test_every_signal_is_blocked_and_the_mask_before_comes_back() -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR1})
            before = process.block_every_signal()
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
            process.set_signal_mask(before)
            after = signal.pthread_sigmask(signal.SIG_BLOCK, set())
            ok = before == {int(signal.SIGUSR1)} and all(type(n) is int for n in before)
            unblockable = {signal.SIGKILL, signal.SIGSTOP}
            ok = ok and blocked == signal.valid_signals() - unblockable and after == {signal.SIGUSR1}
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
