"""What images cost, measured in one run: builds, cached checks, imports, image tests, sandbox.run.

    python benchmarks/images.py [--tests 100] [--runs 3]

Uses a fresh store in a temp dir and the project's images/ (busybox, tools). Prints:
- cold build of `tools` (busybox underneath: one COPY --from=host, three RUN, one COPY)
  and the all-cached rebuild, against `docker`-free baselines measured here: the time
  of a bare `pytest-sandbox run` (one sandbox) for scale;
- import of the busybox image exported as an OCI archive, cold and cached;
- per-test time of N tests marked `image="busybox"` against N tests marked plain
  `container` (ratio), and per-call time of `sandbox.run(["true"])`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from _timing import time_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "pytest_sandbox"]
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-images-") as work:
        project = os.path.join(work, "project")
        shutil.copytree(os.path.join(ROOT, "images"), os.path.join(project, "images"))
        env = {**os.environ}
        cold, warm, run_one, imp_cold, imp_warm = [], [], [], [], []
        for k in range(args.runs):
            env["PYTEST_SANDBOX_STORE"] = os.path.join(work, f"store{k}")
            cold.append(time_command([*cli, "images", "build", "-q", "tools"], project, env))
            warm.append(time_command([*cli, "images", "build", "-q", "tools"], project, env))
            run_one.append(time_command([*cli, "run", "busybox", "true"], project, env))
            archive = os.path.join(work, f"busybox{k}.tar")
            time_command([*cli, "images", "export", "-q", "busybox", archive], project, env)
            env["PYTEST_SANDBOX_STORE"] = os.path.join(work, f"import{k}")
            importing = [*cli, "images", "import", "-q", f"oci-archive:{archive}"]
            imp_cold.append(time_command([*importing, "bb"], project, env))
            imp_warm.append(time_command([*importing, "bb2"], project, env))
        med = statistics.median
        print(f"build tools, cold:          {med(cold) * 1000:8.1f} ms  (fresh store, busybox underneath)")
        print(f"build tools, all cached:    {med(warm) * 1000:8.1f} ms")
        print(f"one `pytest-sandbox run`:   {med(run_one) * 1000:8.1f} ms  (interpreter start included)")
        print(f"import busybox, cold:       {med(imp_cold) * 1000:8.1f} ms")
        print(f"import busybox, cached:     {med(imp_warm) * 1000:8.1f} ms")

        env["PYTEST_SANDBOX_STORE"] = os.path.join(work, "store0")
        n = args.tests
        suites = {
            "container": "@pytest.mark.container\ndef test_{i}():\n    pass\n\n",
            "image": "@pytest.mark.container(image='busybox')\ndef test_{i}(sandbox):\n    pass\n\n",
            "image + run": "@pytest.mark.container(image='busybox')\ndef test_{i}(sandbox):\n"
            "    assert sandbox.run(['true']).returncode == 0\n\n",
        }
        times: dict[str, list[float]] = {name: [] for name in suites}
        for name, body in suites.items():
            with open(os.path.join(project, f"test_{name.replace(' + ', '_')}.py"), "w") as f:
                f.write("import pytest\n\n" + "".join(body.format(i=i) for i in range(n)))
        for _ in range(args.runs):
            for name in suites:
                path = f"test_{name.replace(' + ', '_')}.py"
                times[name].append(
                    time_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path], project, env)
                )
        per_test = {name: med(t) / n * 1000 for name, t in times.items()}
        print(f"per test, container:        {per_test['container']:8.2f} ms  ({n} tests, session included)")
        print(f"per test, image=busybox:    {per_test['image']:8.2f} ms")
        print(f"per sandbox.run(['true']):  {per_test['image + run'] - per_test['image']:8.2f} ms")
        print(f"ratio image/container:      {per_test['image'] / per_test['container']:8.2f}")


if __name__ == "__main__":
    main()
