"""Exact speculative sampling: the draft head proposes k tokens, one target forward checks them.

One speculative step for every running sequence (slots 0..n-1, each of length `len`, its last
token x_{len-1} not in the target's KV cache yet):

1. Draft. The draft head (`slipstream.models.draft`) first catches up: it runs over the positions
   whose target hidden states arrived with the last step (`pending`: the accepted tokens' positions,
   at most k+1 of them), writing its own KV (cache layers L..L+m-1) with the target's hidden states,
   and its output at the last of them proposes d_1 for position len. Then it drafts autoregressively
   (EAGLE), its own output standing in for the target's hidden state: d_2..d_k.
2. Verify. The target runs once over [x_{len-1}, d_1..d_k] at positions len-1..len-1+k (k+1 query
   positions per row, each attending over its cached prefix): distributions p_0..p_k.
3. Accept (Leviathan et al. 2023, Chen et al. 2023). With p and q both tempered and truncated
   (top-k/top-p) exactly as the plain sampler does, then renormalised, d_j is accepted with
   probability min(1, p_{j-1}(d_j) / q_j(d_j)); at the first rejection the token is drawn from
   normalise(max(0, p_{j-1} - q_j)) and the step ends; if all k pass, a bonus token is drawn from
   p_k. Every token then has exactly the target's distribution, whatever the draft. Greedy
   (temperature 0) is the limit: a draft token is kept iff it is the target's arg-max, and the
   token after is the target's arg-max.

What the trainer sees is the target's: each kept token's log-prob is the target's log-softmax at
that position (the sampler's convention: tempered, untruncated), and its version the target's
policy version. Rejected drafts never reach the slot's outputs, so an abort between steps (a
partial rollout) returns accepted tokens only. A stop token or the length limit inside the
accepted run cuts it there.

Randomness is the sampler's counter-based noise (seed, token index), salted per use (drafting,
acceptance, the residual draw): a position's noise decides its token once; positions a step drafted
past a rejection are drafted again next step, which is sound because the discarded draws decided
nothing.

Versions. The draft is only used while it is as new as the target (`draft_version ==
policy_version`): weights that arrive without draft tensors leave the draft older than the target,
and the engine then decodes plainly (`active`). The trainer ships the draft inside every weights
version under --enable-mtp-training, so the two move together.

The step is device work from end to end: it reads its inputs from the slots' device tables
(`slots.py`: lengths, sampling parameters, last tokens, outputs) and the pending state here, and
writes the kept tokens, their log-probs and versions, the last tokens, the pending state, the
device's lengths and each row's status back, so on CUDA it is one CUDA graph replay per (batch
bucket, KV bucket, truncation, k), padded as `graphs.py` pads plain decode. The host's part is the
replay: it does not wait for the kept counts. It moves its lengths by k + 1, an upper bound, and
the step's lengths come back one step late with its statuses, which correct them (`finishes.py`),
so the host queues step t+1 while the GPU runs step t, as in plain decode. Read late, a row that
finished runs one more step before it retires; the step sees it finished (at its limit, or its
last token a stop) and it keeps nothing.

Where the sampler's fused kernel runs (CUDA, no truncation), the drafts and the residual token
are drawn by it from the logits with the salted seeds, and the acceptance ratio comes from its
log-probs: no [n, V] noise is materialised, and max(0, p - q) is built only for the row each
sequence resamples at; elsewhere the same noise is materialised, as the plain sampler does.
Where the fused decode runs (`fused_step.py`), the verify runs its kernels too (`fused_verify`),
attention one launch a layer over all k+1 queries of a slot (`kernels/verify_attention.py`); the
draft's one layer runs the model's forward.

Near the sequence limit a row still drafts k. The verify's positions past the cache's last one
are clamped to it, so junk keys land there; only a query at that last position reads them, and the
token it would draw lies past the sequence limit, so it is never kept. Every row's tokens thus
depend on its own request only, never on its batch, and reading late (which admits a request a
step later) gives the results reading at once gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slipstream.kernels import decode_layer as decode_kernels
from slipstream.kernels import sampling as fused_sampling
from slipstream.kernels.verify_attention import verify_attention
from slipstream.models import Attention
from slipstream.models.draft import DraftHead, is_draft_name
from slipstream.models.rope import rope_cos_sin
from slipstream.services.rollout.engine.fused_step import FusedDecoder
from slipstream.services.rollout.engine.graphs import kv_bucket
from slipstream.services.rollout.engine.kv_cache import KV_ALIGN, KVCache
from slipstream.services.rollout.engine.sampler import tempered_log_probs, truncated, uniform_noise
from slipstream.services.rollout.engine.slots import LENGTH, RUNNING, STOP, to_device

if TYPE_CHECKING:
    from slipstream.services.rollout.engine.runner import ModelRunner

log = logging.getLogger(__name__)

# Noise salts: each use of a position's randomness draws from its own stream.
_SALT_DRAFT, _SALT_ACCEPT, _SALT_RESIDUAL = 0x5EED_D4AF, 0x0ACC_E9F7, 0x4E51_D0A1
_LOG_ZERO = -1e30


def multi_token_attention(cache: KVCache, positions: torch.Tensor, kv_len: int) -> Attention:
    """T new tokens per slot 0..n-1 at `positions` [n, T]; each attends over its slot's cache up to
    its own position. Shapes depend on (n, T, kv_len) only, so a CUDA graph replays for any values."""
    n, t = positions.shape
    rows = torch.arange(n, device=positions.device)[:, None].expand(n, t)
    keys_at = torch.arange(kv_len, device=positions.device)
    mask = (keys_at[None, None, :] <= positions[:, :, None])[:, None]  # [n, 1, T, kv_len]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Advanced indices on dims 1 and 3 put [n, T] first: the values are [n, T, Hkv, D].
        cache.k[layer, rows, :, positions] = cache._stored(k.transpose(1, 2))
        cache.v[layer, rows, :, positions] = cache._stored(v.transpose(1, 2))
        keys = cache.k[layer, :n, :, :kv_len].to(q.dtype)
        values = cache.v[layer, :n, :, :kv_len].to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    return attend


def fused_verify(
    fused: FusedDecoder, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """The target over T tokens a slot (tokens, positions [n, T]) with the fused decode's kernels:
    final-normed hidden [n, T, H], each position attending over its slot up to itself.

    The rows are laid out token-major (row j*n + b), so every kernel of a layer runs once over all
    n*T rows: the q/k norm + RoPE + KV write maps row r to slot r mod n, and one attention launch
    takes all T queries of each slot (`kernels/verify_attention.py`) after every key is written,
    so token j sees tokens 0..j of its own slot."""
    n, t = tokens.shape
    model, cfg = fused.model, fused.model.config
    flat_pos = positions.T.reshape(-1)
    lengths = (positions + 1).T.contiguous()  # [T, n]
    x = model.model.embed_tokens(tokens.T.reshape(-1))
    dtype, heads = x.dtype, fused.num_heads
    cos, sin = rope_cos_sin(flat_pos, cfg.rope, dtype)
    residual = None
    for i, (in_norm, qkv, q_norm, k_norm, o, post_norm, gate_up, down) in enumerate(fused.layers):
        h = decode_kernels.add_rmsnorm(x, residual, in_norm, fused.eps, quant=fused.fp8)
        mixed = qkv(h, dtype)
        q = decode_kernels.qk_norm_rope_kv(
            mixed, q_norm, k_norm, cos, sin, flat_pos, cache.k[i], cache.v[i], heads, fused.eps, num_slots=n
        )  # [T n, heads, D]
        out = verify_attention(q.view(t, n, heads, -1), cache.k[i], cache.v[i], lengths)  # [T, n, heads, D]
        attn = o(out.view(t * n, -1), dtype)
        h = decode_kernels.add_rmsnorm(x, attn, post_norm, fused.eps, quant=fused.fp8)
        residual = down(decode_kernels.silu_mul(gate_up(h, dtype), quant=fused.fp8), dtype)
    hidden = decode_kernels.add_rmsnorm(x, residual, model.model.norm.weight, fused.eps)
    return hidden.view(t, n, -1).transpose(0, 1)


def _salted(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    return seeds ^ salt


def _draw(log_weights: torch.Tensor, seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A draw from softmax(log_weights) [n, V] with the noise of (seed, token index): the sampler's
    fused Gumbel-max kernel where it runs (the noise made in registers), else the same noise
    materialised ([n, V] int64 hashes: most of a batch-64 step's GPU time when the GPU ran it)."""
    if fused_sampling.available(log_weights):
        # log(0) (a truncated token, or none left of the residual) as a large finite number: never
        # drawn, and the kernel's running log-sum-exp, which the draw does not use, stays finite.
        ones = torch.ones(log_weights.shape[0], device=log_weights.device)
        return fused_sampling.sample(log_weights.clamp(min=_LOG_ZERO), ones, seeds, index)[0]
    u = uniform_noise(seeds, index, log_weights.shape[-1])
    return (log_weights - torch.log(-torch.log(u))).argmax(-1)


