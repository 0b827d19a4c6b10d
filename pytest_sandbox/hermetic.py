"""``--sandbox=hermetic`` and ``--sandbox=all``: the whole pytest run in one sandbox; the pytest process only
supervises.

The supervisor takes over before pytest loads any ``conftest.py`` (the outermost wrapper of
``pytest_load_initial_conftests``): it forks a zygote, which holds nothing of the project, and asks it
for one sandbox whose process starts pytest again, in a fresh interpreter, with the same command line
(``runtime/session_process.py``). That pytest loads the conftest files, collects, runs every fixture,
test and plugin; its terminal output comes to the supervisor's stdout and stderr (through a pseudo-terminal
where those are terminals, so colours, width and progress are a plain run's). What it wrote under the
declared outputs (pytest's cache, hypothesis's database, the report files and coverage data the command
line asks for, ``sandbox_outputs``) reaches the host at its end; nothing else it writes does. The
supervisor exits with its exit code. Not one line of the project's code runs in the supervisor.

``--sandbox=all`` takes this path too, where the session's one sandbox can hold the run. Where it cannot, it
falls back to collecting on the host (each test still sandboxed): before the start, for settings that need a
sandbox per test (limits, an image, volumes, --sandbox-repeat...); at collection, for a test whose marker needs a
sandbox of its own or uses a service. pytest there then says so on its collection line and the supervisor
ends the session's sandbox, throws its output away and lets the pytest process go on as a plain one.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import select
import shlex
import signal
import site
import socket
import stat
import subprocess
import sys
import tempfile
import termios
import threading
import time
import types
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

from . import outputs, probe, protocol, settings
from . import session as _session
from .errors import SandboxError
from .linux import syscalls
from .linux.mounts import SCRATCH_PLACES, is_under
from .runtime import session_process
from .runtime.handle import Zygote
from .runtime.zygote import Limits, Namespaces, SessionPaths
from .services.definition import used_by
from .session import SPEC_KEY, SessionState
from .spec import MARKER, SandboxSpec, validate

ENV = settings.HERMETIC_ENV  # "1" in the session's sandbox: the pytest there is the hermetic session
MODE = "hermetic"
WHERE = "--sandbox=hermetic"
FALLS_BACK = "all"  # the mode that runs hermetically where it can and collects on the host where it cannot
WHERE_ALL = f"--sandbox={FALLS_BACK}"
FELL_BACK = pytest.StashKey[str]()  # why this --sandbox=all run collects on the host
_COLLECTS_ON_THE_HOST_ENV = "PYTEST_SANDBOX_HOST_COLLECTION"  # the pid of a --sandbox=all pytest that fell back
_HEADER_ENV = "PYTEST_SANDBOX_HEADER"  # header lines the supervisor found for the session's pytest (JSON)
_HEADER = pytest.StashKey[list[str]]()
_WORKER_FELL_BACK = "sandbox_fall_back"  # an xdist worker's workeroutput key: the reason
_COLLECTION_MESSAGE_MAX = 4096  # a datagram on the collection line: a reason is a line of text
_HOLD_MAX = 4 << 20  # output held before collection is done: past this much it is shown
_HOLD_PAUSE = 1.5  # seconds without output, while held, after which a prompt is shown
# pytest again, in the sandbox: with the supervisor's sys.path (how it was started decides it: a script,
# python -m pytest) and its argv[0]; the command line follows. Its __main__ is the supervisor's as tests see
# it: the file (a script, pytest's __main__.py) and, for python -m, the module's spec (multiprocessing's
# spawn starts its children from them; anyio's tests patch __main__.__file__). pytest_sandbox is imported by
# name only after pytest.main: before, pytest could not rewrite the asserts of a plugin imported already and
# warns (an error under filterwarnings = error).
_BOOTSTRAP = (
    "import sys; del sys.path[0]; import json; sys.path[:] = json.loads(sys.argv[1]); "
    "__file__, _spec = json.loads(sys.argv[2]); sys.argv = sys.argv[3:]; "
    "import importlib.util, pytest\n"
    "try: __spec__ = _spec and importlib.util.find_spec(_spec)\n"
    "except (ImportError, ValueError): __spec__ = None  # run from a directory or zip: its __main__, found by file\n"
    "__package__ = __spec__ and __spec__.parent; del _spec\n"
    "if __file__ is None: del __file__\n"
    "code = pytest.main(); from pytest_sandbox.hermetic import exit_as_python_would; exit_as_python_would(code)"
)
# Report and data files the well-known plugins write where their options say: (option dest, plugin).
_REPORT_FILES = (
    "xmlpath",
    "report_log",
    "htmlpath",
    "json_report_file",
    "allure_report_dir",
    "cucumber_json_path",
    "md_report_output",
)
_WALK_MAX = 20000  # directories looked at for test modules (syrupy's snapshot directories)
_COVERAGE_REPORTS = {"html": "htmlcov", "xml": "coverage.xml", "json": "coverage.json", "lcov": "coverage.lcov"}


def inside() -> bool:
    """This pytest is the hermetic session's, in its sandbox."""
    return os.environ.get(ENV) == "1"


def out_of_the_tests_reach() -> None:
    """pytest in the session's sandbox (and each xdist worker there), before any conftest.py: not dumpable, so a
    test, a process of the same user, cannot trace it or open its ``/proc/PID/mem`` to change the run's results
    (its exec made it dumpable; the zygote it forks inherits this, each test process is dumpable again)."""
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)


def wanted(config: pytest.Config) -> str | None:
    """The mode, ``--sandbox=hermetic`` or ``--sandbox=all`` (or the ini's ``sandbox``), in the pytest that is
    to supervise; None for the others."""
    if inside():
        return None
    mode = getattr(config.known_args_namespace, "sandbox_mode", None)
    if mode is None:
        mode = config.getini("sandbox") or None
    if mode == FALLS_BACK and os.environ.get(_COLLECTS_ON_THE_HOST_ENV) == str(os.getppid()):
        return None  # an xdist worker of a --sandbox=all run that collects on the host: its controller decided
    return mode if mode in (MODE, FALLS_BACK) else None


