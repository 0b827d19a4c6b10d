"""Limits that work on every host, whatever the backend: validation, timeouts, rlimits, reporting."""

from __future__ import annotations

import os

import pytest

from pytest_sandbox.runtime import cgroups


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("memory='lots'", "invalid memory='lots': expected a size from 1M"),
        ("memory=-5", "invalid memory=-5"),
        ("cpus=0", "invalid cpus=0: expected a number of CPUs from 0.01 to 1024"),
        ("cpus='fast'", "invalid cpus='fast'"),
        ("pids=2.5", "invalid pids=2.5: expected a whole number of processes"),
        ("timeout=-1", "invalid timeout=-1: expected a number of seconds greater than 0"),
        ("io={'read_mbps': '1M'}", "invalid io='read_mbps': unknown io key; allowed: read_bps, write_bps"),
        ("io={'read_bps': 'x'}", "invalid io={'read_bps': 'x'}: expected a size like '10M'"),
    ],
)
def test_bad_limit_is_a_usage_error(pytester: pytest.Pytester, marker: str, message: str) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.container({marker})
        def test_it():
            pass
    """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*test_bad.py::test_it*{message}*"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sandbox-memory=lots"], "--sandbox-memory: invalid memory='lots'"),
        (["--sandbox-stress=cpu=0.2"], "--sandbox-stress: invalid 'cpu=0.2'"),
        (["--sandbox-repeat=0"], "--sandbox-repeat: invalid value 0"),
        (["--sandbox-cgroup-backend=v3"], "--sandbox-cgroup-backend: invalid value 'v3'"),
        (["--sandbox-limits=maybe"], "--sandbox-limits: invalid value 'maybe'"),
    ],
)
def test_bad_limit_option(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_timeout_dumps_stack_and_kills_the_tree(pytester: pytest.Pytester, token: str) -> None:
    from helpers import wait_gone

    pytester.makepyfile(f"""
        import subprocess, sys, time, pytest

        def helper_that_sleeps():
            time.sleep(60)

        @pytest.mark.container(timeout=1)
        def test_sleepy():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {token!r}])
            helper_that_sleeps()

        @pytest.mark.container
        def test_next():
            pass
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*timeout after 1 s*", "*Timeout (0:00:01)!*", "*in helper_that_sleeps*", "*in test_sleepy*"]
    )
    assert wait_gone(token, timeout=2) == []


def test_timeout_from_option_covers_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest

        @pytest.fixture
        def slow_setup():
            time.sleep(60)

        def test_uses_it(slow_setup):
            pass
    """)
    result = pytester.runpytest_subprocess("--sandbox=all", "--sandbox-timeout=1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_uses_it*", "*timeout after 1 s*", "*in slow_setup*"])


def test_rlimit_backend_limits_memory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(memory="64M")
        def test_too_big():
            with pytest.raises(MemoryError):
                bytearray(256 * 1024 * 1024)
            small = bytearray(16 * 1024 * 1024)
            assert len(small)
    """)
    result = pytester.runpytest_subprocess("--sandbox-cgroup-backend=rlimit", "-W", "error::pytest.PytestWarning")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox limits: rlimits*"])


def test_unenforceable_limits_warn_or_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container(cpus=0.5, pids=32)
        def test_limited():
            pass
    """)
    warned = pytester.runpytest_subprocess("--sandbox-cgroup-backend=rlimit")
    warned.assert_outcomes(passed=1, warnings=1)
    warned.stdout.fnmatch_lines(
        [
            "test_unenforceable_limits_warn_or_fail.py::test_limited",
            "*test_unenforceable_limits_warn_or_fail.py:3: "
            "PytestWarning: pytest-sandbox: rlimits*cannot enforce cpus, pids; this test runs without*",
        ]
    )
    # filterwarnings = error makes it the test's error, not pytest's (no INTERNALERROR)
    erroring = pytester.runpytest_subprocess("--sandbox-cgroup-backend=rlimit", "-W", "error::pytest.PytestWarning")
    erroring.assert_outcomes(errors=1)
    erroring.stdout.fnmatch_lines(["*PytestWarning: pytest-sandbox: rlimits*cannot enforce cpus, pids*"])
    strict = pytester.runpytest_subprocess("--sandbox-cgroup-backend=rlimit", "--sandbox-limits=strict")
    assert strict.ret == pytest.ExitCode.USAGE_ERROR
    strict.stderr.fnmatch_lines(["*cannot enforce cpus*sandbox_limits=strict makes this an error*"])


def test_repeat_tabulates_failures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, pytest

        def test_flaky(sandbox_run):
            assert sandbox_run % 3 != 0, f"unlucky run {sandbox_run % 2}"

        def test_solid():
            assert os.getpid() == 2
    """)
    result = pytester.runpytest_subprocess("--sandbox-repeat=6")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=10, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*sandbox repeat: 6 runs per test, each in a fresh sandbox*",
            "*6      2    33%  test_repeat_tabulates_failures.py::test_flaky",
            "*1 x call: AssertionError: unlucky run 1*",
            "*1 x call: AssertionError: unlucky run 0*",
            "*6      0     0%  test_repeat_tabulates_failures.py::test_solid",
        ]
    )


def test_accounting_in_junitxml_and_durations(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_allocates():
            data = bytearray(32 * 1024 * 1024)
            for i in range(0, len(data), 4096):
                data[i] = 1
    """)
    result = pytester.runpytest_subprocess("--sandbox=all", "--sandbox-durations=5", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*sandbox resources*", "*peak mem*cpu user*", "*test_allocates"])
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="sandbox_memory_peak"' in xml and 'name="sandbox_cpu_user"' in xml


def test_header_names_the_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess()
    backend = cgroups.choose("auto", os.environ.get("PYTEST_SANDBOX_CGROUP"), str(pytester.path))
    result.stdout.fnmatch_lines([f"sandbox limits: {backend.name}*"])


def test_full_scratch_place_says_which(pytester: pytest.Pytester) -> None:
    """Every tmpfs of a sandbox is bounded (half the memory limit here): the test gets ENOSPC, not the
    OOM killer, and its report names the place that filled up."""
    pytester.makepyfile("""
        import os, pytest

        def fill(path):
            with open(path, "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))

        @pytest.mark.container(memory="64M")
        def test_fills_tmp():
            fill("/tmp/big")

        @pytest.mark.container(memory="64M")
        def test_fills_the_rootdir():
            fill(os.path.join(os.getcwd(), "big"))

        @pytest.mark.container(tmpfs_size="8M")
        def test_fills_a_smaller_tmp():
            fill("/dev/shm/big")
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*OSError: [[]Errno 28[]] No space left on device*",
            "*- sandbox scratch -*",
            "/tmp is full: its tmpfs holds 32 MiB",
            "*OSError: [[]Errno 28[]] No space left on device*",
            "*- sandbox scratch -*",
            f"*{pytester.path}* full: * tmpfs holds 32 MiB",
            "*more room: tmpfs_size= in the marker, --sandbox-tmpfs-size or the sandbox_tmpfs_size ini key*",
            "*OSError: [[]Errno 28[]] No space left on device*",
            "*- sandbox scratch -*",
            "/dev/shm is full: its tmpfs holds 8 MiB",
        ]
    )
    assert not (pytester.path / "big").exists()
