"""Volumes: named ones kept in the store, host paths bound through; everything else a test writes vanishes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_cli

from pytest_sandbox import spec as spec_module
from pytest_sandbox.volumes import Volume, VolumeError, VolumeStore, clear_setid_bits


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of this test's own, for pytest runs in pytester and the CLI alike."""
    root = tmp_path / "store"
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(root))
    return root


COUNTER = """
    import os, pytest
    from pytest_sandbox import volume

    @pytest.mark.container(volumes={volume("counts"): "/tmp/counts"})
    def test_count():
        with open("/tmp/counts/runs", "a") as f:
            f.write("x")
        with open("/tmp/elsewhere", "w") as f:  # a scratch place: gone with the sandbox
            f.write("x")
        print("RUNS", len(open("/tmp/counts/runs").read()))
"""


def test_a_named_volume_keeps_its_data_across_runs(pytester: pytest.Pytester, store: Path) -> None:
    pytester.makepyfile(test_count=COUNTER)
    for runs in (1, 2):
        result = pytester.runpytest_subprocess("-s")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*RUNS {runs}"])
    assert (store / "volumes" / "counts" / "data" / "runs").read_text() == "xx"
    assert (store / "volumes" / "counts").stat().st_mode & 0o777 == 0o700  # nobody else reaches what tests wrote


def test_host_paths_bind_read_write_and_read_only(pytester: pytest.Pytester, store: Path) -> None:
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "in.txt").write_text("given")
    (pytester.path / "out").mkdir()
    pytester.makepyfile(
        test_bind="""
        import errno, os, pytest

        @pytest.mark.container(volumes={"./data": "/tmp/data:ro", "out/": "/tmp/out"})
        def test_bind():
            assert open("/tmp/data/in.txt").read() == "given"
            with pytest.raises(OSError) as info:
                open("/tmp/data/new.txt", "w")
            assert info.value.errno == errno.EROFS
            with open("/tmp/out/result.txt", "w") as f:
                f.write("made in the sandbox")
            with open("data_copy.txt", "w") as f:  # the rootdir itself: ephemeral, as always
                f.write("x")
    """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert (pytester.path / "out" / "result.txt").read_text() == "made in the sandbox"
    assert sorted(os.listdir(pytester.path / "data")) == ["in.txt"]
    assert not (pytester.path / "data_copy.txt").exists()


def test_volumes_are_mounted_nosuid_and_nodev(pytester: pytest.Pytester, store: Path) -> None:
    pytester.makepyfile(
        test_suid="""
        import os, shutil, subprocess, pytest

        @pytest.mark.container(volumes={"v": "/tmp/v"})
        def test_suid():
            with open("/proc/self/mountinfo") as f:
                line = next(l for l in f if l.split()[4] == "/tmp/v")
            assert "nosuid" in line.split()[5] and "nodev" in line.split()[5]
    """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_ini_volumes_and_a_marker_on_the_same_target(pytester: pytest.Pytester, store: Path) -> None:
    (pytester.path / "a").mkdir()
    (pytester.path / "a" / "which").write_text("a")
    (pytester.path / "b").mkdir()
    (pytester.path / "b" / "which").write_text("b")
    pytester.makeini("[pytest]\nsandbox_volumes =\n    ./a=/tmp/v:ro\n    shared=/tmp/shared\n")
    pytester.makepyfile(
        test_ini="""
        import pytest

        def test_session_default():
            assert open("/tmp/v/which").read() == "a"
            open("/tmp/shared/seen", "a").write("1")

        @pytest.mark.container(volumes={"./b": "/tmp/v:ro"})
        def test_marker_wins_on_its_target():
            assert open("/tmp/v/which").read() == "b"
            open("/tmp/shared/seen", "a").write("2")
    """
    )
    pytester.runpytest_subprocess("--sandbox=all").assert_outcomes(passed=2)
    assert (store / "volumes" / "shared" / "data" / "seen").read_text() == "12"


def test_hermetic_session_volumes_persist_and_are_held(pytester: pytest.Pytester, store: Path) -> None:
    """Under --sandbox=hermetic the session's sandbox mounts the volumes the user gives (-o; the project's ini
    may not widen this mode's sandbox): a named one keeps what the tests wrote, a set-id bit a test set there
    is cleared, and another session waits for the volume."""
    given = ("-o", "sandbox_volumes=counts=/tmp/counts")
    pytester.makepyfile(
        test_count="""
        import os

        def test_count():
            with open("/tmp/counts/runs", "a") as f:
                f.write("x")
            with open("/tmp/counts/tool", "w") as f:
                f.write("#!/bin/sh\\n")
            os.chmod("/tmp/counts/tool", 0o4755)
            print("RUNS", len(open("/tmp/counts/runs").read()))

        def test_next_sees_it():
            assert os.path.exists("/tmp/counts/runs")
    """
    )
    for runs in (1, 2):
        result = pytester.runpytest_subprocess("-s", "--sandbox=hermetic", *given)
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([f"*RUNS {runs}"])
    data = store / "volumes" / "counts" / "data"
    assert (data / "runs").read_text() == "xx"
    assert not (data / "tool").stat().st_mode & stat.S_ISUID
    with VolumeStore(str(store)).held([("counts", "/tmp/counts", "rw")]):  # another session holds it
        slow = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "--sandbox=hermetic",
                *given,
                str(pytester.path),
            ],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)
        assert slow.poll() is None  # waiting for the volume
    out, _ = slow.communicate(timeout=120)
    assert slow.returncode == 0, out.decode()


