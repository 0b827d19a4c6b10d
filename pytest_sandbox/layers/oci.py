"""OCI image layouts and archives: import into the store, export out of it.

References: ``oci:DIR[:TAG]`` (an image layout directory), ``oci-archive:FILE[:TAG]``
(the same as a tar), ``docker-archive:FILE[:TAG]`` (what ``docker save`` and
``skopeo copy ... docker-archive:`` write). Every blob is checked against its digest
and every layer against the config's diff id before it is published.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

from . import progress as progress_
from . import tarlayer
from .format import EMPTY_CONFIG, chain_id
from .store import Image, Store, StoreError, check_name

TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")
MT_INDEX = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
CONFIG_KEYS = ("Env", "WorkingDir", "User", "Cmd", "Entrypoint", "Labels", "ExposedPorts")

Progress = Callable[[str], None]


class ImportError_(StoreError):
    """An image could not be imported (bad reference, corrupt archive, digest mismatch)."""


def is_reference(text: str) -> bool:
    return text.startswith(TRANSPORTS)


def guess_reference(path: str) -> str:
    """A plain path as a reference: a layout directory is ``oci:``, a tar with ``manifest.json``
    (``docker save``) is ``docker-archive:``, one with ``index.json`` is ``oci-archive:``."""
    if is_reference(path):
        return path
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        return f"oci:{full}"
    if not os.path.isfile(full):
        raise ImportError_(
            f"{path}: no such file or directory (or use oci:DIR, oci-archive:FILE, "
            "docker-archive:FILE, each with an optional :TAG)"
        )
    try:
        with tarfile.open(full, "r:*") as tar:
            names = {tarlayer.clean_name(m.name) for m in tar.getmembers()}
    except (tarfile.TarError, OSError, EOFError, tarlayer.LayerError) as exc:
        raise ImportError_(f"{path}: not a readable tar archive: {exc}") from None
    if "manifest.json" in names:
        return f"docker-archive:{full}"
    if "index.json" in names:
        return f"oci-archive:{full}"
    raise ImportError_(f"{path}: neither an OCI archive (index.json) nor a docker archive (manifest.json)")


def split_reference(ref: str) -> tuple[str, str, str | None]:
    """``transport:path[:tag]`` -> (transport, path, tag); a path may itself hold ':' only before a tag."""
    for transport in TRANSPORTS:
        if ref.startswith(transport):
            rest = ref[len(transport) :]
            break
    else:
        raise ImportError_(
            f"{ref!r} is not an image reference: use one of " + ", ".join(t + "PATH" for t in TRANSPORTS)
        )
    path, tag = rest, None
    if ":" in rest and not os.path.exists(rest):
        path, tag = rest.rsplit(":", 1)
    if not path:
        raise ImportError_(f"{ref!r}: no path after {transport!r}")
    return transport[:-1], os.path.abspath(os.path.expanduser(path)), tag or None


# -- reading blobs ---------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _ZstdPipe(io.RawIOBase):
    """zstd decompression through the ``zstd`` program (no zstd module before Python 3.14)."""

    def __init__(self, source: IO[bytes]) -> None:
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImportError_(
                "a layer is zstd-compressed and neither Python's compression.zstd, the zstandard "
                "module nor the zstd program is available (apt install zstd)"
            )
        self.proc = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.error: BaseException | None = None
        self.feeder = threading.Thread(target=self._feed, args=(source,), daemon=True)
        self.feeder.start()

    def _feed(self, source: IO[bytes]) -> None:
        assert self.proc.stdin is not None
        try:
            while chunk := source.read(1 << 20):
                self.proc.stdin.write(chunk)
        except BaseException as exc:
            self.error = exc
        finally:
            self.proc.stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        assert self.proc.stdout is not None
        while self.proc.stdout.read(1 << 20):
            pass
        self.feeder.join()
        code = self.proc.wait()
        super().close()
        if code != 0 or self.error is not None:
            raise ImportError_(f"zstd decompression failed (exit {code}{'; ' + str(self.error) if self.error else ''})")


def zstd_decompressor() -> str | None:
    """What decompresses zstd layers here, in the order ``_zstd_reader`` tries them; None if nothing."""
    for module, name in (("compression.zstd", "Python's compression.zstd"), ("zstandard", "the zstandard module")):
        try:
            importlib.import_module(module)
            return name
        except ImportError:
            pass
    return "the zstd program" if shutil.which("zstd") else None


def _zstd_reader(source: IO[bytes]) -> IO[bytes]:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        return zstd.ZstdFile(source)  # type: ignore[no-any-return]
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]

        return zstandard.ZstdDecompressor().stream_reader(source)  # type: ignore[no-any-return]
    except ImportError:
        return io.BufferedReader(_ZstdPipe(source))


def _decompressed(raw: io.RawIOBase) -> IO[bytes]:
    """Pick the decompressor from the stream's magic bytes (media types lie more often)."""
    buffered = io.BufferedReader(raw, 1 << 16)
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        return _zstd_reader(buffered)
    return buffered


