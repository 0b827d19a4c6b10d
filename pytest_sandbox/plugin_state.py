"""What well-known plugins keep in the pytest process, carried into and out of a sandbox.

A plugin's session state lives in the pytest process; a sandbox is a fork that ends with its test.
What the sandbox measured for such a plugin comes back as a checked message (coverage); what a
plugin would send to the pytest process over an inherited socket (pytest-rerunfailures' xdist
database) is served by a local copy, since the sandbox keeps no host socket.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import pytest

from . import plugin_results, protocol
from .linux.mounts import SCRATCH_PLACES, is_under

_junit_properties_before = 0  # in a test process: junitxml's suite properties it inherited


def _junitxml(config: Any) -> Any:
    """pytest's junitxml plugin object (``--junitxml``), whose suite properties are a public list."""
    for plugin in config.pluginmanager.get_plugins():
        plugin = getattr(plugin, "_plugin", plugin)  # muted in a test process
        if type(plugin).__name__ == "LogXML" and isinstance(getattr(plugin, "global_properties", None), list):
            return plugin
    return None


def adapt_in_sandbox(config: Any) -> None:
    """Point plugins that talk to the pytest process at local state instead."""
    global _junit_properties_before
    plugin_results.mark_in_sandbox(config)
    xml = _junitxml(config)
    _junit_properties_before = len(xml.global_properties) if xml is not None else 0
    database = getattr(config, "failures_db", None)
    if type(database).__name__ == "ClientStatusDB":  # pytest-rerunfailures under xdist
        sock = getattr(database, "sock", None)
        if isinstance(sock, socket.socket):  # this process's copy of the worker's connection: closed, not left
            sock.close()  # to the collector (an unclosed socket's ResourceWarning is an error with -W error)
        config.failures_db = sys.modules[type(database).__module__].StatusDB()


def forget_inherited_suite_properties(config: Any) -> None:
    """In a test's fork of a scope sandbox: what the scope recorded so far is the scope's to send."""
    global _junit_properties_before
    xml = _junitxml(config)
    _junit_properties_before = len(xml.global_properties) if xml is not None else 0


def suite_properties(config: Any) -> list[dict[str, Any]]:
    """``record_testsuite_property`` calls made in this sandbox, for pytest's junitxml."""
    xml = _junitxml(config)
    added = xml.global_properties[_junit_properties_before:] if xml is not None else []
    return [{"type": "suite-property", "name": str(name), "value": str(value)} for name, value in added]


def add_suite_property(config: Any, message: dict[str, Any]) -> None:
    xml = _junitxml(config)
    if xml is not None:
        xml.add_global_property(message["name"], message["value"])


def forget_superseded_subtests(item: Any, report: Any) -> None:
    """pytest-rerunfailures, when it reruns a test, takes that attempt's subtest reports back out of the
    terminal's counts, so that each subtest counts once (pytest's own subtests only). It does so in the
    process where it reruns: in a sandbox, whose reporter is muted. The pytest process got those reports
    through the relay, so they come out here when the rerun report arrives, as xdist's controller takes
    them out of what its workers sent."""
    subtest_report = getattr(pytest, "SubtestReport", None)  # pytest >= 9
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", None)
    if report.outcome != "rerun" or subtest_report is None or not isinstance(stats, dict):
        return
    for key in ("failed", "subtests passed"):
        reports = stats.get(key)
        if not isinstance(reports, list):
            continue
        kept = [seen for seen in reports if not (isinstance(seen, subtest_report) and seen.nodeid == report.nodeid)]
        if key == "failed":
            item.session.testsfailed = max(0, item.session.testsfailed - (len(reports) - len(kept)))
        if kept:
            stats[key] = kept
        else:  # as rerunfailures leaves it: some summaries only ask whether the key is there
            del stats[key]


_DEPENDENCY_RESULTS = pytest.StashKey[list[tuple[str, str, str]]]()  # (nodeid, when, outcome)


class _Outcome:
    """What pytest-dependency reads of a report: its phase and outcome."""

    def __init__(self, when: str, outcome: str) -> None:
        self.when, self.outcome = when, outcome


