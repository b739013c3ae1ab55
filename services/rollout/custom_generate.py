"""Multi-turn rollouts: a slime-style `--custom-generate-function-path` function run on this server.

The function has slime's signature, `async def generate(args, sample, sampling_params) -> Sample |
list[Sample]`: `args` is the flat config namespace (`cfg.as_namespace()`) with
`args.sglang_router_ip`/`args.sglang_router_port` naming this server's SGLang-compatible HTTP API,
`sample` a `slipstream.types.Sample` (prompt, prompt tokens, label, metadata; a partial being
continued also carries its earlier response, loss mask, log-probs and versions), `sampling_params`
SGLang's dict (temperature, top_p, top_k, max_new_tokens = what is left of the trajectory's
response budget, stop_token_ids, sampling_seed). It runs on the server's event loop, one task per
work item, and reaches the engine in one of two ways:
- over HTTP, `POST http://{args.sglang_router_ip}:{args.sglang_router_port}/generate`, exactly as
  against SGLang (the same file runs against either);
- in process, `engine_client().generate(body)`: the same request body and the same answer, with
  no HTTP in between; its requests are tied to the work item, so the turn limit is enforced as
  it goes and a coordinator abort or a swap stops them like any attached request.

What it returns is one trajectory: tokens = prompt + response, where the response mixes model
turns (`loss_mask` 1, with their log-probs) and tool or environment turns (`loss_mask` 0, log-prob
0). A list of one sample is taken as that sample; Slipstream trains one sample per work item, so a
longer list is refused. `finish()` checks the result and completes what slime leaves optional:
- policy versions per response token: the function's own when it recorded them (the HTTP answers
  carry `meta_info.output_token_versions`, the client's too), else the version served when the
  sample started, which is exact when swaps drain (the sample holds the version gate until it
  returns) and the conservative (oldest) value otherwise; a tool token takes its model turn's;
- the bounds on a runaway agent: at most `--custom-generate-max-turns` model turns (runs of
  `loss_mask` 1) and `--rollout-max-response-len` response tokens are kept (the rest is cut,
  TRUNCATED), and a function still running after `--custom-generate-timeout` seconds is cancelled
  (its HTTP requests are dropped, which aborts them in the engine) and its sample comes back
  TRUNCATED with what it had appended in place, if that is a consistent trajectory.

Partial rollout works across turns: a swap in `abort` mode aborts every turn in flight (the
function sees finish_reason "abort", returns its sample ABORTED, and the coordinator continues it
later under the new weights, calling the function again with the partial sample); `in_place`
swaps between decode steps (the answers' per-token versions show where); `drain` waits until
running samples return. A coordinator abort (over-sampling) aborts the sample's in-process turns
and cancels the function; the sample comes back ABORTED with what it had appended in place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import importlib
import importlib.util
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipstream.proto import types_pb2
from slipstream.rpc.convert import SampleError, check_sample, sample_from_proto, sample_to_proto
from slipstream.services.rollout.http_api import BadRequest, HttpApi, answer, parse_generate
from slipstream.services.rollout.worker import EngineWorker
from slipstream.types import Sample, Status
from slipstream.user_code import import_file

log = logging.getLogger(__name__)

GenerateFn = Callable[[argparse.Namespace, Sample, dict[str, Any]], Awaitable[Sample | list[Sample]]]
FLAG = "--custom-generate-function-path"


class GenerateFunctionError(ValueError):
    """A --custom-generate-function-path that does not load (one line)."""


def load_generate_function(spec: str) -> GenerateFn:
    """Import `module:function`, slime's dotted `package.module.function`, or `file.py:function`."""
    where, sep, name = spec.rpartition(":")
    if not sep:
        where, _, name = spec.rpartition(".")
    if not where or not name:
        raise GenerateFunctionError(f"{FLAG} {spec}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            module = import_file(Path(where), FLAG, GenerateFunctionError)
        else:
            module = importlib.import_module(where)
    except GenerateFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, one line
        raise GenerateFunctionError(
            f"{FLAG} {spec}: cannot import {where}: {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, name, None)
    if not inspect.iscoroutinefunction(fn):
        raise GenerateFunctionError(f"{FLAG} {spec}: {where} has no async function {name!r}")
    return fn


def sglang_sampling_params(sampling: types_pb2.SamplingParams, default_max_new_tokens: int) -> dict[str, Any]:
    """A work item's sampling parameters as SGLang's `sampling_params` dict (what slime passes)."""
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p or 1.0,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_new_tokens": sampling.max_new_tokens or default_max_new_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
    }
    if sampling.seed:
        params["sampling_seed"] = sampling.seed
    return params


# ---- the in-process client -------------------------------------------------------------------
_CLIENT: contextvars.ContextVar[EngineClient] = contextvars.ContextVar("slipstream_engine_client")


def engine_client() -> EngineClient:
    """The engine client of the sample whose generate function is running (LookupError elsewhere)."""
    return _CLIENT.get()


class EngineClient:
    """`/generate` without HTTP, for one sample: SGLang's request body in, SGLang's answer out."""

    def __init__(self, runner: CustomGenerator, rid: str, running: set[str]):
        self._runner = runner
        self._rid = rid  # the work item's "<work id>#<epoch>"
        self._running = running  # the attached requests a stream break or an abort-mode swap stops
        self._mine: list[str] = []
        self._turns = itertools.count(1)
        self.num_turns = 0

    async def generate(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """What `POST /generate` with `body` answers; ValueError (one line) for a body it refuses.

        A turn past --custom-generate-max-turns generates nothing: it finishes at once as
        "length", which a slime-style function reads as the end of the trajectory."""
        r = self._runner
        try:
            parsed = parse_generate(body, r.tokenizer, r.rids, r.default_max_new_tokens, r.vocab_size)
        except BadRequest as e:
            raise ValueError(str(e)) from None
        started = asyncio.get_running_loop().time()
        turn = next(self._turns)
        for i, req in enumerate(parsed.requests):
            req.rid = f"{self._rid}/t{turn}" + (f".{i}" if len(parsed.requests) > 1 else "")
        if self.num_turns >= r.max_turns:
            out = [_length_zero(req, parsed, r) for req in parsed.requests]
            return out if parsed.batch else out[0]
        self.num_turns += 1
        rids = [req.rid for req in parsed.requests]
        self._running.update(rids)
        self._mine = rids
        try:
            futures = [r.worker.submit(req) for req in parsed.requests]
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            r.worker.abort(rids)
            raise
        finally:
            self._running.difference_update(rids)
            self._mine = []
        out = [
            answer(res, req, r.tokenizer, parsed, started, r.worker.policy_version)
            for res, req in zip(results, parsed.requests, strict=True)
        ]
        return out if parsed.batch else out[0]

    def abort(self) -> None:
        """Abort this sample's turn in flight (it answers with finish_reason "abort")."""
        if self._mine:
            self._runner.worker.abort(list(self._mine))


def _length_zero(req, parsed, r: CustomGenerator) -> dict[str, Any]:
    from slipstream.services.rollout.engine import Result

    result = Result(rid=req.rid, tokens=[], log_probs=[], versions=[], finish_reason="length")
    return answer(result, req, r.tokenizer, parsed, 0.0, r.worker.policy_version)


# ---- the runner ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CustomGenerateConfig:
    max_turns: int  # --custom-generate-max-turns
    timeout: float  # --custom-generate-timeout, seconds per sample; 0 = none
    max_response_len: int  # --rollout-max-response-len: the trajectory's response budget


class CustomGenerator:
    """Runs the generate function for attached work items and turns what it returns into a wire sample."""

    def __init__(
        self,
        fn: GenerateFn,
        args: argparse.Namespace,
        settings: CustomGenerateConfig,
        worker: EngineWorker,
        tokenizer: Any,
        *,
        vocab_size: int,
        http: HttpApi | None = None,
    ):
        self.fn = fn
        self.args = args
        self.settings = settings
        self.max_turns = settings.max_turns
        self.worker = worker
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.default_max_new_tokens = settings.max_response_len
        self.http = http
        self.rids = itertools.count(1)
        self._tasks: dict[str, asyncio.Task] = {}  # work rid -> the function's task
        self._clients: dict[str, EngineClient] = {}

    async def generate(self, item, rid: str, running: set[str]) -> types_pb2.Sample:
        """The work item's sample, generated by the function (never raises for what the function does)."""
        sample = sample_from_proto(item.sample)
        params = sglang_sampling_params(item.sampling, self.default_max_new_tokens)
        started_version = self.worker.policy_version
        client = EngineClient(self, rid, running)
        ctx = contextvars.copy_context()
        ctx.run(_CLIENT.set, client)
        task = asyncio.create_task(self.fn(self.args, sample, params), context=ctx)
        self._tasks[rid], self._clients[rid] = task, client
        try:
            timeout = self.settings.timeout or None
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            del self._tasks[rid], self._clients[rid]
        if not done:  # over its wall-clock budget
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.warning("%s: generate function over --custom-generate-timeout %ss", item.work_id, timeout)
            return self._salvage(item.sample, sample, started_version, types_pb2.SAMPLE_STATUS_TRUNCATED)
        if task.cancelled():  # aborted by the coordinator
            return self._salvage(item.sample, sample, started_version, types_pb2.SAMPLE_STATUS_ABORTED)
        if task.exception() is not None:
            e = task.exception()
            log.error("%s: generate function failed: %s: %s", item.work_id, type(e).__name__, e)
            return _failed(item.sample)
        try:
            return self.finish(item.sample, task.result(), started_version)
        except SampleError as e:
            log.error("%s: generate function returned an unusable sample: %s", item.work_id, e)
            return _failed(item.sample)

    def abort(self, rids: list[str]) -> None:
        """The coordinator took these work items back: stop their turns and their functions."""
        for rid in rids:
            if rid in self._tasks:
                self._clients[rid].abort()
                self._tasks[rid].cancel()

    def abort_turns(self) -> None:
        """A swap in abort mode: every turn in flight answers "abort" (in-process turns are attached
        requests the caller aborts; HTTP ones are aborted here, as SGLang's pause_generation does)."""
        if self.http is not None:
            self.http.abort_all()

    def _salvage(self, original, sample: Sample, version: int, status: int) -> types_pb2.Sample:
        """What a cancelled function had appended to its sample in place, if consistent; else the
        sample as it came, with `status`."""
        try:
            out = self.finish(original, sample, version)
        except SampleError:
            out = types_pb2.Sample()
            out.CopyFrom(original)
        if out.response_length == original.response_length:
            out.CopyFrom(original)
        out.status = status
        return out

    def finish(self, original: types_pb2.Sample, returned: Any, version: int) -> types_pb2.Sample:
        """The wire sample of what the function returned: checked, versions filled, bounds applied."""
        if isinstance(returned, list):
            if len(returned) != 1:
                raise SampleError(
                    f"returned {len(returned)} samples; Slipstream trains one sample per work item"
                )
            returned = returned[0]
        if not isinstance(returned, Sample):
            raise SampleError(f"returned {type(returned).__name__}, not a slipstream.types.Sample")
        s = returned
        n = s.response_length
        if not 0 <= n <= len(s.tokens):
            raise SampleError(f"response_length {n} outside [0, {len(s.tokens)} tokens]")
        mask = list(s.loss_mask) if s.loss_mask is not None else [1] * n
        if len(mask) != n:
            raise SampleError(f"{len(mask)} loss_mask entries for a {n}-token response")
        if n and (s.rollout_log_probs is None or len(s.rollout_log_probs) != n):
            raise SampleError(
                f"rollout_log_probs must hold one entry per response token ({n}; 0.0 on tool tokens): "
                "ask /generate for return_logprob"
            )
        versions = _versions(s.policy_versions, mask, version)
        status = s.status if s.status is not Status.PENDING else Status.COMPLETED
        keep = _kept(mask, self.settings.max_turns, self.settings.max_response_len)
        if keep < n:
            status = Status.TRUNCATED
        prompt_len = len(s.tokens) - n
        tokens = s.tokens[: prompt_len + keep]
        out = sample_to_proto(
            Sample(
                uid=original.uid,
                group_index=s.group_index,
                index=s.index,
                prompt=s.prompt,
                tokens=tokens,
                response_length=keep,
                response=s.response if keep == n else self.tokenizer.decode(tokens[prompt_len:]),
                label=s.label,
                loss_mask=mask[:keep],
                rollout_log_probs=list(s.rollout_log_probs or [])[:keep],
                policy_versions=versions[:keep],
                status=status,
                metadata=s.metadata,
            )
        )
        out.uid, out.group_index, out.index = original.uid, original.group_index, original.index
        check_sample(out, self.vocab_size)
        return out


def _versions(given: list[int] | None, mask: list[int], version: int) -> list[int]:
    """Per response token: the function's versions as far as it recorded them, then `version` for
    model tokens; a tool token (mask 0) takes the version of the token before it."""
    out = list(given or [])[: len(mask)]  # a continued partial keeps its earlier tokens' versions
    last = out[-1] if out else version
    for m in mask[len(out) :]:
        out.append(version if m else last)
        last = out[-1]
    return out


def _kept(mask: list[int], max_turns: int, max_len: int) -> int:
    """How many response tokens stay: up to the end of the last allowed model turn, within max_len."""
    turns = 0
    for i, m in enumerate(mask[:max_len]):
        if m and (i == 0 or not mask[i - 1]):
            turns += 1
            if turns > max_turns:
                return i
    return min(len(mask), max_len)


def _failed(original: types_pb2.Sample) -> types_pb2.Sample:
    out = types_pb2.Sample()
    out.CopyFrom(original)
    out.status = types_pb2.SAMPLE_STATUS_FAILED
    return out
