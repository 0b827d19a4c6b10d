"""The ``pytest-sandbox`` command: doctor, images, containers kept by failed tests."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import probe
from .errors import SandboxError
from .layers import build, commands, oci, progress, tarlayer
from .layers.format import HOST_BASE
from .layers.store import Image, Store, check_name
from .linux import rootfs, syscalls
from .runtime import cgroups


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
    print(probe.doctor_text(args.cgroup))
    try:
        backend = cgroups.choose("auto", args.cgroup or None, os.getcwd()).describe()
    except cgroups.CgroupUnavailable as exc:
        backend = f"unavailable: {exc}"
    print(f"limits: {backend}")
    print("\nimages:")
    for ok, name, detail in _image_checks(Store(args.store)):
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


def _image_checks(store: Store) -> list[tuple[bool, str, str]]:
    checks = []
    images = store.images() if os.path.isdir(store.root) else []
    layers = store.all_layers() if os.path.isdir(store.root) else []
    size = sum(store.layer_info(c).get("size", 0) for c in layers)
    checks.append((True, "store", f"{store.root} ({len(images)} images, {len(layers)} layers, {_size(size)})"))
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


def _images(args: argparse.Namespace, store: Store) -> int:
    say = progress.Lines.to(sys.stdout) if not args.quiet else (lambda _m: None)
    if args.images_command == "build":
        builder = build.Builder(
            store, args.dir, say, dict(a.split("=", 1) for a in args.build_arg), no_cache=args.no_cache
        )
        names = args.names or build.definitions(args.dir)
        if not names:
            print(f"no *.Containerfile in {args.dir}", file=sys.stderr)
            return 1
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
        image = store.require(args.name)
        data: dict[str, Any] = image.to_json()
        data["layers"] = [
            {
                "chain_id": c,
                **{k: v for k, v in store.layer_info(c).items() if k != "chain_id"},
                "path": store.diff_path(c),
            }
            for c in image.layers
        ]
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    if args.images_command == "rm":
        for name in args.names:
            store.remove_image(name)
            say(f"removed {name} (its layers go with the next prune)")
        return 0
    if args.images_command == "prune":
        removed, freed = store.prune()
        say(f"removed {len(removed)} unused layers, {_size(freed)} freed")
        return 0
    if args.images_command == "import":
        image = oci.import_image(store, oci.guess_reference(args.ref), args.name, say)
        say(f"imported {image.name}: {len(image.layers)} layers")
        return 0
    if args.images_command == "export":
        where = oci.export_image(store, args.name, args.target, say)
        say(f"exported {args.name} to {where}")
        return 0
    return 2


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
) -> int:
    """Run ``argv`` on the image's layers with ``layer_dir`` holding the read/write layer.

    ``layer_dir`` has ``upper``/``work``, or for a FROM host image ``<dir>/upper``/``<dir>/work``
    per top-level directory.
    """
    lowers = [store.diff_path(c) for c in reversed(layers)]
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


def _shell(args: argparse.Namespace, store: Store) -> int:
    """A shell in a kept container (its files as the failed test left them) or a throwaway one of an image."""
    image = store.get(args.target) if _is_image_name(args.target) else None
    kept = None
    if image is None:
        try:
            store.container(args.target)
        except SandboxError:
            raise SandboxError(
                f"{args.target!r} is neither a kept container (pytest-sandbox containers) "
                f"nor an image (pytest-sandbox images ls)"
            ) from None
        kept = store.checked_container(args.target)  # no symlink a failed test planted gets mounted
    argv = args.command or ["/bin/sh"]
    with store.staging() as stage:
        merged = os.path.join(stage, "merged")
        os.mkdir(merged)
        if kept is not None:
            return _run_in(
                store,
                kept["layers"],
                kept["config"],
                kept["path"],
                merged,
                argv,
                kept.get("hostname") or "sandbox",
                kept.get("base") == HOST_BASE,
                throwaway=False,
            )
        assert image is not None
        return _run_in(
            store, image.layers, image.config, _fresh_layer_dir(stage), merged, argv, "sandbox", image.host_based
        )


def _fresh_layer_dir(stage: str) -> str:
    layer_dir = os.path.join(stage, "layer")
    os.mkdir(layer_dir)
    return layer_dir


def _is_image_name(text: str) -> bool:
    try:
        check_name(text)
        return True
    except SandboxError:
        return False


def _run(args: argparse.Namespace, store: Store) -> int:
    image = store.get(args.image) if _is_image_name(args.image) else None
    if image is None:
        image = build.Builder(store, args.dir, print if not args.quiet else None, quiet_cached=True).ensure(args.image)
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


def _commit(args: argparse.Namespace, store: Store) -> int:
    kept = store.checked_container(args.id)  # no symlink a failed test planted gets read
    check_name(args.name)
    host_based = kept.get("base") == HOST_BASE
    uppers = rootfs.layer_uppers(kept["path"], host_based)
    layers = list(kept["layers"])
    with store.locked(), store.staging() as stage:
        tidy = os.path.join(stage, "upper")
        os.mkdir(tidy)
        for name, upper in uppers:  # a copy through tar: whiteouts, opaque dirs and owners carried over
            target = os.path.join(tidy, name) if name else tidy
            os.makedirs(target, exist_ok=True)
            tarlayer.copy_tree(upper, target)
        build.tidy_upper(store, layers, tidy, host_based)
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


def _containers(args: argparse.Namespace, store: Store) -> int:
    if args.containers_command == "rm":
        for cid in args.ids:
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pytest-sandbox", description="rootless sandboxes for pytest")
    top.add_argument(
        "--store",
        metavar="DIR",
        default=os.environ.get("PYTEST_SANDBOX_STORE"),
        help="image store (default: $PYTEST_SANDBOX_STORE or $XDG_CACHE_HOME/pytest-sandbox)",
    )
    top.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    quiet = argparse.ArgumentParser(add_help=False)  # -q also after the subcommand
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")

    def add(group: Any, name: str, help: str | None = None) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, parents=[quiet], help=help)
        return parser

    commands = top.add_subparsers(dest="verb", required=True)
    doctor = add(commands, "doctor", "what this host supports, what is missing and how to fix it")
    doctor.add_argument(
        "--cgroup",
        metavar="PATH",
        default=os.environ.get("PYTEST_SANDBOX_CGROUP"),
        help="the cgroup pytest would be given with --sandbox-cgroup",
    )
    images = add(commands, "images", "build, list, inspect, remove, import and export images")
    sub = images.add_subparsers(dest="images_command", required=True)
    p = add(sub, "build", "build images/NAME.Containerfile (all of them without NAME)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--dir", default="images", help="directory of *.Containerfile (default: ./images)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="value for an ARG")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step again (e.g. after the host changed under a FROM host image)",
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
    p.add_argument("name", nargs="?")
    p = add(sub, "export", "write an image as an OCI archive (or oci:DIR / docker-archive:FILE)")
    p.add_argument("name")
    p.add_argument("target")
    p = add(commands, "run", "run a command in a throwaway container of an image")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.add_argument("--dir", default="images", help="directory of *.Containerfile (default: ./images)")
    p = add(commands, "shell", "a shell in a kept container (ID) or a throwaway one of an image")
    p.add_argument("target", metavar="ID|IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = add(commands, "commit", "make a kept container's files a new image")
    p.add_argument("id")
    p.add_argument("name")
    p = add(commands, "containers", "list (default), rm or prune the containers kept by failed tests")
    sub = p.add_subparsers(dest="containers_command")
    add(sub, "ls")
    q = add(sub, "rm")
    q.add_argument("ids", nargs="+", metavar="ID")
    add(sub, "prune")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verb == "doctor":
        return _doctor(args)
    store = Store(args.store)
    handlers = {"images": _images, "shell": _shell, "run": _run, "commit": _commit, "containers": _containers}
    try:
        return handlers[args.verb](args, store)
    except SandboxError as exc:
        print(f"pytest-sandbox {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
