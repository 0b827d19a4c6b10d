"""Pull and push images over the OCI distribution API (Docker Hub, GHCR, a registry of your own).

Standard library only (``http.client`` + ``ssl``): the API is a few GET/HEAD/POST/PUT requests and
a bearer-token exchange, and the store already verifies and unpacks layers (``oci.unpack_chain``), so
a client library would bring dependencies for little. What is implemented:

* references ``[HOST[:PORT]/]REPO[:TAG][@sha256:DIGEST]`` (``docker.io/library/`` by default, as docker);
* ``WWW-Authenticate``: Bearer (token exchange, anonymous or with Basic credentials; ``token`` or
  ``access_token``, ``expires_in`` 60 s by default, one retry on ``insufficient_scope``) and Basic;
  credentials from ``$DOCKER_AUTH_CONFIG``, ``$REGISTRY_AUTH_FILE``, containers' ``auth.json``,
  ``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json`` and their ``docker-credential-*`` helpers;
* HTTPS with the system CAs plus a registry's own CAs and client certificate from ``certs.d`` (as podman
  and docker keep them; ``SSL_CERT_FILE`` for another system bundle); plain HTTP only for loopback hosts
  and ``sandbox_insecure_registries`` (whose TLS is not verified either); ``Authorization`` is never sent
  to another host a redirect leads to; 429/503 ``Retry-After`` waited for;
* pull: OCI and Docker v2 manifests and indexes (linux/this arch picked), every blob verified while it
  streams (``oci.unpack_chain``: nothing half-pulled is published), a broken download resumed with
  ``Range``, layers the store has never requested;
* push: blob HEAD, cross-repository mount, monolithic upload, manifest last;
* ``login``/``logout`` (docker's config.json format) and ``images.lock`` (registry FROMs pinned to digests).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import IO, Any, NamedTuple

from ..linux.files import write_json_atomic
from . import oci, tarlayer
from .format import NAME_RE
from .store import Image, Store, StoreError, check_name

DEFAULT_REGISTRY = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_MAX_MANIFEST = 4 << 20  # distribution refuses manifests past 4 MiB too
_RETRIES = 3  # 429/503 answers waited for before giving up
_MAX_WAIT = 30.0  # longest Retry-After honoured, seconds
CHUNK_SIZE = 32 << 20  # a blob larger than this is uploaded in PATCH chunks of this size
_TIMEOUT = 60.0

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_COMPONENT_RE = re.compile(_COMPONENT)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HOST_RE = re.compile(
    r"(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*"
    r"|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
REFERENCE_RULE = "[HOST[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. docker.io/library/alpine:3.20"

Progress = Callable[[str], None]


class RegistryError(StoreError):
    """A registry refused or failed a request, or a reference is not valid (the message says which)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status the registry answered, if it came to that


# -- references ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reference:
    """An image in a registry: ``registry/repository`` plus a tag, a digest or both."""

    registry: str  # host[:port]; "docker.io" for Docker Hub
    repository: str  # "library/alpine"
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return (
            f"{self.registry}/{self.repository}"
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )

    @property
    def host(self) -> str:
        """Where the API is: Docker Hub's lives on another name than its references use."""
        return _DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def reference(self) -> str:
        """What ``/v2/<repository>/manifests/`` is asked for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def default_name(self) -> str:
        """The store name a pull gives without one: the repository's last part and the tag unless latest."""
        base = self.repository.rsplit("/", 1)[-1][:128]
        name = f"{base}:{self.tag}" if self.tag and self.tag != "latest" else base
        return name if NAME_RE.match(name) else base


def looks_like_registry(text: str) -> bool:
    """Whether a ``FROM`` names a registry image rather than one of images/ or the store: its first
    part is a host (has '.' or ':', or is ``localhost``), or it pins a digest. ``FROM alpine`` stays a
    local name; write ``docker.io/library/alpine``."""
    if oci.is_reference(text):
        return False
    first, slash, _rest = text.partition("/")
    return bool(slash and ("." in first or ":" in first or first == "localhost")) or "@" in text


def parse_reference(text: str, where: str = "image reference") -> Reference:
    """Parse a reference as docker does; errors name the part that is wrong and what is allowed."""

    def bad(part: str, value: str, rule: str) -> RegistryError:
        return RegistryError(
            f"{where} {text!r}: {part} {value!r} is not valid: {rule} (a reference is {REFERENCE_RULE})"
        )

    if not text or text != text.strip():
        raise bad("the reference", text, "it is empty or has spaces around it")
    if "://" in text:
        raise bad("the reference", text, "no scheme (https://): write the host and repository")
    name, at, digest = text.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise bad("digest", digest, "sha256: and 64 lower-case hex digits")
    tag = None
    slash = name.rfind("/")
    if ":" in name[slash + 1 :]:
        name, tag = name.rsplit(":", 1)
        if not _TAG_RE.fullmatch(tag):
            raise bad("tag", tag, "letters, digits, '_', '.', '-', up to 128, not starting with '.' or '-'")
    parts = name.split("/")
    registry = DEFAULT_REGISTRY
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts.pop(0)
        match = _HOST_RE.fullmatch(registry)
        if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
            raise bad("registry", registry, "a host name or [IPv6] address with an optional :PORT (1-65535)")
        if registry in _DOCKER_HUB_ALIASES:
            registry = DEFAULT_REGISTRY
    for part in parts:
        if not _COMPONENT_RE.fullmatch(part):
            raise bad(
                "repository part",
                part,
                "lower-case letters and digits, separated by one '.', one or two '_' or '-'s, parts joined by '/'",
            )
    repository = "/".join(parts)
    if registry == DEFAULT_REGISTRY and len(parts) == 1:
        repository = f"library/{repository}"
    if len(repository) > 255:
        raise bad("repository", repository, "at most 255 characters")
    return Reference(registry, repository, tag if tag or at else "latest", digest or None)


