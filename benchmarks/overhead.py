"""Per-test overhead of --sandbox=all against plain pytest, pytest-forked and a bare fork, in one run.

    python benchmarks/overhead.py [--tests 300] [--runs 5] [--forked-venv DIR]

pytest-forked is installed into its own venv (pinned to a pytest it works with:
it is broken on pytest 9.2) unless --forked-venv points at one; this checkout's
pytest-sandbox is measured there too (from the source tree, with -p): the same
pytest and the same other plugins as pytest-forked, the fair comparison (the
main venv's dev plugins each run hooks in every test's process). Prints the
median wall time of each configuration and, against baselines measured in the
same run: the overhead per test over plain pytest and its ratio to pytest-forked
(goal <= 0.8) and to a bare fork of a pytest-sized process (goal <= 2); under
``-n 2`` the overhead per test per worker (goal <= 6 ms; pytest-forked's own beside it, in its venv with
pytest-xdist); ``--sandbox-scope=session``
against plain (goal <= 1.1); the CPU time a test costs, summed over every process of the run (a run on N
CPUs cannot take less than that / N a test); and a suite with a 200 ms session fixture by scope.

--sandbox=all runs the whole session in one sandbox (conftest.py and collection too):
its figures hold a fixed cost (the session's sandbox and a second pytest start),
printed apart, and the cost of each test over it. ``--sandbox-collection=host``
(collection in the pytest process, each test in a sandbox of its own) is measured too.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import venv

from _timing import time_command

FORK_FLOOR = """
import os, time, pytest, _pytest.python, _pytest.runner, xdist  # a process about pytest's size
ballast = bytearray(40 * 2**20)  # pytest with a collected suite holds tens of MiB
runs = 200
start = time.perf_counter()
for _ in range(runs):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print((time.perf_counter() - start) / runs * 1000)
"""

SLOW_SESSION_FIXTURE = """
import time, pytest

@pytest.fixture(scope="session")
def expensive():
    time.sleep(0.2)
    return 1
