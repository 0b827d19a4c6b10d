"""Registries: pull, push, auth and FROM against tests/registry_server.py (127.0.0.1 only), and skopeo."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from oci_inputs import BUSYBOX, EXPECTED, GONE, SKOPEO, UMOCI, _tar, skopeo_digest, umoci_image
from registry_server import Registry, make_ca, make_client_certificate, serve, without_credentials

from pytest_sandbox.layers import build, oci
from pytest_sandbox.layers import registry as reg
from pytest_sandbox.layers.store import Store, StoreError

DIGEST = "sha256:" + "ab" * 32
BASE = [("etc", "dir", b""), ("etc/base", "file", b"base\n")]
APP = [("srv", "dir", b""), ("srv/app", "file", b"app\n")]


@pytest.fixture(autouse=True)
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return without_credentials(tmp_path / "home", monkeypatch)


@pytest.fixture
def registry() -> Iterator[Registry]:
    yield from serve()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def store_state(store: Store) -> tuple[list[str], list[str], list[str]]:
    store.ensure()
    return sorted(os.listdir(store.layers_dir)), sorted(os.listdir(store.images_dir)), sorted(os.listdir(store.tmp_dir))


def read(store: Store, image: str, path: str) -> str:
    """A file as the image shows it (whiteouts applied), without starting a container."""
    found = build._find_in(store, list(store.require(image).layers), path)
    if found is None:
        raise FileNotFoundError(path)
    return Path(found).read_text()


def blob_gets(registry: Registry) -> list[str]:
    return [path.rsplit("/", 1)[1] for method, path, status, _ in registry.log if method == "GET" and "/blobs/" in path]


# -- references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest", None)),
        ("docker.io/library/alpine:3.20", ("docker.io", "library/alpine", "3.20", None)),
        ("index.docker.io/team/tool", ("docker.io", "team/tool", "latest", None)),
        ("registry.example.org:5000/team/base:1.4", ("registry.example.org:5000", "team/base", "1.4", None)),
        (f"localhost/a/b@{DIGEST}", ("localhost", "a/b", None, DIGEST)),
        (f"127.0.0.1:5000/x:y@{DIGEST}", ("127.0.0.1:5000", "x", "y", DIGEST)),
        ("ghcr.io/owner/my_repo.name/sub-dir", ("ghcr.io", "owner/my_repo.name/sub-dir", "latest", None)),
    ],
)
def test_references(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = reg.parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert reg.parse_reference(str(ref)) == ref
    assert reg.parse_reference("docker.io/library/alpine").host == "registry-1.docker.io"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Alpine", "repository part 'Alpine' is not valid: lower-case letters and digits"),
        ("host.io:99999/x", "registry 'host.io:99999' is not valid: a host name or [IPv6] address"),
        ("a/b:-bad", "tag '-bad' is not valid: letters, digits"),
        ("a/b@sha256:123", "digest 'sha256:123' is not valid: sha256: and 64 lower-case hex digits"),
        ("https://ghcr.io/a/b", "no scheme (https://)"),
        ("", "it is empty"),
        ("a//b", "repository part '' is not valid"),
    ],
)
def test_bad_references_name_the_part_and_the_rule(text: str, message: str) -> None:
    with pytest.raises(reg.RegistryError, match=r"image reference .*: ") as info:
        reg.parse_reference(text)
    assert message in str(info.value)
    assert reg.REFERENCE_RULE in str(info.value)


def test_what_from_takes_for_a_registry() -> None:
    assert reg.looks_like_registry("docker.io/library/alpine:3.20")
    assert reg.looks_like_registry("localhost/team/base")
    assert reg.looks_like_registry("127.0.0.1:5000/base")
    assert reg.looks_like_registry(f"base@{DIGEST}")
    for local in ("alpine", "alpine:3.20", "team/base", "oci:./dir/x", "oci-archive:/a/b.tar:tag"):
        assert not reg.looks_like_registry(local), local


def test_plain_http_only_for_loopback() -> None:
    for host in ("localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "[::1]"):
        assert reg._is_loopback(host), host
    for host in ("registry.example.org", "10.0.0.1:5000", "[fe80::1]:5000", "localhost.example.org"):
        assert not reg._is_loopback(host), host
        assert reg.Client(host).scheme() == "https"  # decided without a request


def test_challenge_parsing() -> None:
    header = (
        r'Bearer realm="https://auth.example/token",service="reg.example",'
        r'scope="repository:a/b:pull,push",x=plain,q="a \"quoted\" word"'
    )
    scheme, params = reg.parse_challenge(header)
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "reg.example",
        "scope": "repository:a/b:pull,push",
        "x": "plain",
        "q": 'a "quoted" word',
    }


# -- pull ------------------------------------------------------------------------------------


def test_pull_with_progress_and_layers_the_store_has_are_not_downloaded(
    registry: Registry, store: Store, tmp_path: Path
) -> None:
    registry.add_image("team/base", "1.4", [_tar(BASE)], env=["MODE=base"])
    registry.add_image("team/app", "2", [_tar(BASE), _tar(APP)], env=["MODE=app"], docker=True)
    first = run_cli("images", "pull", f"{registry.host}/team/base:1.4", store=store.root, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"pulling {registry.host}/team/base:1.4"
    assert lines[1].startswith("layer 1/1 sha256:") and lines[1].endswith(" downloaded")
    assert lines[2].startswith(f"pulled base:1.4: 1 layers, {registry.host}/team/base@sha256:")
    base_blob = registry.manifests["team/base"][registry.tags["team/base"]["1.4"]]
    gets_before = blob_gets(registry)

    second = run_cli("images", "pull", f"{registry.host}/team/app:2", "app", store=store.root, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "layer 1/2" in second.stdout and "cached" in second.stdout.splitlines()[1]
    assert second.stdout.splitlines()[2].endswith(" downloaded")
    fetched = blob_gets(registry)[len(gets_before) :]
    shared = json.loads(base_blob[1])["layers"][0]["digest"]
    assert shared not in fetched and len(fetched) == 2  # the config and the app layer only
    assert read(store, "app", "/etc/base") == "base\n" and read(store, "app", "/srv/app") == "app\n"
    assert store.require("app").config["Env"] == ["MODE=app"]
    assert store.require("app").layers[0] == store.require("base:1.4").layers[0]

    again = run_cli("images", "pull", f"{registry.host}/team/app:2", "app", store=store.root, cwd=tmp_path)
    assert again.returncode == 2 and "not pulled as app: an image app exists" in again.stderr
    assert "--force" in again.stderr


def test_pull_by_digest_and_a_changed_manifest_is_refused(registry: Registry, store: Store) -> None:
    digest = registry.add_image("team/base", "1.4", [_tar(BASE)])
    image = reg.pull_image(store, f"{registry.host}/team/base@{digest}")
    assert image.name == "base" and image.source.endswith(digest)
    media_type, body = registry.manifests["team/base"][digest]
    registry.manifests["team/base"][digest] = (media_type, body + b" ")
    with pytest.raises(reg.RegistryError, match=f"expected {digest}, the content hashes to sha256:"):
        reg.pull_image(store, f"{registry.host}/team/base@{digest}", "other")


def test_unknown_manifest_and_unknown_host(registry: Registry, store: Store) -> None:
    with pytest.raises(reg.RegistryError, match=r"manifest of .*/team/none:1: HTTP 404 \(MANIFEST_UNKNOWN"):
        reg.pull_image(store, f"{registry.host}/team/none:1")
    with pytest.raises(reg.RegistryError, match="connection refused"):
        reg.pull_image(store, "127.0.0.1:1/team/none:1")
    assert store_state(store)[:2] == ([], [])


@pytest.mark.parametrize("what", ["layer", "config", "cut"])
def test_a_corrupt_or_cut_blob_is_refused_and_nothing_is_stored(registry: Registry, store: Store, what: str) -> None:
    digest = registry.add_image("team/base", "1", [_tar(BASE), _tar(APP)])
    manifest = json.loads(registry.manifests["team/base"][digest][1])
    if what == "layer":
        registry.corrupt.add(manifest["layers"][1]["digest"])
        expected = "is corrupt|cannot be unpacked"
    elif what == "config":
        registry.corrupt.add(manifest["config"]["digest"])
        expected = "is corrupt"
    else:  # every answer cut after 40 bytes, and no Range: nothing to resume from
        registry.cut_after, registry.ranges = 40, False
        expected = "the connection broke after 40 of .* bytes and the registry cannot resume it"
    with pytest.raises(StoreError, match=expected):
        reg.pull_image(store, f"{registry.host}/team/base:1")
    layers, images, staging = store_state(store)
    assert images == [] and staging == []
    first = hashlib.sha256(_tar(BASE)).hexdigest()  # a verified layer below the corrupt one stays: a later pull uses it
    assert layers == ([first] if what == "layer" else [])
    registry.corrupt.clear()
    registry.cut_after = None
    image = reg.pull_image(store, f"{registry.host}/team/base:1")  # and once it is served right, it pulls
    assert read(store, image.name, "/srv/app") == "app\n"


def test_a_cut_download_resumes_where_it_broke(registry: Registry, store: Store) -> None:
    big = os.urandom(200_000)  # incompressible: the layer blob is about as big
    digest = registry.add_image("team/base", "1", [_tar([*BASE, ("etc/big", "file", big)])])
    layer = json.loads(registry.manifests["team/base"][digest][1])["layers"][0]
    registry.cut_after, registry.cuts = 50_000, 3  # the layer's first answer and two resumes are cut
    image = reg.pull_image(store, f"{registry.host}/team/base:1")
    assert Path(build._find_in(store, list(image.layers), "/etc/big") or "").read_bytes() == big
    gets = [r[2] for r in registry.requests("GET", layer["digest"])]
    assert gets == [200, 206, 206, 206]
    assert store_state(store)[2] == []

    registry.cut_after, registry.cuts = 0, None  # resuming brings nothing: given up, nothing stored
    other = Store(str(Path(store.root).parent / "other"))
    with pytest.raises(reg.RegistryError, match=r"connection broke after 0 of \d+ bytes, 10 times resumed: given up"):
        reg.pull_image(other, f"{registry.host}/team/base:1")
    assert store_state(other) == ([], [], [])


def test_chunked_blobs_without_a_length(registry: Registry, store: Store) -> None:
    registry.add_image("team/base", "1", [_tar([*BASE, ("etc/big", "file", b"x" * 50_000)])])
    registry.chunked = True
    image = reg.pull_image(store, f"{registry.host}/team/base:1")
    assert read(store, image.name, "/etc/big") == "x" * 50_000
    assert [r[2] for r in registry.requests("GET", "/blobs/")] == [200, 200]  # config and layer, no resume


def test_index_picks_this_platform(registry: Registry, store: Store) -> None:
    other = "arm64" if oci.ARCH != "arm64" else "amd64"
    mine = registry.add_image("multi", None, [_tar([("arch", "file", oci.ARCH.encode())])], architecture=oci.ARCH)
    theirs = registry.add_image("multi", None, [_tar([("arch", "file", other.encode())])], architecture=other)
    attestation = registry.add_image("multi", None, [_tar([("arch", "file", b"attestation")])])
    registry.add_index(
        "multi",
        "1",
        [
            (theirs, {"os": "linux", "architecture": other}),
            (attestation, {"os": "unknown", "architecture": "unknown"}),
            (mine, {"os": "linux", "architecture": oci.ARCH}),
        ],
    )
    image = reg.pull_image(store, f"{registry.host}/multi:1")
    assert read(store, image.name, "/arch") == oci.ARCH
    assert image.source.endswith(mine)
    registry.add_index("multi", "foreign", [(theirs, {"os": "linux", "architecture": other})])
    with pytest.raises(reg.RegistryError, match=f"no image for linux/{oci.ARCH} .the index has linux/{other}"):
        reg.pull_image(store, f"{registry.host}/multi:foreign")


# -- auth ------------------------------------------------------------------------------------


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("where", ["DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "DOCKER_AUTH_CONFIG", "home"])
def test_pull_with_bearer_token_and_credentials(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_credentials: Path, where: str
) -> None:
    with Registry(auth="bearer", users={"ci": "s3cret"}) as registry:
        registry.add_image("private/base", "1", [_tar(BASE)])
        ref = f"{registry.host}/private/base:1"
        with pytest.raises(reg.RegistryError, match=f"HTTP 401 .*no credentials for {registry.host}"):
            reg.pull_image(store, ref)
        config = {"auths": {f"http://{registry.host}": {"auth": _auth("ci", "s3cret")}}}
        if where == "DOCKER_CONFIG":
            (tmp_path / "docker").mkdir()
            (tmp_path / "docker/config.json").write_text(json.dumps(config))
            monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        elif where == "REGISTRY_AUTH_FILE":
            config = {"auths": {registry.host: {"username": "ci", "password": "s3cret"}}}
            (tmp_path / "auth.json").write_text(json.dumps(config))
            monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
        elif where == "DOCKER_AUTH_CONFIG":
            monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps(config))
        else:
            (no_credentials / ".docker").mkdir()
            (no_credentials / ".docker/config.json").write_text(json.dumps(config))
        image = reg.pull_image(store, ref)
        assert read(store, image.name, "/etc/base") == "base\n"
        tokens = registry.requests("GET", "/token")
        assert tokens[-1][3] == "Basic " + _auth("ci", "s3cret")
        assert "scope=repository%3Aprivate%2Fbase%3Apull" in tokens[-1][1]
        blobs = [r for r in registry.requests("GET", "/blobs/") if r[2] == 200]
        assert blobs and all((r[3] or "").startswith("Bearer ") for r in blobs)


@pytest.mark.parametrize("kind", ["credHelpers", "credsStore"])
def test_credential_helpers(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_credentials: Path, kind: str
) -> None:
    with Registry(auth="bearer", users={"ci": "s3cret"}) as registry:
        registry.add_image("private/base", "1", [_tar(BASE)])
        helper = tmp_path / "bin/docker-credential-testing"
        helper.parent.mkdir()
        helper.write_text(
            '#!/bin/sh\nread server\necho "$1 $server" >> ' + str(tmp_path / "asked") + "\n"
            f'[ "$server" = "{registry.host}" ] && echo \'{{"Username": "ci", "Secret": "s3cret"}}\' && exit 0\n'
            "echo 'credentials not found in native keychain'; exit 1\n"
        )
        helper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
        (no_credentials / ".docker").mkdir()
        config = {"credHelpers": {registry.host: "testing"}} if kind == "credHelpers" else {"credsStore": "testing"}
        (no_credentials / ".docker/config.json").write_text(json.dumps(config))
        image = reg.pull_image(store, f"{registry.host}/private/base:1")
        assert read(store, image.name, "/etc/base") == "base\n"
        assert (tmp_path / "asked").read_text() == f"get {registry.host}\n"
        assert registry.requests("GET", "/token")[-1][3] == "Basic " + _auth("ci", "s3cret")


def test_wrong_credentials_and_anonymous_tokens(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with Registry(auth="bearer", users={"ci": "s3cret"}, anonymous_pull=True) as registry:
        registry.add_image("public/base", "1", [_tar(BASE)])
        image = reg.pull_image(store, f"{registry.host}/public/base:1")  # an anonymous token
        assert read(store, image.name, "/etc/base") == "base\n"
        assert registry.requests("GET", "/token")[0][3] is None
        with pytest.raises(reg.RegistryError, match=r"HTTP 401 .*: not authorized"):
            reg.push_image(store, image.name, f"{registry.host}/public/copy:1")  # pull only, without credentials
        bad = {"auths": {registry.host: {"auth": _auth("ci", "wrong")}}}
        monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps(bad))
        with pytest.raises(
            reg.RegistryError, match=r"token service .* refused: HTTP 401 \(UNAUTHORIZED: bad credentials"
        ):
            reg.pull_image(store, f"{registry.host}/public/base:1", "again")


def test_a_token_the_registry_finds_short_of_scope_is_renewed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached token the registry no longer honours for the scope: its 401 with error="insufficient_scope"
    brings a new token and the request goes on; tokens that stay short are reported after two renewals."""
    manifest = "/v2/team/base/manifests/1"
    with Registry(auth="bearer", users={"ci": "s3cret"}) as registry:
        registry.add_image("team/base", "1", [_tar(BASE)])
        client = reg.Client(registry.host, lookup=lambda host: ("ci", "s3cret"))

        def get() -> None:
            response, conn = client.request("GET", manifest, ["repository:team/base:pull"])
            response.read()
            conn.close()

        get()
        assert [r[1].split("?")[0] for r in registry.log] == [manifest, "/token", manifest]

        def revoke() -> None:
            for token in registry.tokens:
                registry.tokens[token] = set()

        revoke()
        before = len(registry.log)
        get()
        assert [(r[1].split("?")[0], r[2]) for r in registry.log[before:]] == [
            (manifest, 401),
            ("/token", 200),
            (manifest, 200),
        ]
        assert 'error="insufficient_scope"' in registry.last_challenge

        revoke()
        monkeypatch.setattr(registry, "token", lambda scopes: Registry.token(registry, set()))  # grants nothing
        before = len(registry.log)
        with pytest.raises(reg.RegistryError, match=r"HTTP 401 .*: not authorized"):
            get()
        assert [r[1].split("?")[0] for r in registry.log[before:]] == [manifest, "/token"] * 2 + [manifest]