def cache_key(ref: Reference) -> str:
    """The store's build-cache entry for a reference: what a pull of it gave last (``FROM`` reuses it)."""
    return "registry-" + hashlib.sha256(str(ref).encode()).hexdigest()


def certs_d_dirs(registry: str) -> list[str]:
    """Where a registry's own CAs and client certificate live, in containers-certs.d(5)'s order: the user's
    ``certs.d`` of containers, then the system's of containers and of docker (``HOST[:PORT]`` directories)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    roots = (os.path.join(config_home, "containers/certs.d"), "/etc/containers/certs.d", "/etc/docker/certs.d")
    return [os.path.join(root, registry) for root in roots]


def _trust_registry_certs(context: ssl.SSLContext, registry: str) -> None:
    """Add the CAs (``*.crt``) and client certificate (``*.cert`` with its ``*.key``) of ``registry``'s
    first ``certs.d`` directory that exists to ``context``, over the system's CAs."""
    for directory in certs_d_dirs(registry):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        try:
            for name in names:
                path = os.path.join(directory, name)
                if name.endswith(".crt"):
                    context.load_verify_locations(cafile=path)
                elif name.endswith(".cert"):
                    key = path[: -len(".cert")] + ".key"
                    if not os.path.exists(key):
                        raise RegistryError(f"{path}: a client certificate needs its key next to it ({key})")
                    context.load_cert_chain(path, key)
        except (ssl.SSLError, OSError) as exc:
            raise RegistryError(f"{directory}: cannot load {name}: {exc}") from None
        return


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- credentials -----------------------------------------------------------------------------


def _auth_configs() -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, parsed config) for each place docker, podman and skopeo keep registry credentials."""
    inline = os.environ.get("DOCKER_AUTH_CONFIG")
    if inline:
        try:
            yield "$DOCKER_AUTH_CONFIG", json.loads(inline)
        except ValueError:
            raise RegistryError("$DOCKER_AUTH_CONFIG is not valid JSON (it holds a config.json's text)") from None
    home = os.path.expanduser("~")
    paths = [
        os.environ.get("REGISTRY_AUTH_FILE", ""),
        os.path.join(os.environ.get("XDG_RUNTIME_DIR", ""), "containers", "auth.json")
        if os.environ.get("XDG_RUNTIME_DIR")
        else "",
        os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "containers", "auth.json"),
        os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json"),
    ]
    for path in paths:
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    yield path, json.load(f)
            except (OSError, ValueError) as exc:
                raise RegistryError(f"cannot read the registry credentials in {path}: {exc}") from None


def _auth_key(key: str) -> str:
    """``https://index.docker.io/v1/`` and ``docker.io`` name the same registry in an auths map."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_ALIASES else host


def _helper(name: str, registry: str, where: str) -> tuple[str, str] | None:
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        raise RegistryError(f"{where} names the credential helper {name!r}: docker-credential-{name} is not on PATH")
    server = "https://index.docker.io/v1/" if registry == DEFAULT_REGISTRY else registry
    proc = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous
    try:
        data = json.loads(proc.stdout)
        return str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"docker-credential-{name} get gave no Username/Secret JSON for {server}") from None


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for a registry from the first place that has any, or None (anonymous)."""
    for where, config in _auth_configs():
        helpers = config.get("credHelpers") or {}
        for key, helper in helpers.items():
            if _auth_key(key) == registry:
                return _helper(str(helper), registry, where)
        for key, entry in (config.get("auths") or {}).items():
            if _auth_key(key) != registry or not isinstance(entry, dict):
                continue
            if entry.get("username") and entry.get("password"):
                return str(entry["username"]), str(entry["password"])
            if entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    sep = ""
                if not sep:
                    raise RegistryError(f"{where}: the auth of {key} is not base64 of USER:PASSWORD")
                return user, password
        if config.get("credsStore"):
            found = _helper(str(config["credsStore"]), registry, where)
            if found is not None:
                return found
    return None


def parse_registry(text: str) -> str:
    """``login``'s argument: a registry host[:port] (``docker.io`` for Docker Hub's names)."""
    host = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    match = _HOST_RE.fullmatch(host)
    if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
        raise RegistryError(f"registry {text!r} is not valid: a host name or [IPv6] address with an optional :PORT")
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_ALIASES else host


def auth_file() -> str:
    """Where ``login`` writes: ``$REGISTRY_AUTH_FILE``, else docker's ``config.json`` (``$DOCKER_CONFIG``,
    ``~/.docker``), which docker, podman and skopeo all read."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return os.environ["REGISTRY_AUTH_FILE"]
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def _auth_entry_key(registry: str) -> str:
    return "https://index.docker.io/v1/" if registry == DEFAULT_REGISTRY else registry


