"""A slot-based KV cache: one slot per running sequence, keys/values [layers, slots, kv_heads, len, dim].

Running sequences always occupy slots 0..n-1, so a decode step attends over one contiguous
slice of the cache with no gather; when a sequence leaves, the engine moves a survivor from the
end into its slot (`move`), which copies only that one sequence.

On the CPU the cache grows on demand (slots doubling up to `max_slots`, length doubling up to
`max_len`), so tests and the demo never pay for the largest shape. On a GPU the engine calls
`preallocate` once, sized from a memory fraction: the tensors then never move, which is what lets
a CUDA graph captured over them be replayed for the rest of the run. Positions past a sequence's length may hold stale or padding values: the decode mask
hides them and later writes overwrite them.

Attention itself is the model's business; this file hands the model `Attention` callables that
write the new keys/values into the right slots and attend over what is cached.

FP8 cache (`dtype=float8_e4m3fn`, the engine's `kv_cache_dtype="fp8_e4m3"`): keys and values are
stored as e4m3 with a scale of 1, saturated at +-448, and widened to the model's dtype when read,
which is SGLang's `--kv-cache-dtype fp8_e4m3` without checkpoint scales. Qwen3's keys are
RMS-normed per head before RoPE, so they sit well inside that range; values are projections of a
normed hidden state. At large batch the cache, not the weights, is what a decode step reads
(7.5 GB against 1.2 GB for Qwen3-0.6B at batch 256, context 256), so halving it is what speeds
decode up; the price is e4m3's 3-bit mantissa on every cached key and value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels import attention as decode_kernel
from slipstream.kernels import invariant, invariant_gpu
from slipstream.models import Attention
from slipstream.quant import FP8_DTYPE, FP8_MAX

KV_ALIGN = 64


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        invariant: bool = False,
    ) -> None:
        """`invariant`: attend with `kernels.invariant` (--true-on-policy-mode)."""
        self.max_slots = max_slots
        self.invariant = invariant
        self.max_len = max_len
        self._dtype, self.device = dtype, device
        shape = (num_layers, 0, num_kv_heads, 0, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.fixed = False  # preallocated: never reallocated again

    @staticmethod
    def bytes_per_slot(
        num_layers: int, num_kv_heads: int, head_dim: int, length: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * length * head_dim * dtype.itemsize

    def preallocate(self, num_slots: int, length: int) -> None:
        """Allocate `num_slots x length` now, once; later `reserve` calls must fit inside it."""
        self.max_slots, self.max_len = num_slots, length
        shape = (self.k.shape[0], num_slots, self.k.shape[2], length, self.k.shape[4])
        self.k = self.v = None  # drop the old tensors before allocating the new ones
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.fixed = True

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """t in the cache's dtype (an FP8 cache saturates: e4m3 has no infinity)."""
        if self.dtype == FP8_DTYPE:
            t = t.clamp(-FP8_MAX, FP8_MAX)
        return t.to(self.dtype)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, num_slots: int, length: int) -> bool:
        """Grow to hold at least `num_slots` slots of `length` positions; True if it reallocated."""
        if num_slots > self.max_slots or length > self.max_len:
            raise ValueError(
                f"KV cache request ({num_slots} slots x {length}) exceeds its limits "
                f"({self.max_slots} x {self.max_len})"
            )
        if num_slots <= self.num_slots and length <= self.capacity:
            return False
        slots = min(self.max_slots, max(num_slots, 2 * self.num_slots))
        length = max(length, min(self.max_len, 2 * self.capacity))
        length = min(self.max_len, -(-length // KV_ALIGN) * KV_ALIGN)
        self.k = _grown(self.k, slots, length)
        self.v = _grown(self.v, slots, length)
        return True

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int | None = None) -> None:
        """Copy slots src -> dst (index tensors [m]; the sets must not overlap), their first
        `length` positions (None: all): what lies past a sequence's length is never read, and
        copying the whole capacity was most of a CPU rollout server's retire (issue 14)."""
        n = self.capacity if length is None else min(length, self.capacity)
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def share(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first `length` positions of slots src -> dst: a prompt prefilled once for a group."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def prefill(self, first_slot: int) -> Attention:
        """Causal attention over a right-padded batch [B, T] that lands in slots first_slot.. +B."""

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            b, _, t, _ = k.shape
            self.k[layer, first_slot : first_slot + b, :, :t] = self._stored(k)
            self.v[layer, first_slot : first_slot + b, :, :t] = self._stored(v)
            # Only the new tokens are attended to (no prefix sharing), so the batch's own k/v suffice.
            if self.invariant:
                return invariant.causal_attention(layer, q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return attend

    def decode(self, positions: torch.Tensor, kv_len: int) -> Attention:
        """One new token per slot 0..n-1 at `positions` [n]; attends over cached 0..position.

        Shapes depend only on (n, kv_len), never on the positions' values, so a CUDA graph of a
        step replays for any lengths up to kv_len: the mask, not the shape, hides the rest.
        """
        n = positions.shape[0]
        rows = torch.arange(n, device=positions.device)
        mask = (torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None])[:, None, None]

        lengths = positions + 1
        fast = decode_kernel.available(self.k) and not self.invariant
        write_in_one = self.invariant and invariant_gpu.available(self.k)  # the mode's cache: model dtype

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if write_in_one:  # one launch for the keys and values (the mode's decode on CUDA)
                invariant_gpu.write_kv(k, v, positions, self.k[layer], self.v[layer])
            else:
                self.k[layer, rows, :, positions] = self._stored(k[:, :, 0])
                self.v[layer, rows, :, positions] = self._stored(v[:, :, 0])
            if self.invariant:
                return invariant.decode_attention(q, self.k[layer], self.v[layer], lengths, kv_len)
            if fast:  # reads each slot only up to its own length (kernels/attention.py)
                return decode_kernel.decode_attention(q, self.k[layer], self.v[layer], lengths)
            keys = self.k[layer, :n, :, :kv_len].to(q.dtype)
            values = self.v[layer, :n, :, :kv_len].to(q.dtype)
            # The query heads that share a KV head become that head's "query positions"
            # ([n, Hkv, group, D]): one attention per KV head, no repeated keys, and the
            # memory-efficient kernel (which takes a mask) instead of a GQA expansion.
            b, h, _, d = q.shape
            group = h // keys.shape[1]
            out = F.scaled_dot_product_attention(
                q.view(b, h // group, group, d), keys, values, attn_mask=mask
            )
            return out.reshape(b, h, 1, d)

        return attend


def _grown(t: torch.Tensor, slots: int, length: int) -> torch.Tensor:
    out = torch.zeros((t.shape[0], slots, t.shape[2], length, t.shape[4]), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1], :, : t.shape[3]] = t
    return out
