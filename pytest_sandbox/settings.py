"""Every session setting in one table, resolved one way: command line > environment > ini > default.

The table also registers the options and ini keys, so a setting cannot be added in one
place and forgotten in another. Per test, a ``container`` marker beats all of these, and
``--sandbox-stress`` beats the marker (see ``spec.spec_for_item``). Every error names
where the bad value came from.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

import pytest

from .layers import registry
from .runtime.cgroups import BACKENDS as CGROUP_BACKENDS
from .spec import CHECKS, LIMIT_FIELDS, bad_value, check_env_lines, check_volume_lines

MODES = ("marked", "all", "hermetic", "off")
UNAVAILABLE = ("fail", "skip")
LIMIT_POLICIES = ("warn", "strict")
KEEP = ("none", "failed")
SCOPES = ("test", "module", "session")
COLLECTION = ("sandbox", "host")
POD_NETWORKS = ("auto", "bridge", "loopback")
HERMETIC_ENV = "PYTEST_SANDBOX_HERMETIC"  # "1" in the sandbox of a --sandbox=hermetic session (hermetic.py)
COLLECTION_ENV = "PYTEST_SANDBOX_COLLECTION"  # there, under --sandbox=all: its collection line (hermetic.py)
LAYERS_ENV = "PYTEST_SANDBOX_LAYERS"  # there: the session's layer helper, for its tests (runtime/test_layers.py)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: where it may be given and what it may be."""

    name: str  # the option's dest, ``sandbox_<name>``
    help: str
    option: str | None = None  # command-line flag
    ini: str | None = None  # ini key
    env: str | None = None  # environment variable
    default: Any = None
    choices: tuple[str, ...] = ()
    ini_type: str | None = None  # "linelist" for multi-line ini values
    metavar: str = "VALUE"
    path: bool = False  # an ini value is relative to the ini file's directory
    option_type: Any = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "sandbox_mode",
        "marked: sandbox tests marked @pytest.mark.container (default); all: sandbox every test, and run "
        "conftest.py and collection in the session's sandbox where no test needs a sandbox of its own; "
        "hermetic: run the whole session (conftest.py, collection, fixtures, tests, plugins) in one sandbox; "
        "off: run everything unsandboxed",
        "--sandbox",
        "sandbox",
        default="marked",
        choices=MODES,
        metavar="MODE",
    ),
    Setting(
        "sandbox_unavailable",
        "what sandboxed tests do where this host cannot build sandboxes: fail (default) or skip",
        "--sandbox-unavailable",
        "sandbox_unavailable",
        default="fail",
        choices=UNAVAILABLE,
        metavar="ACTION",
    ),
    Setting(
        "sandbox_network",
        "default network of sandboxes: none (loopback only, default) or host",
        "--sandbox-network",
        "sandbox_network",
        metavar="MODE",
    ),
    Setting("sandbox_hostname", "host name inside sandboxes", ini="sandbox_hostname"),
    Setting(
        "sandbox_writable",
        "extra host directories sandboxes may write to (ephemerally)",
        ini="sandbox_writable",
        ini_type="linelist",
    ),
    Setting(
        "sandbox_outputs",
        "files and directories (relative to rootdir) whose writes in sandboxes reach the host, besides "
        "pytest's cache and .hypothesis",
        ini="sandbox_outputs",
        ini_type="linelist",
    ),
    Setting("sandbox_env", "NAME=VALUE lines set in every sandbox", ini="sandbox_env", ini_type="linelist"),
    Setting(
        "sandbox_volumes",
        "SOURCE=TARGET[:ro|:rw] lines mounted in every sandbox: SOURCE a volume name (kept in the store) or a "
        "host path (relative to rootdir); writes to them persist",
        ini="sandbox_volumes",
        ini_type="linelist",
    ),
    Setting(
        "sandbox_hide",
        "places masked in every sandbox besides the default credential places (absolute or ~/ paths; "
        "!PATH un-hides a default one)",
        ini="sandbox_hide",
        ini_type="linelist",
    ),
    Setting(
        "sandbox_env_pass",
        "credential-looking environment variables (names or shell patterns) passed to sandboxes anyway",
        ini="sandbox_env_pass",
        ini_type="linelist",
    ),
    Setting(
        "sandbox_memory", "default memory limit, e.g. 512M, of every sandbox", "--sandbox-memory", "sandbox_memory"
    ),
    Setting(
        "sandbox_tmpfs_size",
        "bytes each scratch tmpfs of a sandbox may hold, e.g. 2G (default: a quarter of RAM, or half the memory "
        "limit where that is less)",
        "--sandbox-tmpfs-size",
        "sandbox_tmpfs_size",
    ),
    Setting("sandbox_cpus", "default CPU limit in CPUs, e.g. 0.5, of every sandbox", "--sandbox-cpus", "sandbox_cpus"),
    Setting("sandbox_pids", "default most processes and threads of every sandbox", "--sandbox-pids", "sandbox_pids"),
    Setting(
        "sandbox_timeout", "default seconds for each test of every sandbox", "--sandbox-timeout", "sandbox_timeout"
    ),
    Setting(
        "sandbox_cgroup",
        "cgroup to create sandbox cgroups in: an absolute path below /sys/fs/cgroup, like /user.slice/me.scope "
        "(per hierarchy on v1)",
        "--sandbox-cgroup",
        "sandbox_cgroup",
        env="PYTEST_SANDBOX_CGROUP",
        metavar="PATH",
    ),
    Setting(
        "sandbox_cgroup_backend",
        "how limits are enforced: auto (default), v2, v1 or rlimit",
        "--sandbox-cgroup-backend",
        "sandbox_cgroup_backend",
        default="auto",
        choices=CGROUP_BACKENDS,
        metavar="KIND",
    ),
    Setting(
        "sandbox_limits",
        "a limit this host cannot enforce: warn (default) or strict (an error)",
        "--sandbox-limits",
        "sandbox_limits",
        default="warn",
        choices=LIMIT_POLICIES,
        metavar="POLICY",
    ),
    Setting(
        "sandbox_store",
        "image and layer store (default: $PYTEST_SANDBOX_STORE, ini sandbox_store, $XDG_CACHE_HOME/pytest-sandbox)",
        "--sandbox-store",
        "sandbox_store",
        env="PYTEST_SANDBOX_STORE",
        metavar="DIR",
        path=True,
    ),
    Setting(
        "sandbox_keep",
        "keep the read/write layer of failed image tests: failed or none (default)",
        "--sandbox-keep",
        "sandbox_keep",
        default="none",
        choices=KEEP,
        metavar="WHICH",
    ),
    Setting(
        "sandbox_scope",
        "which tests share a sandbox: test (a fresh one each, default), module (the tests of a file, in "
        "order) or session (consecutive tests with the same settings); fixtures keep their scopes within it",
        "--sandbox-scope",
        "sandbox_scope",
        default="test",
        choices=SCOPES,
        metavar="SCOPE",
    ),
    Setting(
        "sandbox_collection",
        "where --sandbox=all runs conftest.py, collection and session hooks: sandbox (the session's sandbox, "
        "default, where no test needs a sandbox of its own) or host (the pytest process, as in a plain run)",
        "--sandbox-collection",
        "sandbox_collection",
        default="sandbox",
        choices=COLLECTION,
        metavar="WHERE",
    ),
    Setting(
        "sandbox_pod_network",
        "the services' pod network: bridge (an address per member, services reached by name on their "
        "published ports), loopback (one shared loopback, as in a Kubernetes pod) or auto (default: bridge "
        "where the kernel can make one)",
        "--sandbox-pod-network",
        "sandbox_pod_network",
        default="auto",
        choices=POD_NETWORKS,
        metavar="KIND",
    ),
    Setting(
        "sandbox_images",
        "directory of *.Containerfile image definitions, relative to rootdir",
        ini="sandbox_images",
        default="images",
        path=True,
    ),
    Setting(
        "sandbox_cache",
        "a registry repository (HOST/REPOSITORY) shared by machines as a build cache: Containerfile steps "
        "built elsewhere are pulled, steps built here are pushed",
        "--sandbox-cache",
        "sandbox_cache",
        metavar="REF",
    ),
    Setting(
        "sandbox_insecure_registries",
        "registries (HOST[:PORT]) reached with unverified TLS, or plain HTTP where they have no TLS "
        "(loopback ones may always use plain HTTP)",
        ini="sandbox_insecure_registries",
        ini_type="linelist",
    ),
    Setting(
        "sandbox_durations",
        "show the N sandboxed tests that used the most memory and CPU (0: all)",
        "--sandbox-durations",
        metavar="N",
        option_type=int,
    ),
    Setting(
        "sandbox_repeat",
        "run each selected test N times, each in a fresh sandbox, and tabulate failures",
        "--sandbox-repeat",
        default=1,
        metavar="N",
        option_type=int,
    ),
    Setting(
        "sandbox_stress",
        "limits that override all others, e.g. cpus=0.2,memory=128M (to shake out flaky tests)",
        "--sandbox-stress",
        metavar="LIMITS",
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}


