"""Credentials stay out of sandboxes: the places masked and the environment variables withheld.

A sandbox sees the host read-only, which would include the keys and tokens of whoever runs
pytest. By default every sandbox masks the credential places below (a directory gets an
empty read-only tmpfs, a file an empty read-only file; see ``linux/rootfs.mask_places``)
and its test process starts without the variables that look like credentials.

Places (``~`` is ``$HOME`` of the pytest process and the home directory of its account;
for root also every account's home, root may read them all):

* ``HOME_PLACES`` under each home: ssh, gpg, cloud CLIs, kubernetes, container registries,
  package indexes, git, password stores and keyrings;
* ``SYSTEM_PLACES``: shadow password files, ssh host keys, TLS private keys, the Kerberos keytab;
* ``RUNTIME_PLACES`` under ``$XDG_RUNTIME_DIR`` (agent sockets, podman's auth file);
* files and directories named by ``PLACE_VARIABLES`` (``$SSH_AUTH_SOCK``, ``$KUBECONFIG``, ...).

Only places that exist and that the pytest process may read are masked: what it cannot
read, a test cannot either (``/etc/shadow`` for a plain user stays "permission denied").
A place under a fresh tmpfs of the sandbox (``/tmp``, ``/run``) is gone already.

Variables (``is_credential_variable``), case-insensitive, never ``PYTEST_*``:

* a name part (split at ``_`` and other non-alphanumerics) ending in one of ``SECRET_WORDS``
  (``GITHUB_TOKEN``, ``DB_PASSWORD``, ``NPM_CONFIG__AUTHTOKEN``, ``GOOGLE_APPLICATION_CREDENTIALS``);
* a name part that is one of ``SECRET_PARTS`` (``GITHUB_PAT``, ``DB_PASS``, ``SENTRY_DSN``, ``NPM_AUTH``);
* a last part ``KEY`` or ``PWD`` (``OPENAI_API_KEY``, ``MYSQL_PWD``; not ``PWD`` itself), or ``KEY``
  right after ``API``, ``ACCESS``, ``SECRET``, ``PRIVATE`` (``API_KEY_2``);
* whatever its name, a value that is a URL with a password (``DATABASE_URL=postgres://app:pw@db/app``);
* a name matching one of ``VARIABLE_PATTERNS`` (``AWS_*``, ``AZURE_*``, ``SSH_AUTH_SOCK``, ...).

``sandbox_hide`` (ini) and ``hide=`` (marker) add places, and ``!place`` takes one of the
defaults out; ``sandbox_env_pass`` (ini) and ``env_pass=`` (marker) name variables (shell
patterns) that are let through; ``env=`` sets a variable whatever its name.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import os
import pwd
import re
import shlex
from collections.abc import Iterable, Mapping

from .linux import process

HOME_PLACES = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".kube",
    ".docker",
    ".netrc",
    ".pypirc",
    ".npmrc",
    ".git-credentials",
    ".config/gh",
    ".config/hub",
    ".password-store",
    ".config/containers/auth.json",
    ".config/containers/certs.d",  # registries' client keys (layers/registry.py reads them)
    ".local/share/keyrings",
    ".cargo/credentials",
    ".cargo/credentials.toml",
    ".gem/credentials",
    ".vault-token",
    ".pgpass",
    ".config/git/credentials",  # git's credential store where XDG_CONFIG_HOME is used
    ".my.cnf",
    ".m2/settings.xml",
    ".m2/settings-security.xml",
    ".gradle/gradle.properties",
    ".s3cfg",
    ".boto",
    ".databrickscfg",
    ".config/rclone",
    ".terraform.d/credentials.tfrc.json",
    ".config/sops",
    ".config/pip/pip.conf",  # an index URL may carry a token
    ".pip/pip.conf",
    ".bash_history",  # histories: a password typed on a command line
    ".zsh_history",
    ".python_history",
    ".psql_history",
    ".mysql_history",
)
SYSTEM_PLACES = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh/ssh_host_*_key",
    "/etc/ssl/private",
    "/etc/krb5.keytab",
    "/etc/containers/certs.d/*/*.key",  # registries' client keys: their CAs stay readable
    "/etc/docker/certs.d/*/*.key",
)
RUNTIME_PLACES = ("gnupg", "keyring", "containers/auth.json")  # under $XDG_RUNTIME_DIR
# Variables whose value is a credential file, directory or socket: that place is masked too.
PLACE_VARIABLES = (
    "SSH_AUTH_SOCK",
    "GNUPGHOME",
    "KUBECONFIG",  # a colon-separated list
    "NETRC",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AZURE_CONFIG_DIR",
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
    "PASSWORD_STORE_DIR",
)

SECRET_WORDS = (
    "TOKEN",
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "CREDENTIAL",
    "CREDENTIALS",
    "APIKEY",
    "PRIVATEKEY",
    "JWT",
)
SECRET_PARTS = ("PAT", "PASS", "AUTH", "DSN", "PRIVKEY", "COOKIE", "COOKIES")  # a whole name part only
_KEY_QUALIFIERS = ("API", "ACCESS", "SECRET", "PRIVATE")
# A value that is a URL with a password in it (DATABASE_URL=postgres://app:secret@db/app), whatever its name.
_URL_WITH_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@")
VARIABLE_PATTERNS = (
    "AWS_*",
    "AZURE_*",
    "TWINE_*",
    "PYPI_*",
    "NPM_CONFIG_*AUTH*",
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "GPG_AGENT_INFO",
    "NETRC",
    "KUBECONFIG",
    "DOCKER_AUTH_CONFIG",
    "REGISTRY_AUTH_FILE",
    "GIT_CONFIG_PARAMETERS",  # git config given in the environment: actions' extraheader can travel this way
    "GIT_CONFIG_COUNT",
    "GIT_CONFIG_KEY_*",
    "GIT_CONFIG_VALUE_*",
    "SSHPASS",
    "*WEBHOOK*",  # SLACK_WEBHOOK_URL, DISCORD_WEBHOOK: the URL is the credential
    "BW_SESSION",
    "OP_SESSION_*",
    "SONAR_LOGIN",
)
NEVER_WITHHELD = ("PYTEST_*",)  # pytest's and its plugins' own settings must reach the test
_PART_SPLIT = re.compile(r"[^A-Z0-9]+")


def _any_of(patterns: Iterable[str]) -> re.Pattern[str]:
    """One compiled regex for shell patterns (compiled once: each sandbox checks every variable)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p.upper())})" for p in patterns) or "(?!)")


