"""What pytest-benchmark, flaky and syrupy record per test, carried from a sandbox to the pytest process.

Each of them keeps its results in the pytest process and reports them at the session's end (a benchmark
table and JSON, the flaky report, syrupy's snapshot counts and unused-snapshot cleanup). A sandbox is a
fork that never reaches that end: after each test it sends what the test added, as plain data, and
pytest rebuilds the plugin's own records from it. Nothing from a sandbox is unpickled or imported:
numbers, strings and flags are checked field by field, the test's identity (name, parameters) is taken
from pytest's own item, and an extension class syrupy names must be one pytest has already loaded.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import math
import os
import pstats
import sys
from typing import Any

import pytest
from _pytest.skipping import xfailed_key  # syrupy's own way to tell an expected failure

from . import protocol

PATH_MAX = 4096  # Linux's: no longer path names a file
NAME_MAX = 65536  # characters of a name (a snapshot's, a group's, a function's) pytest keeps
ROUNDS_LIMIT = 2**22  # timings one message may add (a float each): pytest keeps 32 bytes per timing
PROFILE_LIMIT = 2**16  # functions of one benchmark's cProfile
SNAPSHOT_LIMIT = 2**16  # snapshot assertions one test may report
BENCHMARK_OPTIONS = ("disable_gc", "timer", "min_rounds", "max_time", "min_time", "precision", "confidence", "warmup")

# In a test process: how much of each plugin's records it inherited or has sent already.
_sent: dict[str, int] = {"benchmarks": 0, "flaky": 0, "snapshots": 0}
_flaky_had_tests = False
_sent_writes: dict[tuple[Any, ...], Any] = {}  # syrupy's queued writes sent, by queue key: the data sent

_RECEIVED_SNAPSHOTS = pytest.StashKey[set[str]]()  # nodeids whose sandboxes sent syrupy's records
_SANDBOXED = pytest.StashKey[set[str]]()  # nodeids pytest runs in sandboxes


def _module(name: str) -> Any:
    """A plugin's module, imported by the plugin already (its records are there); untyped for mypy, which
    may run where the plugin is not installed."""
    return importlib.import_module(name)


# -- where each plugin keeps its records -------------------------------------------------------------


def _benchmark_session(config: Any) -> Any:
    session = getattr(config, "_benchmarksession", None)
    return session if isinstance(getattr(session, "benchmarks", None), list) else None


def _flaky_plugin() -> Any:
    plugin = getattr(sys.modules.get("flaky.flaky_pytest_plugin"), "PLUGIN", None)
    return plugin if hasattr(plugin, "_stream") and hasattr(plugin, "_had_flaky_tests") else None


def _snapshot_session(config: Any) -> Any:
    session = getattr(config, "_syrupy", None)
    return session if isinstance(getattr(session, "_assertions", None), list) else None


def _bdd_reporting() -> Any:
    """pytest-bdd's reporting module, where it keeps each report's scenario (by report object) for its
    cucumber JSON and gherkin terminal reporter."""
    module = sys.modules.get("pytest_bdd.reporting")
    registry = getattr(module, "test_report_context_registry", None)
    return module if registry is not None and hasattr(module, "ReportContext") else None


BDD_CONTEXT = "sandbox_bdd_context"  # in a report's data: pytest-bdd's scenario of it


def report_extras(report: Any) -> dict[str, Any]:
    """In a sandbox, for a report it sends: what plugins keep about that report object, which pytest's
    serialization leaves behind (pytest-bdd's scenario, keyed by the report itself)."""
    bdd = _bdd_reporting()
    try:
        context = bdd.test_report_context_registry.get(report) if bdd is not None else None
    except TypeError:  # a report that cannot be a key (pytest's SubtestReport): pytest-bdd keeps none for it
        return {}
    if context is None:
        return {}
    return {BDD_CONTEXT: {"scenario": context.scenario, "name": context.name}}


# -- in a sandbox ----------------------------------------------------------------------------------


def mark_in_sandbox(config: Any) -> None:
    """In the zygote: what each plugin recorded before any sandbox ran (host tests of a marked run)."""
    global _flaky_had_tests
    benchmarks, flaky, snapshots = _benchmark_session(config), _flaky_plugin(), _snapshot_session(config)
    _sent["benchmarks"] = len(benchmarks.benchmarks) if benchmarks is not None else 0
    _sent["flaky"] = len(flaky._stream.getvalue()) if flaky is not None else 0
    _flaky_had_tests = bool(flaky._had_flaky_tests) if flaky is not None else False
    _sent["snapshots"] = len(snapshots._assertions) if snapshots is not None else 0


def after_test(config: Any, item: Any) -> list[dict[str, Any]]:
    """In a test process, after a test's protocol: what the plugins recorded for it, as messages.

    syrupy's message goes even when empty: pytest counts a sandboxed test without one as a test whose
    snapshot use it does not know, and then deletes no snapshot as unused."""
    messages: list[dict[str, Any]] = []
    benchmarks = _benchmark_session(config)
    if benchmarks is not None and len(benchmarks.benchmarks) > _sent["benchmarks"]:
        new = benchmarks.benchmarks[_sent["benchmarks"] :]
        _sent["benchmarks"] = len(benchmarks.benchmarks)
        messages.append({"type": "benchmarks", "benchmarks": [_benchmark_record(bench) for bench in new]})
    flaky = _flaky_plugin()
    if flaky is not None:
        global _flaky_had_tests
        text = flaky._stream.getvalue()[_sent["flaky"] :]
        had = bool(flaky._had_flaky_tests)
        if text or had != _flaky_had_tests:
            _sent["flaky"] += len(text)
            _flaky_had_tests = had
            messages.append({"type": "flaky-report", "text": text, "had_flaky_tests": had})
    snapshots = _snapshot_session(config)
    if snapshots is not None:
        new = snapshots._assertions[_sent["snapshots"] :]
        _sent["snapshots"] = len(snapshots._assertions)
        records = [_snapshot_record(a, item) for a in new]
        messages.append({"type": "snapshots", "assertions": records, "writes": _snapshot_writes(snapshots, item)})
    return messages


def _snapshot_writes(session: Any, item: Any) -> list[dict[str, Any]]:
    """The snapshot writes syrupy queued for this test (``--snapshot-update``): pytest queues them in its own
    session, which writes each snapshot file once at its end, under syrupy's file lock with xdist. Written
    here, two sandboxes that rewrite one file at once would each drop the other's snapshots."""
    writes = []
    for (extension_class, _location), queued in session._queued_snapshot_writes.items():
        for (test_location, index), data in queued.items():
            key = (extension_class, _location, test_location, index)
            if test_location.item.nodeid != item.nodeid or _sent_writes.get(key) is data:
                continue
            _sent_writes[key] = data
            binary = isinstance(data, bytes)
            writes.append(
                {
                    "extension": [extension_class.__module__, extension_class.__qualname__],
                    "index": index,
                    "data": base64.b64encode(data).decode() if binary else data,
                    "binary": binary,
                }
            )
    return writes


def _benchmark_record(bench: Any) -> dict[str, Any]:
    utils = _module("pytest_benchmark.utils")
    profile = None
    if bench.cprofile_stats:
        profile = [
            [where[0], where[1], where[2], *numbers[:4]] for where, numbers in bench.cprofile_stats.stats.items()
        ]
    return {
        "group": bench.group,
        "extra_info": json.loads(utils.safe_dumps(bench.extra_info)),  # what its JSON holds of objects: their repr
        "options": {k: utils.funcname(v) if callable(v) else v for k, v in bench.options.items()},
        "iterations": bench.iterations,
        "data": list(bench.stats.data),
        "has_error": bool(bench.has_error),
        "cprofile": profile,
    }


def _snapshot_record(assertion: Any, item: Any) -> dict[str, Any]:
    xfailed = item.stash.get(xfailed_key, None)
    cls = assertion.extension.__class__
    return {
        "extension": [cls.__module__, cls.__qualname__],
        "xfail": bool(xfailed and xfailed.run),
        "results": [
            {
                "location": str(result.snapshot_location),
                "name": str(result.snapshot_name),
                "created": bool(result.created),
                "updated": bool(result.updated),
                "success": bool(result.success),
            }
            for result in assertion.executions.values()
        ],
    }


# -- in pytest ---------------------------------------------------------------------------------------

KINDS = ("benchmarks", "flaky-report", "snapshots")


def receive(item: pytest.Item, message: dict[str, Any]) -> None:
    """Add what a sandbox recorded for ``item`` to the plugin's records here; ProtocolError if malformed."""
    kind = message["type"]
    if kind == "benchmarks":
        _add_benchmarks(item, message["benchmarks"])
    elif kind == "flaky-report":
        _add_flaky_report(message["text"], message["had_flaky_tests"])
    else:
        _add_snapshots(item, message["assertions"], message["writes"])


def take_report_extras(data: dict[str, Any]) -> dict[str, Any]:
    """In pytest: the extras of a report's data (``report_extras``), taken out before pytest reads it."""
    return {key: data.pop(key) for key in (BDD_CONTEXT,) if key in data}


def apply_report_extras(report: Any, extras: dict[str, Any]) -> None:
    """Give the report read from a sandbox what plugins kept about the one the sandbox sent."""
    context = extras.get(BDD_CONTEXT)
    bdd = _bdd_reporting()
    if context is None or bdd is None:
        return
    if (
        not isinstance(context, dict)
        or set(context) != {"scenario", "name"}
        or not isinstance(context["scenario"], dict)
        or not isinstance(context["name"], str)
    ):
        raise _fail("pytest-bdd's scenario of a report is not a scenario and a name")
    bdd.test_report_context_registry[report] = bdd.ReportContext(scenario=context["scenario"], name=context["name"])


def _fail(what: str) -> protocol.ProtocolError:
    return protocol.ProtocolError(what)


def _check_fields(record: object, fields: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(record, dict) or set(record) != set(fields):
        raise _fail(f"{what} whose fields are not {', '.join(sorted(fields))}")
    for name, allowed in fields.items():
        value = record[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise _fail(f"{what} whose {name!r} is {type(value).__name__}")
    return record


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > NAME_MAX or "\0" in value:
        raise _fail(f"{what} that is not a name")
    return value


class _Measured:
    """What pytest-benchmark's Metadata reads of the fixture that measured: the test's identity from
    pytest's own item, the rest as the sandbox measured it."""

    def __init__(self, item: pytest.Item, record: dict[str, Any], profile: pstats.Stats | None) -> None:
        callspec = getattr(item, "callspec", None)
        self.name = item.name
        self.fullname = item.nodeid
        self.param = callspec.id if callspec is not None else None
        self.params = callspec.params if callspec is not None else None
        self.group = record["group"]
        self.extra_info = record["extra_info"]
        self.has_error = record["has_error"]
        self.cprofile_stats = profile


_BENCHMARK_FIELDS: dict[str, tuple[type, ...]] = {
    "group": (str, type(None)),
    "extra_info": (dict,),
    "options": (dict,),
    "iterations": (int,),
    "data": (list,),
    "has_error": (bool,),
    "cprofile": (list, type(None)),
}


def _add_benchmarks(item: pytest.Item, records: object) -> None:
    session = _benchmark_session(item.config)
    if session is None or session.disabled:  # disabled (--benchmark-disable, xdist): its fixture records nothing
        raise _fail("benchmarks, where pytest runs no pytest-benchmark or has it disabled")
    metadata = _module("pytest_benchmark.stats").Metadata
    if not isinstance(records, list):
        raise _fail("benchmarks that are not a list")
    rounds = 0
    rebuilt = []
    for record in records:
        record = _check_fields(record, _BENCHMARK_FIELDS, "a benchmark")
        if record["group"] is not None:
            _check_name(record["group"], "a benchmark group")
        if not all(isinstance(key, str) for key in record["extra_info"]):
            raise _fail("a benchmark whose extra_info is not a mapping of names")
        options = record["options"]
        if not set(options) <= set(BENCHMARK_OPTIONS) or not all(
            value is None or isinstance(value, (bool, str)) or _is_number(value) for value in options.values()
        ):
            raise _fail("a benchmark whose options are not pytest-benchmark's")
        if not 1 <= record["iterations"] <= sys.maxsize:
            raise _fail("a benchmark whose iterations are not a positive count")
        data = record["data"]
        rounds += len(data)
        if rounds > ROUNDS_LIMIT:
            raise _fail(f"more than {ROUNDS_LIMIT} benchmark rounds from one test")
        if not all(_is_number(value) for value in data):
            raise _fail("a benchmark whose timings are not finite numbers")
        profile = _profile(record["cprofile"])
        bench = metadata(_Measured(item, record, profile), iterations=record["iterations"], options=dict(options))
        bench.stats.data = [float(value) for value in data]
        rebuilt.append(bench)
    session.benchmarks.extend(rebuilt)


def _profile(entries: list[Any] | None) -> pstats.Stats | None:
    """A cProfile of a benchmark as pstats holds it: (file, line, function) -> (primitive calls, calls,
    own time, cumulative time); callers are not kept (pytest-benchmark shows none)."""
    if entries is None:
        return None
    if len(entries) > PROFILE_LIMIT:
        raise _fail(f"a benchmark profile of more than {PROFILE_LIMIT} functions")
    stats = pstats.Stats()
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 7
            or not isinstance(entry[0], str)
            or not (isinstance(entry[1], int) and not isinstance(entry[1], bool))
            or not isinstance(entry[2], str)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[3:5])
            or not all(_is_number(t) for t in entry[5:7])
        ):
            raise _fail("a benchmark profile entry that is not (file, line, function, calls, calls, time, time)")
        _check_name(entry[0], "a profiled file")
        _check_name(entry[2], "a profiled function")
        stats.stats[(entry[0], entry[1], entry[2])] = (entry[3], entry[4], float(entry[5]), float(entry[6]), {})  # type: ignore[attr-defined]
    return stats


def _add_flaky_report(text: str, had_flaky_tests: bool) -> None:
    plugin = _flaky_plugin()
    if plugin is None:
        raise _fail("a flaky report, where pytest runs no flaky")
    plugin._stream.write(text)
    plugin._had_flaky_tests = plugin._had_flaky_tests or had_flaky_tests


class _XfailView:
    """What syrupy's report reads of a result's test to tell an expected failure: its stash's xfail."""

    def __init__(self, xfail: bool) -> None:
        self.item = self
        self.stash: dict[Any, Any] = {}
        if xfail:
            self.stash[xfailed_key] = type("Xfail", (), {"run": True})()


class _Result:
    """One snapshot comparison, as syrupy's report reads an AssertionResult."""

    def __init__(self, record: dict[str, Any], xfail: _XfailView) -> None:
        self.snapshot_location = record["location"]
        self.snapshot_name = record["name"]
        self.created, self.updated, self.success = record["created"], record["updated"], record["success"]
        self.final_data = None  # the report keeps no snapshot's data
        self.test_location = xfail


class _Assertion:
    """A snapshot fixture a sandboxed test used, as syrupy's session and report read a SnapshotAssertion:
    its extension (a class pytest loaded), where its test is (pytest's own item) and what it compared."""

    def __init__(self, session: Any, extension: Any, item: pytest.Item, results: list[_Result]) -> None:
        self.session = session
        self.extension = extension
        self.extension_class = type(extension)
        self.test_location = _module("syrupy.location").PyTestLocation(item)
        self.executions = dict(enumerate(results))


_SNAPSHOT_FIELDS: dict[str, tuple[type, ...]] = {"extension": (list,), "xfail": (bool,), "results": (list,)}
_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "location": (str,),
    "name": (str,),
    "created": (bool,),
    "updated": (bool,),
    "success": (bool,),
}


