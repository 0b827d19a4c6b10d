"""Validation of marker keywords, ini keys and options: clear errors before anything runs."""

from __future__ import annotations

import pytest

from pytest_sandbox.spec import SandboxSpec, validate


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("hostname='bad host!'", "test_bad.py::test_it: @pytest.mark.container: invalid hostname='bad host!'"),
        ("network='bridge'", "invalid network='bridge': allowed: 'none', 'host'"),
        ("writable='relative/dir'", "invalid writable='relative/dir': expected a list of absolute paths"),
        ("writable=['relative']", "invalid writable='relative': each entry must be an absolute path"),
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
        (["--sandbox=sometimes"], "", "--sandbox: invalid value 'sometimes'; allowed: marked, all, off"),
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


def test_validate_normalizes() -> None:
    spec = validate({"writable": ["/b", "/a/../a", "/b"], "env": {"Z": "1", "A": "2"}}, "here")
    assert spec.writable == ("/a", "/b")
    assert spec.env == (("A", "2"), ("Z", "1"))
    assert hash(spec) == hash(validate({"writable": ("/a", "/b"), "env": {"A": "2", "Z": "1"}}, "there"))


def test_writable_root_refused() -> None:
    with pytest.raises(pytest.UsageError, match="the whole root cannot be made writable"):
        validate({"writable": ["/"]}, "here")
