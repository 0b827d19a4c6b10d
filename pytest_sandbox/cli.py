"""The ``pytest-sandbox`` command: doctor, images, containers kept by failed tests."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import pytest

from . import __version__, probe, settings
from .errors import SandboxError
from .layers import build, commands, oci, progress, registry, tarlayer
from .layers.format import HOST_BASE
from .layers.store import FORMAT_VERSION, Image, Store, StoreError, check_name
from .linux import rootfs, syscalls
from .runtime import cgroups
from .services import records
from .volumes import VolumeStore


@dataclasses.dataclass(frozen=True)
class Project:
    """What pytest would use here: its rootdir and ini file, and the settings resolved from them."""

    rootdir: str
    inifile: str | None
    store: Store
    images_dir: str
    cgroup: str | None
    cgroup_backend: str
    insecure_registries: tuple[str, ...] = ()  # sandbox_insecure_registries
    build_cache: registry.RemoteCache | None = None  # ini sandbox_cache


class _Catch:
    """A plugin that takes pytest's parsed configuration and ends ``pytest.main`` before anything runs."""

    config: pytest.Config | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> int:
        self.config = config
        return 0


def pytest_config(args: argparse.Namespace) -> pytest.Config:
    """pytest's own configuration for this directory, found by pytest itself (``pytest.main`` stopped at
    ``pytest_cmdline_main``): rootdir and ini file from the cwd (or ``--rootdir``, ``-c``), ``addopts``,
    ``PYTEST_ADDOPTS`` and the plugins it loads. No conftest.py is imported and nothing is collected."""
    argv = ["--noconftest", "-s", "-p", "no:cacheprovider"]
    if args.rootdir:
        argv += ["--rootdir", args.rootdir]
    if args.config_file:
        argv += ["-c", args.config_file]
    if args.store:  # the command line beats the environment and the ini, as --sandbox-store does
        argv.append(f"--sandbox-store={args.store}")
    if getattr(args, "cgroup", None):
        argv.append(f"--sandbox-cgroup={args.cgroup}")
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):  # as pytest -p pytest_sandbox.plugin would be run
        argv += ["-p", "pytest_sandbox.plugin"]
    catch = _Catch()
    said = io.StringIO()
    with contextlib.redirect_stderr(said):  # pytest's usage errors become ours, one line
        code = pytest.main(argv, plugins=[catch])
    config = catch.config
    if config is None or code != 0:
        lines = [line.removeprefix("ERROR: ") for line in said.getvalue().splitlines() if line.strip()]
        raise SandboxError(" ".join(lines) or f"pytest could not read its configuration here (exit code {int(code)})")
    sys.stderr.write(said.getvalue())
    if not hasattr(config.option, "sandbox_store"):
        raise SandboxError("pytest runs without the sandbox plugin here (-p no:sandbox in addopts?)")
    return config


def find_project(args: argparse.Namespace) -> Project:
    """The store, images directory and cgroup pytest would use, by the one resolver of settings.py."""
    config = pytest_config(args)
    return Project(
        rootdir=str(config.rootpath),
        inifile=str(config.inipath) if config.inipath else None,
        store=Store(settings.directory(config, "sandbox_store")),
        images_dir=settings.directory(config, "sandbox_images") or str(config.rootpath / "images"),
        cgroup=settings.cgroup_path(config),
        cgroup_backend=settings.choice(config, "sandbox_cgroup_backend"),
        insecure_registries=settings.insecure_registries(config),
        build_cache=settings.build_cache(config, settings.insecure_registries(config)),
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(ts: float) -> str:
    seconds = max(0, time.time() - ts)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit} ago"
    return f"{int(seconds)}s ago"


