"""The test's recursion headroom, as in a plain run.

A sandboxed test runs pytest's protocol in a fork of the zygote, whose call chain (pytest's loop, the
zygote's setup and loop, the sandbox's setup) stays on the stack below it: about 14 frames that a plain
run does not have. A test that recurses close to the limit (a parser's deep-nesting test, written against
``sys.getrecursionlimit()``) would hit RecursionError only when sandboxed. The limit is raised by exactly
that much, and ``sys.getrecursionlimit``/``sys.setrecursionlimit`` speak in the plain run's numbers.

"That much" is measured, not counted in frames: CPython before 3.12 charges a frame entered through C
(a class's ``__init__``, a callback) more than one.
"""

from __future__ import annotations

import sys
import types

_plain: int | None = None  # the headroom in pytest's loop, where pytest calls each test's protocol
_hidden = 0  # what the sandbox's frames below the protocol take of it
_measured_at: tuple[int, int] | None = None  # in a scope process: what its frames take, and how many there are
_real_get = sys.getrecursionlimit
_real_set = sys.setrecursionlimit


def measure_in_pytests_loop() -> None:
    """Called by the hook that runs pytest's loop, before the zygote is forked (which inherits the figure)."""
    global _plain
    _plain = _headroom()


def measure_for_forks() -> None:
    """Called once by a scope process: what its frames take of the headroom, and how deep it is. Its tests'
    forks call ``as_in_pytests_loop`` a few Python calls deeper (more when made ahead), and count those
    calls instead of measuring again: measuring costs a thousand calls, too much for every test."""
    global _measured_at
    if _plain is not None:
        _measured_at = (_plain - _headroom(), _frames())


def as_in_pytests_loop() -> None:
    """Called by the function that calls a test's protocol: give back what the sandbox's frames took."""
    global _hidden
    if _plain is None or _hidden:
        return  # no figure to compare with; or a scope process's fork, where it is done already
    if _measured_at is not None:  # in a scope process's fork: the Python calls since, one each
        hidden = _measured_at[0] + _frames() - _measured_at[1]
    else:
        hidden = _plain - _headroom()
    if hidden <= 0:
        return
    _hidden = hidden
    _real_set(_real_get() + hidden)
    sys.getrecursionlimit = _getrecursionlimit
    sys.setrecursionlimit = _setrecursionlimit


def _frames() -> int:
    """How many frames the caller's caller has below it, itself included."""
    frame: types.FrameType | None = sys._getframe(2)
    count = 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def _headroom() -> int:
    """How many more calls the caller's caller can make before RecursionError."""
    depth = 0

    def down() -> None:
        nonlocal depth
        depth += 1
        down()

    try:
        down()
    except RecursionError:
        pass
    return depth


def _getrecursionlimit() -> int:
    return _real_get() - _hidden


def _setrecursionlimit(limit: int, /) -> None:
    if not isinstance(limit, int):
        raise TypeError(f"'{type(limit).__name__}' object cannot be interpreted as an integer")
    _real_set(limit + _hidden)
