"""Per-slot state of the running batch: sampling parameters, lengths and generated outputs, and
what of it travels to the host.

Slot i of this table is slot i of the KV cache. Small per-slot scalars live on the host (the
engine needs their maxima and flags every step without a device sync, and copying n numbers to
the device is free); what the decode step writes every token (the last token, the generated
tokens, their log-probs and versions) lives on the device and is read back once, when the
sequence finishes. Outputs are indexed by absolute position in the sequence, so a row's
response is `out_tokens[i, prompt_len:length]`; they hold one position more than the KV cache,
for the token a row that already finished decodes before the host knows it finished (`runner.py`
reads the finished flags one step late). A mixture-of-experts model also writes, at the
position of every token it is fed (prompt included, by prefill), the expert ids each MoE layer
routed it to: `out_experts[i, pos]`, `experts_per_token` = MoE layers x top-k small integers.

Nothing here makes the host wait for the GPU. Host -> device copies go through pinned memory
(`to_device`: from pageable memory CUDA may synchronise the stream first); device -> host reads
are started with `non_blocking=True` into pinned memory and an event, and waited on one step
later (`Statuses`, `Retired`), when the GPU is already busy with the next step.
"""

from __future__ import annotations

import torch

from slipstream.services.rollout.engine.request import FinishReason, Request, Result
from slipstream.services.rollout.engine.sampler import SamplingParams

