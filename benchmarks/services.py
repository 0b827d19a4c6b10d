"""Time to a ready service, against starting the same server as a plain subprocess, measured in one run.

    python benchmarks/services.py [--runs 3]

For redis-server, and PostgreSQL 15 where it is installed and this is not root (it refuses to run as root):
- plain: the server started with subprocess.Popen, ready when a TCP connection to its port succeeds (what a
  test without this plugin would do); for PostgreSQL cold includes initdb on an empty directory;
- cold: a pytest session's first start of the service (the pod zygote is made then), ready by
  wait.listening; for PostgreSQL with initdb as its setup on an empty named volume;
- warm: the next starts of the service in the same session (a function-scoped service: stopped after each
  test, started again for the next; the pod is up, PostgreSQL's data is there).
Prints milliseconds (medians) and each sandboxed figure's ratio to the plain one of the same kind.

Then the cost of the pod network's forwarding: redis PING round trips on one connection, from a sandboxed
test by the service's name (pod member -> forwarder in pytest -> the service's loopback), from an
unsandboxed test through the published port, and to a plain redis-server directly (microseconds, medians).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

POSTGRES = "/usr/lib/postgresql/15/bin"
READY_TIMEOUT = 60.0

CONFTEST = """
import time
import pytest

@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        print(f"{'WARM' if item.callspec.params['run'] else 'COLD'} {time.perf_counter() - start:.6f}")
"""

SUITE = """
import time
import pytest
from pytest_sandbox import service, volume, wait

server = service("server", command={command!r}, setup={setup!r}, volumes={volumes}, ports=[{port}],
                 ready=wait.listening({port}), scope="function")

@pytest.mark.parametrize("run", range({restarts} + 1))
def test_start(server, run):
    pass

"""

ROUND_TRIPS = """
import socket, time
import pytest
from pytest_sandbox import service, wait

cache = service("cache", command={command!r}, ports=[{port}], ready=wait.listening({port}))

def round_trip(host, port, count):
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"PING\\r\\n"); conn.recv(64)
        start = time.perf_counter()
        for _ in range(count):
            conn.sendall(b"PING\\r\\n"); conn.recv(64)
        return (time.perf_counter() - start) / count

@pytest.mark.container
def test_pod(cache):
    print(f"POD {{round_trip('cache', {port}, {count})}}")

def test_host(cache):
    print(f"HOST {{round_trip(*cache.address({port}), {count})}}")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_connectable(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the plain server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.005)
    sys.exit("the plain server was not ready in time")


def plain(command: list[str], port: int, before: list[str] | None = None) -> float:
    start = time.perf_counter()
    if before:
        subprocess.run(before, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_connectable(port, proc)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()


def sandboxed(
    work: str, command: list[str], port: int, setup: list[str], volumes: str, runs: int
) -> tuple[list[float], list[float]]:
    suite = os.path.join(work, "suite")
    os.makedirs(suite, exist_ok=True)
    with open(os.path.join(suite, "conftest.py"), "w") as file:
        file.write(CONFTEST)
    with open(os.path.join(suite, "test_service.py"), "w") as file:
        file.write(SUITE.format(command=command, setup=setup, volumes=volumes, port=port, restarts=runs))
    output = run_suite(suite, os.path.join(work, "store"), "the sandboxed service")
    cold = [float(x) for x in re.findall(r"COLD ([0-9.]+)", output)]
    warm = [float(x) for x in re.findall(r"WARM ([0-9.]+)", output)]
    return cold, warm


def run_suite(suite: str, store: str, what: str) -> str:
    """Run the suite in ``suite`` with a store of its own; its output (exits when it fails)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", suite],
        cwd=suite,
        env={**os.environ, "PYTEST_SANDBOX_STORE": store},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stdout[-3000:]}")
    return result.stdout


def report(name: str, plain_cold: list[float], plain_warm: list[float], cold: list[float], warm: list[float]) -> None:
    med = statistics.median
    pc, pw, sc, sw = (med(v) * 1000 for v in (plain_cold, plain_warm, cold, warm))
    print(f"{name}: plain cold {pc:8.1f} ms   sandboxed cold {sc:8.1f} ms   ratio {sc / pc:5.2f}")
    print(f"{name}: plain warm {pw:8.1f} ms   sandboxed warm {sw:8.1f} ms   ratio {sw / pw:5.2f}")


def plain_round_trip(command: list[str], port: int, count: int) -> float:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_connectable(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"PING\r\n")
            conn.recv(64)
            start = time.perf_counter()
            for _ in range(count):
                conn.sendall(b"PING\r\n")
                conn.recv(64)
            return (time.perf_counter() - start) / count
    finally:
        proc.terminate()
        proc.wait()


def round_trips(work: str, command: list[str], port: int, runs: int, count: int = 2000) -> None:
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "test_round_trips.py"), "w") as file:
        file.write(ROUND_TRIPS.format(command=command, port=port, count=count))
    pod, host, plain_times = [], [], []
    for _ in range(runs):
        plain_times.append(plain_round_trip(command, port, count))
        output = run_suite(work, os.path.join(work, "store"), "the round-trip suite")
        pod += [float(x) for x in re.findall(r"POD ([0-9.e-]+)", output)]
        host += [float(x) for x in re.findall(r"HOST ([0-9.e-]+)", output)]
    med = statistics.median
    base = med(plain_times) * 1e6
    for name, times in (("by name in the pod", pod), ("published port", host)):
        took = med(times) * 1e6
        print(f"redis round trip, {name}: {took:7.1f} us   plain {base:7.1f} us   ratio {took / base:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis: skipped (redis-server is not installed)")
    else:
        with tempfile.TemporaryDirectory(prefix="sandbox-bench-services-") as work:
            port = free_port()
            redis = ["redis-server", "--port", str(port), "--save", "", "--bind", "127.0.0.1"]
            times = [plain(redis, port) for _ in range(args.runs)]
            cold = []
            warm: list[float] = []
            for k in range(args.runs):
                c, w = sandboxed(os.path.join(work, f"redis{k}"), redis, port, [], "{}", args.runs)
                cold += c
                warm += w
            report("redis", times, times, cold, warm)
            round_trips(os.path.join(work, "round-trips"), redis, port, args.runs)
    if not os.path.exists(f"{POSTGRES}/postgres"):
        print("postgres: skipped (PostgreSQL 15 is not installed)")
        return
    if os.geteuid() == 0:
        print("postgres: skipped as root (postgres refuses to run as root; the plain user's lane measures it)")
        return
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-services-") as work:
        port = free_port()
        plain_cold, plain_warm = [], []
        for k in range(args.runs):
            data = os.path.join(work, f"plain{k}")
            pg = [f"{POSTGRES}/postgres", "-D", data, "-k", work, "-p", str(port), "-c", "listen_addresses=127.0.0.1"]
            plain_cold.append(plain(pg, port, [f"{POSTGRES}/initdb", "-D", data, "-A", "trust", "-U", "postgres"]))
            plain_warm.append(plain(pg, port))
        cold, warm = [], []
        for k in range(args.runs):
            pg = [
                f"{POSTGRES}/postgres",
                "-D",
                "/var/tmp/pg/data",
                "-k",
                "/tmp",
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
            ]
            init = [f"{POSTGRES}/initdb -D /var/tmp/pg/data -A trust -U postgres"]
            c, w = sandboxed(
                os.path.join(work, f"pg{k}"), pg, port, init, f'{{volume("pg{k}"): "/var/tmp/pg"}}', args.runs
            )
            cold += c
            warm += w
        report("postgres", plain_cold, plain_warm, cold, warm)


if __name__ == "__main__":
    main()
