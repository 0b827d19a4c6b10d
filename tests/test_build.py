"""Containerfile builds: parsing errors, the step cache, RUN in a sandbox, concurrent and killed builders."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import run_cli
from oci_inputs import BUSYBOX

from pytest_sandbox.layers import build, containerfile
from pytest_sandbox.layers.store import Store, StoreError

pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="host lacks a static busybox (apt install busybox-static)")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    return tmp_path


def write(project: Path, name: str, text: str) -> Path:
    path = project / "images" / f"{name}.Containerfile"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def cli(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=project, store=project / "store", timeout=timeout)


def built(project: Path, name: str, lines: list[str] | None = None) -> tuple[Store, build.Builder]:
    store = Store(str(project / "store"))
    builder = build.Builder(store, str(project / "images"), (lines if lines is not None else []).append)
    builder.build(name)
    return store, builder


def run(project: Path, image: str, script: str) -> str:
    result = cli(project, "run", image, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout


TOOLS = """
    FROM busybox
    ARG GREETING=hi
    COPY fixtures/ /srv/fixtures/
    COPY --chmod=0755 fixtures/tool.sh /usr/local/bin/tool
    RUN mkdir -p /var/lib/app && echo ready > /var/lib/app/state && echo "$GREETING" > /var/lib/app/greeting
    RUN rm -rf /home && mkdir /home && echo fresh > /home/marker
    ENV APP_MODE=test PATH=/usr/local/bin:/bin
    WORKDIR /srv/work
    LABEL org.example.team="qa" purpose=tests
    EXPOSE 8080 53/udp
    USER nobody
    CMD ["sh", "-c", "echo default"]