@dataclass
class _Inputs:
    """The core's inputs, one row per slot (views of, or padding over, the slots' device tables)."""

    last_token: torch.Tensor  # [B] x_{len-1}
    length: torch.Tensor  # [B] len: the index of the next token
    pending: torch.Tensor  # [B] how many positions wait for the draft (1..k+1)
    pend_tokens: torch.Tensor  # [B, k+1] the token after each pending position
    temperature: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B]
    seeds: torch.Tensor  # [B]


def _propose(
    draft: DraftHead, runner: ModelRunner, x: _Inputs, pend_hidden: torch.Tensor, kv_len: int,
    truncate: bool, k: int, fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Step 1, draft: catch up on the pending positions (the last one's output proposes d_1),
    then d_2..d_k autoregressively. Returns the drafts [n, k], log q_j(d_j) [n, k] and each
    q_j [n, k, V] (its logits where `fused`, else its tempered, truncated log-probs)."""
    model, embed, cache = runner.model, runner.model.model.embed_tokens, runner.cache
    rows = torch.arange(x.length.shape[0], device=runner.device)
    span = torch.arange(k + 1, device=runner.device)
    limit = cache.capacity - 1
    greedy = x.temperature <= 0
    pos = (x.length[:, None] - 1 - x.pending[:, None] + span).clamp(max=limit)
    out = draft(pend_hidden, x.pend_tokens, embed, pos, multi_token_attention(cache, pos, kv_len))
    g = out[rows, x.pending - 1]
    drafts, draft_lps, proposals = [], [], []  # d_j [n]; log q_j(d_j) [n]; q_j's logits or log-probs
    for j in range(1, k + 1):
        if j > 1:  # EAGLE: the draft's own output as the next position's hidden state
            at = (x.length - 3 + j).clamp(max=limit)[:, None]
            attention = multi_token_attention(cache, at, kv_len)
            g = draft(g[:, None], drafts[-1][:, None], embed, at, attention)[:, 0]
        logits = model.lm_head(g)
        seeds, index = _salted(x.seeds, _SALT_DRAFT), x.length - 1 + j  # d_j is token index len-1+j
        if fused:
            d, lq = fused_sampling.sample(logits, x.temperature, seeds, index)
            proposals.append(logits)
        else:
            q = tempered_log_probs(logits, x.temperature)
            if truncate:  # renormalised after truncation: q(d) = exp(q[d] - logsumexp(q))
                q = truncated(q, x.top_p, x.top_k)
            d = torch.where(greedy, q.argmax(-1), _draw(q, seeds, index))
            lq = q.gather(-1, d[:, None])[:, 0] - (q.logsumexp(-1) if truncate else 0)
            proposals.append(q)
        drafts.append(d)
        draft_lps.append(lq)
    return torch.stack(drafts, 1), torch.stack(draft_lps, 1), torch.stack(proposals, 1)


def _speculate(
    draft: DraftHead, runner: ModelRunner, x: _Inputs, pend_hidden: torch.Tensor, kv_len: int,
    truncate: bool, k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Draft, verify, accept (device work only, no host sync: what a CUDA graph captures).

    Returns the k+1 candidate tokens per row [n, k+1] (the accepted drafts, then the token
    drawn at the first rejection or the bonus; later entries are junk), the target's log-prob
    of each [n, k+1], how many drafts were accepted [n], and the target's hidden states at the
    verified positions [n, k+1, H].

    Where the sampler's fused kernel runs and no row truncates (`fused`), no distribution is
    materialised but the one row a sequence resamples from: the drafts are drawn by the kernel
    from the draft's logits (which also gives log q(d_j)), log p(d_j) and the kept tokens'
    log-probs come from its log-prob pass over the target's logits, and max(0, p - q) is built
    from the logits of the row at the first rejection only. Elsewhere the tempered (and
    truncated) log-probs are materialised, as the plain sampler does."""
    model, embed, cache = runner.model, runner.model.model.embed_tokens, runner.cache
    n, dev = x.length.shape[0], runner.device
    rows = torch.arange(n, device=dev)
    span = torch.arange(k + 1, device=dev)
    limit = cache.capacity - 1
    greedy = x.temperature <= 0
    fused = not truncate and fused_sampling.available(embed.weight)
    d, draft_lps, proposals = _propose(draft, runner, x, pend_hidden, kv_len, truncate, k, fused)

    # 2. Verify: the target over [x_{len-1}, d_1..d_k] in one forward.
    pos = (x.length[:, None] - 1 + span).clamp(max=limit)
    fed = torch.cat([x.last_token[:, None], d], 1)
    if runner.fused is not None:  # CUDA: the fused decode's kernels, ~13 launches a layer
        hidden = fused_verify(runner.fused, fed, pos, cache)  # [n, k+1, H]
    else:
        hidden = model.model(fed, pos, multi_token_attention(cache, pos, kv_len))
    logits = model.lm_head(hidden)  # [n, k+1, V]
    vocab = logits.shape[-1]
    flat, temps = logits.reshape(-1, vocab), x.temperature.repeat_interleave(k + 1)
    if fused:  # log p_{j-1}(d_j) by the kernel's log-prob pass (row k's entry is unused)
        lp_d = fused_sampling.log_probs(flat, temps, torch.cat([d, d[:, :1]], 1).view(-1))
        lp_d = lp_d.view(n, k + 1)[:, :k]
    else:
        full = tempered_log_probs(flat, temps)  # the log-probs the trainer sees
        target = full
        if truncate:
            target = truncated(full, x.top_p.repeat_interleave(k + 1), x.top_k.repeat_interleave(k + 1))
        full, target = full.view(n, k + 1, vocab), target.view(n, k + 1, vocab)
        lp_d = target[:, :k].gather(-1, d[..., None])[..., 0]
        if truncate:
            lp_d = lp_d - target[:, :k].logsumexp(-1)

    # 3. Accept: d_j with probability min(1, p(d_j) / q(d_j)), both renormalised after truncation.
    ratio = (lp_d - draft_lps).exp()
    index = x.length[:, None] + span[:k]  # token index of d_1..d_k
    u = uniform_noise(
        _salted(x.seeds, _SALT_ACCEPT).repeat_interleave(k), index.reshape(-1), 1
    ).view(n, k)  # fmt: skip
    ok = torch.where(greedy[:, None], d == logits[:, :k].argmax(-1), u < ratio)
    accepted = ok.long().cumprod(1).sum(1)  # [n] leading accepted drafts

    # The token at the first rejection (or the bonus after k): normalise(max(0, p - q)), built
    # for that one row of each sequence (q = 0 for the bonus).
    rejected = proposals[rows, accepted.clamp(max=k - 1)]  # [n, V]
    if fused:
        divisor = torch.where(greedy, 1.0, x.temperature)[:, None]
        p_at = torch.softmax(logits[rows, accepted].float() / divisor, -1)
        q_at = torch.softmax(rejected.float() / divisor, -1)
    else:
        p_at, q_at = torch.softmax(target[rows, accepted], -1), torch.softmax(rejected, -1)
    residual = (p_at - q_at * (accepted < k)[:, None]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)  # p == q to rounding
    drawn = _draw(residual.log(), _salted(x.seeds, _SALT_RESIDUAL), x.length + accepted)
    final = torch.where(greedy, logits[rows, accepted].argmax(-1), drawn)
    tokens = torch.cat([d, torch.zeros_like(d[:, :1])], 1)
    tokens[rows, accepted] = final
    if fused_sampling.available(flat):  # the plain sampler's arithmetic on the GPU (`sampler.py`)
        log_probs = fused_sampling.log_probs(flat, temps, tokens.view(-1)).view(n, k + 1)
    else:
        log_probs = full.gather(-1, tokens[..., None])[..., 0]
    return tokens, log_probs, accepted, hidden


class Speculator:
    def __init__(self, draft: DraftHead, num_steps: int, draft_version: int, runner: ModelRunner) -> None:
        if runner.experts_per_token:
            raise ValueError("speculative decoding is not implemented for MoE models yet")
        self.draft = draft.to(device=runner.device, dtype=runner.model.model.embed_tokens.weight.dtype).eval()
        self.num_steps = num_steps
        self.draft_version = draft_version
        self.target_layers = runner.model.config.num_hidden_layers
        self.device = runner.device
        width, hidden = num_steps + 1, runner.model.config.hidden_size
        self.pend_hidden = torch.zeros(
            (0, width, hidden),
            dtype=self.draft.model.layers[str(self.target_layers)].eh_proj.weight.dtype,
            device=self.device,
        )
        self.pend_n = torch.ones(0, dtype=torch.int64, device=self.device)
        self._params = dict(self.draft.named_parameters())
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation = runner.slots.generation
        self._pool = None
        self.resize(runner.cache.num_slots)
        self.num_verify_steps = 0  # speculative steps run (one target forward each)
        # [row-steps (sum over steps of the running rows), tokens they kept], counted by the step on
        # the device: the host never reads the kept counts (`num_verified_rows`, `num_kept_tokens`).
        self._tallies = torch.zeros(2, dtype=torch.int64, device=self.device)

    # -- bookkeeping that follows the slots -----------------------------------------------------

    def resize(self, num_slots: int) -> None:
        old_h, old_n = self.pend_hidden, self.pend_n
        self.pend_hidden = torch.zeros((num_slots, *old_h.shape[1:]), dtype=old_h.dtype, device=self.device)
        self.pend_n = torch.ones(num_slots, dtype=torch.int64, device=self.device)
        keep = min(num_slots, old_h.shape[0])
        self.pend_hidden[:keep], self.pend_n[:keep] = old_h[:keep], old_n[:keep]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.pend_hidden[dst] = self.pend_hidden[src]
        self.pend_n[dst] = self.pend_n[src]

    def active(self, policy_version: int) -> bool:
        """Draft only with a draft exactly as new as the target (never an older one)."""
        return self.draft_version == policy_version

    @property
    def num_verified_rows(self) -> int:
        return int(self._tallies[0])

    @property
    def num_kept_tokens(self) -> int:
        return int(self._tallies[1])

    def reset_tallies(self) -> None:
        """Count from zero again: steps, rows and kept tokens (a benchmark's timed wave)."""
        self.num_verify_steps = 0
        self._tallies.zero_()

    @property
    def acceptance_length(self) -> float:
        """Tokens kept per sequence per verify step (1 = no draft token ever accepted)."""
        return self.num_kept_tokens / max(self.num_verified_rows, 1)

    # -- weights ---------------------------------------------------------------------------------

    def take(self, state_dict: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The draft's updates in `state_dict` (removed from it), checked; copied by `apply`."""
        updates = []
        for name in [n for n in state_dict if is_draft_name(n, self.draft.config)]:
            tensor = state_dict.pop(name)
            param = self._params.get(name)
            if param is None:
                raise ValueError(f"load_weights: unknown draft parameter {name!r}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            updates.append((param, tensor))
        if updates and len(updates) != len(self._params):
            raise ValueError(f"load_weights: a draft update must carry all {len(self._params)} draft tensors")
        return updates

    @torch.no_grad()
    def apply(self, updates: list[tuple[torch.Tensor, torch.Tensor]], version: int) -> None:
        """Copy a checked draft update; without one the draft stays at its version (then unused)."""
        for param, tensor in updates:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        log.info(
            "speculative decoding so far: %.2f tokens per sequence per verify step (%d verify steps); "
            "weights v%d arrive", self.acceptance_length, self.num_verify_steps, version,
        )  # fmt: skip
        if updates:
            self.draft_version = version
        elif self.draft_version != version:
            log.info("weights v%d came without a draft: decoding without speculation", version)

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(
        self, runner: ModelRunner, first: int, ids: torch.Tensor, hidden: torch.Tensor,
        last: torch.Tensor, leader_of: list[int],
    ) -> None:  # fmt: skip
        """Run the draft over the leaders' prompts (its KV, before followers copy it) and leave
        each new row one pending position: the prompt's last, whose next token is the one prefill
        samples."""
        if ids.shape[1] > 1 and self.active(runner.policy_version):
            self.draft(
                hidden[:, :-1], ids[:, 1:], runner.model.model.embed_tokens,
                attention=runner.cache.prefill(first),
            )  # fmt: skip
        tail = hidden[torch.arange(ids.shape[0], device=self.device), last]
        if leader_of:
            tail = torch.cat([tail, tail[to_device(torch.tensor(leader_of), self.device)]])
        rows = slice(first, first + tail.shape[0])
        self.pend_hidden[rows, 0] = tail.to(self.pend_hidden.dtype)
        self.pend_n[rows] = 1

    # -- one speculative step --------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, runner: ModelRunner, n: int) -> torch.Tensor:
        """Draft k, verify, accept for slots 0..n-1; each row's status (running/stop/length).

        The step is device work from end to end (one graph replay on CUDA): it reads its inputs
        from the slots' device tables and writes the kept tokens and the device's lengths there.
        The host waits for nothing: its lengths move by k + 1, the most a row keeps, until the
        step's statuses bring the device's back (`finishes.py`)."""
        s, cache, k = runner.slots, runner.cache, self.num_steps
        longest = int(s.length[:n].max())  # an upper bound: the KV the step may reach
        runner._reserve(n, min(longest + k + 1, runner.max_seq_len))  # clamped past it
        kv_len = longest + k
        if runner.graphs is not None:  # a preallocated cache: the padded graph step
            status = self._replay(runner, n, kv_len, s.truncate, k)
        else:
            kv_len = min(cache.capacity, -(-kv_len // KV_ALIGN) * KV_ALIGN)
            status = self._step(runner, n, kv_len, s.truncate, k, live=None)
        s.advance_at_most(slice(0, n), k + 1)
        self.num_verify_steps += 1
        return status[:n]

    def _step(
        self, runner: ModelRunner, b: int, kv_len: int, truncate: bool, k: int, live: torch.Tensor | None
    ) -> torch.Tensor:
        """One speculative step for rows 0..b-1, device work only (what a CUDA graph captures); each
        row's status. `live` [b] bool: the rows that hold a sequence (None: all); the others, a
        graph's padding, run a dummy row in their free slot (as `graphs.py`'s do) and keep their
        length."""
        s = runner.slots
        ints, floats = s.dev_ints[:, :b], s.dev_floats[:, :b]

        def running(value: torch.Tensor, padding: float) -> torch.Tensor:
            return value if live is None else torch.where(live, value, padding)

        length, pending = running(ints[0], 2), running(self.pend_n[:b], 1)
        # The token after each pending position: the last `pending` tokens of the sequence.
        at = ((length - pending)[:, None] + torch.arange(k + 1, device=self.device)).clamp(
            max=s.out_tokens.shape[1] - 1
        )
        x = _Inputs(
            last_token=running(s.last_token[:b], 0), length=length, pending=pending,
            pend_tokens=s.out_tokens[:b].gather(1, at), temperature=running(floats[0], 1.0),
            top_p=running(floats[1], 1.0), top_k=running(ints[4], 0), seeds=ints[3],
        )  # fmt: skip
        tokens, log_probs, accepted, hidden = _speculate(
            self.draft, runner, x, self.pend_hidden[:b, : k + 1], kv_len, truncate, k
        )
        return self._keep(runner, x, k, live, tokens, log_probs, accepted, hidden)

    def _keep(
        self, runner: ModelRunner, x: _Inputs, k: int, live: torch.Tensor | None, tokens: torch.Tensor,
        log_probs: torch.Tensor, accepted: torch.Tensor, hidden: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Write each row's kept tokens (accepted drafts + one, cut at a stop or the length limit)
        and move its device length on; each row's status. Device work only.

        A row that finished in the last step (read late, the host has not retired it yet: at its
        limit, or its last token a stop) keeps nothing; what the step wrote past its end is never
        read. The tallies count the other live rows."""
        s = runner.slots
        b = tokens.shape[0]
        rows, span = s.slot_ids[:b], torch.arange(k + 1, device=self.device)
        limit = s.dev_ints[5, :b]
        room = limit - x.length  # >= 1 for a running row, 0 for one that finished at its limit
        finished = (room <= 0) | (x.last_token[:, None] == s.dev_stop_ids[:b]).any(-1)
        counted = ~finished
        if live is not None:  # a padding row is neither: it keeps what it drew, in its free slot
            finished, counted = finished & live, counted & live
        kept = torch.minimum(accepted + 1, room if live is None else torch.where(live, room, k + 1))
        stop = (tokens[..., None] == s.dev_stop_ids[:b, None, :]).any(-1) & (span < kept[:, None])
        first_stop = torch.where(stop, span, k + 1).min(1).values
        kept = torch.where(finished, 0, torch.minimum(kept, first_stop + 1))
        self._tallies += torch.stack([counted.sum(), (kept * counted).sum()])
        at = (x.length[:, None] + span).clamp(max=s.out_tokens.shape[1] - 1)
        s.out_tokens[rows[:, None], at] = tokens  # entries past `kept` are overwritten later
        s.out_log_probs[rows[:, None], at] = log_probs
        s.out_versions[rows[:, None], at] = runner.version
        s.last_token[:b] = tokens[rows, kept - 1]
        self.pend_hidden[:b, : k + 1] = hidden.to(self.pend_hidden.dtype)
        self.pend_n[:b] = kept
        length = x.length + kept  # x.length may be a view of the table: read before it moves
        s.dev_ints[0, :b] = length if live is None else torch.where(live, length, s.dev_ints[0, :b])
        status = torch.where(length >= limit, LENGTH, RUNNING)
        return torch.where(first_stop < kept, STOP, status)

    # -- CUDA graphs -----------------------------------------------------------------------------

    def _replay(self, runner: ModelRunner, n: int, kv_len: int, truncate: bool, k: int) -> torch.Tensor:
        """The step for slots 0..n-1 from the graph of its (batch bucket, KV bucket, truncation, k)
        key, padded as `graphs.py` pads (its live-row count is the one both steps read)."""
        s, graphs = runner.slots, runner.graphs
        if s.generation != self._generation:  # a table the graphs read was reallocated
            self.graphs.clear()
            self._pool = None  # and a new pool for the next captures (`DecodeGraphs.run` says why)
            self._generation = s.generation
        graphs.set_running(n)
        key = (graphs.bucket(n), kv_bucket(kv_len, runner.cache.capacity), truncate, k)
        if not graphs.capture:  # off CUDA (tests): the graph's function, eagerly
            return self._graph_step(runner, *key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(runner, key)
        graph, status = self.graphs[key]
        graph.replay()
        return status

    def _graph_step(self, runner: ModelRunner, b: int, kv_len: int, truncate: bool, k: int) -> torch.Tensor:
        live = runner.graphs.rows[:b] < runner.graphs.num_running
        return self._step(runner, b, kv_len, truncate, k, live)

    def _capture(self, runner: ModelRunner, key: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The warm-up (off the capture, as graphs.py explains) moves the rows on; put what it moved
        # back, so the replay runs the step once. Its other writes (KV, outputs at the same
        # positions) are the replay's own.
        s, b = runner.slots, key[0]
        moved = [s.dev_ints[0, :b], s.last_token[:b], self.pend_n[:b], self.pend_hidden[:b], self._tallies]
        saved = [t.clone() for t in moved]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._graph_step(runner, *key)
            for t, before in zip(moved, saved, strict=True):
                t.copy_(before)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            graph, pool=self._pool, capture_error_mode="thread_local"
        ):  # graphs.py says why
            status = self._graph_step(runner, *key)
        return graph, status