def _extension_class(name: object) -> type:
    """A syrupy extension class pytest has already imported (a conftest's or a test module's own
    included), named (module, qualname): nothing is imported for a sandbox."""
    base = _module("syrupy.extensions.base").AbstractSyrupyExtension
    if not (isinstance(name, list) and len(name) == 2 and all(isinstance(part, str) for part in name)):
        raise _fail("a snapshot extension that is not (module, name)")
    found: Any = sys.modules.get(name[0])
    for part in name[1].split("."):
        found = getattr(found, part, None) if part.isidentifier() else None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise _fail(f"a snapshot extension pytest has not loaded: {'.'.join(name)!r}")
    return found


_WRITE_FIELDS: dict[str, tuple[type, ...]] = {
    "extension": (list,),
    "index": (int, str),
    "data": (str,),
    "binary": (bool,),
}


def _checked_writes(item: pytest.Item, writes: list[Any]) -> list[tuple[type, int | str, str | bytes]]:
    """Snapshot writes a sandbox queued, only where syrupy writes (``--snapshot-update``, ``-new-only``);
    where each goes, pytest's syrupy works out from its own item and the extension, as for its own tests."""
    option = item.config.option
    if writes and not (
        getattr(option, "update_snapshots", False) or getattr(option, "update_new_snapshots_only", False)
    ):
        raise _fail("snapshot writes without --snapshot-update")
    if len(writes) > SNAPSHOT_LIMIT:
        raise _fail(f"more than {SNAPSHOT_LIMIT} snapshot writes from one test")
    checked: list[tuple[type, int | str, str | bytes]] = []
    for write in writes:
        write = _check_fields(write, _WRITE_FIELDS, "a snapshot write")
        index = write["index"]
        if isinstance(index, str):
            _check_name(index, "a snapshot index")
        elif not -(2**31) <= index < 2**31:
            raise _fail("a snapshot index out of range")
        data: str | bytes = write["data"]
        if write["binary"]:
            try:
                data = base64.b64decode(write["data"], validate=True)
            except (binascii.Error, ValueError):
                raise _fail("a binary snapshot that is not base64") from None
        checked.append((_extension_class(write["extension"]), index, data))
    return checked