def supervise(config: pytest.Config, mode: str = MODE) -> int | None:
    """Run the session in its sandbox and relay it; pytest's exit code. None: ``--sandbox=all`` falls back to
    collecting on the host (the reason is in ``config.stash[FELL_BACK]``)."""
    # The settings are read as everywhere else (settings.py); pytest fills config.option only after this hook
    # (it is put back as it was where --sandbox=all goes on on the host).
    as_it_was = dict(vars(config.option))
    vars(config.option).update(vars(config.known_args_namespace))
    may_fall_back = mode == FALLS_BACK
    code = _supervise(config, may_fall_back)
    if code is None:
        vars(config.option).clear()
        vars(config.option).update(as_it_was)
    return code


def end_the_program(code: int) -> None:
    """Once the session's sandbox is gone, the supervisor exits as that pytest did. Only where pytest is the
    program (its command-line entry point): an in-process run (``pytest.main``) gets SystemExit, as before."""
    if _pytest_is_the_program():
        exit_as_python_would(code)


def exit_as_python_would(code: int) -> NoReturn:
    """Exit as Python does at the end of a program (non-daemon threads waited for, atexit handlers run, output
    flushed), less freeing every object one by one: with pytest's plugins loaded that takes a fifth to a
    third of a second, in the session's pytest and again in the supervisor, after the summary is out."""
    main = threading.main_thread()
    while running := [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]:
        for thread in running:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


def _pytest_is_the_program() -> bool:
    """Whether pytest's command-line entry point (``_console_main`` from pytest 9.1, ``console_main`` before)
    called this: then the process ends when pytest does."""
    import _pytest.config

    entries = {getattr(getattr(_pytest.config, name, None), "__code__", None) for name in _ENTRY_POINTS}
    entries.discard(None)
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in entries:
            return True
        frame = frame.f_back
    return False


_ENTRY_POINTS = ("_console_main", "console_main")


def _supervise(config: pytest.Config, may_fall_back: bool) -> int | None:
    probe.start_ahead()  # its child runs while the settings are read; its answer is heard first all the same
    try:
        anchors = output_anchors(config)
        state: SessionState | None = _session.configure(config)
        refused: pytest.UsageError | None = None
    except pytest.UsageError as exc:
        state, refused = None, exc
    finally:
        reason = probe.unavailable_reason()
    if reason is not None or state is None:
        if state is not None:
            _session.close(state)
        if reason is not None and may_fall_back:  # the host path applies sandbox_unavailable
            _fall_back(config, f"this host cannot build sandboxes: {reason}")
            return None
        if reason is not None:
            raise pytest.UsageError(f"{WHERE}: this host cannot build sandboxes: {reason} (see pytest-sandbox doctor)")
        if may_fall_back:  # the host path says what is wrong with the settings, as it always did
            _fall_back(config, "the settings are checked on the host")
            return None
        assert refused is not None
        raise refused
    try:
        # Once: which outputs the run declares (a walk of the rootdir for snapshots and regression data) and
        # which paths the user named; both the fallback's checks and the session's paths use them.
        declared = tuple(dict.fromkeys([*state.outputs, *plugin_outputs(config)]))
        given = _given_by_the_user(config)
        why = _why_not_here(config, state, anchors, declared, given) if may_fall_back else None
        if why is not None:
            _fall_back(config, why)
            return None
        return _run(config, state, anchors, declared, given, may_fall_back)
    finally:
        _session.close(state)


def _run(
    config: pytest.Config,
    state: SessionState,
    anchors: tuple[str, ...],
    declared: tuple[str, ...],
    given: frozenset[str],
    may_fall_back: bool,
) -> int | None:
    _fill_closed_stdio()
    _refuse_project_plugins(config, anchors)
    ignored = [name.replace("sandbox_hide", "sandbox_hide (its ! entries)") for name in state.ignored]
    if ignored:
        _say(
            f"pytest-sandbox: {WHERE}: ignored the project's {', '.join(ignored)}: from the ini file or its "
            "addopts, they would widen the session's sandbox; give them on the command line (-o NAME=VALUE) to use them"
        )
    spec = session_spec(state)
    _session.check_volume_targets(config, "sandbox_volumes", spec)
    paths = _paths(config, state, anchors, declared, given)
    # What the session's pytest cannot see from in there (its rootdir is an overlay's), for its header.
    header = json.dumps(probe.root_in_a_foreign_tree(str(config.rootpath)))
    launch = session_process.SessionLaunch(
        spec=spec, argv=tuple(inner_command(config)), env=((ENV, "1"), (_HEADER_ENV, header)), config=config
    )
    # Under xdist no prompt at collection can wait for the user (workers have no terminal), and a pause there
    # is workers starting: held output is shown only when collection is done.
    option = config.option
    xdist = bool(getattr(option, "numprocesses", None)) or getattr(option, "dist", "no") not in ("no", None)
    try:
        _session._open_cgroup_session(state)
        with state.volumes.held(spec.volumes):
            limits = Limits(state.backend, state.cgroup_session, False)
            zygote = Zygote({}, SPEC_KEY, paths, 0, limits, Namespaces(), session=launch)
            try:
                code, fell_back = _relay(zygote, paths.outputs, anchors, may_fall_back, show_prompts=not xdist)
            finally:
                zygote.close()
                state.volumes.clear_setid_bits(spec.volumes)
    except SandboxError as exc:
        _say(f"pytest-sandbox: {WHERE}: {exc}")
        return int(pytest.ExitCode.INTERNAL_ERROR)
    if fell_back is not None:
        _fall_back(config, fell_back)
        return None
    return code