"""


@pytest.fixture
def tools(project: Path) -> Path:
    fixtures = project / "images" / "fixtures"
    (fixtures / "sub").mkdir(parents=True)
    (fixtures / "data.txt").write_text("payload\n")
    (fixtures / "sub" / "nested.txt").write_text("nested\n")
    (fixtures / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    (fixtures / "secret.key").write_text("do not copy\n")
    (fixtures / "cache").mkdir()
    (fixtures / "cache" / "big.bin").write_text("x")
    (project / "images" / ".containerignore").write_text("# not part of images\nfixtures/*.key\nfixtures/cache\n")
    write(project, "tools", TOOLS)
    return project


def test_build_produces_the_image(tools: Path) -> None:
    store, _ = built(tools, "tools")
    image = store.require("tools")
    assert image.config["Env"] == ["PATH=/usr/local/bin:/bin", "APP_MODE=test"]
    assert image.config["WorkingDir"] == "/srv/work"
    assert image.config["User"] == "nobody"
    assert image.config["Labels"] == {"org.example.team": "qa", "purpose": "tests"}
    assert image.config["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert image.config["Cmd"] == ["sh", "-c", "echo default"]
    script = (
        "cat /var/lib/app/state /var/lib/app/greeting /srv/fixtures/data.txt /srv/fixtures/sub/nested.txt; "
        "ls -a /srv/fixtures | tr '\\n' ' '; echo; pwd; id -u; tool; stat -c %a /usr/local/bin/tool; "
        "cat /home/marker; echo $APP_MODE"
    )
    assert run(tools, "tools", script) == (
        "ready\nhi\npayload\nnested\n. .. data.txt sub tool.sh \n/srv/work\n65534\ntool ran\n755\nfresh\ntest\n"
    )
    assert run(tools, "tools", "") == ""  # an explicit empty script, not the default command
    assert cli(tools, "run", "tools").stdout == "default\n"


def test_second_build_is_all_cached_and_an_edit_rebuilds_from_there(tools: Path) -> None:
    first: list[str] = []
    built(tools, "tools", first)
    assert sum("done in" in line for line in first) >= 5
    again: list[str] = []
    store, _ = built(tools, "tools", again)
    steps = [line for line in again if "step" in line and ": FROM " not in line]  # FROM (step 1) heads the rest
    assert steps and all("cached" in line for line in steps), again
    assert not any("done in" in line for line in again)
    before = store.require("tools").layers
    # edit the second RUN: the steps before it stay cached, it and later steps run again
    write(tools, "tools", TOOLS.replace("echo fresh", "echo edited"))
    edited: list[str] = []
    built(tools, "tools", edited)
    ran = [line for line in edited if "step" in line and "cached" not in line and ": FROM " not in line]
    assert ran[0].split(": ", 1)[1].startswith("RUN rm -rf /home"), edited
    assert all("cached" in line for line in edited if "COPY" in line or "mkdir -p /var/lib/app" in line)
    after = store.require("tools").layers
    # busybox's 3 layers, 2 COPY, the first RUN stay; the edited RUN and WORKDIR's layer on top are new
    assert len(after) == len(before) == 8
    assert after[:6] == before[:6] and after[6] != before[6]
    assert run(tools, "tools", "cat /home/marker") == "edited\n"


def test_copy_sources_are_part_of_the_key_and_ignored_files_are_not(tools: Path) -> None:
    built(tools, "tools")
    (tools / "images/fixtures/secret.key").write_text("changed, but ignored\n")
    (tools / "images/fixtures/cache/big.bin").write_text("also ignored")
    lines: list[str] = []
    built(tools, "tools", lines)
    assert not any("done in" in line for line in lines)
    (tools / "images/fixtures/data.txt").write_text("new payload\n")
    lines = []
    built(tools, "tools", lines)
    assert any("COPY fixtures/ /srv/fixtures/" in line and "cached" not in line for line in lines)
    assert run(tools, "tools", "cat /srv/fixtures/data.txt") == "new payload\n"


def test_build_arg_changes_the_run_step(tools: Path) -> None:
    result = cli(tools, "images", "build", "tools", "--build-arg", "GREETING=hello")
    assert result.returncode == 0, result.stderr
    assert run(tools, "tools", "cat /var/lib/app/greeting") == "hello\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("FROM busybox\nHEALTHCHECK CMD true\n", r"bad\.Containerfile:2: unsupported instruction 'HEALTHCHECK'"),
        ("FROM busybox\nFROM busybox\n", r":2: multi-stage builds"),
        ("RUN true\n", r":1: the first instruction must be FROM"),
        ("FROM busybox\nCOPY --from=builder /a /b\n", r":2: COPY --from= takes only 'host'"),
        ("FROM busybox\nRUN --mount=type=cache true\n", r":2: RUN: unsupported flag '--mount=type=cache'"),
        ("FROM busybox\nEXPOSE http\n", r":2: EXPOSE 'http'"),
        ("FROM busybox\nENV\n", r":2: ENV needs an argument"),
        ("# only a comment\n", r":1: empty Containerfile"),
    ],
)
def test_bad_containerfiles_name_file_and_line(project: Path, text: str, message: str) -> None:
    path = project / "images" / "bad.Containerfile"
    path.write_text(text)
    with pytest.raises(containerfile.ContainerfileError, match=message):
        containerfile.parse(text, str(path))
    result = cli(project, "images", "build", "bad")
    assert result.returncode == 2 and "bad.Containerfile" in result.stderr
    assert Store(str(project / "store")).get("bad") is None


def test_missing_base_and_missing_copy_source(project: Path) -> None:
    write(project, "orphan", "FROM nowhere\n")
    result = cli(project, "images", "build", "orphan")
    assert result.returncode == 2
    assert "orphan.Containerfile:1: FROM nowhere: no" in result.stderr and "scratch" in result.stderr
    write(project, "nocopy", "FROM busybox\nCOPY missing.txt /x\n")
    result = cli(project, "images", "build", "nocopy")
    assert result.returncode == 2 and "nocopy.Containerfile:2: COPY 'missing.txt': no such file" in result.stderr


def test_failed_run_names_the_line_and_publishes_nothing(project: Path) -> None:
    store, _ = built(project, "busybox")
    layers_before = sorted(os.listdir(store.layers_dir))
    write(
        project,
        "broken",
        """
        FROM busybox
        RUN echo about to fail >&2; mkdir /made-it
        RUN ls /no/such/dir
    """,
    )
    result = cli(project, "images", "build", "broken")
    assert result.returncode == 2
    assert "broken.Containerfile:3: RUN ls /no/such/dir failed with exit status 1" in result.stderr
    assert "No such file or directory" in result.stderr  # the command's own output is in the error
    assert store.get("broken") is None
    new_layers = set(os.listdir(store.layers_dir)) - set(layers_before)
    assert len(new_layers) == 1  # the step that worked is cached; the failed one left nothing
    assert os.listdir(store.tmp_dir) == []


def test_from_an_oci_archive_beside_the_containerfile(project: Path) -> None:
    built(project, "busybox")
    assert cli(project, "images", "export", "busybox", str(project / "images" / "bb.tar")).returncode == 0
    write(project, "derived", "FROM oci-archive:bb.tar\nRUN echo derived > /etc/derived\n")
    assert cli(project, "images", "build", "derived").returncode == 0
    assert run(project, "derived", "cat /etc/derived; echo $PATH") == "derived\n/bin\n"


def test_two_concurrent_builders_build_once(project: Path) -> None:
    write(project, "slow", "FROM busybox\nRUN sleep 1 && echo built > /built\n")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest_sandbox", "--store", str(project / "store"), "images", "build", "slow"],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [out.count("RUN sleep 1") - out.count("cached  slow") for out in outputs]
    assert sorted(o.count("done in") > 0 for o in outputs) == [False, True], outputs
    assert sum(1 for out in outputs if "cached  slow step 2/2" in out) == 1, ran
    assert run(project, "slow", "cat /built") == "built\n"


def test_kill_9_during_a_build_leaves_the_store_consistent(project: Path, token: str) -> None:
    built(project, "busybox")
    write(project, "killed", f"FROM busybox\nRUN echo {token} > /started; sleep 60; echo done > /x\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(project / "store"), "images", "build", "killed"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = Store(str(project / "store"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        (Path(store.tmp_dir) / d / "diff" / "started").exists() for d in os.listdir(store.tmp_dir)
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from helpers import wait_gone

    assert wait_gone(token) == []  # the RUN's processes died with the builder
    assert store.get("killed") is None
    # the next builder removes the dead one's staging dir and gets the lock at once
    write(project, "killed", "FROM busybox\nRUN echo done > /x\n")
    result = cli(project, "images", "build", "killed", timeout=60)
    assert result.returncode == 0, result.stderr
    assert os.listdir(store.tmp_dir) == []
    assert run(project, "killed", "cat /x") == "done\n"
    for entry in os.listdir(store.layers_dir):
        assert os.path.isfile(os.path.join(store.layers_dir, entry, "layer.json"))


def test_images_build_all_and_ls(tools: Path) -> None:
    result = cli(tools, "images", "build")
    assert result.returncode == 0, result.stderr
    listing = cli(tools, "images", "ls").stdout
    assert "busybox" in listing and "tools" in listing


def test_unknown_image_for_the_builder(project: Path) -> None:
    with pytest.raises(StoreError, match="no image 'ghost'"):
        build.Builder(Store(str(project / "store")), str(project / "images")).check("ghost")


@pytest.mark.parametrize(
    "legacy",
    [
        pytest.param(False, id="lowerdir+"),
        # Linux 6.1 in the guest has no lowerdir+: the option string for real (the other case adds nothing there)
        pytest.param(True, id="legacy-options", marks=pytest.mark.guest),
    ],
)
def test_an_image_of_150_layers(project: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsconfig(lowerdir+) where the kernel has it; the 4095-byte option string (short fd paths) elsewhere."""
    context = project / "images" / "many"
    context.mkdir()
    lines = ["FROM busybox"]
    for n in range(147):
        (context / f"f{n}").write_text(f"{n}\n")
        lines.append(f"COPY many/f{n} /layers/f{n}")
    lines.append("RUN rm /layers/f0")
    write(project, "many", "\n".join(lines) + "\n")
    if legacy:
        monkeypatch.setenv("PYTEST_SANDBOX_OVERLAY_LEGACY", "1")
    result = cli(project, "images", "build", "-q", "many")
    assert result.returncode == 0, result.stderr
    assert len(Store(str(project / "store")).require("many").layers) == 151
    assert run(project, "many", "ls /layers | wc -l; cat /layers/f1 /layers/f146") == "146\n1\n146\n"