_NEVER_RE, _VARIABLE_RE = _any_of(NEVER_WITHHELD), _any_of(VARIABLE_PATTERNS)


# -- places ---------------------------------------------------------------------------------------


def homes(home: str | None) -> list[str]:
    """The home directories whose credential places are masked: ``home`` ($HOME), the account's;
    for root every account's (root reads them all)."""
    found = [home] if home and os.path.isabs(home) else []
    try:
        found.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    if os.geteuid() == 0:
        found += [entry.pw_dir for entry in pwd.getpwall()]
    result: list[str] = []
    for path in found:
        path = os.path.normpath(path)
        if path != "/" and os.path.isabs(path) and path not in result and os.path.isdir(path):
            result.append(path)
    return result


def default_places(home: str | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every default place as a path or glob pattern, before checking what exists."""
    environ = os.environ if environ is None else environ
    places = [os.path.join(h, p) for h in homes(home) for p in HOME_PLACES]
    config = environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(config):  # what the tools keep under ~/.config, they keep there instead
        places += [os.path.join(config, p.removeprefix(".config/")) for p in HOME_PLACES if p.startswith(".config/")]
    places += SYSTEM_PLACES
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        places += [os.path.join(runtime, p) for p in RUNTIME_PLACES]
    for name in PLACE_VARIABLES:
        places += [p for p in environ.get(name, "").split(os.pathsep) if os.path.isabs(p)]
    return places


def expand(entry: str, home: str | None) -> list[str]:
    """A ``hide`` entry (``/abs``, ``~/rel``, either may be a glob pattern) as paths: ``~`` is each of ``homes``."""
    if entry == "~" or entry.startswith("~/"):
        return [h + entry[1:] for h in homes(home)]
    return [entry]


def _readable(path: str) -> bool:
    if os.path.isdir(path):
        return os.access(path, os.R_OK) or os.access(path, os.X_OK)
    return os.access(path, os.R_OK)


def hidden_places(home: str | None, extra: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """The places a sandbox masks: the defaults plus ``extra`` (``hide`` entries; ``!entry`` takes one out).

    Only existing places the caller may read, symlinks resolved, deduplicated, sorted.
    """
    wanted = default_places(home, environ)
    removed: set[str] = set()
    for entry in extra:
        if entry.startswith("!"):
            removed.update(expand(entry[1:], home))
        else:
            wanted += expand(entry, home)
    found: set[str] = set()
    for pattern in wanted:
        if pattern in removed:
            continue
        for path in glob.glob(pattern) if glob.has_magic(pattern) else [pattern]:
            if path in removed or not os.path.exists(path):
                continue
            real = os.path.realpath(path)
            if real != "/" and real not in removed and _readable(real):
                found.add(real)
    return sorted(found)


_GIT_HEADER = re.compile(r"^\s*extraheader\s*=", re.IGNORECASE)  # actions/checkout's "AUTHORIZATION: basic ..."
_URL_USERINFO = re.compile(r"(?i)\b(https?://)[^/@\s]+@")  # https://x-access-token:TOKEN@host, gitlab-ci-token:...
MAX_GIT_CONFIG = 1 << 20  # bytes: a larger config is masked as empty rather than read


_INCLUDE_SECTION = re.compile(r"^\s*\[\s*include(if\s[^\]]*)?\s*\]", re.IGNORECASE)
_SECTION = re.compile(r"^\s*\[")
_INCLUDE_PATH = re.compile(r"^\s*path\s*=\s*(.*?)\s*$", re.IGNORECASE)
_SSH_COMMAND = re.compile(r"^\s*sshcommand\s*=\s*(.*?)\s*$", re.IGNORECASE)
MAX_GIT_CONFIGS = 256  # config files followed (submodules' and included ones); more are left as they are


def scrubbed_git_configs(places: Iterable[str], home: str | None = None) -> list[tuple[str, str]]:
    """(path, text) for the git configs that carry credentials, with them taken out, and ("key", "") for the
    ssh keys they name: CI checkouts keep the job's token in reach of every test, in the repository's
    ``.git/config`` (an http ``extraheader``, a password in a remote's URL), its submodules' configs, a file it
    includes (actions/checkout's ``$RUNNER_TEMP/git-credentials-*.config``), the user's ``~/.gitconfig``, or an
    ssh key its ``core.sshCommand`` names (``-i``). The rest of each file stays, for the git commands a test
    runs there."""
    queue: list[str] = []
    for place in places:
        config = _git_config_of(place)
        if config is not None:
            queue.append(config)
            queue.extend(_submodule_configs(os.path.dirname(config)))
    if home:
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        queue.extend(path for path in (os.path.join(home, ".gitconfig"), os.path.join(xdg, "git", "config")))
    found: dict[str, str] = {}
    seen: set[str] = set()
    while queue and len(seen) < MAX_GIT_CONFIGS:
        config = os.path.realpath(queue.pop(0))
        if config in seen or not os.path.isfile(config):
            continue
        seen.add(config)
        try:
            with open(config, "rb") as f:
                raw = f.read(MAX_GIT_CONFIG + 1)
        except OSError:
            continue
        text = "" if len(raw) > MAX_GIT_CONFIG else raw.decode("utf-8", errors="surrogateescape")
        included, keys = _named_files(text, os.path.dirname(config), home)
        queue.extend(included)
        for key in keys:
            if os.path.isfile(key):
                found[os.path.realpath(key)] = ""
        scrubbed = scrub_git_config(text)
        if scrubbed is not None or len(raw) > MAX_GIT_CONFIG:
            found[config] = scrubbed or ""
    return sorted(found.items())


def _submodule_configs(git_dir: str) -> list[str]:
    """The configs of a repository's submodules (``modules/NAME/config``, nested ones too)."""
    configs = []
    for root, dirs, files in os.walk(os.path.join(git_dir, "modules")):
        if "config" in files and "HEAD" in files:
            configs.append(os.path.join(root, "config"))
        if len(configs) >= MAX_GIT_CONFIGS:
            break
        dirs[:] = [d for d in dirs if d not in ("objects", "refs", "logs", "hooks", "info")]
    return configs


def _named_files(text: str, directory: str, home: str | None) -> tuple[list[str], list[str]]:
    """The files a git config includes (``[include]`` and ``[includeIf ...]`` paths, whatever the condition)
    and the ssh keys its ``core.sshCommand`` passes with ``-i``."""
    included, keys = [], []
    in_include = False
    for line in text.splitlines():
        if _SECTION.match(line):
            in_include = bool(_INCLUDE_SECTION.match(line))
            continue
        match = _INCLUDE_PATH.match(line) if in_include else None
        if match:
            path = match.group(1).strip('"')
            if path.startswith("~/") and home:
                path = os.path.join(home, path[2:])
            included.append(os.path.join(directory, path))
        match = _SSH_COMMAND.match(line)
        if match:
            try:
                words = shlex.split(match.group(1))
            except ValueError:
                continue
            for index, word in enumerate(words):
                if word == "-i" and index + 1 < len(words):
                    keys.append(words[index + 1])
                elif word.startswith("-i") and len(word) > 2:
                    keys.append(word[2:])
    return included, keys


def scrub_git_config(text: str) -> str | None:
    """``text`` without http extra headers and with no user or password in http(s) URLs; None if it has none."""
    kept = []
    for line in text.splitlines(keepends=True):
        if _GIT_HEADER.match(line):
            continue
        kept.append(_URL_USERINFO.sub(r"\1", line))
    scrubbed = "".join(kept)
    return scrubbed if scrubbed != text else None


def _git_config_of(place: str) -> str | None:
    """The config file of the git repository that holds ``place`` (a worktree's: its common directory's)."""
    directory = os.path.realpath(place)
    while True:
        dot_git = os.path.join(directory, ".git")
        if os.path.isdir(dot_git):
            config = os.path.join(dot_git, "config")
            return config if os.path.isfile(config) else None
        if os.path.isfile(dot_git):
            return _linked_git_config(dot_git)
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _linked_git_config(dot_git: str) -> str | None:
    """A worktree's or submodule's ``.git`` file says ``gitdir: PATH``; its config is in the common dir."""
    try:
        with open(dot_git) as f:
            line = f.readline(4096).strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not line.startswith("gitdir:"):
        return None
    git_dir = os.path.join(os.path.dirname(dot_git), line[len("gitdir:") :].strip())
    try:
        with open(os.path.join(git_dir, "commondir")) as f:
            git_dir = os.path.join(git_dir, f.readline(4096).strip())
    except (OSError, UnicodeDecodeError):
        pass
    config = os.path.join(os.path.realpath(git_dir), "config")
    return config if os.path.isfile(config) else None


def check_place(entry: str) -> str | None:
    """``entry`` normalized if it is a valid ``hide`` entry (``[!]/abs`` or ``[!]~/rel``), else None."""
    negate, rest = ("!", entry[1:]) if entry.startswith("!") else ("", entry)
    if "\0" in rest:
        return None
    if rest == "~" or rest.startswith("~/"):
        tail = os.path.normpath(rest[2:]) if len(rest) > 2 else "."
        if tail.startswith(".."):
            return None
        return negate + ("~" if tail == "." else f"~/{tail}")
    if not os.path.isabs(rest):
        return None
    normal = os.path.normpath(rest)
    return None if normal in ("/", "//") else negate + normal


# -- variables ------------------------------------------------------------------------------------


def is_credential_variable(name: str) -> bool:
    """Whether an environment variable's name looks like it holds a credential (the module's rule)."""
    upper = name.upper()
    if _NEVER_RE.match(upper):
        return False
    if _VARIABLE_RE.match(upper):
        return True
    parts = [p for p in _PART_SPLIT.split(upper) if p]
    if any(part.endswith(SECRET_WORDS) or part in SECRET_PARTS for part in parts):
        return True
    if len(parts) > 1 and parts[-1] in ("KEY", "PWD"):
        return True
    return any(a in _KEY_QUALIFIERS and b == "KEY" for a, b in itertools.pairwise(parts))


def withheld_variables(environ: Mapping[str, str], passed: Iterable[str] = ()) -> list[str]:
    """Names in ``environ`` a sandbox does not pass: credential-looking ones not matched by ``passed``
    (names or shell patterns, case-insensitive)."""
    allowed = _any_of(passed)
    return sorted(
        name
        for name, value in environ.items()
        if (is_credential_variable(name) or (not _NEVER_RE.match(name.upper()) and _URL_WITH_PASSWORD.match(value)))
        and not allowed.match(name.upper())
    )


def check_variable_pattern(entry: str) -> bool:
    """A valid ``env_pass`` entry: a variable name or shell pattern, no ``=``, whitespace or NUL."""
    return bool(entry) and not any(c in entry for c in "=\0") and not any(c.isspace() for c in entry)


def _initial_environment_range() -> tuple[int, int]:
    """Where the process's initial environment strings lie (``/proc/self/stat`` env_start, env_end)."""
    fields = process.stat_fields()
    # Fields are numbered from 1 (pid); after "comm)" the list starts at field 3 (state).
    return int(fields[50 - 3]), int(fields[51 - 3])


def scrub_environment(names: Iterable[str]) -> None:
    """Remove ``names`` from this process's environment: ``os.environ`` (and the C environ), and
    the initial environment block ``/proc/self/environ`` shows (a fork of pytest still holds it),
    whose ``NAME=value`` strings are overwritten with NUL bytes in place.
    """
    wanted = {os.fsencode(name) for name in names}
    if not wanted:
        return
    start, end = _initial_environment_range()
    if 0 < start < end and end - start < 1 << 24:
        # /proc/self/mem: an unreadable range is an error here, never a crash.
        fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            block = os.pread(fd, end - start, start)
            offset = 0
            for entry in block.split(b"\0"):
                if entry.split(b"=", 1)[0] in wanted:
                    os.pwrite(fd, bytes(len(entry)), start + offset)
                offset += len(entry) + 1
        finally:
            os.close(fd)
    for name in wanted:
        os.environb.pop(name, None)  # unsetenv too


def header_lines(places: list[str], variables: list[str], verbose: bool) -> list[str]:
    """The report header's account of what sandboxes withhold; each place and name with ``verbose``."""
    counted = f"{len(places)} credential place{'s' if len(places) != 1 else ''}"
    counted += f", {len(variables)} variable{'s' if len(variables) != 1 else ''}"
    lines = [f"sandbox hides: {counted} (sandbox_hide, sandbox_env_pass to change)"]
    if verbose:
        lines += [f"  hidden: {place}" for place in places]
        lines += [f"  withheld: ${name}" for name in variables]
    return lines
