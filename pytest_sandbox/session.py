"""One pytest process's sandbox session: its settings, its images, its zygote and its kept layers."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pytest

from . import outputs, settings, summary
from .errors import SandboxError, ServiceError
from .layers import build, progress, registry
from .layers.store import Image, Store, share
from .linux import mounts, process
from .linux.files import remove_tree
from .linux.mounts import SCRATCH_PLACES, is_under
from .linux.rootfs import ImageMount
from .runtime import cgroups, test_layers
from .runtime.handle import Zygote
from .runtime.service_process import ServiceCommand, ServiceLaunch
from .runtime.zygote import Limits, Namespaces, SessionPaths
from .services.definition import REGISTRY, ServiceDefinition, hosts_text, resolved
from .services.pod import Pod
from .services.records import Records
from .services.shared import SharedServices
from .spec import SandboxSpec
from .volumes import MountedVolumes, VolumeStore, is_named
from .wait import uses_notify

if TYPE_CHECKING:
    from .reports import Channels

SPEC_KEY = pytest.StashKey[SandboxSpec]()


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
    store: Store
    images_dir: str
    keep: str
    scope: str  # which tests share a sandbox (--sandbox-scope)
    outputs: tuple[str, ...]  # where sandboxes write files that reach the host
    insecure_registries: tuple[str, ...] = ()  # FROM a registry: sandbox_insecure_registries
    build_cache: registry.RemoteCache | None = None  # --sandbox-cache
    pod_network: str = "auto"  # --sandbox-pod-network
    zygote: Zygote | None = None
    shared: Channels | None = None  # the sandbox that waits for the next test (--sandbox-scope)
    scope_sandboxes: bool = False  # decided with the zygote: see scope_sandboxes()
    cgroup_session: cgroups.Session | None = None
    # Bumped whenever the pytest process itself sets up or tears down fixtures; a zygote
    # forked before that has stale fixture state and is replaced.
    parent_epoch: int = 0
    records: summary.Records = dataclasses.field(default_factory=summary.Records)
    images: dict[str, ImageMount] = dataclasses.field(default_factory=dict)
    image_records: dict[str, Image] = dataclasses.field(default_factory=dict)
    image_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_dir: str = ""  # this session's dir of image tests' read/write layers (--sandbox-keep)
    keep_fd: int = -1  # that dir, opened before any test could reach it: kept layers are found through it
    xdist_run_fd: int = -1  # a shared lock on this xdist run's directory: the store's sweep leaves it alone
    containers: dict[str, str] = dataclasses.field(default_factory=dict)  # nodeid -> container id
    items: list[pytest.Item] = dataclasses.field(default_factory=list)  # the session's, once collected
    services: dict[str, ServiceDefinition] = dataclasses.field(default_factory=dict)  # the selected tests use
    pod_needed: bool = False  # a sandboxed test is on the pod network: the pod starts before its zygote
    pod: Pod | None = None
    hermetic: bool = False  # this pytest is --sandbox=hermetic's, in the session's sandbox: it runs tests itself
    falls_back: bool = False  # there, for --sandbox=all: a test that needs a sandbox of its own sends the run back
    ignored: tuple[str, ...] = ()  # --sandbox=hermetic: the project's settings that would widen its sandbox
    layers: test_layers.Inherited | None = None  # there: the session's layer helper (--sandbox-scope=test)
    userns_fd: int = -1  # the session's user namespace: every zygote after the first joins it

    @functools.cached_property
    def volumes(self) -> VolumeStore:
        if self.hermetic:
            return MountedVolumes(self.store.root)
        return VolumeStore(self.store.root)  # one: its watcher is the session keeper's (_open_cgroup_session)

    @property
    def accounting(self) -> bool:
        """Measure every sandbox (a cgroup each), not only those with limits."""
        return self.durations is not None or self.repeat > 1

    @property
    def sandbox_all(self) -> bool:
        """Every test is sandboxed: --sandbox=all, and the modes whose point is fresh sandboxes."""
        return self.mode == "all" or self.repeat > 1 or bool(self.stress)


def configure(config: pytest.Config) -> SessionState:
    """The session's state from its settings; bad values are usage errors before anything runs."""
    mode = settings.choice(config, "sandbox_mode")
    hermetic = mode in ("hermetic", "all") and os.environ.get(settings.HERMETIC_ENV) == "1"
    if hermetic and not process.without_privileges():  # the variable leaked into a run that is not contained
        raise pytest.UsageError(
            f"${settings.HERMETIC_ENV} is set, but this pytest does not run in the session's sandbox of "
            f"--sandbox={mode}: unset it"
        )
    falls_back = hermetic and mode == "all"
    layers = None
    if hermetic:  # in the session's sandbox: each test runs in a process of it (SessionPaths.in_session)
        mode = "all"
        inherited = os.environ.pop(settings.LAYERS_ENV, None)  # xdist's workers, started from here, have no line
        try:
            layers = test_layers.Inherited.from_text(inherited) if inherited else None
            if layers is not None:
                os.set_inheritable(layers.fd, False)
        except (ValueError, KeyError, TypeError, OSError):  # not the session process's: no layer per test
            layers = None
    kind = settings.choice(config, "sandbox_cgroup_backend")
    override = settings.cgroup_path(config)
    try:
        if hermetic:
            backend: cgroups.Backend = cgroups.SessionLimits()
        elif mode != "off":
            backend = cgroups.choose(kind, override, str(config.rootpath))
        else:
            backend = cgroups.Rlimits("off")
    except cgroups.CgroupUnavailable as exc:
        raise pytest.UsageError(f"--sandbox-cgroup-backend={kind}: not usable here: {exc}") from None
    store_root = settings.directory(config, "sandbox_store")
    ignored = settings.widening_the_user_did_not_give(config)
    return SessionState(
        mode=mode,
        unavailable=settings.choice(config, "sandbox_unavailable"),
        defaults=settings.spec_defaults(config, ignored),
        backend=backend,
        limit_policy=settings.choice(config, "sandbox_limits"),
        stress=settings.parse_stress(config),
        repeat=settings.count(config, "sandbox_repeat", 1, "a number of runs, at least 1") or 1,
        durations=settings.count(config, "sandbox_durations", 0, "0 (all) or more"),
        store=Store(store_root or None),
        images_dir=settings.directory(config, "sandbox_images") or "images",
        keep=settings.choice(config, "sandbox_keep"),
        scope=settings.choice(config, "sandbox_scope"),
        outputs=outputs.declared(config, settings.raw(config, "sandbox_outputs")[0] or ()),
        insecure_registries=settings.insecure_registries(config),
        build_cache=settings.build_cache(config, settings.insecure_registries(config)),
        pod_network=settings.choice(config, "sandbox_pod_network"),
        hermetic=hermetic,
        falls_back=falls_back,
        ignored=ignored,
        layers=layers,
    )


