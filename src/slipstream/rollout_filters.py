"""Dynamic sampling filters: which finished GRPO groups are worth training on.

With `--dynamic-sampling-filter-path` the coordinator calls the filter on every finished,
scored group before it reaches the replay buffer; a group it rejects is counted (the
`num_groups_filtered` metric) and dropped, and admission control dispatches another prompt
in its place. Combined with `--over-sampling-batch-size` this is DAPO's dynamic sampling as
slime runs it: dispatch more prompts than a step needs, keep the first groups that pass.

A filter has slime's signature, `fn(args, samples: list[Sample], **kwargs)`, and returns a
bool or anything with a boolean `keep` attribute (slime's `DynamicFilterOutput`), so slime
filters port unchanged. `args` is the flat config namespace (`Config.as_namespace()`).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from slipstream.types import Sample

FilterFn = Callable[..., Any]

log = logging.getLogger(__name__)


def check_reward_nonzero_std(args: Any, samples: list[Sample], **kwargs: Any) -> bool:
    """Keep a group unless all its rewards agree: then every GRPO advantage is zero.

    A group of one sample has no spread to measure and is kept (it is not "all equal"
    in a way that makes its gradient vanish any more than a group of one always does).
    """
    rewards = [s.get_reward_value(args) for s in samples]
    if len(rewards) <= 1:
        return True
    mean = sum(rewards) / len(rewards)
    variance = sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)
    return math.sqrt(variance) > 0.0


def keeps(result: Any) -> bool:
    """A filter's answer as a bool: a bool itself, or slime's `DynamicFilterOutput.keep`."""
    return bool(getattr(result, "keep", result))


def kept(fn: FilterFn, args: Any, samples: list[Sample], what: str) -> bool:
    """Whether filter `fn` keeps the group `samples` (`what` names it in the log). A filter that
    raises keeps the group: a bug in user code must not drop data."""
    try:
        return keeps(fn(args, samples))
    except Exception:  # noqa: BLE001 - whatever the user's code raised
        log.exception("--dynamic-sampling-filter-path failed on %s; keeping it", what)
        return True


class FilterLoadError(ValueError):
    """A `--dynamic-sampling-filter-path` that does not name a callable (one line)."""


def load_filter(spec: str) -> FilterFn:
    """Import `module:function`, or slime's dotted `package.module.function`."""
    where, sep, name = spec.rpartition(":")
    if not sep:
        where, _, name = spec.rpartition(".")
    if not where or not name:
        raise FilterLoadError(f"--dynamic-sampling-filter-path {spec}: expected module:function")
    try:
        module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, one line
        raise FilterLoadError(
            f"--dynamic-sampling-filter-path {spec}: cannot import {where}: {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FilterLoadError(f"--dynamic-sampling-filter-path {spec}: {where} has no function {name!r}")
    return fn
