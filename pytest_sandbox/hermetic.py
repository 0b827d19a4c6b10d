"""``--sandbox=hermetic``: the whole pytest run in one sandbox; the pytest process only supervises.

The supervisor takes over before pytest loads any ``conftest.py`` (the outermost wrapper of
``pytest_load_initial_conftests``): it forks a zygote, which holds nothing of the project, and asks it
for one sandbox whose process starts pytest again, in a fresh interpreter, with the same command line
(``runtime/session_process.py``). That pytest loads the conftest files, collects, runs every fixture,
test and plugin; its terminal output comes to the supervisor's stdout and stderr (through a pseudo-terminal
where those are terminals, so colours, width and progress are a plain run's). What it wrote under the
declared outputs (pytest's cache, hypothesis's database, the report files and coverage data the command
line asks for, ``sandbox_outputs``) reaches the host at its end; nothing else it writes does. The
supervisor exits with its exit code. Not one line of the project's code runs in the supervisor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import select
import signal
import site
import stat
import subprocess
import sys
import tempfile
import termios
import threading
from collections.abc import Iterator
from typing import Any

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
from .spec import MARKER, SandboxSpec, spec_for_item, validate

ENV = settings.HERMETIC_ENV  # "1" in the session's sandbox: the pytest there is the hermetic session
MODE = "hermetic"
WHERE = "--sandbox=hermetic"
# pytest again, in the sandbox: with the supervisor's sys.path (how it was started decides it: a script,
# python -m pytest) and its argv[0]; the command line follows.
_BOOTSTRAP = (
    "import sys; del sys.path[0]; import json; sys.path[:] = json.loads(sys.argv[1]); sys.argv = sys.argv[2:]; "
    "import pytest; sys.exit(pytest.main())"
)
# Report and data files the well-known plugins write where their options say: (option dest, plugin).
_REPORT_FILES = ("xmlpath", "report_log", "htmlpath", "json_report_file", "allure_report_dir", "cucumber_json_path")
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


def wanted(config: pytest.Config) -> bool:
    """``--sandbox=hermetic`` (or ini ``sandbox = hermetic``) in the pytest that is to supervise."""
    if inside():
        return False
    mode = getattr(config.known_args_namespace, "sandbox_mode", None)
    if mode is None:
        mode = config.getini("sandbox") or None
    return mode == MODE


def supervise(config: pytest.Config) -> int:
    """Run the session in its sandbox and relay it; pytest's exit code."""
    # The settings are read as everywhere else (settings.py); pytest fills config.option only after this hook.
    vars(config.option).update(vars(config.known_args_namespace))
    reason = probe.unavailable_reason()
    if reason is not None:
        raise pytest.UsageError(f"{WHERE}: this host cannot build sandboxes: {reason} (see pytest-sandbox doctor)")
    _fill_closed_stdio()
    anchors = output_anchors(config)
    _refuse_project_plugins(config, anchors)
    state = _session.configure(config)
    ignored = [name.replace("sandbox_hide", "sandbox_hide (its ! entries)") for name in state.ignored]
    if ignored:
        _say(
            f"pytest-sandbox: {WHERE}: ignored the project's {', '.join(ignored)}: from the ini file or its "
            "addopts, they would widen the session's sandbox; give them on the command line (-o NAME=VALUE) to use them"
        )
    spec = session_spec(state)
    _session.check_volume_targets(config, "sandbox_volumes", spec)
    paths = _paths(config, state, anchors)
    launch = session_process.SessionLaunch(
        spec=spec, argv=tuple(inner_command(config)), env=((ENV, "1"),), config=config
    )
    try:
        _session._open_cgroup_session(state)
        with state.volumes.held(spec.volumes):
            limits = Limits(state.backend, state.cgroup_session, False)
            zygote = Zygote({}, SPEC_KEY, paths, 0, limits, Namespaces(), session=launch)
            try:
                return _relay(zygote, paths.outputs, anchors)
            finally:
                zygote.close()
                state.volumes.clear_setid_bits(spec.volumes)
    except SandboxError as exc:
        _say(f"pytest-sandbox: {WHERE}: {exc}")
        return int(pytest.ExitCode.INTERNAL_ERROR)
    finally:
        _session.close(state)


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


