"""The scope process's children (runtime/leftovers.py): what it ends after each test must be every one of them."""

from __future__ import annotations

import builtins
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_sandbox.runtime import leftovers


@pytest.fixture
def children_of_two_threads() -> Iterator[set[int]]:
    """A child of this thread and one of another thread that stays alive meanwhile (its list is its own)."""
    started: list[subprocess.Popen[bytes]] = []
    made, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.append(subprocess.Popen(["sleep", "60"]))
        made.set()
        done.wait(60)

    thread = threading.Thread(target=other_thread)
    thread.start()
    started.append(subprocess.Popen(["sleep", "60"]))
    made.wait(60)
    try:
        yield {child.pid for child in started}
    finally:
        done.set()
        thread.join()
        for child in started:
            child.kill()
            child.wait()


def test_the_children_of_every_thread_are_found(children_of_two_threads: set[int]) -> None:
    found = leftovers._children()
    assert children_of_two_threads <= found
    assert found == leftovers._children_by_scan()


def test_a_kernel_without_child_lists_is_scanned(
    children_of_two_threads: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_child_lists(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/children"):
            raise FileNotFoundError(path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(leftovers, "open", no_child_lists, raising=False)
    assert children_of_two_threads <= leftovers._children()


def test_a_list_read_while_a_child_is_reaped_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first read skipped child 3 (the kernel's index moved as child 1 was reaped): only two reads that
    agree are an answer, and lists that never settle leave it to the scan of /proc."""
    reads = iter([frozenset({1, 2}), frozenset({2, 3}), frozenset({2, 3})])
    monkeypatch.setattr(leftovers, "_listed_children", lambda: next(reads))
    monkeypatch.setattr(leftovers, "_children_by_scan", lambda: frozenset({99}))
    assert leftovers._children() == {2, 3}

    unsettled = iter(frozenset({n}) for n in range(leftovers._LIST_READS))
    monkeypatch.setattr(leftovers, "_listed_children", lambda: next(unsettled))
    assert leftovers._children() == {99}
