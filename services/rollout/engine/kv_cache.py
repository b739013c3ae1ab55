"""A slot-based KV cache: one slot per running sequence, keys/values [layers, slots, kv_heads, len, dim].

Running sequences always occupy slots 0..n-1, so a decode step attends over one contiguous
slice of the cache with no gather; when a sequence leaves, the engine moves a survivor from the
end into its slot (`move`), which copies only that one sequence.

The cache grows on demand (slots doubling up to `max_slots`, length doubling up to `max_len`)
instead of allocating `max_slots x max_len` up front, which for a real model and context would
not fit. Positions past a sequence's length may hold stale or padding values: the decode mask
hides them and later writes overwrite them.

Attention itself is the model's business; this file hands the model `Attention` callables that
write the new keys/values into the right slots and attend over what is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.models import Attention

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
    ) -> None:
        self.max_slots = max_slots
        self.max_len = max_len
        shape = (num_layers, 0, num_kv_heads, 0, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

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

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole slots src -> dst (index tensors [m]; the sets must not overlap)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def prefill(self, first_slot: int) -> Attention:
        """Causal attention over a right-padded batch [B, T] that lands in slots first_slot.. +B."""

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            b, _, t, _ = k.shape
            self.k[layer, first_slot : first_slot + b, :, :t] = k
            self.v[layer, first_slot : first_slot + b, :, :t] = v
            # Only the new tokens are attended to (no prefix sharing), so the batch's own k/v suffice.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return attend

    def decode(self, positions: torch.Tensor, kv_len: int) -> Attention:
        """One new token per slot 0..n-1 at `positions` [n]; attends over cached 0..position."""
        n = positions.shape[0]
        rows = torch.arange(n, device=positions.device)
        mask = (torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None])[:, None, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k[layer, rows, :, positions] = k[:, :, 0]
            self.v[layer, rows, :, positions] = v[:, :, 0]
            keys = self.k[layer, :n, :, :kv_len]
            values = self.v[layer, :n, :, :kv_len]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

        return attend


def _grown(t: torch.Tensor, slots: int, length: int) -> torch.Tensor:
    out = torch.zeros((t.shape[0], slots, t.shape[2], length, t.shape[4]), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1], :, : t.shape[3]] = t
    return out
