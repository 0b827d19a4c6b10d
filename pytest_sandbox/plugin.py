"""pytest hooks: options, ini keys, the marker, the report header and routing of sandboxed items."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from . import cgroups, hookspecs, probe, rootfs, runner, summary, zygote
from .errors import SandboxError
from .layers import build
from .layers.store import Store, remove_tree
from .spec import MARKER, SandboxSpec, defaults_from_config, parse_stress, spec_for_item

SPEC_KEY = pytest.StashKey[SandboxSpec]()
STATE_KEY = pytest.StashKey["SessionState"]()
MODES = ("marked", "all", "off")
UNAVAILABLE = ("fail", "skip")
LIMIT_POLICIES = ("warn", "strict")
KEEP = ("none", "failed")
REPEAT_PARAM = "sandbox_run"


@dataclasses.dataclass
class SessionState:
    mode: str
    unavailable: str
    defaults: dict[str, Any]
    backend: cgroups.Backend
    limit_policy: str
    stress: dict[str, Any]
    repeat: int
    durations: int | None
    zygote: runner.Zygote | None = None
    cgroup_session: cgroups.Session | None = None
    # Bumped whenever the pytest process itself sets up or tears down fixtures; a zygote
    # forked before that has stale fixture state and is replaced.
    parent_epoch: int = 0
    records: summary.Records = dataclasses.field(default_factory=summary.Records)
    store: Store | None = None
    images_dir: str = ""
    images: dict[str, rootfs.ImageMount] = dataclasses.field(default_factory=dict)
    image_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    keep: str = "none"
    keep_dir: str = ""  # this session's dir of image tests' read/write layers (--sandbox-keep)
    containers: dict[str, str] = dataclasses.field(default_factory=dict)  # nodeid -> container id

    @property
    def accounting(self) -> bool:
        """Measure every sandbox (a cgroup each), not only those with limits."""
        return self.durations is not None or self.repeat > 1


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
    for field, what in (("memory", "memory limit, e.g. 512M"), ("cpus", "CPU limit in CPUs, e.g. 0.5"),
                        ("pids", "most processes and threads"), ("timeout", "seconds for each test")):
        group.addoption(f"--sandbox-{field}", dest=f"sandbox_{field}", metavar="VALUE", default=None,
                        help=f"default {what} of every sandbox")
        parser.addini(f"sandbox_{field}", f"default {what} of every sandbox", default="")
    group.addoption("--sandbox-cgroup", dest="sandbox_cgroup", metavar="PATH", default=None,
                    help="cgroup (path below /sys/fs/cgroup, per hierarchy on v1) to create sandbox cgroups in")
    parser.addini("sandbox_cgroup", "default for --sandbox-cgroup", default="")
    group.addoption("--sandbox-cgroup-backend", dest="sandbox_cgroup_backend", metavar="KIND", default=None,
                    help="how limits are enforced: auto (default), v2, v1 or rlimit")
    parser.addini("sandbox_cgroup_backend", "default for --sandbox-cgroup-backend", default="auto")
    group.addoption("--sandbox-limits", dest="sandbox_limits", metavar="POLICY", default=None,
                    help="a limit this host cannot enforce: warn (default) or strict (an error)")
    parser.addini("sandbox_limits", "default for --sandbox-limits: warn or strict", default="warn")
    group.addoption("--sandbox-store", dest="sandbox_store", metavar="DIR", default=None,
                    help="image and layer store (default: $PYTEST_SANDBOX_STORE, ini sandbox_store, "
                         "$XDG_CACHE_HOME/pytest-sandbox)")
    parser.addini("sandbox_store", "directory of the image and layer store", default="")
    group.addoption("--sandbox-keep", dest="sandbox_keep", metavar="WHICH", default=None,
                    help="keep the read/write layer of failed image tests: failed or none (default)")
    parser.addini("sandbox_keep", "default for --sandbox-keep: failed or none", default="none")
    parser.addini("sandbox_images", "directory of *.Containerfile image definitions, relative to rootdir",
                  default="images")
    group.addoption("--sandbox-durations", dest="sandbox_durations", metavar="N", type=int, default=None,
                    help="show the N sandboxed tests that used the most memory and CPU (0: all)")
    group.addoption("--sandbox-repeat", dest="sandbox_repeat", metavar="N", type=int, default=1,
                    help="run each selected test N times, each in a fresh sandbox, and tabulate failures")
    group.addoption("--sandbox-stress", dest="sandbox_stress", metavar="LIMITS", default=None,
                    help="limits that override all others, e.g. cpus=0.2,memory=128M (to shake out flaky tests)")


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
        f"{MARKER}(image=, hostname=, network=, writable=, env=, memory=, cpus=, pids=, io=, timeout=): run this "
        "test and its fixtures in a rootless sandbox (pytest-sandbox)",
    )
    mode = _choice(config, "sandbox_mode", "sandbox", MODES)
    kind = _choice(config, "sandbox_cgroup_backend", "sandbox_cgroup_backend", cgroups.BACKENDS)
    override = (config.getoption("sandbox_cgroup") or os.environ.get("PYTEST_SANDBOX_CGROUP")
                or config.getini("sandbox_cgroup") or None)
    repeat = config.getoption("sandbox_repeat")
    if repeat < 1:
        raise pytest.UsageError(f"--sandbox-repeat: invalid value {repeat}; expected a number of runs, at least 1")
    durations = config.getoption("sandbox_durations")
    if durations is not None and durations < 0:
        raise pytest.UsageError(f"--sandbox-durations: invalid value {durations}; expected 0 (all) or more")
    try:
        backend = cgroups.choose(kind, override, str(config.rootpath)) if mode != "off" else cgroups.Rlimits("off")
    except cgroups.CgroupUnavailable as exc:
        raise pytest.UsageError(f"--sandbox-cgroup-backend={kind}: not usable here: {exc}") from None
    config.stash[STATE_KEY] = SessionState(
        mode=mode,
        unavailable=_choice(config, "sandbox_unavailable", "sandbox_unavailable", UNAVAILABLE),
        defaults=defaults_from_config(config),
        backend=backend,
        limit_policy=_choice(config, "sandbox_limits", "sandbox_limits", LIMIT_POLICIES),
        stress=parse_stress(config.getoption("sandbox_stress")),
        repeat=repeat,
        durations=durations,
        store=Store(config.getoption("sandbox_store") or os.environ.get("PYTEST_SANDBOX_STORE")
                    or _ini_path(config, "sandbox_store") or None),
        images_dir=_ini_path(config, "sandbox_images") or str(config.rootpath / "images"),
        keep=_choice(config, "sandbox_keep", "sandbox_keep", KEEP),
    )
    if durations is not None or repeat > 1:
        config.pluginmanager.register(_Recorder(config.stash[STATE_KEY].records), "sandbox-recorder")


def _ini_path(config: pytest.Config, name: str) -> str:
    value = str(config.getini(name) or "")
    if not value:
        return ""
    base = config.inipath.parent if config.inipath else config.rootpath
    return str(base / os.path.expanduser(value))


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE_KEY]
    if state.mode == "off":
        return ["sandbox: off"]
    return [probe.header_line(), f"sandbox limits: {state.backend.describe()}"]


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
    for item in items:
        sandbox_all = state.mode == "all" or state.repeat > 1 or bool(state.stress)
        spec = spec_for_item(item, state.defaults, sandbox_all=sandbox_all, overrides=state.stress)
        if spec is None:
            continue
        changed = item.ihook.pytest_sandbox_spec(item=item, spec=spec)
        if changed is not None:
            if not isinstance(changed, SandboxSpec):
                raise pytest.UsageError(f"{item.nodeid}: pytest_sandbox_spec returned {changed!r}, not a SandboxSpec")
            spec = changed
        item.stash[SPEC_KEY] = spec
        if spec.image is not None and state.mode != "off":
            images_needed.setdefault(spec.image, item.nodeid)
        for limit in spec.limits:
            if limit not in state.backend.enforced:
                unenforced.setdefault(limit, []).append(item.nodeid)
    if unenforced and state.mode != "off":
        _unenforceable(state, unenforced)
    assert state.store is not None
    checker = build.Builder(state.store, state.images_dir)
    for name, nodeid in images_needed.items():
        try:
            checker.check(name)
        except SandboxError as exc:
            raise pytest.UsageError(f"{nodeid}: image={name!r}: {exc}") from None
    state.images = {name: rootfs.ImageMount(name, (), "{}") for name in images_needed}  # built at runtestloop


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Build (or find cached) every image the selected tests use, before the first test runs."""
    state = session.config.stash[STATE_KEY]
    if not state.images or session.config.option.collectonly or session.testsfailed:
        return  # nothing to build, or pytest stops for collection errors before any test
    assert state.store is not None
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def progress(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"sandbox image: {line}")

    builder = build.Builder(state.store, state.images_dir, progress, quiet_cached=True)
    for name in sorted(state.images):
        try:
            image = builder.ensure(name)
        except SandboxError as exc:  # its tests fail with this; the others run
            state.image_errors[name] = f"image {name!r} cannot be built: {exc}"
            progress(state.image_errors[name])
            del state.images[name]
            continue
        lowers = tuple(state.store.diff_path(c) for c in reversed(image.layers))
        if not lowers and image.base != "host":
            lowers = (_empty_layer(state.store),)
        state.images[name] = rootfs.ImageMount(name, lowers, json.dumps(image.config, sort_keys=True),
                                               host_based=image.base == "host")


