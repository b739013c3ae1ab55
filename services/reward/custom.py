"""User reward functions: `--custom-rm-path module:function` or `path/to/file.py:function`.

The function has slime's signature, `func(args, sample) -> float | dict`, sync or async:
`args` is the flat namespace of the whole config (`cfg.as_namespace()`: `args.rm_type`,
`args.n_samples_per_prompt`, ...), `sample` a `slipstream.types.Sample` with slime's fields.
A dict result is reduced to its `"reward"` entry (slime's `reward_key` if the namespace has
one), since the wire carries one number per sample.

With --group-rm the function gets the group's `list[Sample]` instead and returns one reward per
sample, in order (slime's batched signature). `PostProcess` is --custom-reward-post-process-path:
`fn(args, samples)` on a scored group (each `sample.reward` set), returning its new rewards or
slime's `(raw_rewards, rewards)` pair (the second is taken).

A path that does not load is a one-line config error at start, not a traceback on the first
request. Sync functions run in a worker thread so a slow one does not stall the others.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slipstream.services.reward import RewardConfigError
from slipstream.types import Sample
from slipstream.user_code import import_file


def load_function(spec: str, flag: str = "--custom-rm-path") -> Callable[..., Any]:
    """Import `module:function` or `file.py:function`; RewardConfigError (one line) if it does not load."""
    try:
        return _load_function(spec)
    except RewardConfigError as e:
        raise RewardConfigError(str(e).replace("--custom-rm-path", flag, 1)) from None


def _load_function(spec: str) -> Callable[..., Any]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardConfigError(
            f"--custom-rm-path {spec}: expected module:function or path/to/file.py:function"
        )
    try:
        if where.endswith(".py") or "/" in where:
            module = import_file(Path(where), "--custom-rm-path", RewardConfigError)
        else:
            module = importlib.import_module(where)
    except RewardConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, one line
        raise RewardConfigError(f"--custom-rm-path {spec}: cannot import: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardConfigError(f"--custom-rm-path {spec}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise RewardConfigError(f"--custom-rm-path {spec}: {name!r} is not callable")
    return fn


def reward_value(result: Any, args: argparse.Namespace) -> float:
    """The number a user function's result stands for; ValueError if there is none."""
    if isinstance(result, dict):
        key = getattr(args, "reward_key", None) or "reward"
        if key not in result:
            raise ValueError(f"reward function returned a dict without {key!r}: keys {sorted(result)[:10]}")
        result = result[key]
    if isinstance(result, bool) or not isinstance(result, int | float):
        raise ValueError(f"reward function returned {type(result).__name__}, not a number")
    if not math.isfinite(result):
        raise ValueError(f"reward function returned {result}")
    return float(result)


class CustomReward:
    """Calls a user function `(args, sample)` and reduces its result to a float."""

    def __init__(self, fn: Callable[..., Any], args: argparse.Namespace):
        self.fn = fn
        self.args = args
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )

    @classmethod
    def from_path(cls, spec: str, args: argparse.Namespace) -> CustomReward:
        return cls(load_function(spec), args)

    async def _call(self, arg: Any) -> Any:
        if self.is_async:
            return await self.fn(self.args, arg)
        result = await asyncio.to_thread(self.fn, self.args, arg)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def __call__(self, sample: Sample) -> float:
        return reward_value(await self._call(sample), self.args)

    async def score_group(self, samples: list[Sample]) -> list[float]:
        """--group-rm: one call with the group's samples; one reward per sample, in order."""
        result = await self._call(samples)
        if not isinstance(result, list | tuple) or len(result) != len(samples):
            got = f"{len(result)} rewards" if isinstance(result, list | tuple) else type(result).__name__
            raise ValueError(f"--group-rm function returned {got} for {len(samples)} samples")
        return [reward_value(r, self.args) for r in result]


class PostProcess:
    """--custom-reward-post-process-path: `fn(args, samples) -> rewards | (raw_rewards, rewards)`."""

    def __init__(self, fn: Callable[..., Any], args: argparse.Namespace):
        self.inner = CustomReward(fn, args)

    @classmethod
    def from_path(cls, spec: str, args: argparse.Namespace) -> PostProcess:
        return cls(load_function(spec, "--custom-reward-post-process-path"), args)

    async def __call__(self, samples: list[Sample]) -> list[float]:
        result = await self.inner._call(samples)
        if isinstance(result, tuple) and len(result) == 2:  # slime's (raw_rewards, rewards)
            result = result[1]
        if hasattr(result, "tolist"):  # a tensor or an array
            result = result.tolist()
        if not isinstance(result, list | tuple) or len(result) != len(samples):
            got = f"{len(result)} rewards" if isinstance(result, list | tuple) else type(result).__name__
            raise ValueError(f"reward post-process returned {got} for {len(samples)} samples")
        return [reward_value(r, self.inner.args) for r in result]