@pytest.mark.parametrize(
    ("volumes", "message"),
    [
        (
            "{'missing/dir': '/tmp/x'}",
            "*test_bad.py::test_bad: @pytest.mark.container: invalid volumes=*no such host path*",
        ),
        ("{'v': 'relative'}", "*invalid volumes=*the target must be an absolute path*"),
        ("{'v': '/proc/x'}", "*invalid volumes=*cannot go on or under /proc*"),
        ("{'v': '/tmp/x:rx'}", "*invalid volumes=*unknown mode; allowed: ':ro', ':rw'*"),
        ("{'../up': '/tmp/x'}", "*invalid volumes='../up': a host path may not contain '..'*"),
        ("{'v': '/nonexistent-place/x'}", "*test_bad.py::test_bad: invalid volumes=*does not exist on this host*"),
        ("['v']", "*invalid volumes=*expected a mapping of source to 'target[[]:ro|:rw]'*"),
    ],
)
def test_bad_volumes_are_usage_errors_before_anything_runs(
    pytester: pytest.Pytester, store: Path, volumes: str, message: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.container(volumes={volumes})
        def test_bad():
            pass
    """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not (store / "volumes" / "v").exists()  # nothing made for a run that never started


def test_bad_ini_volume_line(pytester: pytest.Pytester, store: Path) -> None:
    pytester.makeini("[pytest]\nsandbox_volumes = /tmp/x\n")
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("--sandbox=all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*sandbox_volumes*invalid volumes='/tmp/x': each line must be SOURCE=TARGET[[]:ro|:rw]"]
    )


def test_volume_names_are_checked() -> None:
    with pytest.raises(ValueError, match="invalid volume name 'a/b'"):
        Volume("a/b")
    spec = spec_module.validate({"volumes": {Volume("pg"): "/tmp/pg", "/srv/x": "/tmp/x:ro"}}, "here")
    assert spec.volumes == (("pg", "/tmp/pg", "rw"), ("/srv/x", "/tmp/x", "ro"))
    assert spec.replace(hostname="h").volumes == spec.volumes  # the normalized form validates again


def test_one_writer_at_a_time_across_sessions(tmp_path: Path) -> None:
    """Two holders of one volume read/write take turns; read-only holders share it."""
    volumes = VolumeStore(str(tmp_path))
    events: list[str] = []

    def writer(tag: str) -> None:
        with volumes.held([("db", "/tmp/db", "rw")]):
            events.append(f"{tag} in")
            time.sleep(0.3)
            events.append(f"{tag} out")

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert events[0].endswith(" in") and events[1] == events[0].replace(" in", " out")
    with volumes.held([("db", "/tmp/db", "ro")]), volumes.held([("db", "/tmp/db2", "ro")]):
        assert volumes.in_use("db")
    assert not volumes.in_use("db")


def test_tests_sharing_a_volume_under_xdist_take_turns(pytester: pytest.Pytester, store: Path) -> None:
    pytester.makepyfile(
        test_turns="""
        import time, pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.container(volumes={"turns": "/tmp/turns"})
        def test_turn(n):
            with open("/tmp/turns/log", "a") as f:
                f.write(f"in{n} ")
                f.flush()
                time.sleep(0.2)
                f.write(f"out{n} ")
    """
    )
    pytester.runpytest_subprocess("-n", "2").assert_outcomes(passed=4)
    log = (store / "volumes" / "turns" / "data" / "log").read_text().split()
    assert len(log) == 8
    for k in range(0, 8, 2):  # never two tests in it at once
        assert log[k].startswith("in") and log[k + 1] == "out" + log[k][2:]


def test_volumes_cli(pytester: pytest.Pytester, store: Path, tmp_path: Path) -> None:
    pytester.makepyfile(test_count=COUNTER)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    # A test that left a symlink to a host file in its volume: removing the volume never follows it.
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (store / "volumes" / "counts" / "data" / "link").symlink_to(outside)
    listed = run_cli("volumes", cwd=pytester.path)
    assert listed.returncode == 0, listed.stderr
    assert "counts" in listed.stdout and "in use" not in listed.stdout
    inspected = run_cli("volumes", "inspect", "counts", cwd=pytester.path)
    assert f'"path": "{store}/volumes/counts/data"' in inspected.stdout and '"in_use": false' in inspected.stdout
    unknown = run_cli("volumes", "rm", "nope", cwd=pytester.path)
    assert unknown.returncode == 2 and "no volume named nope" in unknown.stderr and "counts" in unknown.stderr
    volumes = VolumeStore(str(store))
    with volumes.held([("counts", "/tmp/counts", "rw")]):
        busy = run_cli("volumes", "rm", "counts", cwd=pytester.path)
        assert busy.returncode == 2 and "in use by a running sandbox" in busy.stderr
        pruned = run_cli("volumes", "prune", cwd=pytester.path)
        assert "removed 0 volumes; in use, kept: counts" in pruned.stdout
        doctor = run_cli("doctor", cwd=pytester.path)
        assert f"volumes      {store}/volumes (1 named, " in doctor.stdout
        assert "; in use: counts)" in doctor.stdout
    removed = run_cli("volumes", "rm", "counts", cwd=pytester.path)
    assert removed.returncode == 0, removed.stderr
    assert not (store / "volumes" / "counts").exists() and outside.read_text() == "keep me"


def test_remove_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    volumes = VolumeStore(str(tmp_path))
    with pytest.raises(VolumeError, match="invalid volume name"):
        volumes.remove("../layers")


def test_a_hook_may_add_volumes(pytester: pytest.Pytester, store: Path) -> None:
    (pytester.path / "given").mkdir()
    (pytester.path / "given" / "f").write_text("from the hook")
    pytester.makeconftest(
        """
        def pytest_sandbox_spec(item, spec):
            return spec.replace(volumes={"./given": "/tmp/given:ro"})
    """
    )
    pytester.makepyfile(test_h="def test_h():\n    assert open('/tmp/given/f').read() == 'from the hook'\n")
    pytester.runpytest_subprocess("--sandbox=all").assert_outcomes(passed=1)


CLEAR_UNDER_FEW_FDS = """
import resource, sys
from pytest_sandbox.volumes import clear_setid_bits
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
print("\\n".join(sorted(clear_setid_bits(sys.argv[1]))))
"""


def test_set_id_bits_are_cleared_in_trees_shaped_to_exhaust_fds(tmp_path: Path) -> None:
    """A test shapes its volume's tree: 1500 sibling directories, a chain 700 deep, a symlink to a set-id
    file outside. Walked with 128 fds, every set-id file inside is found and nothing outside is touched."""
    top = tmp_path / "vol"
    planted = []
    for i in range(1500):
        (top / "wide" / f"d{i}").mkdir(parents=True)
        if i % 100 == 7:
            planted.append(top / "wide" / f"d{i}" / "prog")
    deep = top.joinpath("deep", *["d"] * 700)
    os.makedirs(deep)
    planted.append(deep / "prog")
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o4755)
    (top / "link").symlink_to(outside)
    for path in planted:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o755)
        os.fchmod(fd, 0o6755)
        os.close(fd)
    result = subprocess.run(
        [sys.executable, "-c", CLEAR_UNDER_FEW_FDS, str(top)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == sorted(str(path) for path in planted)
    assert [oct(path.stat().st_mode & 0o7777) for path in planted] == ["0o755"] * len(planted)
    assert outside.stat().st_mode & 0o7777 == 0o4755


def _set_id_program(path: Path) -> Path:
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(0o6755)
    return path


def test_a_file_volume_and_a_directory_its_owner_hid_are_cleared_too(tmp_path: Path) -> None:
    """Red team, keeper round: a volume that is one file was skipped (only directories were walked), and a
    directory its owner made unreadable (0311) hid what was in it from a walk as that owner."""
    tool = _set_id_program(tmp_path / "tool")
    assert clear_setid_bits(str(tool)) == [str(tool)]
    top = tmp_path / "vol"
    hidden = top / "d"
    hidden.mkdir(parents=True)
    inside = _set_id_program(hidden / "prog")
    hidden.chmod(0o311)
    try:
        assert clear_setid_bits(str(top)) == [str(inside)]
        assert stat.S_IMODE(hidden.stat().st_mode) == 0o311  # given back as it was
    finally:
        hidden.chmod(0o755)
    assert stat.S_IMODE(inside.stat().st_mode) == 0o755 and stat.S_IMODE(tool.stat().st_mode) == 0o755


def test_a_hidden_directory_deeper_than_the_walk_holds_open_is_cleared(tmp_path: Path) -> None:
    """Past the levels a walk holds open, a directory is reached again from a copy of its parent's fd: one its
    owner made 0311 there gets the same u+rx for the walk as one higher up (as a plain user; root reads it)."""
    top = tmp_path / "vol"
    deep = top.joinpath(*["d"] * 64)  # the first level the walk does not hold open
    deep.mkdir(parents=True)
    inside = _set_id_program(deep / "prog")
    deep.chmod(0o311)
    try:
        assert clear_setid_bits(str(top)) == [str(inside)]
        assert stat.S_IMODE(deep.stat().st_mode) == 0o311
    finally:
        deep.chmod(0o755)


def test_a_symlink_swapped_into_a_volumes_path_is_not_followed(tmp_path: Path) -> None:
    """Red team, keeper round: a test with a volume above another volume's source replaced a directory on
    that source's path with a symlink to a host directory; clearing then walked the host directory."""
    outside = tmp_path / "usr-bin"
    outside.mkdir()
    victim = _set_id_program(outside / "su")
    (tmp_path / "data" / "moved").mkdir(parents=True)
    (tmp_path / "data" / "mid").symlink_to(outside.parent)
    assert clear_setid_bits(str(tmp_path / "data" / "mid" / "usr-bin")) == []
    assert stat.S_IMODE(victim.stat().st_mode) == 0o6755


def test_set_id_bits_a_scope_sandboxs_process_sets_after_its_last_test_are_cleared(
    pytester: pytest.Pytester, store: Path
) -> None:
    """Red team, keeper round: a session fixture's process kept setting the bits in a volume of its tests;
    pytest cleared after the last test while the scope sandbox (and that process) still ran."""
    volume = pytester.path / "vol"
    volume.mkdir()
    pytester.makepyfile("""
        import os, shutil, subprocess, sys, time, pytest

        LOOP = '''
        import os, time
        while True:
            try:
                os.chmod("/tmp/v/prog", 0o6755)
            except OSError:
                pass
            time.sleep(0.0005)
        '''

        @pytest.fixture(scope="session")
        def setter():
            shutil.copy("/bin/true", "/tmp/v/prog")
            yield subprocess.Popen([sys.executable, "-c", LOOP], start_new_session=True)

        @pytest.mark.container(volumes={"./vol": "/tmp/v"})
        @pytest.mark.parametrize("i", range(2))
        def test_uses(setter, i):
            time.sleep(0.2)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)
    assert stat.S_IMODE((volume / "prog").stat().st_mode) & 0o6000 == 0