def _empty_layer(store: Store) -> str:
    """The lower dir of an image without layers (FROM scratch with only config steps)."""
    path = os.path.join(store.ensure().root, "empty")
    os.makedirs(path, exist_ok=True)
    return path


def _unenforceable(state: SessionState, unenforced: dict[str, list[str]]) -> None:
    """A limit this host cannot enforce: an error with sandbox_limits=strict, else one warning."""
    parts = [f"{limit} (e.g. {nodeids[0]})" for limit, nodeids in sorted(unenforced.items())]
    message = f"{state.backend.describe()} cannot enforce {', '.join(parts)}"
    if state.limit_policy == "strict":
        raise pytest.UsageError(f"{message}; sandbox_limits=strict makes this an error")
    warnings.warn(pytest.PytestWarning(f"pytest-sandbox: {message}; these limits are ignored"), stacklevel=1)


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
        if state.keep != "none" and state.images and not state.keep_dir:
            assert state.store is not None
            if state.store.filesystem() == "overlay":
                state.keep = "none"
                warnings.warn(pytest.PytestWarning(
                    f"pytest-sandbox: --sandbox-keep ignored: the image store {state.store.root} is on overlayfs, "
                    "which cannot hold a read/write layer (put it elsewhere with --sandbox-store)"), stacklevel=1)
            else:
                state.keep_dir = state.store.session_containers(os.getpid())
        paths = dataclasses.replace(runner.session_paths(item.config, basetemp), images=dict(state.images),
                                    keep_dir=state.keep_dir)
        if state.cgroup_session is None and isinstance(state.backend, cgroups.CgroupBackend):
            try:
                state.cgroup_session = state.backend.open_session()
            except OSError as exc:
                raise SandboxError(f"cannot create the session cgroup: {exc}") from None
        zyg = state.zygote = runner.Zygote(items, SPEC_KEY, paths, state.parent_epoch,
                                           zygote.Limits(state.backend, state.cgroup_session, state.accounting))
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
    if spec.image is not None and spec.image in state.image_errors:
        yield from _skip_or_fail(item, state.image_errors[spec.image], skip=False)
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
        for report in runner.run_in_sandbox(item, zyg, spec, state.containers):
            reports.append(report)
            yield report
    except SandboxError as exc:
        error = str(exc)
    cid = state.containers.pop(item.nodeid, None)
    if cid is not None and any(r.failed for r in reports):
        _keep_container(state, item, spec, cid)
    if error:  # the zygote died before this sandbox started: report it, start afresh next time
        zyg.close()
        state.zygote = None
        yield from _skip_or_fail(item, error, skip=False)
        return
    item.ihook.pytest_sandbox_finish(item=item, spec=spec, reports=reports)


