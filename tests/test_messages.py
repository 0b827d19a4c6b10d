"""What a new user sees: process names, image build progress, summaries, ^C locations (end to end)."""

from __future__ import annotations

import pytest


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
