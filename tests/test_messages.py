"""What a new user sees: process names, image build progress, summaries, ^C locations (end to end)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import cast

import pytest
from helpers import start_pytest_until_running

from pytest_sandbox import reports


def test_sandbox_processes_have_readable_names(pytester: pytest.Pytester) -> None:
    """ps on the host shows sandbox-zygote, sandbox-init and sandbox-test, never an fd number."""
    pytester.makepyfile("""
        import os
        import pytest

        def _comm(pid):
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()

        @pytest.mark.container
        def test_inside():
            assert _comm(1) == "sandbox-init"
            with open("/proc/1/cmdline", "rb") as f:
                assert f.read() == b"sandbox-init\\0"
            assert _comm("self") == "sandbox-test"

        @pytest.mark.container
        def test_again():
            assert _comm(1) == "sandbox-init"

        def test_on_the_host():
            names = set()
            todo = [os.getpid()]
            while todo:
                parent = todo.pop()
                for entry in os.listdir("/proc"):
                    if entry.isdigit():
                        try:
                            with open(f"/proc/{entry}/stat") as f:
                                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                            if ppid == parent:
                                names.add(_comm(entry))
                                todo.append(int(entry))
                        except (OSError, ValueError):
                            pass
            assert "sandbox-zygote" in names, names
            assert not any(name.isdigit() for name in names), names
    """)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=3)


BASE = """
FROM scratch
COPY --from=host --libs /bin/busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""
APP = """
ARG BASE=base
FROM $BASE
RUN echo hello-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa > /x
ENV B=2
"""
ONE_LAYER = """
FROM scratch
COPY --from=host /bin/busybox /bin/busybox
"""
USES_IMAGES = """
    import pytest

    @pytest.mark.container(image="app")
    def test_app(sandbox):
        assert sandbox.run("cat /x").stdout.startswith("hello-")

    @pytest.mark.container(image="one")
    def test_one(sandbox):
        pass
"""


@pytest.fixture
def images(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> pytest.Pytester:
    (pytester.path / "images").mkdir()
    (pytester.path / "images" / "base.Containerfile").write_text(BASE)
    (pytester.path / "images" / "app.Containerfile").write_text(APP)
    (pytester.path / "images" / "one.Containerfile").write_text(ONE_LAYER)
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path_factory.mktemp("store")))
    pytester.makepyfile(USES_IMAGES)
    return pytester


def test_image_build_progress_reads_well(images: pytest.Pytester) -> None:
    """Steps count from 1 (the FROM), instructions as written, cut with an ellipsis, a nested build says whose
    base it is, '1 layer'; nothing but whole lines when stdout is no terminal."""
    result = images.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "sandbox image: building image app from images/app.Containerfile",
            "sandbox image:   app step 1/3: FROM $BASE",
            "sandbox image: building image base from images/base.Containerfile (the base of app)",
            "sandbox image:   base step 1/3: FROM scratch",
            "sandbox image:   base step 2/3: COPY --from=host --libs /bin/busybox /bin/busybox",
            "sandbox image:     done in *s",
            'sandbox image:   base step 3/3: RUN ["/bin/busybox", "--install", "-s", "/bin"]',
            "sandbox image:     done in *s",
            "sandbox image: image base: 2 layers, ready in *s",
            "sandbox image:   app step 2/3: RUN echo hello-aaaa*a…",
            "sandbox image:     done in *s",
            "sandbox image:   app step 3/3: ENV B=2",
            "sandbox image: image app: 3 layers, ready in *s",
            "sandbox image: building image one from images/one.Containerfile",
            "sandbox image:   one step 1/2: FROM scratch",
            "sandbox image:   one step 2/2: COPY --from=host /bin/busybox /bin/busybox",
            "sandbox image:     done in *s",
            "sandbox image: image one: 1 layer, ready in *s",
        ],
        consecutive=True,
    )
    step = next(line for line in result.stdout.lines if "app step 2/3" in line)
    assert len(step.split(": ", 2)[2]) == 72, step
    assert "\r" not in result.stdout.str()  # a log: no live line
    again = images.runpytest_subprocess()
    again.assert_outcomes(passed=2)
    assert "sandbox image" not in again.stdout.str()  # all cached: not a word


def test_image_progress_shown_once_under_xdist(images: pytest.Pytester) -> None:
    result = images.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=2)
    output = result.stdout.str() + result.stderr.str()
    assert output.count("sandbox image: building image app") == 1, output
    assert output.count("sandbox image: image one: 1 layer") == 1, output
    assert output.count("sandbox image: image base: 2 layers") == 1, output


def test_image_progress_is_live_on_a_terminal(images: pytest.Pytester) -> None:
    """On a terminal a long step shows a status line rewritten in place (\\r) with the time it has run."""
    (images.path / "images" / "one.Containerfile").write_text(
        'FROM scratch\nCOPY --from=host /bin/busybox /bin/busybox\nRUN ["/bin/busybox", "sleep", "2.5"]\n'
    )
    out = _run_on_a_terminal([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "test_one"], images.path)
    assert "sandbox image:   one step 3/3: RUN" in out, out
    assert '\r\x1b[Ksandbox image:   one step 3/3: RUN ["/bin/busybox", "sleep", "2.5"]  2s' in out, out
    assert "1 passed" in out, out


