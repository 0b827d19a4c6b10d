"""Volumes: what a test writes to one outlives its sandbox; everything else it writes does not.

Run `pytest examples -v` twice: the named volume counts the runs. Then
`pytest-sandbox volumes` lists it and `pytest-sandbox volumes rm example-cache` removes it.
"""

from __future__ import annotations

import errno
import pathlib

import pytest

from pytest_sandbox import volume

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.container(volumes={volume("example-cache"): "/tmp/cache"})
def test_a_named_volume_keeps_what_the_test_wrote() -> None:
    runs = pathlib.Path("/tmp/cache/runs")
    count = int(runs.read_text()) + 1 if runs.exists() else 1
    runs.write_text(str(count))  # in the store, under volumes/example-cache/data: there at the next run
    print(f"this is run {count} with this volume")


@pytest.mark.container(volumes={str(DATA): "/tmp/data:ro"})
def test_a_host_directory_bound_read_only() -> None:
    assert pathlib.Path("/tmp/data/readme.txt").read_text().startswith("fixture data")
    with pytest.raises(OSError) as refused:
        pathlib.Path("/tmp/data/new.txt").write_text("no")
    assert refused.value.errno == errno.EROFS