def _fill_closed_stdio() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null: the pipes and terminal made next must not take
    their numbers (the relay would read its own output as typed input)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _fall_back(config: pytest.Config, reason: str) -> None:
    """--sandbox=all goes on on the host: the pytest process loads conftest.py and collects, as a plain run;
    so do its xdist workers (its children), which would otherwise each try the session's sandbox again."""
    config.stash[FELL_BACK] = _printable(reason)
    os.environ[_COLLECTS_ON_THE_HOST_ENV] = str(os.getpid())


def _printable(text: str) -> str:
    """A reason from the session's sandbox (the project's code could word it) as one printable line."""
    return "".join(c if c.isprintable() else "?" for c in text)[:500]


def _why_not_here(
    config: pytest.Config,
    state: SessionState,
    anchors: tuple[str, ...],
    declared: tuple[str, ...],
    given: frozenset[str],
) -> str | None:
    """Why ``--sandbox=all`` cannot run this session in one sandbox (it then collects on the host, as a plain
    run does, and sandboxes each test): settings that need a sandbox per test or another root, outputs the
    session's sandbox cannot hand over, or the project's own code already imported as a plugin."""
    if settings.choice(config, "sandbox_collection") == "host":
        return "sandbox_collection = host"
    plugin = _project_plugin(config, anchors)
    if plugin is not None:
        return f"the plugin {plugin} is this project's code, imported before pytest-sandbox could take over"
    per_test = [option for option, given in _per_test_options(state).items() if given]
    if per_test:
        return f"{per_test[0]} needs a sandbox per test"
    try:
        spec = validate(dict(state.defaults), WHERE_ALL)
    except pytest.UsageError:
        return "the settings are checked on the host"
    per_test_settings = {
        "sandbox limits": ", ".join(spec.limits),
        "sandbox_image": spec.image or "",
        "sandbox_volumes": ", ".join(target for _source, target, _mode in spec.volumes),
        "sandbox_network": spec.network if spec.network == "pod" else "",
    }
    for setting, value in per_test_settings.items():
        if value:
            return f"{setting} ({value}): each test needs a sandbox of its own"
    for output in declared:
        try:
            _check_output(output, anchors, given)
        except pytest.UsageError as exc:
            return str(exc).removeprefix(f"{WHERE}: ")
    return None


def _refuse_project_plugins(config: pytest.Config, anchors: tuple[str, ...]) -> None:
    """pytest imports ``-p`` plugins (the ini's ``addopts`` too) and entry points before any hook of this
    plugin runs: if one of them is the project's own code (a module of the rootdir or of the directory pytest
    started in, not an installed package), it has run in this process already. Say so and stop, rather than
    go on as if the run were contained. Best effort: code that ran could have hidden itself."""
    plugin = _project_plugin(config, anchors)
    if plugin is not None:
        raise pytest.UsageError(
            f"{WHERE}: the plugin {plugin} is this project's code and was imported before pytest-sandbox "
            "could take over (a -p option, the ini's addopts, or an entry point): it has run on the host. "
            "Plugins loaded that way cannot be contained; remove them from addopts, or do not install the "
            "project as a pytest plugin"
        )


def _project_plugin(config: pytest.Config, anchors: tuple[str, ...]) -> str | None:
    """A plugin imported already that is the project's own code (a module under an anchor, not installed):
    its name and file."""
    installed = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()]
    installed += [os.path.realpath(path) for path in installed]
    places = [*anchors]
    places += [os.path.realpath(place) for place in places]
    ours = os.path.dirname(__file__)

    def trusted(path: str) -> bool:
        return is_under(path, ours) or any(is_under(path, prefix) for prefix in installed)

    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if not isinstance(file, str):
            continue
        path = os.path.abspath(file)
        if trusted(path):
            continue  # realpath (a stat per component) only for the few that are not: 20-50 ms for them all
        real = os.path.realpath(file)
        if trusted(real):
            continue
        if any(is_under(candidate, place) for candidate in (path, real) for place in places):
            name = config.pluginmanager.get_name(plugin) or getattr(plugin, "__name__", "?")
            return f"{name} ({file})"
    return None


def session_spec(state: SessionState) -> SandboxSpec:
    """The session's sandbox: the session's defaults (ini and command line), as an unmarked test's would be.
    What needs a sandbox per test, or another root than the host view, is refused before anything runs."""
    for option, given in _per_test_options(state).items():
        if given:
            raise pytest.UsageError(f"{WHERE} runs the whole session in one sandbox; {option} needs a sandbox per test")
    spec = validate(dict(state.defaults), WHERE)
    if "hostname" not in state.defaults:  # what pytest records there (junit XML's hostname) names the host
        with contextlib.suppress(pytest.UsageError):
            spec = dataclasses.replace(spec, hostname=validate({"hostname": socket.gethostname()}, WHERE).hostname)
    if spec.image is not None:
        raise pytest.UsageError(
            f"{WHERE}: sandbox_image = {spec.image}: the session's sandbox is the host view (read-only) with its "
            "Python; an image is for a test's commands (sandbox.run) outside this mode"
        )
    if spec.network == "pod":
        raise pytest.UsageError(f"{WHERE}: network=pod: services are not available in this mode; allowed: none, host")
    unenforced = [limit for limit in spec.limits if limit not in state.backend.enforced]
    _session.refuse_unenforceable(state, unenforced)
    if unenforced:
        _say(f"pytest-sandbox: {state.backend.describe()} cannot enforce {', '.join(unenforced)} for the session")
    return spec  # its named volumes are made as the session holds them (VolumeStore.held)