def _add_snapshots(item: pytest.Item, records: object, writes: list[Any]) -> None:
    session = _snapshot_session(item.config)
    if session is None:
        raise _fail("snapshot assertions, where pytest runs no syrupy")
    if not isinstance(records, list) or len(records) > SNAPSHOT_LIMIT:
        raise _fail(f"snapshot assertions that are not a list of at most {SNAPSHOT_LIMIT}")
    checked = []
    count = 0
    for record in records:
        record = _check_fields(record, _SNAPSHOT_FIELDS, "a snapshot assertion")
        extension = _extension_class(record["extension"])
        xfail = _XfailView(record["xfail"])
        results = []
        for result in record["results"]:
            result = _check_fields(result, _RESULT_FIELDS, "a snapshot result")
            location = result["location"]
            if not os.path.isabs(location) or "\0" in location or len(location) >= PATH_MAX:
                raise _fail(f"a snapshot location that is not an absolute path: {location[:200]!r}")
            _check_name(result["name"], "a snapshot")
            results.append(_Result(result, xfail))
        count += len(results)
        if count > SNAPSHOT_LIMIT:
            raise _fail(f"more than {SNAPSHOT_LIMIT} snapshot comparisons from one test")
        checked.append((extension, results))
    queued = _checked_writes(item, writes)
    for extension, results in checked:  # all checked first: a bad record adds nothing
        session.register_request(_Assertion(session, extension(), item, results))
    location = _module("syrupy.location").PyTestLocation(item)
    for extension, index, data in queued:
        session.queue_snapshot_write(extension(), location, data, index)
    item.config.stash.setdefault(_RECEIVED_SNAPSHOTS, set()).add(item.nodeid)


def for_sandboxed_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Remember which tests that take syrupy's ``snapshot`` fixture run in sandboxes: their records must
    come back (a test without it uses no snapshot, and its missing records change nothing)."""
    config.stash.setdefault(_SANDBOXED, set()).update(
        item.nodeid for item in items if "snapshot" in getattr(item, "fixturenames", ())
    )


def before_session_end(config: pytest.Config) -> None:
    """Before syrupy decides what is unused: a sandboxed test that ran but whose records never came (its
    sandbox crashed, or was killed) may have used any snapshot, so unused detection goes off
    (``--snapshot-disable-unused``) and nothing is deleted or failed as unused."""
    session = _snapshot_session(config)
    if session is None or getattr(config.option, "disable_unused_snapshots", True):
        return
    received = config.stash.get(_RECEIVED_SNAPSHOTS, set())
    selected = getattr(session, "_selected_items", {})
    for nodeid in config.stash.get(_SANDBOXED, set()) - received:
        status = selected.get(nodeid)
        if status is not None and status.value:  # syrupy saw it run (its reports came)
            config.option.disable_unused_snapshots = True
            return
