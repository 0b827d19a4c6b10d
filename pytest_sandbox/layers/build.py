"""Build ``images/<name>.Containerfile`` into store layers, with a Docker-style step cache.

A step's cache key is its parent step's key plus the instruction text (plus the
content hash of what ``COPY`` reads, plus the ARG values a ``RUN`` sees), so editing
one line rebuilds from that line on. ``RUN`` executes in a sandbox on the image so
far; the overlay's upper directory becomes the new layer. The whole build holds the
store lock: concurrent sessions and xdist workers build an image once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ..linux import overlay, rootfs
from . import commands, containerfile, format, oci, progress, registry, tarlayer
from .containerfile import ContainerfileError, Instruction
from .format import EMPTY_CONFIG, HOST_BASE
from .progress import shorten
from .store import Image, Store, StoreError, check_name

Progress = Callable[[str], None]
SUFFIX = ".Containerfile"
IGNORE_FILE = ".containerignore"
_MOUNTPOINTS = ("proc", "dev", "sys")
SHOWN = 72  # characters of an instruction in a progress line


def as_written(ins: Instruction) -> str:
    """The instruction as the Containerfile has it (flags included), on one line and cut to SHOWN."""
    flags = " ".join(f"--{k}" if k in containerfile.SWITCHES and v == "true" else f"--{k}={v}" for k, v in ins.flags)
    body = json.dumps(list(ins.json_form)) if ins.json_form is not None else ins.args
    return shorten(f"{ins.keyword} {flags + ' ' if flags else ''}{body}", SHOWN)


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


class BuildError(StoreError):
    """A build step failed; the message names the file, line and what went wrong."""


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images")


def definition_path(images_dir: str, name: str) -> str:
    return os.path.join(images_dir, name.replace(":", "_") + SUFFIX)


def definitions(images_dir: str) -> list[str]:
    """Names of the images defined in ``images_dir``."""
    if not os.path.isdir(images_dir):
        return []
    return sorted(e[: -len(SUFFIX)] for e in os.listdir(images_dir) if e.endswith(SUFFIX))


def host_busybox() -> str | None:
    """The host's busybox binary (static or not), if it has one."""
    return next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.isfile(p)), None)


def builtin_definitions() -> list[str]:
    """Names of the images that come with pytest-sandbox (``FROM busybox`` works in any project)."""
    return definitions(BUILTIN_DIR)


