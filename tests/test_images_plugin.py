"""End to end: tests marked with image= (pytester runs in a subprocess), --sandbox-keep, shell and commit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, wait_gone
from oci_inputs import BUSYBOX

pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")

TOOLS = """
FROM busybox                     # another image of images/
COPY fixtures/ /srv/fixtures/
RUN mkdir -p /var/lib/app && echo ready > /var/lib/app/state
ENV APP_MODE=test
WORKDIR /srv
"""


@pytest.fixture
def project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> pytest.Pytester:
    """A pytester dir with images/ (busybox and the README's tools) and its own image store."""
    images = pytester.path / "images"
    (images / "fixtures").mkdir(parents=True)
    (images / "tools.Containerfile").write_text(TOOLS)
    (images / "fixtures" / "greeting").write_text("hello\n")
    store = tmp_path_factory.mktemp("store")  # outside the test tree, where collection would walk into it
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(store))
    return pytester


def store_of(project: pytest.Pytester) -> Path:
    return Path(os.environ["PYTEST_SANDBOX_STORE"])


def cli(project: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=project.path, timeout=60)


def test_readme_example_and_a_fresh_layer_per_test(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import os, pytest

        @pytest.mark.container(image="tools")
        def test_in_image(sandbox):
            r = sandbox.run(["sh", "-c", "cat /var/lib/app/state; echo $APP_MODE"])
            assert r.stdout == "ready\\ntest\\n"
            assert sandbox.run("pwd; cat fixtures/greeting; id -u").stdout == "/srv\\nhello\\n0\\n"
            sandbox.run("echo written > /srv/new && rm /var/lib/app/state", check=True)
            assert sandbox.run("cat /srv/new; ls /var/lib/app").stdout == "written\\n"
            assert open(sandbox.path("/srv/new")).read() == "written\\n"
            with open(sandbox.path("/srv/from-test"), "w") as f:
                f.write("from the test\\n")
            assert sandbox.run("cat /srv/from-test").stdout == "from the test\\n"
            assert sandbox.image == "tools" and sandbox.config["WorkingDir"] == "/srv"

        @pytest.mark.container(image="tools")
        def test_next_test_gets_a_fresh_layer(sandbox):
            assert not os.path.exists(sandbox.path("/srv/new"))
            assert sandbox.run("cat /var/lib/app/state").stdout == "ready\\n"

        @pytest.mark.container(image="tools")
        def test_exit_status_and_input(sandbox):
            r = sandbox.run("read x; echo got $x; exit 7", input="line\\n")
            assert (r.returncode, r.stdout) == (7, "got line\\n")
            with pytest.raises(Exception, match="no such command"):
                sandbox.run(["no-such-tool"])

        @pytest.mark.container
        def test_without_image_says_how(sandbox):
            with pytest.raises(Exception, match=r"use @pytest.mark.container\\(image=NAME\\)"):
                sandbox.run("true")
    """)
    result = project.runpytest_subprocess("-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*sandbox image: building image tools*", "*image tools: 5 layers*"])
    again = project.runpytest_subprocess()
    again.assert_outcomes(passed=4)
    assert "sandbox image" not in again.stdout.str()  # all cached: not a word


def test_isolation_of_image_commands(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest, socket

        @pytest.mark.container(image="busybox", hostname="imgbox", env={"FROM_SPEC": "yes"})
        def test_namespaces(sandbox):
            out = sandbox.run("hostname; echo $FROM_SPEC; cat /proc/1/cmdline | tr '\\\\0' ' '; echo; "
                              "ls /dev | tr '\\\\n' ' '").stdout.splitlines()
            assert out[0] == "imgbox" and out[1] == "yes"
            assert out[2].startswith("/bin/sh -c")  # the command is pid 1 of its own pid namespace
            assert "null" in out[3] and "sda" not in out[3] and "vda" not in out[3]
            assert sandbox.run("touch /sys/x").returncode != 0  # /sys is read-only

        @pytest.mark.container(image="busybox")
        def test_shares_the_test_network(sandbox):
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            proc = sandbox.spawn(["sh", "-c", f"echo hi | nc 127.0.0.1 {port}"])
            conn, _ = server.accept()
            assert conn.recv(10) == b"hi\\n"
            conn.close()
            assert proc.wait(timeout=10) == 0
    """)
    project.runpytest_subprocess().assert_outcomes(passed=2)


def test_commands_end_on_terminate_and_switch_users(project: pytest.Pytester) -> None:
    """As root they go through the sandbox's launcher (its waiter forwards a signal as a kill), as a plain
    user the test's own child starts them: both stop on terminate() and take stdin; user= is the plain
    user's own id under another number, and an error for root, whose commands have uid 0 alone."""
    project.makepyfile("""
        import os, pytest, signal

        @pytest.mark.container(image="busybox")
        def test_terminate(sandbox):
            proc = sandbox.spawn(["sh", "-c", "echo up; exec sleep 300"], stdout=__import__("subprocess").PIPE)
            assert proc.stdout.readline() == b"up\\n"
            proc.terminate()
            assert proc.wait(timeout=10) == 128 + signal.SIGKILL
            assert sandbox.run(["cat"], input="through stdin").stdout == "through stdin"

        @pytest.mark.container(image="busybox")
        def test_users(sandbox):
            assert sandbox.run("id -u").stdout == "0\\n"
            if os.getuid() == 0:  # its commands' namespace maps uid 0 alone
                with pytest.raises(Exception, match="a root test's commands run as root only"):
                    sandbox.run("id -u", user="1234:99")
            else:  # the user's one id is the image's user
                assert sandbox.run("id -u; id -g", user="1234:99").stdout == "1234\\n99\\n"
    """)
    project.runpytest_subprocess().assert_outcomes(passed=2)


