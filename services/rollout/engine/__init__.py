"""The native rollout engine: pure PyTorch, CPU or GPU, the embedded default."""

from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.rollout.engine.request import Request, Result

__all__ = ["NativeEngine", "Request", "Result"]