def _refuse_project_plugins(config: pytest.Config, anchors: tuple[str, ...]) -> None:
    """pytest imports ``-p`` plugins (the ini's ``addopts`` too) and entry points before any hook of this
    plugin runs: if one of them is the project's own code (a module of the rootdir or of the directory pytest
    started in, not an installed package), it has run in this process already. Say so and stop, rather than
    go on as if the run were contained. Best effort: code that ran could have hidden itself."""
    installed = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()]
    installed += [os.path.realpath(path) for path in installed]
    places = [*anchors]
    places += [os.path.realpath(place) for place in places]
    ours = os.path.dirname(__file__)
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if not isinstance(file, str):
            continue
        paths = {os.path.abspath(file), os.path.realpath(file)}
        if any(is_under(path, ours) or any(is_under(path, prefix) for prefix in installed) for path in paths):
            continue
        if any(is_under(path, place) for path in paths for place in places):
            name = config.pluginmanager.get_name(plugin) or getattr(plugin, "__name__", "?")
            raise pytest.UsageError(
                f"{WHERE}: the plugin {name} ({file}) is this project's code and was imported before pytest-sandbox "
                "could take over (a -p option, the ini's addopts, or an entry point): it has run on the host. "
                "Plugins loaded that way cannot be contained; remove them from addopts, or do not install the "
                "project as a pytest plugin"
            )


def session_spec(state: SessionState) -> SandboxSpec:
    """The session's sandbox: the session's defaults (ini and command line), as an unmarked test's would be.
    What needs a sandbox per test, or another root than the host view, is refused before anything runs."""
    per_test = {
        "--sandbox-repeat": state.repeat > 1,
        "--sandbox-stress": bool(state.stress),
        "--sandbox-durations": state.durations is not None,
        "--sandbox-keep": state.keep != "none",
    }
    for option, given in per_test.items():
        if given:
            raise pytest.UsageError(f"{WHERE} runs the whole session in one sandbox; {option} needs a sandbox per test")
    spec = validate(dict(state.defaults), WHERE)
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


def _paths(config: pytest.Config, state: SessionState, anchors: tuple[str, ...]) -> SessionPaths:
    """What the session's sandbox shows and keeps writable, and its outputs (checked: see output_anchors)."""
    base = _session.session_paths(config, None)
    basetemp = getattr(config.option, "basetemp", None)
    # pytest removes and makes basetemp again: its directory is the writable place, not it. Without one, pytest
    # makes it in $TMPDIR (or /tmp), where the sandbox has a fresh tmpfs: a $TMPDIR below it must be there.
    parent = os.path.dirname(os.path.abspath(basetemp)) if basetemp else os.path.realpath(tempfile.gettempdir())
    fresh = parent in (*SCRATCH_PLACES, "/")  # /tmp itself stays the sandbox's own
    if os.path.isdir(parent) and not fresh and not any(is_under(parent, place) for place in base.writable):
        base = dataclasses.replace(base, writable=(*base.writable, parent))
    base = dataclasses.replace(base, needed=tuple(dict.fromkeys([*base.needed, *_import_places()])))
    declared = tuple(dict.fromkeys([*state.outputs, *plugin_outputs(config)]))
    for output in declared:
        _check_output(output, anchors)
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


def _check_output(output: str, anchors: tuple[str, ...]) -> None:
    """An output lies in an anchor, outside any ``.git`` directory (hooks there run at the next commit), and
    reaches no symlink below the anchor (a project's symlink would send what the run writes elsewhere)."""
    anchor = max((place for place in anchors if is_under(output, place)), key=len, default=None)
    if anchor is None:
        raise pytest.UsageError(
            f"{WHERE}: the output {output} lies outside the rootdir and the directory pytest was started in "
            f"({', '.join(anchors)}): write it under one of them"
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
    if getattr(options, "cov_source", None):
        found.append(os.environ.get("COVERAGE_FILE") or ".coverage")
        for kind, path in (getattr(options, "cov_report", None) or {}).items():
            if kind in _COVERAGE_REPORTS:
                found.append(path or _COVERAGE_REPORTS[kind])
    benchmark_json = getattr(options, "benchmark_json", None)
    if benchmark_json is not None:
        found.append(getattr(benchmark_json, "name", str(benchmark_json)))
    if getattr(options, "benchmark_autosave", False) or getattr(options, "benchmark_save", None):
        found.append(".benchmarks")
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
    return [sys.executable, *flags, "-c", _BOOTSTRAP, json.dumps(sys.path), argv0, *args]


def check_items(items: list[pytest.Item], defaults: dict[str, Any]) -> None:
    """In the session's sandbox, at collection: a test whose marker asks for other settings than the session's,
    or that uses services, would need a sandbox of its own; a usage error names it before any test runs."""
    session = validate(dict(defaults), WHERE)
    for item in items:
        where = f"{item.nodeid}: @pytest.mark.{MARKER}"
        spec = spec_for_item(item, defaults, sandbox_all=False)
        if spec is not None and spec != session:
            fields = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(session, f.name)]
            asked = ", ".join(f"{name}={getattr(spec, name)!r}" for name in fields)
            raise pytest.UsageError(
                f"{where}: {asked}: {WHERE} runs every test in the session's one sandbox, with the session's "
                "settings (ini and command line); this needs a sandbox of the test's own: run it without "
                f"{WHERE}, or give the session these settings"
            )
        used = used_by(item)
        if used:
            raise pytest.UsageError(
                f"{item.nodeid}: uses the service {used[0].name!r}: services are not available under {WHERE}"
            )