def test_spawned_commands_do_not_outlive_the_test(project: pytest.Pytester, token: str) -> None:
    project.makepyfile(f"""
        import pytest

        @pytest.mark.container(image="busybox")
        def test_leaves_a_sleeper(sandbox):
            sandbox.spawn(["sh", "-c", "sleep 300 # {token}"])
            sandbox.spawn(["sh", "-c", "(sleep 300 # {token}) &"])
    """)
    project.runpytest_subprocess().assert_outcomes(passed=1)
    assert wait_gone(token) == []


def test_bad_image_input_stops_before_any_test(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.container(image="ghost")
        def test_a(): pass
    """)
    result = project.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad_image_input_stops_before_any_test.py::test_a: image='ghost': no image*"])
    (project.path / "images" / "broken.Containerfile").write_text("FROM busybox\nVOLUME /data\n")
    project.makepyfile(
        test_b="""
        import pytest

        @pytest.mark.container(image="broken")
        def test_b(): pass
    """,
        test_c="""
        import pytest

        @pytest.mark.container(image="Not Valid")
        def test_c(): pass
    """,
    )
    result = project.runpytest_subprocess("test_b.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_b.py::test_b: image='broken': *broken.Containerfile:2: unsupported instruction 'VOLUME'*"]
    )
    result = project.runpytest_subprocess("test_c.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_c.py::test_c: @pytest.mark.container: invalid image='Not Valid'*"])


def test_a_failing_build_fails_only_its_tests(project: pytest.Pytester) -> None:
    (project.path / "images" / "failing.Containerfile").write_text("FROM busybox\nRUN echo nope >&2; exit 4\n")
    project.makepyfile("""
        import pytest

        @pytest.mark.container(image="failing")
        def test_needs_it(): pass

        def test_other(): pass
    """)
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*image 'failing' cannot be built*failing.Containerfile:2: RUN*exit status 4*"])


def test_keep_failed_then_shell_and_commit(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.container(image="tools")
        def test_breaks_things(sandbox):
            sandbox.run("echo evidence > /srv/evidence; rm /var/lib/app/state", check=True)
            assert False, "boom"

        @pytest.mark.container(image="tools")
        def test_passes(sandbox):
            sandbox.run("echo fine > /srv/fine", check=True)
    """)
    result = project.runpytest_subprocess("--sandbox-keep=failed")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*read/write layer kept as * pytest-sandbox shell *"])
    listing = cli(project, "containers").stdout.splitlines()
    assert len(listing) == 2 and "test_breaks_things" in listing[1]  # the passing test's layer is gone
    cid = listing[1].split()[0]
    store = store_of(project) / "containers"
    assert sorted(os.listdir(store)) == [cid]  # no session dir left either
    shell = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "shell", cid],
        input="cat /srv/evidence; ls /var/lib/app; test -e /srv/fine || echo no-fine\n",
        capture_output=True,
        text=True,
        cwd=project.path,
        timeout=60,
    )
    assert shell.stdout == "evidence\nno-fine\n", shell.stderr
    assert cli(project, "commit", cid, "after-failure").returncode == 0
    project.makepyfile("""
        import pytest

        @pytest.mark.container(image="after-failure")
        def test_committed_state(sandbox):
            assert sandbox.run("cat /srv/evidence; ls /var/lib/app; pwd").stdout == "evidence\\n/srv\\n"
    """)
    project.runpytest_subprocess().assert_outcomes(passed=1)
    # prune spares what a kept container stands on, even when no image names it any more
    for name in ("tools", "busybox", "after-failure"):
        assert cli(project, "images", "rm", name).returncode == 0
    assert cli(project, "images", "prune").returncode == 0
    assert cli(project, "shell", cid, "sh", "-c", "cat /srv/evidence").stdout == "evidence\n"
    assert cli(project, "containers", "prune").stdout == "removed 1 kept containers\n"
    assert os.listdir(store) == []
    assert "removed 5 unused layers" in cli(project, "images", "prune").stdout


