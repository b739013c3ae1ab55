"""The native engine: batched prefill and decode over a slot-based KV cache, continuous batching.

One `step()` is: queue the decode of one token for every sequence in a slot, admit waiting
requests (one right-padded prefill that also samples each one's first token), then read which
rows the previous step finished, retire them and hand back the `Result`s of those retired the step
before. Reading one step late keeps the GPU busy while the host schedules (`finishes.py`: a row
decodes one token past its finish, which is dropped; results are those of reading at once); on
the CPU a step reads its own finishes at once (`read_late`). A speculative step is read late too:
the host's lengths are upper bounds until its statuses bring the device's (`finishes.py`).
Requests join between steps, so the batch refills as soon as a slot frees up.

The engine is two parts, nano-vllm's split: what runs next (`scheduler.py`: the waiting queue,
admission with prefill shared within a GRPO group, which slots a retire frees) and how it runs
(`runner.py`: the model, the KV cache, the prefill and the decode paths — CUDA graphs, fused
decode, eager — FP8, and the in-place weight swap). This file is the step that joins them and
the `Engine` surface (`base.py`) the rollout server drives.

Whether to drain, abort or keep going across a version change is the rollout server's policy,
built from `abort`/`abort_all`; the engine only guarantees that every token carries the policy
version that produced it.
"""

from __future__ import annotations

import torch

from slipstream.models import Qwen3ForCausalLM
from slipstream.models.draft import DraftHead
from slipstream.services.rollout.engine.fused_step import FusedDecoder
from slipstream.services.rollout.engine.graphs import DecodeGraphs
from slipstream.services.rollout.engine.kv_cache import KVCache
from slipstream.services.rollout.engine.request import Request, Result
from slipstream.services.rollout.engine.runner import ModelRunner
from slipstream.services.rollout.engine.scheduler import Scheduler
from slipstream.services.rollout.engine.speculative import Speculator