def _per_test_options(state: SessionState) -> dict[str, bool]:
    return {
        "--sandbox-repeat": state.repeat > 1,
        "--sandbox-stress": bool(state.stress),
        "--sandbox-durations": state.durations is not None,
        "--sandbox-keep": state.keep != "none",
    }


def _paths(
    config: pytest.Config,
    state: SessionState,
    anchors: tuple[str, ...],
    declared: tuple[str, ...],
    given: frozenset[str],
) -> SessionPaths:
    """What the session's sandbox shows and keeps writable, and its outputs (checked: see output_anchors)."""
    base = _session.session_paths(config, None)
    basetemp = getattr(config.option, "basetemp", None)
    # pytest removes and makes basetemp again: its directory is the writable place, not it. Without one, pytest
    # makes it in $TMPDIR (or /tmp), where the sandbox has a fresh tmpfs: a $TMPDIR below it must be there.
    # pytest's own tests (pytester) name the temporary root in $PYTEST_DEBUG_TEMPROOT, as pytest reads it.
    temproot = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    parent = os.path.dirname(os.path.abspath(basetemp)) if basetemp else os.path.realpath(temproot)
    fresh = parent in (*SCRATCH_PLACES, "/")  # /tmp itself stays the sandbox's own
    if os.path.isdir(parent) and not fresh and not any(is_under(parent, place) for place in base.writable):
        base = dataclasses.replace(base, writable=(*base.writable, parent))
    base = dataclasses.replace(base, needed=tuple(dict.fromkeys([*base.needed, *_import_places()])))
    for output in declared:
        _check_output(output, anchors, given)
    return dataclasses.replace(
        base,
        outputs=declared,
        volumes_root=state.volumes.root,
        store_private=_session.store_private(state),
        scope_sandboxes=_session.scope_sandboxes(state, base.writable),  # a layer helper for each test's layer
    )


def _import_places() -> list[str]:
    """Where the code this interpreter imports lies besides ``sys.path``: the packages imported so far (an
    editable install's finder maps them anywhere, /var/tmp included, where the sandbox has a fresh tmpfs) and
    every editable finder's mapping. pytest in the sandbox is a new interpreter: it must find them again."""
    places: list[str] = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or not isinstance(file, str) or not os.path.isabs(file):
            continue
        places.append(os.path.dirname(file))  # a top-level module's directory, or a package's own
    for finder in sys.meta_path:
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "") or ""), "MAPPING", None)
        if isinstance(mapping, dict):  # setuptools' editable finder: package name -> its directory
            places += [path for path in mapping.values() if isinstance(path, str) and os.path.isabs(path)]
    return [place for place in dict.fromkeys(places) if os.path.isdir(place)]


def output_anchors(config: pytest.Config) -> tuple[str, ...]:
    """Where outputs may lie: the rootdir and the directory pytest was started in (places the user chose by
    starting pytest there; the ini file, addopts and the project's files are the project's, not the user's)."""
    return tuple(dict.fromkeys([str(config.rootpath), str(config.invocation_params.dir)]))


def _check_output(output: str, anchors: tuple[str, ...], given: frozenset[str]) -> None:
    """An output lies in an anchor, outside any ``.git`` directory (hooks there run at the next commit), and
    reaches no symlink below the anchor (a project's symlink would send what the run writes elsewhere). One
    outside the rootdir (in the start directory, which may be $HOME) is one the user named (``given``)."""
    anchor = max((place for place in anchors if is_under(output, place)), key=len, default=None)
    if anchor is None:
        raise pytest.UsageError(
            f"{WHERE}: the output {output} lies outside the rootdir and the directory pytest was started in "
            f"({', '.join(anchors)}): write it under one of them"
        )
    rootdir, start = anchors[0], anchors[-1]
    if not is_under(output, rootdir) and output not in given and output != os.path.join(start, ".hypothesis"):
        raise pytest.UsageError(
            f"{WHERE}: the output {output} lies outside the rootdir {rootdir} and was named by the project (its "
            "ini file or addopts), not on your command line: only you may name outputs outside the rootdir"
        )
    if output == anchor:
        raise pytest.UsageError(f"{WHERE}: the output {output} is all of {anchor}: name a file or directory there")
    parts = os.path.relpath(output, anchor).split("/")
    if ".git" in parts:
        raise pytest.UsageError(f"{WHERE}: the output {output} lies in a .git directory, which a run may not write")
    if any(is_under(output, prefix) for prefix in {sys.prefix, sys.exec_prefix, os.path.realpath(sys.prefix)}):
        raise pytest.UsageError(f"{WHERE}: the output {output} lies in this Python's environment ({sys.prefix})")
    for depth in range(0, len(parts) + 1):
        step = os.path.join(anchor, *parts[:depth])
        if os.path.isfile(os.path.join(step, "pyvenv.cfg")):
            raise pytest.UsageError(f"{WHERE}: the output {output} lies in the virtual environment {step}")
        if depth and os.path.islink(step):
            raise pytest.UsageError(
                f"{WHERE}: the output {output} goes through the symlink {step} (to {os.readlink(step)}): outputs are "
                "written without following symlinks; name the place it points to, inside the rootdir"
            )


def _given_by_the_user(config: pytest.Config) -> frozenset[str]:
    """The paths the user's own command line and $PYTEST_ADDOPTS name (not the ini file or its addopts, the
    project's): each argument, the value after its ``=``, a coverage report's path after ``KIND:``, relative
    to the start directory; and the files coverage and pytest-benchmark write there when the user asked."""
    here = str(config.invocation_params.dir)
    args = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *map(str, config.invocation_params.args)]
    values: set[str] = set()
    for arg in args:
        values |= {arg, arg.split("=", 1)[-1], arg.rsplit("=", 1)[-1]}
    values |= {value.split(":", 1)[-1] for value in values}
    if any(arg.startswith("--cov") for arg in args):
        values |= {os.environ.get("COVERAGE_FILE") or ".coverage", *_COVERAGE_REPORTS.values()}
    if any(arg.startswith(("--benchmark-autosave", "--benchmark-save")) for arg in args):
        values.add(".benchmarks")
    return frozenset(os.path.normpath(os.path.join(here, os.path.expanduser(value))) for value in values if value)


