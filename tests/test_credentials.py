"""Credentials stay out of sandboxes: the rule (unit tests) and what a sandboxed test can read (end to end)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import credentials
from pytest_sandbox.linux import rootfs
from pytest_sandbox.spec import validate

# -- the variable rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "GITHUB_TOKEN",
        "github_token",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AZURE_CLIENT_ID",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "MY_API_KEY_2",
        "DB_PASSWORD",
        "PGPASSWORD",
        "MYSQL_PWD",
        "LDAP_PASSWD",
        "GPG_PASSPHRASE",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "CI_JOB_JWT_V2",
        "NPM_CONFIG__AUTH",
        "npm_config__authToken",
        "npm_config_//registry.npmjs.org/:_authToken",
        "TWINE_USERNAME",
        "PYPI_API_TOKEN",
        "SSH_AUTH_SOCK",
        "GPG_AGENT_INFO",
        "KUBECONFIG",
        "NETRC",
        "DOCKER_AUTH_CONFIG",
        "SECRET_KEY_BASE",
        "VAULT_TOKEN",
        "HF_TOKEN",
        "GITHUB_PAT",
        "DB_PASS",
        "NPM_AUTH",
        "SENTRY_DSN",
        "SSL_PRIVKEY",
        "SESSION_COOKIE",
    ],
)
def test_credential_variables(name: str) -> None:
    assert credentials.is_credential_variable(name)


@pytest.mark.parametrize(
    "name",
    [
        "PWD",
        "OLDPWD",
        "HOME",
        "PATH",
        "TOKENIZERS_PARALLELISM",
        "PYTHON_KEYRING_BACKEND",
        "PYTEST_ADDOPTS",
        "PYTEST_SOMETHING_TOKEN",
        "GITHUB_ACTIONS",
        "KEYBOARD",
        "SSH_CONNECTION",
        "LANG",
        "XDG_RUNTIME_DIR",
        "PATHEXT",
        "BYPASS_CACHE",
        "XAUTHORITY",
    ],
)
def test_ordinary_variables(name: str) -> None:
    assert not credentials.is_credential_variable(name)


def test_withheld_variables_and_passed_patterns() -> None:
    environ = {"GITHUB_TOKEN": "x", "AWS_REGION": "eu", "AWS_SECRET_ACCESS_KEY": "y", "HOME": "/h", "DB_PASSWORD": "z"}
    assert credentials.withheld_variables(environ) == [
        "AWS_REGION",
        "AWS_SECRET_ACCESS_KEY",
        "DB_PASSWORD",
        "GITHUB_TOKEN",
    ]
    assert credentials.withheld_variables(environ, ["github_token", "AWS_REG*"]) == [
        "AWS_SECRET_ACCESS_KEY",
        "DB_PASSWORD",
    ]


# -- the places -------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake home with an ssh key, aws credentials and an npmrc."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("KEY")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("[default]\n")
    (home / ".npmrc").write_text("//registry/:_authToken=x\n")
    (home / "notes.txt").write_text("not a credential\n")
    return home


def _under(places: list[str], home: Path) -> list[str]:
    return [os.path.relpath(p, home) for p in places if p.startswith(f"{home}/")]


def test_hidden_places_exist_only(home: Path) -> None:
    places = credentials.hidden_places(str(home), environ={})
    assert _under(places, home) == [".aws", ".npmrc", ".ssh"]
    assert places == sorted(set(places))


def test_hidden_places_extra_and_removed(home: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    link_target = tmp_path / "real-ssh"
    link_target.mkdir()
    (home / ".ssh" / "id_rsa").unlink()
    (home / ".ssh").rmdir()
    (home / ".ssh").symlink_to(link_target)
    extra = ["~/notes.txt", str(tmp_path / "elsewhere"), "!~/.npmrc", "~/missing"]
    places = credentials.hidden_places(str(home), extra, environ={})
    assert _under(places, home) == [".aws", "notes.txt"]
    assert str(link_target) in places  # the symlink's target, not the link
    assert str(tmp_path / "elsewhere") in places


def test_hidden_places_from_variables(home: Path, tmp_path: Path) -> None:
    kube_a, kube_b = tmp_path / "kube-a", tmp_path / "kube-b"
    kube_a.write_text("a")
    kube_b.write_text("b")
    runtime = tmp_path / "run-user"
    (runtime / "gnupg").mkdir(parents=True)
    environ = {"KUBECONFIG": f"{kube_a}:{kube_b}:relative", "XDG_RUNTIME_DIR": str(runtime)}
    places = credentials.hidden_places(str(home), environ=environ)
    assert {str(kube_a), str(kube_b), str(runtime / "gnupg")} <= set(places)


def test_hidden_places_under_xdg_config_home_and_registry_client_keys(home: Path, tmp_path: Path) -> None:
    """Red team round 7: the registry client reads $XDG_CONFIG_HOME/containers/auth.json and certs.d client
    keys; a sandbox read both (and $XDG_CONFIG_HOME/gh)."""
    config = tmp_path / "xdg"
    for place in ("containers/auth.json", "gh/hosts.yml", "containers/certs.d/reg:5000/client.key"):
        (config / place).parent.mkdir(parents=True, exist_ok=True)
        (config / place).write_text("secret")
    (home / ".config" / "containers" / "certs.d").mkdir(parents=True)
    places = set(credentials.hidden_places(str(home), environ={"XDG_CONFIG_HOME": str(config)}))
    assert {str(config / "containers/auth.json"), str(config / "gh"), str(config / "containers/certs.d")} <= places
    assert str(home / ".config" / "containers" / "certs.d") in places
    assert "/etc/docker/certs.d/*/*.key" in credentials.SYSTEM_PLACES


@pytest.mark.rootless  # root reads every file
def test_unreadable_places_are_left_alone(home: Path) -> None:
    (home / ".npmrc").chmod(0)
    assert _under(credentials.hidden_places(str(home), environ={}), home) == [".aws", ".ssh"]
    assert "/etc/shadow" not in credentials.hidden_places(str(home), environ={})


@pytest.mark.parametrize(
    ("entry", "normal"),
    [
        ("~/.config/x/", "~/.config/x"),
        ("~", "~"),
        ("/etc//secret", "/etc/secret"),
        ("!~/.kube", "!~/.kube"),
        ("/", None),
        ("relative", None),
        ("~/../etc", None),
        ("~user/x", None),
    ],
)
def test_check_place(entry: str, normal: str | None) -> None:
    assert credentials.check_place(entry) == normal


def test_spec_fields_validated() -> None:
    spec = validate({"hide": ["~/x", "/y/"], "env_pass": ["A_TOKEN"]}, "here")
    assert spec.hide == ("/y", "~/x") and spec.env_pass == ("A_TOKEN",)
    hash(spec)
    with pytest.raises(pytest.UsageError, match=r"here: invalid hide='rel'"):
        validate({"hide": ["rel"]}, "here")
    with pytest.raises(pytest.UsageError, match=r"here: invalid hide='~/x'.*expected a list"):
        validate({"hide": "~/x"}, "here")
    with pytest.raises(pytest.UsageError, match=r"here: invalid env_pass='A=B'"):
        validate({"env_pass": ["A=B"]}, "here")


def test_plan_masks(tmp_path: Path, home: Path) -> None:
    """A place under a fresh tmpfs is gone already unless an overlay brings it back; nested ones collapse."""
    hidden = [str(home / ".ssh"), str(home / ".ssh" / "id_rsa"), str(home / ".npmrc"), "/tmp/never-there"]
    plan = rootfs.make_plan(writable=[str(home)], needed=[], hidden=hidden)
    assert plan.hidden == ((str(home / ".npmrc"), False), (str(home / ".ssh"), True))
    assert hash(plan)
    if str(tmp_path).startswith("/tmp/"):
        assert rootfs.make_plan(writable=[], needed=[], hidden=hidden).hidden == ()


SCRUB = """
import os, sys
from pytest_sandbox import credentials
credentials.scrub_environment(["GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY"])
with open("/proc/self/environ", "rb") as f:
    block = f.read()
