"""The first hour of a new user, from README.md itself: the quickstart's test command and every
``pytest-sandbox`` command of the README's ``sh`` blocks, run in order in a fresh copy of the project
(a fresh store too), as whoever runs the suite (root, and the plain user of the CI's user lane).
A README command that fails, or any traceback, fails the test: the README cannot drift from the CLI."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from oci_inputs import BUSYBOX, _tar
from registry_server import Registry

pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")

CHECKOUT = Path(__file__).resolve().parent.parent
README = CHECKOUT / "README.md"
EXAMPLE_ID = "3f3416427da3"  # the kept container the README's examples name: replaced by a real one
FAILING = """
import pytest

@pytest.mark.container(image="tools")
def test_leaves_state(sandbox):
    sandbox.run("echo left > /var/lib/app/left", check=True)
    assert False, "fails on purpose: its layer is kept"
"""


def sh_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the heading above it, its lines) for every fenced ```sh block."""
    blocks, heading = [], ""
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```sh":
            body = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                body.append(inner.strip())
            blocks.append((heading, body))
    return blocks


def readme_commands() -> tuple[list[list[str]], list[list[str]]]:
    """The quickstart's pytest commands (``Set up``; pip and tox are the installing part) and every
    ``pytest-sandbox`` command line of the README, comments stripped, in README order."""
    quickstart, cli = [], []
    for heading, body in sh_blocks(README.read_text()):
        for line in body:
            words = shlex.split(line, comments=True)
            if heading == "Set up":
                for part in " ".join(words).split(" && "):
                    if part.startswith("pytest "):
                        quickstart.append(shlex.split(part))
            elif words[:1] == ["pytest-sandbox"]:
                cli.append(words)
    return quickstart, cli


def test_the_readme_has_what_this_test_runs() -> None:
    """The extraction finds the quickstart and the commands of every part of the CLI (no silent zero)."""
    quickstart, cli = readme_commands()
    assert quickstart == [["pytest", "examples", "-v"]]
    verbs = {tuple(c[1:3]) if c[1] in ("images", "containers") else (c[1],) for c in cli}
    for expected in [("doctor",), ("version",), ("run",), ("shell",), ("commit",), ("images", "build")]:
        assert expected in verbs, f"README has no `pytest-sandbox {' '.join(expected)}` example"
    assert ("images", "import") in verbs and ("images", "export") in verbs and ("containers", "prune") in verbs
    assert any(EXAMPLE_ID in c for c in cli)


def on_test_registry(argv: list[str], registry: Registry, pinned: str) -> list[str]:
    """The README's registry examples pointed at the suite's registry on 127.0.0.1: a README command never
    reaches the network (a host left over is an error here, not a request)."""
    out = []
    for word in argv:
        for remote in ("docker.io/", "registry.example.org:5000/"):
            if word.startswith(remote):
                word = f"{registry.host}/{word[len(remote) :]}"
        if word.startswith("ghcr.io/owner/tool@"):
            word = f"{registry.host}/owner/tool@{pinned}"
        out.append(word)
    remote = [w for w in out if re.match(r"[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?/", w) and not w.startswith(registry.host)]
    assert not remote, f"a README command names a registry this test does not map: {remote}"
    return out


def fresh_project(tmp_path: Path) -> Path:
    """A copy of what a checkout gives a newcomer: the README, pyproject, examples and images."""
    project = tmp_path / "checkout"
    project.mkdir()
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(CHECKOUT / name, project / name)
    for name in ("examples", "images"):
        shutil.copytree(CHECKOUT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A README command as typed: ``pytest`` and ``pytest-sandbox`` are this venv's."""
    program = {"pytest": [sys.executable, "-m", "pytest"], "pytest-sandbox": [sys.executable, "-m", "pytest_sandbox"]}
    return subprocess.run(
        [*program[argv[0]], *argv[1:]],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # `shell` without a command: the shell reads EOF and ends
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quickstart_and_every_readme_command(tmp_path: Path) -> None:
    project = fresh_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_SANDBOX_", "PYTEST_ADDOPTS"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # a newcomer's empty store
    quickstart, cli = readme_commands()
    failures = []

    def check(argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
        output = result.stdout + result.stderr
        if result.returncode != 0 or "Traceback" in output:
            failures.append(f"$ {shlex.join(argv)}  -> exit {result.returncode}\n{output[-3000:]}")

    for argv in quickstart:
        result = run([*argv, "-p", "no:cacheprovider"], project, env)
        check(argv, result)
        assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]
    # the README's kept container comes from a failed test, as in the README
    (project / "test_broken.py").write_text(FAILING)
    failed = run(["pytest", "--sandbox-keep=failed", "-p", "no:cacheprovider", "test_broken.py"], project, env)
    kept = re.search(r"read/write layer kept as ([0-9a-f]+): pytest-sandbox shell \1", failed.stdout)
    assert kept, failed.stdout[-3000:] + failed.stderr
    with Registry() as registry:
        registry.add_image(
            "library/alpine", "3.20", [_tar([("etc", "dir", b""), ("etc/alpine-release", "file", b"3.20\n")])]
        )
        registry.add_image("team/base", "1.4", [_tar([("etc", "dir", b""), ("etc/base", "file", b"base\n")])])
        pinned = registry.add_image("owner/tool", None, [_tar([("tool", "file", b"tool\n")])])
        for argv in cli:
            argv = on_test_registry([kept.group(1) if word == EXAMPLE_ID else word for word in argv], registry, pinned)
            check(argv, run(argv, project / "examples", env))  # from a subdirectory, as pytest finds the rootdir
    assert not failures, "\n\n".join(failures)
    assert (tmp_path / "cache" / "pytest-sandbox" / "images" / "broken.json").exists()  # commit used pytest's store