def test_no_cache_runs_every_step_again(project: Path) -> None:
    write(project, "stamp", "FROM busybox\nRUN cat /proc/sys/kernel/random/uuid > /stamp\n")
    assert cli(project, "images", "build", "stamp").returncode == 0
    first = run(project, "stamp", "cat /stamp")
    cached = cli(project, "images", "build", "stamp")
    assert "done in" not in cached.stdout and run(project, "stamp", "cat /stamp") == first
    again = cli(project, "images", "build", "--no-cache", "stamp")
    assert again.returncode == 0 and "cached" not in again.stdout
    assert run(project, "stamp", "cat /stamp") != first


def test_builtin_busybox_and_what_overrides_it(project: Path, tmp_path: Path) -> None:
    """FROM busybox works in any project (shipped with pytest-sandbox); a project's own definition or an
    image imported under that name comes first."""
    assert build.builtin_definitions() == ["busybox", "hosttools"]
    write(project, "uses", "FROM busybox\nRUN echo built-in > /which\n")
    assert cli(project, "images", "build", "uses").returncode == 0
    assert run(project, "uses", "cat /which; ls /bin/sh") == "built-in\n/bin/sh\n"
    assert Store(str(project / "store")).require("busybox").source.endswith("busybox.Containerfile")
    # an image imported as "busybox" is what FROM busybox means from then on
    assert cli(project, "images", "export", "uses", str(tmp_path / "uses.tar")).returncode == 0
    refused = cli(project, "images", "import", f"oci-archive:{tmp_path / 'uses.tar'}", "busybox")
    assert refused.returncode == 2 and "not imported as busybox: an image busybox exists" in refused.stderr
    forced = cli(project, "images", "import", f"oci-archive:{tmp_path / 'uses.tar'}", "busybox", "--force")
    assert forced.returncode == 0 and "replaced: an image busybox exists" in forced.stderr, forced.stderr
    write(project, "uses2", "FROM busybox\nRUN cat /which\n")
    result = cli(project, "images", "build", "uses2")
    assert result.returncode == 0 and "| built-in" in result.stdout
    # and a project's own busybox.Containerfile beats both
    write(
        project,
        "busybox",
        'FROM scratch\nCOPY --from=host /bin/busybox /bin/busybox\nRUN ["/bin/busybox", "mkdir", "/own"]\n',
    )
    write(project, "uses3", 'FROM busybox\nRUN ["/bin/busybox", "ls", "-d", "/own"]\n')
    assert cli(project, "images", "build", "uses3").returncode == 0