def _doctor(args: argparse.Namespace) -> int:
    # The cgroup pytest would use: --cgroup, else PYTEST_SANDBOX_CGROUP (pytest reads it too; the ini comes after)
    cgroup = getattr(args, "cgroup", None) or os.environ.get("PYTEST_SANDBOX_CGROUP") or None
    print(probe.doctor_text(cgroup), flush=True)
    project = find_project(args)  # after the host checks: they are worth seeing even where the ini is broken
    try:
        backend = cgroups.choose(project.cgroup_backend, project.cgroup, project.rootdir).describe()
    except cgroups.CgroupUnavailable as exc:
        backend = f"unavailable: {exc}"
    print(f"limits: {backend}")
    print("\nimages:")
    for ok, name, detail in _image_checks(project.store):
        print(f"{'ok' if ok else 'NO':>3}  {name:<12} {detail}")
    return 0 if probe.unavailable_reason() is None else 1


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP), i.e. statically linked."""
    import struct

    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _volume_check(volumes: VolumeStore) -> tuple[bool, str, str]:
    """The named volumes: how many, how large, which a running session holds (``volumes rm`` waits for it)."""
    infos = [volumes.info(name) for name in volumes.names()]
    held = [info.name for info in infos if info.in_use]
    size = _size(sum(info.size for info in infos))
    detail = f"{volumes.root} ({len(infos)} named, {size}{'; in use: ' + ', '.join(held) if held else ''})"
    return True, "volumes", detail


def _image_checks(store: Store) -> list[tuple[bool, str, str]]:
    checks = []
    images = store.images() if os.path.isdir(store.root) else []
    layers = store.all_layers() if os.path.isdir(store.root) else []
    size = sum(store.layer_info(c).get("size", 0) for c in layers)
    checks.append((True, "store", f"{store.root} ({len(images)} images, {len(layers)} layers, {_size(size)})"))
    checks.append(_volume_check(VolumeStore(store.root)))
    if os.path.isdir(store.root) and store.filesystem() == "overlay":
        checks.append(
            (
                tarlayer.xattr_whiteouts_supported(),
                "store_fs",
                "the store is on overlayfs: RUN works on a tmpfs, --sandbox-keep is off, deletions need "
                "Linux 6.8+; fix: --sandbox-store on a real filesystem",
            )
        )
    if syscalls.kernel_at_least(6, 8):
        checks.append((True, "lowerdir+", "overlayfs takes one layer per call (Linux 6.8+): no layer limit"))
    else:
        checks.append(
            (
                False,
                "lowerdir+",
                "Linux < 6.8: layers go into the 4095-byte option string, about 200 layers per image at most",
            )
        )
    busybox = build.host_busybox()
    if busybox and _is_static_elf(busybox):
        checks.append((True, "busybox", f"{busybox} is static: the shipped busybox image builds"))
    else:
        what = f"{busybox} is dynamically linked" if busybox else "no busybox"
        checks.append((False, "busybox", f"{what}; fix: apt-get install busybox-static (for the shipped image)"))
    zstd = oci.zstd_decompressor()
    checks.append(
        (
            zstd is not None,
            "zstd",
            f"zstd-compressed layers import with {zstd}"
            if zstd
            else "no zstd decompressor; fix: apt-get install zstd (or pip install zstandard)",
        )
    )
    return checks


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress lines on stderr (stdout is the command's: ``run``'s output, ``inspect``'s JSON), none with -q."""
    if args.quiet:
        return lambda _m: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _build_args(pairs: Sequence[str]) -> dict[str, str]:
    for pair in pairs:
        if "=" not in pair:
            raise StoreError(f"--build-arg {pair!r}: expected KEY=VALUE")
    return dict(pair.split("=", 1) for pair in pairs)