print("ENVIRON", b"GITHUB_TOKEN" in block, b"ghp-secret" in block, b"AWS_" in block, b"KEEP=kept" in block)
print("OS", "GITHUB_TOKEN" in os.environ, os.environ.get("KEEP"), os.getenv("AWS_SECRET_ACCESS_KEY"))
import subprocess
out = subprocess.run(["env"], capture_output=True, text=True).stdout
print("CHILD", "GITHUB_TOKEN" in out, "KEEP=kept" in out)
"""


def test_scrub_environment() -> None:
    env = {"PATH": os.environ["PATH"], "GITHUB_TOKEN": "ghp-secret", "AWS_SECRET_ACCESS_KEY": "aws", "KEEP": "kept"}
    out = subprocess.run([sys.executable, "-c", SCRUB], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["ENVIRON False False False True", "OS False kept None", "CHILD False True"]


# -- end to end -------------------------------------------------------------------------------------

INNER = """
import ctypes, os, socket, pytest

HOME = os.environ["HOME"]


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return type(exc).__name__


def environ_block():
    with open("/proc/self/environ", "rb") as f:
        return f.read()


@pytest.mark.container
def test_credentials_masked():
    assert os.listdir(f"{HOME}/.ssh") == [] and os.listdir(f"{HOME}/.aws") == []
    assert read(f"{HOME}/.ssh/id_rsa") == "FileNotFoundError"
    assert read(f"{HOME}/.npmrc") == ""
    with pytest.raises(OSError):
        open(f"{HOME}/.npmrc", "w")
    with pytest.raises(OSError):
        open(f"{HOME}/.ssh/new", "w")
    assert read(f"{HOME}/notes.txt") == "not a credential\\n"
    assert read(f"{HOME}/.config/extra/secret") == "FileNotFoundError"  # sandbox_hide
    assert read(f"{HOME}/per-test") == "per test\\n"  # hidden only where the marker says so
    with socket.socket(socket.AF_UNIX) as agent:
        with pytest.raises(OSError):
            agent.connect(os.environ.get("SSH_AUTH_SOCK") or AGENT)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.umount2(f"{HOME}/.ssh".encode(), 2) != 0 and os.listdir(f"{HOME}/.ssh") == []  # no capabilities
    with open("/dev/shm/scratch", "w") as f:  # the masks' staging tmpfs lies under the sandbox's own /dev/shm
        f.write("x")
    assert os.listdir("/dev/shm") == ["scratch"]
    if os.geteuid() == 0:
        assert read("/etc/shadow") == ""
    else:
        assert read("/etc/shadow") == "PermissionError"  # as without the sandbox


