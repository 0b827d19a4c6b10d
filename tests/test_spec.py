"""Validation of marker keywords, ini keys and options: clear errors before anything runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.spec import (
    IO_BPS_MAX,
    IO_IOPS_MAX,
    MEMORY_MAX,
    PIDS_MAX,
    TIMEOUT_MAX,
    SandboxSpec,
    check_env_lines,
    shown,
    validate,
)

INF = float("inf")
NAN = float("nan")


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("hostname='bad host!'", "test_bad.py::test_it: @pytest.mark.container: invalid hostname='bad host!'"),
        ("network='bridge'", "invalid network='bridge': allowed: 'none', 'host'"),
        ("writable='relative/dir'", "invalid writable='relative/dir': expected a list of paths; allowed: existing"),
        ("writable=['relative']", "invalid writable='relative': not an absolute path; allowed: existing directories"),
        ("env={'1BAD': 'x'}", "invalid env='1BAD'"),
        ("env={'OK': 3}", "invalid env={'OK': 3}: values must be strings"),
        ("memroy='1G'", "unknown keyword(s) memroy; allowed: hostname, network, writable, env"),
        ("'positional'", "takes keyword arguments only"),
    ],
)
def test_bad_marker_is_a_usage_error(pytester: pytest.Pytester, marker: str, message: str) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        def test_first():
            pass

        @pytest.mark.container({marker})
        def test_it():
            pass
    """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "passed" not in result.stdout.str()  # nothing ran


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--sandbox=sometimes"], "", "--sandbox: invalid value 'sometimes'; allowed: marked, all, hermetic, off"),
        (["--sandbox-unavailable=ignore"], "", "--sandbox-unavailable: invalid value 'ignore'; allowed: fail, skip"),
        (["--sandbox-network=wan"], "", "--sandbox-network: invalid network='wan'"),
        ([], "sandbox = maybe", "ini sandbox: invalid value 'maybe'"),
        ([], "sandbox_hostname = -x-", "ini sandbox_hostname: invalid hostname='-x-'"),
        ([], "sandbox_env = NOEQUALS", "ini sandbox_env: invalid env='NOEQUALS': each line must be NAME=VALUE"),
        ([], "sandbox_writable = rel/path", "ini sandbox_writable: invalid writable='rel/path'"),
    ],
)
def test_bad_option_or_ini_is_a_usage_error(pytester: pytest.Pytester, args: list[str], ini: str, message: str) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_closest_marker_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import socket, pytest

        pytestmark = pytest.mark.container(hostname="module-level", env={"A": "1"})

        @pytest.mark.container(hostname="function-level")
        def test_it():
            import os
            assert socket.gethostname() == "function-level"
            assert os.environ["A"] == "1"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_spec_replace_validates() -> None:
    spec = SandboxSpec()
    assert spec.replace(hostname="other").hostname == "other"
    with pytest.raises(pytest.UsageError, match="pytest_sandbox_spec hook: invalid network='wan'"):
        spec.replace(network="wan")


def test_validate_normalizes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    spec = validate({"writable": [b, f"{a}/../a/", f"/{b}", str(tmp_path / "link")], "env": {"Z": "1", "A": "2"}}, "x")
    assert spec.writable == (a, b)  # normalised, symlinks resolved, duplicates gone
    assert spec.env == (("A", "2"), ("Z", "1"))
    assert hash(spec) == hash(validate({"writable": (a, b), "env": {"A": "2", "Z": "1"}}, "there"))
    assert validate(dict(writable=spec.writable), "again").writable == spec.writable  # idempotent


