"""Vectorised sampling for a batch of sequences, each with its own temperature/top-k/top-p/seed.

Log-prob convention (the trainer computes the same): the log-softmax of `logits / temperature`
over the whole vocabulary, taken BEFORE top-k/top-p truncation; temperature 0 means greedy and
its log-prob is under the raw logits. Truncation changes which tokens can be drawn, not the
number reported, so behaviour log-probs stay comparable with the trainer's full-vocabulary ones.

Randomness is counter-based: the noise for (request seed, token index, vocabulary id) is a hash,
turned into Gumbel noise and added to the truncated log-probs (Gumbel-max draws exactly from the
softmax). No generator state is carried between steps, so there is no per-row loop over
`torch.Generator`s, a request draws the same numbers whatever batch it shares, and a partial
rollout continued at token index t draws what it would have drawn uninterrupted.

On CUDA, rows without truncation go through one fused Triton pass over the logits
(`slipstream.kernels.sampling`, same function, bit-identical noise), and the log-probs of tokens
drawn here come from that kernel's loop too (`sampling.log_probs`), so a reported log-prob has one
arithmetic on the GPU, the one the trainer uses under --true-on-policy-mode; this file is the
reference and the path everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.kernels import sampling as fused

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of 32-bit values held in int64 (products stay below 2**63)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), [n, vocab_size], a pure function of (seed [n], token index [n], vocab id)."""
    s = _mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) & _MASK32))
    row = _mix32(s ^ _mix32((positions & _MASK32) + 0x3C6EF372))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32((row[:, None] + vocab * 0x9E3779B9) & _MASK32) ^ row[:, None])
    # 24 bits so the value is exact in fp32 and never 0 or 1.
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingParams:
    """Per-row parameters, each [n] on the logits' device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32; 1 = off
    top_k: torch.Tensor  # int64; <= 0 = off
    seeds: torch.Tensor  # int64, non-negative
    positions: torch.Tensor  # int64: index in its sequence of the token being sampled


def sample(
    logits: torch.Tensor, params: SamplingParams, truncate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [n] int64 and their log-probs [n] float32 from logits [n, V].

    `truncate=False` skips the top-k/top-p sort when the caller knows no row asks for it.
    """
    if not truncate and fused.available(logits):
        return fused.sample(logits, params.temperature, params.seeds, params.positions)
    logits = logits.float()
    greedy = params.temperature <= 0
    log_probs = tempered_log_probs(logits, params.temperature)
    candidates = truncated(log_probs, params.top_p, params.top_k) if truncate else log_probs
    u = uniform_noise(params.seeds, params.positions, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    sampled = (candidates + gumbel).argmax(-1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    if fused.available(logits):  # the fused kernel's arithmetic: on CUDA a log-prob has one spelling
        return tokens, fused.log_probs(logits, params.temperature, tokens)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def tempered_log_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log-softmax(logits / T) [n, V] in fp32; a greedy row (T = 0) under the raw logits."""
    greedy = temperature <= 0
    temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    return torch.log_softmax(logits.float() / temperature[:, None], dim=-1)


def truncated(log_probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """log_probs [n, V] with the tokens top-k/top-p cut set to -inf (not renormalised)."""
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    rank = torch.arange(log_probs.shape[-1], device=log_probs.device)
    # Top-p keeps the smallest prefix whose mass reaches p (the first token always stays);
    # both cut-offs are on the full distribution, as SGLang applies them.
    drop = (probs.cumsum(-1) - probs) > top_p[:, None]
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    return torch.empty_like(log_probs).scatter_(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
