"""Per-test overhead of --sandbox=all against plain pytest and pytest-forked, measured in one run.

    python benchmarks/overhead.py [--tests 300] [--runs 5] [--forked-venv DIR]

pytest-forked is installed into its own venv (pinned to a pytest it works with:
it is broken on pytest 9.2) unless --forked-venv points at one. Prints the
median wall time of each configuration, the overhead per test in ms over plain
pytest, and the ratio sandbox/forked (goal: <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import venv

from _timing import time_command


def _forked_venv(path: str) -> str:
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        venv.create(path, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "pytest<9.2", "pytest-forked"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--forked-venv", default=os.path.join(tempfile.gettempdir(), "pytest-sandbox-bench-forked"))
    args = parser.parse_args()

    forked_python = _forked_venv(args.forked_venv)
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as suite:
        with open(os.path.join(suite, "test_trivial.py"), "w") as f:
            f.writelines(f"def test_{i}():\n    assert True\n\n" for i in range(args.tests))
        base = ["-q", "-p", "no:cacheprovider", "test_trivial.py"]
        configs = {
            "plain": [sys.executable, "-m", "pytest", *base],
            "sandbox": [sys.executable, "-m", "pytest", "--sandbox=all", *base],
            "sandbox + limits": [
                sys.executable,
                "-m",
                "pytest",
                "--sandbox=all",
                "--sandbox-memory=1G",
                "--sandbox-pids=1000",
                *base,
            ],
            "plain (forked venv)": [forked_python, "-m", "pytest", *base],
            "forked": [forked_python, "-m", "pytest", "--forked", *base],
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):  # interleaved, so drift in machine load hits every configuration alike
            for name, cmd in configs.items():
                times[name].append(time_command(cmd, suite))
    median = {name: statistics.median(values) for name, values in times.items()}
    sandbox_ms = (median["sandbox"] - median["plain"]) / args.tests * 1000
    forked_ms = (median["forked"] - median["plain (forked venv)"]) / args.tests * 1000
    print(f"{args.tests} trivial tests, median of {args.runs} runs")
    for name, value in median.items():
        print(f"  {name:<22} {value:7.3f} s")
    limits_ms = (median["sandbox + limits"] - median["plain"]) / args.tests * 1000
    print(
        f"per-test overhead: sandbox {sandbox_ms:.2f} ms, pytest-forked {forked_ms:.2f} ms, "
        f"sandbox with memory+pids limits (a cgroup each) {limits_ms:.2f} ms"
    )
    print(f"ratio sandbox/forked: {sandbox_ms / forked_ms:.2f} (goal <= 1.00)")


if __name__ == "__main__":
    main()
