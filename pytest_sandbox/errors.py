"""Exceptions raised by the sandbox machinery."""

from __future__ import annotations


class SandboxError(Exception):
    """Base class for every error the plugin raises on purpose."""


class SetupError(SandboxError):
    """A sandbox could not be built; ``phase`` names the step that failed."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"sandbox setup failed in phase {phase!r}: {message}")
        self.phase = phase
        self.message = message


class ServiceError(SandboxError):
    """A service did not start, did not become ready, or was used where it cannot be."""
