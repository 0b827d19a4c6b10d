"""pytest hooks: options, ini keys, the marker, the report header and routing of sandboxed items."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from . import hookspecs, probe, runner
from .errors import SandboxError
from .spec import MARKER, SandboxSpec, defaults_from_config, spec_for_item

SPEC_KEY = pytest.StashKey[SandboxSpec]()
STATE_KEY = pytest.StashKey["SessionState"]()
MODES = ("marked", "all", "off")
UNAVAILABLE = ("fail", "skip")


@dataclasses.dataclass
class SessionState:
    mode: str
    unavailable: str
    defaults: dict[str, Any]
    zygote: runner.Zygote | None = None
    # Bumped whenever the pytest process itself sets up or tears down fixtures; a zygote
    # forked before that has stale fixture state and is replaced.
    parent_epoch: int = 0


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "run tests in rootless containers (pytest-sandbox)")
    group.addoption("--sandbox", dest="sandbox_mode", metavar="MODE", default=None,
                    help="marked: sandbox tests marked @pytest.mark.container (default); "
                         "all: sandbox every test; off: run everything unsandboxed")
    group.addoption("--sandbox-unavailable", dest="sandbox_unavailable", metavar="ACTION", default=None,
                    help="what sandboxed tests do where this host cannot build sandboxes: fail (default) or skip")
    group.addoption("--sandbox-network", dest="sandbox_network", metavar="MODE", default=None,
                    help="default network of sandboxes: none (loopback only, default) or host")
    parser.addini("sandbox", "default for --sandbox: marked, all or off", default="marked")
    parser.addini("sandbox_unavailable", "default for --sandbox-unavailable: fail or skip", default="fail")
    parser.addini("sandbox_hostname", "host name inside sandboxes", default="")
    parser.addini("sandbox_network", "default network of sandboxes: none or host", default="")
    parser.addini("sandbox_writable", "extra host directories sandboxes may write to (ephemerally)",
                  type="linelist", default=[])
    parser.addini("sandbox_env", "NAME=VALUE lines set in every sandbox", type="linelist", default=[])


def _choice(config: pytest.Config, option: str, ini: str, allowed: tuple[str, ...]) -> str:
    cli = config.getoption(option)
    value = cli if cli is not None else config.getini(ini)
    if value not in allowed:
        where = f"--{option.replace('_', '-')}" if cli is not None else f"ini {ini}"
        if option == "sandbox_mode":
            where = "--sandbox" if cli is not None else "ini sandbox"
        raise pytest.UsageError(f"{where}: invalid value {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(hostname=, network=, writable=, env=): run this test and its fixtures in a rootless "
        "sandbox (pytest-sandbox)",
    )
    config.stash[STATE_KEY] = SessionState(
        mode=_choice(config, "sandbox_mode", "sandbox", MODES),
        unavailable=_choice(config, "sandbox_unavailable", "sandbox_unavailable", UNAVAILABLE),
        defaults=defaults_from_config(config),
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.stash[STATE_KEY].mode == "off":
        return "sandbox: off"
    return probe.header_line()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build and validate every item's spec now, so bad input stops the run before any test."""
    state = config.stash[STATE_KEY]
    for item in items:
        spec = spec_for_item(item, state.defaults, sandbox_all=state.mode == "all")
        if spec is None:
            continue
        changed = item.ihook.pytest_sandbox_spec(item=item, spec=spec)
        if changed is not None:
            if not isinstance(changed, SandboxSpec):
                raise pytest.UsageError(f"{item.nodeid}: pytest_sandbox_spec returned {changed!r}, not a SandboxSpec")
            spec = changed
        item.stash[SPEC_KEY] = spec


def _skip_or_fail(item: pytest.Item, reason: str, skip: bool) -> list[pytest.TestReport]:
    def refuse() -> None:
        if skip:
            pytest.skip(reason)
        pytest.fail(reason, pytrace=False)

    setup = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(refuse, "setup"))
    teardown = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, "teardown"))
    return [setup, teardown]


def _zygote(item: pytest.Item, state: SessionState) -> runner.Zygote:
    zyg = state.zygote
    if zyg is not None and (zyg.epoch != state.parent_epoch or item.nodeid not in zyg.nodeids or not zyg.alive()):
        zyg.close()
        zyg = state.zygote = None
    if zyg is None:
        session = item.session
        factory = getattr(item.config, "_tmp_path_factory", None)
        basetemp = str(factory.getbasetemp()) if factory is not None else None
        items = {i.nodeid: i for i in session.items} | {item.nodeid: item}
        paths = runner.session_paths(item.config, basetemp)
        zyg = state.zygote = runner.Zygote(items, SPEC_KEY, paths, state.parent_epoch)
    return zyg


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    state = item.config.stash[STATE_KEY]
    spec = item.stash.get(SPEC_KEY, None)
    if spec is None or state.mode == "off":
        state.parent_epoch += 1  # pytest runs this item here, changing fixture state
        if state.zygote is not None:
            state.zygote.collect_exits(block=True)  # nothing of a sandbox may overlap a host test
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _run(item, spec, state):
        ihook.pytest_runtest_logreport(report=report)
    if state.parent_epoch:
        _teardown_parent_fixtures(item, nextitem, state)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _run(item: pytest.Item, spec: SandboxSpec, state: SessionState) -> Iterator[pytest.TestReport]:
    """The item's reports, each yielded as soon as the sandbox sends it."""
    reason = probe.unavailable_reason()
    if reason is not None:
        yield from _skip_or_fail(item, f"sandbox unavailable: {reason}", state.unavailable == "skip")
        return
    item.ihook.pytest_sandbox_start(item=item, spec=spec)
    try:
        zyg = _zygote(item, state)
    except SandboxError as exc:
        error = str(exc)
    else:
        error = ""
    if error:
        yield from _skip_or_fail(item, error, state.unavailable == "skip")
        return
    reports = []
    try:
        for report in runner.run_in_sandbox(item, zyg):
            reports.append(report)
            yield report
    except SandboxError as exc:
        error = str(exc)
    if error:  # the zygote died before this sandbox started: report it, start afresh next time
        state.zygote = None
        yield from _skip_or_fail(item, error, skip=False)
        return
    item.ihook.pytest_sandbox_finish(item=item, spec=spec, reports=reports)


def _teardown_parent_fixtures(item: pytest.Item, nextitem: pytest.Item | None, state: SessionState) -> None:
    """Fixtures the pytest process set up for unsandboxed tests end on pytest's normal schedule.

    pytest offers no public call for "tear down what ``nextitem`` does not need" outside
    its own protocol, so this uses the session's setup state when it exists.
    """
    setup_state = getattr(item.session, "_setupstate", None)
    if setup_state is None or not getattr(setup_state, "stack", None):
        return
    before = tuple(setup_state.stack)
    call = pytest.CallInfo.from_call(lambda: setup_state.teardown_exact(nextitem), "teardown")
    if tuple(setup_state.stack) != before:
        state.parent_epoch += 1
    if call.excinfo is not None:
        item.ihook.pytest_runtest_logreport(report=pytest.TestReport.from_item_and_call(item, call))


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.zygote is not None:
        state.zygote.close()
        state.zygote = None
from .fixtures import sandbox  # noqa: E402,F401  (registered through the plugin module)
