"""The registry client against a real registry: distribution's registry (Debian's docker-registry), started
on 127.0.0.1 for each test: plain, over TLS with htpasswd (bcrypt) Basic auth, and with bearer tokens from
a token service of the test's own (JWTs signed RS256 by openssl, as distribution checks them)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_inputs import SKOPEO, skopeo_digest
from registry_server import make_ca, openssl, self_signed, without_credentials

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
    directory: Path,
    tls: tuple[str, str] | None = None,
    users: dict[str, str] | None = None,
    auth: list[str] | None = None,
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
    config += auth or []
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


class TokenService:
    """distribution's token auth: a JWT (RS256, signed by openssl, its certificate in the x5c header) per
    request, granting the scopes asked for to ``users`` (Basic credentials) and pulls to anyone. What each
    request asked for is kept in ``asked``."""

    def __init__(self, directory: Path, users: dict[str, str], service: str = "sandbox-tests") -> None:
        self.directory, self.users, self.service = directory, users, service
        self.asked: list[tuple[str | None, list[str]]] = []
        self_signed(directory, "token", "/CN=token signer")
        der = openssl(directory, "x509", "-in", "token.pem", "-outform", "DER")
        self.x5c = base64.b64encode(der).decode()
        service_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                status, body = service_self.answer(self.headers.get("Authorization"), query)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def granted(self, user: str | None, *scopes: str) -> bool:
        """Whether one token request of ``user`` asked for all of ``scopes`` at once."""
        return any(who == user and set(scopes) <= set(asked) for who, asked in self.asked)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def config(self) -> list[str]:
        return [
            "auth:",
            "  token:",
            f"    realm: {self.realm}",
            f"    service: {self.service}",
            "    issuer: sandbox-token-service",
            f"    rootcertbundle: {self.directory / 'token.pem'}",
        ]

    def answer(self, authorization: str | None, query: dict[str, list[str]]) -> tuple[int, bytes]:
        user = None
        if authorization and authorization.startswith("Basic "):
            name, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            if self.users.get(name) != password:
                return 401, b'{"details": "bad credentials"}'
            user = name
        scopes = query.get("scope", [])
        self.asked.append((user, scopes))
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            allowed = [a for a in actions.split(",") if user is not None or a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {
            "iss": "sandbox-token-service",
            "sub": user or "",
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        token = self.sign({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}, claims)
        return 200, json.dumps({"token": token, "expires_in": 300}).encode()

    def sign(self, header: dict[str, object], claims: dict[str, object]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = openssl(self.directory, "dgst", "-sha256", "-sign", "token.key", data=signing_input.encode())
        return f"{signing_input}.{b64(signature)}"


@pytest.fixture(autouse=True)
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return without_credentials(tmp_path / "home", monkeypatch)


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
            assert skopeo_digest(f"docker://{host}/other/app:2") == digest


def _cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", *args], input=password, capture_output=True, text=True, timeout=60
    )


def test_htpasswd_over_tls_with_distribution(tmp_path: Path, no_credentials: Path) -> None:
    ca, chain = make_ca(str(tmp_path))
    project, noise = _project(tmp_path)
    store = Store(str(tmp_path / "store"))
    build.Builder(store, str(project / "images")).build("app")
    with distribution(tmp_path / "registry", tls=chain, users={"ci": "s3cret"}) as host:
        with pytest.raises(reg.RegistryError, match="certificate"):  # nobody trusts its CA yet
            reg.push_image(store, "app", f"{host}/team/app:1")
        certs = no_credentials / ".config/containers/certs.d" / host  # its CA for this registry only
        certs.mkdir(parents=True)
        shutil.copy(ca, certs / "ca.crt")
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


def test_bearer_tokens_from_a_token_service_with_distribution(tmp_path: Path, no_credentials: Path) -> None:
    """Anonymous pull tokens, a push token for the credentials docker's config.json holds, scopes merged
    for a cross-repository mount (push here, pull there)."""
    project, noise = _project(tmp_path)
    store = Store(str(tmp_path / "store"))
    build.Builder(store, str(project / "images")).build("app")
    (tmp_path / "tokens").mkdir()
    tokens = TokenService(tmp_path / "tokens", {"ci": "s3cret"})
    try:
        with distribution(tmp_path / "registry", auth=tokens.config()) as host:
            with pytest.raises(reg.RegistryError, match="not authorized \\(no credentials for") as refused:
                reg.push_image(store, "app", f"{host}/team/app:1")  # a pull-only token cannot push
            assert "UNAUTHORIZED" in str(refused.value)  # distribution's own words
            config = no_credentials / ".docker" / "config.json"
            config.parent.mkdir()
            config.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"ci:s3cret").decode()}}}))
            digest = reg.push_image(store, "app", f"{host}/team/app:1")
            assert tokens.granted("ci", "repository:team/app:pull,push")

            config.unlink()  # anonymous from here: pulls only
            fresh = Store(str(tmp_path / "fresh"))
            assert reg.pull_image(fresh, f"{host}/team/app:1", "app").source.endswith(digest)
            assert _file(fresh, "app", "/noise") == noise
            assert tokens.granted(None, "repository:team/app:pull")

            config.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"ci:s3cret").decode()}}}))
            said: list[str] = []
            assert reg.push_image(fresh, "app", f"{host}/other/app:1", said.append) == digest
            assert any(line.endswith(" mounted") for line in said), said
            assert tokens.granted("ci", "repository:other/app:pull,push", "repository:team/app:pull")
    finally:
        tokens.close()
