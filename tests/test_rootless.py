"""The rootless path for real: run by the unprivileged CI lane (deselected as root, where it would prove nothing)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.rootless


def test_not_root() -> None:
    assert os.getuid() != 0 and os.geteuid() != 0


def test_sandbox_as_plain_user(pytester: pytest.Pytester) -> None:
    uid = os.getuid()
    pytester.makepyfile(f"""
        import os, errno, pytest

        @pytest.mark.container
        def test_identity_and_permissions(tmp_path):
            assert os.getuid() == {uid} != 0
            with open("/proc/1/comm") as f:
                assert f.read().strip() == "sandbox-init"  # a pid namespace of its own
            ro = tmp_path / "ro.txt"
            ro.write_text("x")
            ro.chmod(0o444)
            # no capabilities inside: a read-only file stays read-only, as outside
            with pytest.raises(PermissionError):
                open(ro, "w")
            with pytest.raises(OSError) as info:
                os.chown(ro, 0, 0)
            assert info.value.errno in (errno.EPERM, errno.EINVAL)
            with open("/proc/self/status") as f:
                caps = dict(line.split(":\\t") for line in f.read().splitlines() if line.startswith("Cap"))
            assert int(caps["CapEff"], 16) == 0
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_root_only_paths_stay_closed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.container
        def test_shadow():
            with pytest.raises(PermissionError):
                open("/etc/shadow").read()
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_image_commands_as_plain_user(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without root the caller is the image's root (or its USER) inside, and owns every file outside."""

    from oci_inputs import BUSYBOX

    if BUSYBOX is None:
        pytest.skip("host lacks a static busybox (apt install busybox-static)")
    store = tmp_path_factory.mktemp("store")
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    (pytester.path / "images").mkdir()
    (pytester.path / "images" / "asnobody.Containerfile").write_text(
        "FROM busybox\nRUN mkdir /data && chown 65534:65534 /data || true\nUSER nobody\n"
    )
    uid = os.getuid()
    pytester.makepyfile(f"""
        import os, pytest

        @pytest.mark.container(image="busybox")
        def test_root_inside(sandbox):
            assert os.getuid() == {uid}
            assert sandbox.run("id -u; echo made > /made").stdout == "0\\n"
            assert os.stat(sandbox.path("/made")).st_uid == {uid}
            assert sandbox.run("chown 1234 /made").returncode != 0  # only one id is mapped

        @pytest.mark.container(image="asnobody")
        def test_image_user(sandbox):
            assert sandbox.run("id -u").stdout == "65534\\n"
            assert sandbox.run("id -u", user="root").stdout == "0\\n"
    """)
    pytester.runpytest_subprocess("--sandbox-keep=failed").assert_outcomes(passed=2)
