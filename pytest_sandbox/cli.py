"""The ``pytest-sandbox`` command."""

from __future__ import annotations

import argparse
import os
import sys

from . import cgroups, probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytest-sandbox", description="rootless sandboxes for pytest")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="what this host supports, what is missing and how to fix it")
    doctor.add_argument("--cgroup", metavar="PATH", default=os.environ.get("PYTEST_SANDBOX_CGROUP"),
                        help="the cgroup pytest would be given with --sandbox-cgroup")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        print(probe.doctor_text())
        try:
            backend = cgroups.choose("auto", args.cgroup or None, os.getcwd()).describe()
        except cgroups.CgroupUnavailable as exc:
            backend = f"unavailable: {exc}"
        print(f"limits: {backend}")
        return 0 if probe.unavailable_reason() is None else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