def refuse_unenforceable(state: SessionState, limits: list[str]) -> None:
    """With sandbox_limits=strict, limits this host cannot enforce (``limits``: described) are a usage error."""
    if limits and state.limit_policy == "strict":
        raise pytest.UsageError(
            f"{state.backend.describe()} cannot enforce {', '.join(limits)}; sandbox_limits=strict makes this an error"
        )


# -- images ---------------------------------------------------------------------------------------


def check_images(state: SessionState, needed: dict[str, str]) -> None:
    """Every image the selected tests name must be buildable or in the store: a usage error otherwise."""
    checker = build.Builder(state.store, state.images_dir)
    for name, nodeid in needed.items():
        try:
            checker.check(name)
        except SandboxError as exc:
            raise pytest.UsageError(f"{nodeid}: image={name!r}: {exc}") from None
    state.images = {name: ImageMount(name, (), "{}") for name in needed}  # built in prepare_images


def image_progress(config: pytest.Config) -> build.Progress:
    """Where ``sandbox image:`` lines go: pytest's terminal, live on a tty, whole lines in a log.

    An xdist worker's terminal output goes nowhere; its stderr is the controller's (execnet
    inherits it), so a worker writes there, with pytest's capture of it suspended meanwhile.
    """
    prefix = "sandbox image: "
    if hasattr(config, "workerinput"):
        capman = config.pluginmanager.get_plugin("capturemanager")

        def uncaptured() -> contextlib.AbstractContextManager[None]:
            return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()

        def write(text: str) -> None:
            with uncaptured():
                sys.stderr.write(text)
                sys.stderr.flush()

        with uncaptured():
            tty = sys.stderr.isatty()
        return progress.Lines(write, tty, prefix)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return lambda _line: None
    reporter.ensure_newline()
    return progress.Lines(lambda text: reporter.write(text, flush=True), bool(reporter.isatty), prefix)