def _run_on_a_terminal(argv: list[str], cwd: Path, answers: list[str] | None = None) -> str:
    """Run ``argv`` on a pseudo terminal; each ``(Pdb)`` prompt gets the next of ``answers``."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    todo = list(answers or [])
    answered = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 0.5)[0]:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
        seen = b"".join(chunks)
        # A prompt can arrive in pieces ("(Pdb)" then " "): answer each prompt once, by counting them.
        if todo and seen.rstrip().endswith(b"(Pdb)") and seen.count(b"(Pdb)") > answered:
            os.write(master, todo.pop(0).encode() + b"\n")
            answered += 1
    os.close(master)
    proc.wait(timeout=60)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_durations_without_sandboxed_tests_say_so(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makepyfile("""
        import pytest

        def test_plain():
            pass

        @pytest.mark.container
        def test_marked():
            pass
    """)
    args = ["--sandbox-durations=10", "--sandbox=off"] if mode == "off" else ["--sandbox-durations=10", "-k", "plain"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2 if mode == "off" else 1)
    result.stdout.fnmatch_lines(["*= sandbox resources =*", "no test ran in a sandbox: nothing was measured*"])


def test_interrupt_in_a_sandbox_names_the_users_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_ki="""
        import pytest

        def helper():
            raise KeyboardInterrupt

        @pytest.mark.container
        def test_interrupted():
            helper()
    """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*! KeyboardInterrupt: in test_ki.py::test_interrupted (in its sandbox) !*",
            f"{pytester.path}/test_ki.py:4: KeyboardInterrupt: in test_ki.py::test_interrupted (in its sandbox)",
        ]
    )
    assert "pytest_sandbox" not in result.stdout.str()


def test_interrupt_at_the_terminal_names_the_running_test(pytester: pytest.Pytester) -> None:
    """^C reaches pytest (the test runs in a session of its own): the summary names the test that ran."""
    pytester.makepyfile(
        test_wait="""
        import time
        import pytest

        @pytest.mark.container
        def test_waits():
            print("RUNNING", flush=True)
            time.sleep(1000)
    """
    )
    proc = start_pytest_until_running(pytester.path)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert f"{pytester.path}/test_wait.py:4: KeyboardInterrupt: in test_wait.py::test_waits (in its sandbox)" in output
    assert "selectors.py" not in output and "pytest_sandbox" not in output, output


def test_interrupt_location_from_a_sandbox_is_only_taken_under_the_rootdir(tmp_path: Path) -> None:
    """The test process names the file; pytest may show its lines (--full-trace): a host file outside the
    rootdir is replaced by the test's own location."""
    test_file = tmp_path / "test_x.py"
    test_file.write_text("def test_x():\n    pass\n")
    item = types.SimpleNamespace(
        config=types.SimpleNamespace(rootpath=tmp_path),
        path=test_file,
        location=("test_x.py", 0, "test_x"),
        nodeid="test_x.py::test_x",
    )
    for path, lineno, expected in [
        ("/etc/passwd", 1, (str(test_file), 1)),
        (str(test_file), 2, (str(test_file), 2)),
        (str(test_file), 10**9, (str(test_file), 1)),
        ("", 0, (str(test_file), 1)),
    ]:
        with pytest.raises(KeyboardInterrupt, match=r"in test_x.py::test_x \(in its sandbox\)") as excinfo:
            reports._interrupt(cast(pytest.Item, item), path, lineno)
        last = excinfo.traceback[-1]
        assert (str(last.path), last.lineno + 1) == expected


PDB_SUITE = """
    import pytest

    @pytest.mark.container{marker}
    def test_fails():
        x = 41
        assert x == 42
"""


@pytest.mark.parametrize("marker", ["", "(memory='1G')"], ids=["relayed-at-once", "held-until-the-end"])
def test_pdb_on_a_sandboxed_failure_reads_as_without_a_sandbox(pytester: pytest.Pytester, marker: str) -> None:
    """pytest's F comes before pdb's banners (not inside them), pdb works on the test's frame, and the
    traceback pdb showed is not printed again in the summary."""
    pytester.makepyfile(test_fails=PDB_SUITE.format(marker=marker))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", "--pdb"]
    out = _run_on_a_terminal(argv, pytester.path, answers=["p x + 1", "c"]).replace("\r\n", "\n")
    if not marker:
        assert "test_fails.py F\n>>>>" in out, out  # held reports are only shown at the end: no F before pdb
    assert out.count("E       assert 41 == 42") == 1, out
    assert "(Pdb) p x + 1\n42\n(Pdb) c" in out, out
    assert "FAILED test_fails.py::test_fails - assert 41 == 42" in out and "= FAILURES =" not in out, out