def _update_auth_file(change: Callable[[dict[str, Any]], None]) -> str:
    path = auth_file()
    config: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                config = dict(json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise RegistryError(f"cannot read {path}: {exc}") from None
    change(config)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    write_json_atomic(path, config)  # a new file, mode 0600
    return path


def login(text: str, user: str, password: str, insecure: Collection[str] = ()) -> str:
    """Check the credentials with the registry (``GET /v2/`` through its auth), then keep them in
    ``auth_file()``; that file's path."""
    registry = parse_registry(text)
    if not user or not password:
        raise RegistryError("login needs a user name and a password (or token)")
    client = Client(registry, lambda _r: (user, password), registry in insecure)
    _response, conn = client.request("GET", "/v2/", [], what=f"login to {registry}")
    conn.close()
    entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    return _update_auth_file(
        lambda config: config.setdefault("auths", {}).__setitem__(_auth_entry_key(registry), entry)
    )


def logout(text: str) -> str:
    """Forget the credentials ``auth_file()`` keeps for a registry; that file's path."""
    registry = parse_registry(text)

    def change(config: dict[str, Any]) -> None:
        auths = config.get("auths") or {}
        found = [key for key in auths if _auth_key(key) == registry]
        if not found:
            raise RegistryError(f"{auth_file()} holds no credentials for {registry}")
        for key in found:
            del auths[key]

    return _update_auth_file(change)


# -- HTTP ------------------------------------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"`` -> ("bearer", params)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _PARAM_RE.finditer(rest):
        value = match[2] if match[2] is not None else match[3]
        params[match[1].lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def _error_text(status: int, body: bytes) -> str:
    """The registry's own words: ``{"errors": [{"code": ..., "message": ...}]}``."""
    try:
        errors = json.loads(body).get("errors") or []
        said = "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors)
    except (ValueError, AttributeError):
        said = body.decode(errors="replace").strip()[:200]
    return f"HTTP {status}" + (f" ({said})" if said else "")


_RESUMES = 10  # a blob download broken this often is given up


class _Stream(io.RawIOBase):
    """A blob's body as a file. A connection lost part way is resumed where it broke (``Range``), as long as
    each try brings more bytes; otherwise it is a RegistryError, never a short read."""

    Opener = Callable[[int], tuple[http.client.HTTPResponse, http.client.HTTPConnection]]

    def __init__(self, opener: Opener, what: str) -> None:
        self.opener, self.what, self.read_bytes, self.resumed = opener, what, 0, 0
        self.response, self.conn = opener(0)
        self.expected = self.response.length  # Content-Length; http.client ends short bodies without an error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                n = self.response.readinto(buffer)
            except (http.client.HTTPException, OSError) as exc:
                self._resume(f"after {self.read_bytes} bytes ({exc!r})")
                continue
            self.read_bytes += n
            # without a Content-Length (chunked) the end is the end; with one, an early end is a break
            if n or not len(buffer) or self.expected is None or self.read_bytes >= self.expected:
                return n
            self._resume(f"after {self.read_bytes} of {self.expected} bytes")

    def _resume(self, broke: str) -> None:
        start = self.read_bytes
        self.response.close()
        self.conn.close()
        if self.resumed >= _RESUMES:
            raise RegistryError(f"{self.what}: the connection broke {broke}, {self.resumed} times resumed: given up")
        self.resumed += 1
        self.response, self.conn = self.opener(start)
        ranged = self.response.status == 206 and (self.response.getheader("Content-Range") or "").startswith(
            f"bytes {start}-"
        )
        if not ranged and not (start == 0 and self.response.status == 200):
            raise RegistryError(f"{self.what}: the connection broke {broke} and the registry cannot resume it")
        if self.response.length == 0:
            raise RegistryError(f"{self.what}: the connection broke {broke}; resuming brought nothing")

    def close(self) -> None:
        if not self.closed:
            self.response.close()
            self.conn.close()
        super().close()


class Client:
    """Requests to one registry, with its scheme, tokens and credentials."""

    def __init__(
        self, registry: str, lookup: Callable[[str], tuple[str, str] | None] = credentials, insecure: bool = False
    ) -> None:
        self.registry = registry
        self.insecure = insecure  # sandbox_insecure_registries: TLS unverified, or plain HTTP
        self.host = _DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry
        self._lookup = lookup
        self._creds: tuple[str, str] | None = None
        self._looked_up = False
        self._scheme: str | None = None
        self._auth: dict[frozenset[str], tuple[str, float]] = {}  # scopes -> (Authorization, expiry)
        self._basic = False  # the registry asked for Basic auth
        self._ssl = ssl.create_default_context()  # system CAs; SSL_CERT_FILE / SSL_CERT_DIR for others
        _trust_registry_certs(self._ssl, registry)
        if insecure:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE

    # -- transport ---------------------------------------------------------------------------
    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=_TIMEOUT, context=self._ssl)
        return http.client.HTTPConnection(netloc, timeout=_TIMEOUT)

    def _describe(self, exc: BaseException, url: str) -> str:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate of {url} not trusted ({exc.verify_message}): put its CA in "
                f"{certs_d_dirs(self.registry)[0]}/ca.crt (as podman and docker read it), add it to the "
                "system's, or name a CA bundle in SSL_CERT_FILE"
            )
        if isinstance(exc, ConnectionRefusedError):
            return f"{url}: connection refused (is the registry running, is the port right?)"
        if isinstance(exc, OSError) and "Name or service not known" in str(exc):
            return f"{url}: unknown host"
        return f"{url}: {exc}"

    def scheme(self) -> str:
        """https, or for a loopback or insecure host plain http when it does not speak TLS (as docker does)."""
        if self._scheme is None:
            if _is_loopback(self.host) or self.insecure:
                conn = self._connection("https", self.host)
                try:
                    conn.request("GET", "/v2/")
                    conn.getresponse().read()
                    self._scheme = "https"
                except ssl.SSLCertVerificationError as exc:  # it speaks TLS: never fall back to plain HTTP
                    raise RegistryError(self._describe(exc, f"https://{self.host}/v2/")) from None
                except (ssl.SSLError, ConnectionResetError, http.client.HTTPException):
                    self._scheme = "http"
                except OSError as exc:
                    raise RegistryError(self._describe(exc, f"https://{self.host}/v2/")) from None
                finally:
                    conn.close()
            else:
                self._scheme = "https"
        return self._scheme

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | str | None
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, str]:
        """One request, following GET/HEAD redirects; ``Authorization`` goes only to the registry itself."""
        for _hop in range(6):
            parts = urllib.parse.urlsplit(url)
            conn = self._connection(parts.scheme, parts.netloc)
            sent = dict(headers)
            if parts.netloc != self.host:
                sent.pop("Authorization", None)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                if isinstance(body, str):  # a file: streamed, with its length
                    with open(body, "rb") as f:
                        sent["Content-Length"] = str(os.fstat(f.fileno()).st_size)
                        conn.request(method, target, body=f, headers=sent)
                else:
                    conn.request(method, target, body=body, headers=sent)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise RegistryError(self._describe(exc, url)) from None
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD") and location:
                response.read()
                conn.close()
                url = urllib.parse.urljoin(url, location)
                continue
            return response, conn, url
        raise RegistryError(f"{url}: more than 5 redirects")

    # -- authentication ----------------------------------------------------------------------
    def _credentials(self) -> tuple[str, str] | None:
        if not self._looked_up:
            self._creds, self._looked_up = self._lookup(self.registry), True
        return self._creds

    def _authorization(self, scopes: frozenset[str]) -> str | None:
        held = self._auth.get(scopes)
        if held and held[1] > time.monotonic():
            return held[0]
        if self._basic:
            creds = self._credentials()
            if creds:
                return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        return None

    def _token(self, params: dict[str, str], key: frozenset[str], scopes: frozenset[str]) -> None:
        """A bearer token for ``scopes`` from the challenge's realm, held for requests that want ``key``."""
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"{self.registry}: a Bearer challenge without realm")
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in sorted(scopes)]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"User-Agent": "pytest-sandbox"}
        creds = self._credentials()
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" and not (
            _is_loopback(parts.netloc) or (self.insecure and parts.netloc == self.host)
        ):
            raise RegistryError(f"{self.registry}: token realm {realm} is not https: credentials not sent there")
        conn = self._connection(parts.scheme, parts.netloc)
        try:
            conn.request("GET", parts.path + "?" + parts.query, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(self._describe(exc, realm)) from None
        finally:
            conn.close()
        if response.status != 200:
            hint = "" if creds else f" (no credentials for {self.registry} found: see pytest-sandbox's README)"
            raise RegistryError(
                f"{self.registry}: token service {realm} refused: {_error_text(response.status, body)}{hint}"
            )
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            expires = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise RegistryError(f"{self.registry}: token service {realm} answered without a token")
        self._auth[key] = (f"Bearer {token}", time.monotonic() + max(expires - 10, expires / 2))

    def request(
        self,
        method: str,
        path: str,
        scopes: Iterable[str],
        headers: dict[str, str] | None = None,
        body: bytes | str | None = None,
        ok: Sequence[int] = (200,),
        what: str = "",
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """``method path`` (path under the registry, or a full URL an upload gave) answered with one of
        ``ok``: authenticates on 401 (one retry, and one more for ``insufficient_scope``), waits out
        429/503 with ``Retry-After``, and turns anything else into a RegistryError with the registry's words.
        The caller reads the response and closes the connection."""
        wanted = frozenset(scopes)
        url = path if "://" in path else f"{self.scheme()}://{self.host}{path}"
        what = what or f"{method} {url}"
        auth_tries, waits = 0, 0
        while True:
            sent = {"User-Agent": "pytest-sandbox", **(headers or {})}
            authorization = self._authorization(wanted)
            if authorization:
                sent["Authorization"] = authorization
            response, conn, final = self._send(method, url, sent, body)
            if response.status in ok:
                return response, conn
            data = response.read() if method != "HEAD" else b""
            conn.close()
            if response.status == 401 and auth_tries < 2:
                scheme, params = parse_challenge(response.getheader("WWW-Authenticate") or "")
                if scheme == "bearer" and (auth_tries == 0 or params.get("error") == "insufficient_scope"):
                    auth_tries += 1
                    self._token(params, wanted, wanted | {s for s in params.get("scope", "").split(" ") if s})
                    continue
                if scheme == "basic" and not self._basic and self._credentials():
                    self._basic, auth_tries = True, auth_tries + 1
                    continue
            if response.status in (429, 503) and waits < _RETRIES:
                waits += 1
                time.sleep(min(_retry_after(response.getheader("Retry-After"), waits), _MAX_WAIT))
                continue
            raise RegistryError(f"{what}: {self._explain(response.status, data, final)}", response.status)

    def _explain(self, status: int, body: bytes, url: str) -> str:
        text = _error_text(status, body)
        if status == 401:
            return f"{text}: not authorized{'' if self._credentials() else f' (no credentials for {self.registry})'}"
        if status == 403:
            return f"{text}: denied"
        if status == 429:
            return f"{text}: rate limited, still after {_RETRIES} waits; try again later or log in"
        if status == 404:
            return f"{text}: not found at {url}"
        return text


def _retry_after(value: str | None, attempt: int) -> float:
    try:
        return max(0.0, float(value)) if value is not None else float(2**attempt)
    except ValueError:
        return float(2**attempt)


# -- pull ------------------------------------------------------------------------------------


def _scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"


def _read_all(response: http.client.HTTPResponse, limit: int, what: str) -> bytes:
    data = response.read(limit + 1)
    if len(data) > limit:
        raise RegistryError(f"{what}: larger than {limit} bytes")
    return data


def _digest(value: Any, what: str) -> str:
    """A digest a registry sent, checked before it becomes part of a URL or a file name."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise RegistryError(f"{what}: digest {value!r} is not sha256:<64 hex digits>")
    return value


class Manifest(NamedTuple):
    """A manifest as the registry sent it: parsed, its digest, media type and the bytes the digest is of."""

    data: dict[str, Any]
    digest: str
    media_type: str
    raw: bytes


def get_manifest(client: Client, ref: Reference, reference: str | None = None) -> Manifest:
    """The manifest ``reference`` (default: the ref's own) names, digest-checked."""
    reference = reference or ref.reference
    what = f"{ref.registry}/{ref.repository}:{reference}" if ":" not in reference else f"{ref}"
    response, conn = client.request(
        "GET",
        f"/v2/{ref.repository}/manifests/{reference}",
        [_scope(ref.repository)],
        {"Accept": ACCEPT},
        what=f"manifest of {what}",
    )
    try:
        body = _read_all(response, _MAX_MANIFEST, f"manifest of {what}")
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
        header_digest = response.getheader("Docker-Content-Digest")
    finally:
        conn.close()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    expected = reference if _DIGEST_RE.fullmatch(reference) else header_digest
    if expected and expected.startswith("sha256:") and expected != digest:
        raise RegistryError(f"manifest of {what}: expected {expected}, the content hashes to {digest}: nothing stored")
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"manifest of {what} is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise RegistryError(f"manifest of {what} is not a JSON object")
    media_type = manifest.get("mediaType") or media_type
    if manifest.get("schemaVersion") == 1:
        raise RegistryError(f"manifest of {what}: Docker schema 1 manifests are not supported (push it again)")
    return Manifest(manifest, digest, media_type, body)


def resolve(client: Client, ref: Reference) -> Manifest:
    """The image manifest for linux/this arch (through an index if the reference names one)."""
    found = get_manifest(client, ref)
    manifest, media_type = found.data, found.media_type
    if media_type in INDEX_TYPES or "manifests" in manifest:
        entries = [d for d in manifest.get("manifests") or [] if isinstance(d, dict)]
        fitting = [d for d in entries if oci.platform_matches(d)]
        if not fitting:
            offered = sorted(
                {"/".join(str((d.get("platform") or {}).get(k, "?")) for k in ("os", "architecture")) for d in entries}
            )
            raise RegistryError(f"{ref}: no image for linux/{oci.ARCH} (the index has {', '.join(offered) or 'none'})")
        found = get_manifest(client, ref, _digest(fitting[0].get("digest"), f"{ref}: index"))
        manifest, media_type = found.data, found.media_type
    if media_type not in MANIFEST_TYPES and "layers" not in manifest:
        raise RegistryError(f"{ref}: {media_type or 'the manifest'} is not an image manifest")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("layers"), list):
        raise RegistryError(f"{ref}: the manifest has no config or layers")
    return found


class _Blobs:
    """A repository's blobs as an ``oci.BlobSource``: a name is a digest."""

    def __init__(self, client: Client, ref: Reference) -> None:
        self.client, self.ref = client, ref

    def open(self, name: str) -> IO[bytes]:
        what = f"blob {self.ref.registry}/{self.ref.repository}@{name}"

        def opener(start: int) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
            headers = {"Range": f"bytes={start}-"} if start else {}
            path = f"/v2/{self.ref.repository}/blobs/{name}"
            return self.client.request("GET", path, [_scope(self.ref.repository)], headers, ok=(200, 206), what=what)

        return io.BufferedReader(_Stream(opener, what), 1 << 16)

    def json(self, digest: str) -> tuple[Any, bytes]:
        """A JSON blob (a config), parsed, and the bytes its digest is of."""
        with self.open(digest) as f:
            data = f.read(_MAX_MANIFEST + 1)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise RegistryError(f"{self.ref}: blob {digest} is corrupt (content hashes to {actual}): nothing stored")
        try:
            return json.loads(data), data
        except ValueError as exc:
            raise RegistryError(f"{self.ref}: config {digest} is not JSON: {exc}") from None


@dataclasses.dataclass
class Pulled:
    """What a pull put in the store (the layers) and what a record of it needs."""

    ref: Reference
    digest: str  # the image manifest's
    layers: list[str]
    diff_ids: list[str]
    config: dict[str, Any]
    origin: dict[str, str] = dataclasses.field(default_factory=dict)  # what a push sends again (see origin_of)

    def entry(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "diff_ids": self.diff_ids,
            "config": self.config,
            "digest": self.digest,
            "origin": self.origin,
        }


def pull_layers(
    store: Store, ref: Reference, progress: Progress | None = None, insecure: Collection[str] = ()
) -> Pulled:
    """Download what the store lacks of ``ref`` and unpack it (caller holds the store lock). Layers whose
    ChainID the store has are not requested; every blob is verified while it streams. ``insecure``:
    the registries sandbox_insecure_registries names."""
    pulled = pull_layers_with(store, ref, Client(ref.registry, insecure=ref.registry in insecure), progress)
    store.cache_put(cache_key(ref), pulled.entry())  # FROM of this reference finds it
    return pulled


def pull_layers_with(
    store: Store,
    ref: Reference,
    client: Client,
    progress: Progress | None = None,
    resolved: Manifest | None = None,
) -> Pulled:
    """pull_layers through a client already made (its tokens reused), of a manifest maybe already resolved."""
    found = resolved or resolve(client, ref)
    manifest, digest = found.data, found.digest
    blobs = _Blobs(client, ref)
    where = f"{ref.registry}/{ref.repository}@{digest}"
    config, config_raw = blobs.json(_digest(manifest["config"].get("digest"), f"{where}: config"))
    layers = []
    for descriptor in manifest["layers"]:
        layer_digest = _digest(descriptor.get("digest") if isinstance(descriptor, dict) else None, f"{where}: layer")
        size, media_type = descriptor.get("size"), descriptor.get("mediaType")
        if not isinstance(size, int) or size < 0 or not isinstance(media_type, str) or len(media_type) > 255:
            raise RegistryError(f"{where}: layer {layer_digest} has no valid size and mediaType")
        clean = {"mediaType": media_type, "digest": layer_digest, "size": size}  # kept in layer.json for a push
        layers.append(oci.LayerRef(layer_digest, layer_digest, clean, f"{ref.registry}/{ref.repository}"))
    diff_ids = oci.config_diff_ids(config, len(layers), where)
    chains = oci.unpack_chain(store, blobs, layers, diff_ids, where, progress, ("downloading", "downloaded"))
    return Pulled(ref, digest, chains, diff_ids, oci.image_config(config), origin_of(found, config_raw))


def origin_of(manifest: Manifest, config: bytes) -> dict[str, str]:
    """A pulled image's manifest and config as the registry had them: pushed again, they keep their digests
    (its history, created time and labels too). Kept as text in the image record; {} if not UTF-8."""
    try:
        return {"manifest": manifest.raw.decode(), "media_type": manifest.media_type, "config": config.decode()}
    except UnicodeDecodeError:
        return {}


def pull_image(
    store: Store,
    text: str,
    name: str | None = None,
    progress: Progress | None = None,
    check: Callable[[str], None] | None = None,
    insecure: Collection[str] = (),
) -> Image:
    """``images pull``: the image ``text`` names, recorded in the store as ``name`` (default: repo[:tag])."""
    ref = parse_reference(text)
    final = check_name(name or ref.default_name(), "image name")
    if check is not None:
        check(final)
    say = progress or (lambda _m: None)
    say(f"pulling {ref}")
    with store.locked():
        pulled = pull_layers(store, ref, progress, insecure)
        image = Image(
            name=final,
            layers=tuple(pulled.layers),
            diff_ids=tuple(pulled.diff_ids),
            config=pulled.config,
            source=f"{ref.registry}/{ref.repository}@{pulled.digest}",
            created=time.time(),
            origin=pulled.origin,
        )
        store.put(image)
    return image


# -- images.lock -----------------------------------------------------------------------------

LOCK_FILE = "images.lock"  # in images/: every registry FROM's reference -> the manifest digest it had


def manifest_digest(ref: Reference, insecure: Collection[str] = ()) -> str:
    """The digest a reference names now (an index's own for a multi-platform image: the lock fits every arch)."""
    return get_manifest(Client(ref.registry, insecure=ref.registry in insecure), ref).digest


def read_lock(path: str) -> dict[str, str]:
    """``images.lock`` as reference -> digest ({} when there is none); a broken one is an error naming it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(
            f"{path}: not a readable lock file ({exc}); make it again with pytest-sandbox images lock"
        ) from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise RegistryError(f'{path}: no "images" object; make it again with pytest-sandbox images lock')
    for ref, digest in images.items():
        parse_reference(ref, f"{path}: reference")
        _digest(digest, f"{path}: {ref}")
    return dict(images)


def write_lock(path: str, images: dict[str, str]) -> str:
    write_json_atomic(path, {"lockVersion": 1, "images": dict(sorted(images.items()))})
    os.chmod(path, 0o644)  # a file of the project, read by whoever builds
    return path


# -- push ------------------------------------------------------------------------------------


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class _Pusher:
    """Blob uploads to one repository: HEAD first, then a cross-repository mount, then a monolithic PUT."""

    def __init__(self, client: Client, ref: Reference, mount_from: str | None) -> None:
        self.client, self.ref = client, ref
        self.mount_from = mount_from if mount_from != ref.repository else None
        self.scopes = [_scope(ref.repository, "pull,push")] + ([_scope(self.mount_from)] if self.mount_from else [])
        self._started: str | None = None  # an upload a refused mount began: the next upload uses it

    def _call(
        self, method: str, path: str, ok: Sequence[int], what: str, also: Sequence[str] = (), **kw: Any
    ) -> http.client.HTTPResponse:
        """One request with the push's scopes and ``also`` (a mount's source); the body read, the line closed."""
        response, conn = self.client.request(method, path, [*self.scopes, *also], ok=ok, what=what, **kw)
        try:
            response.read()
        finally:
            conn.close()
        return response

    def present(self, digest: str, pulled_from: str | None = None) -> str | None:
        """ "exists" or "mounted" when the registry has the blob in the repository now, else None.
        ``pulled_from``: "HOST/REPO" the blob was pulled from; on this registry, it is mounted from there
        rather than from the image's source (a committed or built image has none)."""
        repo = self.ref.repository
        if self._call("HEAD", f"/v2/{repo}/blobs/{digest}", (200, 404), f"HEAD blob {digest}").status == 200:
            return "exists"
        mount_from = self.mount_from
        if pulled_from and pulled_from.startswith(self.ref.registry + "/"):
            mount_from = pulled_from[len(self.ref.registry) + 1 :]
        if mount_from is None or mount_from == repo:
            return None
        query = urllib.parse.urlencode({"mount": digest, "from": mount_from})
        path, what = f"/v2/{repo}/blobs/uploads/?{query}", f"mount of {digest}"
        try:
            response = self._call("POST", path, (201, 202), what, also=[_scope(mount_from)], body=b"")
        except RegistryError as exc:
            if exc.status not in (401, 403, 404):
                raise
            return None  # no right to read the source repository (or it is gone): the blob is uploaded
        if response.status == 201:
            return "mounted"
        self._started = response.getheader("Location")  # not mounted: the registry began an upload instead
        return None

    def upload(self, digest: str, data: str | bytes) -> None:
        """Upload ``data`` (bytes, or a file's path): in one PUT up to CHUNK_SIZE, in PATCH chunks past it
        or where the registry refuses a body that large (413, a proxy's limit)."""
        size = len(data) if isinstance(data, bytes) else os.path.getsize(data)
        location = self._start(digest)
        if size > CHUNK_SIZE:
            self._finish(digest, self._chunks(digest, data, size, location, CHUNK_SIZE), b"")
            return
        try:
            self._finish(digest, location, data)
        except RegistryError as exc:
            # 413: a proxy's body limit; no status: the connection broke (some proxies cut a large body short)
            if exc.status != 413 and not (exc.status is None and size > 1 << 20):
                raise
            chunk = max(size // 8, 1 << 16)
            self._finish(digest, self._chunks(digest, data, size, self._start(digest), chunk), b"")

    def _start(self, digest: str) -> str:
        location, self._started = self._started, None
        if not location:
            response = self._call(
                "POST",
                f"/v2/{self.ref.repository}/blobs/uploads/",
                (202,),
                f"start of the upload of {digest}",
                body=b"",
            )
            location = response.getheader("Location")
        if not location:
            raise RegistryError(f"{self.ref.registry}: the upload of {digest} got no Location")
        return location

    def _url(self, location: str, query: dict[str, str] | None = None) -> str:
        url = urllib.parse.urljoin(f"{self.client.scheme()}://{self.client.host}/", location)
        return url + (("&" if "?" in url else "?") + urllib.parse.urlencode(query) if query else "")

    def _finish(self, digest: str, location: str, data: str | bytes) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        url = self._url(location, {"digest": digest})
        self._call("PUT", url, (201, 204), f"upload of {digest}", headers=headers, body=data)

    def _chunks(self, digest: str, data: str | bytes, size: int, location: str, chunk: int) -> str:
        """PATCH ``data`` in chunks; where one is lost (a broken connection, a range the registry disputes),
        ask the registry how much it has and go on from there, up to ten times. The last Location."""
        offset, setbacks = 0, 0
        with open(data, "rb") if isinstance(data, str) else io.BytesIO(data) as f:
            while offset < size:
                f.seek(offset)
                part = f.read(chunk)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(part) - 1}",
                }
                what = f"upload of {digest} (bytes {offset}-{offset + len(part) - 1} of {size})"
                try:
                    response = self._call("PATCH", self._url(location), (202,), what, headers=headers, body=part)
                except RegistryError as exc:
                    setbacks += 1
                    if setbacks > 10 or (exc.status is not None and exc.status != 416):
                        raise
                    offset, location = self._status(location, digest)
                    continue
                location = response.getheader("Location") or location
                offset += len(part)
        return location

    def _status(self, location: str, digest: str) -> tuple[int, str]:
        """How much of an upload the registry holds (``Range: 0-N``): the offset to go on from."""
        response = self._call("GET", self._url(location), (204,), f"status of the upload of {digest}")
        held = re.fullmatch(r"(?:bytes=)?0-(\d+)", response.getheader("Range") or "")
        # "0-0" is also what registries say of an empty upload; a chunk is never 1 byte, so it means nothing yet
        offset = int(held.group(1)) + 1 if held and int(held.group(1)) > 0 else 0
        return offset, response.getheader("Location") or location

    def blob(self, digest: str, data: str | bytes) -> str:
        """Make sure the repository has the blob; what was done."""
        done = self.present(digest)
        if done is None:
            self.upload(digest, data)
        return done or "uploaded"