def _images(args: argparse.Namespace, project: Project) -> int:
    store = project.store
    say = progress.Lines.to(sys.stdout) if not args.quiet else (lambda _m: None)
    images_dir = getattr(args, "dir", None) or project.images_dir
    if args.images_command == "build":
        builder = build.Builder(
            store,
            images_dir,
            say,
            _build_args(args.build_arg),
            no_cache=args.no_cache,
            insecure_registries=project.insecure_registries,
            cache=registry.RemoteCache(args.cache, project.insecure_registries, "--cache")
            if args.cache
            else project.build_cache,
        )
        names = args.names or build.definitions(images_dir)
        if not names:
            raise StoreError(f"no *.Containerfile in {os.path.relpath(images_dir)} (rootdir {project.rootdir})")
        for name in names:
            builder.build(name)
        return 0
    if args.images_command == "ls":
        images = store.images()
        print(f"{'NAME':24} {'LAYERS':>6} {'SIZE':>10} {'CREATED':>10}  SOURCE")
        for image in images:
            size = sum(store.layer_info(c).get("size", 0) for c in image.layers)
            source = image.source
            if os.path.isabs(source) and source.startswith(os.getcwd() + os.sep):
                source = os.path.relpath(source)
            print(f"{image.name:24} {len(image.layers):>6} {_size(size):>10} {_ago(image.created):>10}  {source}")
        return 0
    if args.images_command == "inspect":
        image = store.require(check_name(args.name))
        data: dict[str, Any] = image.to_json()
        data["layers"] = [
            {
                "chain_id": c,
                **{k: v for k, v in store.layer_info(c).items() if k != "chain_id"},
                "path": store.diff_path(c),
            }
            for c in image.layers
        ]
        if image.origin:  # the pulled manifest and config, readable rather than as the strings kept
            data["origin"] = {k: v if k == "media_type" else json.loads(v) for k, v in image.origin.items()}
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    if args.images_command == "rm":
        for name in args.names:
            store.remove_image(check_name(name))
            say(f"removed {name} (its layers go with the next prune)")
        return 0
    if args.images_command == "prune":
        removed, freed = store.prune()
        say(f"removed {len(removed)} unused layers, {_size(freed)} freed")
        return 0
    if args.images_command == "lock":
        return _lock(args, project, images_dir, say)
    if args.images_command in ("import", "pull", "push"):
        return _transfer(args, project, images_dir, say)
    if args.images_command == "export":
        where = oci.export_image(store, check_name(args.name), args.target, say)
        say(f"exported {args.name} to {where}")
        return 0
    return 2


def _transfer(args: argparse.Namespace, project: Project, images_dir: str, say: Callable[[str], None]) -> int:
    """images import, pull and push: images into the store from archives and registries, and out to registries."""
    store, insecure = project.store, project.insecure_registries
    if args.images_command == "push":
        registry.push_image(store, check_name(args.name), args.ref, say, insecure)
        return 0
    notes: list[str] = []
    if args.images_command == "pull":
        check = _import_check(store, images_dir, args.force, notes, "pulled", "images pull REF NAME")
        image = registry.pull_image(store, args.ref, args.name, say, check, insecure)
        said = f"pulled {image.name}: {len(image.layers)} layers, {image.source}"
    else:
        check = _import_check(store, images_dir, args.force, notes)
        image = oci.import_image(store, oci.guess_reference(args.ref), args.name, say, check)
        said = f"imported {image.name}: {len(image.layers)} layers"
    for note in notes:
        print(f"pytest-sandbox: --force: {note}", file=sys.stderr)
    say(said)
    return 0


def _lock(args: argparse.Namespace, project: Project, images_dir: str, say: Callable[[str], None]) -> int:
    """images lock: every registry FROM of images/ resolved to the digest it names now, in images/images.lock."""
    builder = build.Builder(project.store, images_dir, build_args=_build_args(args.build_arg))
    locked: dict[str, str] = {}
    for where, base in builder.registry_bases():
        ref = registry.parse_reference(base, f"{where}: FROM")
        if ref.digest is not None:
            say(f"{ref}: pinned in {where}")
            continue
        locked[str(ref)] = registry.manifest_digest(ref, project.insecure_registries)
        say(f"{ref} -> {locked[str(ref)]} ({where})")
    path = registry.write_lock(os.path.join(images_dir, registry.LOCK_FILE), locked)
    say(f"wrote {os.path.relpath(path)}: {len(locked)} references")
    return 0