# Each bad value of each field: (field, value, what the error must say after "invalid <field>=").
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("hostname", "host\n", "'host\\n': expected a host name"),
    ("hostname", "host\nx", "labels of 1 to 63"),
    ("hostname", "a" * 64, "at most 64 characters"),
    ("hostname", "a" * 64 + ".b", "labels of 1 to 63"),
    ("hostname", "a" * 40 + "." + "b" * 24, "at most 64 characters"),  # labels fine, 65 in all
    ("hostname", "", "expected a host name"),
    ("hostname", "a.", "expected a host name"),
    ("hostname", "a..b", "expected a host name"),
    ("hostname", "-a", "expected a host name"),
    ("hostname", "a-", "expected a host name"),
    ("hostname", "h\u00e9te", "ASCII"),
    ("hostname", "a\x00", "expected a host name"),
    ("hostname", 5, "expected a host name"),
    ("env", {"A\n": "x"}, "names are ASCII letters"),
    ("env", {"A=B": "x"}, "names are ASCII letters"),
    ("env", {"A\x00": "x"}, "names are ASCII letters"),
    ("env", {"": "x"}, "names are ASCII letters"),
    ("env", {"\u00c4": "x"}, "names are ASCII letters"),
    ("env", {"A": "x\x00y"}, "values must be strings without NUL bytes"),
    ("env", {"A": b"x"}, "values must be strings"),
    ("env", "A=1", "expected a mapping"),
    ("writable", ["/nonexistent-dir-of-pytest-sandbox"], "not an existing directory"),
    ("writable", ["/etc/hostname"], "not an existing directory"),
    ("writable", ["/tmp\x00x"], "not an absolute path"),
    ("writable", [b"/tmp"], "not an absolute path"),
    ("writable", ["tmp"], "not an absolute path"),
    ("writable", [""], "not an absolute path"),
    ("writable", ["/"], "the whole root cannot be made writable"),
    ("writable", ["//"], "the whole root cannot be made writable"),
    ("writable", ["/./"], "the whole root cannot be made writable"),
    ("writable", ["/tmp/.."], "the whole root cannot be made writable"),
    ("writable", ["/proc"], "/proc and everything under it"),
    ("writable", ["/proc/"], "/proc and everything under it"),
    ("writable", ["/proc/self"], "/proc and everything under it"),
    ("writable", ["//proc"], "/proc and everything under it"),
    ("writable", ["/sys"], "/sys and everything under it"),
    ("writable", ["/sys/fs/cgroup"], "/sys and everything under it"),
    ("writable", ["/sys/./fs/cgroup/"], "/sys and everything under it"),
    ("writable", ["/dev"], "/dev and everything under it"),
    ("writable", ["/dev/shm"], "/dev and everything under it"),
    ("writable", ["/tmp/../dev/shm"], "/dev and everything under it"),
    ("writable", "/tmp", "expected a list of paths"),
    ("writable", Path("/tmp"), "expected a list of paths"),
    ("writable", 3, "expected a list of paths"),
    ("memory", INF, "expected a size from 1M"),
    ("memory", NAN, "expected a size from 1M"),
    ("memory", 10**400, "<an int of 1329 bits>: expected a size from 1M"),
    ("memory", 2**63, "expected a size from 1M to 4611686018427387904 bytes"),
    ("memory", MEMORY_MAX + 1, "expected a size from 1M"),
    ("memory", "1e999", "expected a size from 1M"),
    ("memory", "9" * 5000, "expected a size from 1M"),
    ("memory", "10000000T", "expected a size from 1M"),
    ("memory", 1024 * 1024 - 1, "expected a size from 1M"),
    ("memory", 0, "expected a size from 1M"),
    ("memory", -5, "expected a size from 1M"),
    ("memory", True, "expected a size from 1M"),
    ("memory", "1G\x00", "expected a size from 1M"),
    ("tmpfs_size", "0", "invalid tmpfs_size='0': expected a size from 1M"),
    ("tmpfs_size", INF, "expected a size from 1M"),
    ("tmpfs_size", "lots", "expected a size from 1M"),
    ("tmpfs_size", 2**63, "expected a size from 1M"),
    ("cpus", INF, "expected a number of CPUs from 0.01 to 1024"),
    ("cpus", NAN, "expected a number of CPUs"),
    ("cpus", 10**400, "expected a number of CPUs"),
    ("cpus", 2**63, "expected a number of CPUs"),
    ("cpus", "1e999", "expected a number of CPUs"),
    ("cpus", "nan", "expected a number of CPUs"),
    ("cpus", 1025, "expected a number of CPUs"),
    ("cpus", 0.001, "expected a number of CPUs"),
    ("cpus", 0, "expected a number of CPUs"),
    ("cpus", -1, "expected a number of CPUs"),
    ("cpus", True, "expected a number of CPUs"),
    ("cpus", "fast", "expected a number of CPUs"),
    ("pids", INF, "expected a whole number of processes from 1 to 4194304"),
    ("pids", NAN, "expected a whole number of processes"),
    ("pids", 10**400, "expected a whole number of processes"),
    ("pids", 10**5000, "<an int of 16610 bits>: expected a whole number"),
    ("pids", 2**63, "expected a whole number of processes"),
    ("pids", PIDS_MAX + 1, "expected a whole number of processes"),
    ("pids", "1e999", "expected a whole number of processes"),
    ("pids", 2.5, "expected a whole number of processes"),
    ("pids", 0, "expected a whole number of processes"),
    ("pids", -1, "expected a whole number of processes"),
    ("pids", True, "expected a whole number of processes"),
    ("timeout", INF, "expected a number of seconds greater than 0, at most 31536000"),
    ("timeout", NAN, "expected a number of seconds"),
    ("timeout", 10**400, "expected a number of seconds"),
    ("timeout", 2**63, "expected a number of seconds"),
    ("timeout", TIMEOUT_MAX + 1, "expected a number of seconds"),
    ("timeout", "1e999", "expected a number of seconds"),
    ("timeout", "-inf", "expected a number of seconds"),
    ("timeout", 0, "expected a number of seconds"),
    ("timeout", -1, "expected a number of seconds"),
    ("timeout", True, "expected a number of seconds"),
    ("io", {"read_bps": INF}, "expected a size like '10M', from 1 to 9223372036854775807"),
    ("io", {"read_bps": 10**400}, "expected a size like '10M'"),
    ("io", {"write_bps": 2**63}, "expected a size like '10M'"),
    ("io", {"write_bps": "1e999"}, "expected a size like '10M'"),
    ("io", {"read_bps": "1" * 5000}, "expected a size like '10M'"),
    ("io", {"read_bps": 0}, "expected a size like '10M'"),
    ("io", {"read_bps": True}, "expected a size like '10M'"),
    ("io", {"read_iops": NAN}, "expected a whole number of operations per second, from 1 to 4294967294"),
    ("io", {"read_iops": INF}, "expected a whole number of operations"),
    ("io", {"write_iops": 10**400}, "expected a whole number of operations"),
    ("io", {"write_iops": 2**63}, "expected a whole number of operations"),
    ("io", {"write_iops": IO_IOPS_MAX + 1}, "expected a whole number of operations"),
    ("io", {"read_iops": 1.5}, "expected a whole number of operations"),
    ("io", {"read_iops": -1}, "expected a whole number of operations"),
    ("io", {"read_iops": False}, "expected a whole number of operations"),
    ("io", {"read_mbps": 1}, "unknown io key"),
    ("image", "busybox\n", "expected an image name"),
    ("image", "../busybox", "expected an image name"),
    ("image", "Busybox", "expected an image name"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), BAD_VALUES, ids=[f"{f}={shown(v)[:40]}" for f, v, _ in BAD_VALUES]
)
def test_validate_refuses(field: str, value: Any, message: str) -> None:
    with pytest.raises(pytest.UsageError) as info:
        validate({field: value}, "here")
    text = str(info.value)
    assert text.startswith(f"here: invalid {field}="), text
    assert message in text, text
    assert len(text) < 400  # a huge value is shown shortened