AGENT = __AGENT__


@pytest.mark.container
def test_variables_withheld():
    block = environ_block()
    for name in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "SSH_AUTH_SOCK"):
        assert name not in os.environ
        assert name.encode() not in block
    assert b"aws-secret-value" not in block and b"ghp-secret-value" not in block
    assert os.environ["MY_PASSED_TOKEN"] == "passed" and b"MY_PASSED_TOKEN=passed" in block
    assert os.environ["ORDINARY"] == "plain"


@pytest.mark.container(hide=["~/per-test"])
def test_marker_hide():
    assert read(f"{HOME}/per-test") == ""
    assert read(f"{HOME}/.config/extra/secret") == "FileNotFoundError"  # the session's still hidden


@pytest.mark.container(env={"GITHUB_TOKEN": "mine"})
def test_env_wins():
    assert os.environ["GITHUB_TOKEN"] == "mine"


def test_unsandboxed_sees_everything():
    assert read(f"{HOME}/.ssh/id_rsa") == "KEY"
    assert os.environ["GITHUB_TOKEN"] == "ghp-secret-value"
    assert b"AWS_SECRET_ACCESS_KEY=aws-secret-value" in environ_block()
"""


@pytest.fixture
def fake_home(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """$HOME with credentials, credential variables and an ssh agent socket for the inner pytest.

    The agent's socket lies in a directory on sys.path, which sandboxes show as a plain bind
    (a socket under an overlay, like $HOME, cannot be connected to anyway).
    """
    home = pytester.path / "home"
    for rel, text in [
        (".ssh/id_rsa", "KEY"),
        (".aws/credentials", "[default]\n"),
        (".npmrc", "//registry/:_authToken=x\n"),
        (".config/extra/secret", "extra\n"),
        ("per-test", "per test\n"),
        ("notes.txt", "not a credential\n"),
    ]:
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret-value")
    monkeypatch.setenv("MY_PASSED_TOKEN", "passed")
    monkeypatch.setenv("ORDINARY", "plain")
    agent_dir = tmp_path_factory.mktemp("agent")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(agent_dir), os.environ.get("PYTHONPATH")])))
    agent_path = agent_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX) as agent:
        agent.bind(str(agent_path))
        agent.listen()
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_path))
        pytester.makeini("[pytest]\nsandbox_hide = ~/.config/extra\nsandbox_env_pass = my_passed_*\n")
        pytester.makepyfile(test_inner=INNER.replace("__AGENT__", repr(str(agent_path))))
        yield home


def test_sandbox_cannot_read_credentials(pytester: pytest.Pytester, fake_home: Path) -> None:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=5)


def test_header_counts_and_lists(pytester: pytest.Pytester, fake_home: Path) -> None:
    places = credentials.hidden_places(str(fake_home), ["~/.config/extra"])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--co", "-v")
    header = [line for line in result.outlines if line.startswith("sandbox hides: ")]
    listed = [line.split(": ", 1)[1] for line in result.outlines if line.startswith("  hidden: ")]
    withheld = [line.split("$", 1)[1] for line in result.outlines if line.startswith("  withheld: ")]
    assert listed == places
    assert {f"{fake_home}/{p}" for p in (".ssh", ".aws", ".npmrc", ".config/extra")} <= set(listed)
    assert os.environ["SSH_AUTH_SOCK"] in listed
    assert {"AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "SSH_AUTH_SOCK"} <= set(withheld)
    assert "MY_PASSED_TOKEN" not in withheld and "ORDINARY" not in withheld
    assert header == [
        f"sandbox hides: {len(listed)} credential places, {len(withheld)} variables "
        "(sandbox_hide, sandbox_env_pass to change)"
    ]
    quiet = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--co", "-q")
    assert not any(line.startswith("  hidden: ") for line in quiet.outlines)


@pytest.mark.parametrize(
    ("ini", "marker", "message"),
    [
        ("sandbox_hide = relative/path", "", "ini sandbox_hide: invalid hide='relative/path'"),
        ("sandbox_env_pass = A=B", "", "ini sandbox_env_pass: invalid env_pass='A=B'"),
        ("", "hide=['/']", "test_bad.py::test_x: @pytest.mark.container: invalid hide='/'"),
        ("", "hide='~/.x'", "test_bad.py::test_x: @pytest.mark.container: invalid hide='~/.x'"),
    ],
)
def test_bad_values_are_usage_errors(pytester: pytest.Pytester, ini: str, marker: str, message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_bad=f"import pytest\n\n@pytest.mark.container({marker})\ndef test_x(): pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any(message in line for line in result.errlines), result.errlines


def test_a_url_with_a_password_is_withheld_whatever_its_name() -> None:
    environ = {
        "DATABASE_URL": "postgres://app:s3cret@db:5432/app",
        "REDIS_URL": "redis://:s3cret@cache:6379/0",
        "PLAIN_URL": "https://example.org/path",
        "USER_ONLY_URL": "https://user@example.org/",
        "PYTEST_DB_URL": "postgres://app:s3cret@db/app",
    }
    assert credentials.withheld_variables(environ) == ["DATABASE_URL", "REDIS_URL"]


# -- tokens in the checkout's git config --------------------------------------------------------------

CHECKOUT_CONFIG = """\
[core]
\trepositoryformatversion = 0
[remote "origin"]
\turl = https://x-access-token:ghs_FAKE0001@github.com/o/r.git
\tfetch = +refs/heads/*:refs/remotes/origin/*
[remote "mirror"]
\turl = git@github.com:o/r.git
[http "https://github.com/"]
\textraheader = AUTHORIZATION: basic RkFLRTAwMDI=
[submodule "lib"]
\turl = https://gitlab-ci-token:FAKE0003@gitlab.example/o/lib.git
"""


def test_scrub_git_config_takes_out_headers_and_url_passwords_only() -> None:
    scrubbed = credentials.scrub_git_config(CHECKOUT_CONFIG)
    assert scrubbed is not None
    for secret in ("FAKE0001", "RkFLRTAwMDI", "FAKE0003", "extraheader"):
        assert secret not in scrubbed
    assert "url = https://github.com/o/r.git" in scrubbed
    assert "url = https://gitlab.example/o/lib.git" in scrubbed
    assert "url = git@github.com:o/r.git" in scrubbed  # ssh's user is no secret
    assert credentials.scrub_git_config("[core]\n\tbare = false\n") is None


def test_the_git_config_of_a_worktree_is_its_repositorys(tmp_path: Path) -> None:
    main = tmp_path / "main"
    (main / ".git" / "worktrees" / "wt").mkdir(parents=True)
    (main / ".git" / "config").write_text(CHECKOUT_CONFIG)
    (main / ".git" / "worktrees" / "wt" / "commondir").write_text("../..\n")
    worktree = tmp_path / "wt" / "sub"
    worktree.mkdir(parents=True)
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {main}/.git/worktrees/wt\n")
    assert credentials.scrubbed_git_configs([str(worktree), str(main)]) == [
        (str(main / ".git" / "config"), credentials.scrub_git_config(CHECKOUT_CONFIG))
    ]
    assert credentials.scrubbed_git_configs([str(tmp_path / "elsewhere")]) == []


def test_a_ci_runners_other_git_credentials_are_scrubbed_too(tmp_path: Path) -> None:
    """Red team round 33, a GitHub runner's layout: actions/checkout now keeps the token in a file under
    $RUNNER_TEMP that .git/config includes, and the ssh key input in one its core.sshCommand names; older
    checkouts put the extraheader in each submodule's config; ~/.gitconfig may carry a token in a URL."""
    home, temp = tmp_path / "home" / "runner", tmp_path / "home" / "runner" / "work" / "_temp"
    repo = home / "work" / "repo" / "repo"
    (repo / ".git" / "modules" / "sub").mkdir(parents=True)
    temp.mkdir()
    (temp / "git-credentials-5f0c.config").write_text(
        '[http "https://github.com/"]\n\textraheader = AUTHORIZATION: basic FAKE-INCLUDED\n'
    )
    (temp / "5f0c-key").write_text("FAKE-SSH-KEY")
    (repo / ".git" / "config").write_text(
        "[core]\n\tbare = false\n"
        f'\tsshCommand = "ssh" -i "{temp}/5f0c-key" -o StrictHostKeyChecking=accept-new\n'
        f'[includeIf "gitdir:{repo}/.git"]\n\tpath = {temp}/git-credentials-5f0c.config\n'
    )
    (repo / ".git" / "modules" / "sub" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "modules" / "sub" / "config").write_text(CHECKOUT_CONFIG)
    (home / ".gitconfig").write_text('[url "https://x-access-token:FAKE-GLOBAL@github.com/"]\n\tinsteadOf = gh:\n')
    scrubbed = dict(credentials.scrubbed_git_configs([str(repo)], str(home)))
    assert scrubbed[str(temp / "git-credentials-5f0c.config")] == '[http "https://github.com/"]\n'
    assert scrubbed[str(temp / "5f0c-key")] == ""
    assert scrubbed[str(repo / ".git" / "modules" / "sub" / "config")] == credentials.scrub_git_config(CHECKOUT_CONFIG)
    assert "FAKE-GLOBAL" not in scrubbed[str(home / ".gitconfig")]
    assert str(repo / ".git" / "config") not in scrubbed  # nothing secret in it: left as it is
    assert all("FAKE" not in text for text in scrubbed.values())


def test_git_config_and_other_tokens_in_the_environment_are_withheld() -> None:
    environ = {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.https://github.com/.extraheader",
        "GIT_CONFIG_VALUE_0": "AUTHORIZATION: basic FAKE",
        "GIT_CONFIG_PARAMETERS": "'http.extraheader'='AUTHORIZATION: basic FAKE'",
        "SSHPASS": "x",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/X",
        "BW_SESSION": "x",
        "SONAR_LOGIN": "x",
        "GIT_AUTHOR_NAME": "CI",
    }
    assert credentials.withheld_variables(environ) == sorted(set(environ) - {"GIT_AUTHOR_NAME"})


@pytest.mark.parametrize(
    "args",
    [("--sandbox=all",), ("--sandbox=all", "--sandbox-durations=1"), ("--sandbox=hermetic",)],
    ids=["scope-sandbox", "sandbox-each", "hermetic"],
)
def test_a_ci_checkouts_token_in_its_git_config_stays_out(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """actions/checkout leaves the job's token in the repository's .git/config (an http extraheader), GitLab
    in the remote's URL: a test reads the file without them, and git there still works."""
    (pytester.path / ".git").mkdir()
    (pytester.path / ".git" / "config").write_text(CHECKOUT_CONFIG)
    pytester.makepyfile("""
        import pathlib

        def test_reads_the_config():
            text = pathlib.Path(__file__).with_name(".git").joinpath("config").read_text()
            assert "FAKE000" not in text and "RkFLRTAwMDI" not in text, text
            assert "https://github.com/o/r.git" in text
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=1)
    assert "FAKE0001" in (pytester.path / ".git" / "config").read_text()  # the host's file is as it was


@pytest.mark.parametrize("args", [("--sandbox=all",), ("--sandbox=hermetic",)], ids=["all", "hermetic"])
def test_a_runners_included_credentials_and_ssh_key_stay_out(
    pytester: pytest.Pytester, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """actions/checkout v4+: the token in a file .git/config includes, the ssh key where sshCommand says."""
    temp = tmp_path / "_temp"
    temp.mkdir()
    (temp / "git-credentials-1.config").write_text('[http "https://github.com/"]\n\textraheader = FAKE-INCLUDED\n')
    (temp / "key-1").write_text("FAKE-SSH-KEY")
    (pytester.path / ".git").mkdir()
    (pytester.path / ".git" / "config").write_text(
        f"[core]\n\tsshCommand = ssh -i {temp}/key-1\n[include]\n\tpath = {temp}/git-credentials-1.config\n"
    )
    pytester.makepyfile(f"""
        import os

        def test_reads_them():
            for name in ("git-credentials-1.config", "key-1"):
                path = os.path.join({str(temp)!r}, name)
                assert not os.path.exists(path) or "FAKE" not in open(path).read(), name
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=1)
