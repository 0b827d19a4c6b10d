"""Hostile image commands: a RUN step, ``pytest-sandbox run`` and ``shell`` try to reach the host and fail.

Each probe is harmless if it works (a read-only mount that is unmounted at once, the mode /dev/null
already has, a core_pattern the test puts back); the command prints ``ESCAPED <what>`` for any that
worked and the tests require none, plus an unchanged host: marker file, core_pattern, /dev/null and
the host's own mount table. Runs as root and as a plain user.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_inputs import BUSYBOX

pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")

# Docker's default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
DOCKER_CAPS = sum(1 << c for c in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
# A root test's own commands (sandbox.run) give up DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER and SETFCAP:
# with them, a file descriptor of the test's view handed to a command would open any file behind it.
ROOT_COMMAND_CAPS = DOCKER_CAPS & ~sum(1 << c for c in (1, 2, 3, 31))


def _block_device() -> tuple[str, int, int]:
    """A block device of this host (name, major, minor): what a probe tries to create and mount."""
    for name in sorted(os.listdir("/sys/class/block")):
        with open(f"/sys/class/block/{name}/dev") as f:
            major, minor = f.read().strip().split(":")
        if not name.startswith(("loop", "ram", "zram")):
            return name, int(major), int(minor)
    return "loop0", 7, 0


BLOCK_NAME, BLOCK_MAJOR, BLOCK_MINOR = _block_device()

PROBE = r"""
probe() { what=$1; shift; if "$@" >/dev/null 2>&1; then echo "ESCAPED $what"; else echo "refused $what"; fi; }
try_mount() {
    what=$1; shift
    if mount "$@" /tmp/m 2>/dev/null; then echo "ESCAPED $what"; umount /tmp/m; else echo "refused $what"; fi
}
mkdir -p /tmp/m
probe mknod-block mknod /blk b MAJOR MINOR
for dev in /dev/NAME /blk /disk; do
    [ -e $dev ] && try_mount "mount-block-$dev" -o ro -t ext4 $dev
    [ -e $dev ] && probe "open-block-$dev" dd if=$dev of=/dev/null bs=512 count=1
done
try_mount mount-tmpfs -t tmpfs probe
probe mount-proc-over-proc mount -t proc proc /proc
try_mount mount-proc -t proc proc
probe sysctl sh -c 'echo sbx-probe-core > /proc/sys/kernel/core_pattern'
probe sysctl-hostname sh -c 'cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname'
[ -e /proc/sysrq-trigger ] && probe sysrq sh -c 'echo h > /proc/sysrq-trigger'
probe remount-root mount -o remount,rw /
probe remount-root-bind mount -o remount,bind,rw /
probe remount-sys mount -o remount,bind,rw /sys
probe remount-proc-sys mount -o remount,bind,rw /proc/sys
probe umount-proc-sys umount /proc/sys
probe umount-sys umount /sys
probe umount-dev-null umount /dev/null
probe umount-proc umount -l /proc
probe chmod-host-dev-null chmod 666 /dev/null
printf 'not a module' > /tmp/mod.ko
probe insmod insmod /tmp/mod.ko
probe nested-remount-proc-sys unshare -Urm mount -o remount,bind,rw /proc/sys
probe nested-remount-sys unshare -Urm mount -o remount,bind,rw /sys
probe nested-umount-proc-sys unshare -Urm umount /proc/sys
probe nested-proc unshare -Urmpf mount -t proc proc /tmp/m
probe nested-sysfs unshare -Urmn mount -t sysfs sys /tmp/m
EXTRA
echo "caps $(grep -E '^(CapEff|CapBnd|CapInh|CapAmb|NoNewPrivs)' /proc/self/status | tr -s '\t\n' '  ')"
echo "userns $(readlink /proc/self/ns/user)"
echo "uidmap $(cat /proc/self/uid_map | tr -s ' ')"
ls /proc/self/fd > /tmp/fds
echo "fds $(tr '\n' ' ' < /tmp/fds)"
echo "mountinfo-locked-check done"
"""


def probe_script(extra: str = "") -> str:
    return (
        PROBE.replace("MAJOR", str(BLOCK_MAJOR))
        .replace("MINOR", str(BLOCK_MINOR))
        .replace("NAME", BLOCK_NAME)
        .replace("EXTRA", extra)
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path


def write(project: Path, name: str, text: str) -> None:
    (project / "images" / f"{name}.Containerfile").write_text(textwrap.dedent(text).lstrip())


def cli(project: Path, *args: str, stdin: str | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "pytest_sandbox", "--store", str(project / "store"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project,
        **kwargs,
    )


def _host_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _core_pattern() -> str:
    with open("/proc/sys/kernel/core_pattern") as f:
        return f.read()


@pytest.fixture
def host_state() -> Iterator[Path]:
    """A marker file in the home directory (a FROM host image sees it read-only), and after the test
    the check that the marker, core_pattern, /dev/null and the host's mounts are as before."""
    marker_dir = Path(tempfile.mkdtemp(prefix=".sbx-hostile-", dir=os.path.expanduser("~")))
    marker = marker_dir / "marker"
    marker.write_text("host\n")
    marker.chmod(0o644)
    before = (_host_mounts(), _core_pattern(), os.stat("/dev/null").st_mode, os.stat("/dev/null").st_uid)
    try:
        yield marker
        after = (_host_mounts(), _core_pattern(), os.stat("/dev/null").st_mode, os.stat("/dev/null").st_uid)
        assert after[0] == before[0], f"new host mounts: {after[0] - before[0]}"
        assert after[1:] == before[1:]
        assert marker.read_text() == "host\n" and stat.S_IMODE(marker.stat().st_mode) == 0o644
        assert sorted(os.listdir(marker_dir)) == ["marker"]
    finally:
        if _core_pattern() != before[1]:
            with open("/proc/sys/kernel/core_pattern", "w") as f:  # only root could have changed it
                f.write(before[1])
        shutil.rmtree(marker_dir)


