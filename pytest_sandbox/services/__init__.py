"""Service containers: ``service(...)`` fixtures, run by the session's pod (see pod.py)."""

from __future__ import annotations

from .fixture import service
from .handles import Service

__all__ = ["Service", "service"]
