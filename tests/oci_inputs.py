"""Test inputs made by real third-party producers (Debian's umoci and skopeo)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def _run(*argv: str, cwd: Path | None = None) -> None:
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _tar(entries: list[tuple[str, str, bytes]]) -> bytes:
    """An uncompressed layer tar from (name, kind, data) where kind is 'file' or 'dir'."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def umoci_image(root: Path) -> Path:
    """oci:<root>/layout:test, four layers, all written by umoci.

    1. busybox + /etc/app/{conf,link} + /data/{keep, sub/old} + /data/opq/{a,b}
    2. deletes /data/sub and /etc/app/link, rewrites /etc/app/conf (umoci's own whiteouts)
    3. an opaque /data/opq holding only c (a verbatim layer: umoci raw add-layer)
    4. adds /etc/app/new owned by 1000:1000 with mode 0600
    Expected view: see EXPECTED.
    """
    assert UMOCI and BUSYBOX
    layout = root / "layout"
    _run(UMOCI, "init", "--layout", str(layout))
    _run(UMOCI, "new", "--image", f"{layout}:test")
    bundle = root / "bundle"
    _run(UMOCI, "unpack", "--rootless", "--image", f"{layout}:test", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin/busybox")
    for tool in ("sh", "cat", "ls", "find", "stat"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (rootfs / "etc/app").mkdir(parents=True)
    (rootfs / "etc/app/conf").write_text("one\n")
    (rootfs / "etc/app/link").symlink_to("conf")
    (rootfs / "data/sub").mkdir(parents=True)
    (rootfs / "data/sub/old").write_text("gone\n")
    (rootfs / "data/keep").write_text("keep\n")
    (rootfs / "data/opq").mkdir()
    (rootfs / "data/opq/a").write_text("a\n")
    (rootfs / "data/opq/b").write_text("b\n")
    _run(UMOCI, "repack", "--refresh-bundle", "--image", f"{layout}:test", str(bundle))
    shutil.rmtree(rootfs / "data/sub")
    (rootfs / "etc/app/link").unlink()
    (rootfs / "etc/app/conf").write_text("two\n")
    _run(UMOCI, "repack", "--refresh-bundle", "--image", f"{layout}:test", str(bundle))
    opaque = root / "opaque.tar"
    opaque.write_bytes(
        _tar([("data/opq", "dir", b""), ("data/opq/.wh..wh..opq", "file", b""), ("data/opq/c", "file", b"c\n")])
    )
    _run(UMOCI, "raw", "add-layer", "--image", f"{layout}:test", str(opaque))
    owned = io.BytesIO()
    with tarfile.open(fileobj=owned, mode="w") as tar:
        info = tarfile.TarInfo("etc/app/new")
        info.size, info.mode, info.uid, info.gid, info.mtime = 4, 0o600, 1000, 1000, 1700000000
        tar.addfile(info, io.BytesIO(b"new\n"))
    (root / "owned.tar").write_bytes(owned.getvalue())
    _run(UMOCI, "raw", "add-layer", "--image", f"{layout}:test", str(root / "owned.tar"))
    _run(
        UMOCI,
        "config",
        "--image",
        f"{layout}:test",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/data",
        "--config.cmd",
        "/bin/sh",
    )
    return layout


# path -> content (None for a directory, "->target" for a symlink); absent paths listed in GONE
EXPECTED = {
    "/etc/app/conf": "two\n",
    "/etc/app/new": "new\n",
    "/data/keep": "keep\n",
    "/data/opq/c": "c\n",
}
GONE = ["/data/sub", "/data/sub/old", "/etc/app/link", "/data/opq/a", "/data/opq/b"]


def skopeo_copy(source: str, dest: str, *extra: str) -> None:
    assert SKOPEO
    _run(SKOPEO, "--insecure-policy", "copy", *extra, source, dest)


def skopeo_digest(reference: str) -> str:
    """The digest of the manifest skopeo reads at ``reference`` (docker://..., TLS not verified)."""
    assert SKOPEO is not None
    raw = subprocess.run(
        [SKOPEO, "inspect", "--tls-verify=false", "--raw", reference], check=True, capture_output=True
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()