class _Source:
    """Blob access for a layout directory or a tar archive of one."""

    def __init__(self, transport: str, path: str) -> None:
        self.transport, self.path = transport, path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if transport == "oci":
            if not os.path.isfile(os.path.join(path, "index.json")):
                raise ImportError_(f"oci:{path}: not an OCI image layout (no index.json)")
        else:
            if not os.path.isfile(path):
                raise ImportError_(f"{transport}:{path}: no such file")
            try:
                self.tar = tarfile.open(path, "r:*")
                self.members = {tarlayer.clean_name(m.name): m for m in self.tar.getmembers()}
            except (tarfile.TarError, OSError, EOFError, tarlayer.LayerError) as exc:
                raise ImportError_(f"{transport}:{path}: not a readable tar archive: {exc}") from None

    def exists(self, name: str) -> bool:
        if self.tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        return tarlayer.clean_name(name) in self.members

    def open(self, name: str) -> IO[bytes]:
        if self.tar is None:
            try:
                return open(os.path.join(self.path, name), "rb")
            except OSError as exc:
                raise ImportError_(f"{self.transport}:{self.path}: missing {name} ({exc.strerror})") from None
        member = self.members.get(tarlayer.clean_name(name))
        fileobj = self.tar.extractfile(member) if member is not None else None
        if fileobj is None:
            raise ImportError_(f"{self.transport}:{self.path}: the archive has no file {name}")
        return fileobj

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return json.load(f)
            except ValueError as exc:
                raise ImportError_(f"{self.transport}:{self.path}: {name} is not valid JSON: {exc}") from None

    def blob_name(self, digest: str) -> str:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise ImportError_(f"{self.transport}:{self.path}: unsupported digest {digest!r}")
        return f"blobs/{algo}/{hexpart}"

    def verified_json(self, digest: str) -> Any:
        with self.open(self.blob_name(digest)) as f:
            data = f.read()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ImportError_(f"{self.transport}:{self.path}: blob {digest} is corrupt (content hashes to {actual})")
        return json.loads(data)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


class BlobSource(Protocol):
    """Where layer blobs come from: a layout, an archive, a registry."""

    def open(self, name: str) -> IO[bytes]: ...


def platform_matches(descriptor: dict[str, Any]) -> bool:
    """Whether an index entry is for linux/<this machine's architecture> (no platform: taken as such)."""
    plat = descriptor.get("platform") or {}
    return bool(plat.get("os", "linux") == "linux" and plat.get("architecture", ARCH) == ARCH)


def _pick(descriptors: list[dict[str, Any]], tag: str | None, where: str) -> dict[str, Any]:
    if tag is not None:
        named = [d for d in descriptors if (d.get("annotations") or {}).get(REF_ANNOTATION) in (tag,)]
        if not named:
            names = sorted({(d.get("annotations") or {}).get(REF_ANNOTATION, "?") for d in descriptors})
            raise ImportError_(f"{where}: no image tagged {tag!r} (tags there: {', '.join(names) or 'none'})")
        descriptors = named
    fitting = [d for d in descriptors if platform_matches(d)]
    if not fitting:
        raise ImportError_(f"{where}: no image for linux/{ARCH}")
    if len(fitting) > 1 and tag is None and len({d["digest"] for d in fitting}) > 1:
        names = sorted({(d.get("annotations") or {}).get(REF_ANNOTATION, "?") for d in fitting})
        raise ImportError_(f"{where}: holds several images; name one with :TAG (tags: {', '.join(names)})")
    return fitting[0]