def _pack(store: Store, chain: str, target: str) -> tuple[dict[str, Any], str]:
    """The layer as a gzip tar at ``target``: its descriptor and diff id (what export writes too)."""
    with open(target, "wb") as f:
        gzipped = tarlayer.HashingWriter(f)
        with gzip.GzipFile(fileobj=gzipped, mode="wb", mtime=0) as gz:
            plain = tarlayer.HashingWriter(gz)
            tarlayer.write_tar(store.diff_path(chain), plain)
    return {"mediaType": oci.MT_LAYER_GZIP, "digest": gzipped.digest, "size": gzipped.size}, plain.digest


@dataclasses.dataclass
class _Origin:
    """A pulled image's manifest and config (``Image.origin``), once checked against the image's layers."""

    manifest: bytes = b""
    media_type: str = MT_OCI_MANIFEST
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config: bytes = b""
    config_type: str = oci.MT_CONFIG

    @classmethod
    def check(cls, origin: dict[str, str] | None, diff_ids: list[Any]) -> _Origin:
        """What of ``origin`` still describes these layers: nothing if a field is missing or disagrees."""
        try:
            manifest = json.loads((origin or {})["manifest"])
            config = json.loads((origin or {})["config"])
            layers = manifest["layers"]
            config_type = manifest["config"]["mediaType"]
            fits = config["rootfs"]["diff_ids"] == diff_ids and len(layers) == len(diff_ids)
        except (KeyError, TypeError, ValueError):
            return cls()
        if not fits or not all(isinstance(d, dict) and isinstance(d.get("digest"), str) for d in layers):
            return cls()
        assert origin is not None
        media_type = origin.get("media_type") or manifest.get("mediaType") or MT_OCI_MANIFEST
        return cls(origin["manifest"].encode(), media_type, layers, origin["config"].encode(), str(config_type))


