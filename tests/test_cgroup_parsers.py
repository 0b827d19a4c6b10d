"""Parsers of kernel text: cgroup files, /proc/self/cgroup and /proc/self/mountinfo, fed with sample lines."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.linux import mounts
from pytest_sandbox.linux.mounts import MountPoint, filesystem_of, is_under, mount_table, mounts_under
from pytest_sandbox.runtime import cgroups
from pytest_sandbox.runtime.cgroups import (
    CgroupV1,
    CgroupV2,
    Group,
    Session,
    Usage,
    _enabled,
    _enforced,
    _int,
    _keyed,
    _uid_of,
    _v1_mounts,
    own_cgroup_paths,
)

# -- cgroup file contents ---------------------------------------------------------------------------


def test_keyed_memory_events() -> None:
    assert _keyed("low 0\nhigh 12\nmax 40\noom 2\noom_kill 2\noom_group_kill 0\n") == {
        "low": 0,
        "high": 12,
        "max": 40,
        "oom": 2,
        "oom_kill": 2,
        "oom_group_kill": 0,
    }


def test_keyed_skips_lines_that_are_not_key_number() -> None:
    text = "8:0 rbytes=4096 wbytes=0\nmax.imposed 0\nstate max\n\nnegative -3\nnr_periods 17"
    assert _keyed(text) == {"max.imposed": 0, "negative": -3, "nr_periods": 17}


def test_keyed_of_nothing() -> None:
    assert _keyed(None) == {}
    assert _keyed("") == {}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576\n", 1048576),
        ("0", 0),
        ("max\n", None),
        ("", None),
        (None, None),
        ("-1\n", None),
        ("12 34", None),
    ],
)
def test_int(text: str | None, value: int | None) -> None:
    assert _int(text) == value


def test_usage_as_dict_defaults_and_values() -> None:
    assert Usage().as_dict() == {
        "memory_peak": None,
        "oom_kills": 0,
        "cpu_user": None,
        "cpu_system": None,
        "cpu_throttled": None,
        "pids_peak": None,
        "pids_limit_hits": 0,
    }
    assert Usage(memory_peak=4096, oom_kills=1, pids_peak=3).as_dict() == {
        "memory_peak": 4096,
        "oom_kills": 1,
        "cpu_user": None,
        "cpu_system": None,
        "cpu_throttled": None,
        "pids_peak": 3,
        "pids_limit_hits": 0,
    }


def test_enabled_controllers_of_subtree_control(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    assert _enabled(str(tmp_path)) == {"cpu", "io", "memory", "pids"}
    assert _enabled(str(tmp_path / "missing")) == set()


def test_enforced_limits_of_controllers() -> None:
    assert _enforced(["memory", "cpuacct", "pids", "blkio"], "8:0") == {"memory", "pids", "io", "timeout"}
    assert _enforced({"cpu", "io"}, None) == {"cpus", "timeout"}


def test_uid_of_a_process_from_its_status() -> None:
    assert _uid_of(str(os.getpid())) == os.getuid()
    assert _uid_of("999999999") is None


@pytest.fixture
def cgroup_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A stand-in session cgroup directory holding one sandbox's group ``sb-1``, and an fd to it."""
    (tmp_path / "sb-1").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path / "sb-1", fd
    os.close(fd)