GOOD_VALUES: list[tuple[str, Any, Any]] = [
    ("hostname", "a" * 63, "a" * 63),
    ("hostname", "a" * 31 + "." + "b" * 32, "a" * 31 + "." + "b" * 32),  # 64 in all
    ("hostname", "x-1.Example-2.org", "x-1.Example-2.org"),
    ("hostname", "9", "9"),
    ("env", {"_A1": "x\ny=z"}, (("_A1", "x\ny=z"),)),
    ("memory", "1M", 1024 * 1024),
    ("memory", "1.5G", 3 * 512 * 1024 * 1024),
    ("memory", " 1024 KiB ", 1024 * 1024),
    ("memory", MEMORY_MAX, MEMORY_MAX),
    ("tmpfs_size", "64M", 64 * 1024 * 1024),
    ("cpus", 0.01, 0.01),
    ("cpus", "1024", 1024.0),
    ("pids", 1, 1),
    ("pids", PIDS_MAX, PIDS_MAX),
    ("pids", 64.0, 64),
    ("pids", "64", 64),
    ("timeout", TIMEOUT_MAX, float(TIMEOUT_MAX)),
    ("timeout", "0.5", 0.5),
    (
        "io",
        {"read_bps": IO_BPS_MAX, "write_iops": IO_IOPS_MAX},
        (("read_bps", IO_BPS_MAX), ("write_iops", IO_IOPS_MAX)),
    ),
    ("io", {"write_bps": "10M", "read_iops": 100.0}, (("read_iops", 100), ("write_bps", 10 * 1024 * 1024))),
]


@pytest.mark.parametrize(("field", "value", "expected"), GOOD_VALUES)
def test_validate_accepts_the_bounds(field: str, value: Any, expected: Any) -> None:
    assert getattr(validate({field: value}, "here"), field) == expected


def test_writable_symlink_into_a_forbidden_place_is_refused(tmp_path: Path) -> None:
    for target in ("/proc", "/sys/fs/cgroup", "/dev/shm", "/"):
        link = tmp_path / target.replace("/", "_")
        link.symlink_to(target)
        with pytest.raises(pytest.UsageError, match=f"invalid writable='{link}': .* cannot be made writable"):
            validate({"writable": [str(link)]}, "here")