def _blob_at_target(
    pusher: _Pusher, candidates: list[Any], pulled_from: str | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The first descriptor (a pulled layer's, as its manifest or the store names it) whose blob the target has
    or can mount, and what was done; (None, "") when none is there: the layer is packed and sent."""
    tried = set()
    for descriptor in candidates:
        if not isinstance(descriptor, dict) or not descriptor.get("digest") or descriptor["digest"] in tried:
            continue
        tried.add(descriptor["digest"])
        done = pusher.present(descriptor["digest"], pulled_from)
        if done is not None:
            return descriptor, done
    return None, ""


def push_image(
    store: Store, name: str, text: str, progress: Progress | None = None, insecure: Collection[str] = ()
) -> str:
    """``images push``: the image ``name`` to ``text`` (blobs first, the manifest last); its manifest digest.

    A layer pulled from a registry is named by the blob it came from: if the target has it or can mount it
    (same registry), nothing is repacked or sent; any other layer is packed as export packs it."""
    image = store.require(check_name(name))
    ref = parse_reference(text, "push target")
    if image.host_based:
        raise RegistryError(
            f"image {name} is built FROM host: its base is this machine, not a layer; it cannot be pushed"
        )
    say = progress or (lambda _m: None)
    client = Client(ref.registry, insecure=ref.registry in insecure)
    mount_from = None
    if looks_like_registry(image.source):
        with contextlib.suppress(RegistryError):
            origin = parse_reference(image.source)
            mount_from = origin.repository if origin.registry == ref.registry else None
    pusher = _Pusher(client, ref, mount_from)
    source = image.source.split("@", 1)[0]
    say(f"pushing {name} to {ref}" + (f" (layers of {source} mounted where possible)" if pusher.mount_from else ""))
    digest = push_layers(store, pusher, image.layers, image.config, image.created, say, image.origin)
    say(f"pushed {name} to {ref.registry}/{ref.repository}@{digest}")
    return digest


def push_layers(
    store: Store,
    pusher: _Pusher,
    layers: Sequence[str],
    image_config: dict[str, Any],
    created: float,
    say: Progress,
    origin: dict[str, str] | None = None,
) -> str:
    """Layers of the store and a container config as an image at ``pusher.ref``; its manifest digest.

    ``origin``: a pulled image's manifest and config as its registry had them. Its config is sent as it was,
    and its manifest too where every layer blob it names is at the target (there already, or mounted): the
    image then keeps its digest. A layer blob that is not is packed again, and only the manifest changes."""
    ref, client = pusher.ref, pusher.client
    kept = _Origin.check(origin, [store.layer_info(chain).get("diff_id") for chain in layers])
    descriptors, diff_ids = [], []
    with store.staging() as stage:
        for i, chain in enumerate(layers):
            info = store.layer_info(chain)
            label = f"layer {i + 1}/{len(layers)}"
            pulled_from = info.get("blob_from")
            descriptor, done = _blob_at_target(
                pusher,
                [*kept.layers[i : i + 1], info.get("blob")],
                pulled_from if isinstance(pulled_from, str) else None,
            )
            diff_id = info.get("diff_id")
            if descriptor is None or not isinstance(diff_id, str):  # not pulled, or not there: packed and sent
                packed = os.path.join(stage, f"layer{i}")
                descriptor, diff_id = _pack(store, chain, packed)
                done = pusher.blob(descriptor["digest"], packed)
                os.unlink(packed)
            descriptors.append(descriptor)
            diff_ids.append(diff_id)
            say(f"{label} {descriptor['digest'][:19]} ({descriptor.get('size', '?')} bytes) {done}")
        if kept.config:
            config_bytes, config_type = kept.config, kept.config_type
        else:
            config = {
                "architecture": oci.ARCH,
                "os": "linux",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                "config": {k: v for k, v in image_config.items() if v not in (None, "", [], {})},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
            config_bytes, config_type = _json_bytes(config), oci.MT_CONFIG
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        pusher.blob(config_digest, config_bytes)
    if kept.manifest and descriptors == kept.layers:
        body, media_type = kept.manifest, kept.media_type
    else:
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
            "layers": descriptors,
        }
        body, media_type = _json_bytes(manifest), MT_OCI_MANIFEST
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and ref.digest != digest:
        raise RegistryError(f"push target {ref} names digest {ref.digest}, but the manifest is {digest}")
    response, conn = client.request(
        "PUT",
        f"/v2/{ref.repository}/manifests/{ref.tag or digest}",
        pusher.scopes,
        {"Content-Type": media_type},
        body=body,
        ok=(201, 200),
        what=f"manifest of {ref}",
    )
    response.read()
    conn.close()
    said = response.getheader("Docker-Content-Digest")
    if said and said != digest:
        raise RegistryError(f"{ref}: the registry stored the manifest as {said}, not as {digest}")
    return digest


# -- build cache through a registry --------------------------------------------------------------

CACHE_TAG_PREFIX = "sbx-"  # a build step's cache key k is the tag sbx-<k> of the --sandbox-cache repository


class RemoteCache:
    """``--sandbox-cache=REF``: a Containerfile step's result as a tag of one repository. A build pulls a
    step another machine built (only the layers the store lacks) and pushes the steps it builds."""

    def __init__(self, text: str, insecure: Collection[str] = (), where: str = "--sandbox-cache") -> None:
        self.ref = parse_reference(text, where)
        if self.ref.digest or ":" in text.rsplit("/", 1)[-1]:
            raise RegistryError(f"{where} {text!r}: give a repository (HOST/REPOSITORY), without a tag or digest")
        self.client = Client(self.ref.registry, insecure=self.ref.registry in insecure)

    def _at(self, key: str) -> Reference:
        return dataclasses.replace(self.ref, tag=CACHE_TAG_PREFIX + key, digest=None)

    def pull(self, store: Store, key: str, progress: Progress | None = None) -> Pulled | None:
        """The step ``key`` as another build pushed it, its layers now in the store; None if nobody did."""
        ref = self._at(key)
        try:
            resolved = resolve(self.client, ref)
        except RegistryError as exc:
            if exc.status == 404:  # manifest unknown: nobody built this step yet
                return None
            raise
        return pull_layers_with(store, ref, self.client, progress, resolved)

    def push(self, store: Store, key: str, layers: Sequence[str], config: dict[str, Any]) -> str:
        """Publish a step's result under its key (time 0 in the config: the same step gives the same digest)."""
        return push_layers(store, _Pusher(self.client, self._at(key), None), layers, config, 0.0, lambda _m: None)
