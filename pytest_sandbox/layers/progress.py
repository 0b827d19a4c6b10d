"""Progress output of builds and imports: whole lines for logs, plus a live status line on a terminal.

A long RUN or a big layer import says nothing for minutes; on a terminal a status line
(``app step 3/5: RUN make  42s``) is rewritten in place (``\\r``) so the wait shows progress.
In a CI log (not a terminal) only whole lines are written: no carriage returns, no timer noise.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

ELLIPSIS = "…"


def shorten(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters: cut text ends with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + ELLIPSIS


class Lines:
    """A progress callable (one call, one line) that on a terminal also keeps a status line below them."""

    def __init__(self, write: Callable[[str], None], tty: bool, prefix: str = "") -> None:
        self._write = write  # raw text, newlines included
        self.tty = tty
        self.prefix = prefix
        self._status = ""
        self._lock = threading.Lock()  # the ticker thread and the builder both write

    @classmethod
    def to(cls, stream: TextIO, prefix: str = "") -> Lines:
        """Lines written to ``stream``, live when it is a terminal."""

        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return cls(write, stream.isatty(), prefix)

    def __call__(self, line: str) -> None:
        with self._lock:
            self._clear()
            self._write(f"{self.prefix}{line}\n")
            if self._status:
                self._write(self._status)

    def status(self, text: str) -> None:
        """Show ``text`` as the status line ('' removes it); nothing unless on a terminal."""
        if not self.tty:
            return
        with self._lock:
            self._clear()
            width = shutil.get_terminal_size().columns - 1
            line = f"{self.prefix}{text}" if text else ""
            self._status = line if len(line) <= width else line[: width - 1] + ELLIPSIS
            if self._status:
                self._write(self._status)

    def _clear(self) -> None:
        if self._status:
            self._write("\r\x1b[K")  # back to the line's start, erase it


@contextlib.contextmanager
def running(progress: Callable[[str], None] | None, text: str, interval: float = 1.0) -> Iterator[None]:
    """While the block runs, a status line ``text  12s`` on a terminal, updated every ``interval``."""
    status = getattr(progress, "status", None)
    if status is None or not getattr(progress, "tty", False):
        yield
        return
    started = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            status(f"{text}  {time.monotonic() - started:.0f}s")

    thread = threading.Thread(target=tick, name="sandbox-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        status("")