def _record_dependency(item: Any, report: Any) -> bool:
    """Record ``report`` as pytest-dependency's ``pytest_runtest_makereport`` does (its own managers, on the
    item's session, package, module and class); whether it recorded anything."""
    module = sys.modules.get("pytest_dependency")
    marker = item.get_closest_marker("dependency")
    if module is None or (marker is None and not getattr(module, "_automark", False)):
        return False
    name = marker.kwargs.get("name") if marker is not None else None
    for scope in module.DependencyManager.ScopeCls:
        manager = module.DependencyManager.getManager(item, scope=scope)
        if manager:
            manager.addResult(item, name, report)
    return True


def dependency_result(item: Any, report: Any) -> None:
    """In the pytest process, for each report a sandboxed test logged: pytest-dependency records outcomes in
    the test's process (a sandbox, gone with it), and a later test's setup looks them up. They are recorded
    here as well, and carried to each later sandbox before its test (``carried_since``)."""
    subtest_report = getattr(pytest, "SubtestReport", None)
    if subtest_report is not None and isinstance(report, subtest_report):
        return  # logged by pytest's subtests, not made by makereport: pytest-dependency never sees one
    if _record_dependency(item, report):
        item.config.stash.setdefault(_DEPENDENCY_RESULTS, []).append((item.nodeid, report.when, report.outcome))


def carried_since(config: Any, sent: int) -> tuple[list[tuple[str, str, str]], int]:
    """What a sandbox that was sent the first ``sent`` results has not seen yet, and the new count."""
    results = config.stash.get(_DEPENDENCY_RESULTS, [])
    return results[sent:], len(results)


def apply_carried(items: dict[str, Any], results: Any) -> None:
    """In a sandbox, before it runs the test pytest asks for: the outcomes of earlier tests, recorded as
    pytest-dependency would have recorded them in a plain run (the items are this sandbox's own)."""
    for nodeid, when, outcome in results or ():
        item = items.get(nodeid)
        if item is not None:
            _record_dependency(item, _Outcome(when, outcome))


def for_sandboxed_items(config: Any, items: list[Any]) -> list[str]:
    """Settle, in the pytest process, what plugins would conclude wrongly from tests run elsewhere;
    returns the directories their sandboxed tests write that must reach the host.

    allure-pytest's ``--alluredir`` is an output (its listener writes each test's result in the sandbox), so
    are the data directories of pytest-regressions (``original_datadir``), and syrupy's snapshot directories
    of sandboxed tests are, for extensions that write a file per snapshot at once; the writes syrupy queues,
    and which snapshots a sandboxed test used, come back after it (plugin_results.py). Where they never came,
    unused detection goes off at the session's end, so nothing is deleted as unused from missing records.
    """
    plugin_results.for_sandboxed_items(config, items)
    written = []
    allure = getattr(config.option, "allure_report_dir", None)  # allure-pytest writes each test's result there
    if isinstance(allure, str) and allure and items:
        written.append(os.path.abspath(allure))
    # pytest-datadir's original_datadir (the test module's path without .py): pytest-regressions writes the
    # expected files there when they are missing, and all of them with --force-regen
    written += sorted(
        {str(item.path.with_suffix("")) for item in items if "original_datadir" in getattr(item, "fixturenames", ())}
    )
    users = [item for item in items if "snapshot" in getattr(item, "fixturenames", ())]
    if users and hasattr(config.option, "disable_unused_snapshots"):
        dirname = getattr(config.option, "snapshot_dirname", None) or "__snapshots__"
        written += sorted({os.path.join(os.path.dirname(str(item.path)), dirname) for item in users})
    return written


def _active_coverage() -> Any:
    coverage = sys.modules.get("coverage")
    current = getattr(getattr(coverage, "Coverage", None), "current", None)
    return current() if callable(current) else None


def coverage_message() -> dict[str, Any] | None:
    """What coverage measured in this process (a fork of pytest's, whose collector it inherited), as lines
    or arcs per context; None without an active coverage."""
    cov = _active_coverage()
    if cov is None:
        return None
    with warnings.catch_warnings():  # what it warns of (no data) is for the session's end, not this test's
        warnings.simplefilter("ignore")
        data = cov.get_data()  # a fork starts its own data file, in the sandbox's throwaway layer
    arcs = data.has_arcs()
    contexts: dict[str, dict[str, list[Any]]] = {}
    for context in sorted(data.measured_contexts()):
        data.set_query_contexts([f"^{re.escape(context)}$"] if context else None)
        files = {}
        for path in data.measured_files():
            found = data.arcs(path) if arcs else data.lines(path)
            if found:
                files[path] = sorted(found)
        if files:
            contexts[context] = files
    data.set_query_contexts(None)
    return {"type": "coverage", "arcs": arcs, "contexts": contexts}


