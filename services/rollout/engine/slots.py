"""Per-slot state of the running batch: sampling parameters, lengths and generated outputs, and
what of it travels between host and device.

Slot i of this table is slot i of the KV cache. The per-slot scalars (length, prompt length,
token budget, seed, top-k, the length a row stops at; temperature, top-p; stop token ids) are
kept twice, in the same packed layout: on the host, where the engine needs their maxima and
flags every step without a device sync, and on the device, where the decode step reads them
and advances the lengths itself, inside its CUDA graph. The host writes the device's copy when
it changes the table (admission, compaction); a decode step costs it no copy at all: it adds one
to its own lengths as the device does to its. A speculative step keeps 1..k+1 tokens a row, which
the host learns a step later: it adds k + 1, so its lengths are upper bounds (`bounded`) until
the step's lengths come back with its statuses and correct them (`finishes.py`). What the decode
step writes every token (the last token, the generated tokens, their log-probs and versions)
lives on the device only and is read back once, when the sequence finishes. Outputs are indexed by
absolute position in the sequence, so a row's response is `out_tokens[i, prompt_len:length]`;
they hold one position more than the KV cache, for the token a row that already finished
decodes before the host knows it finished (`runner.py` reads the finished flags one step late).
A mixture-of-experts model also writes, at the position of every token it is fed (prompt
included, by prefill), the expert ids each MoE layer routed it to: `out_experts[i, pos]`,
`experts_per_token` = MoE layers x top-k small integers.

Nothing here makes the host wait for the GPU. Host -> device copies go through pinned memory
(`to_device`: from pageable memory CUDA may synchronise the stream first); what travels back, the
statuses and the outputs of finished rows, is `finishes.py`'s.
"""

from __future__ import annotations

import torch

from slipstream.services.rollout.engine.request import Request
from slipstream.services.rollout.engine.sampler import SamplingParams

_SEED_MASK = (1 << 63) - 1
RUNNING, STOP, LENGTH = 0, 1, 2  # a row's status code after a step
# Columns of the integer table: `limit` is the length a row stops at, min(prompt_len + max_new,
# max_seq_len), so the decode step checks one number for both length limits.
_INTS = ("length", "prompt_len", "max_new", "seed", "top_k", "limit")
_FLOATS = ("temperature", "top_p")
_STOP_WIDTH = 4  # stop ids a row holds before the tables widen (eos ids + a few of the request's)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, queued without waiting for the GPU (the caching host
    allocator keeps the pinned copy alive until the transfer has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _column(table: str, i: int) -> property:
    return property(lambda self: getattr(self, table)[i])


