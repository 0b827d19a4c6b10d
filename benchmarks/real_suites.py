"""Real third-party suites (pinned sdists from PyPI) plain and sandboxed: wall ratio and outcome diff, one run.

    python benchmarks/real_suites.py [--cache DIR] [--suites six,iniconfig,...] [--runs 1]

Each suite's sdist is fetched with `pip download --no-deps --no-binary NAME` into
the cache (--cache, else $PYTEST_SANDBOX_BENCH_CACHE, else .bench-cache/ in the
checkout), unpacked, and given its own venv (the package, its test deps,
pytest-xdist, and pytest-sandbox built from this checkout). Its tests then run plain,
with --sandbox=all (the whole run in the session's sandbox), with --sandbox-scope=module and =session, with
--sandbox-collection=host (collection in the pytest process, each test in a sandbox of its own), and with
--sandbox=hermetic, where this pytest-sandbox has them ("n/a" otherwise). Prints per configuration the
wall time, the ratio to plain measured in the same run, the outcome counts,
and a DIFF line for every test whose outcome differs from plain (from each
run's --junitxml). It is a report: it exits 0 when outcomes differ, and only
fails when it cannot set a suite up or a run writes no report at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Suite:
    """A pinned sdist and how to run its own tests."""

    name: str  # the name on PyPI
    version: str
    tests: tuple[str, ...]  # paths given to pytest, relative to the unpacked sdist
    deps: tuple[str, ...] = ()  # test requirements, pinned so runs compare across machines and days


# Chosen to install in seconds and run in well under a minute plain; deps are from the suites' own test groups.
SUITES = {
    s.name: s
    for s in (
        Suite("iniconfig", "2.3.1", ("testing",)),
        Suite("six", "1.17.0", ("test_six.py",)),
        Suite("more-itertools", "11.2.1", ("tests",)),
        Suite("attrs", "26.1.0", ("tests",), ("hypothesis==6.170.17", "pympler==1.1", "cloudpickle==3.1.3")),
        # test_tz.py, the tzpath data checks and the tzpath fallbacks of test_tzfile.py: the whole suite
        # (5300 tests) takes minutes per sandboxed run.
        Suite(
            "python-dateutil",
            "4.0.0",
            (
                "tests/test_tz.py",
                "tests/test_tzpath_data.py",
                "tests/test_tzfile.py::test_gettz_skips_invalid_file_on_tzpath",
                "tests/test_tzfile.py::test_gettz_invalid_file_on_tzpath_falls_back_to_tzdata",
            ),
            ("attrs==26.1.0", "hypothesis==6.170.17", "freezegun==1.5.5", "pytest-cov==7.1.0"),
        ),
    )
}
# What CI runs: attrs alone takes a minute per sandboxed configuration (1386 tests).
DEFAULT_SUITES = ("iniconfig", "six", "more-itertools", "python-dateutil")
SCOPES = ("module", "session")
# The caller's pytest variables would change how a suite runs; the runs get none of them.
DROPPED_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")


@dataclasses.dataclass
class Run:
    """One pytest run of a suite: wall time, exit code, outcome per test."""

    seconds: float
    returncode: int
    outcomes: dict[str, str]
    tail: str


def _pip(python: str, *args: str) -> None:
    """Runs pip quietly; its output is shown only when it fails."""
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-3000:]}")


def _sdist_name(suite: Suite) -> str:
    return f"{suite.name.replace('-', '_')}-{suite.version}.tar.gz".lower()


def _download(suites: list[Suite], cache: str) -> None:
    """Fetches the sdists not yet in the cache, in one pip call (each alone builds its backend's metadata anew)."""
    sdists = os.path.join(cache, "sdists")
    have = {name.lower() for name in os.listdir(sdists)} if os.path.isdir(sdists) else set()
    missing = [f"{s.name}=={s.version}" for s in suites if _sdist_name(s) not in have]
    if missing:
        # --no-binary for these names only: with :all: pip builds every build backend from source too (minutes).
        names = ",".join(s.name for s in suites)
        _pip(sys.executable, "download", "-q", "--no-deps", "--no-binary", names, "-d", sdists, *missing)


def _unpacked(suite: Suite, cache: str) -> str:
    """Unpacks the sdist once; returns the source tree."""
    sdists = os.path.join(cache, "sdists")
    found = [os.path.join(sdists, n) for n in os.listdir(sdists) if n.lower() == _sdist_name(suite)]
    if len(found) != 1:
        sys.exit(f"{suite.name}: expected one sdist named {_sdist_name(suite)} in {sdists}, found {found}")
    tree = os.path.join(cache, "src", f"{suite.name}-{suite.version}")
    if not os.path.isdir(tree):
        partial = tree + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(found[0]) as tar:
            members = tar.getmembers()
            for member in members:  # Python 3.11.2 has no extraction filter: only plain files and dirs, inside
                if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in member.name:
                    sys.exit(f"{found[0]}: refusing member {member.name!r}")
            tar.extractall(partial, members=members)
        (top,) = os.listdir(partial)  # an sdist has one top directory
        os.rename(os.path.join(partial, top), tree)
        os.rmdir(partial)
    return tree


def _plugin_wheel(cache: str) -> str:
    """A wheel of this checkout's plugin, built from a copy (a plain user cannot write egg-info into the checkout)."""
    build = os.path.join(cache, "plugin")
    shutil.rmtree(build, ignore_errors=True)
    source = os.path.join(build, "src")
    os.makedirs(source)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(
        os.path.join(ROOT, "pytest_sandbox"),
        os.path.join(source, "pytest_sandbox"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    _pip(sys.executable, "wheel", "-q", "--no-deps", "-w", os.path.join(build, "wheel"), source)
    (wheel,) = glob.glob(os.path.join(build, "wheel", "*.whl"))
    return wheel


def _venv(suite: Suite, tree: str, cache: str, plugin: str) -> str:
    """One venv per suite, reused while its requirements are the same; the plugin is reinstalled every time."""
    path = os.path.join(cache, "venvs", suite.name)
    python = os.path.join(path, "bin", "python")
    wanted = [tree, "pytest-xdist", *suite.deps]
    stamp = hashlib.sha256("\n".join([sys.version, *wanted]).encode()).hexdigest()
    stamp_file = os.path.join(path, "bench-stamp")
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        _pip(python, "install", "-q", "--no-deps", "--force-reinstall", plugin)
        return python
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    _pip(python, "install", "-q", plugin, *wanted)
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return python


def _outcomes(junitxml: str) -> dict[str, str]:
    """Outcome per test from a junit report (xfail/xpass told apart from skip/pass)."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(junitxml).iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            elif child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                break  # a teardown error after a failure: the failure is the outcome
        if key in outcomes and outcomes[key] != "passed":
            continue  # a test's setup/teardown error is a second testcase of the same name
        outcomes[key] = outcome
    return outcomes


def _run(python: str, tree: str, suite: Suite, extra: list[str], report: str, env: dict[str, str]) -> Run:
    if os.path.exists(report):
        os.unlink(report)
    written = os.path.join(tree, ".sandbox-bench-report.xml")  # in the rootdir: --sandbox=hermetic's outputs lie there
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={written}", *extra, *suite.tests]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if os.path.exists(written):
        shutil.move(written, report)
    tail = "\n".join(result.stdout.strip().splitlines()[-15:])
    if not os.path.exists(report):
        return Run(seconds, result.returncode, {}, tail)
    return Run(seconds, result.returncode, _outcomes(report), tail)


def _counts(outcomes: dict[str, str]) -> str:
    counted: dict[str, int] = {}
    for outcome in outcomes.values():
        counted[outcome] = counted.get(outcome, 0) + 1
    return " ".join(f"{n} {o}" for o, n in sorted(counted.items()))


def _has_option(python: str, env: dict[str, str], text: str) -> bool:
    """Whether this checkout's plugin knows an option or mode (--sandbox-scope and hermetic came later)."""
    result = subprocess.run([python, "-m", "pytest", "--help"], env=env, stdout=subprocess.PIPE, text=True)
    return text in result.stdout


def _bench(suite: Suite, cache: str, plugin: str, runs: int, env: dict[str, str]) -> list[str]:
    """Runs one suite in every configuration; prints its rows and returns its DIFF lines."""
    tree = _unpacked(suite, cache)
    python = _venv(suite, tree, cache, plugin)
    configs: dict[str, list[str] | None] = {"plain": [], "--sandbox=all": ["--sandbox=all"]}
    scoped = _has_option(python, env, "--sandbox-scope")
    for scope in SCOPES:
        configs[f"--sandbox=all scope={scope}"] = ["--sandbox=all", f"--sandbox-scope={scope}"] if scoped else None
    host = _has_option(python, env, "--sandbox-collection")
    configs["--sandbox=all collection=host"] = ["--sandbox=all", "--sandbox-collection=host"] if host else None
    hermetic = _has_option(python, env, "hermetic:")
    configs["--sandbox=hermetic"] = ["--sandbox=hermetic"] if hermetic else None
    # Untimed: the first run after an install reads a cold venv (seconds), which would land on plain alone.
    subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *suite.tests],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    times: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, Run] = {}
    for _ in range(runs):  # interleaved, so drift in machine load hits every configuration alike
        for name, extra in configs.items():
            if extra is None:
                continue
            slug = "-".join(extra).replace("=", "_").lstrip("-") or "plain"
            report = os.path.join(cache, "reports", f"{suite.name}-{slug}.xml")
            os.makedirs(os.path.dirname(report), exist_ok=True)
            last[name] = run = _run(python, tree, suite, extra, report, env)
            times[name].append(run.seconds)
    plain = last["plain"]
    base = statistics.median(times["plain"])
    diffs: list[str] = []
    print(f"\n{suite.name} {suite.version} ({' '.join(suite.tests)}; {len(plain.outcomes)} tests)")
    for name, extra in configs.items():
        if extra is None:
            print(f"  {name:<28} {'n/a':>8}  (this pytest-sandbox has no such option)")
            continue
        run, wall = last[name], statistics.median(times[name])
        differing = sorted(
            k for k in plain.outcomes.keys() | run.outcomes.keys() if plain.outcomes.get(k) != run.outcomes.get(k)
        )
        print(
            f"  {name:<28} {wall:7.2f} s  x{wall / base:5.2f}  exit {run.returncode}  "
            f"{_counts(run.outcomes) or 'NO REPORT'}  ({len(differing)} differ)"
        )
        if not run.outcomes:
            diffs.append(f"DIFF {suite.name} [{name}]: no junit report, exit {run.returncode}:\n{run.tail}")
        for key in differing[:20]:
            diffs.append(
                f"DIFF {suite.name} [{name}] {key}: plain {plain.outcomes.get(key, 'absent')}"
                f" -> {run.outcomes.get(key, 'absent')}"
            )
        if len(differing) > 20:
            diffs.append(f"DIFF {suite.name} [{name}]: ... and {len(differing) - 20} more")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache", default=os.environ.get("PYTEST_SANDBOX_BENCH_CACHE", os.path.join(ROOT, ".bench-cache"))
    )
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES), help=f"comma-separated, of: {', '.join(SUITES)}")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    unknown = [name for name in args.suites.split(",") if name not in SUITES]
    if unknown:
        parser.error(f"--suites: unknown {', '.join(unknown)}; known: {', '.join(SUITES)}")
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the unpacked trees stay as unpacked, whoever runs them
    print(f"real suites, plain vs sandboxed, {args.runs} run(s) each, as uid {os.getuid()}, cache {cache}")
    suites = [SUITES[name] for name in args.suites.split(",")]
    _download(suites, cache)
    plugin = _plugin_wheel(cache)
    diffs: list[str] = []
    for suite in suites:
        diffs += _bench(suite, cache, plugin, args.runs, env)
    print()
    print("\n".join(diffs) if diffs else "no outcome differs from plain")


if __name__ == "__main__":
    main()
