"""pytest hooks: each one delegates to the module that does the work."""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import os
import signal
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from . import credentials, hermetic, hookspecs, plugin_results, plugin_state, probe, reports, settings, summary
from . import session as _session
from .errors import SandboxError
from .runtime import stack_depth, test_process
from .runtime.handle import Zygote
from .services import pod
from .services.definition import ServiceDefinition, resolved, used_by
from .session import SPEC_KEY, SessionState
from .spec import FIELDS, MARKER, SandboxSpec, spec_for_item, with_resolved_volumes
from .volumes import is_named

STATE_KEY = pytest.StashKey[SessionState]()
REPEAT_PARAM = "sandbox_run"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.register(parser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None]:
    """--sandbox=hermetic and --sandbox=all: before pytest loads any conftest.py (and before its capture
    starts), the session moves into a sandbox and this process only relays it (hermetic.py), then exits as
    that pytest did; or, for --sandbox=all where that sandbox cannot hold the run, goes on here."""
    mode = hermetic.wanted(early_config)
    if mode is not None:
        code = hermetic.supervise(early_config, mode)
        if code is not None:
            hermetic.end_the_program(code)
            raise SystemExit(code)
    if hermetic.inside():
        hermetic.out_of_the_tests_reach()
        hermetic.take_what_the_supervisor_gave(early_config)
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}({', '.join(f + '=' for f in FIELDS)}): run this test and its fixtures in a rootless sandbox "
        "(pytest-sandbox)",
    )
    state = config.stash[STATE_KEY] = _session.configure(config)
    if state.mode == hermetic.MODE:
        raise pytest.UsageError(
            f"{hermetic.WHERE}: the session's sandbox must be made before pytest loads any conftest.py; "
            "load pytest-sandbox from its entry point or -p pytest_sandbox.plugin, not from a conftest.py"
        )
    config.stash[pod.STARTER] = lambda: _session.ensure_pod(state, state.items)
    if state.durations is not None or state.repeat > 1:
        config.pluginmanager.register(_Recorder(state.records), "sandbox-recorder")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE_KEY]
    if state.hermetic:
        mode = "all" if state.falls_back else "hermetic"
        contained = f"sandbox: {mode} (this whole session runs in one sandbox; only declared outputs reach the host)"
        return [contained, *hermetic.header_from_the_supervisor(config)]
    if state.mode == "off":
        return ["sandbox: off"]
    fell_back = config.stash.get(hermetic.FELL_BACK, None)
    collection = [f"sandbox: collection runs on the host, each test in a sandbox: {fell_back}"] if fell_back else []
    hidden = credentials.hidden_places(os.environ.get("HOME"), state.defaults.get("hide", ()))
    withheld = credentials.withheld_variables(os.environ, state.defaults.get("env_pass", ()))
    return [
        probe.header_line(),
        f"sandbox limits: {state.backend.describe()}",
        *credentials.header_lines(hidden, withheld, config.get_verbosity() > 0),
        *probe.root_in_a_foreign_tree(str(config.rootpath)),
        *collection,
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """--sandbox-repeat=N: N copies of each test, told apart by a run-k-of-N id."""
    runs = metafunc.config.stash[STATE_KEY].repeat
    if runs > 1:
        metafunc.fixturenames.append(REPEAT_PARAM)
        metafunc.parametrize(REPEAT_PARAM, range(1, runs + 1), ids=[f"run{k}-of-{runs}" for k in range(1, runs + 1)])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build and validate every item's spec now, so bad input stops the run before any test."""
    state = config.stash[STATE_KEY]
    unenforced: dict[str, list[str]] = {}
    images_needed: dict[str, str] = {}
    services: dict[str, ServiceDefinition] = {}
    for item in items:
        spec = spec_for_item(item, state.defaults, sandbox_all=state.sandbox_all, overrides=state.stress)
        used = used_by(item)
        services.update((definition.name, definition) for definition in used)
        if spec is None:
            continue
        if used and spec.network == "none":  # a sandboxed test reaches its services on the pod network
            spec = dataclasses.replace(spec, network="pod")
        changed = item.ihook.pytest_sandbox_spec(item=item, spec=spec)
        if changed is not None:
            if not isinstance(changed, SandboxSpec):
                raise pytest.UsageError(f"{item.nodeid}: pytest_sandbox_spec returned {changed!r}, not a SandboxSpec")
            spec = with_resolved_volumes(changed, str(config.rootpath), f"{item.nodeid}: pytest_sandbox_spec hook")
        item.stash[SPEC_KEY] = spec
        if spec.image is not None and state.mode != "off":
            images_needed.setdefault(spec.image, item.nodeid)
        if spec.volumes and state.mode != "off":
            _session.check_volume_targets(config, item.nodeid, spec)
        for limit in spec.limits:
            if limit not in state.backend.enforced:
                unenforced.setdefault(limit, []).append(item.nodeid)
    if state.hermetic:
        hermetic.check_items(config, items, state.defaults, state.falls_back)
    if unenforced and state.mode != "off":  # none in the hermetic session: its sandbox holds the limits
        _unenforceable(state, unenforced)
    if state.mode != "off":
        sandboxed = [item for item in items if SPEC_KEY in item.stash]
        state.outputs = tuple(dict.fromkeys([*state.outputs, *plugin_state.for_sandboxed_items(config, sandboxed)]))
        state.pod_needed = any(item.stash[SPEC_KEY].network == "pod" for item in sandboxed)
    state.items = items
    _use_services(config, state, services, images_needed)
    _session.check_images(state, images_needed)


def _use_services(
    config: pytest.Config, state: SessionState, services: dict[str, ServiceDefinition], images_needed: dict[str, str]
) -> None:
    """The services the selected tests use: their host paths resolved and volume targets checked, their images
    built with the others'."""
    rootdir = str(config.rootpath)
    state.services = {name: resolved(definition, rootdir) for name, definition in sorted(services.items())}
    sandboxed = [item for item in state.items if SPEC_KEY in item.stash]
    for definition in state.services.values():
        if definition.spec.image is not None:
            images_needed.setdefault(definition.spec.image, definition.where)
        _session.check_volume_targets(config, definition.where, definition.spec)
        _check_shared_volumes(definition, sandboxed)
    writers: dict[str, str] = {}  # a named volume -> the service that mounts it read/write
    for definition in state.services.values():
        for source, _target, mode in definition.spec.volumes:
            if is_named(source) and mode == "rw":
                if source in writers:
                    raise pytest.UsageError(
                        f"{definition.where}: volumes: the named volume {source!r} is also mounted read/write by "
                        f"service({writers[source]!r}); a named volume has one writer at a time"
                    )
                writers[source] = definition.name


def _check_shared_volumes(definition: ServiceDefinition, sandboxed: list[pytest.Item]) -> None:
    """A named volume has one writer at a time, and a service holds its volumes while it runs: a test of the
    same session writing one it reads or writes (or reading one it writes) would wait for it forever."""
    mine = {source: mode for source, _target, mode in definition.spec.volumes if is_named(source)}
    for item in sandboxed:
        for source, _target, mode in item.stash[SPEC_KEY].volumes:
            if source in mine and "rw" in (mode, mine[source]):
                raise pytest.UsageError(
                    f"{item.nodeid}: volumes: the named volume {source!r} is also mounted by "
                    f"{definition.where}, which holds it while it runs; only read-only mounts of it can be "
                    "shared (or give the test another volume)"
                )


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """Build every image the selected tests use, start the zygote, then run the loop where pytest would.

    The zygote is forked here, outside any test's protocol: a fork inside one would inherit the
    timers its wrappers armed (faulthandler's watchdog thread does not survive a fork).
    """
    state = session.config.stash[STATE_KEY]
    if state.mode == "off" or session.config.option.collectonly or session.testsfailed:
        return None  # pytest stops for collection errors before any test
    worker = getattr(session.config, "workerinput", None)  # an xdist worker's
    if state.images:
        xdist = (worker["workerid"], worker["testrunuid"]) if worker else None
        _session.prepare_images(state, _session.image_progress(session.config), xdist)
    first = next((item for item in session.items if SPEC_KEY in item.stash), None)
    if first is None:
        return None
    stack_depth.measure_in_pytests_loop()  # here, where pytest's own loop would call each test's protocol
    _start_zygote(first, state)
    if worker is not None:  # xdist's worker loop calls pytest_runtest_protocol for each test
        session.config.hook.pytest_runtest_protocol = _StraightToTheSandbox(  # type: ignore[attr-defined]
            session.config.hook.pytest_runtest_protocol, state
        )
        return None
    if session.config.pluginmanager.has_plugin("dsession"):
        return None  # the xdist controller runs no test
    for index, item in enumerate(session.items):
        nextitem = session.items[index + 1] if index + 1 < len(session.items) else None
        if SPEC_KEY in item.stash:
            _sandboxed(item, nextitem, item.stash[SPEC_KEY], state)
        else:
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
    return True


class _StraightToTheSandbox:
    """``pytest_runtest_protocol`` as an xdist worker's loop calls it. A sandboxed test goes straight to its
    sandbox, as in pytest's own loop (pytest_runtestloop above): the wrappers other plugins put around this
    hook run in the sandbox, around the test, once, and not a second time here around the relay (allure would
    write a second, empty result, pytest-timeout arm a timer). Any other test, and every test in a sandbox
    (a zygote forked later inherits this), takes the hook with all its implementations."""

    def __init__(self, hook: Any, state: SessionState) -> None:
        self._hook, self._state = hook, state

    def __call__(self, *, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        spec = _spec_to_relay(item, self._state)
        if spec is None:
            return self._hook(item=item, nextitem=nextitem)
        _sandboxed(item, nextitem, spec, self._state)
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hook, name)


def _start_zygote(item: pytest.Item, state: SessionState) -> None:
    """Fork the zygote now; a failure is reported on the first sandboxed test, as before."""
    if _unavailable(state) is None:
        try:
            _session.zygote_for(item, state)
        except SandboxError:
            pass


def _unavailable(state: SessionState) -> str | None:
    """Why sandboxes cannot be built here; the hermetic session's need nothing more than its own sandbox."""
    return None if state.hermetic else probe.unavailable_reason()


def _unenforceable(state: SessionState, unenforced: dict[str, list[str]]) -> None:
    """A limit this host cannot enforce: an error with sandbox_limits=strict; else each such test warns
    when it runs (test_process.ReportStreamer), where filterwarnings applies as to any warning."""
    _session.refuse_unenforceable(state, [f"{limit} (e.g. {ids[0]})" for limit, ids in sorted(unenforced.items())])


def _spec_to_relay(item: pytest.Item, state: SessionState) -> SandboxSpec | None:
    """The item's spec if this process relays it to a sandbox; None where pytest's own protocol runs it here
    (a host test, --sandbox=off, or any test in a sandbox, with every plugin's hooks)."""
    if test_process.in_sandbox() or state.mode == "off":
        return None
    return item.stash.get(SPEC_KEY, None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Reached for host tests. pytest's loop and xdist's worker loop (_StraightToTheSandbox) hand sandboxed
    tests to their sandbox without this hook; a sandboxed test reaches it only from another plugin's loop."""
    if test_process.in_sandbox():
        return None  # pytest's own protocol, with every plugin's hooks, in the sandbox
    state = item.config.stash[STATE_KEY]
    spec = _spec_to_relay(item, state)
    if spec is None:
        state.parent_epoch += 1  # pytest runs this item here, changing fixture state
        if state.zygote is not None:
            state.zygote.collect_exits(block=True)  # nothing of a sandbox may overlap a host test
        return None
    _disarm_host_timers(item)
    _sandboxed(item, nextitem, spec, state)
    return True


def _disarm_host_timers(item: pytest.Item) -> None:
    """Wrappers of this hook on the pytest process (another plugin's loop reaches them) armed timers for a test
    that runs elsewhere: the same plugins arm them again in the sandbox. pytest-timeout's interval
    timer (SIGALRM) or thread would otherwise fire in pytest, mid-relay, and faulthandler_timeout would
    dump pytest's stacks besides the sandbox's."""
    cancel = getattr(item, "cancel_timeout", None)
    if callable(cancel):
        cancel()
    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()


def _sandboxed(item: pytest.Item, nextitem: pytest.Item | None, spec: SandboxSpec, state: SessionState) -> None:
    """What pytest's protocol does for an item, with the protocol itself run in a sandbox: pytest
    hears the start, every report the sandbox logs, and the finish."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _run(item, nextitem, spec, state):
        if report.failed and state.pod is not None:
            report.sections.extend(state.pod.log_sections(item))
        ihook.pytest_runtest_logreport(report=report)
        plugin_state.forget_superseded_subtests(item, report)
        plugin_state.dependency_result(item, report)
    if state.parent_epoch:
        _teardown_parent_fixtures(item, nextitem, state)
    if state.pod is not None:
        state.pod.after_test(item)
        state.pod.end_scopes(nextitem)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _share_key(item: pytest.Item, spec: SandboxSpec, state: SessionState) -> tuple[str, SandboxSpec] | None:
    """Tests with the same key run one after another in one sandbox (--sandbox-scope); None: alone.
    Repeats and stress runs are about fresh sandboxes; a kept layer is one test's. At the default scope,
    consecutive tests of one spec share a scope sandbox, each in a fork over a layer of its own."""
    if state.repeat > 1 or state.stress or (spec.image and state.keep != "none"):
        return None
    if state.scope == "test":
        return ("", spec) if state.scope_sandboxes and spec.fits_scope_sandbox else None
    return (str(item.path) if state.scope == "module" else "", spec)


def _next_here(item: pytest.Item, nextitem: pytest.Item | None, spec: SandboxSpec, state: SessionState) -> str | None:
    """The next test's node id if it runs in this test's sandbox."""
    key = _share_key(item, spec, state)
    next_spec = nextitem.stash.get(SPEC_KEY, None) if nextitem is not None else None
    if key is None or nextitem is None or next_spec is None or _share_key(nextitem, next_spec, state) != key:
        return None
    return nextitem.nodeid


def _channels_for(item: pytest.Item, zyg: Zygote, spec: SandboxSpec, state: SessionState) -> reports.Channels:
    """The sandbox that waits for this test (the previous one named it as its next), else a new one."""
    shared, state.shared = state.shared, None
    if shared is not None and shared.open:
        if shared.next == item.nodeid and shared.zygote is zyg:
            return shared
        shared.end()  # pytest did not run the test it expected next (xdist, -x): that sandbox ends
    return reports.Channels(*zyg.start(item.nodeid), name=item.nodeid, zygote=zyg)


def _run(
    item: pytest.Item, nextitem: pytest.Item | None, spec: SandboxSpec, state: SessionState
) -> Iterator[pytest.TestReport]:
    """The item's reports, each yielded as soon as the sandbox sends it."""
    reason = _unavailable(state)
    if reason is not None:
        yield from reports.refused(item, f"sandbox unavailable: {reason}", state.unavailable == "skip")
        return
    if spec.image is not None and spec.image in state.image_errors:
        yield from reports.refused(item, state.image_errors[spec.image], skip=False)
        return
    used = used_by(item)
    if used:  # started here: the sandbox has no line to the pod's zygote
        try:
            _session.ensure_pod(state, [item]).for_item(item, used)
        except SandboxError as exc:
            yield from reports.refused(item, str(exc), skip=False)
            return
    item.ihook.pytest_sandbox_start(item=item, spec=spec)
    try:
        zyg = _session.zygote_for(item, state)
    except SandboxError as exc:
        error = str(exc)
    else:
        error = ""
    if error:
        yield from reports.refused(item, error, state.unavailable == "skip")
        return
    sent = []
    try:
        channels = _channels_for(item, zyg, spec, state)
        next_here = _next_here(item, nextitem, spec, state)
        with state.volumes.held(spec.volumes):  # a named volume has one writer at a time, across sessions
            try:
                for report in reports.run_in_sandbox(item, zyg, spec, channels, state.containers, next_here):
                    sent.append(report)
                    yield report
            finally:
                _clear_setid_bits(state, spec, zyg, channels)
        state.shared = channels if channels.open else None
    except SandboxError as exc:
        error = str(exc)
    cid = state.containers.pop(item.nodeid, None)
    if cid is not None and any(r.failed for r in sent):
        _session.keep_container(state, item, spec, cid)
    if error:  # the zygote died before this sandbox started: report it, start afresh next time
        _session.drop_zygote(state)
        yield from reports.refused(item, error, skip=False)
        return
    item.ihook.pytest_sandbox_finish(item=item, spec=spec, reports=sent)


def _clear_setid_bits(state: SessionState, spec: SandboxSpec, zyg: Zygote, channels: reports.Channels) -> None:
    """No set-id file a test made stays in a read/write volume: now, and again once the sandbox is gone (a
    scope's processes may outlive this test)."""
    state.volumes.clear_setid_bits(spec.volumes)
    if tops := tuple(state.volumes.writable_tops(spec.volumes)):
        zyg.when_gone(channels.status, tops, functools.partial(state.volumes.clear_setid_bits, spec.volumes))


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """An unsandboxed test that fails while services run gets their recent logs (sandboxed ones: _sandboxed)."""
    report = yield
    state = item.config.stash.get(STATE_KEY, None)
    if state is not None and state.pod is not None and not test_process.in_sandbox():
        if report.failed:
            report.sections.extend(state.pod.log_sections(item))
        if call.when == "teardown":
            state.pod.after_test(item)
    return report


class _Recorder:
    """Collects outcomes and usage from every report (also on the xdist controller)."""

    def __init__(self, records: summary.Records) -> None:
        self.records = records

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.records.add(report)


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """Before every plugin's own session end (syrupy decides there which snapshots are unused)."""
    plugin_results.before_session_end(session.config)
    return (yield)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if state.durations is not None:
        summary.write_durations(terminalreporter, state.records, state.durations)
    if state.repeat > 1:
        summary.write_repeats(terminalreporter, state.records, state.repeat)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None:
        _session.close(state)
    hermetic.forget_the_host_collection()


from .fixtures import sandbox  # noqa: E402,F401  (registered through the plugin module)
