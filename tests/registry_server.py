"""A small OCI distribution registry for the tests: ``http.server`` in a thread on 127.0.0.1.

It implements what pulls and pushes use (and what skopeo, a real client, needs to push and pull):
``/v2/``, manifests (GET/HEAD/PUT by tag or digest), blobs (GET/HEAD), uploads (POST, PATCH, GET status, PUT,
cross-repository mount), and optionally Basic auth or bearer tokens from its own ``/token``.
Every request is logged, so tests can count what was asked for; faults are switched on by attributes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import re
import secrets
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_UPLOADS_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/(?P<id>[0-9a-f]*)$")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """An in-memory registry. ``auth``: None (open), "basic" or "bearer" (``users`` may log in; with
    ``anonymous_pull`` a token for pulling is given without credentials)."""

    def __init__(
        self,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        anonymous_pull: bool = False,
        tls: tuple[str, str] | None = None,
        client_ca: str | None = None,
    ) -> None:
        self.auth, self.users, self.anonymous_pull = auth, dict(users or {}), anonymous_pull
        self.blobs: dict[str, bytes] = {}
        self.linked: dict[str, set[str]] = {}  # repository -> digests of blobs it holds
        self.manifests: dict[str, dict[str, tuple[str, bytes]]] = {}  # repository -> digest -> (type, body)
        self.tags: dict[str, dict[str, str]] = {}  # repository -> tag -> digest
        self.uploads: dict[str, bytearray] = {}
        self.tokens: dict[str, set[str]] = {}  # token -> granted "repository:NAME:ACTION"
        self.closed: set[str] = set()  # repositories the token service grants nobody anything on
        self.log: list[tuple[str, str, int, str | None]] = []  # method, path, status, Authorization
        self.last_challenge = ""  # the WWW-Authenticate of the newest 401
        self.corrupt: set[str] = set()  # blobs served with a flipped byte
        self.redirect_blobs: Registry | None = None  # blob GETs answered with a 307 to this one
        self.rate_limit = 0  # this many requests answered 429 first
        self.cut_after: int | None = None  # blob bodies end after this many bytes (a cut connection)...
        self.cuts: int | None = None  # ...this many times (None: every time)
        self.ranges = True  # GET blob with Range: bytes=N- answered 206
        self.chunked = False  # blob bodies sent chunked, without a Content-Length (as some CDNs do)
        self.max_body: int | None = None  # larger request bodies are refused with 413 (a proxy's limit)
        self.drop_patches = 0  # this many PATCHes lose their chunk and the connection (the client resumes)
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"registry": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # (certificate chain file, key file)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            if client_ca is not None:  # mutual TLS: only clients with a certificate this CA signed
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=client_ca)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Registry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int, str | None]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # -- content, put in directly ------------------------------------------------------------
    def add_blob(self, repository: str, data: bytes) -> dict[str, Any]:
        digest = digest_of(data)
        with self._lock:
            self.blobs[digest] = data
            self.linked.setdefault(repository, set()).add(digest)
        return {"digest": digest, "size": len(data)}

    def add_manifest(self, repository: str, manifest: dict[str, Any], tag: str | None = None) -> str:
        body = json.dumps(manifest, indent=1).encode()
        digest = digest_of(body)
        with self._lock:
            self.manifests.setdefault(repository, {})[digest] = (manifest["mediaType"], body)
            if tag:
                self.tags.setdefault(repository, {})[tag] = digest
        return digest

    def add_image(
        self,
        repository: str,
        tag: str | None,
        layers: Sequence[bytes],
        env: Sequence[str] = (),
        architecture: str = "amd64",
        docker: bool = False,
    ) -> str:
        """An image of uncompressed layer tars (gzipped here); the manifest digest."""
        descriptors, diff_ids = [], []
        for tar in layers:
            blob = gzip.compress(tar, mtime=0)
            descriptors.append({"mediaType": MT_LAYER, **self.add_blob(repository, blob)})
            diff_ids.append(digest_of(tar))
        config = {
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": list(env)},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_desc = {"mediaType": MT_CONFIG, **self.add_blob(repository, json.dumps(config).encode())}
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_DOCKER_MANIFEST if docker else MT_MANIFEST,
            "config": config_desc,
            "layers": descriptors,
        }
        return self.add_manifest(repository, manifest, tag)

    def add_index(self, repository: str, tag: str, entries: Sequence[tuple[str, dict[str, str]]]) -> str:
        """An index of (manifest digest, platform) entries of ``repository``."""
        manifests = []
        for digest, platform in entries:
            media_type, body = self.manifests[repository][digest]
            manifests.append({"mediaType": media_type, "digest": digest, "size": len(body), "platform": platform})
        return self.add_manifest(repository, {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}, tag)

    def token(self, scopes: set[str]) -> str:
        value = secrets.token_hex(16)
        self.tokens[value] = scopes
        return value


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: Registry  # set on the subclass each Registry makes

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- answers --------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.registry.log.append((self.command, self.path, status, self.headers.get("Authorization")))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- auth -----------------------------------------------------------------------
    def _user(self) -> str | None:
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.registry.users.get(user) == password else None

    def _token_endpoint(self, query: dict[str, list[str]]) -> None:
        user = self._user()
        if self.headers.get("Authorization") and user is None:
            self._error(401, "UNAUTHORIZED", "bad credentials")
            return
        granted = set()
        for scope in query.get("scope", []):
            _kind, name, actions = scope.split(":")
            for action in actions.split(","):
                if name in self.registry.closed:
                    continue
                if user is not None or (self.registry.anonymous_pull and action == "pull"):
                    granted.add(f"repository:{name}:{action}")
        body = json.dumps({"token": self.registry.token(granted), "expires_in": 300}).encode()
        self._send(200, body, {"Content-Type": "application/json"})

    def _allowed(self, name: str | None, action: str) -> bool:
        """Whether the request may go on; if not, the 401 has been sent."""
        if self.registry.auth is None:
            return True
        header = self.headers.get("Authorization") or ""
        if self.registry.auth == "basic":
            if self._user() is not None:
                return True
            self._error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": 'Basic realm="test"'})
            return False
        scope = f"repository:{name}:{action}" if name else ""
        granted = self.registry.tokens.get(header[7:]) if header.startswith("Bearer ") else None
        if granted is not None and (not scope or scope in granted):
            return True
        challenge = f'Bearer realm="{self.registry.scheme}://{self.registry.host}/token",service="test-registry"'
        if scope:
            challenge += f',scope="repository:{name}:{"pull,push" if action == "push" else "pull"}"'
        if granted is not None:
            challenge += ',error="insufficient_scope"'
        self.registry.last_challenge = challenge
        self._error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
        return False

    # -- routing --------------------------------------------------------------------
    def _route(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        if self.registry.rate_limit > 0:
            self.registry.rate_limit -= 1
            self._body()
            self._error(429, "TOOMANYREQUESTS", "slow down", {"Retry-After": "0"})
            return
        if path == "/token":
            self._token_endpoint(query)
            return
        if path.startswith("/direct/"):  # where another registry redirects its blob GETs
            data = self.registry.blobs.get(path[len("/direct/") :])
            self._send(200 if data else 404, data or b"")
            return
        action = "pull" if self.command in ("GET", "HEAD") else "push"
        if path == "/v2/":
            if self._allowed(None, action):
                self._send(200, b"{}", {"Content-Type": "application/json"})
            return
        for regex, method in (
            (_MANIFEST_RE, self._manifest),
            (_BLOB_RE, self._blob),
            (_UPLOADS_RE, self._upload),
        ):
            match = regex.match(path)
            if match:
                if self._allowed(match["name"], action):
                    method(match, query)
                return
        self._error(404, "NAME_UNKNOWN", f"no route {path}")

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _route

    def _manifest(self, match: re.Match[str], _query: dict[str, list[str]]) -> None:
        name, ref = match["name"], match["ref"]
        if self.command == "PUT":
            body = self._body()
            manifest = json.loads(body)
            for desc in [manifest.get("config"), *manifest.get("layers", [])]:
                if desc and desc["digest"] not in self.registry.linked.get(name, set()):
                    self._error(400, "BLOB_UNKNOWN", f"blob {desc['digest']} is not in {name}")
                    return
            digest = digest_of(body)
            if ref.startswith("sha256:") and ref != digest:
                self._error(400, "DIGEST_INVALID", "manifest digest does not match")
                return
            media_type = self.headers.get("Content-Type") or manifest.get("mediaType")
            with self.registry._lock:
                self.registry.manifests.setdefault(name, {})[digest] = (media_type, body)
                if not ref.startswith("sha256:"):
                    self.registry.tags.setdefault(name, {})[ref] = digest
            self._send(201, b"", {"Docker-Content-Digest": digest, "Location": f"/v2/{name}/manifests/{digest}"})
            return
        digest = ref if ref.startswith("sha256:") else self.registry.tags.get(name, {}).get(ref, "")
        found = self.registry.manifests.get(name, {}).get(digest)
        if found is None:
            self._error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {name}:{ref}")
            return
        media_type, body = found
        self._send(200, body, {"Content-Type": media_type, "Docker-Content-Digest": digest})

    def _blob(self, match: re.Match[str], _query: dict[str, list[str]]) -> None:
        name, digest = match["name"], match["digest"]
        if digest not in self.registry.linked.get(name, set()):
            self._error(404, "BLOB_UNKNOWN", f"blob unknown: {digest}")
            return
        if self.registry.redirect_blobs is not None and self.command == "GET":
            self.registry.redirect_blobs.blobs[digest] = self.registry.blobs[digest]
            self._send(307, b"", {"Location": f"http://{self.registry.redirect_blobs.host}/direct/{digest}"})
            return
        data = self.registry.blobs[digest]
        if digest in self.registry.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        status, headers = 200, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and self.registry.ranges and self.command == "GET":
            start = int(wanted[1])
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
            data = data[start:]
        cut = self.registry.cut_after
        if cut is not None and self.command == "GET" and self.registry.cuts != 0 and cut < len(data):
            if self.registry.cuts is not None:
                self.registry.cuts -= 1
            self.registry.log.append((self.command, self.path, status, self.headers.get("Authorization")))
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[:cut])
            self.close_connection = True
            return
        if self.registry.chunked and self.command == "GET":
            self.registry.log.append((self.command, self.path, status, self.headers.get("Authorization")))
            self.send_response(status)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 1000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data[i : i + 1000]), data[i : i + 1000]))
            self.wfile.write(b"0\r\n\r\n")
            return
        self._send(status, data, headers)

    def _upload(self, match: re.Match[str], query: dict[str, list[str]]) -> None:
        name, upload = match["name"], match["id"]
        if self.command == "POST":
            self._body()
            mount, source = query.get("mount", [""])[0], query.get("from", [""])[0]
            if mount and source and not self._allowed(source, "pull"):  # as distribution: pull on the source
                return
            if mount and mount in self.registry.linked.get(source, set()):
                self.registry.linked.setdefault(name, set()).add(mount)
                self._send(201, b"", {"Location": f"/v2/{name}/blobs/{mount}", "Docker-Content-Digest": mount})
                return
            upload = secrets.token_hex(8)
            self.registry.uploads[upload] = bytearray()
            self._send(202, b"", {"Location": f"/v2/{name}/blobs/uploads/{upload}", "Range": "0-0"})
            return
        if upload not in self.registry.uploads:
            self._error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
            return
        here = {"Location": f"/v2/{name}/blobs/uploads/{upload}"}
        if self.command == "GET":  # the upload's status: what the registry has so far
            self._send(204, b"", {**here, "Range": f"0-{max(len(self.registry.uploads[upload]) - 1, 0)}"})
            return
        body = self._body()
        if self.registry.max_body is not None and len(body) > self.registry.max_body:
            self._error(413, "SIZE_INVALID", f"request body larger than {self.registry.max_body} bytes")
            return
        if self.command == "PATCH" and self.registry.drop_patches > 0:
            self.registry.drop_patches -= 1
            self.close_connection = True
            self.connection.shutdown(2)  # no answer: the chunk is lost on the way
            return
        content_range = self.headers.get("Content-Range")
        if self.command == "PATCH" and content_range:
            start, _, end = content_range.partition("-")
            if int(start) != len(self.registry.uploads[upload]) or int(end) != int(start) + len(body) - 1:
                self._send(416, b"", {**here, "Range": f"0-{max(len(self.registry.uploads[upload]) - 1, 0)}"})
                return
        self.registry.uploads[upload] += body
        if self.command == "PATCH":
            size = len(self.registry.uploads[upload])
            headers = {"Location": f"/v2/{name}/blobs/uploads/{upload}", "Range": f"0-{max(size - 1, 0)}"}
            self._send(202, b"", headers)
            return
        if self.command != "PUT":
            self._error(405, "UNSUPPORTED", self.command)
            return
        data = bytes(self.registry.uploads.pop(upload))
        digest = query.get("digest", [""])[0]
        if digest_of(data) != digest:
            self._error(400, "DIGEST_INVALID", f"upload hashes to {digest_of(data)}, not {digest}")
            return
        self.registry.add_blob(name, data)
        self._send(201, b"", {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest})


def without_credentials(home: Path, monkeypatch: Any) -> Path:
    """No credentials of whoever runs the tests: ``home`` as an empty HOME, none of the variables that
    name credential files."""
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "DOCKER_AUTH_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def serve(**kwargs: Any) -> Iterator[Registry]:
    """A started registry for a fixture (``yield from serve()``), stopped after."""
    with Registry(**kwargs) as registry:
        yield registry


def openssl(directory: str | os.PathLike[str], *args: str, data: bytes | None = None) -> bytes:
    """Run openssl in ``directory``; what it printed."""
    return subprocess.run(["openssl", *args], input=data, check=True, capture_output=True, cwd=directory).stdout


def self_signed(directory: str | os.PathLike[str], name: str, subject: str) -> None:
    """``name``.key and ``name``.pem: an RSA key and a certificate it signed itself, for two days."""
    openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.pem", "-days", "2", "-subj", subject)  # fmt: skip


def make_ca(directory: str) -> tuple[str, tuple[str, str]]:
    """A CA and a certificate it signed for 127.0.0.1 (openssl): (CA file, (certificate, key))."""
    self_signed(directory, "ca", "/CN=test CA")
    openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "host.key", "-out", "host.csr", "-subj",
            "/CN=127.0.0.1")  # fmt: skip
    with open(f"{directory}/ext.cnf", "w") as f:
        f.write(
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
    openssl(
        directory,
        "x509",
        "-req",
        "-in",
        "host.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "host.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return f"{directory}/ca.pem", (f"{directory}/host.pem", f"{directory}/host.key")


def make_client_certificate(directory: str) -> tuple[str, str]:
    """A client certificate signed by ``make_ca``'s CA in ``directory``: (certificate, key)."""
    openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
            "-subj", "/CN=ci client")  # fmt: skip
    with open(f"{directory}/client.cnf", "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl(directory, "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "2", "-extfile", "client.cnf")  # fmt: skip
    return f"{directory}/client.pem", f"{directory}/client.key"
