"""Shared by the benchmarks: wall time of one command, or exit with its output if it fails."""

from __future__ import annotations

import subprocess
import sys
import time


def time_command(cmd: list[str], cwd: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{result.stdout[-3000:]}")
    return elapsed