def test_v2_usage_from_the_group_files(cgroup_dir: tuple[Path, int]) -> None:
    group_dir, fd = cgroup_dir
    (group_dir / "memory.peak").write_text("73400320\n")
    (group_dir / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n")
    (group_dir / "cpu.stat").write_text(
        "usage_usec 2750000\nuser_usec 2500000\nsystem_usec 250000\n"
        "nr_periods 30\nnr_throttled 12\nthrottled_usec 1500000\n"
    )
    (group_dir / "pids.peak").write_text("17\n")
    (group_dir / "pids.events").write_text("max 5\n")
    backend = CgroupV2("/sys/fs/cgroup/test", {"memory", "cpu", "pids"}, None, set())
    usage = Group(Session(backend, {"": fd}, {}, "pytest-sandbox-1"), "sb-1").usage()
    assert usage == Usage(
        memory_peak=73400320,
        oom_kills=1,
        cpu_user=2.5,
        cpu_system=0.25,
        cpu_throttled=1.5,
        pids_peak=17,
        pids_limit_hits=5,
    )


def test_v2_usage_where_files_are_missing(cgroup_dir: tuple[Path, int]) -> None:
    group_dir, fd = cgroup_dir
    (group_dir / "cpu.stat").write_text("usage_usec 10\n")  # no cpu controller: only the core keys
    backend = CgroupV2("/sys/fs/cgroup/test", {"memory"}, None, set())
    assert Group(Session(backend, {"": fd}, {}, "s"), "sb-1").usage() == Usage()


def test_v1_usage_from_the_hierarchies(cgroup_dir: tuple[Path, int]) -> None:
    group_dir, fd = cgroup_dir
    ticks = os.sysconf("SC_CLK_TCK")
    (group_dir / "memory.max_usage_in_bytes").write_text("1073741824\n")
    (group_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (group_dir / "cpuacct.stat").write_text(f"user {3 * ticks}\nsystem {ticks // 2}\n")
    (group_dir / "cpu.stat").write_text("nr_periods 40\nnr_throttled 8\nthrottled_time 2500000000\n")
    (group_dir / "pids.events").write_text("max 2\n")  # no pids.peak before Linux 6.1
    dirs = dict.fromkeys(("memory", "cpu", "cpuacct", "pids"), fd)
    backend = CgroupV1(dict.fromkeys(dirs, "/sys/fs/cgroup/x"), None)
    usage = Group(Session(backend, dirs, {}, "s"), "sb-1").usage()
    assert usage == Usage(
        memory_peak=2**30,
        oom_kills=3,
        cpu_user=3.0,
        cpu_system=(ticks // 2) / ticks,
        cpu_throttled=2.5,
        pids_peak=None,
        pids_limit_hits=2,
    )


def test_v1_usage_of_a_memory_only_hierarchy(cgroup_dir: tuple[Path, int]) -> None:
    group_dir, fd = cgroup_dir
    (group_dir / "memory.max_usage_in_bytes").write_text("4096\n")
    backend = CgroupV1({"memory": "/sys/fs/cgroup/memory"}, None)
    assert Group(Session(backend, {"memory": fd}, {}, "s"), "sb-1").usage() == Usage(memory_peak=4096)


# -- /proc/self/cgroup ------------------------------------------------------------------------------


def test_own_cgroup_paths_of_a_hybrid_host(tmp_path: Path) -> None:
    sample = tmp_path / "cgroup"
    sample.write_text(
        "12:pids:/user.slice/user-1000.slice/session-2.scope\n"
        "11:cpu,cpuacct:/user.slice\n"
        "4:memory:/user.slice\n"
        "1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n"
        "0::/user.slice/user-1000.slice/session-2.scope\n"
    )
    assert own_cgroup_paths(str(sample)) == {
        "pids": "/user.slice/user-1000.slice/session-2.scope",
        "cpu": "/user.slice",
        "cpuacct": "/user.slice",
        "memory": "/user.slice",
        "name=systemd": "/user.slice/user-1000.slice/session-2.scope",
        "": "/user.slice/user-1000.slice/session-2.scope",
    }


def test_own_cgroup_paths_of_a_v2_host_with_a_colon_in_the_path(tmp_path: Path) -> None:
    sample = tmp_path / "cgroup"
    path = "/user.slice/user-1000.slice/user@1000.service/app.slice/run-a:b.scope"
    sample.write_text(f"0::{path}\n")
    assert own_cgroup_paths(str(sample)) == {"": path}


def test_own_cgroup_paths_reads_this_process_by_default() -> None:
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    paths = own_cgroup_paths()
    assert paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        assert paths[controllers.split(",")[0]] == path


# -- /proc/self/mountinfo ---------------------------------------------------------------------------

MOUNTINFO = """\
21 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
22 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
23 21 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,size=4096k,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
37 30 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
38 30 0:34 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec shared:18 - cgroup cgroup rw,net_cls,net_prio
39 30 0:35 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:19 - cgroup cgroup rw,blkio
40 21 0:31 /user.slice /srv/memcg rw,relatime - cgroup cgroup rw,memory
46 21 98:0 /mnt1 /mnt\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue
41 21 0:40 / /home/a\\011tab\\134back rw,relatime shared:20 propagate_from:1 - tmpfs tmpfs rw
42 21 0:41 / /data rw,relatime - xfs /dev/vdb1 rw
43 42 0:42 / /data/cache rw,relatime - tmpfs tmpfs rw
44 43 0:43 / /data/cache/fuse rw,relatime - fuse.sshfs host:/x rw,user_id=0
45 42 0:44 / /data/cache rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
"""


@pytest.fixture
def mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sample written to a file, and every reader of the mount table pointed at it."""
    sample = tmp_path / "mountinfo"
    sample.write_text(MOUNTINFO)
    table = mount_table(str(sample))
    monkeypatch.setattr(mounts, "mount_table", lambda: table)
    monkeypatch.setattr(cgroups, "mount_table", lambda: table)
    return str(sample)


def test_mount_table_targets_types_and_super_options(mountinfo: str) -> None:
    table = mount_table(mountinfo)
    assert len(table) == len(MOUNTINFO.splitlines())
    assert table[0] == MountPoint("/", "ext4", "rw,discard")
    assert table[4] == MountPoint("/sys/fs/cgroup/unified", "cgroup2", "rw,nsdelegate")
    assert table[7] == MountPoint("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
    assert table[-2] == MountPoint("/data/cache/fuse", "fuse.sshfs", "rw,user_id=0")


def test_mount_table_decodes_octal_escapes(mountinfo: str) -> None:
    targets = [m.target for m in mount_table(mountinfo)]
    assert "/mnt dir" in targets  # \040 with the optional field master:1 before the separator
    assert "/home/a\ttab\\back" in targets  # \011 and \134, with two optional fields
    assert not any("\\0" in t for t in targets)


def test_mount_table_of_this_process() -> None:
    table = mount_table()
    assert any(m.target == "/proc" and m.fstype == "proc" for m in table)
    assert any(m.target == "/" for m in table)


def test_mounts_under(mountinfo: str) -> None:
    assert mounts_under("/data") == ["/data/cache", "/data/cache/fuse", "/data/cache"]
    assert mounts_under("/data/") == mounts_under("/data")
    assert mounts_under("/data/cache/fuse") == []
    assert mounts_under("/dat") == []  # a prefix of the name is not a parent
    assert mounts_under("/sys/fs") == [
        f"/sys/fs/cgroup{sub}"
        for sub in ("", "/unified", "/systemd", "/memory", "/cpu,cpuacct", "/pids", "/net_cls,net_prio", "/blkio")
    ]


def test_filesystem_of_is_the_deepest_mount(mountinfo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "realpath", lambda path: path)  # the sample's paths do not exist here
    assert filesystem_of("/data/file") == "xfs"
    assert filesystem_of("/data/cache/x") == "overlay"  # the later of two mounts on one place covers the other
    assert filesystem_of("/data/cache/fuse/deep/er") == "fuse.sshfs"
    assert filesystem_of("/data/cachefile") == "xfs"
    assert filesystem_of("/mnt dir/a") == "ext3"
    assert filesystem_of("/etc/passwd") == "ext4"
    assert filesystem_of("/proc") == "proc"


def test_filesystem_of_resolves_symlinks(mountinfo: str, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/proc/self")
    assert filesystem_of(str(link)) == "proc"


@pytest.mark.parametrize(
    ("path", "parent", "under"),
    [
        ("/a/b", "/a", True),
        ("/a", "/a", True),
        ("/a/b", "/a/", True),
        ("/a/b", "/", True),
        ("/", "/", True),
        ("/ab", "/a", False),
        ("/a", "/a/b", False),
        ("/b/a", "/a", False),
    ],
)
def test_is_under(path: str, parent: str, under: bool) -> None:
    assert is_under(path, parent) is under


def test_v1_mounts_finds_each_controllers_first_hierarchy(mountinfo: str) -> None:
    assert _v1_mounts() == {
        "memory": "/sys/fs/cgroup/memory",  # not the later bind mount at /srv/memcg
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "pids": "/sys/fs/cgroup/pids",
        "blkio": "/sys/fs/cgroup/blkio",
    }


def test_v1_mounts_of_a_pure_v2_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_text(
        "21 1 254:0 / / rw - ext4 /dev/vda rw\n"
        "30 21 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n"
    )
    table = mount_table(str(sample))
    monkeypatch.setattr(cgroups, "mount_table", lambda: table)
    assert _v1_mounts() == {}