class NativeEngine:
    name = "native"

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        eos_token_ids: list[int],
        max_batch_size: int = 256,
        max_seq_len: int | None = None,
        policy_version: int = 0,
        *,
        seed: int = 0,
        max_prefill_tokens: int = 16384,
        fp8: bool = False,
        kv_memory_fraction: float = 0.8,
        preallocate: bool | None = None,
        cuda_graphs: bool = True,
        fused_decode: bool = True,
        kv_cache_dtype: str = "auto",
        int4_targets: str = "",
        draft: DraftHead | None = None,
        speculative_num_steps: int = 3,
        true_on_policy: bool = False,
    ) -> None:
        """`seed` seeds requests that bring none; `max_prefill_tokens` bounds one prefill's padded
        batch (batch x distinct prompts' longest length), one request always fits.

        `fp8` converts the linear projections to FP8 (in place: the engine owns `model`);
        `int4_targets` (--int4-qat-targets, "" = off) serves those weights W4A16 (`runner.py`).
        `preallocate` (default: on CUDA) allocates the KV cache once, `max_batch_size` slots of
        `max_seq_len`, fewer if they do not fit in `kv_memory_fraction` of the memory free after
        the weights. `cuda_graphs` replays decode steps from CUDA graphs (CUDA and a
        preallocated cache only). `fused_decode` runs decode through `fused_step.FusedDecoder`
        (CUDA only: fused projections and glue kernels; off, the model's own forward).
        `kv_cache_dtype`: "auto" (the model's dtype) or "fp8_e4m3" (`kv_cache.py` says how).
        `draft`: a draft head (`models/draft.py`, of `policy_version`) to decode speculatively
        with, `speculative_num_steps` tokens a step (`speculative.py`). `true_on_policy`
        (--true-on-policy-mode): batch-invariant kernels (`kernels/invariant.py`), so the log-probs
        of the sampled tokens are the trainer's bit for bit."""
        self.runner = ModelRunner(
            model, eos_token_ids, max_batch_size, max_seq_len, policy_version,
            seed=seed, fp8=fp8, kv_memory_fraction=kv_memory_fraction, preallocate=preallocate,
            cuda_graphs=cuda_graphs, fused_decode=fused_decode, kv_cache_dtype=kv_cache_dtype,
            int4_targets=int4_targets,
            draft_layers=draft.num_layers if draft is not None else 0, invariant=true_on_policy,
        )  # fmt: skip
        if draft is not None:
            self.runner.speculator = Speculator(draft, speculative_num_steps, policy_version, self.runner)
        runner = self.runner  # the batch is sized by what the KV cache fits
        self.scheduler = Scheduler(runner.max_batch_size, runner.max_seq_len, max_prefill_tokens)
        self._rids: set[str] = set()  # every request waiting, running or finished but not handed back
        self._ready: list[Result] = []  # finished results an abort read early, for the next step
        # Whether a step reads the last step's finishes (late, the GPU busy with this one) or its
        # own (at once). Late pays only where a step runs asynchronously: on a GPU. On the CPU a
        # step is done when its ops return, and the token a finished row decodes before its finish
        # is read (and the step an admission then waits for its slot) is pure loss: 2-11% of CPU
        # tokens/s measured.
        self.read_late = runner.device.type == "cuda"

    # -- the Engine surface ----------------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self.runner.policy_version

    @property
    def max_batch_size(self) -> int:
        return self.runner.max_batch_size

    @property
    def num_running(self) -> int:
        return self.runner.num_running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return (
            bool(self.scheduler.waiting or self._ready)
            or self.num_running > 0
            or self.runner.finishes.in_flight
        )

    @torch.no_grad()
    def warm_up(self) -> int:
        """Before the first request: one group of two through prefill (shared prompt), decode and
        retire, so every kernel of those paths is compiled, then the decode graphs of every batch
        size at the first KV bucket (`DecodeGraphs.warm_up`). On a fresh machine a small model's
        first training step waited 5.3 s for its rollout servers compiling Triton kernels on their
        first batch (1.3-2.3 s with a warm Triton cache, capturing). The engine is left as it
        was: idle, drawing the same seeds for later requests. Returns how many decode graphs it
        holds (0 without CUDA graphs)."""
        if self.has_work():
            raise RuntimeError("warm_up() needs an idle engine: no request may be waiting or running")
        runner = self.runner
        rng, prefilled = runner._rng.get_state(), runner.num_prefill_tokens
        self.generate([Request(f"warm-up-{i}", [0, 0], 2, seed=i) for i in range(2)])
        runner._rng.set_state(rng)
        runner.num_prefill_tokens = prefilled
        if runner.graphs is None:
            return 0
        runner.graphs.warm_up()
        return len(runner.graphs.graphs)

    def add_request(self, req: Request) -> None:
        if req.rid in self._rids:
            raise ValueError(f"request {req.rid} is already in the engine")
        self._rids.add(req.rid)
        self.scheduler.add(req)

    @torch.no_grad()
    def step(self) -> list[Result]:
        """Decode one token for the running requests, admit waiting ones; return the results that
        came back (reading late, a request's comes two steps after its last token)."""
        results, self._ready = self._ready, []
        num_old = self.num_running
        codes = []
        if num_old:
            codes.append(self.runner.decode(num_old))
        admission = self.scheduler.admit(num_old, results)  # adds those that cannot run at all
        if admission is not None:
            codes.append(self.runner.prefill(admission, first=num_old))
        # The GPU has this step queued: now read the last one's finishes, retire those rows.
        status = codes[0] if len(codes) == 1 else torch.cat(codes) if codes else None
        results += self.runner.finishes.settle(status)
        if not self.read_late:
            results += self.runner.finishes.drain()
        self._rids.difference_update(r.rid for r in results)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy (a subset of) weights in place between steps; a bad update changes nothing."""
        self.runner.load_weights(state_dict, version)

    @torch.no_grad()
    def abort(self, rid: str) -> Result | None:
        """Stop one request now; its partial result (tokens so far), or None if unknown. A request
        that finished in a step whose result has not come back yet returns that result instead."""
        if rid not in self._rids:
            return None
        self._rids.discard(rid)
        self._ready += self.runner.finishes.drain()
        for i, result in enumerate(self._ready):
            if result.rid == rid:
                return self._ready.pop(i)
        result = self.scheduler.abort(rid)
        if result is not None:
            return result
        row = next(row for row, req in enumerate(self.runner.slots.requests) if req.rid == rid)
        return self.runner.finishes.abort([row])[0]

    @torch.no_grad()
    def abort_all(self) -> list[Result]:
        """Stop everything; the finished ones not handed back yet come back as they finished."""
        self._rids.clear()
        results, self._ready = self._ready + self.runner.finishes.drain(), []
        results += self.scheduler.abort_all()
        if self.num_running:
            results += self.runner.finishes.abort(list(range(self.num_running)))
        return results

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` to completion on an idle engine; results in the same order."""
        if self.has_work():
            raise RuntimeError("generate() needs an idle engine; use add_request/step alongside other work")
        for req in requests:
            self.add_request(req)
        done: dict[str, Result] = {}
        while self.has_work():
            for result in self.step():
                done[result.rid] = result
        return [done[req.rid] for req in requests]

    # -- the runner's nouns, where tests and benchmarks look for them ----------------------------

    @property
    def model(self) -> Qwen3ForCausalLM:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @cache.setter
    def cache(self, cache: KVCache | None) -> None:  # a benchmark drops it to free the memory
        self.runner.cache = cache

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.runner.graphs

    @property
    def fused(self) -> FusedDecoder | None:
        return self.runner.fused

    @property
    def speculator(self) -> Speculator | None:
        return self.runner.speculator

    @property
    def num_prefill_tokens(self) -> int:
        return self.runner.num_prefill_tokens
