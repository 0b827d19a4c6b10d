"""pytest-sandbox: run pytest tests and their fixtures in rootless Linux containers."""

from __future__ import annotations

from . import wait
from .errors import SandboxError, ServiceError, SetupError
from .fixtures import Sandbox
from .services import Service, service
from .spec import SandboxSpec
from .volumes import Volume, volume

__version__ = "0.1.0"
__all__ = [
    "Sandbox",
    "SandboxError",
    "SandboxSpec",
    "Service",
    "ServiceError",
    "SetupError",
    "Volume",
    "__version__",
    "service",
    "volume",
    "wait",
]