WAIT_FOR_FIRST_WORKER = 60.0  # seconds another xdist worker waits for gw0 to start preparing images


def prepare_images(state: SessionState, say: build.Progress, worker: tuple[str, str] | None = None) -> None:
    """Build (or find cached) every image the selected tests use; an image that fails fails its tests.

    ``worker`` is (xdist worker id, test run id) in an xdist worker. Every worker needs the images,
    but their progress is shown once: gw0 prepares first and says what it builds; the others
    wait for it, then find the images cached (or retry a failed one) without a word.
    """
    if worker is None:
        _prepare_images(state, say)
        return
    worker_id, run_id = worker
    shared = _xdist_run_dir(state, run_id)
    started = os.path.join(shared, "started")
    import filelock  # here: only xdist workers that build images take it

    first = filelock.FileLock(os.path.join(shared, "lock"))
    if worker_id == "gw0":
        with first:
            with open(started, "w"):
                pass
            _prepare_images(state, say)
        return
    deadline = time.monotonic() + WAIT_FOR_FIRST_WORKER
    while not os.path.exists(started) and time.monotonic() < deadline:
        time.sleep(0.02)
    with first:
        pass  # gw0 is done
    _prepare_images(state, lambda _line: None)


def _xdist_run_dir(state: SessionState, run_id: str) -> str:
    """Where the xdist workers of one run meet (image preparation, shared services); the store drops it once
    no worker of the run holds it (a run may last longer than the hour after which a dir nobody holds goes)."""
    path = os.path.join(state.store.ensure().tmp_dir, f"xdist-{run_id}")
    if state.xdist_run_fd < 0:  # the first call makes it
        state.xdist_run_fd = share(path)
    return path


def _prepare_images(state: SessionState, say: build.Progress) -> None:
    builder = build.Builder(
        state.store,
        state.images_dir,
        say,
        quiet_cached=True,
        insecure_registries=state.insecure_registries,
        cache=state.build_cache,
    )
    for name in sorted(state.images):
        try:
            image = builder.ensure(name)
        except SandboxError as exc:
            done = "pulled" if registry.looks_like_registry(name) else "built"
            state.image_errors[name] = f"image {name!r} cannot be {done}: {exc}"
            say(state.image_errors[name])
            del state.images[name]
            continue
        lowers = tuple(state.store.diff_path(c) for c in reversed(image.layers))
        if not lowers and not image.host_based:
            lowers = (_empty_layer(state.store),)
        state.image_records[name] = image
        state.images[name] = ImageMount(
            name, lowers, json.dumps(image.config, sort_keys=True), host_based=image.host_based
        )


def _empty_layer(store: Store) -> str:
    """The lower dir of an image without layers (FROM scratch with only config steps)."""
    path = os.path.join(store.ensure().root, "empty")
    os.makedirs(path, exist_ok=True)
    return path


# -- the zygote -----------------------------------------------------------------------------------


def session_paths(config: pytest.Config, basetemp: str | None) -> SessionPaths:
    """Which host paths sandboxes must keep writable or visible for this pytest process."""
    cwd = os.getcwd()
    writable = [str(config.rootpath), cwd]
    home = os.environ.get("HOME")
    if home and os.path.isabs(home) and os.path.isdir(home):
        writable.append(home)
    if basetemp:
        writable.append(basetemp)
    needed = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        str(config.invocation_params.dir),
        *[p for p in sys.path if p],
    ]
    if config.inipath:
        needed.append(str(config.inipath.parent))
    return SessionPaths(cwd=cwd, writable=tuple(writable), needed=tuple(needed))


