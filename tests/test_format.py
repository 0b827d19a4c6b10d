"""The layer format: chain ids, image env, whiteouts, opaque dirs and the walk down a layer stack."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

import pytest

from pytest_sandbox.layers.format import (
    OPAQUE_XATTR,
    XWHITEOUT_XATTR,
    chain_id,
    env_mapping,
    is_opaque,
    is_whiteout,
    layer_copies,
    topmost_copy,
)

DIFF_A, DIFF_B, DIFF_C = (f"sha256:{c * 64}" for c in "abc")


def test_chain_id_of_the_first_layer_is_its_diff_id() -> None:
    assert chain_id(None, DIFF_A) == DIFF_A


def test_chain_id_hashes_parent_space_diff_id() -> None:
    ab = chain_id(DIFF_A, DIFF_B)
    assert ab == "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
    assert chain_id(ab, DIFF_C) == "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588"
    assert chain_id(DIFF_B, DIFF_A) != ab


def test_env_mapping() -> None:
    env = ["PATH=/usr/local/bin:/usr/bin", "EMPTY=", "EQ=a=b", "NOVALUE", "PATH=/bin"]
    assert env_mapping(env) == {"PATH": "/bin", "EMPTY": "", "EQ": "a=b"}
    assert env_mapping([]) == {}


# -- whiteouts and opaque directories -------------------------------------------------------------


def whiteout(path: Path) -> None:
    """A 0:0 character device: overlayfs's deletion mark."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, 0)
    except PermissionError:
        pytest.skip("mknod of a 0:0 character device refused: needs Linux >= 5.8 or CAP_MKNOD")


def opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.setxattr(path, OPAQUE_XATTR, b"y")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"the filesystem of {path} refuses user xattrs: {exc.strerror}")
        raise


def test_a_0_0_char_device_is_a_whiteout(tmp_path: Path) -> None:
    whiteout(tmp_path / "gone")
    assert is_whiteout(str(tmp_path / "gone"))
    assert is_whiteout(str(tmp_path / "gone"), os.lstat(tmp_path / "gone"))


