"""Batch-invariant forward kernels (--true-on-policy-mode): a token's numbers never depend on its batch.

The engine computes a sampled token's log-prob inside a decode step of n rows over a KV cache of
L positions; the trainer computes it again in one forward over a padded batch of T positions.
Plain kernels choose their blocking, and so their order of summation, from the shapes: a row of
`F.linear(x, W)` differs in its last bits between a 1-row and a 300-row call (every row tested,
CPU fp32), and attention's sums run over L keys in one place and T in the other. Here everything
that sums does so in an order fixed by the token alone:

- `linear`: the rows in tiles of TILE, one batched GEMM of identical [TILE, K] x [K, N] problems
  (`torch.bmm`), so a row gets the same result in any tile position and any batch;
- `attention`: the same for the scores and the softmax's sums. A KV head's queries (its query
  heads at every position) are rows in tiles of QUERIES, its keys are zero-padded chunks of CHUNK;
  every (tile, chunk) pair is one [QUERIES, D] x [D, CHUNK] problem (the scores q.k), then one
  [QUERIES, CHUNK] x [CHUNK, D + 1 ...] problem (the chunk's share of p @ v, and of the softmax's
  denominator in a column of ones), and `cumsum`, a sequential scan, adds the chunks' shares in
  index order; the max is exact in any order, exp elementwise. A key a query does not see weighs
  exp(-inf) = 0, times a finite value that adds exact zeros, and a chunk of such keys adds zero,
  so a query gets the same numbers over the engine's L cached keys as over the trainer's causal
  T x T batch, in whichever row of whichever tile it lands;
- `token_log_probs`: log-softmax of logits / temperature, then the pick: the sampler's own
  formula (`engine/sampler.py`), not logits minus logsumexp.

- a mixture-of-experts layer sums each token's expert outputs by k adds in ascending expert id
  (`index_add_` adds with atomics on the GPU, in no fixed order). On CUDA its experts run as one
  grouped GEMM a projection (`gpu.grouped_linear`), each row as the loop over the experts' `linear`
  computes it, with no host sync.

What this rests on, tested on this CPU (MKL, fp32, 1 and 2 threads): `torch.bmm` computes an
element of an [M, K] x [K, N] problem the same way in any item of a call of any count (one item
is MKL's plain sgemm, more its batched one), at any row whatever the other rows hold, with zeros
where a row's entries are zero, for M of 1 to 16 and N a multiple of 16; not for every shape (at
N of 5-11 a row's result depends on its row, at odd N also on the count when M <= 2), hence the
value columns padded to a whole number of CHUNK. exp of a value does not depend on where it sits.

RMSNorm, RoPE, SiLU, the residual adds and the embedding are row-wise or elementwise already on the
CPU (`tests/test_true_on_policy.py` checks the whole model: the engine's log-probs of the tokens
it sampled equal the trainer's, bit for bit). Backward is autograd's over the same ops: only the
forward must match. These are plain PyTorch for the CPU's fp32; on CUDA every function here runs
`invariant_gpu.py`'s Triton kernels instead (bf16 or fp32, RMSNorm too), and the log-prob is the
sampling kernel's own loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import invariant_fused as fused
from slipstream.kernels import invariant_gpu as gpu
from slipstream.kernels import sampling
from slipstream.models.decoder import MLP, DecoderLayer, RMSNorm, SelfAttention
from slipstream.models.moe import Experts

# On CUDA, the layer's glue in fused kernels (`invariant_fused.py`): q|k|v and gate|up one launch
# each, the heads' norm + RoPE one, the residual add + norm one. False: the model's own ops (each
# still row-wise), for comparing the two (bench/true_on_policy.py --unfused-glue).
FUSED_GLUE = True
TILE = 16  # rows per GEMM problem (8: no faster at batch 1 end to end, a slower training step)
QUERIES = 4  # attention's rows per problem: a decode step's rows are one KV head's query heads
CHUNK = 16  # keys per attention problem (one AVX-512 vector of fp32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, each row computed as the same [TILE, K] problem."""
    if gpu.available(x):
        out = gpu.linear(x, weight)
        return out if bias is None else out + bias
    out = _TiledLinear.apply(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _TiledLinear(torch.autograd.Function):
    """rows [n, K] @ weight.t() as identical [TILE, K] problems (forward); the plain GEMMs' gradients
    (backward: autograd's own, through the tiles, would sum a [K, N] weight gradient per tile)."""

    @staticmethod
    def forward(ctx, rows, weight):
        ctx.save_for_backward(rows, weight)
        n, k = rows.shape
        if pad := (-n) % TILE:
            rows = torch.cat([rows, rows.new_zeros(pad, k)])
        tiles = rows.shape[0] // TILE
        out = torch.bmm(rows.view(tiles, TILE, k), weight.t().unsqueeze(0).expand(tiles, k, weight.shape[0]))
        return out.reshape(-1, weight.shape[0])[:n]

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        return grad.mm(weight), grad.t().mm(rows)


class InvariantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class InvariantRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gpu.rms_norm(x, self.weight, self.eps) if gpu.available(x) else super().forward(x)


def _plain(*layers: nn.Module) -> bool:
    """Linear layers the fused kernels may read the weights of: no bias, no adapter around them."""
    return all(type(layer) is InvariantLinear and layer.bias is None for layer in layers)


class InvariantSelfAttention(SelfAttention):
    """On CUDA q|k|v in one GEMM launch and the heads' norm + RoPE in one kernel (`invariant_fused`)."""

    def project_qkv(self, x, cos, sin):
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weights = [p.weight for p in projections]
        if not (FUSED_GLUE and fused.usable(x) and _plain(*projections) and fused.fits(*weights)):
            return super().project_qkv(x, cos, sin)
        b, t, _ = x.shape
        d, nq, nk = self.head_dim, weights[0].shape[0], weights[1].shape[0]
        qkv = fused.multi_linear(x, *weights)
        q = qkv[..., :nq].view(b, t, self.num_heads, d)
        k = qkv[..., nq : nq + nk].view(b, t, self.num_kv_heads, d)
        v = qkv[..., nq + nk :].view(b, t, self.num_kv_heads, d).transpose(1, 2)
        norms = (self.q_norm, self.k_norm)
        q_weight, k_weight = (None, None) if self.q_norm is None else (n.weight for n in norms)
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        q, k = fused.norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
        return q, k, v


class InvariantMLP(MLP):
    """On CUDA gate|up in one GEMM launch and SiLU(gate) * up in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if not (FUSED_GLUE and fused.usable(x) and _plain(gate, up) and fused.fits(gate.weight, up.weight)):
            return super().forward(x)
        return self.down_proj(fused.silu_mul(fused.multi_linear(x, gate.weight, up.weight)))


class InvariantDecoderLayer(DecoderLayer):
    """On CUDA the residual add after attention and the next RMSNorm in one kernel."""

    def after_attention(self, x, out, routing=None):
        if not (FUSED_GLUE and fused.usable(x)):
            return super().after_attention(x, out, routing)
        norm = self.post_attention_layernorm
        x, h = fused.add_rms_norm(x, self.self_attn.project_out(out), norm.weight, norm.eps)
        return x + self.feed_forward(h, routing)


class InvariantExperts(Experts):
    """A mixture-of-experts layer's experts, each on however many rows routed to it, through `linear`.
    (The router is an `nn.Linear`; its softmax and top-k are row-wise.)

    On CUDA the experts run as two grouped GEMMs over all of them (`gpu.grouped_linear`), each row
    computed as `gpu.linear` computes it, so the result equals the expert loop's bit for bit, with
    the per-expert counts left on the device (the engine's CUDA graphs can capture it)."""

    linear = staticmethod(linear)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not gpu.available(x):
            return super().forward(x, ids, weights)
        top_k = ids.shape[-1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # `Experts.forward`'s grouping of the token-slots
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        tiles = gpu.expert_tiles(counts, flat.numel())  # one table for both GEMMs
        gate, up = gpu.grouped_linear(x[order // top_k], self.gate_up_proj, tiles).chunk(2, dim=-1)
        y = gpu.grouped_linear(F.silu(gate) * up, self.down_proj, tiles)
        return self.combine(x, ids, order, y * weights.reshape(-1)[order, None])

    def combine(
        self, x: torch.Tensor, ids: torch.Tensor, order: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """`Experts.combine` by k adds in ascending expert id per token (what `index_add_` does on
        the CPU, and on the GPU in no fixed order: it adds with atomics)."""
        n, top_k = ids.shape
        per_slot = torch.empty_like(y).index_copy_(0, order, y).view(n, top_k, -1)
        # a token's ids are distinct: argsort puts its slots in ascending expert id
        per_slot = per_slot.gather(1, ids.argsort(-1)[..., None].expand_as(per_slot))
        out = torch.zeros_like(x)
        for j in range(top_k):
            out = out + per_slot[:, j]
        return out


_SWAPS = {
    nn.Linear: InvariantLinear, RMSNorm: InvariantRMSNorm, Experts: InvariantExperts,
    SelfAttention: InvariantSelfAttention, MLP: InvariantMLP, DecoderLayer: InvariantDecoderLayer,
}  # fmt: skip


def make_invariant(model: nn.Module) -> nn.Module:
    """Every `nn.Linear`, RMSNorm, MoE expert stack, attention, MLP and decoder layer of `model`
    computes through this module's kernels (in place; parameters untouched). A module whose class
    FSDP2 has subclassed (`FSDPDecoderLayer`: its per-layer units) gets a class of both, so a
    sharded trainer's layers compute exactly as the engine's do."""
    for module in model.modules():
        cls = type(module)
        if cls in _SWAPS:
            module.__class__ = _SWAPS[cls]
            continue
        for base, swap in _SWAPS.items():
            if isinstance(module, base) and not isinstance(module, swap) and cls.__name__.startswith("FSDP"):
                module.__class__ = type(f"FSDP{swap.__name__}", (cls, swap), {})
                break
    return model


def served(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value a weight computes with in this mode, in `dtype`: the bf16 it travels as (the
    trainer's compute copy and the engine's version 0 alike; later versions arrive as bf16)."""
    return weight.to(torch.bfloat16).to(dtype)


@torch.no_grad()
def round_to_served_(model: nn.Module) -> None:
    for p in model.parameters():
        p.copy_(served(p, p.dtype))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention: q [B,H,Tq,D], k and v [B,Hkv,L,D], mask [B|1, 1, Tq, L] (True: attend)
    -> [B,H,Tq,D]. Every query must see at least one key. Computed as the module docstring says:
    each (tile of queries, chunk of keys) pair one problem of each `torch.bmm`, the chunks' shares
    added by `cumsum`.
    """
    b, h, tq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    rows = h // hkv * tq  # query head g of a KV head at position t is row g * tq + t
    mask = mask.expand(mask.shape[0], h // hkv, tq, length).reshape(-1, 1, rows, length)
    q = q.reshape(b, hkv, rows, d)
    if pad := (-rows) % QUERIES:  # padding rows attend to every key: finite, and dropped
        q = F.pad(q, (0, 0, 0, pad))
        mask = F.pad(mask, (0, 0, 0, pad), value=True)
    cols = -(-(d + 1) // CHUNK) * CHUNK  # v, a column of ones, zeros: a whole number of vectors
    values = torch.cat([v, v.new_ones(b, hkv, length, 1)], -1)
    pad = (-length) % CHUNK
    k, values = F.pad(k, (0, 0, 0, pad)), F.pad(values, (0, cols - d - 1, 0, pad))
    mask = F.pad(mask, (0, pad), value=False)
    tiles, chunks = q.shape[2] // QUERIES, k.shape[2] // CHUNK
    pairs = (b, hkv, tiles, chunks)
    q = q.view(b, hkv, tiles, 1, QUERIES, d).expand(*pairs, QUERIES, d).reshape(-1, QUERIES, d)
    k = k.view(b, hkv, 1, chunks, CHUNK, d).expand(*pairs, CHUNK, d).reshape(-1, CHUNK, d)
    values = values.view(b, hkv, 1, chunks, CHUNK, cols).expand(*pairs, CHUNK, cols)
    mask = mask.view(-1, 1, tiles, QUERIES, chunks, CHUNK).transpose(3, 4)
    scores = torch.bmm(q, k.transpose(1, 2)).view(*pairs, QUERIES, CHUNK) * d**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.exp(scores - scores.amax((3, 5), keepdim=True))  # exact zeros where masked
    shares = torch.bmm(p.view(-1, QUERIES, CHUNK), values.reshape(-1, CHUNK, cols))
    sums = shares.view(*pairs, QUERIES, cols).cumsum(3)[:, :, :, -1]  # [B,Hkv,tiles,QUERIES,cols]
    out = (sums[..., :d] / sums[..., d, None]).reshape(b, hkv, -1, d)[:, :, :rows]
    return out.reshape(b, h, tq, d)


def causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's `Attention` for a whole batch (the trainer's forward, the engine's prefill)."""
    if gpu.available(q):
        return gpu.causal_attention(q, k, v)
    t = q.shape[2]
    positions = torch.arange(t, device=q.device)
    return attention(q, k, v, (positions[None, :] <= positions[:, None])[None, None])


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, kv_len: int
) -> torch.Tensor:
    """The engine's decode: q [n,H,1,D], one query per slot 0..n-1, over that slot's cached keys
    0..lengths[i]-1 (k_cache, v_cache [slots,Hkv,capacity,D]; kv_len >= every length)."""
    if gpu.available(q):
        return gpu.decode_attention(q, k_cache, v_cache, lengths)
    n = q.shape[0]
    mask = (torch.arange(kv_len, device=q.device)[None, :] < lengths[:, None])[:, None, None]
    keys, values = (c[:n, :, :kv_len].to(q.dtype) for c in (k_cache, v_cache))
    return attention(q, keys, values, mask)


class _TokenLogProbs(torch.autograd.Function):
    """The sampling kernel's log-probs of given tokens (forward), softmax's gradient (backward)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        temps = torch.full((logits.shape[0],), temperature, dtype=torch.float32, device=logits.device)
        return sampling.log_probs(logits, temps, targets)

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        t = ctx.temperature if ctx.temperature > 0 else 1.0
        g = torch.softmax(logits.float() / t, dim=-1) * -grad[:, None]
        g.scatter_add_(1, targets[:, None], grad[:, None])
        return (g / t).to(logits.dtype), None, None


def _log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax(logits / temperature)[targets] fp32, as the sampler computes it on this device."""
    if sampling.available(logits.view(-1, logits.shape[-1])):
        flat = _TokenLogProbs.apply(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1).long(), temperature
        )
        return flat.view(targets.shape)
    scale = torch.tensor(temperature if temperature > 0 else 1.0, dtype=torch.float32, device=logits.device)
    log_p = torch.log_softmax(logits.float() / scale, dim=-1)
    return log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def token_log_probs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log-softmax(logits / temperature)[targets], hidden [B,T,H] -> [B,T] fp32, as the sampler does it."""
    return _log_probs(linear(hidden, lm_head_weight), targets, temperature)


def log_probs_and_entropy(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_log_probs` and each position's entropy (not part of the bitwise promise)."""
    logits = linear(hidden, lm_head_weight)
    scale = temperature if temperature > 0 else 1.0
    log_p = torch.log_softmax(logits.float() / scale, dim=-1)
    return _log_probs(logits, targets, temperature), -(log_p.exp() * log_p).sum(-1)