def _import_check(
    store: Store,
    images_dir: str,
    force: bool,
    notes: list[str],
    verb: str = "imported",
    usage: str = "images import REF NAME",
) -> Callable[[str], None]:
    """An import or pull never replaces an image, or lands under a name images/ defines, unless --force says so."""

    def check(name: str) -> None:
        found = []
        old = store.get(name)
        if old is not None:
            found.append(f"an image {name} exists ({len(old.layers)} layers, from {old.source})")
        definition = build.definition_path(images_dir, name)
        if os.path.isfile(definition):
            found.append(
                f"{os.path.relpath(definition)} defines {name} (pytest builds that, not this import, "
                "and puts it back under this name)"
            )
        if found and not force:
            raise StoreError(
                f"not {verb} as {name}: {'; '.join(found)}. Give it another name ({usage}), or --force to replace it"
            )
        notes.extend(f"replaced: {text}" if text.startswith("an image") else text for text in found)

    return check


def _wait_interactive(proc: subprocess.Popen[Any]) -> int:
    """^C belongs to the command in the container, not to us."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_in(
    store: Store,
    layers: Sequence[str],
    config: dict[str, Any],
    layer_dir: str,
    merged: str,
    argv: Sequence[str],
    hostname: str,
    host_based: bool,
    throwaway: bool = True,
    top: str | None = None,
) -> int:
    """Run ``argv`` on the image's layers (and ``top``, a layer-shaped dir over them) with ``layer_dir``
    holding the read/write layer.

    ``layer_dir`` has ``upper``/``work``, or for a FROM host image ``<dir>/upper``/``<dir>/work``
    per top-level directory.
    """
    lowers = ([top] if top else []) + [store.diff_path(c) for c in reversed(layers)]
    unprivileged = os.geteuid() != 0
    on_tmpfs = throwaway and store.filesystem() == "overlay"

    def prepare() -> str:
        return rootfs.mount_image_root(
            lowers,
            layer_dir,
            merged,
            host_based=host_based,
            store_root=store.root,
            unprivileged=unprivileged,
            on_tmpfs=on_tmpfs,
        )

    user = config.get("User") or ""
    uid, gid, home = build.image_user(store, layers, user, host_based)
    run = commands.RunSpec(
        argv=tuple(argv),
        env=commands.image_env(config.get("Env") or [], {}, home, hostname),
        workdir=config.get("WorkingDir") or "/",
        hostname=hostname,
        network="none",
    )
    return _wait_interactive(commands.spawn(prepare, run, uid, gid))


def _default_command(config: dict[str, Any]) -> list[str]:
    command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    return command or ["/bin/sh"]


def _knows_image(project: Project, images_dir: str, name: str) -> bool:
    """Whether ``name`` is an image pytest could use: defined in images/, in the store, or shipped."""
    try:
        check_name(name)
    except StoreError:
        return False
    return (
        os.path.isfile(build.definition_path(images_dir, name))
        or project.store.get(name) is not None
        or name in build.builtin_definitions()
    )


def _image(args: argparse.Namespace, project: Project, images_dir: str, name: str) -> Image:
    """The image as the store has it (as built, --build-arg and all); one not there is built from images/
    (or the shipped definitions), saying so on stderr."""
    image = project.store.get(check_name(name))
    if image is not None:
        return image
    progress = _progress(args)
    definition = build.definition_path(images_dir, name)
    if not os.path.isfile(definition) and name in build.builtin_definitions():
        definition = build.definition_path(build.BUILTIN_DIR, name)
    if os.path.isfile(definition):
        where = os.path.relpath(definition)
        progress(f"image {name} is not in the store {project.store.root}: building it from {where}")
    builder = build.Builder(
        project.store, images_dir, progress, quiet_cached=True, insecure_registries=project.insecure_registries
    )
    return builder.ensure(name)


def _kept_layer(store: Store, kept: dict[str, Any], stage: str) -> str:
    """A copy of a kept container's read/write layer, shaped as a store layer (whiteouts, opaque dirs and
    owners carried over), in ``stage``."""
    host_based = kept.get("base") == HOST_BASE
    tidy = os.path.join(stage, "kept")
    os.mkdir(tidy)
    for name, upper in rootfs.layer_uppers(kept["path"], host_based):
        target = os.path.join(tidy, name) if name else tidy
        os.makedirs(target, exist_ok=True)
        tarlayer.copy_tree(upper, target)
    build.tidy_upper(store, list(kept["layers"]), tidy, host_based)
    return tidy


def _shell(args: argparse.Namespace, project: Project) -> int:
    """A shell in a throwaway container of an image, or over a kept container's layer (as the failed test
    left it: changes made in the shell go with it, unless --persist)."""
    store = project.store
    images_dir = getattr(args, "dir", None) or project.images_dir
    argv = args.command or ["/bin/sh"]
    if _knows_image(project, images_dir, args.target):
        image = _image(args, project, images_dir, args.target)
        with store.staging() as stage:
            merged = os.path.join(stage, "merged")
            os.mkdir(merged)
            return _run_in(
                store, image.layers, image.config, _fresh_layer_dir(stage), merged, argv, "sandbox", image.host_based
            )
    try:
        store.container(args.target)
    except SandboxError:
        raise StoreError(
            f"{args.target!r} is neither a kept container (pytest-sandbox containers, store {store.root}) "
            f"nor an image (pytest-sandbox images ls, or {os.path.relpath(images_dir)}/*.Containerfile)"
        ) from None
    kept = store.checked_container(args.target)  # no symlink a failed test planted gets mounted or read
    hostname = kept.get("hostname") or "sandbox"
    host_based = kept.get("base") == HOST_BASE
    with store.staging() as stage:
        merged = os.path.join(stage, "merged")
        os.mkdir(merged)
        if args.persist:
            return _run_in(
                store, kept["layers"], kept["config"], kept["path"], merged, argv, hostname, host_based, False
            )
        top = _kept_layer(store, kept, stage)
        return _run_in(
            store,
            kept["layers"],
            kept["config"],
            _fresh_layer_dir(stage),
            merged,
            argv,
            hostname,
            host_based,
            top=top,
        )


def _fresh_layer_dir(stage: str) -> str:
    layer_dir = os.path.join(stage, "layer")
    os.mkdir(layer_dir)
    return layer_dir


def _run(args: argparse.Namespace, project: Project) -> int:
    image = _image(args, project, getattr(args, "dir", None) or project.images_dir, args.image)
    store = project.store
    with store.staging() as stage:
        merged = os.path.join(stage, "merged")
        os.mkdir(merged)
        return _run_in(
            store,
            image.layers,
            image.config,
            _fresh_layer_dir(stage),
            merged,
            args.command or _default_command(image.config),
            "sandbox",
            image.host_based,
        )


def _commit(args: argparse.Namespace, project: Project) -> int:
    store = project.store
    check_name(args.name)
    kept = store.checked_container(args.id)  # no symlink a failed test planted gets read
    host_based = kept.get("base") == HOST_BASE
    layers = list(kept["layers"])
    with store.locked(), store.staging() as stage:
        tidy = _kept_layer(store, kept, stage)
        diff_ids = [store.layer_info(c)["diff_id"] for c in layers]
        if os.listdir(tidy):
            diff_id = tarlayer.diff_id_of(tidy)
            chain = store.stack_layer(
                tidy, diff_id, layers[-1] if layers else None, f"commit of {args.id} ({kept['nodeid']})"
            )
            layers.append(chain)
            diff_ids.append(diff_id)
        store.put(
            Image(
                name=args.name,
                layers=tuple(layers),
                diff_ids=tuple(diff_ids),
                config=kept["config"],
                source=f"commit {args.id} of {kept['nodeid']}",
                created=time.time(),
                base=HOST_BASE if host_based else "",
            )
        )
    print(f"committed {args.id} as image {args.name} ({len(layers)} layers)")
    return 0


def _containers(args: argparse.Namespace, project: Project) -> int:
    store = project.store
    if args.containers_command == "rm":
        for cid in args.ids:
            store.container(cid)  # an unknown id is an error, not a silent no-op
            store.remove_container(cid)
        return 0
    if args.containers_command == "prune":
        ids = store.container_ids()
        for cid in ids:
            store.remove_container(cid)
        print(f"removed {len(ids)} kept containers")
        return 0
    print(f"{'ID':14} {'IMAGE':16} {'CREATED':>10}  TEST")
    for meta in store.containers():
        print(f"{meta['id']:14} {meta['image']:16} {_ago(meta.get('created', 0)):>10}  {meta['nodeid']}")
    return 0


def _login(args: argparse.Namespace, project: Project) -> int:
    """Credentials checked with the registry, then kept where docker, podman and skopeo read them."""
    if args.verb == "logout":
        print(f"removed the credentials for {args.registry} from {registry.logout(args.registry)}")
        return 0
    tty = sys.stdin.isatty()
    user = args.username or (input("Username: ").strip() if tty else "")
    if not user:
        raise StoreError("login: give --username (stdin is not a terminal to ask on)")
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\n")
    elif tty:
        password = getpass.getpass("Password: ")
    else:
        raise StoreError("login: give the password on stdin with --password-stdin (stdin is not a terminal)")
    path = registry.login(args.registry, user, password, project.insecure_registries)
    print(f"logged in to {args.registry}; credentials in {path}")
    return 0


def _volumes(args: argparse.Namespace, project: Project) -> int:
    volumes = VolumeStore(project.store.root)
    command = args.volumes_command or "ls"
    if command == "inspect":
        print(json.dumps(volumes.info(args.name).as_json(), indent=2))
        return 0
    if command == "rm":
        for name in args.names:
            volumes.remove(name)  # an unknown name or one in use is an error, not a silent no-op
        return 0
    if command == "prune":
        before = set(volumes.names())
        removed = volumes.prune()
        kept = sorted(before - set(removed))
        print(f"removed {len(removed)} volumes" + (f"; in use, kept: {', '.join(kept)}" if kept else ""))
        return 0
    print(f"{'NAME':24} {'SIZE':>10} {'LAST USED':>10}  STATE")
    for name in volumes.names():
        info = volumes.info(name)
        used = _ago(info.last_used) if info.last_used else "never"
        print(f"{name:24} {_size(info.size):>10} {used:>10}  {'in use' if info.in_use else '-'}")
    return 0


def _services(args: argparse.Namespace, project: Project) -> int:
    """What running pytest sessions have up (their records in the store)."""
    found = records.running(project.store.root)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'PYTEST':>8}  {'NAME':16} {'STATE':12} {'SCOPE':8} {'STARTED':>8}  PORTS (pod -> host loopback)")
    for record in found:
        for service in record["services"]:
            ports = ", ".join(f"{inner}->127.0.0.1:{outer}" for inner, outer in service["ports"].items()) or "-"
            up = _ago(service["started"]) if service["state"] == "running" else "-"
            print(
                f"{record['pid']:>8}  {service['name']:16} {service['state']:12} {service['scope']:8} {up:>8}  {ports}"
            )
    return 0


def _version(args: argparse.Namespace, project: Project) -> int:
    """What a bug report needs: versions, this host's kernel and cgroups, and the store pytest would use."""
    store = project.store
    info = {
        "pytest-sandbox": __version__,
        "pytest": pytest.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "kernel": platform.release(),
        "cgroup": f"{probe.cgroup_mode()}, {probe.cgroup_delegation()}",
        "rootdir": project.rootdir,
        "inifile": project.inifile,
        "store": store.root,
        "store_format": store.format_version() if os.path.isdir(store.root) else None,
        "store_format_supported": FORMAT_VERSION,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "store_format":
            value = f"{value} (this version reads {FORMAT_VERSION})" if value else f"none yet (writes {FORMAT_VERSION})"
        if key != "store_format_supported":
            print(f"{key + ':':16}{value if value is not None else '-'}")
    return 0


def _registry_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], images_dir: str) -> None:
    """images pull, push and lock."""
    p = add(sub, "lock", "resolve every registry FROM of images/ to a digest, in images/images.lock (builds use it)")
    p.add_argument("--dir", help=images_dir)
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="value for an ARG")
    p = add(sub, "pull", "pull an image from a registry: HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]")
    p.add_argument("ref", metavar="REF")
    p.add_argument("name", nargs="?", metavar="NAME", help="default: the repository's last part[:tag]")
    p.add_argument("--dir", help=images_dir)
    p.add_argument("--force", action="store_true", help="replace an image of that name, or use a name images/ defines")
    p = add(sub, "push", "push an image of the store to a registry: HOST[:PORT]/REPOSITORY[:TAG]")
    p.add_argument("name", metavar="NAME")
    p.add_argument("ref", metavar="REF")