# Places whose sandbox view is not the host's: its own /proc, /sys, /dev and fresh tmpfs (the latter
# showing only the session's visible or writable paths).
_OWN_VIEWS = ("/proc", "/sys", "/dev")
LINE_LIMIT = 2**24  # lines (and arc ends) past this are no source file's; coverage keeps a bit per line
PATH_MAX = 4096  # Linux's: no longer path names a file
NUMBITS_BUDGET = 64 * 2**20  # bytes of line bitmaps one message may make pytest's coverage data hold


def _seen_by_sandbox(path: str, hidden: Iterable[str], shown: Iterable[str]) -> bool:
    """A regular file on the host that the sandbox saw as the host has it: reading it (as coverage's
    report does) neither blocks nor shows what the test could not have read itself. A relative path (coverage's
    ``relative_files``) is relative to the directory pytest runs in, which is the sandbox's too."""
    if not path or "\0" in path or len(path) >= PATH_MAX:  # realpath is quadratic in components
        return False
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    if any(is_under(real, place) for place in (*hidden, *_OWN_VIEWS)):
        return False
    if any(is_under(real, place) for place in SCRATCH_PLACES) and not any(is_under(real, p) for p in shown):
        return False
    try:
        return stat.S_ISREG(os.stat(real).st_mode)
    except (OSError, ValueError):
        return False


def _checked_files(
    files: object, arcs: bool, hidden: Iterable[str], shown: Iterable[str] = (), budget: list[int] | None = None
) -> dict[str, list[Any]]:
    """Measured files as coverage takes them; only paths the sandbox could see (nothing under a hidden
    place), so a report built from them shows no file the test could not have read itself."""
    if not isinstance(files, dict):
        raise protocol.ProtocolError("coverage whose files are not a mapping")
    checked: dict[str, list[Any]] = {}
    for path, numbers in files.items():
        if not _seen_by_sandbox(path, hidden, shown):
            raise protocol.ProtocolError(f"coverage of a file the sandbox cannot see: {path!r}")
        if not isinstance(numbers, list) or not all(_is_measure(n, arcs) for n in numbers):
            raise protocol.ProtocolError(f"coverage of {path!r} that is not a list of {'arcs' if arcs else 'lines'}")
        if not arcs and numbers and budget is not None:
            budget[0] -= max(numbers) // 8 + 1
            if budget[0] < 0:
                raise protocol.ProtocolError("coverage of more lines than any test measures")
        checked[path] = [tuple(n) for n in numbers] if arcs else numbers
    return checked


def _is_measure(value: object, arcs: bool) -> bool:
    if arcs:
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_int(v) and -LINE_LIMIT < v < LINE_LIMIT for v in value)
        )
    return _is_int(value) and 0 <= value < LINE_LIMIT  # type: ignore[operator]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_coverage(message: dict[str, Any], hidden: Iterable[str], shown: Iterable[str]) -> None:
    """Add a sandbox's coverage to the pytest process's data, which pytest-cov saves and combines.

    ``hidden`` are the places the sandbox masks, ``shown`` the host paths its fresh tmpfs show again."""
    cov = _active_coverage()
    if cov is None or not isinstance(message["contexts"], dict):
        return
    hidden = [os.path.realpath(place) for place in hidden]
    shown = [os.path.realpath(place) for place in shown]
    budget = [NUMBITS_BUDGET]
    checked = {
        context: _checked_files(files, message["arcs"], hidden, shown, budget)
        for context, files in message["contexts"].items()
    }
    with warnings.catch_warnings():  # as in the sandbox
        warnings.simplefilter("ignore")
        data = cov.get_data()
    measures_arcs = data.has_arcs() if data.measured_files() else bool(cov.config.branch)
    if measures_arcs != message["arcs"]:
        raise protocol.ProtocolError("coverage of lines where pytest measures arcs, or the reverse")
    for context, files in checked.items():
        if context:
            data.set_context(context)
        if message["arcs"]:
            data.add_arcs(files)
        else:
            data.add_lines(files)
    if any(checked):
        data.set_context(None)
