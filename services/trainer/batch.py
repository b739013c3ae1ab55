"""Groups from the buffer -> tensors for the policy loss, padded and packed.

A sample's `tokens` are prompt + response. The model reads `tokens[:-1]` and predicts
`tokens[1:]`, so response token j (0-based) is predicted at input position
`prompt_length - 1 + j`. Everything per token below ([B, T]) is laid out in that
shifted frame; positions outside the response have `loss_mask` 0.

Micro-batches hold `--micro-batch-size` samples, or under `--use-dynamic-batch-size` (slime's
flag) `first_fit` cuts an optimizer step's samples into micro-batches of at most
`--max-tokens-per-gpu` tokens. Either way `pack` lays each micro-batch's sequences end to end in
one row (`Packed`: positions restart per sequence, attention stays
inside each one). Only the model's forward reads the packed row; the log-probs it gives are
scattered back into the padded [B, T] frame, so advantages, loss weights and every metric are
computed by exactly the code the padded path runs, on tensors a few KB large. The LM head runs
on response positions only: nothing reads a log-prob anywhere else.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from slipstream.types import Sample


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] float, 1 = trained response token
    rollout_log_probs: torch.Tensor  # [B, T], 0 outside the response
    advantages: torch.Tensor  # [B, T], the sample's advantage on each of its tokens
    versions: torch.Tensor  # [B, T] long, policy version per response token (-1 outside)
    num_tokens: int  # sum of loss_mask
    packed: Packed | None = None  # the same samples as one packed row (dynamic batch size)
    seq_lens: torch.Tensor | None = None  # [B] long: input positions of each row (len(tokens) - 1)
    # [B, T, W] int16: the rollout's routed experts of each input position (W = MoE layers x top-k,
    # Sample.rollout_routed_experts), -1 where none was recorded; None when no sample has any.
    routed_experts: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.targets,
                    self.loss_mask,
                    self.rollout_log_probs,
                    self.advantages,
                    self.versions,
                )
            ),
            num_tokens=self.num_tokens,
            packed=self.packed.to(device) if self.packed is not None else None,
            seq_lens=None if self.seq_lens is None else self.seq_lens.to(device),
            routed_experts=None if self.routed_experts is None else self.routed_experts.to(device),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Packed:
    """A micro-batch's sequences end to end in one row of N tokens (no padding)."""

    input_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N], restarting at 0 at each sequence start
    cu_seqlens: torch.Tensor  # [S+1] int32, sequence boundaries in the row
    order: torch.Tensor  # [S] long: the sample (row of the padded frame) of each sequence, shortest first
    max_len: int  # longest sequence
    head_rows: torch.Tensor  # [M] long: row positions of the response tokens (the LM head's inputs)
    head_targets: torch.Tensor  # [M] long: the token each of them predicts
    head_index: torch.Tensor  # [M] long: where each lands in the padded frame, flattened [B * T]
    routed_experts: torch.Tensor | None = None  # [N, W]: Batch.routed_experts of each row position

    def to(self, device: torch.device) -> Packed:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Packed(**moved)


def collate(samples: list[Sample], advantages: list[float], pad_id: int = 0) -> Batch:
    """Right-pad samples into one batch (pads come after real tokens, so causal attention is exact).

    Built from flat arrays: each field's values of all samples are concatenated once (one C-level
    pass) and scattered into the [B, T] frame by index arithmetic, so a step of 2,048 short samples
    costs a few milliseconds (a Python loop over every position took ~25 ms on the 2-core box)."""
    return _collate(samples, advantages, pad_id, _Layout(samples))