# -- relaying -------------------------------------------------------------------------------------


class _Stdio:
    """pytest's stdin, stdout and stderr in the sandbox. Where the supervisor's stdout is a terminal, a
    pseudo-terminal of the supervisor's (stderr shares it if that is a terminal too, and so does stdin, whose
    input the supervisor relays while it is in the foreground: --pdb and input() under -s work); else pipes.
    A stdin that is no terminal goes in as a pipe as it is, as a sealed copy if it is a file (a file's fd
    could be opened again for writing through /proc), else as /dev/null."""

    def __init__(self) -> None:
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
        stream = sys.stdout if self.sources[fd] == 1 else sys.stderr
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            stream.write(data.decode(errors="replace"))
        stream.flush()
        return True

    def close(self) -> None:
        for fd in [*self.sources, *self.theirs]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sources = {}
        self.theirs = []
        self.master = -1
        self.relay_stdin = False


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
            while chunk := os.read(0, 1 << 20):
                os.write(copy, chunk)
        os.lseek(copy, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)
        return copy
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _copy_window_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(target, termios.TIOCSWINSZ, fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8))


def _relay(zygote: Zygote, declared: tuple[str, ...], anchors: tuple[str, ...]) -> int:
    """Relay the session's output and outputs until its sandbox is gone; its exit code."""
    stdio = _Stdio()
    try:
        status, channel = zygote.start_session(stdio.theirs)
        stdio.handed_over()
        ended: dict[str, Any] = {}
        with status, channel:
            for message in _messages(zygote, stdio, status, channel):
                if message.get("type") in ("output", "output-too-large"):
                    try:
                        protocol.check(message, protocol.FROM_TEST)
                        outputs.write(message, declared, anchors, say=_say)  # refuses .git below an anchor
                    except protocol.ProtocolError as exc:
                        _say(f"pytest-sandbox: {WHERE}: an output refused: {exc}")
                elif message.get("type") == "error" or (message.get("type") == "exit" and not ended):
                    ended = message  # a setup error first, then the exit it caused
        return _exit_code(ended)
    finally:
        stdio.close()


def _messages(zygote: Zygote, stdio: _Stdio, status: Any, channel: Any) -> Iterator[dict[str, Any]]:
    """Output copied as it comes; each message of the status line and the session's channel, until the
    sandbox is gone and every line has ended. ^C goes on to pytest in the sandbox; a second one ends it."""
    lines = {status.fileno(): status, channel.fileno(): channel}
    with _forwarding_signals(zygote, stdio):
        while lines or stdio.sources:
            typed = stdio.typing() if lines else []
            readable = select.select([*lines, *stdio.sources, *typed], [], [])[0]  # PEP 475: on after a signal
            for fd, message in _read(readable, lines, stdio):
                if (fd == status.fileno()) == (message.get("type") in ("exit", "error")):
                    yield message  # the zygote says how it ended, the session's process sends outputs


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


def _read(readable: list[int], lines: dict[int, Any], stdio: _Stdio) -> Iterator[tuple[int, dict[str, Any]]]:
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
            _say(f"pytest-sandbox: {WHERE}: {exc}")
            lines[fd].close()
            message, fds = None, []
        for extra in fds:  # the crash memfd: pytest in there wrote its own faulthandler dump to stderr
            os.close(extra)
        if message is None or message.get("type") == "gone":
            del lines[fd]
        else:
            yield fd, message


def _exit_code(ended: dict[str, Any]) -> int:
    if ended.get("type") == "error":
        _say(f"pytest-sandbox: {WHERE}: the session's sandbox failed ({ended.get('phase')}): {ended.get('message')}")
        return int(pytest.ExitCode.INTERNAL_ERROR)
    if "signal" in ended:
        number = int(ended["signal"])
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        _say(f"pytest-sandbox: {WHERE}: pytest in the session's sandbox was killed by {name}")
        return 128 + number
    if "code" in ended:
        return int(ended["code"])
    _say(f"pytest-sandbox: {WHERE}: the session's sandbox ended without an exit status")
    return int(pytest.ExitCode.INTERNAL_ERROR)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
