"""Rollout engines behind one protocol (`base.Engine`); the native one is pure PyTorch, CPU or GPU.

`NativeEngine` is imported on first use, so the protocol and the request types are available
without torch (the server's seams are typed with them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slipstream.services.rollout.engine.base import Engine
from slipstream.services.rollout.engine.request import Request, Result

if TYPE_CHECKING:
    from slipstream.services.rollout.engine.native import NativeEngine

__all__ = ["Engine", "NativeEngine", "Request", "Result"]


def __getattr__(name: str) -> Any:
    if name == "NativeEngine":
        from slipstream.services.rollout.engine.native import NativeEngine

        return NativeEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
