"""Layer store and OCI import/export, checked against images made by umoci and skopeo."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import run_cli
from oci_inputs import EXPECTED, GONE, SKOPEO, UMOCI, skopeo_copy, umoci_image

from pytest_sandbox.layers import oci, tarlayer
from pytest_sandbox.layers.store import Store, StoreError

needs_umoci = pytest.mark.skipif(UMOCI is None, reason="host lacks umoci (Debian: apt install umoci)")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="host lacks skopeo (Debian: apt install skopeo)")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if UMOCI is None:
        pytest.skip("host lacks umoci (Debian: apt install umoci)")
    return umoci_image(tmp_path_factory.mktemp("umoci"))


def cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, store=store.root)


def view(store: Store, image: str, script: str) -> str:
    """Output of a shell script run in a throwaway container of the image."""
    result = cli(store, "run", image, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_expected_view(store: Store, image: str) -> None:
    for path, content in EXPECTED.items():
        assert view(store, image, f"cat {path}") == content, path
    for path in GONE:
        assert view(store, image, f"test -e {path} && echo present || echo absent") == "absent\n", path
    assert sorted(view(store, image, "ls /data/opq").split()) == ["c"]
    assert view(store, image, "echo $GREETING; pwd") == "hello\n/data\n"


def store_state(store: Store) -> tuple[list[str], list[str], list[str]]:
    store.ensure()
    return (
        sorted(os.listdir(store.layers_dir)),
        sorted(os.listdir(store.images_dir)),
        sorted(os.listdir(store.tmp_dir)),
    )


@needs_umoci
def test_umoci_layout_imports_file_by_file(layout: Path, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    image = oci.import_image(store, f"oci:{layout}:test", "umoci-test")
    assert len(image.layers) == 4
    assert_expected_view(store, "umoci-test")
    # the deletions and the opaque directory are in overlay-native form in the store
    deleted = store.diff_path(image.layers[1]) + "/data/sub"
    assert tarlayer.is_whiteout(deleted)
    assert os.getxattr(store.diff_path(image.layers[2]) + "/data/opq", tarlayer.OPAQUE_XATTR) == b"y"


@needs_umoci
def test_mode_and_recorded_owner(layout: Path, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    image = oci.import_image(store, f"oci:{layout}:test", "umoci-test")
    path = store.diff_path(image.layers[3]) + "/etc/app/new"
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    else:  # owned by the caller; the image's owner is kept for export
        assert st.st_uid == os.getuid()
        assert os.getxattr(path, tarlayer.OWNER_XATTR) == b"1000:1000"
    exported = tmp_path / "out.tar"
    oci.export_image(store, "umoci-test", str(exported))
    found = {}
    with tarfile.open(exported) as outer:
        for member in outer.getmembers():
            if member.name.startswith("blobs/") and member.size > 100:
                blob = outer.extractfile(member)
                assert blob is not None
                data = blob.read()
                if data[:2] == b"\x1f\x8b":
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as layer:
                        found.update({m.name: (m.uid, m.gid) for m in layer.getmembers()})
    assert found["etc/app/new"] == (1000, 1000)


@needs_umoci
@needs_skopeo
@pytest.mark.parametrize(
    "dest, extra",
    [
        ("oci-archive", ()),
        ("oci-archive", ("--dest-compress-format", "zstd", "--dest-compress")),
        ("docker-archive", ()),
    ],
    ids=["oci-archive-gzip", "oci-archive-zstd", "docker-archive"],
)
def test_skopeo_archives(layout: Path, tmp_path: Path, dest: str, extra: tuple[str, ...]) -> None:
    archive = tmp_path / "image.tar"
    target = f"{dest}:{archive}:" + ("example/app:v1" if dest == "docker-archive" else "v1")
    skopeo_copy(f"oci:{layout}:test", target, *extra)
    store = Store(str(tmp_path / "store"))
    image = oci.import_image(store, f"{dest}:{archive}")
    assert image.name == ("app:v1" if dest == "docker-archive" else "image:v1")
    assert_expected_view(store, image.name)
    # the same content under another compression is the same chain: nothing to unpack again
    lines: list[str] = []
    oci.import_image(store, f"oci:{layout}:test", "again", lines.append)
    assert all(line.endswith("cached") for line in lines) and len(lines) == 4


@needs_umoci
@needs_skopeo
def test_export_is_read_by_skopeo(layout: Path, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    oci.import_image(store, f"oci:{layout}:test", "umoci-test")
    assert cli(store, "images", "export", "umoci-test", str(tmp_path / "ours.tar")).returncode == 0
    skopeo_copy(f"oci-archive:{tmp_path / 'ours.tar'}", f"oci:{tmp_path / 'copied'}:x")  # skopeo checks digests
    oci.import_image(store, f"oci:{tmp_path / 'copied'}:x", "round-trip")
    assert_expected_view(store, "round-trip")


@needs_umoci
def test_digest_mismatch_publishes_nothing(layout: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(layout, bad)
    blobs = sorted((bad / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]  # the busybox layer
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.chmod(0o644)
    biggest.write_bytes(bytes(data))
    store = Store(str(tmp_path / "store"))
    before = store_state(store)
    with pytest.raises(StoreError, match=r"corrupt|does not match|cannot be unpacked"):
        oci.import_image(store, f"oci:{bad}:test", "bad")
    layers, images, tmp = store_state(store)
    assert images == before[1] and tmp == []
    assert store.get("bad") is None
    assert layers == before[0]


def test_corrupt_and_missing_archives(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(StoreError, match="not a readable tar archive"):
        oci.import_image(store, f"oci-archive:{junk}")
    with pytest.raises(StoreError, match="no such file"):
        oci.import_image(store, f"docker-archive:{tmp_path / 'missing.tar'}")
    with pytest.raises(StoreError, match="not an image reference"):
        oci.import_image(store, f"{tmp_path / 'plain.tar'}")
    assert store_state(store) == ([], [], [])


@needs_umoci
def test_cli_import_ls_inspect_rm_prune(layout: Path, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    assert cli(store, "images", "import", f"oci:{layout}:test", "imported").returncode == 0
    listing = cli(store, "images", "ls").stdout
    assert "imported" in listing and "oci:" in listing
    inspect = cli(store, "images", "inspect", "imported").stdout
    assert '"WorkingDir": "/data"' in inspect and inspect.count('"chain_id"') == 4
    assert cli(store, "images", "rm", "imported").returncode == 0
    pruned = cli(store, "images", "prune").stdout
    assert "removed 4 unused layers" in pruned
    assert store_state(store) == ([], [], [])
    missing = cli(store, "images", "inspect", "imported")
    assert missing.returncode == 2 and "no image 'imported'" in missing.stderr


def _layer(entries: list[tarfile.TarInfo]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    out.seek(0)
    return out


def test_unsafe_layer_entries_are_refused(tmp_path: Path) -> None:
    dotdot = tarfile.TarInfo("../escape")
    dotdot.size = 1
    with pytest.raises(tarlayer.LayerError, match="leaves the layer"):
        tarlayer.apply_tar(_layer([dotdot]), str(tmp_path / "a"))
    link = tarfile.TarInfo("etc")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    through = tarfile.TarInfo("etc/passwd")
    through.size = 1
    (tmp_path / "b").mkdir()
    with pytest.raises(tarlayer.LayerError, match="symlink"):
        tarlayer.apply_tar(_layer([link, through]), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


@needs_umoci
@needs_skopeo
def test_import_guesses_the_kind_of_a_plain_path(layout: Path, tmp_path: Path) -> None:
    skopeo_copy(f"oci:{layout}:test", f"docker-archive:{tmp_path / 'saved.tar'}:app:v2")
    skopeo_copy(f"oci:{layout}:test", f"oci-archive:{tmp_path / 'oci.tar'}:v3")
    store = Store(str(tmp_path / "store"))
    for path, name in ((tmp_path / "saved.tar", "app:v2"), (tmp_path / "oci.tar", "oci:v3"), (layout, None)):
        result = cli(store, "images", "import", str(path), *([] if name else ["from-dir"]))
        assert result.returncode == 0, result.stderr
        assert f"imported {name or 'from-dir'}:" in result.stdout
    bad = cli(store, "images", "import", str(tmp_path / "nothing-here"))
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr
    (tmp_path / "other.tar").write_bytes(b"")
    empty = cli(store, "images", "import", str(tmp_path / "other.tar"))
    assert empty.returncode == 2 and "not a readable tar archive" in empty.stderr


def test_an_xdist_runs_directory_stays_while_a_worker_holds_it(tmp_path: Path) -> None:
    """Red team round 7: a run's meeting place under the store's tmp/ had no owner file, so a session
    that started more than an hour into a long xdist run removed it (records of shared services included)."""
    from pytest_sandbox.layers.store import share

    store = Store(str(tmp_path / "store")).ensure()
    run = os.path.join(store.tmp_dir, "xdist-0123")
    held = share(run)
    hours_ago = os.stat(run).st_mtime - 7200
    os.utime(run, (hours_ago, hours_ago))
    Store(store.root).ensure()  # another session's sweep
    assert os.path.isdir(run)
    os.close(held)  # every worker of the run is gone
    Store(store.root).ensure()
    assert not os.path.exists(run)
