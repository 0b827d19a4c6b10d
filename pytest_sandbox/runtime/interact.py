"""--pdb with a sandboxed test: pdb runs in the sandbox, on the terminal, after pytest showed the report.

In the sandbox pytest logs a failed report (relayed: pytest prints its ``F``) and then enters pdb,
which prints the traceback and takes the terminal. Without a word between them pytest's ``F``
races pdb's output and lands inside its banner, and pytest, never told pdb showed the failure,
prints its traceback again in the summary. So the test process says ``interact`` and waits for
pytest's go: pytest has printed the report by then and marks it shown, as pdb marks its own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Generator
from typing import Any

import pytest

from .. import protocol


class PdbAfterReport:
    """Registered under --pdb (in the zygote, for every test process it forks)."""

    def __init__(self, channel: Callable[[], socket.socket | None]) -> None:
        self.channel = channel  # the test process's line to pytest, once it has one

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_exception_interact(self, node: Any, call: Any, report: Any) -> Generator[None, None, None]:
        channel = self.channel()
        if channel is not None:
            protocol.send(channel, {"type": "interact", "when": str(getattr(report, "when", ""))})
            protocol.recv(channel)  # pytest's go (or the channel closed: pdb starts anyway)
        return (yield)
