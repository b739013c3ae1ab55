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
(`to_device`: from pageable memory CUDA may synchronise the stream first); what travels back, the
statuses and the outputs of finished rows, is `finishes.py`'s.
"""

from __future__ import annotations

import torch

from slipstream.services.rollout.engine.request import Request
from slipstream.services.rollout.engine.sampler import SamplingParams

_SEED_MASK = (1 << 63) - 1


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, queued without waiting for the GPU (the caching host
    allocator keeps the pinned copy alive until the transfer has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