_SEED_MASK = (1 << 63) - 1
RUNNING, STOP, LENGTH = 0, 1, 2  # a row's status code after a step
_REASONS: dict[int, FinishReason] = {STOP: "stop", LENGTH: "length"}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, queued without waiting for the GPU (the caching host
    allocator keeps the pinned copy alive until the transfer has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in pinned host memory, queued; valid once the caller's event is done."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _recorded(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far (None on the CPU, where that work is done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class Slots:
    def __init__(
        self, device: torch.device, experts_per_token: int = 0, expert_dtype: torch.dtype = torch.uint8
    ) -> None:
        """`experts_per_token` 0: a dense model (no routing recorded)."""
        self.device = device
        self.requests: list[Request] = []  # [n] the request in each occupied slot, in slot order
        host = dict(dtype=torch.int64)
        self.length = torch.zeros(0, **host)  # tokens so far, prompt included (last one not in KV yet)
        self.prompt_len = torch.zeros(0, **host)
        self.max_new = torch.zeros(0, **host)
        self.seed = torch.zeros(0, **host)
        self.top_k = torch.zeros(0, **host)
        self.temperature = torch.zeros(0)
        self.top_p = torch.zeros(0)
        self.stop_ids = torch.full((0, 1), -1, **host)  # [S, max stops], -1 padded
        self.last_token = torch.zeros(0, dtype=torch.int64, device=device)
        self.out_tokens = torch.zeros((0, 0), dtype=torch.int64, device=device)
        self.out_log_probs = torch.zeros((0, 0), dtype=torch.float32, device=device)
        self.out_versions = torch.zeros((0, 0), dtype=torch.int64, device=device)
        self.out_experts = torch.zeros((0, 0, experts_per_token), dtype=expert_dtype, device=device)

    @property
    def num_running(self) -> int:
        return len(self.requests)

    def _host(self) -> list[str]:
        return ["length", "prompt_len", "max_new", "seed", "top_k", "temperature", "top_p", "stop_ids"]

    def _device(self) -> list[str]:
        return ["last_token", "out_tokens", "out_log_probs", "out_versions", "out_experts"]

    def resize(self, num_slots: int, capacity: int) -> None:
        """Match the KV cache's shape (num_slots slots, capacity positions); keeps contents."""
        for name in self._host() + self._device():
            old = getattr(self, name)
            outputs = (capacity + 1, *old.shape[2:])  # + 1: the token decoded after a finish
            shape = (num_slots,) + (outputs if name.startswith("out_") else old.shape[1:])
            new = torch.full(shape, -1 if name == "stop_ids" else 0, dtype=old.dtype, device=old.device)
            keep = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape, strict=True))
            new[keep] = old[keep]
            setattr(self, name, new)

    def fill(
        self, first: int, requests: list[Request], eos_token_ids: list[int], default_seeds: list[int]
    ) -> None:
        """Write the parameters of `requests` into slots first.. (admission; one host pass)."""
        rows = slice(first, first + len(requests))
        stops = [sorted(set(eos_token_ids) | set(r.stop_token_ids)) for r in requests]
        width = max([1, *(len(s) for s in stops)])
        if width > self.stop_ids.shape[1]:
            pad = torch.full((self.stop_ids.shape[0], width - self.stop_ids.shape[1]), -1, dtype=torch.int64)
            self.stop_ids = torch.cat([self.stop_ids, pad], dim=1)
        self.stop_ids[rows] = -1
        for i, s in enumerate(stops):
            self.stop_ids[first + i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        self.length[rows] = torch.tensor([len(r.tokens) for r in requests])
        self.prompt_len[rows] = self.length[rows]
        self.max_new[rows] = torch.tensor([r.max_new_tokens for r in requests])
        seeds = [d if r.seed is None else r.seed for r, d in zip(requests, default_seeds, strict=True)]
        self.seed[rows] = torch.tensor([s & _SEED_MASK for s in seeds])
        self.top_k[rows] = torch.tensor([r.top_k for r in requests])
        self.temperature[rows] = torch.tensor([r.temperature for r in requests], dtype=torch.float32)
        self.top_p[rows] = torch.tensor([r.top_p for r in requests], dtype=torch.float32)
        self.requests[first:first] = requests

    def sampling(self, rows: slice) -> tuple[SamplingParams, bool]:
        """Sampling parameters of `rows` on the device, and whether any row truncates."""
        truncate = bool((self.top_k[rows] > 0).any() or (self.top_p[rows] < 1).any())

        def dev(t: torch.Tensor) -> torch.Tensor:
            return to_device(t[rows], self.device)

        params = SamplingParams(
            temperature=dev(self.temperature),
            top_p=dev(self.top_p),
            top_k=dev(self.top_k),
            seeds=dev(self.seed),
            positions=dev(self.length),
        )
        return params, truncate

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots src -> dst (disjoint); the caller then truncates `requests`."""
        s, d = torch.tensor(src), torch.tensor(dst)
        for name in self._host():
            t = getattr(self, name)
            t[d] = t[s]
        s, d = to_device(s, self.device), to_device(d, self.device)
        for name in self._device():
            t = getattr(self, name)
            t[d] = t[s]
        for i, j in zip(src, dst, strict=True):
            self.requests[j] = self.requests[i]


class Statuses:
    """One step's status codes on their way to the host, with the rows they describe then."""

    def __init__(self, status: torch.Tensor, slots: Slots) -> None:
        """`status` [n]: the codes of slots 0..n-1 (every occupied slot) after the step just queued."""
        self.codes = _to_host(status)
        self.requests = list(slots.requests)
        self.lengths = slots.length[: len(self.requests)].clone()  # where a finished response ends
        self.event = _recorded(status.device)

    def finished(self, slots: Slots) -> list[tuple[int, FinishReason, int]]:
        """(slot now, reason, length when it finished) of each finished row still in a slot; waits
        for the step. Slots may have moved since (compaction), so rows are found by their request."""
        if self.event is not None:
            self.event.synchronize()
        done = torch.nonzero(self.codes).squeeze(1).tolist()
        if not done:
            return []
        slot_of = {id(req): i for i, req in enumerate(slots.requests)}
        return [
            (slot_of[id(self.requests[i])], _REASONS[int(self.codes[i])], int(self.lengths[i]))
            for i in done
            if id(self.requests[i]) in slot_of  # else retired already (an earlier finish)
        ]


class Retired:
    """The outputs of retiring slots on their way to the host; `results()` waits and builds them.

    Queued before the slots are reused, so the copies read what the slots held at retirement.
    """

    def __init__(self, slots: Slots, rows: list[int], reasons: list[FinishReason], ends: list[int]) -> None:
        """`ends`: each row's length when it finished (a response is prompt_len..end-1)."""
        index = to_device(torch.tensor(rows), slots.device)
        width = max(ends)
        self.tokens, self.log_probs, self.versions = (
            _to_host(t[index, :width]) for t in (slots.out_tokens, slots.out_log_probs, slots.out_versions)
        )
        self.experts = _to_host(slots.out_experts[index, :width]) if slots.out_experts.shape[2] else None
        self.rows = [
            (slots.requests[row].rid, int(slots.prompt_len[row]), end, reason)
            for row, reason, end in zip(rows, reasons, ends, strict=True)
        ]
        self.event = _recorded(slots.device)

    def results(self) -> list[Result]:
        if self.event is not None:
            self.event.synchronize()
        results = []
        for k, (rid, prompt_len, end, reason) in enumerate(self.rows):
            span = slice(prompt_len, end)
            results.append(
                Result(
                    rid=rid,
                    tokens=self.tokens[k, span].tolist(),
                    log_probs=self.log_probs[k, span].tolist(),
                    versions=self.versions[k, span].tolist(),
                    finish_reason=reason,
                    routed_experts=None if self.experts is None else self.experts[k, : end - 1].clone(),
                )
            )
        return results