@dataclasses.dataclass
class _State:
    key: str
    layers: list[str]
    diff_ids: list[str]
    config: dict[str, Any]
    base: str = ""

    @property
    def host_based(self) -> bool:
        return self.base == HOST_BASE

    def entry(self) -> dict[str, Any]:
        return {"layers": self.layers, "diff_ids": self.diff_ids, "config": self.config, "base": self.base}

    def derived(
        self,
        key: str,
        layers: list[str] | None = None,
        diff_ids: list[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> _State:
        return _State(
            key,
            self.layers if layers is None else layers,
            self.diff_ids if diff_ids is None else diff_ids,
            self.config if config is None else config,
            self.base,
        )


class _Ignore:
    """``.containerignore``: gitignore-like patterns, ``!`` re-includes, last match wins."""

    def __init__(self, context: str) -> None:
        self.rules: list[tuple[bool, str]] = []
        path = os.path.join(context, IGNORE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                for raw in f:
                    line = raw.strip()
                    if not line or line.startswith("#"):
                        continue
                    negate = line.startswith("!")
                    pattern = line[1:] if negate else line
                    self.rules.append((negate, pattern.strip("/").removeprefix("./")))

    def ignored(self, rel: str) -> bool:
        result = False
        for negate, pattern in self.rules:
            if self._match(rel, pattern):
                result = not negate
        return result

    @staticmethod
    def _match(rel: str, pattern: str) -> bool:
        parts = rel.split("/")
        # a pattern matches the path itself or any of its parent directories
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, pattern.replace("**/", "")):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pattern[3:]):
                return True
        return False


class Builder:
    """Builds images defined in one directory into one store."""

    def __init__(
        self,
        store: Store,
        images_dir: str,
        progress: Progress | None = None,
        build_args: Mapping[str, str] | None = None,
        quiet_cached: bool = False,
        no_cache: bool = False,
        insecure_registries: Collection[str] = (),
        cache: registry.RemoteCache | None = None,
    ) -> None:
        self.store = store
        self.insecure_registries = tuple(insecure_registries)  # sandbox_insecure_registries
        self._lock: dict[str, str] | None = None  # images/images.lock: reference -> manifest digest
        self.cache = cache  # --sandbox-cache: steps shared with other machines through a registry
        self.images_dir = os.path.abspath(images_dir)
        self._progress = progress or (lambda _msg: None)
        self._pending: list[str] = []  # headers held back while every step is cached (quiet mode)
        self._said = 0
        self.build_args = dict(build_args or {})
        self.quiet_cached = quiet_cached
        self.no_cache = no_cache  # every step runs again (a FROM host base changed, say)
        self._building: list[str] = []
        self._done: dict[str, Image] = {}

    @property
    def tty(self) -> bool:
        """Whether the progress output shows a live status line (a terminal): see progress.running."""
        return bool(getattr(self._progress, "tty", False))

    def status(self, text: str) -> None:
        status = getattr(self._progress, "status", None)
        if status is not None:
            status(text)

    def __call__(self, message: str) -> None:
        self.say(message)

    def say(self, message: str) -> None:
        self._said += 1
        for line in self._pending:
            self._progress(line)
        self._pending.clear()
        self._progress(message)

    def _header(self, message: str) -> None:
        if self.quiet_cached:
            self._pending.append(message)
        else:
            self._progress(message)

    def _definition(self, name: str) -> str | None:
        """The Containerfile behind ``name``: the project's images/ first, then the store (an image
        imported or committed under that name), then the images shipped with pytest-sandbox."""
        own = definition_path(self.images_dir, name)
        if os.path.isfile(own):
            return own
        builtin = definition_path(BUILTIN_DIR, name)
        if name == "busybox" and host_busybox() is None:  # a fresh host: its own sh and coreutils instead
            builtin = definition_path(BUILTIN_DIR, "hosttools")
        if not os.path.isfile(builtin):
            return None
        stored = self.store.get(name)
        if stored is not None and stored.source != builtin:
            return None  # imported or committed under this name by the user
        return builtin

    # -- entry points --------------------------------------------------------------------
    def build(self, name: str) -> Image:
        check_name(name)
        with self.store.locked():
            return self._build(name)

    def ensure(self, name: str) -> Image:
        """The image, built if it has a definition here, or as the store has it; a registry's reference
        (``image="HOST/REPO:TAG"`` in a marker) pulled if the store does not have it yet."""
        with self.store.locked():
            if registry.looks_like_registry(name):
                return self._pulled(name)
            if self._definition(name) is not None:
                return self._build(name)
            return self.store.require(name)

    def _pulled(self, text: str) -> Image:
        """A registry's image as FROM takes it (the store's copy of that reference, else pulled; images.lock
        pins it), recorded in the store so that kept containers, ``shell`` and ``commit`` find it."""
        ref = self._pinned(registry.parse_reference(text, "image"))
        cached = self._registry_entry(ref, "")
        source = f"{ref.registry}/{ref.repository}@{cached['digest']}"
        name = self._name_for(ref, source)
        found = self.store.get(name)
        if found is not None and found.source == source and list(found.layers) == list(cached["layers"]):
            return found
        image = Image(
            name=name,
            layers=tuple(cached["layers"]),
            diff_ids=tuple(cached["diff_ids"]),
            config=dict(cached["config"]),
            source=source,
            created=time.time(),
            origin=cached.get("origin") or None,
        )
        self.store.put(image)
        return image

    def _name_for(self, ref: registry.Reference, source: str) -> str:
        """The store name of a pulled reference: what ``images pull`` would name it, unless that name is an
        image of images/ or one from elsewhere; then that name and a hash of the reference."""
        name = ref.default_name()
        found = self.store.get(name)
        if self._definition(name) is None and (found is None or found.source.split("@")[0] == source.split("@")[0]):
            return name
        return check_name(f"{name.split(':')[0][:100]}-{hashlib.sha256(str(ref).encode()).hexdigest()[:12]}")

    def check(self, name: str) -> None:
        """Parse a definition (and its bases) without building: errors before anything runs."""
        if registry.looks_like_registry(name):
            registry.parse_reference(name, "image")
            return
        path = self._definition(name)
        if path is None:
            if self.store.get(name) is None:
                raise StoreError(
                    f"no image {name!r}: neither {definition_path(self.images_dir, name)} nor an "
                    f"image of that name in the store {self.store.root}"
                )
            return
        from_, base = self._base_of(path)
        if registry.looks_like_registry(base):
            registry.parse_reference(base, f"{path}:{from_.line}: FROM")
        elif base not in ("scratch", HOST_BASE) and not oci.is_reference(base) and base != name:
            self.check(base)

    def _base_of(self, path: str) -> tuple[Instruction, str]:
        """A definition's FROM and its base, as the build will see it (``FROM $BASE`` with its ARGs)."""
        with open(path) as f:
            instructions = containerfile.parse(f.read(), path)
        args: dict[str, str] = {}
        for ins in instructions[: [i.keyword for i in instructions].index("FROM")]:
            args.update(self._arg_values(ins, path, args))
        from_ = instructions[[i.keyword for i in instructions].index("FROM")]
        return from_, containerfile.substitute(from_.args.split()[0], args)

    def registry_bases(self) -> list[tuple[str, str]]:
        """(``file:line``, reference) of every definition in images/ whose FROM is a registry's image."""
        out = []
        for name in definitions(self.images_dir):
            path = definition_path(self.images_dir, name)
            from_, base = self._base_of(path)
            if registry.looks_like_registry(base):
                out.append((f"{os.path.relpath(path)}:{from_.line}", base))
        return out

    def _locked(self) -> dict[str, str]:
        if self._lock is None:
            self._lock = registry.read_lock(os.path.join(self.images_dir, registry.LOCK_FILE))
        return self._lock

    # -- one image -----------------------------------------------------------------------
    def _build(self, name: str) -> Image:
        if name in self._done:
            return self._done[name]
        path = self._definition(name)
        if path is None:
            raise StoreError(f"no image definition {definition_path(self.images_dir, name)}")
        if name in self._building:
            raise BuildError(f"{path}: FROM cycle: {' -> '.join([*self._building, name])}")
        self._building.append(name)
        try:
            with open(path) as f:
                instructions = containerfile.parse(f.read(), path)
            started = time.monotonic()
            nested = f" (the base of {self._building[-2]})" if len(self._building) > 1 else ""
            pending_before = len(self._pending)
            shipped = os.path.dirname(os.path.abspath(path)) == os.path.abspath(BUILTIN_DIR)
            where = f"{os.path.basename(path)} shipped with pytest-sandbox" if shipped else os.path.relpath(path)
            self._header(f"building image {name} from {where}{nested}")
            said_before = self._said
            # Steps count from the FROM (step 1): ARGs before it only set its variables.
            steps = instructions[[i.keyword for i in instructions].index("FROM") :]
            total = len(steps)
            state, args = self._from(instructions, path, f"{name} step 1/{total}")
            for number, ins in enumerate(steps[1:], 2):
                state, args = self._step(ins, state, args, path, f"{name} step {number}/{total}")
            image = Image(
                name=name,
                layers=tuple(state.layers),
                diff_ids=tuple(state.diff_ids),
                config=state.config,
                source=os.path.abspath(path),
                created=time.time(),
                build_key=state.key,
                base=state.base,
            )
            existing = self.store.get(name)
            if existing is None or (existing.build_key, existing.layers, existing.config, existing.base) != (
                image.build_key,
                image.layers,
                image.config,
                image.base,
            ):
                self.store.put(image)
            else:
                image = existing
            ready = f"image {name}: {_layers(len(image.layers))}, ready in {time.monotonic() - started:.2f}s"
            if self.quiet_cached and self._said == said_before:
                del self._pending[pending_before:]  # everything was cached: not a word
            else:
                self.say(ready)
            self._done[name] = image
            return image
        finally:
            self._building.pop()

    def _from(self, instructions: list[Instruction], path: str, label: str) -> tuple[_State, dict[str, str]]:
        args: dict[str, str] = {}
        for ins in instructions:
            if ins.keyword == "FROM":
                break
            args.update(self._arg_values(ins, path, args))
        ins = next(i for i in instructions if i.keyword == "FROM")
        base = containerfile.substitute(ins.args.split()[0], args)
        # A header: shown with what follows (a base built or imported first, the next steps), not alone.
        self._header(f"  {label}: {as_written(ins)}")
        if base == "scratch":
            return _State(_key("FROM scratch"), [], [], dict(EMPTY_CONFIG)), {}
        if base == HOST_BASE:  # the sandbox's view of this machine, live: host changes do not rebuild
            return _State(_key("FROM host"), [], [], dict(EMPTY_CONFIG), HOST_BASE), {}
        if registry.looks_like_registry(base):
            return self._from_registry(base, path, ins), {}
        if oci.is_reference(base):
            transport, ref_path, tag = oci.split_reference(
                base.replace(":", ":" + os.path.dirname(path) + "/", 1)
                if not base.split(":", 1)[1].startswith("/")
                else base
            )
            digest = _file_digest(ref_path)
            key = _key("FROM", transport, digest, tag or "")
            cached = self._cache_get(key)
            if cached is None:
                ref = f"{transport}:{ref_path}" + (f":{tag}" if tag else "")
                try:
                    chains, diff_ids, config, _ = oci.import_layers(self.store, ref, self)
                except StoreError as exc:
                    raise BuildError(f"{path}:{ins.line}: FROM {base}: {exc}") from None
                cached = {"layers": chains, "diff_ids": diff_ids, "config": config}
                self.store.cache_put(key, cached)
            return _State(key, list(cached["layers"]), list(cached["diff_ids"]), dict(cached["config"])), {}
        if self._definition(base) is not None:
            image = self._build(base)
        else:
            found = self.store.get(base)
            if found is None:
                raise BuildError(
                    f"{path}:{ins.line}: FROM {base}: no {definition_path(self.images_dir, base)} "
                    f"and no image {base!r} in the store (use scratch, an image of "
                    f"{os.path.relpath(self.images_dir)}/, oci:/oci-archive:/docker-archive:, or a registry's "
                    "HOST/REPOSITORY:TAG)"
                )
            image = found
        key = _key("FROM", json.dumps([list(image.layers), image.config, image.base], sort_keys=True))
        return _State(key, list(image.layers), list(image.diff_ids), dict(image.config), image.base), {}

    def _from_registry(self, base: str, path: str, ins: Instruction) -> _State:
        """``FROM host/repo:tag``: the image as the store last pulled that reference (``images pull`` updates
        it), else pulled now; only the layers the store lacks are downloaded. ``--no-cache`` pulls again."""
        where = f"{path}:{ins.line}: FROM"
        ref = self._pinned(registry.parse_reference(base, where))
        try:
            cached = self._registry_entry(ref, "  ")
        except StoreError as exc:
            raise BuildError(f"{where} {base}: {exc}") from None
        key = _key("FROM", str(ref), cached["digest"])
        return _State(key, list(cached["layers"]), list(cached["diff_ids"]), dict(cached["config"]))

    def _pinned(self, ref: registry.Reference) -> registry.Reference:
        """The reference at the digest images.lock holds for it, if it holds one."""
        if ref.digest is None and str(ref) in self._locked():
            return dataclasses.replace(ref, digest=self._locked()[str(ref)])
        return ref

    def _registry_entry(self, ref: registry.Reference, indent: str) -> dict[str, Any]:
        """The store's entry of a registry reference as last pulled (``images pull`` moves it on), else pulled
        now: for FROM and for a marker's image alike."""
        cached = self._cache_get(registry.cache_key(ref))
        if cached is None or "digest" not in cached:
            self.say(f"{indent}pulling {ref}")
            cached = registry.pull_layers(self.store, ref, self, self.insecure_registries).entry()
        return cached

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        return None if self.no_cache else self.store.cache_get(key)

    def _cached(self, what: str) -> None:
        if not self.quiet_cached:
            self.say(f"  cached  {what}")

    def _arg_values(self, ins: Instruction, path: str, current: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for word in shlex.split(ins.args):
            key, sep, default = word.partition("=")
            out[key] = self.build_args.get(key, containerfile.substitute(default, current) if sep else "")
        return out

    def _step(
        self, ins: Instruction, state: _State, args: dict[str, str], path: str, label: str
    ) -> tuple[_State, dict[str, str]]:
        env = format.env_mapping(state.config.get("Env") or [])
        variables = {**args, **env}
        config = json.loads(json.dumps(state.config))
        kw = ins.keyword
        if kw == "ARG":
            args = {**args, **self._arg_values(ins, path, variables)}
            return state.derived(_key(state.key, ins.text, json.dumps(args, sort_keys=True)), config=config), args
        if kw in ("ENV", "LABEL", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "EXPOSE"):
            text = containerfile.substitute(ins.args, variables) if ins.json_form is None else ins.args
            key = _key(state.key, ins.keyword, text)
            if kw == "ENV":
                for k, v in containerfile.pairs(dataclasses.replace(ins, args=text), path):
                    env[k] = v
                config["Env"] = [f"{k}={v}" for k, v in env.items()]
            elif kw == "LABEL":
                config["Labels"] = {
                    **(config.get("Labels") or {}),
                    **dict(containerfile.pairs(dataclasses.replace(ins, args=text), path)),
                }
            elif kw == "USER":
                config["User"] = text
            elif kw in ("CMD", "ENTRYPOINT"):
                form = list(ins.json_form) if ins.json_form is not None else (["/bin/sh", "-c", text] if text else None)
                config["Cmd" if kw == "CMD" else "Entrypoint"] = form
            elif kw == "EXPOSE":
                config["ExposedPorts"] = {
                    **(config.get("ExposedPorts") or {}),
                    **{(p if "/" in p else p + "/tcp"): {} for p in text.split()},
                }
            elif kw == "WORKDIR":
                workdir = os.path.normpath(os.path.join(config.get("WorkingDir") or "/", text))
                config["WorkingDir"] = workdir
                return self._layer_step(
                    ins,
                    label,
                    state.derived(key, config=config),
                    lambda diff: self._workdir_layer(state, workdir, diff),
                ), args
            if self._cache_get(key) is not None:
                self._cached(f"{label}: {as_written(ins)}")
            else:
                self.say(f"  {label}: {as_written(ins)}")
                self.store.cache_put(key, {"layers": state.layers, "diff_ids": state.diff_ids, "config": config})
            return state.derived(key, config=config), args
        if kw == "COPY":
            sources, dest, digest, libs = self._copy_plan(ins, variables, path)
            key = _key(state.key, ins.text, digest)
            return self._layer_step(
                ins,
                label,
                state.derived(key, config=config),
                lambda diff: self._copy_into(ins, sources, dest, state, config, diff, path, libs),
            ), args
        if kw == "RUN":
            key = _key(state.key, ins.text, json.dumps(args, sort_keys=True))
            return self._layer_step(
                ins, label, state.derived(key, config=config), lambda diff: self._run(ins, state, args, path, diff)
            ), args
        raise ContainerfileError(path, ins.line, f"unsupported instruction {kw}")  # parse() stops these first

    def _layer_step(self, ins: Instruction, label: str, target: _State, make: Callable[[str], bool]) -> _State:
        """Reuse the cached result of ``target.key`` or make a new layer on top of ``target.layers``."""
        cached = self._cache_get(target.key)
        if cached is not None:
            self._cached(f"{label}: {as_written(ins)}")
            return target.derived(target.key, list(cached["layers"]), list(cached["diff_ids"]), dict(cached["config"]))
        pulled = self._remote_get(target, f"{label}: {as_written(ins)}")
        if pulled is not None:
            return pulled
        self.say(f"  {label}: {as_written(ins)}")
        started = time.monotonic()
        with self.store.staging() as stage, progress.running(self, f"  {label}: {as_written(ins)}"):
            diff = os.path.join(stage, "diff")
            os.mkdir(diff)
            layers, diff_ids = list(target.layers), list(target.diff_ids)
            if make(diff) and os.listdir(diff):
                if target.host_based:
                    self._check_host_layer(ins, diff)
                diff_id = tarlayer.diff_id_of(diff)
                chain = self.store.stack_layer(diff, diff_id, layers[-1] if layers else None, ins.text)
                layers.append(chain)
                diff_ids.append(diff_id)
        result = target.derived(target.key, layers, diff_ids)
        self.store.cache_put(target.key, result.entry())
        self.say(f"    done in {time.monotonic() - started:.2f}s")
        self._remote_put(result)
        return result

    def _remote_get(self, target: _State, what: str) -> _State | None:
        """The step as another machine built it, from --sandbox-cache (None: nobody did, or no cache).
        A cache that cannot be reached is said and built around: it saves time, it decides nothing."""
        if self.cache is None or self.no_cache or target.host_based:
            return None
        try:
            pulled = self.cache.pull(self.store, target.key)
        except StoreError as exc:
            self.say(f"  {what}: build cache {self.cache.ref} not used: {exc}")
            return None
        if pulled is None or pulled.layers[: len(target.layers)] != target.layers:
            return None  # not there, or not on top of this step's base (never used then)
        self.say(f"  {what}: pulled from the build cache {self.cache.ref}")
        result = target.derived(target.key, pulled.layers, pulled.diff_ids)
        self.store.cache_put(target.key, result.entry())
        return result

    def _remote_put(self, result: _State) -> None:
        if self.cache is None or result.host_based:
            return
        try:
            self.cache.push(self.store, result.key, result.layers, result.config)
        except StoreError as exc:
            self.say(f"    not pushed to the build cache {self.cache.ref}: {exc}")
            return
        self.say(f"    pushed to the build cache {self.cache.ref}")

    def _check_host_layer(self, ins: Instruction, diff: str) -> None:
        """A FROM host layer can only change existing top-level directories (each is one overlay)."""
        store_top = overlay.top_level_dir(self.store.root)[1:]
        for name in os.listdir(diff):
            if name == store_top:
                raise BuildError(
                    f"{ins.keyword} {ins.args[:60]}: a FROM host image cannot change /{name}, which "
                    f"holds the image store {self.store.root} (move the store with --store / "
                    "PYTEST_SANDBOX_STORE)"
                )
            if (
                not os.path.isdir("/" + name)
                or os.path.islink("/" + name)
                or not os.path.isdir(os.path.join(diff, name))
            ):
                raise BuildError(
                    f"{ins.keyword} {ins.args[:60]}: a FROM host image can only change directories "
                    f"under the host's existing top-level directories, not /{name}"
                )

    # -- WORKDIR -------------------------------------------------------------------------
    def _workdir_layer(self, state: _State, workdir: str, diff: str) -> bool:
        if _exists_in(self.store, state.layers, workdir, state.host_based):
            return False
        os.makedirs(os.path.join(diff, workdir.lstrip("/")), mode=0o755)
        return True

    # -- COPY ----------------------------------------------------------------------------
    def _copy_plan(
        self, ins: Instruction, variables: Mapping[str, str], path: str
    ) -> tuple[list[tuple[str, str]], str, str, list[tuple[str, str]]]:
        """(absolute source, name) pairs, the destination, a hash of everything read, and with
        ``--libs`` the (host file, path in the image) of each shared library the sources load."""
        words = list(ins.json_form) if ins.json_form is not None else shlex.split(ins.args)
        words = [containerfile.substitute(w, variables) for w in words]
        *patterns, dest = words
        from_host = ins.flag("from") == "host"
        context = os.path.dirname(os.path.abspath(path))
        ignore = _Ignore(context)
        sources: list[tuple[str, str]] = []
        for pattern in patterns:
            if from_host:
                if not os.path.isabs(pattern):
                    raise ContainerfileError(path, ins.line, f"COPY --from=host {pattern!r}: use an absolute host path")
                matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            else:
                rel = os.path.normpath(pattern.lstrip("/"))
                if rel == ".." or rel.startswith("../"):
                    raise ContainerfileError(path, ins.line, f"COPY {pattern!r} leaves the build context {context}")
                full = os.path.join(context, rel)
                matches = sorted(glob.glob(full)) if glob.has_magic(rel) else [full]
                matches = [m for m in matches if not ignore.ignored(os.path.relpath(m, context))]
            existing = [m for m in matches if os.path.lexists(m)]
            if not existing:
                where = "on this host" if from_host else f"in the build context {context}"
                raise ContainerfileError(path, ins.line, f"COPY {pattern!r}: no such file {where}")
            sources.extend((m, os.path.basename(m.rstrip("/"))) for m in existing)
        libs: list[tuple[str, str]] = []
        if ins.flag("libs") is not None:  # programs by content (/bin/sh -> dash), plus what they load
            sources = [(os.path.realpath(m), name) for m, name in sources]
            seen: set[str] = set()
            for source, _name in sources:
                for lib in _shared_libraries(source):
                    if lib not in seen:
                        seen.add(lib)
                        libs.append((os.path.realpath(lib), lib))
        digest = hashlib.sha256()
        digest.update(json.dumps([dest, sorted(ins.flags), [image_path for _, image_path in libs]]).encode())
        for host_file, _ in libs:
            digest.update(_file_digest(host_file).encode())
        for source, _name in sources:
            for rel, full in _walk_source(source, None if from_host else (context, ignore)):
                st = os.lstat(full)
                digest.update(f"{rel}\0{stat.S_IMODE(st.st_mode)}\0{stat.S_IFMT(st.st_mode)}\0".encode())
                if stat.S_ISLNK(st.st_mode):
                    digest.update(os.readlink(full).encode())
                elif stat.S_ISREG(st.st_mode):
                    digest.update(_file_digest(full).encode())
        return sources, dest, digest.hexdigest(), libs

    def _copy_into(
        self,
        ins: Instruction,
        sources: list[tuple[str, str]],
        dest: str,
        state: _State,
        config: Mapping[str, Any],
        diff: str,
        path: str,
        libs: list[tuple[str, str]],
    ) -> bool:
        for host_file, image_path in libs:
            target = os.path.join(diff, image_path.lstrip("/"))
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            _copy_entry(host_file, target)
        workdir = config.get("WorkingDir") or "/"
        dest_abs = os.path.normpath(os.path.join(workdir, dest))
        into_dir = (
            dest.endswith("/")
            or len(sources) > 1
            or any(os.path.isdir(s) for s, _ in sources)
            or _is_dir_in(self.store, state.layers, dest_abs, state.host_based)
        )
        context = os.path.dirname(os.path.abspath(path))
        ignore = None if ins.flag("from") == "host" else _Ignore(context)
        for source, name in sources:
            if os.path.isdir(source) and not os.path.islink(source):
                target = os.path.join(diff, dest_abs.lstrip("/"))
                os.makedirs(target, mode=0o755, exist_ok=True)
                for rel, full in _walk_source(source, None if ignore is None else (context, ignore)):
                    _copy_entry(full, os.path.join(target, rel))
            else:
                target = (
                    os.path.join(diff, dest_abs.lstrip("/"), name)
                    if into_dir
                    else os.path.join(diff, dest_abs.lstrip("/"))
                )
                os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                _copy_entry(source, target)
        _apply_copy_flags(diff, dest_abs, ins)
        return True

    # -- RUN -----------------------------------------------------------------------------
    def _run(self, ins: Instruction, state: _State, args: Mapping[str, str], path: str, diff: str) -> bool:
        stage = os.path.dirname(diff)
        layer_dir, merged = os.path.join(stage, "layer"), os.path.join(stage, "merged")
        for d in (layer_dir, merged):
            os.mkdir(d)
        layers_top_first = [self.store.diff_path(c) for c in reversed(state.layers)]
        argv = tuple(ins.json_form) if ins.json_form is not None else ("/bin/sh", "-c", ins.args)
        config = state.config
        env_list = [f"{k}={v}" for k, v in args.items()] + list(config.get("Env") or [])
        network = "host" if ins.flag("network") == "host" else "none"
        host_based, unprivileged = state.host_based, os.geteuid() != 0
        # On a store on overlayfs the upper is a tmpfs of the RUN's own, copied into the layer by the
        # waiter once the command is done; elsewhere the upper dirs are moved in afterwards.
        on_tmpfs = self.store.filesystem() == "overlay"
        copy_error = os.path.join(stage, "copy-error")

        def prepare() -> str:
            return rootfs.mount_image_root(
                layers_top_first,
                layer_dir,
                merged,
                host_based=host_based,
                store_root=self.store.root,
                unprivileged=unprivileged,
                on_tmpfs=on_tmpfs,
            )

        def copy_out() -> None:  # in the waiter, whose mounts still hold the tmpfs upper
            try:
                for name, upper in rootfs.layer_uppers(layer_dir, host_based):
                    os.makedirs(os.path.join(diff, name), exist_ok=True)
                    tarlayer.copy_tree(upper, os.path.join(diff, name))
            except BaseException as exc:
                with open(copy_error, "w") as f:
                    f.write(f"{type(exc).__name__}: {exc}")
                raise

        uid, gid, home = self._user(state, config.get("User") or "")
        run = commands.RunSpec(
            argv=argv,
            env=commands.image_env(env_list, {}, home, "build"),
            workdir=config.get("WorkingDir") or "/",
            hostname="build",
            network=network,
        )
        try:
            proc = commands.spawn(
                prepare,
                run,
                uid,
                gid,
                copy_out if on_tmpfs else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except commands.ContainerError as exc:
            raise BuildError(f"{path}:{ins.line}: RUN cannot start: {exc}") from None
        assert proc.stdout is not None
        tail: list[str] = []
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.say(f"    | {line}")
            tail = [*tail, line][-20:]
        code = proc.wait()
        if os.path.exists(copy_error):
            with open(copy_error) as f:
                raise BuildError(f"{path}:{ins.line}: RUN's changes could not be copied into the store: {f.read()}")
        if code != 0:
            output = "\n".join(tail)
            raise BuildError(
                f"{path}:{ins.line}: RUN {shorten(ins.args, 80)} failed with exit status {code}"
                + (f"; last output:\n{output}" if output else "")
            )
        if not on_tmpfs:
            for name, upper in rootfs.layer_uppers(layer_dir, host_based):
                if not name:
                    os.rmdir(diff)  # the empty dir _layer_step made: the upper takes its place
                os.rename(upper, os.path.join(diff, name))
        tidy_upper(self.store, state.layers, diff, host_based)
        return True

    def _user(self, state: _State, user: str) -> tuple[int, int, str]:
        try:
            return image_user(self.store, state.layers, user, state.host_based)
        except commands.ContainerError as exc:
            raise BuildError(str(exc)) from None


# -- helpers ---------------------------------------------------------------------------------


def image_user(store: Store, layers: Sequence[str], user: str, host: bool) -> tuple[int, int, str]:
    """uid, gid and home of an image's ``USER``, from the /etc/passwd and /etc/group its layers show."""
    if commands.is_root_user(user):
        return 0, 0, "/root"
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "etc"))
        for name in ("passwd", "group"):
            found = _find_in(store, list(layers), f"/etc/{name}", host)
            if found:
                shutil.copyfile(found, os.path.join(root, "etc", name))
        return commands.resolve_user(root, user)


def _file_digest(path: str) -> str:
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    return sha.hexdigest()


def _shared_libraries(program: str) -> list[str]:
    """The shared libraries (and loader) ``program`` loads, as ``ldd`` names them; [] if static or not ELF."""
    with open(program, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return []
    ldd = shutil.which("ldd")
    if ldd is None:
        raise BuildError(f"COPY --libs {program}: no ldd on this host to find its libraries (Debian: libc-bin)")
    result = subprocess.run([ldd, program], capture_output=True, text=True)
    found = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                found.append(target)
        elif parts and parts[0].startswith("/"):
            found.append(parts[0])  # the loader
    return found


def _walk_source(source: str, ignore: tuple[str, _Ignore] | None) -> list[tuple[str, str]]:
    """(path relative to ``source``, absolute path) of a COPY source; a file is itself."""
    if not os.path.isdir(source) or os.path.islink(source):
        return [("", source)]
    out = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            if ignore is not None and ignore[1].ignored(os.path.relpath(full, ignore[0])):
                if name in dirs:
                    dirs.remove(name)
                continue
            out.append((os.path.relpath(full, source), full))
    return out


def _copy_entry(source: str, target: str) -> None:
    st = os.lstat(source)
    if stat.S_ISDIR(st.st_mode):
        os.makedirs(target, exist_ok=True)
        os.chmod(target, stat.S_IMODE(st.st_mode) | 0o700)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(source, target)
        os.chmod(target, stat.S_IMODE(st.st_mode))
    else:
        return  # sockets, devices: not copied
    with contextlib.suppress(OSError):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _apply_copy_flags(diff: str, dest_abs: str, ins: Instruction) -> None:
    chown, chmod = ins.flag("chown"), ins.flag("chmod")
    if chown is None and chmod is None:
        return
    uid = gid = None
    if chown is not None:
        user, _, group = chown.partition(":")
        if not user.isdigit() or (group and not group.isdigit()):
            raise BuildError(f"COPY --chown={chown}: use numeric UID[:GID]")
        uid, gid = int(user), int(group or user)
    top = os.path.join(diff, dest_abs.lstrip("/"))
    for root, dirs, files in os.walk(top):
        for full in [root] + [os.path.join(root, n) for n in dirs + files]:
            if chmod is not None and not os.path.islink(full):
                os.chmod(full, int(chmod, 8))
            if uid is not None:
                if os.geteuid() == 0:
                    os.lchown(full, uid, gid if gid is not None else uid)
                elif not os.path.islink(full):
                    os.setxattr(full, format.OWNER_XATTR, f"{uid}:{gid}".encode(), follow_symlinks=False)
    if os.path.isfile(top) or os.path.islink(top):
        if chmod is not None and not os.path.islink(top):
            os.chmod(top, int(chmod, 8))


def _find_in(store: Store, layers: list[str], path: str, host: bool = False) -> str | None:
    """The copy of ``path`` the image shows (the host's own with ``host``), or None if absent or deleted."""
    copies, below_shows = format.layer_copies([store.diff_path(c) for c in reversed(layers)], path)
    if copies:
        return copies[0]
    if not path.strip("/"):
        return store.diff_path(layers[-1]) if layers else ("/" if host else None)
    if host and below_shows and os.path.lexists(path):
        return path
    return None


def _exists_in(store: Store, layers: list[str], path: str, host: bool = False) -> bool:
    return path.strip("/") == "" or _find_in(store, layers, path, host) is not None


def _is_dir_in(store: Store, layers: list[str], path: str, host: bool = False) -> bool:
    found = _find_in(store, layers, path, host)
    return found is not None and os.path.isdir(found)


def tidy_upper(store: Store, layers: list[str], diff: str, host: bool = False) -> None:
    """Make an overlay upper dir a layer: drop the empty mount points made for /proc, /dev, /sys
    (when the image had none) and overlay's own bookkeeping xattrs."""
    for name in _MOUNTPOINTS:
        with contextlib.suppress(OSError):
            if not _exists_in(store, layers, "/" + name, host):
                os.rmdir(os.path.join(diff, name))
    _strip_overlay_xattrs(diff)


def _strip_overlay_xattrs(diff: str) -> None:
    """Keep only the opaque marker of overlay's bookkeeping in a finished upper dir."""
    for root, dirs, files in os.walk(diff):
        for full in [root] + [os.path.join(root, n) for n in dirs + files]:
            if os.path.islink(full):
                continue
            with contextlib.suppress(OSError):
                for attr in os.listxattr(full):
                    if attr.startswith(format.OVERLAY_XATTR_PREFIX) and attr != format.OPAQUE_XATTR:
                        os.removexattr(full, attr)
