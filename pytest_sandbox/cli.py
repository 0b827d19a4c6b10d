"""The ``pytest-sandbox`` command."""

from __future__ import annotations

import argparse
import sys

from . import probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytest-sandbox", description="rootless sandboxes for pytest")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="what this host supports, what is missing and how to fix it")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        print(probe.doctor_text())
        return 0 if probe.unavailable_reason() is None else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