"""


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forked_venv(path: str) -> str:
    """A venv with pytest and pytest-forked, and pytest-sandbox's dependencies: this checkout's pytest-sandbox
    runs there from the source tree (``-p``, on PYTHONPATH), so both plugins are measured with the same
    pytest and the same other plugins (each plugin's hooks run in every test's process)."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        venv.create(path, with_pip=True)
    has = subprocess.run([python, "-c", "import pytest_forked, xdist, pyroute2, filelock"], capture_output=True)
    if has.returncode != 0:
        wanted = ["pytest<9.2", "pytest-forked", "pytest-xdist", "pyroute2>=0.7", "filelock>=3.12"]
        subprocess.run([python, "-m", "pip", "install", "-q", *wanted], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--forked-venv", default=os.path.join(tempfile.gettempdir(), "pytest-sandbox-bench-forked"))
    args = parser.parse_args()

    forked_python = _forked_venv(args.forked_venv)
    source_env = {**os.environ, "PYTHONPATH": REPO, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as suite:
        with open(os.path.join(suite, "test_trivial.py"), "w") as f:
            f.writelines(f"def test_{i}():\n    assert True\n\n" for i in range(args.tests))
        fixture_dir = os.path.join(suite, "fixture")
        os.mkdir(fixture_dir)
        with open(os.path.join(fixture_dir, "conftest.py"), "w") as f:
            f.write(SLOW_SESSION_FIXTURE)
        with open(os.path.join(fixture_dir, "test_uses_it.py"), "w") as f:
            f.writelines(f"def test_{i}(expensive):\n    assert expensive\n\n" for i in range(100))
        pytest_cmd = [sys.executable, "-m", "pytest"]
        base = ["-q", "-p", "no:cacheprovider", "test_trivial.py"]
        fixture = ["-q", "-p", "no:cacheprovider", "fixture"]
        host = ["--sandbox-collection=host"]
        session = ["--sandbox-scope=session"]
        # In the forked venv: this checkout's plugin from the source tree, and pytest-forked, loaded by name
        # (entry points off: an egg-info in the checkout would register the plugin a second time).
        ours = ["-p", "pytest_sandbox.plugin", "-p", "pytest_forked"]
        xdist = ["-p", "xdist.plugin"]  # the forked venv's xdist, by name too: plain there runs without it
        configs = {
            "plain": [*pytest_cmd, *base],
            "sandbox": [*pytest_cmd, "--sandbox=all", *base],
            "sandbox + limits": [*pytest_cmd, "--sandbox=all", "--sandbox-memory=1G", "--sandbox-pids=1000", *base],
            "sandbox, scope=session": [*pytest_cmd, "--sandbox=all", "--sandbox-scope=session", *base],
            "host collection": [*pytest_cmd, "--sandbox=all", *host, *base],
            "host coll., scope=session": [*pytest_cmd, "--sandbox=all", *host, "--sandbox-scope=session", *base],
            "plain -n 2": [*pytest_cmd, "-n", "2", *base],
            "sandbox -n 2": [*pytest_cmd, "-n", "2", "--sandbox=all", *base],
            "host collection -n 2": [*pytest_cmd, "-n", "2", "--sandbox=all", *host, *base],
            "plain (forked venv)": [forked_python, "-m", "pytest", *base],
            "forked": [forked_python, "-m", "pytest", "--forked", *base],
            "sandbox (forked venv)": [forked_python, "-m", "pytest", *ours, "--sandbox=all", *base],
            "scope=session (f. venv)": [forked_python, "-m", "pytest", *ours, "--sandbox=all", *session, *base],
            "plain -n 2 (f. venv)": [forked_python, "-m", "pytest", *xdist, "-n", "2", *base],
            "forked -n 2": [forked_python, "-m", "pytest", *xdist, "-p", "pytest_forked", "-n", "2", "--forked", *base],
            "fixture: plain": [*pytest_cmd, *fixture],
            "fixture: scope=test": [*pytest_cmd, "--sandbox=all", *fixture],
            "fixture: scope=session": [*pytest_cmd, "--sandbox=all", "--sandbox-scope=session", *fixture],
            "fixture: host collection": [*pytest_cmd, "--sandbox=all", *host, *fixture],
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        cpu: dict[str, list[float]] = {name: [] for name in configs}  # of every process of the run, reaped in it
        floors: list[float] = []
        for _ in range(args.runs):  # interleaved, so drift in machine load hits every configuration alike
            for name, cmd in configs.items():
                by_name = "pytest_sandbox.plugin" in cmd or "xdist.plugin" in cmd
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                times[name].append(time_command(cmd, suite, env=source_env if by_name else None))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            floor = subprocess.run([sys.executable, "-c", FORK_FLOOR], capture_output=True, text=True, check=True)
            floors.append(float(floor.stdout))
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    fork_ms = statistics.median(floors)

    def per_test(config: str, baseline: str, tests: float = args.tests) -> float:
        return (median[config] - median[baseline]) / tests * 1000

    sandbox_ms = per_test("sandbox", "plain")
    each_ms = per_test("sandbox", "sandbox, scope=session")  # over the fixed cost: a process and a layer each
    host_ms = per_test("host collection", "plain")
    forked_ms = per_test("forked", "plain (forked venv)")
    alike_ms = per_test("sandbox (forked venv)", "plain (forked venv)")
    alike_each_ms = per_test("sandbox (forked venv)", "scope=session (f. venv)")
    fixed_ms = (median["sandbox, scope=session"] - median["plain"]) * 1000
    print(
        f"{args.tests} trivial tests (and a 100-test suite with a 200 ms session fixture), median of {args.runs} runs"
    )
    for name, value in median.items():
        print(f"  {name:<26} {value:7.3f} s")
    print(
        f"per-test overhead: sandbox {sandbox_ms:.2f} ms (the session's sandbox, {fixed_ms:.0f} ms once, spread "
        f"over {args.tests} tests; each test over it {each_ms:.2f} ms), collection on the host {host_ms:.2f} ms, "
        f"pytest-forked {forked_ms:.2f} ms, a bare fork of a pytest-sized process {fork_ms:.2f} ms, "
        f"sandbox with memory+pids limits (a sandbox and a cgroup each) {per_test('sandbox + limits', 'plain'):.2f} ms"
    )
    print(
        f"ratio sandbox/forked: {sandbox_ms / forked_ms:.2f} (goal <= 0.80; each test over the session's sandbox "
        f"{each_ms / forked_ms:.2f}, collection on the host {host_ms / forked_ms:.2f})"
    )
    print(
        f"with pytest-forked's pytest and plugins (the venv holds pytest, pytest-forked and pytest-sandbox only): "
        f"sandbox {alike_ms:.2f} ms per test, each test over the session's sandbox {alike_each_ms:.2f} ms; "
        f"ratio to forked {alike_ms / forked_ms:.2f}, each test {alike_each_ms / forked_ms:.2f} (goal <= 0.80)"
    )
    print(
        f"ratio sandbox/bare fork: {sandbox_ms / fork_ms:.2f} (goal <= 2.00; each test over the session's sandbox "
        f"{each_ms / fork_ms:.2f}, collection on the host {host_ms / fork_ms:.2f})"
    )
    workers = args.tests / 2
    print(
        f"-n 2: {per_test('sandbox -n 2', 'plain -n 2', workers):.2f} ms per test per worker (goal <= 6; "
        f"collection on the host {per_test('host collection -n 2', 'plain -n 2', workers):.2f} ms; "
        f"pytest-forked -n 2 {per_test('forked -n 2', 'plain -n 2 (f. venv)', workers):.2f} ms)"
    )
    print(
        f"--sandbox-scope=session / plain: {median['sandbox, scope=session'] / median['plain']:.2f} (goal <= 1.10; "
        f"fixed cost {fixed_ms:.0f} ms; collection on the host "
        f"{median['host coll., scope=session'] / median['plain']:.2f})"
    )

    def cpu_per_test(config: str, baseline: str) -> float:
        return (cpu_median[config] - cpu_median[baseline]) / args.tests * 1000

    cpus = len(os.sched_getaffinity(0))
    each_cpu = cpu_per_test("sandbox", "sandbox, scope=session")
    alike_each_cpu = cpu_per_test("sandbox (forked venv)", "scope=session (f. venv)")
    print(
        f"CPU time a test (every process of the run, user + system, over plain): sandbox "
        f"{cpu_per_test('sandbox', 'plain'):.2f} ms, each test over the session's sandbox {each_cpu:.2f} ms; "
        f"pytest-forked {cpu_per_test('forked', 'plain (forked venv)'):.2f} ms; like for like (forked venv) sandbox "
        f"{cpu_per_test('sandbox (forked venv)', 'plain (forked venv)'):.2f} ms, each test {alike_each_cpu:.2f} ms "
        f"(on {cpus} CPUs no run of them takes less than CPU time / {cpus} a test: {each_cpu / cpus:.2f} ms, like for "
        f"like {alike_each_cpu / cpus:.2f} ms)"
    )
    print(
        "session fixture of 200 ms, 100 tests: "
        f"plain {median['fixture: plain']:.2f} s, scope=test {median['fixture: scope=test']:.2f} s (one setup), "
        f"scope=session {median['fixture: scope=session']:.2f} s (one setup), collection on the host "
        f"{median['fixture: host collection']:.2f} s (a scope sandbox: one setup)"
    )


if __name__ == "__main__":
    main()