def test_basic_auth(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with Registry(auth="basic", users={"ci": "s3cret"}) as registry:
        registry.add_image("private/base", "1", [_tar(BASE)])
        with pytest.raises(reg.RegistryError, match="HTTP 401"):
            reg.pull_image(store, f"{registry.host}/private/base:1")
        monkeypatch.setenv(
            "DOCKER_AUTH_CONFIG", json.dumps({"auths": {registry.host: {"auth": _auth("ci", "s3cret")}}})
        )
        image = reg.pull_image(store, f"{registry.host}/private/base:1")
        assert read(store, image.name, "/etc/base") == "base\n"
        assert registry.log[-1][3] == "Basic " + _auth("ci", "s3cret")


def test_tls_with_a_ca_of_ones_own(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, chain = make_ca(str(tmp_path))
    with Registry(tls=chain) as registry:
        registry.add_image("team/base", "1", [_tar(BASE)])
        with pytest.raises(reg.RegistryError, match=r"TLS certificate of https://127.0.0.1:\d+/v2/ not trusted"):
            reg.pull_image(store, f"{registry.host}/team/base:1")  # never plain HTTP to a TLS registry instead
        monkeypatch.setenv("SSL_CERT_FILE", ca)
        image = reg.pull_image(store, f"{registry.host}/team/base:1")
        assert read(store, image.name, "/etc/base") == "base\n"
        assert registry.requests("GET", "/manifests/")


def test_a_registrys_own_ca_and_client_certificate_from_certs_d(
    store: Store, tmp_path: Path, no_credentials: Path
) -> None:
    """containers-certs.d(5), as podman, skopeo and docker read it: ``HOST:PORT/*.crt`` are trusted over the
    system's CAs for that registry only; ``*.cert`` with its ``*.key`` is the client certificate."""
    ca, chain = make_ca(str(tmp_path))
    client = make_client_certificate(str(tmp_path))
    with Registry(tls=chain, client_ca=ca) as registry:
        registry.add_image("team/base", "1", [_tar(BASE)])
        ref = f"{registry.host}/team/base:1"
        certs = no_credentials / ".config/containers/certs.d" / registry.host
        with pytest.raises(reg.RegistryError, match=f"not trusted.*put its CA in {re.escape(str(certs))}/ca.crt"):
            reg.pull_image(store, ref)
        certs.mkdir(parents=True)
        shutil.copy(ca, certs / "ca.crt")
        with pytest.raises(reg.RegistryError):  # trusted now, but the registry wants a client certificate
            reg.pull_image(store, ref)
        assert not registry.log
        shutil.copy(client[0], certs / "client.cert")
        with pytest.raises(reg.RegistryError, match=r"client.cert: a client certificate needs its key"):
            reg.pull_image(store, ref)
        shutil.copy(client[1], certs / "client.key")
        image = reg.pull_image(store, ref)
        assert read(store, image.name, "/etc/base") == "base\n"
        assert registry.requests("GET", "/manifests/")
        (certs / "ca.crt").write_text("not a certificate\n")
        with pytest.raises(reg.RegistryError, match=r"certs.d/127.0.0.1:\d+: cannot load ca.crt"):
            reg.pull_image(store, ref)


def test_insecure_registries_from_the_ini(store: Store, tmp_path: Path) -> None:
    _ca, chain = make_ca(str(tmp_path))
    with Registry(tls=chain) as registry:  # a certificate nobody trusts
        registry.add_image("team/base", "1", [_tar(BASE)])
        ref = f"{registry.host}/team/base:1"
        project = tmp_path / "project"
        project.mkdir()
        refused = run_cli("images", "pull", ref, store=store.root, cwd=project)
        assert refused.returncode == 2 and "not trusted" in refused.stderr
        (project / "pytest.ini").write_text(f"[pytest]\nsandbox_insecure_registries =\n    {registry.host}\n")
        pulled = run_cli("images", "pull", ref, store=store.root, cwd=project)
        assert pulled.returncode == 0, pulled.stderr
        assert read(store, "base:1", "/etc/base") == "base\n"
        (project / "pytest.ini").write_text("[pytest]\nsandbox_insecure_registries = https://a/b\n")
        bad = run_cli("images", "pull", ref, store=store.root, cwd=project)
        assert bad.returncode == 2
        assert "ini sandbox_insecure_registries: registry 'https://a/b' is not valid: a host name" in bad.stderr


def test_a_redirect_to_another_host_gets_no_authorization(store: Store) -> None:
    with Registry(auth="bearer", anonymous_pull=True) as registry, Registry() as blobs:
        registry.redirect_blobs = blobs
        registry.add_image("team/base", "1", [_tar(BASE)])
        image = reg.pull_image(store, f"{registry.host}/team/base:1")
        assert read(store, image.name, "/etc/base") == "base\n"
        assert [r[2] for r in registry.requests("GET", "/blobs/")] == [307, 307]  # config and layer
        assert len(blobs.requests("GET", "/direct/")) == 2
        assert all(r[3] is None for r in blobs.log)
        assert all(r[3] and r[3].startswith("Bearer ") for r in registry.requests("GET", "/blobs/"))


def test_rate_limited_requests_are_retried_then_reported(registry: Registry, store: Store) -> None:
    registry.add_image("team/base", "1", [_tar(BASE)])
    registry.rate_limit = 2
    reg.pull_image(store, f"{registry.host}/team/base:1")
    assert [r[2] for r in registry.log[:3]] == [429, 429, 200]
    registry.rate_limit = 100
    with pytest.raises(reg.RegistryError, match=r"HTTP 429 \(TOOMANYREQUESTS: slow down\): rate limited"):
        reg.pull_image(store, f"{registry.host}/team/base:1", "again")


# -- push ------------------------------------------------------------------------------------


def _project(tmp_path: Path, text: str) -> Path:
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    (project / "images/app.Containerfile").write_text(text)
    (project / "images/data.txt").write_text("data\n")
    return project


def test_push_then_pull_back_identical(registry: Registry, store: Store, tmp_path: Path) -> None:
    project = _project(tmp_path, "FROM scratch\nCOPY data.txt /srv/data.txt\nENV MODE=pushed\n")
    built = build.Builder(store, str(project / "images")).build("app")
    pushed = run_cli("images", "push", "app", f"{registry.host}/team/app:1", store=store.root, cwd=project)
    assert pushed.returncode == 0, pushed.stderr
    lines = pushed.stdout.splitlines()
    assert lines[0] == f"pushing app to {registry.host}/team/app:1"
    assert lines[1].startswith("layer 1/1 sha256:") and lines[1].endswith(" uploaded")
    digest = lines[-1].rsplit("@", 1)[1]
    assert registry.tags["team/app"]["1"] == digest

    fresh = Store(str(tmp_path / "fresh"))
    image = reg.pull_image(fresh, f"{registry.host}/team/app:1", "app")
    assert image.source.endswith(digest)
    assert image.layers == built.layers and image.diff_ids == built.diff_ids
    assert image.config == built.config
    assert read(fresh, "app", "/srv/data.txt") == "data\n"

    before = len(registry.log)
    again = reg.push_image(store, "app", f"{registry.host}/team/app:1")
    assert again == digest
    assert not [r for r in registry.log[before:] if r[0] in ("POST", "PATCH") or "/uploads/" in r[1]]

    # a pulled image pushed to another repository of the same registry: its blobs are mounted, nothing is
    # sent, and it keeps its digest (the manifest and config as the registry had them)
    before = len(registry.log)
    assert reg.push_image(fresh, "app", f"{registry.host}/other/app:2") == digest
    manifest = json.loads(registry.manifests["team/app"][digest][1])
    blobs = [manifest["config"]["digest"], manifest["layers"][0]["digest"]]
    mounts = [r for r in registry.log[before:] if r[0] == "POST" and "mount=" in r[1]]
    assert sorted(r[1].split("mount=")[1].split("&")[0].replace("%3A", ":") for r in mounts) == sorted(blobs)
    assert [r[2] for r in mounts] == [201, 201]
    assert registry.requests("PUT", "/v2/other/app/blobs/uploads/") == []


def test_a_pulled_image_keeps_its_digest_wherever_it_is_pushed(store: Store, tmp_path: Path) -> None:
    """Its config (history, created time) is the registry's, not remade at the pull; to another registry its
    layer is packed again (gzip without a time: the same bytes as our first push) and the digest holds."""
    project = _project(tmp_path, "FROM scratch\nCOPY data.txt /srv/data.txt\nENV MODE=pushed\n")
    build.Builder(store, str(project / "images")).build("app")
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(contextlib.contextmanager(serve)()) for _ in range(2))
        digest = reg.push_image(store, "app", f"{first.host}/team/app:1")
        time.sleep(1.1)  # a config remade at the pull would carry another second
        fresh = Store(str(tmp_path / "fresh"))
        pulled = reg.pull_image(fresh, f"{first.host}/team/app:1", "app")
        assert pulled.origin and Store(fresh.root).require("app").origin == pulled.origin
        assert reg.push_image(fresh, "app", f"{second.host}/copy/app:1") == digest
        assert second.manifests["copy/app"][digest] == first.manifests["team/app"][digest]
        # an image built FROM the pulled one is a new image: its own config and manifest
        (project / "images" / "more.Containerfile").write_text(f"FROM {first.host}/team/app:1\nENV MORE=1\n")
        more = build.Builder(fresh, str(project / "images")).build("more")
        assert more.origin is None
        assert reg.push_image(fresh, "more", f"{second.host}/copy/more:1") != digest


def test_a_mount_the_source_refuses_falls_back_to_an_upload(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A committed image's base layers are mounted from the repository they were pulled from; where the
    pusher may no longer read that repository, the registry refuses the mount and the blob is uploaded."""
    with Registry(auth="bearer", users={"ci": "s3cret"}) as registry:
        monkeypatch.setenv(
            "DOCKER_AUTH_CONFIG", json.dumps({"auths": {registry.host: {"auth": _auth("ci", "s3cret")}}})
        )
        registry.add_image("team/base", "1", [_tar(BASE), _tar(APP)])
        reg.pull_image(store, f"{registry.host}/team/base:1", "base")
        store.put(dataclasses.replace(store.require("base"), name="mine", source="", origin=None))  # as commit has it
        digest = reg.push_image(store, "mine", f"{registry.host}/team/mine:1")
        mounts = [r for r in registry.requests("POST", "/v2/team/mine/blobs/uploads/?") if r[2] == 201]
        assert len(mounts) == 2 and all("from=team%2Fbase" in r[1] for r in mounts)

        registry.closed.add("team/base")
        before = len(registry.log)
        other = reg.push_image(store, "mine", f"{registry.host}/team/other:1")  # repacked layers: a new digest
        refused = [r for r in registry.log[before:] if r[0] == "POST" and "mount=" in r[1]]
        assert refused and {r[2] for r in refused} == {401}
        sent = [r for r in registry.log[before:] if r[0] == "PUT" and "/v2/team/other/blobs/uploads/" in r[1]]
        assert len(sent) == 3  # both layers and the config
        back = reg.pull_image(Store(str(tmp_path / "fresh")), f"{registry.host}/team/other:1", "back")
        assert back.source.endswith(other) and other != digest
        assert back.diff_ids == store.require("mine").diff_ids


@pytest.mark.parametrize("why", ["large", "limited"])
def test_large_blobs_go_up_in_chunks_and_a_lost_chunk_is_sent_again(
    registry: Registry, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """Past CHUNK_SIZE, or where a proxy refuses a body that large (413), a blob goes up in PATCH chunks; a
    chunk lost with its connection is found missing (the upload's status) and sent again."""
    project = _project(tmp_path, "FROM scratch\nCOPY noise /noise\n")
    (project / "images" / "noise").write_bytes(os.urandom(600 * 1024))  # gzip cannot shrink it
    build.Builder(store, str(project / "images")).build("app")
    if why == "large":
        monkeypatch.setattr(reg, "CHUNK_SIZE", 100 * 1024)
    else:
        registry.max_body = 256 * 1024
    registry.drop_patches = 1
    digest = reg.push_image(store, "app", f"{registry.host}/team/noise:1")
    patches = registry.requests("PATCH", "/v2/team/noise/blobs/uploads/")
    assert len(patches) >= 7 and [p[2] for p in patches].count(202) >= 6
    assert registry.requests("GET", "/v2/team/noise/blobs/uploads/")  # the status asked after the lost chunk
    if why == "limited":
        assert [r[2] for r in registry.requests("PUT", "/v2/team/noise/blobs/uploads/")].count(413) == 1

    fresh = Store(str(tmp_path / "fresh"))
    image = reg.pull_image(fresh, f"{registry.host}/team/noise:1", "noise")
    assert image.source.endswith(digest)
    found = build._find_in(fresh, list(image.layers), "/noise")
    assert found is not None and Path(found).read_bytes() == (project / "images" / "noise").read_bytes()


def test_push_errors_name_what_is_wrong(registry: Registry, store: Store, tmp_path: Path) -> None:
    result = run_cli("images", "push", "nosuch", f"{registry.host}/team/app:1", store=store.root, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("pytest-sandbox: no image 'nosuch' in the store")
    project = _project(tmp_path, "FROM scratch\nCOPY data.txt /data.txt\n")
    build.Builder(store, str(project / "images")).build("app")
    result = run_cli("images", "push", "app", "team/App:1", store=store.root, cwd=tmp_path)
    assert result.returncode == 2
    assert "push target 'team/App:1': repository part 'App' is not valid" in result.stderr
    result = run_cli("images", "pull", f"{registry.host}/team/app:1", "Bad Name", store=store.root, cwd=tmp_path)
    assert result.returncode == 2 and "image name 'Bad Name' is not valid: use lower-case letters" in result.stderr
    assert not registry.log  # nothing was sent for any of them


# -- FROM ------------------------------------------------------------------------------------


def test_from_pulls_what_is_missing(registry: Registry, store: Store, tmp_path: Path) -> None:
    registry.add_image("team/base", "1.4", [_tar(BASE)], env=["MODE=base"])
    project = _project(tmp_path, f"FROM {registry.host}/team/base:1.4\nCOPY data.txt /srv/data.txt\n")
    said: list[str] = []
    image = build.Builder(store, str(project / "images"), said.append).build("app")
    assert f"  pulling {registry.host}/team/base:1.4" in said
    assert read(store, "app", "/etc/base") == "base\n" and read(store, "app", "/srv/data.txt") == "data\n"
    assert image.config["Env"] == ["MODE=base"]

    requests = len(registry.log)
    again = build.Builder(store, str(project / "images")).build("app")
    assert again.layers == image.layers and len(registry.log) == requests  # no request: the store has it

    # the tag moves on: a pull updates what FROM finds, and the next build starts from it
    registry.add_image("team/base", "1.4", [_tar(BASE), _tar(APP)], env=["MODE=new"])
    reg.pull_image(store, f"{registry.host}/team/base:1.4", "base")
    newer = build.Builder(store, str(project / "images")).build("app")
    assert read(store, "app", "/srv/app") == "app\n" and newer.config["Env"] == ["MODE=new"]
    assert len(newer.layers) == 3

    manifests = len(registry.requests("GET", "/manifests/"))
    build.Builder(store, str(project / "images"), no_cache=True).build("app")  # --no-cache asks again
    assert len(registry.requests("GET", "/manifests/")) == manifests + 1


def test_bad_from_reference_and_unknown_image(registry: Registry, store: Store, tmp_path: Path) -> None:
    project = _project(tmp_path, f"FROM {registry.host}/Team/base:1.4\n")
    builder = build.Builder(store, str(project / "images"))
    with pytest.raises(reg.RegistryError, match=r"app.Containerfile:1: FROM .*: repository part 'Team' is not valid"):
        builder.check("app")
    (project / "images/app.Containerfile").write_text(f"FROM {registry.host}/team/none:1\n")
    with pytest.raises(build.BuildError, match=r"app.Containerfile:1: FROM .*: HTTP 404 \(MANIFEST_UNKNOWN"):
        builder.build("app")
    assert store_state(store)[:2] == ([], [])


# -- real clients: skopeo pushes to the test registry and reads what we push -------------------


@pytest.mark.skipif(UMOCI is None or SKOPEO is None, reason="host lacks umoci or skopeo (Debian: apt install both)")
def test_skopeo_pushes_we_pull_we_push_skopeo_reads(registry: Registry, store: Store, tmp_path: Path) -> None:
    assert SKOPEO is not None
    layout = umoci_image(tmp_path / "umoci")
    copy = [SKOPEO, "--insecure-policy", "copy"]
    subprocess.run(
        [*copy, "--dest-tls-verify=false", f"oci:{layout}:test", f"docker://{registry.host}/umoci/test:1"],
        check=True,
        capture_output=True,
    )
    image = reg.pull_image(store, f"{registry.host}/umoci/test:1", "umoci")
    for path, content in EXPECTED.items():
        assert read(store, "umoci", path) == content, path
    for path in GONE:
        with pytest.raises(FileNotFoundError):
            read(store, "umoci", path)
    assert image.config["Env"] == ["GREETING=hello"] or "GREETING=hello" in image.config["Env"]

    digest = reg.push_image(store, "umoci", f"{registry.host}/ours/test:2")
    assert digest == registry.tags["umoci/test"]["1"]  # skopeo's manifest and config, sent again as they were
    assert skopeo_digest(f"docker://{registry.host}/ours/test:2") == digest
    subprocess.run(
        [*copy, "--src-tls-verify=false", f"docker://{registry.host}/ours/test:2", f"oci:{tmp_path}/back:x"],
        check=True,
        capture_output=True,
    )
    back = oci.import_image(Store(str(tmp_path / "fresh")), f"oci:{tmp_path}/back:x", "back")
    assert back.layers == image.layers and back.diff_ids == image.diff_ids


# -- end to end: a marked test on an image FROM a registry --------------------------------------


def _busybox_layer() -> bytes:
    """A layer with the host's busybox as /bin/busybox and /bin/sh, /bin/cat."""
    assert BUSYBOX is not None
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(_dir_info("bin"))
        data = Path(BUSYBOX).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for tool in ("sh", "cat"):
            link = tarfile.TarInfo(f"bin/{tool}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return out.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")
def test_a_marked_test_on_an_image_from_a_registry(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Over TLS with a certificate nobody trusts, so the session must take sandbox_insecure_registries too."""
    _ca, chain = make_ca(str(tmp_path_factory.mktemp("ca")))
    with Registry(tls=chain) as registry:
        registry.add_image("tools/bb", "1", [_busybox_layer(), _tar(BASE)], env=["FROM_REGISTRY=yes"])
        monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path_factory.mktemp("store")))
        pytester.makeini(f"[pytest]\nsandbox_insecure_registries = {registry.host}\n")
        (pytester.path / "images").mkdir()
        (pytester.path / "images/app.Containerfile").write_text(
            f"FROM {registry.host}/tools/bb:1\nRUN echo built > /built\n"
        )
        pytester.makepyfile("""
            import pytest

            @pytest.mark.container(image="app")
            def test_in_image(sandbox):
                assert sandbox.run("cat /etc/base /built; echo $FROM_REGISTRY").stdout == "base\\nbuilt\\nyes\\n"
        """)
        result = pytester.runpytest_subprocess()
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*pulling {registry.host}/tools/bb:1*", "*layer 1/2 sha256:* downloaded*"])

        (pytester.path / "images/app.Containerfile").write_text(f"FROM {registry.host}/tools/BB:1\n")
        bad = pytester.runpytest_subprocess()
        assert bad.ret == pytest.ExitCode.USAGE_ERROR
        bad.stderr.fnmatch_lines(
            [
                "*::test_in_image: image='app': *app.Containerfile:1: FROM "
                f"'{registry.host}/tools/BB:1': repository part 'BB' is not valid: lower-case letters*"
            ]
        )


@pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")
def test_a_marker_names_a_registrys_image(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """image="HOST/REPO:TAG" in a marker: pulled once (also for xdist's workers), then the store's copy;
    recorded under the name images pull gives it, unless that name is taken by another image."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", store.root)
    with contextlib.contextmanager(serve)() as registry:
        registry.add_image("tools/bb", "1", [_busybox_layer(), _tar(BASE)], env=["FROM_REGISTRY=yes"])
        pytester.makepyfile(f"""
            import pytest

            @pytest.mark.container(image="{registry.host}/tools/bb:1")
            @pytest.mark.parametrize("n", range(4))
            def test_in_image(sandbox, n):
                assert sandbox.run("cat /etc/base; echo $FROM_REGISTRY").stdout == "base\\nyes\\n"
        """)
        result = pytester.runpytest_subprocess("-n", "2")
        result.assert_outcomes(passed=4)
        result.stderr.fnmatch_lines([f"*pulling {registry.host}/tools/bb:1*"])
        assert len(registry.requests("GET", "/v2/tools/bb/manifests/1")) == 1
        image = store.require("bb:1")
        assert image.source.startswith(f"{registry.host}/tools/bb@sha256:") and image.origin

        again = pytester.runpytest_subprocess()  # the store's copy: the registry is not asked again
        again.assert_outcomes(passed=4)
        assert len(registry.requests("GET", "/v2/tools/bb/manifests/1")) == 1

        # "bb:1" taken by an image from elsewhere: the pulled one gets a name of its own
        store.put(dataclasses.replace(image, source="/elsewhere.tar", origin=None))
        other = pytester.runpytest_subprocess()
        other.assert_outcomes(passed=4)
        assert store.require("bb:1").source == "/elsewhere.tar"
        assert [i.name for i in store.images() if i.name.startswith("bb-")]

    pytester.makepyfile(
        'import pytest\n\n@pytest.mark.container(image="127.0.0.1:5000/Tools/bb:1")\ndef test_x(): pass\n'
    )
    bad = pytester.runpytest_subprocess()
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*test_x*invalid image=*repository part 'Tools' is not valid*"])


@pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")
def test_a_failed_tests_layer_committed_pushed_and_pulled_back(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The whole path: a test on a pulled image fails, its layer is kept, committed, pushed beside the base
    (whose blobs are not sent again) and pulled on a fresh store with the same digests and content."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", store.root)
    with contextlib.contextmanager(serve)() as registry:
        registry.add_image("tools/bb", "1", [_busybox_layer(), _tar(BASE)])
        pytester.makepyfile(f"""
            import pytest

            @pytest.mark.container(image="{registry.host}/tools/bb:1")
            def test_breaks(sandbox):
                sandbox.run("mkdir -p /srv && echo evidence > /srv/evidence && rm /etc/base", check=True)
                assert False
        """)
        pytester.runpytest_subprocess("--sandbox-keep=failed").assert_outcomes(failed=1)
        listed = run_cli("containers", cwd=pytester.path)
        cid = listed.stdout.splitlines()[1].split()[0]
        assert run_cli("commit", cid, "broken", cwd=pytester.path).returncode == 0
        base = store.require("bb:1")
        broken = store.require("broken")
        assert broken.layers[:-1] == base.layers and len(broken.layers) == len(base.layers) + 1

        before = len(registry.log)
        pushed = run_cli("images", "push", "broken", f"{registry.host}/tools/broken:1", cwd=pytester.path)
        assert pushed.returncode == 0, pushed.stderr
        digest = pushed.stdout.splitlines()[-1].rsplit("@", 1)[1]
        uploads = [r for r in registry.log[before:] if r[0] == "PUT" and "/blobs/uploads/" in r[1]]
        mounts = [r for r in registry.log[before:] if r[0] == "POST" and "mount=" in r[1] and r[2] == 201]
        assert len(uploads) == 2 and len(mounts) == 2  # the new layer and config; the base's two layers mounted

        fresh = Store(str(tmp_path_factory.mktemp("fresh")))
        pulled = reg.pull_image(fresh, f"{registry.host}/tools/broken:1", "broken")
        assert pulled.source.endswith(digest)
        assert pulled.layers == broken.layers and pulled.diff_ids == broken.diff_ids
        assert read(fresh, "broken", "/srv/evidence") == "evidence\n"
        with pytest.raises(FileNotFoundError):
            read(fresh, "broken", "/etc/base")  # the whiteout went up with the layer
        again = run_cli("run", "broken", "sh", "-c", "cat /srv/evidence; cat /etc/base", store=fresh.root)
        assert again.stdout == "evidence\n" and again.returncode != 0, again.stderr


def _cli(*args: str, password: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", *args],
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_login_checks_and_keeps_credentials_logout_forgets(store: Store, no_credentials: Path) -> None:
    with Registry(auth="bearer", users={"ci": "s3cret"}) as registry:
        registry.add_image("private/base", "1", [_tar(BASE)])
        config = no_credentials / ".docker/config.json"
        wrong = _cli("login", registry.host, "-u", "ci", "--password-stdin", password="wrong\n")
        assert wrong.returncode == 2 and "refused: HTTP 401 (UNAUTHORIZED: bad credentials)" in wrong.stderr
        assert not config.exists()
        no_user = _cli("login", registry.host, "--password-stdin", password="s3cret\n")
        assert no_user.returncode == 2 and "give --username" in no_user.stderr
        bad = _cli("login", "https://no/such", "-u", "ci", "--password-stdin", password="x")
        assert bad.returncode == 2 and "registry 'https://no/such' is not valid: a host name" in bad.stderr

        ok = _cli("login", registry.host, "-u", "ci", "--password-stdin", password="s3cret\n")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == f"logged in to {registry.host}; credentials in {config}\n"
        assert json.loads(config.read_text()) == {"auths": {registry.host: {"auth": _auth("ci", "s3cret")}}}
        assert config.stat().st_mode & 0o777 == 0o600
        image = reg.pull_image(store, f"{registry.host}/private/base:1")  # as docker would, from that file
        assert read(store, image.name, "/etc/base") == "base\n"

        out = _cli("logout", registry.host)
        assert out.returncode == 0 and json.loads(config.read_text()) == {"auths": {}}
        again = _cli("logout", registry.host)
        assert again.returncode == 2 and f"holds no credentials for {registry.host}" in again.stderr


def test_images_lock_pins_what_from_pulls(registry: Registry, store: Store, tmp_path: Path) -> None:
    old = registry.add_image("team/base", "1.4", [_tar(BASE)], env=["MODE=old"])
    project = _project(tmp_path, f"ARG TAG=1.4\nFROM {registry.host}/team/base:$TAG\nCOPY data.txt /srv/data.txt\n")
    (project / "images/pinned.Containerfile").write_text(f"FROM {registry.host}/team/base@{old}\n")
    (project / "images/local.Containerfile").write_text("FROM app\n")
    locked = run_cli("images", "lock", store=store.root, cwd=project)
    assert locked.returncode == 0, locked.stderr
    assert f"{registry.host}/team/base:1.4 -> {old} (images/app.Containerfile:2)" in locked.stdout
    assert f"{registry.host}/team/base@{old}: pinned in images/pinned.Containerfile:1" in locked.stdout
    lock = json.loads((project / "images/images.lock").read_text())
    assert lock == {"lockVersion": 1, "images": {f"{registry.host}/team/base:1.4": old}}

    registry.add_image("team/base", "1.4", [_tar(BASE), _tar(APP)], env=["MODE=new"])  # the tag moves on
    image = build.Builder(store, str(project / "images")).build("app")
    assert image.config["Env"] == ["MODE=old"] and len(image.layers) == 2  # what the lock names
    assert registry.requests("GET", f"/manifests/{old}")

    (project / "images/images.lock").unlink()
    fresh = Store(str(tmp_path / "fresh"))
    assert build.Builder(fresh, str(project / "images")).build("app").config["Env"] == ["MODE=new"]

    (project / "images/images.lock").write_text('{"images": {"a/b:1": "sha256:12"}}')
    with pytest.raises(reg.RegistryError, match=r"images.lock: a/b:1: digest 'sha256:12' is not sha256:<64"):
        build.Builder(Store(str(tmp_path / "third")), str(project / "images")).build("app")


def test_a_build_cache_shared_through_a_registry(registry: Registry, tmp_path: Path) -> None:
    """Two machines (two stores) build the same images/ with one --sandbox-cache: the second builds nothing."""
    project = _project(tmp_path, "FROM scratch\nCOPY data.txt /srv/data.txt\nENV MODE=x\nCOPY more.txt /srv/more.txt\n")
    (project / "images/more.txt").write_text("more\n")
    cache = f"{registry.host}/ci/cache"
    first = run_cli("images", "build", "--cache", cache, "app", store=tmp_path / "one", cwd=project)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(f"pushed to the build cache {cache}") == 2  # the two COPY steps
    assert len([t for t in registry.tags["ci/cache"] if t.startswith("sbx-")]) == 2

    before = len(registry.log)
    second = run_cli("images", "build", "--cache", cache, "app", store=tmp_path / "two", cwd=project)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count(f"pulled from the build cache {cache}") == 2
    assert "done in" not in second.stdout and "pushed" not in second.stdout  # nothing built, nothing sent
    assert not [r for r in registry.log[before:] if r[0] in ("PUT", "POST")]
    one, two = Store(str(tmp_path / "one")).require("app"), Store(str(tmp_path / "two")).require("app")
    assert (one.layers, one.diff_ids, one.config) == (two.layers, two.diff_ids, two.config)
    assert read(Store(str(tmp_path / "two")), "app", "/srv/more.txt") == "more\n"

    (project / "images/more.txt").write_text("changed\n")  # the last step only is built, and pushed
    third = run_cli("images", "build", "--cache", cache, "app", store=tmp_path / "two", cwd=project)
    assert third.returncode == 0, third.stderr
    assert "cached  app step 2/4" in third.stdout and third.stdout.count("pushed to the build cache") == 1

    bad = run_cli("images", "build", "--cache", f"{cache}:v1", "app", store=tmp_path / "two", cwd=project)
    assert bad.returncode == 2 and "give a repository (HOST/REPOSITORY), without a tag or digest" in bad.stderr
    down = run_cli(
        "images", "build", "--cache", "127.0.0.1:1/ci/cache", "--no-cache", "app", store=tmp_path / "two", cwd=project
    )
    assert down.returncode == 0, down.stderr  # a cache that is down is said, and the build goes on
    assert "not pushed to the build cache 127.0.0.1:1/ci/cache" in down.stdout and "connection refused" in down.stdout


def test_sandbox_cache_in_a_pytest_session(
    pytester: pytest.Pytester,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    (pytester.path / "images").mkdir()
    (pytester.path / "images/data.txt").write_text("data\n")
    (pytester.path / "images/app.Containerfile").write_text("FROM scratch\nCOPY data.txt /srv/data.txt\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(image="app")
        def test_in_image(sandbox):
            assert open(sandbox.path("/srv/data.txt")).read() == "data\\n"
    """)
    cache = f"--sandbox-cache={registry.host}/ci/cache"
    for store, said in (("one", "pushed to the build cache"), ("two", "pulled from the build cache")):
        monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path_factory.mktemp(store)))
        result = pytester.runpytest_subprocess(cache)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*{said} {registry.host}/ci/cache*"])
    bad = pytester.runpytest_subprocess(f"--sandbox-cache={registry.host}/ci/cache@{DIGEST}")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--sandbox-cache *: give a repository (HOST/REPOSITORY), without a tag or digest*"])
