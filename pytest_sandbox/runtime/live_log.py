"""Live logging (``log_cli``) of a sandboxed test, written by pytest's own terminal writer.

pytest's logging plugin writes live log lines through the terminal reporter. In a test process that
reporter's writer is the fork's copy: its lines reached the terminal directly, pytest's writer never knew
the line had moved on (the ``[ 50%]`` column came out shifted by the test's id), and the status of the call
came after the teardown's log lines, when its report arrived. Here each write goes to pytest as a message
on the test's line, in order with its reports, and pytest writes it as its own reporter would.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from .. import protocol

# TerminalWriter's styles: what markup a message may ask for (anything else is dropped).
STYLES = frozenset(
    "black red green yellow blue purple cyan white Black Red Green Yellow Blue Purple Cyan White "
    "bold light blink invert".split()
)
SEPARATORS = frozenset("-=_~#*+.")


class RelayedReporter:
    """Stands in for the terminal reporter of the live log handler in a test process."""

    def __init__(self, reporter: Any, channel: Callable[[], socket.socket | None]) -> None:
        self._reporter = reporter
        self._channel = channel

    def write(self, content: str, *, flush: bool = False, **markup: bool) -> None:
        self._send("write", content, "", markup)

    def section(self, title: str, sep: str = "=", **markup: bool) -> None:
        self._send("section", title, sep, markup)

    def flush(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reporter, name)

    def _send(self, call: str, text: str, sep: str, markup: dict[str, bool]) -> None:
        channel = self._channel()
        if channel is None:  # not in a test: as pytest's plugin would
            getattr(self._reporter, call)(text, **({"sep": sep} if call == "section" else {}), **markup)
            return
        styles = sorted(name for name, on in markup.items() if on)
        protocol.send(channel, {"type": "live-log", "call": call, "text": str(text), "sep": sep, "markup": styles})


def relay_in_sandbox(config: pytest.Config, channel: Callable[[], socket.socket | None]) -> None:
    """Once, in the zygote: the logging plugin's live handler writes through a RelayedReporter."""
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    handler = getattr(plugin, "log_cli_handler", None)
    reporter = getattr(handler, "stream", None)
    if handler is not None and callable(getattr(reporter, "section", None)):  # not the null handler
        handler.stream = RelayedReporter(reporter, channel)


def show(config: pytest.Config, message: dict[str, Any]) -> None:
    """In pytest: write a test's live log message with the terminal reporter, as the logging plugin does."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    markup = {name: True for name in message["markup"] if isinstance(name, str) and name in STYLES}
    if message["call"] == "section" and message["sep"] in SEPARATORS:
        reporter.section(message["text"], sep=message["sep"], **markup)
    elif message["call"] == "write":
        reporter.write(message["text"], **markup)