def test_other_files_are_not_whiteouts(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("/dev/null")
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    for path in ("/dev/null", tmp_path / "empty", tmp_path / "dir", tmp_path / "link", tmp_path / "missing"):
        assert not is_whiteout(str(path)), path


def test_an_empty_file_marked_by_xattr_is_a_whiteout(tmp_path: Path) -> None:
    marked, full = tmp_path / "marked", tmp_path / "full"
    marked.touch()
    full.write_text("data")
    try:
        os.setxattr(marked, XWHITEOUT_XATTR, b"")
        os.setxattr(full, XWHITEOUT_XATTR, b"")
    except OSError as exc:
        pytest.skip(f"the filesystem of {tmp_path} refuses user xattrs: {exc.strerror}")
    assert is_whiteout(str(marked))
    assert not is_whiteout(str(full))  # only an empty file


def test_opaque_directory(tmp_path: Path) -> None:
    opaque(tmp_path / "opq")
    (tmp_path / "plain").mkdir()
    (tmp_path / "no").mkdir()
    os.setxattr(tmp_path / "no", OPAQUE_XATTR, b"n")
    assert is_opaque(str(tmp_path / "opq"))
    assert not is_opaque(str(tmp_path / "plain"))
    assert not is_opaque(str(tmp_path / "no"))
    assert not is_opaque(str(tmp_path / "missing"))


# -- the walk down a layer stack --------------------------------------------------------------------


class Layers(NamedTuple):
    top: Path
    middle: Path
    bottom: Path

    @property
    def stack(self) -> list[str]:
        return [str(layer) for layer in self]


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    """Three layer directories, top first, each holding etc/ with a file of its own."""
    result = Layers(*(tmp_path / name for name in ("top", "middle", "bottom")))
    for layer in result:
        (layer / "etc").mkdir(parents=True)
        (layer / "etc" / f"{layer.name}.conf").write_text(layer.name)
    return result


def test_a_directory_in_every_layer(layers: Layers) -> None:
    assert layer_copies(layers.stack, "/etc") == ([f"{layer}/etc" for layer in layers], True)
    assert topmost_copy(layers.stack, "/etc") == f"{layers.top}/etc"


def test_a_file_of_a_lower_layer(layers: Layers) -> None:
    assert layer_copies(layers.stack, "etc/bottom.conf/") == ([f"{layers.bottom}/etc/bottom.conf"], False)
    assert topmost_copy(layers.stack, "/etc/middle.conf") == f"{layers.middle}/etc/middle.conf"


def test_a_path_absent_everywhere(layers: Layers) -> None:
    assert layer_copies(layers.stack, "/etc/nothing") == ([], True)
    assert layer_copies(layers.stack, "/usr/bin/env") == ([], True)
    assert topmost_copy(layers.stack, "/usr/bin/env") is None


def test_a_whiteout_hides_the_lower_copies(layers: Layers) -> None:
    whiteout(layers.middle / "etc" / "bottom.conf")
    assert layer_copies(layers.stack, "/etc/bottom.conf") == ([], False)
    assert topmost_copy(layers.stack, "/etc/bottom.conf") is None
    (layers.top / "etc" / "bottom.conf").write_text("again")  # made anew above the deletion
    assert layer_copies(layers.stack, "/etc/bottom.conf") == ([f"{layers.top}/etc/bottom.conf"], False)


def test_a_whiteout_of_a_directory_on_the_way(layers: Layers) -> None:
    (layers.top / "etc").rename(layers.top / "old")
    whiteout(layers.top / "etc")
    assert layer_copies(layers.stack, "/etc/middle.conf") == ([], False)
    assert layer_copies(layers.stack, "/etc") == ([], False)
    assert topmost_copy(layers.stack, "/etc") is None


def test_an_opaque_directory_hides_what_lies_below(layers: Layers) -> None:
    opaque(layers.middle / "etc")
    assert layer_copies(layers.stack, "/etc") == ([f"{layers.top}/etc", f"{layers.middle}/etc"], False)
    assert layer_copies(layers.stack, "/etc/middle.conf") == ([f"{layers.middle}/etc/middle.conf"], False)
    assert layer_copies(layers.stack, "/etc/bottom.conf") == ([], False)
    assert topmost_copy(layers.stack, "/etc/bottom.conf") is None


def test_a_file_replacing_a_directory(layers: Layers) -> None:
    for name in os.listdir(layers.middle / "etc"):
        os.unlink(layers.middle / "etc" / name)
    (layers.middle / "etc").rmdir()
    (layers.middle / "etc").write_text("a file now")
    assert layer_copies(layers.stack, "/etc") == ([f"{layers.top}/etc", f"{layers.middle}/etc"], False)
    assert layer_copies(layers.stack, "/etc/bottom.conf") == ([], False)
    assert layer_copies(layers.stack, "/etc/top.conf") == ([f"{layers.top}/etc/top.conf"], False)


def test_a_symlink_replacing_a_directory(layers: Layers) -> None:
    (layers.top / "etc").rename(layers.top / "old")
    (layers.top / "etc").symlink_to(layers.bottom / "etc")  # to a real directory: still hides the layers below
    assert layer_copies(layers.stack, "/etc") == ([f"{layers.top}/etc"], False)
    assert layer_copies(layers.stack, "/etc/bottom.conf") == ([], False)


def test_the_root_path(layers: Layers) -> None:
    assert topmost_copy(layers.stack, "/") == str(layers.top)
    assert topmost_copy(layers.stack, "") == str(layers.top)
    assert topmost_copy([], "/") is None
    assert layer_copies(layers.stack, "/") == ([], True)  # callers handle the root themselves


def test_no_layers() -> None:
    assert layer_copies([], "/etc") == ([], True)
    assert topmost_copy([], "/etc") is None