def _collate(samples: list[Sample], advantages: list[float], pad_id: int, t: _Layout) -> Batch:
    b, width = len(samples), t.width
    frame = np.arange(width)
    inside = frame[None, :] < t.n[:, None]
    at = np.where(inside, t.starts[:, None] + frame[None, :], 0)  # row i, position j: flat[at]
    ids = np.where(inside, t.flat[at], pad_id)
    targets = np.where(inside, t.flat[np.minimum(at + 1, t.flat.size - 1)], pad_id)
    index = t.response_index(np.flatnonzero(t.trainable))  # flat [B * T]: the trained tokens
    r = t.r[t.trainable]
    mask = _scatter(b * width, index, t.field(samples, "loss_mask", 1.0), np.float32, 0.0)
    rollout_lp = _scatter(b * width, index, t.field(samples, "rollout_log_probs", 0.0), np.float32, 0.0)
    versions = _scatter(b * width, index, t.field(samples, "policy_versions", -1), np.int64, -1)
    adv = np.zeros(b * width, dtype=np.float32)
    adv[index] = np.repeat(np.asarray(advantages, dtype=np.float32)[t.trainable], r)
    mask_t = torch.from_numpy(mask).view(b, width)
    return Batch(
        torch.from_numpy(ids), torch.from_numpy(targets), mask_t,
        torch.from_numpy(rollout_lp).view(b, width), torch.from_numpy(adv).view(b, width),
        torch.from_numpy(versions).view(b, width), int(mask.sum()),
        seq_lens=torch.from_numpy(t.n.copy()),
        routed_experts=_routed_experts(samples, width),
    )  # fmt: skip


class _Layout:
    """Where every sample's tokens and response sit: flat token array, per-sample lengths."""

    def __init__(self, samples: list[Sample]) -> None:
        lens = np.fromiter((len(s.tokens) for s in samples), dtype=np.int64, count=len(samples))
        self.flat = np.fromiter(
            itertools.chain.from_iterable(s.tokens for s in samples), dtype=np.int64, count=int(lens.sum())
        )
        self.starts = np.cumsum(lens) - lens  # where each sample's tokens begin in `flat`
        self.n = lens - 1  # input positions of each row
        self.width = int(self.n.max())
        self.trainable = np.fromiter((s.is_trainable for s in samples), dtype=bool, count=len(samples))
        self.r = np.fromiter((s.response_length for s in samples), dtype=np.int64, count=len(samples))
        self.first = lens - self.r - 1  # input position predicting the first response token

    def response_index(self, rows: np.ndarray) -> np.ndarray:
        """Flat [B * T] indices of the response positions of samples `rows`, in that order."""
        return _ranges(rows * self.width + self.first[rows], self.r[rows])

    def field(self, samples: list[Sample], name: str, fill: float) -> list:
        """One per-token field of the trainable samples, concatenated; a sample without it
        contributes `fill` on every response token."""
        out: list = []
        for s in itertools.compress(samples, self.trainable):
            values = getattr(s, name)
            if values is None:
                out += [fill] * s.response_length
            else:
                _require_len(values, s.response_length, s)
                out += values
        return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def _scatter(size: int, index: np.ndarray, values: list, dtype, fill) -> np.ndarray:
    out = np.full(size, fill, dtype=dtype)
    out[index] = np.asarray(values, dtype=dtype)
    return out


def _require_len(values: list, r: int, s: Sample) -> None:
    if len(values) != r:
        raise ValueError(
            f"sample {s.index}: a per-token field has {len(values)} entries, its response {r} tokens"
        )


def _routed_experts(samples: list[Sample], width: int) -> torch.Tensor | None:
    """The samples' recorded experts in the [B, T, W] input frame (row j: the experts of tokens[j]), -1
    where none; None when no sample has a record. W is the widest record's (routing.py checks it)."""
    records = [s.rollout_routed_experts for s in samples]
    w = max((len(r[0]) for r in records if r), default=0)
    if not w:
        return None
    out = torch.full((len(samples), width, w), -1, dtype=torch.int16)
    for i, rows in enumerate(records):
        if rows and len(rows[0]) == w:
            n = min(len(rows), width)
            out[i, :n] = torch.tensor(rows[:n], dtype=torch.int16)
    return out