def _oci_manifest(source: _Source, tag: str | None) -> tuple[dict[str, Any], str | None]:
    where = f"{source.transport}:{source.path}"
    index = source.json("index.json")
    chosen = _pick(list(index.get("manifests") or []), tag, where)
    name_hint = (chosen.get("annotations") or {}).get(REF_ANNOTATION)
    manifest = source.verified_json(chosen["digest"])
    for _depth in range(4):  # nested indexes (multi-platform images)
        if manifest.get("mediaType") in MT_INDEX or "manifests" in manifest:
            manifest = source.verified_json(_pick(list(manifest["manifests"]), None, where)["digest"])
        else:
            break
    if "layers" not in manifest or "config" not in manifest:
        raise ImportError_(f"{where}: the manifest has no config or layers")
    return manifest, name_hint


class LayerRef:
    """A layer blob: its name in the source, its digest (None in a docker archive), its descriptor, and the
    registry repository it was pulled from ("HOST/REPO", for a later push to mount it from there)."""

    def __init__(
        self, name: str, digest: str | None, descriptor: dict[str, Any] | None = None, pulled_from: str | None = None
    ) -> None:
        self.name, self.digest, self.descriptor, self.pulled_from = name, digest, descriptor, pulled_from


def _read_source(source: _Source, tag: str | None) -> tuple[dict[str, Any], list[LayerRef], str | None]:
    """(image config, layer blobs lowest first, a name the archive suggests)."""
    where = f"{source.transport}:{source.path}"
    if source.transport == "docker-archive":
        if not source.exists("manifest.json"):
            raise ImportError_(f"{where}: not a docker archive (no manifest.json)")
        entries = source.json("manifest.json")
        if tag is not None:
            entries = [
                e
                for e in entries
                if any(
                    t == tag or t.endswith(":" + tag) or t.split(":")[0].endswith(tag) for t in e.get("RepoTags") or []
                )
            ]
            if not entries:
                raise ImportError_(f"{where}: no image tagged {tag!r}")
        if len(entries) != 1:
            raise ImportError_(f"{where}: holds {len(entries)} images; name one with :TAG")
        entry = entries[0]
        config = source.json(entry["Config"])
        layers = [LayerRef(name, None) for name in entry["Layers"]]
        tags = entry.get("RepoTags") or []
        return config, layers, (tags[0] if tags else None)
    manifest, hint = _oci_manifest(source, tag)
    config = source.verified_json(manifest["config"]["digest"])
    layers = [LayerRef(source.blob_name(d["digest"]), d["digest"]) for d in manifest["layers"]]
    return config, layers, hint


def _default_name(hint: str | None, path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".oci"):
        base = base.removesuffix(suffix)
    if hint and ":" not in hint and "/" not in hint:  # an OCI ref name is often only a tag
        hint = f"{base}:{hint}"
    candidate = hint or base
    candidate = candidate.rsplit("/", 1)[-1].lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".oci"):
        if candidate.endswith(suffix):
            candidate = candidate[: -len(suffix)]
    cleaned = "".join(c if c.isalnum() or c in "._-:" else "-" for c in candidate).strip("-.:") or "imported"
    if ":" in cleaned:
        repo, _, tagpart = cleaned.partition(":")
        cleaned = f"{repo}:{tagpart}" if tagpart and tagpart != "latest" else repo
    return cleaned


def _unpack_layer(
    store: Store, source: BlobSource, layer: LayerRef, diff_id: str, parent: str | None, where: str
) -> str:
    chain = chain_id(parent, diff_id)
    if store.has_layer(chain):
        return chain
    with store.staging() as stage:
        diff = os.path.join(stage, "diff")
        os.mkdir(diff)
        with source.open(layer.name) as blob:
            raw = _HashingReader(blob)
            unpacked = _HashingReader(_decompressed(raw))
            try:
                result = tarlayer.apply_tar(unpacked, diff)  # type: ignore[arg-type]
                unpacked.drain()
                raw.drain()
            except (OSError, EOFError, tarlayer.LayerError, gzip.BadGzipFile) as exc:
                raise ImportError_(f"{where}: layer {layer.digest or layer.name} cannot be unpacked: {exc}") from None
        if layer.digest is not None and raw.digest != layer.digest:
            raise ImportError_(f"{where}: blob {layer.digest} is corrupt (content hashes to {raw.digest})")
        if unpacked.digest != diff_id:
            raise ImportError_(
                f"{where}: layer {layer.digest or layer.name} does not match its diff id "
                f"{diff_id} (uncompressed content hashes to {unpacked.digest})"
            )
        extra: dict[str, Any] = {"skipped_devices": result.skipped_devices} if result.skipped_devices else {}
        if layer.descriptor is not None:  # what a push needs to name this blob again without repacking it
            extra["blob"] = {k: layer.descriptor[k] for k in ("mediaType", "digest", "size") if k in layer.descriptor}
        if layer.pulled_from is not None:
            extra["blob_from"] = layer.pulled_from
        store.publish_layer(diff, chain, diff_id, parent, extra)
    return chain


