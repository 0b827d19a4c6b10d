"""Which host paths become overlays, stay visible or get a fresh tmpfs."""

from __future__ import annotations

from pathlib import Path

from pytest_sandbox.linux import rootfs


def test_plan_for_paths_under_tmp(tmp_path: Path) -> None:
    rootdir = tmp_path / "project"
    venv = tmp_path / "venv" / "lib"
    inside = rootdir / ".venv"
    for path in (rootdir, venv, inside):
        path.mkdir(parents=True)
    plan = rootfs.make_plan(
        writable=[str(rootdir)], needed=[str(venv), str(venv / "sub-missing"), str(inside), "/usr/lib"]
    )
    assert str(rootdir) in plan.overlays
    assert plan.visible == (str(venv),)  # under the rootdir overlay or outside /tmp: nothing else to re-expose
    assert "/tmp" in plan.fresh


def test_overlays_shallowest_first_and_deduplicated(tmp_path: Path) -> None:
    outer = tmp_path / "a"
    inner = outer / "b" / "c"
    inner.mkdir(parents=True)
    plan = rootfs.make_plan(writable=[str(inner), str(outer), str(outer) + "/", "/"], needed=[])
    assert plan.overlays == (str(outer), str(inner))


def test_nested_visible_paths_collapse(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    plan = rootfs.make_plan(writable=[], needed=[str(tmp_path / "x" / "y"), str(tmp_path / "x")])
    assert plan.visible == (str(tmp_path / "x"),)


def test_symlinks_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    plan = rootfs.make_plan(writable=[str(tmp_path / "link")], needed=[])
    assert plan.overlays == (str(real),)