def pack(samples: list[Sample], advantages: list[float], pad_id: int = 0) -> Batch:
    """`collate` plus the same samples packed into one row (`Batch.packed`), shortest first: the
    sequences of one length sit together, and the CPU's attention runs each such run as one batch."""
    t = _Layout(samples)
    batch = _collate(samples, advantages, pad_id, t)
    width = t.width
    order = np.argsort(t.n, kind="stable")  # shortest first, ties in arrival order
    n = t.n[order]
    bounds = np.concatenate([[0], np.cumsum(n)])
    keep = order[t.trainable[order]]  # trainable samples, in packed order
    at = bounds[:-1][t.trainable[order]]  # where each of them starts in the row
    index_t = torch.from_numpy(t.response_index(keep))
    batch.packed = Packed(
        input_ids=torch.from_numpy(t.flat[_ranges(t.starts[order], n)])[None],
        positions=torch.from_numpy(_ranges(np.zeros_like(n), n))[None],
        cu_seqlens=torch.from_numpy(bounds.astype(np.int32)),
        order=torch.from_numpy(order),
        max_len=width,
        head_rows=torch.from_numpy(_ranges(at + t.first[keep], t.r[keep])),
        head_targets=batch.targets.reshape(-1)[index_t],
        head_index=index_t,
        routed_experts=(
            None
            if batch.routed_experts is None
            else torch.cat([batch.routed_experts[i, : len(samples[i].tokens) - 1] for i in order.tolist()])
        ),
    )
    return batch


def first_fit(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` in bins of at most `max_tokens` (one too long for any bin sits alone).

    First fit in arrival order, as slime's dynamic batch size packs: each sample goes into the
    first bin it fits in, so bins stay full and samples keep their relative order inside a bin.
    """
    bins: list[list[int]] = []
    sums: list[int] = []
    for i, n in enumerate(lengths):
        for j, total in enumerate(sums):
            if total + n <= max_tokens:
                bins[j].append(i)
                sums[j] += n
                break
        else:
            bins.append([i])
            sums.append(n)
    return bins


def split(samples: list, size: int) -> list[list]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def split_for_ranks(bins: list[list[int]], lengths: list[int], world: int) -> list[list[int]]:
    """Split the fullest multi-sample bins until every rank gets as many micro-batches."""
    bins = [list(b) for b in bins]
    while len(bins) % world:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            raise ValueError(
                f"{len(bins)} packed micro-batches cannot be shared evenly by {world} trainer ranks "
                "(too few samples per optimizer step)"
            )
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        i = bins.index(big)
        bins[i : i + 1] = [big[: len(big) // 2], big[len(big) // 2 :]]
    return bins


def plan_micro_batches(
    samples: list[Sample],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    max_tokens_per_gpu: int | None,
    world: int = 1,
) -> tuple[list[list[int]], list[list[int]]]:
    """(sample indices of each micro-batch, micro-batch indices of each optimizer step).

    Optimizer step k trains samples [k * global_batch_size, (k + 1) * global_batch_size).
    Padded (`max_tokens_per_gpu` None): micro-batches of `micro_batch_size` in order. Packed:
    first fit of the step's samples into `max_tokens_per_gpu` tokens, split further until the
    trainer ranks share the micro-batches evenly (micro-batch j of a step runs on rank j % world).
    """
    members: list[list[int]] = []
    steps: list[list[int]] = []
    for start in range(0, len(samples), global_batch_size):
        idx = list(range(start, min(start + global_batch_size, len(samples))))
        if max_tokens_per_gpu is not None:
            lengths = [len(samples[i].tokens) - 1 for i in idx]
            bins = split_for_ranks(first_fit(lengths, max_tokens_per_gpu), lengths, world)
            groups = [[idx[j] for j in b] for b in bins]
        else:
            groups = split(idx, micro_batch_size)
            if len(groups) % world:
                raise ValueError(
                    f"global batch ({global_batch_size}) / micro batch ({micro_batch_size}) = {len(groups)} "
                    f"micro-batches per optimizer step must be a multiple of the trainer world size ({world})"
                )
        steps.append(list(range(len(members), len(members) + len(groups))))
        members.extend(groups)
    return members, steps