def plugin_outputs(config: pytest.Config) -> list[str]:
    """The files the command line asks plugins to write: junit XML, report logs, HTML and JSON reports,
    coverage data and reports, pytest-benchmark's saved runs. Relative paths are the invocation directory's."""
    options = config.option
    here = str(config.invocation_params.dir)
    found: list[str] = []
    for dest in _REPORT_FILES:
        value = getattr(options, dest, None)
        if dest == "json_report_file" and not getattr(options, "json_report", False):
            continue
        if isinstance(value, str) and value:
            found.append(value)
    html = getattr(options, "htmlpath", None)
    if isinstance(html, str) and html and not getattr(options, "self_contained_html", False):
        found.append(os.path.join(os.path.dirname(html), "assets"))  # pytest-html's style sheet, beside it
    if getattr(options, "cov_source", None):
        found.append(os.environ.get("COVERAGE_FILE") or ".coverage")
        for kind, path in (getattr(options, "cov_report", None) or {}).items():
            if kind in _COVERAGE_REPORTS:
                found.append(path or _COVERAGE_REPORTS[kind])
    benchmark_json = getattr(options, "benchmark_json", None)
    if benchmark_json is not None:  # a path (pytest-benchmark 5) or a file opened for it (earlier: its name)
        found.append(os.fspath(benchmark_json) if isinstance(benchmark_json, os.PathLike) else benchmark_json.name)
    storage = getattr(options, "benchmark_storage", None)  # made at every start, saved runs go there
    if isinstance(storage, str) and (storage.startswith("file://") or "://" not in storage):
        path = os.path.normpath(os.path.join(here, os.path.expanduser(storage.removeprefix("file://"))))
        saving = getattr(options, "benchmark_autosave", False) or getattr(options, "benchmark_save", None)
        if saving or is_under(path, str(config.rootpath)):  # else an empty directory above the project: not
            found.append(path)  # worth refusing the run for (the user started pytest there, asking for nothing)
    snapshots = getattr(options, "update_snapshots", False) or getattr(options, "update_new_snapshots_only", False)
    regressions = config.pluginmanager.has_plugin("regressions")
    test_modules = list(_test_modules(str(config.rootpath))) if snapshots or regressions else []  # one walk
    if snapshots:
        dirname = getattr(options, "snapshot_dirname", None) or "__snapshots__"
        found.extend(os.path.join(directory, dirname) for directory, _ in test_modules)
    if regressions:  # pytest-regressions writes missing expected files, and all with --force-regen, in each test
        for directory, modules in test_modules:  # module's data directory (pytest-datadir's original_datadir)
            found.extend(os.path.join(directory, module[: -len(".py")]) for module in modules)
    return [os.path.normpath(os.path.join(here, os.path.expanduser(path))) for path in found]


def _test_modules(rootdir: str) -> Iterator[tuple[str, list[str]]]:
    """Directories under ``rootdir`` holding test modules (``test_*.py``, ``*_test.py``), with those modules'
    names: syrupy keeps its snapshots beside them, pytest-regressions its data; hidden directories, caches and
    virtual environments are skipped, and the walk is bounded."""
    for seen, (directory, subdirectories, files) in enumerate(os.walk(rootdir)):
        if seen > _WALK_MAX:
            return
        subdirectories[:] = [
            name
            for name in subdirectories
            if not name.startswith(".")
            and name not in ("__pycache__", "node_modules")
            and not os.path.exists(os.path.join(directory, name, "pyvenv.cfg"))
        ]
        modules = [name for name in files if name.endswith(".py") and name.startswith("test")]
        modules += [name for name in files if name.endswith("_test.py") and not name.startswith("test")]
        if modules:
            yield directory, sorted(modules)


def inner_command(config: pytest.Config) -> list[str]:
    """The interpreter (with this one's flags: -X, -W, -O...) running pytest with this command line."""
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    args = [str(arg) for arg in config.invocation_params.args]
    argv0 = sys.argv[0] if sys.argv else "pytest"
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    started_as = [getattr(main, "__file__", None), getattr(spec, "name", None)]
    return [sys.executable, *flags, "-c", _BOOTSTRAP, json.dumps(sys.path), json.dumps(started_as), argv0, *args]


def check_items(config: pytest.Config, items: list[pytest.Item], defaults: dict[str, Any], falls_back: bool) -> None:
    """In the session's sandbox, once each test's spec is known: a test whose marker (or a pytest_sandbox_spec
    hook) asks for other settings than the session's, or that uses services, would need a sandbox of its own.
    Under --sandbox=hermetic that is a usage error naming it before any test runs; under --sandbox=all
    (``falls_back``) the run goes back to the host."""
    reason = _needs_its_own_sandbox(items, defaults, falls_back)
    if reason is None:
        if not falls_back:
            return
        if not hasattr(config, "workerinput"):  # xdist's controller says so when its workers have collected
            _collection_line_says(config, {"type": "collected"})
        return
    if not falls_back:
        raise pytest.UsageError(reason)
    if hasattr(config, "workerinput"):  # an xdist worker: its controller hears it (_CollectionLine)
        config.workeroutput[_WORKER_FELL_BACK] = reason  # type: ignore[attr-defined]
    else:
        _collection_line_says(config, {"type": "fall-back", "reason": reason})
    # Not INTERRUPTED: xdist takes a worker that ends so for a crash and starts another in its place.
    pytest.exit("pytest-sandbox: --sandbox=all goes on on the host", returncode=pytest.ExitCode.USAGE_ERROR)