def check_volume_targets(config: pytest.Config, where: str, spec: SandboxSpec) -> None:
    """A target the sandbox could not make (the host view is read-only) is a usage error before any test."""
    if spec.image is not None:  # an image test's volumes also go into the image's root, where they can be made
        return
    writable = [*session_paths(config, None).writable, *spec.writable, *SCRATCH_PLACES]
    for source, target, _mode in spec.volumes:
        if not os.path.lexists(target) and not any(is_under(target, w) for w in writable):
            raise pytest.UsageError(
                f"{where}: invalid volumes={{{source!r}: {target!r}}}: {target} does not exist on this host "
                "and the sandbox's root is the host's, read-only: a target must exist, or lie under /tmp, "
                "/var/tmp, /run, $HOME, the rootdir or a writable= place (or the test runs in an image)"
            )


def _make_named_volumes(state: SessionState, items: list[pytest.Item]) -> None:
    """Named volumes are made on first use: before the zygote, whose sandboxes mount them as they are built."""
    for name in sorted({s for i in items for s, _, _ in getattr(i.stash.get(SPEC_KEY, None), "volumes", ())}):
        if is_named(name):
            state.volumes.ensure(name)


def _open_keep_dir(state: SessionState) -> None:
    """--sandbox-keep: image tests' read/write layers go to the store, where a failed one is kept."""
    if state.keep == "none" or not state.images or state.keep_dir:
        return
    if state.store.filesystem() == "overlay":
        state.keep = "none"
        warnings.warn(
            pytest.PytestWarning(
                f"pytest-sandbox: --sandbox-keep ignored: the image store {state.store.root} is on overlayfs, "
                "which cannot hold a read/write layer (put it elsewhere with --sandbox-store)"
            ),
            stacklevel=1,
        )
        return
    state.keep_dir = state.store.session_containers(os.getpid())
    state.keep_fd = os.open(state.keep_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def zygote_for(item: pytest.Item, state: SessionState) -> Zygote:
    """The zygote that can run ``item``: the current one, or a new one forked from pytest as it is now."""
    zyg = state.zygote
    if zyg is not None and (zyg.epoch != state.parent_epoch or item.nodeid not in zyg.nodeids or not zyg.alive()):
        zyg.close()
        zyg = state.zygote = None
    if zyg is not None:
        return zyg
    pod = ensure_pod(state, [item]) if state.pod_needed else state.pod  # first: the zygote joins its network
    items = {i.nodeid: i for i in item.session.items} | {item.nodeid: item}
    _make_named_volumes(state, list(items.values()))
    paths = _zygote_paths(item, state)
    state.scope_sandboxes = paths.scope_sandboxes
    namespaces = Namespaces(
        user=state.userns_fd if state.userns_fd >= 0 else None,
        pod_net=pod.zygote.netns if pod is not None else None,
        pod_hosts=hosts_text(pod.names, pod.bridged) if pod is not None else "",
        pod_bridged=pod.bridged if pod is not None else False,
    )
    _open_cgroup_session(state)
    # faulthandler's watchdog thread would not exist in the fork, whose first dump_traceback_later then
    # waits for it forever: stop it here. A sandboxed test's wrappers never run in pytest (_StraightToTheSandbox),
    # the sandbox arms its own.
    faulthandler.cancel_dump_traceback_later()
    zyg = state.zygote = Zygote(
        items,
        SPEC_KEY,
        paths,
        state.parent_epoch,
        Limits(state.backend, state.cgroup_session, state.accounting),
        namespaces,
    )
    _remember_user_namespace(state, zyg)
    state.scope_sandboxes = zyg.scope_sandboxes
    return zyg


def ensure_pod(state: SessionState, items: list[pytest.Item]) -> Pod:
    """The session's pod: a zygote of its own whose network namespace its services share, started once."""
    if state.pod is not None:
        return state.pod
    if not items:
        raise ServiceError("services need a collected test to start from")
    item = items[0]
    launches = {}
    refused: dict[str, str] = {}
    definitions = _pod_definitions(state, str(item.config.rootpath))
    for name, definition in definitions.items():
        why = _image_refusal(state, definition)
        if why:
            refused[name] = f"{definition.where}: {why}"
            continue
        for source, _target, _mode in definition.spec.volumes:
            if is_named(source):
                state.volumes.ensure(source)
        launches[name] = ServiceLaunch(
            _stressed(definition.spec, state.stress),
            ServiceCommand(
                argv=definition.command,
                setup=definition.setup,
                fresh_when_empty=tuple(t for s, t, _ in definition.spec.volumes if is_named(s)),
                notify=uses_notify(definition.readiness),
            ),
        )
    bridged = state.pod_network != "loopback" and bool(definitions)  # auto: the pod zygote tries
    paths = dataclasses.replace(_zygote_paths(item, state), scope_sandboxes=False)
    _open_cgroup_session(state)
    faulthandler.cancel_dump_traceback_later()
    zyg = Zygote(
        {i.nodeid: i for i in item.session.items} | {item.nodeid: item},
        SPEC_KEY,
        paths,
        -1,
        Limits(state.backend, state.cgroup_session, state.accounting),
        Namespaces(
            user=state.userns_fd if state.userns_fd >= 0 else None,
            pod_hosts=hosts_text(list(definitions), bridged),
            pod_names=tuple(sorted(definitions)),
            pod_bridged=bridged,
            pod_fallback_hosts=hosts_text(list(definitions), False) if state.pod_network == "auto" else None,
            is_pod=True,
        ),
        launches,
    )
    _remember_user_namespace(state, zyg)
    try:
        records = Records(state.store.ensure().root, str(item.config.rootpath))
        worker = getattr(item.config, "workerinput", None)  # xdist: session services once per run
        shared = None
        if worker is not None:
            run_dir = os.path.join(_xdist_run_dir(state, str(worker["testrunuid"])), "services")
            shared = SharedServices(run_dir, str(worker["workerid"]))
        state.pod = Pod(zyg, definitions, state.volumes, records, refused, shared, zyg.pod_bridged)
    except BaseException:
        zyg.close()
        raise
    return state.pod


def _stressed(spec: SandboxSpec, stress: dict[str, Any]) -> SandboxSpec:
    """A service under ``--sandbox-stress``: its memory, cpus and pids limits are the stress run's too (a flaky
    test is often a slow service); its tests' timeout is not a service's."""
    changes = {name: value for name, value in stress.items() if name in ("memory", "cpus", "pids")}
    return dataclasses.replace(spec, **changes) if changes else spec


def _pod_definitions(state: SessionState, rootdir: str) -> dict[str, ServiceDefinition]:
    """The services the pod can start: those the selected tests use, and any other defined (a test may ask
    for one with ``request.getfixturevalue``) whose host paths exist."""
    found = {}
    for name, definition in REGISTRY.items():
        with contextlib.suppress(pytest.UsageError):
            found[name] = resolved(definition, rootdir)
    return found | state.services


def _image_refusal(state: SessionState, definition: ServiceDefinition) -> str:
    """Why a service's image cannot run it (empty: it can): it failed to build, or was not built."""
    image = definition.spec.image
    if image is None:
        return ""
    if image in state.image_errors:
        return state.image_errors[image]
    if image not in state.images:
        return f"image={image!r} was not prepared for this session"
    return ""


def _zygote_paths(item: pytest.Item, state: SessionState) -> SessionPaths:
    factory = getattr(item.config, "_tmp_path_factory", None)
    if state.hermetic:  # each test a process of the session's sandbox, over a layer of its helper's if it has one
        if factory is not None:
            with contextlib.suppress(OSError):  # made before the forks, as on the host; else the test asking says why
                factory.getbasetemp()
        base_paths = session_paths(item.config, None)
        layered = tuple(output for output, _ in state.layers.uppers) if state.layers is not None else ()
        return dataclasses.replace(
            base_paths,
            scope_sandboxes=state.scope == "test",
            in_session=True,
            layers=state.layers,
            outputs=tuple(dict.fromkeys([*state.outputs, *layered])),
        )
    basetemp = str(factory.getbasetemp()) if factory is not None else None
    _open_keep_dir(state)
    base_paths = session_paths(item.config, basetemp)
    return dataclasses.replace(
        base_paths,
        scope_sandboxes=scope_sandboxes(state, base_paths.writable),
        images=dict(state.images),
        keep_dir=state.keep_dir,
        outputs=state.outputs,
        volumes_root=state.volumes.root,
        store_private=store_private(state),
    )


def store_private(state: SessionState) -> tuple[str, ...]:
    """The store's lock files and records (volumes, staging and xdist records, store.lock): masked in every
    sandbox, where the store is in the host view, so that no test can hold one of their locks."""
    return (state.volumes.root, state.store.tmp_dir, os.path.join(state.store.root, "store.lock"))


def _open_cgroup_session(state: SessionState) -> None:
    if state.cgroup_session is None and isinstance(state.backend, cgroups.CgroupBackend):
        try:
            state.cgroup_session = state.backend.open_session()
        except OSError as exc:
            raise SandboxError(f"cannot create the session cgroup: {exc}") from None
        state.volumes.watcher = state.cgroup_session.watch


def _remember_user_namespace(state: SessionState, zyg: Zygote) -> None:
    """The first zygote's user namespace is the session's: kept open for the zygotes after it."""
    if state.userns_fd < 0:
        state.userns_fd = os.dup(zyg.userns)


def scope_sandboxes(state: SessionState, writable: Iterable[str]) -> bool:
    """At --sandbox-scope=test, the tests of a spec share a scope sandbox (fixtures keep their scopes), each
    test in a fork over a throwaway layer. Not where every sandbox is measured (--sandbox-durations,
    --sandbox-repeat: a test's usage is its own sandbox's) or is to be fresh (stress), nor where a writable
    place is on overlayfs already (a layer over the scope's overlay would pass the kernel's stacking limit)."""
    if state.scope != "test" or state.accounting or state.stress:
        return False
    return not any(mounts.on_overlayfs(path) for path in writable if os.path.isdir(path))


def drop_zygote(state: SessionState) -> None:
    """The zygote died: the next sandboxed test starts a new one."""
    if state.zygote is not None:
        state.zygote.close()
        state.zygote = None


def keep_container(state: SessionState, item: pytest.Item, spec: SandboxSpec, cid: str) -> None:
    """Keep a failed image test's layer. ``cid`` comes from the test process: a test without a keepable
    layer that claims one gets nothing, and the store checks the id and the layer before it moves anything."""
    if state.keep_fd < 0 or spec.image is None or spec.image not in state.image_records:
        return
    try:
        state.store.keep_container(state.keep_fd, cid, state.image_records[spec.image], item.nodeid, spec.hostname)
    except (OSError, SandboxError) as exc:
        warnings.warn(pytest.PytestWarning(f"pytest-sandbox: cannot keep {item.nodeid}'s layer: {exc}"), stacklevel=1)


def close(state: SessionState) -> None:
    """End of the session: every sandbox and service gone, then the cgroups, then the layers of tests
    that passed."""
    if state.shared is not None:
        state.shared.end()
        state.shared = None
    drop_zygote(state)
    if state.pod is not None:
        state.pod.close()
        state.pod = None
    if state.userns_fd >= 0:
        os.close(state.userns_fd)
        state.userns_fd = -1
    if state.cgroup_session is not None:
        state.cgroup_session.close()
        state.cgroup_session = None
    if state.keep_fd >= 0:
        os.close(state.keep_fd)
        state.keep_fd = -1
    if state.xdist_run_fd >= 0:
        os.close(state.xdist_run_fd)
        state.xdist_run_fd = -1
    if state.keep_dir:
        remove_tree(state.keep_dir)  # follows no symlink a sandbox left in it
        state.keep_dir = ""