def register(parser: pytest.Parser) -> None:
    """Options in one ``sandbox`` group, ini keys beside them."""
    group = parser.getgroup("sandbox", "run tests in rootless containers (pytest-sandbox)")
    for s in SETTINGS:
        if s.option is not None:
            extra = {"type": s.option_type} if s.option_type is not None else {}
            default = s.default if s.ini is None else None  # None: not given, so env and ini are asked next
            group.addoption(s.option, dest=s.name, metavar=s.metavar, default=default, help=s.help, **extra)
        if s.ini is not None:
            if s.ini_type == "linelist":
                parser.addini(s.ini, s.help, type="linelist", default=[])
            else:
                parser.addini(
                    s.ini,
                    f"default for {s.option}: {s.help}" if s.option else s.help,
                    default="" if s.default is None else str(s.default),
                )


def raw(config: pytest.Config, name: str) -> tuple[Any, str]:
    """The value of a setting and where it came from (``--flag``, ``$VAR``, ``ini key``, ``default``)."""
    s = BY_NAME[name]
    if s.option is not None:
        value = config.getoption(name)
        if value is not None and (s.ini is not None or value != s.default):
            return value, s.option
    if s.env is not None and os.environ.get(s.env):
        return os.environ[s.env], f"${s.env}"
    if s.ini is not None:
        value = config.getini(s.ini)
        if value not in ("", [], None):
            if s.path:
                base = config.inipath.parent if config.inipath else config.rootpath
                value = str(base / os.path.expanduser(str(value)))
            return value, f"ini {s.ini}"
    return s.default, "default"