def test_writable_file_and_dangling_link_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    for name in ("file", "dangling", "missing"):
        with pytest.raises(pytest.UsageError, match="not an existing directory; allowed: existing directories"):
            validate({"writable": [str(tmp_path / name)]}, "here")


def test_writable_accepts_path_objects(tmp_path: Path) -> None:
    assert validate({"writable": [tmp_path]}, "here").writable == (os.path.realpath(tmp_path),)


def test_env_lines_refuse_a_name_twice() -> None:
    assert check_env_lines(["A=1", "B==2"], "ini") == (("A", "1"), ("B", "=2"))
    with pytest.raises(pytest.UsageError, match="ini: invalid env='A=2': A is set twice"):
        check_env_lines(["A=1", "A=2"], "ini")


def test_shown_bounds_what_an_error_repeats() -> None:
    assert shown("x") == "'x'"
    assert shown(10**5000) == "<an int of 16610 bits>"
    assert shown({"k": 10**5000}) == "<a dict too large to show>"
    long = shown("y" * 1000)
    assert len(long) <= 100 and long.startswith("'yyy") and "..." in long


# End to end: a bad marker value stops the run before any test, naming the test and the field.
BAD_MARKERS = [
    ("pids", 'float("inf")'),
    ("pids", 'float("nan")'),
    ("pids", "10**400"),
    ("pids", "2**63"),
    ("pids", '"1e999"'),
    ("timeout", 'float("inf")'),
    ("timeout", 'float("nan")'),
    ("timeout", "10**400"),
    ("timeout", "2**63"),
    ("io", '{"read_bps": 10**400}'),
    ("io", '{"read_iops": float("nan")}'),
    ("io", '{"write_iops": 2**63}'),
    ("memory", "10**400"),
    ("memory", "2**63"),
    ("memory", '"1e999"'),
    ("memory", "True"),
    ("cpus", 'float("inf")'),
    ("cpus", "-1"),
    ("cpus", "True"),
    ("hostname", '"host\\n"'),
    ("hostname", '"a" * 65'),
    ("env", '{"A\\n": "x"}'),
    ("env", '{"A=B": "x"}'),
    ("env", '{"A\\0": "x"}'),
    ("env", '{"A": "x\\0"}'),
    ("writable", '["/nonexistent-dir-of-pytest-sandbox"]'),
    ("writable", '["/etc/hostname"]'),
    ("writable", '["/tmp\\x00x"]'),
    ("writable", '["//"]'),
    ("writable", '["/proc"]'),
    ("writable", '["/sys"]'),
    ("writable", '["/sys/fs/cgroup/"]'),
    ("writable", '["/dev"]'),
    ("writable", '["/dev/./shm"]'),
    ("writable", '[str(pathlib.Path(__file__).parent / "to_proc")]'),
    ("image", '"busybox\\n"'),
]


@pytest.mark.parametrize(("field", "source"), BAD_MARKERS, ids=[f"{f}={s}" for f, s in BAD_MARKERS])
def test_bad_marker_value_stops_the_run(pytester: pytest.Pytester, field: str, source: str) -> None:
    (pytester.path / "to_proc").symlink_to("/proc")
    pytester.makepyfile(
        test_bad=f"""
        import pathlib, pytest

        def test_first():
            pathlib.Path(__file__).with_name("ran").touch()

        @pytest.mark.container({field}={source})
        def test_it():
            pathlib.Path(__file__).with_name("ran").touch()
    """
    )
    result = pytester.runpytest_subprocess("test_bad.py")  # not the directory: pytest would walk into /proc
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: test_bad.py::test_it: @pytest.mark.container: invalid {field}=*: *"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert not (pytester.path / "ran").exists()  # no test ran, not even the unmarked one