def check_probe_output(output: str, expect_root: bool) -> None:
    """No probe got through; the command had its own user namespace, its capabilities, no foreign fd."""
    lines = output.splitlines()
    assert "mountinfo-locked-check done" in lines, output
    escaped = [line for line in lines if line.startswith("ESCAPED")]
    assert escaped == [], output
    assert sum(line.startswith("refused ") for line in lines) >= 20, output
    fields = dict(line.split(" ", 1) for line in lines if line.startswith(("caps ", "userns ", "uidmap ", "fds ")))
    caps = dict(zip(fields["caps"].split()[::2], fields["caps"].split()[1::2], strict=True))
    wanted = DOCKER_CAPS if expect_root else 0
    assert int(caps["CapEff:"], 16) == wanted and int(caps["CapBnd:"], 16) == wanted, caps
    assert int(caps["CapInh:"], 16) == 0 and int(caps["CapAmb:"], 16) == 0 and caps["NoNewPrivs:"] == "1", caps
    assert fields["userns"] != os.readlink("/proc/self/ns/user")
    if os.geteuid() == 0:
        assert fields["uidmap"].split() == ["0", "0", "4294967295"]
    else:
        assert fields["uidmap"].split()[1:] == [str(os.geteuid()), "1"]
    assert fields["fds"].split() == ["0", "1", "2", "3"], fields["fds"]  # 3: the directory ls reads


def test_run_step_as_root_reaches_nothing_of_the_host(project: Path, host_state: Path) -> None:
    """The probe as a RUN step: the build succeeds (every attempt refused) and the results are its layer."""
    script = probe_script()
    (project / "images" / "probe.sh").write_text(script)
    write(project, "hostile", "FROM busybox\nCOPY probe.sh /probe.sh\nRUN sh /probe.sh > /results 2>&1\n")
    built = cli(project, "images", "build", "hostile")
    assert built.returncode == 0, built.stdout + built.stderr
    check_probe_output(cli(project, "run", "hostile", "cat", "/results").stdout, expect_root=True)


def test_run_step_as_an_image_user_has_no_capabilities(project: Path, host_state: Path) -> None:
    (project / "images" / "probe.sh").write_text(probe_script())
    write(
        project,
        "hostile",
        """
        FROM busybox
        COPY probe.sh /probe.sh
        RUN mkdir /out && chmod 777 /out
        USER 1000:1000
        RUN sh /probe.sh > /out/results 2>&1
        """,
    )
    built = cli(project, "images", "build", "hostile")
    assert built.returncode == 0, built.stdout + built.stderr
    check_probe_output(cli(project, "run", "hostile", "cat", "/out/results").stdout, expect_root=False)