def _needs_its_own_sandbox(items: list[pytest.Item], defaults: dict[str, Any], falls_back: bool) -> str | None:
    """The first test whose spec (its marker's, as a ``pytest_sandbox_spec`` hook left it) is not the session's,
    or that uses a service: why it needs a sandbox of its own (for --sandbox=all's header, or hermetic's error)."""
    where = WHERE_ALL if falls_back else WHERE
    session = validate(dict(defaults), where)
    for item in items:
        used = used_by(item)
        if used:
            return f"{item.nodeid}: uses the service {used[0].name!r}: services are not available under {where}"
        marker = f"{item.nodeid}: @pytest.mark.{MARKER}"
        spec = item.stash.get(SPEC_KEY, None)
        if spec is not None and spec != session:
            fields = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(session, f.name)]
            asked = ", ".join(f"{name}={getattr(spec, name)!r}" for name in fields)
            if falls_back:
                return f"{marker}: {asked} needs a sandbox of the test's own"
            return (
                f"{marker}: {asked}: {WHERE} runs every test in the session's one sandbox, with the session's "
                "settings (ini and command line); this needs a sandbox of the test's own: run it without "
                f"{WHERE}, or give the session these settings"
            )
    return None


_COLLECTION_LINE = pytest.StashKey[socket.socket]()


def take_what_the_supervisor_gave(config: pytest.Config) -> None:
    """In the session's sandbox, before any conftest.py: the collection line (--sandbox=all) and the header
    lines, taken out of the environment (nothing started from here sees them)."""
    try:
        lines = json.loads(os.environ.pop(_HEADER_ENV, "[]"))
    except ValueError:
        lines = []
    config.stash[_HEADER] = [_printable(str(line)) for line in lines] if isinstance(lines, list) else []
    _take_the_collection_line(config)


def forget_the_host_collection() -> None:
    """At the end of a run that collected on the host: its mark for its xdist workers goes (pytester runs a
    session in the test's process: the next one, or a subprocess it starts, must not read it as theirs)."""
    if os.environ.get(_COLLECTS_ON_THE_HOST_ENV) == str(os.getpid()):
        del os.environ[_COLLECTS_ON_THE_HOST_ENV]


def header_from_the_supervisor(config: pytest.Config) -> list[str]:
    return config.stash.get(_HEADER, [])


def _take_the_collection_line(config: pytest.Config) -> None:
    """In the session's sandbox of --sandbox=all, before any conftest.py: the line to the supervisor on which
    pytest says its collection is done, or that the run must go back to the host. Nothing started from here
    inherits it (xdist's workers, test processes)."""
    inherited = os.environ.pop(settings.COLLECTION_ENV, None)
    if not inherited:
        return
    try:
        fd = int(inherited)
        os.set_inheritable(fd, False)
        line = socket.socket(fileno=fd)
    except (ValueError, OSError):
        return
    config.stash[_COLLECTION_LINE] = line
    config.pluginmanager.register(_CollectionLine(config), "sandbox-collection-line")


def _collection_line_says(config: pytest.Config, message: dict[str, Any]) -> None:
    """Say it once; the line then closes (before any test process could be forked with it)."""
    line = config.stash.get(_COLLECTION_LINE, None)
    if line is None:
        return
    del config.stash[_COLLECTION_LINE]
    with contextlib.suppress(OSError), line:
        line.send(json.dumps(message).encode()[:_COLLECTION_MESSAGE_MAX])


