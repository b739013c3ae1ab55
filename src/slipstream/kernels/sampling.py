"""One fused pass over the logits that samples a token per row and returns its log-prob (Triton).

Why a kernel. The engine's plain sampler (`services/rollout/engine/sampler.py`) materializes the
tempered log-softmax and its hashed noise as [batch, vocab] tensors, a dozen int64 passes over
them: at batch 256 and a 152k vocabulary that is ~10 GB of memory traffic per decode step, more
than the whole model and KV cache. This kernel reads each row of logits once and keeps only
running scalars: an online log-sum-exp of logits/T, the arg-max of logits/T + Gumbel noise
(Gumbel-max draws exactly from the softmax, and the per-row log-sum-exp does not move the arg-max)
and the plain arg-max for greedy rows.

Each row's vocabulary is cut into runs of whole blocks, one program each (`split`: ~32 a row, a
function of the vocabulary size only), and a second one-program-a-row kernel merges the runs'
scalars in vocabulary order. One program a row left the GPU mostly idle at batch 256 (256
programs, each hashing and taking two logs per vocabulary entry: ~0.2 ms a step); the merge keeps
the answers: the noise and each candidate's value are per entry, so the token is the same, ties go
to the lowest id as before (each run keeps its lowest, the merge takes the lowest of the runs that
reach the maximum), and the log-sum-exp is the runs' partial sums rescaled to the common maximum,
in an order fixed per row, so a row's log-prob does not depend on its batch
(--true-on-policy-mode's trainer calls `log_probs` on batches of another size).

Inside a run each lane keeps its own running sum and best value over the run's blocks (lane l sees
ids lo + l, lo + l + BLOCK, ... in order) and the program reduces them once at the run's end: a
block costs one reduction (its maximum, for the log-sum-exp's rescaling) instead of four, and a
greedy row skips the noise (session 12's kernel reduced the sum, the noisy and the plain arg-max
every block: 176 us at batch 256 on an H200 against 154 us now, bench/results/engine_gpu_s13.json).

It computes the same function as the plain sampler without truncation: the same counter-based
hash (seed, token index, vocab id) -> uniform -> Gumbel, the same log-prob convention (full
vocabulary, before truncation; greedy under the raw logits). The hash is spelled in 64-bit
integers with the same 32-bit masks, so the noise is bit-identical; `log`/`exp` may differ from
PyTorch's in the last ulp, which can flip a near-tie between two candidates and nothing else
(tests/test_engine_gpu.py bounds it). Rows that ask for top-k/top-p take the plain path.

`available(logits)` says whether the kernel can run; callers fall back otherwise.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain sampler runs instead
    triton = None

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# Logits per loop step and warps: one setting, so sampling and `log_probs` agree. PARTS: programs a
# row aims for (the vocabulary is cut into that many runs of whole blocks; 152k ids -> 30 of 5,120).
# Read per call, so bench/engine_gpu.py can time other settings in one process. 1024 / 4 warps was
# the fastest of the H200's sweep (bench/results/engine_gpu_s13.json, `sampler_sweep`: 153.7 us at
# batch 256 and 44.1 at 64; 2048 / 4: 162.3 and 48.3; 2048 / 8: 172.5 and 49.5; 1024 / 2: 155.9
# and 47.2; 4096 / 8: 271.6 and 75.0), the same tokens under each.
BLOCK, WARPS, PARTS = 1024, 4, 32


def available(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda and logits.dim() == 2


if triton is not None:

    @triton.jit
    def _mix32(x, MASK):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK
        return x ^ (x >> 16)

    @triton.jit
    def _mix32_u32(x, MUL):
        # _mix32 in native uint32 arithmetic: a product's low 32 bits are what the int64 spelling
        # keeps with its mask, so the hash is bit-identical; the per-vocab-entry work avoids int64
        # multiplies, which the GPU emulates (this loop runs over the whole vocabulary per row).
        x = (x ^ (x >> 16)) * MUL
        x = (x ^ (x >> 16)) * MUL
        return x ^ (x >> 16)

    # The per-row arrays (temperatures, seeds, positions, given tokens) are often slices of a
    # slot table at the batch's first row, so their alignment changes from batch to batch: not
    # specialised on it, a kernel compiled in the rollout server's warm-up serves every batch (each
    # new alignment class compiled again on a real batch: 0.8 s on a cold cache, session 13).
    @triton.jit(do_not_specialize_on_alignment=["temp_ptr", "seed_ptr", "pos_ptr"])
    def _partial_kernel(
        logits_ptr, stride, temp_ptr, seed_ptr, pos_ptr, stats_ptr, idx_ptr,
        V, CHUNK, MASK, GOLDEN, SPLITS: tl.constexpr, BLOCK: tl.constexpr, GIVEN: tl.constexpr,
    ):  # fmt: skip
        # Program (row, part) runs over vocabulary ids [part * CHUNK, (part + 1) * CHUNK) and leaves
        # its scalars in stats [row, 3, SPLITS] (max and sum of the log-sum-exp, the best value:
        # logit + Gumbel noise for a sampled row, the plain logit for a greedy one) and idx
        # [row, SPLITS] (the best value's vocabulary id).
        # GIVEN: only the log-sum-exp is needed (`log_probs`: the trainer's side of
        # --true-on-policy-mode on the GPU), by the same loop that sampling runs.
        row = tl.program_id(0)
        part = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        greedy = t <= 0
        t = tl.where(greedy, 1.0, t)
        lo = part * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        base = logits_ptr + row.to(tl.int64) * stride
        # Per-lane accumulators: lane l sees ids lo + l, lo + l + BLOCK, ... in order, so a strict
        # `>` keeps each lane's lowest id of its maximum, and one reduction after the loop finds the
        # lowest id of the run's maximum; the loop reduces once per block (the log-sum-exp's max).
        run_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        run_sum = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)  # noisy values (sampled rows) or plain (greedy)
        best_idx = tl.zeros([BLOCK], tl.int32)
        if not GIVEN:
            seed = tl.load(seed_ptr + row)
            pos = tl.load(pos_ptr + row)
            s = _mix32((seed & MASK) ^ _mix32((seed >> 32) & MASK, MASK), MASK)
            key = _mix32(s ^ _mix32((pos & MASK) + 0x3C6EF372, MASK), MASK)
            key32 = key.to(tl.uint32)
            golden32 = GOLDEN.to(tl.uint32)
            mul32 = tl.full([], 0x45D9F3B, tl.uint32)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < hi
            x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
            z = x / t
            # online log-sum-exp of z (every block holds at least one valid id: m is finite)
            m = tl.maximum(run_max, tl.max(z, axis=0))
            run_sum = run_sum * tl.exp(run_max - m) + tl.exp(z - m)
            run_max = m
            if not GIVEN:
                if greedy:  # the plain arg-max; no noise
                    y = x
                else:  # counter-based noise, as sampler.uniform_noise spells it
                    h = _mix32_u32(_mix32_u32(key32 + offs.to(tl.uint32) * golden32, mul32) ^ key32, mul32)
                    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                    y = tl.where(valid, z - tl.log(-tl.log(u)), float("-inf"))
                better = y > best  # strict: a lane's earlier id wins a tie, like torch.argmax
                best_idx = tl.where(better, offs, best_idx)
                best = tl.where(better, y, best)
        out = stats_ptr + row.to(tl.int64) * (3 * SPLITS) + part
        tl.store(out, run_max)
        tl.store(out + SPLITS, tl.sum(run_sum, axis=0))
        if not GIVEN:
            v = tl.max(best, axis=0)
            i = tl.min(tl.where(best == v, best_idx, 2147483647), axis=0)
            tl.store(out + 2 * SPLITS, v)
            tl.store(idx_ptr + row.to(tl.int64) * SPLITS + part, i)

    @triton.jit(do_not_specialize_on_alignment=["temp_ptr", "tok_ptr"])  # as _partial_kernel's
    def _merge_kernel(
        logits_ptr, stride, temp_ptr, stats_ptr, idx_ptr, tok_ptr, lp_ptr, NUM_SPLITS,
        SPLITS: tl.constexpr, GIVEN: tl.constexpr,
    ):  # fmt: skip
        # One program a row, over its parts in vocabulary order: a fixed order for a given
        # vocabulary size, whatever the batch (the log-prob's reduction is a function of the row).
        row = tl.program_id(0)
        t = tl.load(temp_ptr + row)
        greedy = t <= 0
        t = tl.where(greedy, 1.0, t)
        parts = tl.arange(0, SPLITS)
        live = parts < NUM_SPLITS
        stats = stats_ptr + row.to(tl.int64) * (3 * SPLITS) + parts
        maxes = tl.load(stats, mask=live, other=float("-inf"))
        sums = tl.load(stats + SPLITS, mask=live, other=0.0)
        m = tl.max(maxes, axis=0)
        total = tl.sum(tl.where(live, sums * tl.exp(maxes - m), 0.0), axis=0)
        base = logits_ptr + row.to(tl.int64) * stride
        if GIVEN:
            tok = tl.load(tok_ptr + row)
        else:
            # the lowest vocabulary id among the parts that reach the maximum: each part already
            # holds its own lowest, so this is torch.argmax's tie rule over the whole row
            ids = idx_ptr + row.to(tl.int64) * SPLITS + parts
            best = tl.load(stats + 2 * SPLITS, mask=live, other=float("-inf"))
            best_ids = tl.load(ids, mask=live, other=2147483647)
            tok = tl.min(tl.where(live & (best == tl.max(best, axis=0)), best_ids, 2147483647), axis=0)
            tl.store(tok_ptr + row, tok.to(tl.int64))
        x_tok = tl.load(base + tok).to(tl.float32)
        tl.store(lp_ptr + row, x_tok / t - (m + tl.log(total)))


def split(vocab: int) -> tuple[int, int]:
    """(vocabulary ids per program, programs per row) for a vocabulary: a function of its size
    alone, so a CUDA graph's launch and a row's reduction order never depend on the batch."""
    per = max(BLOCK, -(-vocab // (PARTS * BLOCK)) * BLOCK)
    return per, -(-vocab // per)


def _launch(logits, temperature, seeds, positions, tokens, given: bool) -> torch.Tensor:
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    per, parts = split(vocab)
    padded = triton.next_power_of_2(parts)
    stats = torch.empty(n, 3, padded, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, padded, dtype=torch.int32, device=logits.device)
    temperature = temperature.float().contiguous()
    log_probs = torch.empty(n, dtype=torch.float32, device=logits.device)
    _partial_kernel[(n, parts)](
        logits, logits.stride(0), temperature, seeds.contiguous(), positions.contiguous(), stats, ids,
        vocab, per, _MASK32, _GOLDEN, SPLITS=padded, BLOCK=BLOCK, GIVEN=given, num_warps=WARPS,
    )  # fmt: skip
    _merge_kernel[(n,)](
        logits, logits.stride(0), temperature, stats, ids, tokens, log_probs, parts,
        SPLITS=padded, GIVEN=given, num_warps=1,
    )  # fmt: skip
    return log_probs


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [n] int64 and log-probs [n] float32 from logits [n, V] (no truncation); CUDA only."""
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return tokens, _launch(logits, temperature, seeds, positions, tokens, given=False)


def log_probs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax(logits / temperature)[tokens] [n] float32 from logits [n, V], by `sample`'s own
    loop: bit for bit the log-prob `sample` reports when it draws these tokens; CUDA only."""
    unused = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)  # seeds, positions
    return _launch(logits, temperature, unused, unused, tokens.to(torch.int64).contiguous(), given=True)
