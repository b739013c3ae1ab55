"""CUDA graphs of the decode step: the whole forward plus sampling, replayed as one launch.

Why. A decode step of a 28-layer model is hundreds of kernels (~1,100 through the model's own
forward, ~290 through `fused_step.py`); launched one by one from Python the GPU waits on the CPU
(20-30 ms a step at batch 1 on an H200 for the unfused forward, where the kernels themselves need
about a tenth of that). Captured once and replayed, the launches cost one call.

What the host does a step: nothing but the replay. The graph reads its inputs from the slots'
device tables (`slots.py`: the last tokens, lengths and sampling parameters, written there at
admission and compaction only) and writes its outputs there too: the sampled token, its log-prob
and version into the rows' outputs, the lengths one further, and each row's status
(running/stop/length), which `finishes.py` copies to the host. So a step launches no kernel and
copies nothing before the replay, and one small copy after it (the step's host work was longer
than its replay at small batches when it copied six inputs in and wrote the outputs eagerly).

How shapes stay static. A graph replays fixed shapes at fixed addresses, so each one is captured
for a (batch bucket, KV-length bucket, truncation) key: the batch is padded up to the next bucket,
attention runs over the preallocated cache up to the KV bucket with a length mask (`kv_cache.py`;
the fused step's attention kernel reads each slot to its own length instead), and the number of
running rows is a device scalar the graph reads. Padding rows (slots >= n, unused during decode
and overwritten at admission) decode a dummy token at position 0 of their free slot and write
it into that slot's outputs, never touching a live sequence; their lengths stay. The rollout
server captures every batch bucket at the first KV bucket before it serves (`warm_up`); other
keys are captured the first time they are seen. All go into one shared memory pool: only one of
them runs at a time, and its status is copied out before the next replay. A device table that is
reallocated (`Slots.generation`: a wider stop-id table) drops the graphs that read the old one.

Off CUDA (tests), the same step runs eagerly each time: the graph's function without the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slipstream.models import Routing
from slipstream.services.rollout.engine.sampler import sample

if TYPE_CHECKING:
    from slipstream.services.rollout.engine.runner import ModelRunner

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
    status: torch.Tensor  # [b] each row's status code after the step


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        """Capture `runner`'s decode step (its fused decoder if it has one, else the model's own
        forward) over its cache, slots, version and length limit."""
        if not runner.cache.fixed:
            raise ValueError("CUDA graphs need a preallocated KV cache")
        self.model, self.cache, self.fused = runner.model, runner.cache, runner.fused
        self.slots, self.version = runner.slots, runner.version
        self.buckets = batch_buckets(runner.max_batch_size)
        device = self.cache.device
        self.capture = device.type == "cuda"
        self.rows = torch.arange(runner.max_batch_size, device=device)
        self.num_running = torch.zeros((), dtype=torch.int64, device=device)  # rows < it hold a sequence
        self._num_running = 0  # what the host last wrote there
        self.graphs: dict[tuple[int, int, bool], _Captured] = {}
        self._generation = self.slots.generation
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def set_running(self, n: int) -> None:
        """Rows < n hold a sequence, the rest are padding (a scalar fill, queued: no copy, no wait)."""
        if n != self._num_running:
            self.num_running.fill_(n)
            self._num_running = n

    def run(self, n: int, kv_len: int, truncate: bool) -> torch.Tensor:
        """Decode one token for slots 0..n-1 (their KV spans < kv_len); each row's status [n]. The
        rows' outputs, last tokens and device lengths are written (`Slots.record`); the caller
        advances the host's lengths."""
        if self.slots.generation != self._generation:  # a table the graphs read was reallocated
            self.graphs.clear()
            # and a new pool: capturing into one whose graphs are all gone trips the caching
            # allocator's assert (use_count > 0, torch 2.11 on the H200)
            self.pool = torch.cuda.graph_pool_handle() if self.capture else None
            self._generation = self.slots.generation
        self.set_running(n)
        b = self.bucket(n)
        key = (b, kv_bucket(kv_len, self.cache.capacity), truncate)
        if not self.capture:
            return self._step(*key)[:n]
        captured = self.graphs.get(key) or self._capture(*key)
        captured.graph.replay()
        return captured.status[:n]

    def _step(self, b: int, kv_len: int, truncate: bool) -> torch.Tensor:
        s = self.slots
        live = self.rows[:b] < self.num_running
        index = torch.where(live, s.dev_ints[0, :b], 1)  # the token sampled; padding: the second
        positions = index - 1  # its KV position
        tokens = s.last_token[:b]  # a padding row's is some earlier token of its free slot
        routing = Routing() if self.model.config.moe_layers else None
        if self.fused is not None:  # attends over each slot's own length; kv_len only keys the graph
            hidden = self.fused(tokens, positions, self.cache)
        else:
            attention = self.cache.decode(positions, kv_len)
            hidden = self.model.model(tokens[:, None], positions[:, None], attention, routing)[:, -1]
        logits = self.model.lm_head(hidden)
        params = s.params(slice(0, b))  # a padding row's: its free slot's last, any valid ones
        params.positions = index
        sampled, log_probs = sample(logits, params, truncate)
        if routing is not None:  # [b, layers * k]: the experts of each fed token
            fed = routing.stacked()[:, 0].reshape(b, -1).to(s.out_experts.dtype)
            s.out_experts[s.slot_ids[:b], positions] = fed
        return s.record(slice(0, b), index, sampled, log_probs, self.version, live)

    def warm_up(self, kv_len: int = KV_BUCKET, truncate: bool = False) -> int:
        """Capture every batch bucket's graph at `kv_len`'s KV bucket (untruncated sampling by
        default) before any request: a first batch of any size then replays, as SGLang's graphs
        are captured at start-up. Captured lazily instead, the first batches of a run wait for
        Triton's compiles and one capture per new bucket (a 25M-parameter model's first training
        step waited 1.3-2.3 s for its four rollout servers doing that at once). Every row is
        padding here, so no sequence is touched. Returns how many graphs it captured; off CUDA it
        runs each bucket's step once (what a capture runs first) and captures nothing."""
        if self.slots.num_running:
            raise RuntimeError("warm_up() needs an idle engine: no sequence may be running")
        self.set_running(0)
        kv = kv_bucket(kv_len, self.cache.capacity)
        keys = [(b, kv, truncate) for b in self.buckets if (b, kv, truncate) not in self.graphs]
        for key in keys:
            if self.capture:
                self._capture(*key)
            else:
                self._rehearse(*key)
        return len(keys) if self.capture else 0

    def _rehearse(self, b: int, kv_len: int, truncate: bool) -> None:
        """Run the step once eagerly and put back the lengths and last tokens it moved on. Its
        other writes are a replay's: the same KV values and outputs (a padding row writes only
        into its own free slot)."""
        s = self.slots
        lengths, last = s.dev_ints[0, :b].clone(), s.last_token[:b].clone()
        self._step(b, kv_len, truncate)
        s.dev_ints[0, :b], s.last_token[:b] = lengths, last

    def _capture(self, b: int, kv_len: int, truncate: bool) -> _Captured:
        # One eager run first, on a side stream as capture requires: it initializes cuBLAS
        # workspaces, compiles Triton kernels and fills lazy caches (RoPE frequencies) that must
        # not be created during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._rehearse(b, kv_len, truncate)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local capture: the rollout server stages a weights version on another thread
        # (CUDA IPC opens, copies, a header read back) while this thread may be capturing a new
        # bucket; under the default global mode any such call invalidates the capture and fails
        # itself (cudaErrorStreamCaptureInvalidated / ...Unsupported: the H200 run's dead servers).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            status = self._step(b, kv_len, truncate)
        captured = _Captured(graph, status)
        self.graphs[(b, kv_len, truncate)] = captured
        return captured