def choice(config: pytest.Config, name: str) -> str:
    value, where = raw(config, name)
    allowed = BY_NAME[name].choices
    if value not in allowed:
        raise pytest.UsageError(f"{where}: invalid value {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def count(config: pytest.Config, name: str, least: int, what: str) -> int | None:
    value, where = raw(config, name)
    if value is not None and value < least:
        raise pytest.UsageError(f"{where}: invalid value {value}; expected {what}")
    return None if value is None else int(value)


def directory(config: pytest.Config, name: str) -> str | None:
    """A directory setting (``--sandbox-store``, ``sandbox_images``); a NUL byte is no path."""
    value, where = raw(config, name)
    if value in (None, ""):
        return None
    if "\0" in str(value):
        field = name.removeprefix("sandbox_")
        raise bad_value(where, field, value, "expected a directory path (without NUL bytes)")
    return str(value)


def insecure_registries(config: pytest.Config) -> tuple[str, ...]:
    """``sandbox_insecure_registries``: each line a registry as ``pytest-sandbox login`` takes it."""
    value, where = raw(config, "sandbox_insecure_registries")
    out = []
    for line in value or ():
        try:
            out.append(registry.parse_registry(str(line).strip()))
        except registry.RegistryError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
    return tuple(out)


def build_cache(config: pytest.Config, insecure: tuple[str, ...]) -> registry.RemoteCache | None:
    """``--sandbox-cache``: the build cache in a registry, or None."""
    value, where = raw(config, "sandbox_cache")
    if not value:
        return None
    try:
        return registry.RemoteCache(str(value), insecure, where)
    except registry.RegistryError as exc:
        raise pytest.UsageError(str(exc)) from None


CGROUP_RULE = (
    "expected an absolute cgroup path below /sys/fs/cgroup, like /user.slice/me.scope "
    "(not starting with /sys/fs/cgroup), without '.' or '..' components or control characters"
)


def cgroup_path(config: pytest.Config) -> str | None:
    """``--sandbox-cgroup``: a path that could escape /sys/fs/cgroup or name nothing a cgroup can be is an error."""
    value, where = raw(config, "sandbox_cgroup")
    if value in (None, ""):
        return None
    text = str(value)
    parts = text.split("/")
    if (
        not text.startswith("/")
        or any(part in (".", "..") for part in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in text)
        or parts[1:4] == ["sys", "fs", "cgroup"]
    ):
        raise bad_value(where, "cgroup", value, CGROUP_RULE)
    return text


def spec_defaults(config: pytest.Config, ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """The spec fields the session sets for every sandbox, already checked; without the ``ignored``
    settings (widening_the_user_did_not_give: of ``sandbox_hide``, its "!" entries)."""
    values: dict[str, Any] = {}
    for field in ("hostname", "network", "writable", "hide", "env_pass", "tmpfs_size", *LIMIT_FIELDS):
        value, where = raw(config, f"sandbox_{field}")
        if field == "hide" and "sandbox_hide" in ignored:
            value = [entry for entry in value if not str(entry).startswith("!")]
        elif f"sandbox_{field}" in ignored:
            continue
        if value not in (None, "", []):
            values[field] = CHECKS[field](value, where)
    lines, where = raw(config, "sandbox_env")
    if lines:
        values["env"] = check_env_lines(lines, where)
    lines, where = raw(config, "sandbox_volumes")
    if lines and "sandbox_volumes" not in ignored:
        values["volumes"] = check_volume_lines(lines, str(config.rootpath), where)
    return values


# What widens a sandbox's reach: the network, credential variables let through, masks taken off (a "!"
# entry of sandbox_hide), host directories bound in (volumes, which persist). Under --sandbox=hermetic the
# project is what is not trusted: there only the user may set these, on the command line or in
# $PYTEST_ADDOPTS, never the project's ini file or its addopts.
_WIDENING = ("sandbox_network", "sandbox_env_pass", "sandbox_volumes")


def widening_the_user_did_not_give(config: pytest.Config) -> tuple[str, ...]:
    """Under --sandbox=hermetic, the widening settings the project set and the user did not; () otherwise."""
    if raw(config, "sandbox_mode")[0] != "hermetic":
        return ()
    named = _named_by_the_user(config)
    ignored = []
    for name in _WIDENING:
        value, _ = raw(config, name)
        if value not in (None, "", [], "none") and name not in named:
            ignored.append(name)
    hide, _ = raw(config, "sandbox_hide")
    if any(str(entry).startswith("!") for entry in hide or ()) and "sandbox_hide" not in named:
        ignored.append("sandbox_hide")
    return tuple(ignored)


def _named_by_the_user(config: pytest.Config) -> set[str]:
    """The ini names of the settings the user's own command line and $PYTEST_ADDOPTS set: ``-o NAME=...``, or
    a setting's ``--option`` (not the ini file's addopts, which pytest puts before them)."""
    args = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *map(str, config.invocation_params.args)]
    by_option = {s.option: s.ini for s in SETTINGS if s.option and s.ini}
    named: set[str] = set()
    for index, arg in enumerate(args):
        if arg in ("-o", "--override-ini") and index + 1 < len(args):
            named.add(args[index + 1].split("=", 1)[0])
        elif arg.startswith("--override-ini="):
            named.add(arg.removeprefix("--override-ini=").split("=", 1)[0])
        elif arg.startswith("-o") and not arg.startswith("--"):
            named.add(arg[2:].split("=", 1)[0])
        option = arg.split("=", 1)[0]
        if option in by_option:
            named.add(str(by_option[option]))
    return named


def parse_stress(config: pytest.Config) -> dict[str, Any]:
    """``--sandbox-stress=cpus=0.2,memory=128M``: limits that override every other source."""
    text, where = raw(config, "sandbox_stress")
    if not text:
        return {}
    values: dict[str, Any] = {}
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in LIMIT_FIELDS:
            raise pytest.UsageError(
                f"{where}: invalid {part!r}; expected NAME=VALUE with NAME one of {', '.join(LIMIT_FIELDS)}"
            )
        if name in values:
            raise pytest.UsageError(f"{where}: invalid {part!r}: {name} is given twice; each limit once")
        values[name] = CHECKS[name](value.strip(), where)
    return values
