"""Fixtures a sandboxed test can ask for."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from .errors import SandboxError
from .layers import commands
from .runtime import test_process
from .spec import SandboxSpec


class Sandbox:
    """The sandbox this test runs in; with ``image=``, commands run in that image.

    The image's root is mounted once per test with a read/write layer that dies
    with the test: every ``run``/``spawn`` of the test sees the same files, and
    the test itself can read and write them under ``root``.
    """

    def __init__(self, spec: SandboxSpec | None, image: Any, image_root: str) -> None:
        self.spec = spec
        self.active = spec is not None
        self.image: str | None = image.name if image is not None else None
        self.root: str | None = image_root or None
        self.config: dict[str, Any] = json.loads(image.config_json) if image is not None else {}
        self.host_based = bool(image is not None and image.host_based)

    def path(self, inside: str) -> str:
        """Where a path of the image's filesystem is, seen from the test."""
        return os.path.join(self._require_root(), inside.lstrip("/"))

    def _require_root(self) -> str:
        if self.root is None:
            if self.spec is None:
                raise SandboxError(
                    "this test does not run in a sandbox (is --sandbox=off?); "
                    "sandbox.run() needs @pytest.mark.container(image=...)"
                )
            raise SandboxError("this test has no image: use @pytest.mark.container(image=NAME) to run commands in one")
        return self.root

    def _run_spec(
        self, argv: Sequence[str] | str, env: Mapping[str, str] | None, workdir: str | None, user: str | None
    ) -> tuple[commands.RunSpec, int, int]:
        root = self._require_root()
        assert self.spec is not None
        args = ("/bin/sh", "-c", argv) if isinstance(argv, str) else tuple(argv)
        if not args:
            raise ValueError("sandbox.run: empty command")
        user_text = self.config.get("User") or "" if user is None else user
        if self.host_based:
            if user is not None:
                raise SandboxError(
                    "sandbox.run(user=...) is not available in a FROM host image: commands run "
                    "as the test's own user there"
                )
            uid, gid, home = os.getuid(), os.getgid(), os.environ.get("HOME", "/")
        else:
            uid, gid, home = commands.resolve_user(root, user_text)
        full_env = commands.image_env(
            self.config.get("Env") or [], {**dict(self.spec.env), **(env or {})}, home, self.spec.hostname
        )
        run = commands.RunSpec(
            argv=args,
            env=full_env,
            workdir=workdir or self.config.get("WorkingDir") or "/",
            hostname=self.spec.hostname,
            network="inherit",
            share_dev=True,
        )
        return run, uid, gid

    def spawn(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start a command in the image (a ``subprocess.Popen``); it shares the test's network."""
        run, uid, gid = self._run_spec(argv, env, workdir, user)
        root = self._require_root()
        if self.host_based:  # the test already runs in this image: a plain child process
            return subprocess.Popen(list(run.argv), env=dict(run.env), cwd=run.workdir, **popen_kwargs)
        return commands.spawn(lambda: root, run, uid, gid, **popen_kwargs)

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: str | bytes | None = None,
        check: bool = False,
        timeout: float | None = None,
        text: bool = True,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the image to completion, capturing stdout and stderr (like ``subprocess.run``)."""
        proc = self.spawn(
            argv,
            env=env,
            workdir=workdir,
            user=user,
            text=text,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if check:
            result.check_returncode()
        return result


@pytest.fixture
def sandbox() -> Sandbox:
    """The sandbox this test runs in (``sandbox.active`` is False when it runs unsandboxed)."""
    plan = test_process.ACTIVE_PLAN
    return Sandbox(test_process.ACTIVE_SPEC, plan.image if plan else None, plan.image_root if plan else "")