class Slots:
    # Host columns (views into `ints` / `floats`: writes through them update the table).
    length = _column("ints", 0)  # tokens so far, prompt included (last one not in KV yet)
    prompt_len = _column("ints", 1)
    max_new = _column("ints", 2)
    seed = _column("ints", 3)
    top_k = _column("ints", 4)
    limit = _column("ints", 5)
    temperature = _column("floats", 0)
    top_p = _column("floats", 1)

    def __init__(
        self, device: torch.device, experts_per_token: int = 0, expert_dtype: torch.dtype = torch.uint8
    ) -> None:
        """`experts_per_token` 0: a dense model (no routing recorded)."""
        self.device = device
        self.requests: list[Request] = []  # [n] the request in each occupied slot, in slot order
        # Column-major ([column, slot]): each column is contiguous, as the sampling kernel reads it.
        self.ints = torch.zeros((len(_INTS), 0), dtype=torch.int64)
        self.floats = torch.zeros((len(_FLOATS), 0))
        self.stop_ids = torch.full((0, _STOP_WIDTH), -1, dtype=torch.int64)  # [S, max stops], -1 padded
        # The device's copy of the three tables (the decode step's own).
        self.dev_ints = self.ints.to(device)
        self.dev_floats = self.floats.to(device)
        self.dev_stop_ids = self.stop_ids.to(device)
        self.last_token = torch.zeros(0, dtype=torch.int64, device=device)
        self.out_tokens = torch.zeros((0, 0), dtype=torch.int64, device=device)
        self.out_log_probs = torch.zeros((0, 0), dtype=torch.float32, device=device)
        self.out_versions = torch.zeros((0, 0), dtype=torch.int64, device=device)
        self.out_experts = torch.zeros((0, 0, experts_per_token), dtype=expert_dtype, device=device)
        self.slot_ids = torch.zeros(0, dtype=torch.int64, device=device)  # arange(S): row indices
        # Bumped whenever a device table is reallocated: a CUDA graph that read the old one is stale.
        self.generation = 0
        self._truncate: bool | None = None  # whether a running row truncates (top-k/top-p), cached
        # The host's lengths are upper bounds: a speculative step was queued since the last statuses.
        self.bounded = False

    @property
    def num_running(self) -> int:
        return len(self.requests)

    def _host(self) -> list[str]:
        return ["ints", "floats", "stop_ids"]

    def _device(self) -> list[str]:
        return ["dev_ints", "dev_floats", "dev_stop_ids", "last_token", "out_tokens", "out_log_probs",
                "out_versions", "out_experts"]  # fmt: skip

    def resize(self, num_slots: int, capacity: int) -> None:
        """Match the KV cache's shape (num_slots slots, capacity positions); keeps contents."""
        for name in self._host() + self._device():
            old = getattr(self, name)
            if name.endswith(("ints", "floats")):  # [column, slot]
                shape = (old.shape[0], num_slots)
            elif name.startswith("out_"):  # + 1: the token decoded after a finish
                shape = (num_slots, capacity + 1, *old.shape[2:])
            else:
                shape = (num_slots, *old.shape[1:])
            setattr(self, name, _resized(old, shape, -1 if name.endswith("stop_ids") else 0))
        self.slot_ids = torch.arange(num_slots, device=self.device)
        self.generation += 1

    def fill(
        self,
        first: int,
        requests: list[Request],
        eos_token_ids: list[int],
        default_seeds: list[int],
        max_seq_len: int,
    ) -> None:
        """Write the parameters of `requests` into slots first.. (admission; one host pass, then
        one copy a table to the device)."""
        rows = slice(first, first + len(requests))
        stops = [sorted(set(eos_token_ids) | set(r.stop_token_ids)) for r in requests]
        width = max([1, *(len(s) for s in stops)])
        if width > self.stop_ids.shape[1]:
            shape = (self.stop_ids.shape[0], width)
            self.stop_ids = _resized(self.stop_ids, shape, -1)
            self.dev_stop_ids = _resized(self.dev_stop_ids, shape, -1)
            self.generation += 1
        self.stop_ids[rows] = -1
        for i, s in enumerate(stops):
            self.stop_ids[first + i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        seeds = [d if r.seed is None else r.seed for r, d in zip(requests, default_seeds, strict=True)]
        lengths = [len(r.tokens) for r in requests]
        self.ints[:, rows] = torch.tensor(
            [
                lengths,
                lengths,
                [r.max_new_tokens for r in requests],
                [s & _SEED_MASK for s in seeds],
                [r.top_k for r in requests],
                [min(n + r.max_new_tokens, max_seq_len) for n, r in zip(lengths, requests, strict=True)],
            ],
            dtype=torch.int64,
        )
        self.floats[:, rows] = torch.tensor(
            [[r.temperature for r in requests], [r.top_p for r in requests]], dtype=torch.float32
        )
        self.dev_ints[:, rows] = to_device(self.ints[:, rows], self.device)
        self.dev_floats[:, rows] = to_device(self.floats[:, rows], self.device)
        self.dev_stop_ids[rows] = to_device(self.stop_ids[rows], self.device)
        self.requests[first:first] = requests
        self._truncate = None

    def params(self, rows: slice) -> SamplingParams:
        """Sampling parameters of `rows`: views of the device's tables (`positions`, the lengths,
        moves as the rows decode)."""
        ints, floats = self.dev_ints[:, rows], self.dev_floats[:, rows]
        return SamplingParams(
            temperature=floats[0], top_p=floats[1], top_k=ints[4], seeds=ints[3], positions=ints[0]
        )

    def sampling(self, rows: slice) -> tuple[SamplingParams, bool]:
        """`params(rows)`, and whether any of the rows truncates (top-k/top-p)."""
        return self.params(rows), self._truncates(rows)

    @property
    def truncate(self) -> bool:
        """Whether any running row truncates (top-k/top-p): the decode step's sampler key."""
        if self._truncate is None:
            self._truncate = self._truncates(slice(0, self.num_running))
        return self._truncate

    def _truncates(self, rows: slice) -> bool:
        return bool((self.top_k[rows] > 0).any() or (self.top_p[rows] < 1).any())

    def record(
        self,
        rows: slice,
        positions: torch.Tensor,
        tokens: torch.Tensor,
        log_probs: torch.Tensor,
        version: torch.Tensor,
        live: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write the tokens sampled at `positions` into the rows' outputs and advance the rows on
        the device; each row's status (running/stop/length). Device work only (the decode step's
        CUDA graph captures it): the caller advances the host's lengths (`advance`).

        `live` [rows] bool: rows that hold a sequence (the others, a graph's padding, write into
        free slots and keep their length)."""
        at = (self.slot_ids[rows], positions)
        self.out_tokens[at] = tokens
        self.out_log_probs[at] = log_probs
        self.out_versions[at] = version
        self.last_token[rows] = tokens
        length = positions + 1  # before the table moves: `positions` may be a view of it
        ints = self.dev_ints[:, rows]
        ints[0].add_(1 if live is None else live)
        stopped = (tokens[:, None] == self.dev_stop_ids[rows]).any(-1)
        return torch.where(stopped, STOP, (length >= ints[5]) * LENGTH)

    def advance(self, rows: slice) -> None:
        """The host's side of `record`: one token more in each row."""
        self.ints[0, rows].add_(1)

    def advance_at_most(self, rows: slice, most: int) -> None:
        """The host's side of a speculative step: each row kept at most `most` tokens (how many is
        on the device), so its length is an upper bound until `finishes.Statuses` takes off what it
        overshot. (Not capped at the row's limit: the correction is a difference, and the sizes
        taken from the bounds are capped at the sequence limit instead.)"""
        self.ints[0, rows].add_(most)
        self.bounded = True

    def release(self, keep: int) -> None:
        """Slots keep.. are free (after `move` filled the holes)."""
        del self.requests[keep:]
        self._truncate = None

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots src -> dst (disjoint); the caller then `release`s the tail."""
        s, d = torch.tensor(src), torch.tensor(dst)
        for name in self._host():
            t = getattr(self, name)
            if name == "stop_ids":
                t[d] = t[s]
            else:  # [column, slot]
                t[:, d] = t[:, s]
        s, d = to_device(s, self.device), to_device(d, self.device)
        for name in self._device():
            t = getattr(self, name)
            if name.endswith(("ints", "floats")):
                t[:, d] = t[:, s]
            else:
                t[d] = t[s]
        for i, j in zip(src, dst, strict=True):
            self.requests[j] = self.requests[i]
        self._truncate = None


def _resized(old: torch.Tensor, shape: tuple[int, ...], fill: int) -> torch.Tensor:
    new = torch.full(shape, fill, dtype=old.dtype, device=old.device)
    keep = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape, strict=True))
    new[keep] = old[keep]
    return new