def test_builder_fds_do_not_reach_the_run_step(project: Path, host_state: Path) -> None:
    """An inheritable fd of the builder's (here one the CLI was started with) is closed in RUN."""
    write(project, "fds", "FROM busybox\nRUN ls /proc/self/fd > /fds\n")
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        built = cli(project, "images", "build", "fds", pass_fds=(write_end,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert built.returncode == 0, built.stdout + built.stderr
    assert cli(project, "run", "fds", "cat", "/fds").stdout.split() == ["0", "1", "2", "3"]  # 3: ls's directory


def test_pytest_sandbox_run_and_shell_reach_nothing_of_the_host(project: Path, host_state: Path) -> None:
    write(project, "plain", "FROM busybox\n")
    assert cli(project, "images", "build", "plain").returncode == 0
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        ran = cli(project, "run", "plain", "sh", "-c", probe_script(), pass_fds=(write_end,))
        shell = cli(project, "shell", "plain", stdin=probe_script(), pass_fds=(write_end,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert ran.returncode == 0, ran.stderr
    check_probe_output(ran.stdout, expect_root=True)
    assert shell.returncode == 0, shell.stderr
    check_probe_output(shell.stdout, expect_root=True)


def test_from_host_image_run_and_run_step_leave_the_host_alone(project: Path, host_state: Path) -> None:
    """A FROM host image shows the host read-only under its layers: writes go to the layer, the
    host view cannot be remounted writable nor the overlays unmounted to reach it."""
    marker = host_state
    home_top = "/" + str(marker).strip("/").split("/")[0]
    extra = textwrap.dedent(f"""
        probe remount-host-view mount -o remount,bind,rw {home_top}
        probe umount-home-overlay umount {home_top}
        probe umount-home-overlay-lazy umount -l {home_top}
        probe nested-umount-home unshare -Urm umount {home_top}
        echo changed > {marker} && chmod 600 {marker} && echo "wrote-marker-in-layer"
        touch {marker}.new
    """)
    busybox = shutil.which("busybox") or "/bin/busybox"
    script = probe_script(extra).replace("unshare ", f"{busybox} unshare ").replace("insmod ", f"{busybox} insmod ")
    (project / "images" / "probe.sh").write_text(script)
    write(
        project,
        "hostile",
        "FROM host\nCOPY probe.sh /usr/local/probe.sh\nRUN sh /usr/local/probe.sh > /usr/local/results 2>&1\n",
    )
    built = cli(project, "images", "build", "hostile")
    assert built.returncode == 0, built.stdout + built.stderr
    results = cli(project, "run", "hostile", "cat", "/usr/local/results").stdout
    check_probe_output(results, expect_root=True)
    assert "wrote-marker-in-layer" in results  # the layer took it; host_state checks the host did not
    ran = cli(project, "run", "hostile", "sh", "-c", f"cat {marker}; sh /usr/local/probe.sh")
    assert ran.stdout.startswith("changed\n"), ran.stdout + ran.stderr
    check_probe_output(ran.stdout.split("\n", 1)[1], expect_root=True)


def _docker_archive(path: Path, device: tuple[int, int]) -> None:
    """A docker archive of busybox plus ``/disk``, a block device node of this host."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        assert BUSYBOX is not None
        tar.add(BUSYBOX, "bin/busybox")
        for applet in ("sh", "dd", "mount", "umount", "mknod", "mkdir", "echo", "cat", "grep", "tr", "ls"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        node = tarfile.TarInfo("disk")
        node.type, node.mode, node.devmajor, node.devminor = tarfile.BLKTYPE, 0o666, *device
        tar.addfile(node)
    data = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]}}
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_id]}
    with tarfile.open(path, "w") as tar:
        for name, blob in (
            ("layer.tar", data),
            ("config.json", json.dumps(config).encode()),
            (
                "manifest.json",
                json.dumps([{"Config": "config.json", "RepoTags": [], "Layers": ["layer.tar"]}]).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_a_block_device_shipped_in_a_layer_opens_nothing(project: Path, host_state: Path) -> None:
    """An imported layer may carry a device node (root's import creates it): the image root is nodev."""
    _docker_archive(project / "images" / "disk.tar", (BLOCK_MAJOR, BLOCK_MINOR))
    write(
        project,
        "disk",
        """
        FROM docker-archive:disk.tar
        RUN mkdir -p /tmp/m; (dd if=/disk of=/dev/null bs=512 count=1 && echo ESCAPED read) > /read 2>&1; \
            mount -o ro -t ext4 /disk /tmp/m && echo ESCAPED mount >> /read && umount /tmp/m; true
        """,
    )
    built = cli(project, "images", "build", "disk")
    assert built.returncode == 0, built.stdout + built.stderr
    ran = cli(project, "run", "disk", "sh", "-c", "cat /read; ls -l /disk; dd if=/disk of=/dev/null count=1")
    assert "ESCAPED" not in ran.stdout, ran.stdout
    if os.geteuid() == 0:  # only root's import creates the node; a plain user's skips it
        assert ran.stdout.splitlines()[-1].startswith("b"), ran.stdout
        assert "Permission denied" in ran.stderr, ran.stderr
    assert ran.returncode != 0


def test_chown_in_a_run_step(project: Path) -> None:
    """root's RUN maps every id (chown works, the layer keeps the owner); a plain user's one id cannot."""
    write(project, "owned", "FROM busybox\nRUN touch /x && chown 1000:1000 /x\n")
    built = cli(project, "images", "build", "owned")
    if os.geteuid() != 0:
        assert built.returncode != 0 and "chown" in built.stdout + built.stderr
        return
    assert built.returncode == 0, built.stdout + built.stderr
    assert cli(project, "run", "owned", "ls", "-ln", "/x").stdout.split()[2:4] == ["1000", "1000"]
    store_copies = [p for p in (project / "store").rglob("x") if p.parent.name == "diff"]
    assert store_copies and all((p.stat().st_uid, p.stat().st_gid) == (1000, 1000) for p in store_copies)


def test_killed_run_leaves_nothing(project: Path, host_state: Path, token: str) -> None:
    """kill -9 of ``pytest-sandbox run``: the command dies with it, no mount stays on the host, and
    the next command removes the dead one's staging directory."""
    from helpers import wait_gone

    write(project, "plain", "FROM busybox\n")
    assert cli(project, "images", "build", "plain").returncode == 0
    command = ["sh", "-c", f"echo started; sleep 1000 # {token}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(project / "store"), "run", "plain", *command],
        cwd=project,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    proc.kill()
    proc.wait()
    assert wait_gone(token) == []
    assert cli(project, "run", "plain", "true").returncode == 0
    assert os.listdir(project / "store" / "tmp") == []


def test_sandbox_run_in_a_test_reaches_nothing_of_its_sandbox(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sandbox.run`` in an ``image=`` test: the same probe, one level further in."""
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path_factory.mktemp("store")))
    (pytester.path / "probe.sh").write_text(probe_script())
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(image="busybox")
        def test_probe(sandbox):
            with open("probe.sh") as f:
                result = sandbox.run(f.read())
            print("PROBE-OUTPUT-START")
            print(result.stdout + result.stderr)
            print("PROBE-OUTPUT-END")
    """)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    text = result.stdout.str()
    output = text.split("PROBE-OUTPUT-START\n", 1)[1].split("PROBE-OUTPUT-END", 1)[0]
    assert [line for line in output.splitlines() if "ESCAPED" in line] == [], output
    assert sum(line.startswith("refused ") for line in output.splitlines()) >= 20, output
    wanted = ROOT_COMMAND_CAPS if os.geteuid() == 0 else DOCKER_CAPS
    assert f"CapEff: {wanted:016x}" in output and "NoNewPrivs: 1" in output, output


def test_run_step_on_the_host_network_cannot_configure_it(project: Path, host_state: Path) -> None:
    """``RUN --network=host`` sees the host's interfaces but holds no capability over them (a probe
    that would set lo's MTU to the value it has)."""
    with open("/sys/class/net/lo/mtu") as f:
        mtu = f.read().strip()
    write(
        project,
        "net",
        f"""
        FROM busybox
        RUN --network=host cat /proc/net/dev > /dev-list; \
            (ip link set lo mtu {mtu} && echo ESCAPED mtu || echo refused mtu) > /probe 2>&1
        """,
    )
    built = cli(project, "images", "build", "net")
    assert built.returncode == 0, built.stdout + built.stderr
    seen = cli(project, "run", "net", "cat", "/dev-list").stdout
    with open("/proc/net/dev") as f:
        host_interfaces = sorted(line.split(":")[0].strip() for line in f if ":" in line)
    assert sorted(line.split(":")[0].strip() for line in seen.splitlines() if ":" in line) == host_interfaces
    probe = cli(project, "run", "net", "cat", "/probe").stdout
    assert probe.splitlines()[-1] == "refused mtu", probe
