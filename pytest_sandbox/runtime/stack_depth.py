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

_plain: int | None = None  # the headroom in pytest's loop, where pytest calls each test's protocol
_hidden = 0  # what the sandbox's frames below the protocol take of it
_real_get = sys.getrecursionlimit
_real_set = sys.setrecursionlimit


def measure_in_pytests_loop() -> None:
    """Called by the hook that runs pytest's loop, before the zygote is forked (which inherits the figure)."""
    global _plain
    _plain = _headroom()


def as_in_pytests_loop(deeper_by: int = 0) -> None:
    """Called by the function that calls a test's protocol: give back what the sandbox's frames took. A scope
    process calls it once for all its tests' forks, whose protocol runs ``deeper_by`` Python calls deeper
    (measuring costs a thousand calls: too much to do again in every fork)."""
    global _hidden
    if _plain is None or _hidden:
        return  # no figure to compare with; or a scope process's fork, where it is done already
    hidden = _plain - (_headroom() - deeper_by)
    if hidden <= 0:
        return
    _hidden = hidden
    _real_set(_real_get() + hidden)
    sys.getrecursionlimit = _getrecursionlimit
    sys.setrecursionlimit = _setrecursionlimit


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
