"""The registry client against a real registry: distribution's registry (Debian's docker-registry), started
on 127.0.0.1 for each test, plain and over TLS with htpasswd (bcrypt) Basic auth."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_inputs import SKOPEO
from registry_server import make_ca

from pytest_sandbox.layers import build
from pytest_sandbox.layers import registry as reg
from pytest_sandbox.layers.store import Store

DISTRIBUTION = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(
    DISTRIBUTION is None, reason="host lacks distribution's registry (apt install docker-registry)"
)


def _bcrypt(password: str) -> str | None:
    """htpasswd's bcrypt hash through libcrypt (Python's crypt module, gone in 3.13), None without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    return hashed if hashed and hashed.startswith("$2") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def distribution(
    directory: Path, tls: tuple[str, str] | None = None, users: dict[str, str] | None = None
) -> Iterator[str]:
    """A running registry; its host:port. Its storage is ``directory/data``; it is stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = [
        "version: 0.1",
        "log: {level: error}",
        f"storage: {{filesystem: {{rootdirectory: {directory / 'data'}}}, delete: {{enabled: true}}}}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {os.urandom(16).hex()}",
    ]
    if tls:
        config += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if users:
        lines = []
        for user, password in users.items():
            hashed = _bcrypt(password)
            if hashed is None:
                pytest.skip("host lacks bcrypt for htpasswd (Python's crypt module with libxcrypt)")
            lines.append(f"{user}:{hashed}\n")
        (directory / "htpasswd").write_text("".join(lines))
        config += ["auth:", f"  htpasswd: {{realm: sandbox-tests, path: {directory / 'htpasswd'}}}"]
    (directory / "config.yml").write_text("\n".join(config) + "\n")
    assert DISTRIBUTION is not None
    proc = subprocess.Popen([DISTRIBUTION, "serve", str(directory / "config.yml")], stderr=subprocess.PIPE)
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {proc.stderr.read() if proc.stderr else ''!r}")
            time.sleep(0.05)
        yield host
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(autouse=True)
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "DOCKER_AUTH_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def _project(tmp_path: Path) -> tuple[Path, bytes]:
    """An image with a file gzip cannot shrink (its layer goes up in several chunks when they are small)."""
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    noise = os.urandom(700 * 1024)
    (project / "images" / "noise").write_bytes(noise)
    (project / "images" / "app.Containerfile").write_text("FROM scratch\nCOPY noise /noise\nENV MODE=real\n")
    return project, noise


def _file(store: Store, image: str, path: str) -> bytes:
    found = build._find_in(store, list(store.require(image).layers), path)
    assert found is not None, path
    return Path(found).read_bytes()


def test_push_pull_mount_and_chunks_with_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, noise = _project(tmp_path)
    store = Store(str(tmp_path / "store"))
    build.Builder(store, str(project / "images")).build("app")
    monkeypatch.setattr(reg, "CHUNK_SIZE", 256 * 1024)  # the layer goes up in three PATCHes
    with distribution(tmp_path / "registry") as host:
        digest = reg.push_image(store, "app", f"{host}/team/app:1")
        fresh = Store(str(tmp_path / "fresh"))
        pulled = reg.pull_image(fresh, f"{host}/team/app:1", "app")
        assert pulled.source == f"{host}/team/app@{digest}"
        assert _file(fresh, "app", "/noise") == noise
        assert pulled.config["Env"] == store.require("app").config["Env"]
        # pushed again from the pulled copy, to another repository: mounted, the same digest
        said: list[str] = []
        assert reg.push_image(fresh, "app", f"{host}/other/app:2", said.append) == digest
        assert any(line.endswith(" mounted") for line in said), said
        # by digest, and a manifest that is not there
        assert reg.pull_image(Store(str(tmp_path / "third")), f"{host}/team/app@{digest}", "app").layers
        with pytest.raises(reg.RegistryError, match="MANIFEST_UNKNOWN"):
            reg.pull_image(fresh, f"{host}/team/app:nosuch", "x")
        if SKOPEO is not None:
            raw = subprocess.run(
                [SKOPEO, "inspect", "--tls-verify=false", "--raw", f"docker://{host}/other/app:2"],
                check=True,
                capture_output=True,
            ).stdout
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest


def _cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", *args], input=password, capture_output=True, text=True, timeout=60
    )


def test_htpasswd_over_tls_with_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_credentials: Path
) -> None:
    ca, chain = make_ca(str(tmp_path))
    project, noise = _project(tmp_path)
    store = Store(str(tmp_path / "store"))
    build.Builder(store, str(project / "images")).build("app")
    with distribution(tmp_path / "registry", tls=chain, users={"ci": "s3cret"}) as host:
        with pytest.raises(reg.RegistryError, match="certificate"):  # nobody trusts its CA yet
            reg.push_image(store, "app", f"{host}/team/app:1")
        monkeypatch.setenv("SSL_CERT_FILE", ca)
        with pytest.raises(reg.RegistryError, match=f"not authorized \\(no credentials for {host}\\)"):
            reg.push_image(store, "app", f"{host}/team/app:1")
        wrong = _cli("login", host, "-u", "ci", "--password-stdin", password="wrong\n")
        assert wrong.returncode == 2 and "401" in wrong.stderr, wrong.stderr
        ok = _cli("login", host, "-u", "ci", "--password-stdin", password="s3cret\n")
        assert ok.returncode == 0, ok.stderr
        assert json.loads((no_credentials / ".docker/config.json").read_text())["auths"][host]

        digest = reg.push_image(store, "app", f"{host}/team/app:1")
        fresh = Store(str(tmp_path / "fresh"))
        assert reg.pull_image(fresh, f"{host}/team/app:1", "app").source.endswith(digest)
        assert _file(fresh, "app", "/noise") == noise
        # the registry's own answer, to be sure what the client did reached it
        request = urllib.request.Request(f"https://{host}/v2/team/app/tags/list")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca), timeout=10)
