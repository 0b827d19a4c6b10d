"""pytest-sandbox: run pytest tests and their fixtures in rootless Linux containers."""

from __future__ import annotations

from .errors import SandboxError, SetupError
from .fixtures import Sandbox
from .spec import SandboxSpec
from .volumes import Volume, volume

__version__ = "0.1.0"
__all__ = ["Sandbox", "SandboxError", "SandboxSpec", "SetupError", "Volume", "__version__", "volume"]
