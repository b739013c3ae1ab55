"""CUDA graphs of the decode step: the whole forward plus sampling, replayed as one launch.

Why. A decode step of a 28-layer model is hundreds of kernels (~1,100 through the model's own
forward, ~290 through `fused_step.py`); launched one by one from Python the GPU waits on the CPU
(20-30 ms a step at batch 1 on an H200 for the unfused forward, where the kernels themselves need
about a tenth of that). Captured once and replayed, the launches cost one call.

How shapes stay static. A graph replays fixed shapes at fixed addresses, so each one is captured
for a (batch bucket, KV-length bucket, truncation) key: the batch is padded up to the next bucket,
attention runs over the preallocated cache up to the KV bucket with a length mask (`kv_cache.py`;
the fused step's attention kernel reads each slot to its own length instead), and every input is
copied into one set of static buffers before the replay. Padding rows decode a dummy token into
free slots (slots >= n are unused during decode and overwritten at admission), so they cost
compute but never touch a live sequence. Graphs are captured lazily, the first time
their key is seen, into one shared memory pool: only one of them runs at a time, and its outputs
are consumed before the next replay.

Weights are updated in place (`NativeEngine.load_weights` copies into the same tensors) and the
cache never moves once preallocated, so the graphs stay valid across weight versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.models import Qwen3ForCausalLM, Routing
from slipstream.services.rollout.engine.fused_step import FusedDecoder
from slipstream.services.rollout.engine.kv_cache import KVCache
from slipstream.services.rollout.engine.sampler import SamplingParams, sample

KV_BUCKET = 128


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, then every multiple of 16, capped at (and always including) max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes)) + [max_batch]


def kv_bucket(kv_len: int, capacity: int) -> int:
    """Smallest power-of-two multiple of KV_BUCKET that holds kv_len, capped at the capacity."""
    size = KV_BUCKET
    while size < kv_len:
        size *= 2
    return min(size, capacity)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    log_probs: torch.Tensor
    experts: torch.Tensor | None  # MoE: the expert ids each fed token was routed to, [b, layers, k]


class DecodeGraphs:
    def __init__(
        self, model: Qwen3ForCausalLM, cache: KVCache, max_batch: int, fused: FusedDecoder | None = None
    ) -> None:
        """`fused`: the forward to capture (`fused_step.py`); None captures the model's own."""
        if not cache.fixed:
            raise ValueError("CUDA graphs need a preallocated KV cache")
        self.model, self.cache, self.fused = model, cache, fused
        self.buckets = batch_buckets(max_batch)
        device = cache.device
        self.tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        # Index of the token being sampled (= sequence length so far); its KV position is one less.
        self.index = torch.ones(max_batch, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.top_k = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.temperature = torch.ones(max_batch, dtype=torch.float32, device=device)
        self.top_p = torch.ones(max_batch, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int, bool], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(
        self, n: int, kv_len: int, last_token: torch.Tensor, params: SamplingParams, truncate: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decode one token for slots 0..n-1 (their KV spans < kv_len); tokens [n], log-probs [n], and
        for an MoE model the experts of each fed token [n, layers, k] (else None)."""
        b = self.bucket(n)
        key = (b, kv_bucket(kv_len, self.cache.capacity), truncate)
        self.tokens[:n].copy_(last_token)
        self.index[:n].copy_(params.positions)
        self.seeds[:n].copy_(params.seeds)
        self.top_k[:n].copy_(params.top_k)
        self.temperature[:n].copy_(params.temperature)
        self.top_p[:n].copy_(params.top_p)
        if b > n:  # padding rows: token 0 at KV position 0 of a free slot, plain sampling
            self.tokens[n:b] = 0
            self.index[n:b] = 1
            self.temperature[n:b] = 1.0
            self.top_p[n:b] = 1.0
            self.top_k[n:b] = 0
        captured = self.graphs.get(key) or self._capture(*key)
        captured.graph.replay()
        experts = None if captured.experts is None else captured.experts[:n]
        return captured.tokens[:n], captured.log_probs[:n], experts

    def _step(self, b: int, kv_len: int, truncate: bool):
        positions = self.index[:b] - 1
        routing = Routing() if self.model.config.moe_layers else None
        if self.fused is not None:  # attends over each slot's own length; kv_len only keys the graph
            hidden = self.fused(self.tokens[:b], positions, self.cache)
        else:
            attention = self.cache.decode(positions, kv_len)
            hidden = self.model.model(self.tokens[:b, None], positions[:, None], attention, routing)[:, -1]
        logits = self.model.lm_head(hidden)
        params = SamplingParams(
            temperature=self.temperature[:b],
            top_p=self.top_p[:b],
            top_k=self.top_k[:b],
            seeds=self.seeds[:b],
            positions=self.index[:b],
        )
        return (*sample(logits, params, truncate), None if routing is None else routing.stacked()[:, 0])

    def _capture(self, b: int, kv_len: int, truncate: bool) -> _Captured:
        # One eager run first, on a side stream as capture requires: it initializes cuBLAS
        # workspaces, compiles Triton kernels and fills lazy caches (RoPE frequencies) that must
        # not be created during capture. It writes the same KV values the replay will write.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(b, kv_len, truncate)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local capture: the rollout server stages a weights version on another thread
        # (CUDA IPC opens, copies, a header read back) while this thread may be capturing a new
        # bucket; under the default global mode any such call invalidates the capture and fails
        # itself (cudaErrorStreamCaptureInvalidated / ...Unsupported: the H200 run's dead servers).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            tokens, log_probs, experts = self._step(b, kv_len, truncate)
        captured = _Captured(graph, tokens, log_probs, experts)
        self.graphs[(b, kv_len, truncate)] = captured
        return captured