def test_images_build_from_any_directory(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(store), "images", "build", "busybox"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    empty = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(store), "images", "build"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert empty.returncode == 2 and "no *.Containerfile in images" in empty.stderr


OVERLAY_STORE_SCRIPT = """
import os, sys
from pytest_sandbox.linux import syscalls as _linux, userns
from pytest_sandbox.layers import build
from pytest_sandbox.layers.store import Store

work, images = sys.argv[1], sys.argv[2]
userns.enter_user_namespace()
_linux.unshare(_linux.CLONE_NEWNS)
_linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
for d in ("lower", "upper", "work", "merged"):
    os.makedirs(f"{work}/{d}", exist_ok=True)
_linux.mount("overlay", f"{work}/merged", "overlay", 0,
             f"lowerdir={work}/lower,upperdir={work}/upper,workdir={work}/work,userxattr")
store = Store(f"{work}/merged/store")
assert store.filesystem() == "overlay", store.filesystem()
lines = []
image = build.Builder(store, images, lines.append).build("onoverlay")
print("\\n".join(lines))
diff = store.diff_path(image.layers[-1])
print("LAYER", sorted(os.listdir(diff)), open(f"{diff}/made/file").read().strip())
sys.stdout.flush()
from pytest_sandbox import cli
sys.exit(cli.main(["--store", store.root, "run", "onoverlay", "sh", "-c",
                   "test -e /root && echo root-still-there; cat /made/file; ls /bin/sh"]))
"""


@pytest.mark.guest  # Linux 6.1 there: no xattr whiteouts
def test_run_with_the_store_on_overlayfs(project: Path) -> None:
    """A store inside a container's overlayfs root: RUN's upper goes to a tmpfs and is copied out."""
    write(project, "onoverlay", "FROM busybox\nRUN mkdir /made && echo on-tmpfs > /made/file && rm -r /root\n")
    result = subprocess.run(
        [sys.executable, "-c", OVERLAY_STORE_SCRIPT, str(project / "ovl"), str(project / "images")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    from pytest_sandbox.layers import tarlayer

    if not tarlayer.xattr_whiteouts_supported():  # the deletion cannot be stored: a clear error instead
        assert result.returncode != 0 and "Linux < 6.8 has no xattr whiteouts" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert "LAYER ['made', 'root'] on-tmpfs" in result.stdout
    assert result.stdout.endswith("on-tmpfs\n/bin/sh\n")  # the deletion holds: an xattr whiteout on 6.8+


def test_busybox_on_a_host_without_busybox(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh host has no busybox: the name then stands for the host's own sh and coreutils."""
    monkeypatch.setattr(build, "host_busybox", lambda: None)
    lines: list[str] = []
    store, _ = built(project, "busybox", lines)
    assert store.require("busybox").source.endswith("hosttools.Containerfile")
    out = run(project, "busybox", "echo hi | cat; id -u; ls /bin/sh /bin/cat; test -e /bin/busybox || echo none")
    assert out == "hi\n0\n/bin/cat\n/bin/sh\nnone\n"


def test_copy_libs_brings_what_a_host_program_loads(project: Path) -> None:
    write(project, "justsh", 'FROM scratch\nCOPY --from=host --libs /bin/sh /usr/bin/env /bin/\nCMD ["/bin/sh"]\n')
    assert cli(project, "images", "build", "justsh").returncode == 0
    assert run(project, "justsh", "echo from $0; env -i A=1 env") == "from sh\nA=1\n"
    write(project, "badlibs", "FROM scratch\nCOPY --libs dir/ /x/\n")
    result = cli(project, "images", "build", "badlibs")
    assert result.returncode == 2 and "COPY --libs goes with --from=host" in result.stderr


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="host lacks skopeo (Debian: apt install skopeo)")
@pytest.mark.parametrize("kind", ["oci", "docker-archive", "oci-archive"])
def test_export_kinds_are_read_by_skopeo_and_by_us(project: Path, kind: str) -> None:
    built(project, "busybox")
    target = project / ("exported" if kind == "oci" else "exported.tar")
    result = cli(project, "images", "export", "busybox", f"{kind}:{target}")
    assert result.returncode == 0, result.stderr
    inspect = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", "--raw" if kind == "oci" else "--config", f"{kind}:{target}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    again = cli(project, "images", "import", str(target), "reimported")
    assert again.returncode == 0, again.stderr
    assert run(project, "reimported", "echo $PATH; ls /bin/sh") == "/bin\n/bin/sh\n"


def test_shell_in_a_throwaway_container_of_an_image(project: Path) -> None:
    built(project, "busybox")
    first = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox", "--store", str(project / "store"), "shell", "busybox"],
        input="echo made > /made; cat /made; hostname\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project,
    )
    assert first.stdout == "made\nsandbox\n", first.stderr
    assert run(project, "busybox", "test -e /made || echo gone") == "gone\n"  # thrown away
    missing = cli(project, "shell", "nothing-like-this")
    assert missing.returncode == 2 and "neither a kept container" in missing.stderr