def test_without_keep_nothing_is_left_on_disk(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.container(image="busybox")
        def test_fails(sandbox):
            sandbox.run("echo x > /x", check=True)
            assert False
    """)
    project.runpytest_subprocess().assert_outcomes(failed=1)
    store = store_of(project)
    assert os.listdir(store / "containers") == [] and os.listdir(store / "tmp") == []


def test_xdist_workers_build_an_image_once(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    (project.path / "images" / "slow.Containerfile").write_text("FROM busybox\nRUN sleep 1; echo ok > /ok\n")
    project.makepyfile("""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.container(image="slow")
        def test_uses_it(sandbox, n):
            assert sandbox.run("cat /ok").stdout == "ok\\n"
    """)
    project.runpytest_subprocess("-n", "2").assert_outcomes(passed=4)
    layers = os.listdir(store_of(project) / "layers")
    assert len(layers) == 4  # busybox 3 + slow 1: a second RUN (new mtimes) would be a fifth


HOST_BASED = """
FROM host
RUN mkdir -p /opt/extra && printf 'VALUE = 42\\n' > /opt/extra/extramod.py && rm -rf /opt/extra/gone
COPY payload.txt /srv/payload.txt
ENV PYTHONPATH=/opt/extra MODE=img
"""


def add_host_based_image(project: pytest.Pytester) -> None:
    (project.path / "images" / "hosty.Containerfile").write_text(HOST_BASED)
    (project.path / "images" / "payload.txt").write_text("payload\n")


def test_from_host_image_runs_the_test_inside(project: pytest.Pytester) -> None:
    add_host_based_image(project)
    project.makepyfile("""
        import os, sys, pytest

        @pytest.mark.container(image="hosty")
        def test_inside(sandbox):
            assert sandbox.root == "/"
            assert os.environ["MODE"] == "img"
            sys.path.insert(0, "/opt/extra")
            import extramod
            assert extramod.VALUE == 42
            assert open("/srv/payload.txt").read() == "payload\\n"
            out = sandbox.run([sys.executable, "-c", "import extramod, os; print(extramod.VALUE, os.environ['MODE'])"])
            assert out.stdout == "42 img\\n", out.stderr
            with open("/opt/extra/written", "w") as f:
                f.write("by the test")

        @pytest.mark.container(image="hosty")
        def test_fresh_layer(sandbox):
            assert not os.path.exists("/opt/extra/written")

        def test_host_untouched():
            assert not os.path.exists("/opt/extra") and not os.path.exists("/srv/payload.txt")
    """)
    project.runpytest_subprocess().assert_outcomes(passed=3)
    run = cli(project, "run", "hosty", "sh", "-c", "cat /srv/payload.txt; echo $MODE")
    assert run.stdout == "payload\nimg\n", run.stderr
    export = cli(project, "images", "export", "hosty", str(project.path / "x.tar"))
    assert export.returncode == 2 and "built FROM host" in export.stderr


def test_from_host_keep_shell_commit(project: pytest.Pytester) -> None:
    add_host_based_image(project)
    project.makepyfile("""
        import os, pytest

        @pytest.mark.container(image="hosty")
        def test_breaks(sandbox):
            os.remove("/opt/extra/extramod.py")
            with open("/srv/evidence", "w") as f:
                f.write("evidence\\n")
            assert False
    """)
    project.runpytest_subprocess("--sandbox-keep=failed").assert_outcomes(failed=1)
    cid = cli(project, "containers").stdout.splitlines()[1].split()[0]
    shell = cli(project, "shell", cid, "sh", "-c", "cat /srv/evidence; ls /opt/extra; echo end")
    assert shell.stdout == "evidence\nend\n", shell.stderr
    assert cli(project, "commit", cid, "hosty-after").returncode == 0
    again = cli(project, "run", "hosty-after", "sh", "-c", "cat /srv/evidence /srv/payload.txt; ls /opt/extra")
    assert again.stdout == "evidence\npayload\n", again.stderr


def test_from_host_cannot_change_new_top_level_dirs(project: pytest.Pytester) -> None:
    (project.path / "images" / "newtop.Containerfile").write_text("FROM host\nCOPY payload.txt /newtop/x\n")
    (project.path / "images" / "payload.txt").write_text("payload\n")
    result = cli(project, "images", "build", "newtop")
    assert result.returncode == 2
    assert "can only change directories under the host's existing top-level directories, not /newtop" in result.stderr


def test_volumes_in_an_image_test(project: pytest.Pytester) -> None:
    """An image test's volumes are where its commands run; an empty named volume over an image directory
    starts with the image's content there, and what the commands write there persists."""
    (project.path / "given").mkdir()
    (project.path / "given" / "input").write_text("from the host\n")
    project.makepyfile(
        test_vol="""
        import pytest

        @pytest.mark.container(image="tools", volumes={"appdata": "/var/lib/app", "./given": "/srv/given:ro"})
        def test_first(sandbox):
            assert sandbox.run("cat /var/lib/app/state /srv/given/input").stdout == "ready\\nfrom the host\\n"
            sandbox.run("echo more >> /var/lib/app/state", check=True)
            assert sandbox.run("touch /srv/given/x").returncode != 0

        @pytest.mark.container(image="tools", volumes={"appdata": "/var/lib/app"})
        def test_second_sees_it(sandbox):
            assert sandbox.run("cat /var/lib/app/state").stdout == "ready\\nmore\\n"
    """
    )
    project.runpytest_subprocess().assert_outcomes(passed=2)
    assert (store_of(project) / "volumes" / "appdata" / "data" / "state").read_text() == "ready\nmore\n"
    assert os.listdir(project.path / "given") == ["input"]