class _CollectionLine:
    """xdist's controller in the session's sandbox of --sandbox=all: its workers collect, it speaks for them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logstart(self) -> None:
        _collection_line_says(self.config, {"type": "collected"})

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        reason = getattr(node, "workeroutput", {}).get(_WORKER_FELL_BACK)
        if isinstance(reason, str):
            _collection_line_says(self.config, {"type": "fall-back", "reason": reason})

    def pytest_sessionfinish(self) -> None:
        _collection_line_says(self.config, {"type": "collected"})


# -- relaying -------------------------------------------------------------------------------------


class _Stdio:
    """pytest's stdin, stdout and stderr in the sandbox. Where the supervisor's stdout is a terminal, a
    pseudo-terminal of the supervisor's (stderr shares it if that is a terminal too, and so does stdin, whose
    input the supervisor relays while it is in the foreground: --pdb and input() under -s work); else pipes.
    A stdin that is no terminal goes in as a pipe as it is, as a sealed copy if it is a file (a file's fd
    could be opened again for writing through /proc), else as /dev/null."""

    def __init__(self, hold: bool = False, show_prompts: bool = True) -> None:
        self.show_prompts = show_prompts
        self.held: list[tuple[int, bytes]] | None = [] if hold else None  # output kept back, in order
        self.held_bytes = 0
        self.last_held = time.monotonic()
        self.discarding = False  # a session that fell back: its output is the host run's to print
        self.sources: dict[int, int] = {}  # our read end -> the supervisor's fd it goes to
        self.theirs: list[int] = []
        self.master = -1  # the pseudo-terminal's, when there is one
        self.relay_stdin = False  # what the user types goes on to it
        self.ends_typed = 0  # ^D in a row with nothing typed between: past a few, the terminal is gone
        out = self._terminal() if os.isatty(1) else -1
        if out < 0:
            out_r, out = os.pipe2(os.O_CLOEXEC)
            self.sources[out_r] = 1
        if self.master >= 0 and os.isatty(2):
            err = os.dup(out)
        else:
            err_r, err = os.pipe2(os.O_CLOEXEC)
            self.sources[err_r] = 2
        if self.master >= 0 and os.isatty(0):
            stdin = os.dup(out)
            self.relay_stdin = True
        else:
            stdin = _stdin_copy()
        self.theirs = [stdin, out, err]

    def _terminal(self) -> int:
        """A pseudo-terminal like the user's: its pytest end, or -1 where none can be had (pipes then)."""
        try:
            self.master, slave = os.openpty()
        except OSError:
            return -1
        _copy_window_size(1, slave)
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # bytes as pytest wrote them: the supervisor's terminal does the rest
        attrs[3] &= ~termios.ECHO  # the user's terminal echoes what they type already
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.set_inheritable(self.master, False)
        os.set_blocking(self.master, False)  # typed input pytest does not read is dropped, never waited on
        self.sources[self.master] = 1
        return slave

    def typing(self) -> list[int]:
        """[0] while what the user types is relayed: in the foreground only (a read from the background
        would stop the supervisor with SIGTTIN)."""
        if not self.relay_stdin:
            return []
        try:
            return [0] if os.tcgetpgrp(0) == os.getpgrp() else []
        except OSError:  # no terminal any more
            self.relay_stdin = False
            return []

    def typed(self) -> None:
        """Relay what the user typed (a line: their terminal edits it); their end of input (^D) as one."""
        try:
            data = os.read(0, 4096)
        except OSError:  # their terminal hung up
            self.relay_stdin = False
            return
        self.ends_typed = 0 if data else self.ends_typed + 1
        if self.ends_typed > 8:  # a terminal that says end of input over and over has hung up
            self.relay_stdin = False
            return
        with contextlib.suppress(OSError):
            os.write(self.master, data or termios.tcgetattr(self.master)[6][termios.VEOF])

    def resized(self) -> None:
        if self.master >= 0:
            _copy_window_size(1, self.master)

    def handed_over(self) -> None:
        for fd in self.theirs:
            os.close(fd)
        self.theirs = []

    def pump(self, fd: int) -> bool:
        """Copy what ``fd`` has to its destination; False at its end."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError:  # EIO: the pseudo-terminal's last holder has closed it
            data = b""
        if not data:
            os.close(fd)
            del self.sources[fd]
            if fd == self.master:
                self.master = -1
                self.relay_stdin = False
            return False
        if self.discarding:
            return True
        if self.held is not None:
            self.held.append((self.sources[fd], data))
            self.held_bytes += len(data)
            self.last_held = time.monotonic()
            if self.held_bytes > _HOLD_MAX:
                self.release()
            return True
        _write(self.sources[fd], data)
        return True

    def release(self) -> None:
        """Write what was held back, and from now on what comes, as it comes."""
        held, self.held = self.held or [], None
        if not self.discarding:
            for target, data in held:
                _write(target, data)

    def holding(self) -> bool:
        return self.held is not None

    def release_if_paused(self) -> None:
        """Held output is shown once it pauses on a prompt: what waits for the user (pdb's ``(Pdb)``, input())
        is seen. A pause after a whole line (the header, xdist starting its workers) or on pytest's own
        progress line (rewritten from a ``\r``) is collection going on: that stays held."""
        if not self.held or not self.show_prompts or time.monotonic() - self.last_held < _HOLD_PAUSE:
            return
        tail = b"".join(data for _, data in self.held[-8:]).rsplit(b"\n", 1)[-1]
        if tail and not tail.startswith(b"\r"):
            self.release()

    def discard(self) -> None:
        self.held = None
        self.discarding = True

    def close(self) -> None:
        for fd in [*self.sources, *self.theirs]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sources = {}
        self.theirs = []
        self.master = -1
        self.relay_stdin = False


def _write(target: int, data: bytes) -> None:
    stream = sys.stdout if target == 1 else sys.stderr
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:
        stream.write(data.decode(errors="replace"))
    stream.flush()


def _stdin_copy() -> int:
    """What pytest in the sandbox reads when the user's stdin is no terminal: the pipe itself; a file's bytes
    in a sealed memfd (up to MAX_FILE); else /dev/null."""
    try:
        info = os.fstat(0)
        readable = fcntl.fcntl(0, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)
    except OSError:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if stat.S_ISFIFO(info.st_mode) and readable:
        return os.dup(0)
    if stat.S_ISREG(info.st_mode) and readable and info.st_size <= outputs.MAX_FILE:
        copy = os.memfd_create("pytest-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        with contextlib.suppress(OSError):
            where = os.lseek(0, 0, os.SEEK_CUR)
            while chunk := os.read(0, 1 << 20):
                os.write(copy, chunk)
            os.lseek(0, where, os.SEEK_SET)  # as it was: a run that falls back to the host reads it again
        os.lseek(copy, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)
        return copy
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _copy_window_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(target, termios.TIOCSWINSZ, fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8))


class _CollectionHeard:
    """--sandbox=all's collection line, as the supervisor reads it: one short datagram from pytest in the
    session's sandbox, "collected" or "fall-back" with its reason; the line closes after it. A fall-back
    counts only before the run settled (collected, or an output or its end seen): the project's code can
    reach the line too, and a late one would run the suite a second time, on the host, after the first."""

    def __init__(self) -> None:
        self.line, self.theirs = protocol.socketpair()
        self.fell_back: str | None = None
        self.settled = False

    def read(self) -> str:
        """What the datagram said ("collected", "fall-back" or "" for anything else); the line is closed."""
        try:
            data = self.line.recv(_COLLECTION_MESSAGE_MAX)
            message = json.loads(data)
        except (OSError, ValueError):
            message = None
        self.line.close()
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "collected":
            self.settled = True
            return "collected"
        if kind == "fall-back" and not self.settled:
            self.fell_back = _printable(str(message.get("reason") or "a test needs a sandbox of its own"))
            return "fall-back"
        return ""

    def close(self) -> None:
        self.line.close()
        self.theirs.close()


def _relay(
    zygote: Zygote, declared: tuple[str, ...], anchors: tuple[str, ...], may_fall_back: bool, show_prompts: bool
) -> tuple[int, str | None]:
    """Relay the session's output and outputs until its sandbox is gone: its exit code, and why it fell back
    (``--sandbox=all``) or None. Where it may fall back, its output is held until its collection is done
    (or, past a few MiB or a pause, shown: a prompt at collection must be seen): if it falls back, the
    sandbox is ended and what it held thrown away (the host's run prints it again)."""
    where = WHERE_ALL if may_fall_back else WHERE
    stdio = _Stdio(hold=may_fall_back, show_prompts=show_prompts)
    collection = _CollectionHeard() if may_fall_back else None
    try:
        theirs = [*stdio.theirs, *([collection.theirs.fileno()] if collection is not None else [])]
        status, channel = zygote.start_session(theirs)
        stdio.handed_over()
        if collection is not None:
            collection.theirs.close()
        ended: dict[str, Any] = {}
        with status, channel:
            for line, message in _messages(zygote, stdio, status, channel, collection, where):
                kind = message.get("type")
                if collection is not None and collection.fell_back is not None:
                    continue  # the session's sandbox is being ended: nothing of it counts
                if line == "collection" and kind == "collected":
                    stdio.release()
                elif line == "collection" and kind == "fall-back":
                    stdio.discard()
                    zygote.kill(session_process.NODEID)
                    continue
                if collection is not None:
                    collection.settled = True
                if kind in outputs.KINDS:
                    try:
                        protocol.check(message, protocol.FROM_TEST)
                        outputs.write(message, declared, anchors, say=_say)  # refuses .git below an anchor
                    except protocol.ProtocolError as exc:
                        _say(f"pytest-sandbox: {where}: an output refused: {exc}")
                elif kind == "error" or (kind == "exit" and not ended):
                    ended = message  # a setup error first, then the exit it caused
        if collection is not None and collection.fell_back is not None:
            return int(pytest.ExitCode.OK), collection.fell_back
        stdio.release()
        return _exit_code(ended, where), None
    finally:
        stdio.close()
        if collection is not None:
            collection.close()


def _messages(
    zygote: Zygote, stdio: _Stdio, status: Any, channel: Any, collection: _CollectionHeard | None, where: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Output copied as it comes; each message of the status line ("status": how the sandbox ended), the
    session's channel ("outputs") and the collection line ("collection"), until the sandbox is gone and
    those two lines have ended. ^C goes on to pytest in the sandbox; a second one ends it."""
    lines = {status.fileno(): status, channel.fileno(): channel}
    names = {status.fileno(): "status", channel.fileno(): "outputs"}
    accepted = {"status": ("exit", "error"), "outputs": outputs.KINDS}
    watched = collection.line.fileno() if collection is not None else -1
    with _forwarding_signals(zygote, stdio):
        while lines or stdio.sources:
            typed = stdio.typing() if lines else []
            ears = [*lines, *stdio.sources, *typed, *([watched] if watched >= 0 else [])]
            readable = select.select(ears, [], [], _HOLD_PAUSE if stdio.holding() else None)[0]  # PEP 475
            stdio.release_if_paused()
            if watched in readable and collection is not None:
                readable.remove(watched)
                watched = -1
                said = collection.read()
                if said:
                    yield "collection", {"type": said}
            for fd, message in _read(readable, lines, stdio, where):
                if message.get("type") in accepted[names[fd]]:
                    yield names[fd], message


@contextlib.contextmanager
def _forwarding_signals(zygote: Zygote, stdio: _Stdio) -> Iterator[None]:
    """While the session runs: ^C goes on to pytest in the sandbox (a second one ends the sandbox), wherever
    the supervisor is (a KeyboardInterrupt mid-write would end it with a traceback); resizes follow."""
    interrupts = [0]

    def interrupted(_signum: int, _frame: object) -> None:
        interrupts[0] += 1
        if interrupts[0] == 1:
            zygote.signal(session_process.NODEID, signal.SIGINT)
        else:
            zygote.kill(session_process.NODEID)

    if threading.current_thread() is not threading.main_thread():  # pytest.main() in a thread: no handlers
        yield
        return
    before = {
        signal.SIGINT: signal.signal(signal.SIGINT, interrupted),
        signal.SIGWINCH: signal.signal(signal.SIGWINCH, lambda _signum, _frame: stdio.resized()),
    }
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _read(
    readable: list[int], lines: dict[int, Any], stdio: _Stdio, where: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """What the ready fds have: typed input and output relayed, the lines' messages yielded with their line."""
    for fd in readable:
        if fd == 0 and stdio.relay_stdin:
            stdio.typed()
            continue
        if fd in stdio.sources:
            stdio.pump(fd)
            continue
        try:
            message, fds = protocol.recv(lines[fd])
        except protocol.ProtocolError as exc:  # the line is closed: its sender, blocked on it, goes on
            _say(f"pytest-sandbox: {where}: {exc}")
            lines[fd].close()
            message, fds = None, []
        for extra in fds:  # the crash memfd: pytest in there wrote its own faulthandler dump to stderr
            os.close(extra)
        if message is None or message.get("type") == "gone":
            del lines[fd]
        else:
            yield fd, message


def _exit_code(ended: dict[str, Any], where: str) -> int:
    if ended.get("type") == "error":
        _say(f"pytest-sandbox: {where}: the session's sandbox failed ({ended.get('phase')}): {ended.get('message')}")
        return int(pytest.ExitCode.INTERNAL_ERROR)
    if "signal" in ended:
        number = int(ended["signal"])
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        _say(f"pytest-sandbox: {where}: pytest in the session's sandbox was killed by {name}")
        return 128 + number
    if "code" in ended:
        return int(ended["code"])
    _say(f"pytest-sandbox: {where}: the session's sandbox ended without an exit status")
    return int(pytest.ExitCode.INTERNAL_ERROR)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