def _keep_container(state: SessionState, item: pytest.Item, spec: SandboxSpec, cid: str) -> None:
    assert state.store is not None and spec.image is not None
    image = state.images[spec.image]
    chains = ["sha256:" + os.path.basename(os.path.dirname(p)) for p in reversed(image.lowers)
              if os.path.basename(p) == "diff"]
    meta = {"id": cid, "nodeid": item.nodeid, "image": spec.image, "layers": chains,
            "config": json.loads(image.config_json), "hostname": spec.hostname, "created": time.time(),
            "base": "host" if image.host_based else ""}
    try:
        state.store.keep_container(state.keep_dir, cid, meta)
    except OSError as exc:
        warnings.warn(pytest.PytestWarning(f"pytest-sandbox: cannot keep {item.nodeid}'s layer: {exc}"), stacklevel=1)


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


class _Recorder:
    """Collects outcomes and usage from every report (also on the xdist controller)."""

    def __init__(self, records: summary.Records) -> None:
        self.records = records

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.records.add(report)


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
    if state is None:
        return
    if state.zygote is not None:
        state.zygote.close()
        state.zygote = None
    if state.cgroup_session is not None:
        state.cgroup_session.close()
        state.cgroup_session = None
    if state.keep_dir:  # the layers of tests that passed
        remove_tree(state.keep_dir)
        state.keep_dir = ""
from .fixtures import sandbox  # noqa: E402,F401  (registered through the plugin module)