def _login_commands(commands: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """login and logout."""
    p = add(commands, "login", "check credentials with a registry and keep them ($REGISTRY_AUTH_FILE or docker's)")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT], or docker.io")
    p.add_argument("-u", "--username")
    p.add_argument("--password-stdin", action="store_true", help="read the password or token from stdin")
    p = add(commands, "logout", "forget the credentials login kept for a registry")
    p.add_argument("registry", metavar="REGISTRY")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="pytest-sandbox",
        description="rootless sandboxes for pytest. Finds pytest's rootdir and ini file as pytest does (from the "
        "cwd, or --rootdir / -c) and takes the store and images directory from them.",
    )
    # Options common to every command, accepted before or after it (after: SUPPRESS keeps the earlier value).
    for where, default in ((top, None), (common := argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)):
        where.add_argument(
            "--store",
            metavar="DIR",
            default=default,
            help="image store (default as pytest's: --sandbox-store, $PYTEST_SANDBOX_STORE, ini sandbox_store, "
            "$XDG_CACHE_HOME/pytest-sandbox)",
        )
        where.add_argument("--rootdir", metavar="DIR", default=default, help="pytest's --rootdir")
        where.add_argument("-c", "--config-file", metavar="FILE", default=default, help="pytest's -c: the ini file")
        where.add_argument("-q", "--quiet", action="store_true", default=default or False, help="no progress output")
        where.add_argument(
            "--debug", action="store_true", default=default or False, help="a traceback instead of a one-line error"
        )

    def add(group: Any, name: str, help: str | None = None) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=help, description=help)
        return parser

    commands = top.add_subparsers(dest="verb", required=True)
    commands.add_parser(
        "hermetic",
        help="pytest -p sandbox --sandbox=hermetic ARGS...: the whole run in one sandbox, the plugin loaded so that "
        "the project's ini cannot switch it off (every argument after it is pytest's)",
    )
    doctor = add(commands, "doctor", "what this host supports, what is missing and how to fix it")
    doctor.add_argument("--cgroup", metavar="PATH", help="the cgroup pytest would be given with --sandbox-cgroup")
    p = add(commands, "version", "versions of pytest-sandbox, pytest, Python, the kernel; cgroups; the store")
    p.add_argument("--json", action="store_true", help="as JSON")
    images = add(commands, "images", "build, list, inspect, remove, import, export, pull and push images")
    sub = images.add_subparsers(dest="images_command", required=True)
    images_dir = "directory of *.Containerfile (default: ini sandbox_images, or images/ in pytest's rootdir)"
    p = add(sub, "build", "build images/NAME.Containerfile (all of them without NAME)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--dir", help=images_dir)
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="value for an ARG")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step again (e.g. after the host changed under a FROM host image)",
    )
    p.add_argument(
        "--cache",
        metavar="REF",
        help="a registry repository as a build cache shared between machines (default: ini sandbox_cache)",
    )
    add(sub, "ls", "list images")
    p = add(sub, "inspect", "layers and config of an image, as JSON")
    p.add_argument("name")
    p = add(sub, "rm", "remove images (layers stay until prune)")
    p.add_argument("names", nargs="+", metavar="NAME")
    add(sub, "prune", "remove layers no image uses")
    p = add(
        sub, "import", "import FILE or DIR (kind detected), or oci:DIR, oci-archive:FILE, docker-archive:FILE ([:TAG])"
    )
    p.add_argument("ref")
    p.add_argument("name", nargs="?", help="default: the archive's tag")
    p.add_argument("--dir", help=images_dir)
    p.add_argument("--force", action="store_true", help="replace an image of that name, or use a name images/ defines")
    _registry_commands(sub, add, images_dir)
    p = add(sub, "export", "write an image as an OCI archive (or oci:DIR / docker-archive:FILE)")
    p.add_argument("name")
    p.add_argument("target")
    _login_commands(commands, add)
    p = add(commands, "run", "run a command in a throwaway container of an image (built from images/ if needed)")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.add_argument("--dir", help=images_dir)
    p = add(
        commands,
        "shell",
        "a shell in a throwaway container of an image (built from images/ if needed), or over a kept container's "
        "layer as its test left it (throwaway too, unless --persist)",
    )
    p.add_argument("target", metavar="ID|IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.add_argument("--dir", help=images_dir)
    p.add_argument("--persist", action="store_true", help="changes made in the shell stay in the kept container")
    p = add(commands, "commit", "make a kept container's files a new image")
    p.add_argument("id")
    p.add_argument("name")
    _add_kept_data_commands(commands, add)
    return top


def _add_kept_data_commands(commands: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """What outlives a session: named volumes and the containers failed tests kept."""
    p = add(commands, "volumes", "list (default), inspect, rm or prune the named volumes tests keep data in")
    sub = p.add_subparsers(dest="volumes_command")
    add(sub, "ls", "list named volumes: size, last use, whether a sandbox uses one now")
    q = add(sub, "inspect", "where a volume is, its size, when it was made and last used, as JSON")
    q.add_argument("name")
    q = add(sub, "rm", "remove volumes and their data (refused while a sandbox uses one)")
    q.add_argument("names", nargs="+", metavar="NAME")
    add(sub, "prune", "remove every volume no sandbox uses now")
    p = add(commands, "services", "what running pytest sessions have up: services, state, scope, published ports")
    sub = p.add_subparsers(dest="services_command")
    q = add(sub, "ls", "list the services of running sessions (the default)")
    for parser in (p, q):
        parser.add_argument("--json", action="store_true", help="as JSON, one record per pytest process")
    p = add(commands, "containers", "list (default), rm or prune the containers kept by failed tests")
    sub = p.add_subparsers(dest="containers_command")
    add(sub, "ls")
    q = add(sub, "rm")
    q.add_argument("ids", nargs="+", metavar="ID")
    add(sub, "prune")


HANDLERS: dict[str, Callable[[argparse.Namespace, Project], int]] = {
    "images": _images,
    "shell": _shell,
    "run": _run,
    "commit": _commit,
    "containers": _containers,
    "volumes": _volumes,
    "services": _services,
    "version": _version,
    "login": _login,
    "logout": _login,
}


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__  # one line


def _hermetic(pytest_args: list[str]) -> NoReturn:
    """``pytest-sandbox hermetic ARGS``: pytest with this plugin loaded by name on the command line, so a
    project's ini file cannot switch it off (``addopts = -p no:sandbox`` would have pytest load its
    conftest.py on the host), and --sandbox=hermetic; then ARGS."""
    command = [sys.executable, "-m", "pytest", "-p", "sandbox", "--sandbox=hermetic", *pytest_args]
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    """Every user error ends in one line ``pytest-sandbox: ...`` and exit code 2 (--debug: the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hermetic"]:  # everything after it is pytest's
        _hermetic(argv[1:])
    args = parser().parse_args(argv)
    try:
        if args.verb == "doctor":
            return _doctor(args)
        return HANDLERS[args.verb](args, find_project(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # pytest-sandbox images ls | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (SandboxError, OSError, ValueError, pytest.UsageError) as exc:
        if args.debug:
            raise
        print(f"pytest-sandbox: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