# End to end: bad options, environment variables and ini keys, named in the error.
BAD_SETTINGS: list[tuple[list[str], dict[str, str], str, str]] = [
    (
        ["--sandbox-cgroup=../../../etc"],
        {},
        "",
        "--sandbox-cgroup: invalid cgroup='../../../etc': expected an absolute",
    ),
    (["--sandbox-cgroup=relative"], {}, "", "--sandbox-cgroup: invalid cgroup='relative'"),
    (["--sandbox-cgroup=/a/../../etc"], {}, "", "--sandbox-cgroup: invalid cgroup='/a/../../etc'"),
    (["--sandbox-cgroup=/a/./b"], {}, "", "--sandbox-cgroup: invalid cgroup='/a/./b'"),
    (["--sandbox-cgroup=/a\nb"], {}, "", "--sandbox-cgroup: invalid cgroup='/a\\nb'"),
    (["--sandbox-cgroup=/sys/fs/cgroup/x"], {}, "", "--sandbox-cgroup: invalid cgroup='/sys/fs/cgroup/x'"),
    ([], {"PYTEST_SANDBOX_CGROUP": "../../../etc"}, "", "$PYTEST_SANDBOX_CGROUP: invalid cgroup='../../../etc'"),
    ([], {}, "sandbox_cgroup = ../x", "ini sandbox_cgroup: invalid cgroup='../x'"),
    ([], {}, "sandbox_cgroup = /a\0b", "ini sandbox_cgroup: invalid cgroup='/a\\x00b'"),
    (["--sandbox-pids=1e999"], {}, "", "--sandbox-pids: invalid pids='1e999': expected a whole number"),
    (["--sandbox-pids=9223372036854775808"], {}, "", "--sandbox-pids: invalid pids='9223372036854775808'"),
    (["--sandbox-timeout=inf"], {}, "", "--sandbox-timeout: invalid timeout='inf'"),
    (["--sandbox-timeout=nan"], {}, "", "--sandbox-timeout: invalid timeout='nan'"),
    (
        ["--sandbox-memory=10000000000000000000000T"],
        {},
        "",
        "--sandbox-memory: invalid memory='10000000000000000000000T'",
    ),
    (["--sandbox-cpus=1e999"], {}, "", "--sandbox-cpus: invalid cpus='1e999'"),
    (["--sandbox-stress=timeout=inf"], {}, "", "--sandbox-stress: invalid timeout='inf'"),
    (["--sandbox-stress=pids=nan"], {}, "", "--sandbox-stress: invalid pids='nan'"),
    (["--sandbox-stress=memory=1e999"], {}, "", "--sandbox-stress: invalid memory='1e999'"),
    (["--sandbox-stress=cpus=1,cpus=2"], {}, "", "--sandbox-stress: invalid 'cpus=2': cpus is given twice"),
    (["--sandbox-stress=cpus=1,"], {}, "", "--sandbox-stress: invalid ''; expected NAME=VALUE"),
    ([], {}, "sandbox_timeout = inf", "ini sandbox_timeout: invalid timeout='inf'"),
    ([], {}, "sandbox_pids = 1e999", "ini sandbox_pids: invalid pids='1e999'"),
    ([], {}, "sandbox_hostname = host.", "ini sandbox_hostname: invalid hostname='host.'"),
    ([], {}, "sandbox_writable = /proc", "ini sandbox_writable: invalid writable='/proc': /proc and everything under"),
    ([], {}, "sandbox_writable = //", "ini sandbox_writable: invalid writable='//': the whole root"),
    ([], {}, "sandbox_writable = /nonexistent-x", "ini sandbox_writable: invalid writable='/nonexistent-x': not an"),
    ([], {}, "sandbox_env =\n  A=1\n  A=2", "ini sandbox_env: invalid env='A=2': A is set twice"),
    ([], {}, "sandbox_env = A\nB=1", "ini sandbox_env: invalid env='A'"),
    ([], {}, "sandbox_store = /tmp/a\0b", "ini sandbox_store: invalid store="),
    ([], {}, "sandbox_images = a\0b", "ini sandbox_images: invalid images="),
]


@pytest.mark.parametrize(
    ("args", "env", "ini", "message"),
    BAD_SETTINGS,
    ids=[m.split(":")[0] + str(i) for i, (*_, m) in enumerate(BAD_SETTINGS)],
)
def test_bad_setting_stops_the_run(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    ini: str,
    message: str,
) -> None:
    monkeypatch.delenv("PYTEST_SANDBOX_CGROUP", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(
        """
        import pathlib, pytest

        @pytest.mark.container
        def test_it():
            pathlib.Path(__file__).with_name("ran").touch()
        """
    )
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert not (pytester.path / "ran").exists()


def test_a_well_formed_cgroup_path_that_does_not_exist_falls_back_to_rlimits(pytester: pytest.Pytester) -> None:
    """Only malformed paths are errors; a missing cgroup is the host's business (header and limit warning say so)."""
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(  # where each test's sandbox is made: on the host's side
        "--sandbox=all", "--sandbox-collection=host", "--sandbox-cgroup=/no-such-cgroup-of-pytest-sandbox"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox limits: rlimits*/no-such-cgroup-of-pytest-sandbox*"])