def config_diff_ids(config: dict[str, Any], layers: int, where: str) -> list[str]:
    """The image config's diff ids, one per layer blob."""
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if not isinstance(diff_ids, list) or len(diff_ids) != layers or not all(isinstance(d, str) for d in diff_ids):
        raise ImportError_(f"{where}: {layers} layers but {len(diff_ids)} diff ids in the config")
    return list(diff_ids)


def image_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a container starts with, out of an OCI image config."""
    out = dict(EMPTY_CONFIG)
    out.update({k: v for k, v in (config.get("config") or {}).items() if k in CONFIG_KEYS and v})
    return out


def unpack_chain(
    store: Store,
    source: BlobSource,
    layers: Sequence[LayerRef],
    diff_ids: Sequence[str],
    where: str,
    progress: Progress | None = None,
    verbs: tuple[str, str] = ("unpacking", "unpacked"),
) -> list[str]:
    """Unpack the layers (lowest first) into the store (caller holds its lock); their chain ids.

    A layer whose chain id the store has is not read at all: a registry is never asked for it.
    """
    say = progress or (lambda _msg: None)
    chains: list[str] = []
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        parent = chains[-1] if chains else None
        cached = store.has_layer(chain_id(parent, diff_id))
        size = (layer.descriptor or {}).get("size")
        what = f"layer {i + 1}/{len(layers)} {diff_id[:19]}" + (f" ({_size(size)})" if isinstance(size, int) else "")
        with progress_.running(progress, f"{what} {verbs[0]}"):
            chains.append(_unpack_layer(store, source, layer, diff_id, parent, where))
        say(f"{what} {'cached' if cached else verbs[1]}")
    return chains


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def import_layers(
    store: Store, ref: str, progress: Progress | None = None
) -> tuple[list[str], list[str], dict[str, Any], str | None]:
    """Unpack an image reference's layers into the store (caller holds the store lock).

    Returns the chain ids, diff ids, the image config and the name the archive suggests.
    """
    transport, path, tag = split_reference(ref)
    where = f"{transport}:{path}"
    source = _Source(transport, path)
    try:
        config, layers, hint = _read_source(source, tag)
        diff_ids = config_diff_ids(config, len(layers), where)
        chains = unpack_chain(store, source, layers, diff_ids, where, progress)
        return chains, diff_ids, image_config(config), _default_name(hint, path)
    finally:
        source.close()


def import_image(
    store: Store,
    ref: str,
    name: str | None = None,
    progress: Progress | None = None,
    check: Callable[[str], None] | None = None,
) -> Image:
    """Import an image reference into the store under ``name`` (default: the archive's tag).

    ``check(name)`` may refuse the name (raise) before anything is published: before the
    import when ``name`` is given, else once the archive's tag is known.
    """
    if name is not None:
        check_name(name)
        if check is not None:
            check(name)
    with store.locked():
        chains, diff_ids, config, suggested = import_layers(store, ref, progress)
        final = check_name(name or suggested or "imported")
        if check is not None and name is None:
            check(final)
        image = Image(
            name=final,
            layers=tuple(chains),
            diff_ids=tuple(diff_ids),
            config=config,
            source=ref,
            created=time.time(),
        )
        store.put(image)
    return image


# -- export ----------------------------------------------------------------------------------


class _Sink:
    def __init__(self, transport: str, path: str) -> None:
        self.transport, self.path = transport, path
        self.tar: tarfile.TarFile | None = None
        if transport == "oci":
            os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        else:
            self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
            for directory in ("blobs", "blobs/sha256"):
                info = self._info(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                self.tar.addfile(info)

    @staticmethod
    def _info(name: str) -> tarfile.TarInfo:
        """Entries owned by whoever writes the archive, as tar does (readers without root chown to it)."""
        info = tarfile.TarInfo(name)
        info.uid, info.gid, info.mtime, info.mode = os.getuid(), os.getgid(), int(time.time()), 0o644
        return info

    def add_bytes(self, name: str, data: bytes) -> None:
        if self.tar is None:
            with open(os.path.join(self.path, name), "wb") as f:
                f.write(data)
            return
        info = self._info(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def add_file(self, name: str, local: str) -> None:
        if self.tar is None:
            os.makedirs(os.path.dirname(os.path.join(self.path, name)), exist_ok=True)
            shutil.copyfile(local, os.path.join(self.path, name))
            return
        info = self._info(name)
        info.size = os.path.getsize(local)
        with open(local, "rb") as f:
            self.tar.addfile(info, f)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _check_writable(transport: str, path: str) -> None:
    """Refuse a target that cannot be written before any layer is (not after all of them)."""
    if transport == "oci" and os.path.isdir(path):
        raise StoreError(f"oci:{path} already exists; choose a new directory")
    if os.path.isdir(path):
        raise StoreError(f"{path} is a directory; give a file name (or oci:{path} for an OCI layout directory)")
    existing = os.path.dirname(path) or "."
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write {path}: {existing} is not a directory you may write to")


def export_image(store: Store, name: str, target: str, progress: Progress | None = None) -> str:
    """Write an image as ``oci-archive:`` (default for a plain path), ``oci:`` or ``docker-archive:``."""
    say = progress or (lambda _msg: None)
    image = store.require(name)
    if image.host_based:
        raise StoreError(
            f"image {name} is built FROM host: its base is this machine, not a layer, so it cannot be exported"
        )
    if is_reference(target):
        transport, path, _tag = split_reference(target)
    else:
        transport, path = "oci-archive", os.path.abspath(target)
    _check_writable(transport, path)
    repo, _, tag = image.name.partition(":")
    tag = tag or "latest"
    with store.staging() as stage:
        tmp_target = os.path.join(stage, "out")
        sink = _Sink(transport, tmp_target)
        diff_ids: list[str] = []
        layer_descriptors: list[dict[str, Any]] = []
        docker_layers: list[str] = []
        for i, chain in enumerate(image.layers):
            local = os.path.join(stage, f"layer{i}")
            with open(local, "wb") as f:
                gzipped = tarlayer.HashingWriter(f)
                if transport == "docker-archive":
                    plain = tarlayer.HashingWriter(f)
                    tarlayer.write_tar(store.diff_path(chain), plain)
                    diff_ids.append(plain.digest)
                    docker_layers.append(f"{plain.digest.split(':')[1]}/layer.tar")
                    sink_name = docker_layers[-1]
                else:
                    with gzip.GzipFile(fileobj=gzipped, mode="wb", mtime=0) as gz:
                        plain = tarlayer.HashingWriter(gz)
                        tarlayer.write_tar(store.diff_path(chain), plain)
                    diff_ids.append(plain.digest)
                    layer_descriptors.append(
                        {"mediaType": MT_LAYER_GZIP, "digest": gzipped.digest, "size": gzipped.size}
                    )
                    sink_name = "blobs/sha256/" + gzipped.digest.split(":")[1]
            sink.add_file(sink_name, local)
            os.unlink(local)
            say(f"layer {i + 1}/{len(image.layers)} {diff_ids[-1][:19]} written")
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(image.created))
        config = {
            "architecture": ARCH,
            "os": "linux",
            "created": created,
            "config": {k: v for k, v in image.config.items() if v not in (None, "", [], {})},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_bytes = _json_bytes(config)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        if transport == "docker-archive":
            config_name = config_digest.split(":")[1] + ".json"
            sink.add_bytes(config_name, config_bytes)
            sink.add_bytes(
                "manifest.json",
                _json_bytes([{"Config": config_name, "RepoTags": [f"{repo}:{tag}"], "Layers": docker_layers}]),
            )
        else:
            sink.add_bytes("blobs/sha256/" + config_digest.split(":")[1], config_bytes)
            manifest = {
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": layer_descriptors,
            }
            manifest_bytes = _json_bytes(manifest)
            manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
            sink.add_bytes("blobs/sha256/" + manifest_digest.split(":")[1], manifest_bytes)
            sink.add_bytes("oci-layout", _json_bytes({"imageLayoutVersion": "1.0.0"}))
            sink.add_bytes(
                "index.json",
                _json_bytes(
                    {
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [
                            {
                                "mediaType": MT_MANIFEST,
                                "digest": manifest_digest,
                                "size": len(manifest_bytes),
                                "annotations": {REF_ANNOTATION: tag},
                                "platform": {"architecture": ARCH, "os": "linux"},
                            }
                        ],
                    }
                ),
            )
        sink.close()
        if os.path.isdir(path) and transport == "oci":
            raise StoreError(f"oci:{path} already exists; choose a new directory")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        shutil.move(tmp_target, path)
    return f"{transport}:{path}"
