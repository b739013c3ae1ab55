"""How a step runs: the model, the KV cache, the slots' state, and the prefill and decode paths.

Prefill is one right-padded batch of the admitted leaders through the model's own forward; the
followers then copy their leader's KV (`scheduler.py` says who is admitted). Decode feeds every
running sequence its last token and samples the next one: one batched forward and one vectorised
sample, with no Python loop over sequences. Sampled tokens, their log-probs and the policy version
that produced them are written on the device (`Slots.record`, which also moves the device's
lengths on and computes each row's status there) and read back once, when a sequence retires.

The host stays off the GPU's critical path: nothing in a step waits for the device. Each step's
status codes (running/stop/length) are read one step later, after the next step is queued, and the
outputs of the rows they say finished one step after that (`finishes.py`); compaction
(`scheduler.compaction`) moves the survivors as soon as a finish is read.

There are three decode paths, same function, fastest first. On a GPU the KV cache is
preallocated once from a fraction of the free memory and each decode step (forward and sampling)
is replayed from a CUDA graph captured per batch/length bucket (`graphs.py`: inputs, outputs and
statuses inside it, so the host's part of a step is the replay and one copy). Without graphs, on
CUDA the decode forward is `fused_step.FusedDecoder`: the model's function in seven launches a
layer instead of ~40 (fused q|k|v and gate|up GEMMs, fused glue kernels). Everywhere else (the
CPU) it is the model's own forward, run eagerly. With `fp8=True` every linear projection holds
e4m3 weights and runs through `slipstream.kernels.fp8_linear` (FP8 tensor cores on Hopper); an
MoE's routers stay as they are and its routed experts in the model's dtype (there is no FP8
grouped expert GEMM: an FP8 version's experts arrive dequantized, `WeightStager`);
`kv_cache_dtype="fp8_e4m3"` stores keys and values as e4m3 (`kv_cache.py`). With `int4_targets`
(--weight-sync-dtype int4) the `quant.int4_names` linear layers hold packed int4 weights and group
scales and run W4A16 (`kernels.w4a16`: a Triton GEMM on CUDA, dequantize-then-matmul on the CPU);
an int4 version is copied in as the packed bytes it arrived as, an FP8 one as its blocks
(`quantized_weights.py`).

A mixture-of-experts model (Qwen3-MoE) runs its experts as two grouped GEMMs on CUDA (`kernels.moe`:
torch._grouped_mm on Hopper in bf16, Triton elsewhere, `MOE_EXPERT_KERNEL`; no host sync), so its
decode steps are CUDA graphs like a dense model's (the fused decoder is dense-only); on the CPU it
runs the model's eager expert loop. Under --true-on-policy-mode on CUDA the experts are the
invariant grouped GEMMs at the mode's one tiling (`kernels.invariant_gpu.grouped_linear`), decoded
in graphs too (`INVARIANT_MOE_GRAPHS`), and summed over k in the trainer's order. Prefill and
decode pass the model a `Routing` and record the expert ids it routed each fed position to (`slots.out_experts`; the
graphs return them), read back at retire like the tokens: every position of the sequence but the
last, prompt included (prefill computes them anyway, and R3 must replay the prompt's routing too).

Weights are swapped in place between steps (`load_weights`): the KV cache is kept, and every
token sampled afterwards carries the new policy version, so a trajectory that spans the swap
reports exactly which tokens came from which weights. Copying into the same tensors is also what
keeps the CUDA graphs and the fused weights valid across versions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from slipstream.kernels.fp8_linear import convert_to_fp8
from slipstream.kernels.invariant import make_invariant, round_to_served_
from slipstream.kernels.moe import use_grouped_experts
from slipstream.kernels.w4a16 import convert_to_w4a16
from slipstream.models import Qwen3ForCausalLM, Routing
from slipstream.models.draft import is_draft_name
from slipstream.quant import FP8_DTYPE
from slipstream.services.rollout.engine import fused_step
from slipstream.services.rollout.engine.finishes import Finishes, Retired
from slipstream.services.rollout.engine.graphs import DecodeGraphs
from slipstream.services.rollout.engine.kv_cache import KV_ALIGN, KVCache
from slipstream.services.rollout.engine.quantized_weights import (
    round_unconverted_,
    take_fp8_blocks,
    take_full_precision,
    take_int4,
)
from slipstream.services.rollout.engine.request import FinishReason
from slipstream.services.rollout.engine.sampler import SamplingParams, sample
from slipstream.services.rollout.engine.scheduler import Admission, compaction
from slipstream.services.rollout.engine.slots import Slots, to_device

KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": FP8_DTYPE}

# --true-on-policy-mode's MoE decode in CUDA graphs. Its experts run as grouped GEMMs with the
# per-expert counts on the device (`kernels/invariant_gpu.grouped_linear`), so a graph captures
# them. Checked on the H200 (session 15): tests/test_true_on_policy_gpu.py's moe-graphs case, and
# max |trainer - sampler| 0.0 over 16,416 sampled tokens at concurrency 1/8/64 with graphs on,
# 3.5-4.9x the mode's tokens/s without them (bench/true_on_policy.py --invariant-moe-graphs).
INVARIANT_MOE_GRAPHS = True

# The default engine's MoE experts on CUDA (`kernels/moe.py`): "grouped_mm", torch._grouped_mm
# (CUTLASS, Hopper bf16 only), or "triton", the bitwise mode's grouped GEMM at the engine's tiling,
# which runs on any CUDA GPU and dtype and is what a model takes where grouped_mm does not. On the
# H200 at the Qwen3-30B-A3B shape neither wins throughout (bench/moe_gpu.py --expert-kernels,
# session 16: Triton 0.99x / 1.12x / 0.94x grouped_mm's tokens/s at batch 1 / 64 / 256).
MOE_EXPERT_KERNEL = "grouped_mm"

if TYPE_CHECKING:
    from slipstream.services.rollout.engine.speculative import Speculator

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        eos_token_ids: list[int],
        max_batch_size: int,
        max_seq_len: int | None,
        policy_version: int,
        *,
        seed: int,
        fp8: bool,
        kv_memory_fraction: float,
        preallocate: bool | None,
        cuda_graphs: bool,
        fused_decode: bool,
        kv_cache_dtype: str,
        int4_targets: str = "",  # --int4-qat-targets under --weight-sync-dtype int4; "" = no int4
        draft_layers: int = 0,
        invariant: bool = False,
    ) -> None:
        """The options are `NativeEngine`'s; `max_batch_size` may come out lower (the KV cache's fit).
        `draft_layers`: KV-cache layers after the target's for a speculative draft head (`speculative.py`)."""
        self.model = model.eval()
        if invariant:  # --true-on-policy-mode: the trainer's arithmetic, token by token
            if fp8 or int4_targets or kv_cache_dtype != "auto" or draft_layers:
                raise ValueError(
                    "--true-on-policy-mode runs at full precision: no FP8/int4 weights, FP8 KV cache or "
                    "speculative draft"
                )
            make_invariant(model)
            round_to_served_(model)  # the checkpoint's weights as a bf16 version would bring them
            fused_decode = False  # the model's own forward (CUDA graphs capture it on the GPU)
        if fp8 and int4_targets:
            raise ValueError("fp8=True and int4 weights exclude each other: a layer holds one format")
        self.fp8_layers = convert_to_fp8(model) if fp8 else {}
        self.int4_layers = convert_to_w4a16(model, int4_targets) if int4_targets else {}
        if int4_targets:
            round_unconverted_(model, int4_targets, self.int4_layers)
        self.eos_token_ids = list(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.policy_version = policy_version
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        cfg = model.config
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
            )
        moe_layers = cfg.moe_layers
        self.experts_per_token = len(moe_layers) * cfg.num_experts_per_tok  # 0: dense
        expert_dtype = torch.uint8 if cfg.num_experts <= 256 else torch.int16
        if moe_layers and self.device.type == "cuda" and invariant:
            cuda_graphs = cuda_graphs and INVARIANT_MOE_GRAPHS
        elif moe_layers and self.device.type == "cuda":
            fused_decode = False  # the fused decoder is dense-only
            # Grouped GEMMs have static shapes and no host sync, so MoE decode runs in CUDA graphs;
            # the expert loop reads per-expert counts on the host and cannot be captured.
            grouped = use_grouped_experts(model, MOE_EXPERT_KERNEL) or use_grouped_experts(model, "triton")
            if not grouped and cuda_graphs:
                log.warning(
                    "MoE model: no grouped expert GEMM for these weights; decoding without CUDA graphs"
                )
                cuda_graphs = False
        self.draft_layers = draft_layers
        self.speculator: Speculator | None = None  # set by the engine when it drafts
        self.cache = KVCache(
            cfg.num_hidden_layers + draft_layers, cfg.num_key_value_heads, cfg.head_dim,
            max_batch_size, self.max_seq_len, KV_CACHE_DTYPES[kv_cache_dtype] or weight.dtype, self.device,
            invariant=invariant,
        )  # fmt: skip
        if preallocate is None:
            preallocate = self.device.type == "cuda"
        if preallocate:
            self._preallocate(kv_memory_fraction)
        self.slots = Slots(self.device, self.experts_per_token, expert_dtype)
        self.slots.resize(self.cache.num_slots, self.cache.capacity)
        # The version the tokens sampled next carry, on the device too (a graph reads it there).
        self.version = torch.tensor(policy_version, dtype=torch.int64, device=self.device)
        self.fused = fused_step.FusedDecoder(model) if fused_decode and fused_step.available(model) else None
        self.graphs = (
            DecodeGraphs(self) if cuda_graphs and preallocate and self.device.type == "cuda" else None
        )
        self._rng = torch.Generator().manual_seed(seed)
        self._params = dict(model.named_parameters())
        self.num_prefill_tokens = 0  # prompt tokens actually run through prefill (shared ones once)
        self.finishes = Finishes(self.slots, self._retire)  # read one step late (`finishes.py`)

    def _preallocate(self, fraction: float) -> None:
        cfg = self.model.config
        per_slot = (
            KVCache.bytes_per_slot(
                cfg.num_hidden_layers + self.draft_layers,
                cfg.num_key_value_heads,
                cfg.head_dim,
                self.max_seq_len,
                self.cache.dtype,
            )
            + self.max_seq_len * self.experts_per_token * 2
        )  # + the routing record (at most int16)
        slots = self.max_batch_size
        if self.device.type == "cuda":
            if not 0 < fraction <= 1:
                raise ValueError(f"kv_memory_fraction must be in (0, 1], got {fraction}")
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * fraction)
            slots = min(slots, budget // per_slot)
            if slots < 1:
                raise ValueError(
                    f"KV cache: one slot of {self.max_seq_len} positions needs {per_slot / 2**30:.2f} GiB, "
                    f"but {fraction:.0%} of the free GPU memory is {budget / 2**30:.2f} GiB; "
                    "lower the maximum sequence length or raise the fraction"
                )
            if slots < self.max_batch_size:
                log.warning(
                    "KV cache fits %d of %d slots of %d positions; the batch is capped at %d",
                    slots, self.max_batch_size, self.max_seq_len, slots,
                )  # fmt: skip
                self.max_batch_size = slots
        self.cache.preallocate(slots, self.max_seq_len)

    @property
    def num_running(self) -> int:
        return self.slots.num_running

    # -- one step --------------------------------------------------------------------------------

    def prefill(self, admission: Admission, first: int) -> torch.Tensor:
        """Prefill the admitted requests into slots first..; status codes of the new rows."""
        # Slots: the leaders first (one right-padded prefill), then the followers.
        leaders, followers, longest = admission.leaders, admission.followers, admission.longest
        batch = admission.batch
        self._reserve(first + len(batch), longest + 1)
        seeds = torch.randint(0, 1 << 62, (len(batch),), generator=self._rng).tolist()
        self.slots.fill(first, batch, self.eos_token_ids, seeds, self.max_seq_len)
        ids = torch.zeros((len(leaders), longest), dtype=torch.int64)
        for i, req in enumerate(leaders):
            ids[i, : len(req.tokens)] = torch.tensor(req.tokens)
        ids = to_device(ids, self.device)
        self.num_prefill_tokens += sum(len(r.tokens) for r in leaders)
        routing = self._routing()
        hidden = self.model.model(ids, attention=self.cache.prefill(first), routing=routing)
        if routing is not None:  # every prompt position's experts; padding rows are overwritten later
            rows = slice(first, first + len(leaders))
            self.slots.out_experts[rows, :longest] = self._experts(routing)
        last = to_device(torch.tensor([len(r.tokens) - 1 for r in leaders]), self.device)
        if self.speculator is not None:  # the draft's KV too, before followers copy the leaders'
            self.speculator.prefill(self, first, ids, hidden, last, admission.leader_of)
        logits = self.model.lm_head(hidden[torch.arange(len(leaders), device=self.device), last])
        if followers:
            group = to_device(torch.tensor(admission.leader_of), self.device)
            dst = torch.arange(first + len(leaders), first + len(batch), device=self.device)
            self.cache.share(first + group, dst, max(len(r.tokens) for r in followers))
            if routing is not None:
                self.slots.out_experts[dst, :longest] = self.slots.out_experts[first + group, :longest]
            logits = torch.cat([logits, logits[group]])
        return self._sample(slice(first, first + len(batch)), logits)

    def decode(self, n: int) -> torch.Tensor:
        """One token for slots 0..n-1: feed each last token, attend over its cached prefix."""
        spec = self.speculator
        if spec is not None and spec.active(self.policy_version):
            return spec.decode(self, n)
        # Capped: after a speculative step the host's lengths are upper bounds (`slots.py`).
        kv_len = min(int(self.slots.length[:n].max()), self.max_seq_len)
        self._reserve(n, kv_len)  # the new token goes to the outputs' column kv_len (`slots.py`)
        rows = slice(0, n)
        if self.graphs is not None:  # the whole step, records and statuses included, is the replay
            status = self.graphs.run(n, kv_len, self.slots.truncate)
            self.slots.advance(rows)
            return status
        params, truncate = self.slots.params(rows), self.slots.truncate
        positions = params.positions - 1
        if self.fused is not None:
            hidden = self.fused(self.slots.last_token[:n], positions, self.cache)
            tokens, log_probs = sample(self.model.lm_head(hidden), params, truncate)
            return self._record(rows, params, tokens, log_probs)
        # Attend over a length rounded up to the cache's alignment (the mask hides the rest): the
        # attention shape then repeats across steps and backends cache their plans (cuDNN builds
        # a new one per shape, which cost more than the whole forward).
        kv_len = min(self.cache.capacity, -(-kv_len // KV_ALIGN) * KV_ALIGN)
        attention = self.cache.decode(positions, kv_len)
        routing = self._routing()
        hidden = self.model.model(self.slots.last_token[:n, None], positions[:, None], attention, routing)
        if routing is not None:
            fed = self._experts(routing)[:, 0]  # [n, layers * k]: the experts of each fed token
            self.slots.out_experts[self.slots.slot_ids[:n], positions] = fed
        tokens, log_probs = sample(self.model.lm_head(hidden[:, -1]), params, truncate)
        return self._record(rows, params, tokens, log_probs)

    def _routing(self) -> Routing | None:
        return Routing() if self.experts_per_token else None

    def _experts(self, routing: Routing) -> torch.Tensor:
        """Captured ids [B, T, layers, k] -> [B, T, layers * k] in the record's dtype."""
        ids = routing.stacked()
        return ids.reshape(*ids.shape[:2], -1).to(self.slots.out_experts.dtype)

    def _sample(self, rows: slice, logits: torch.Tensor) -> torch.Tensor:
        """Sample and record one token per row; each row's status code (running/stop/length)."""
        params, truncate = self.slots.sampling(rows)
        tokens, log_probs = sample(logits, params, truncate)
        return self._record(rows, params, tokens, log_probs)

    def _record(
        self, rows: slice, params: SamplingParams, tokens: torch.Tensor, log_probs: torch.Tensor
    ) -> torch.Tensor:
        """Write the sampled tokens into the rows' outputs; each row's status (running/stop/length)."""
        status = self.slots.record(rows, params.positions, tokens, log_probs, self.version)
        self.slots.advance(rows)
        return status

    def _reserve(self, num_slots: int, length: int) -> None:
        if self.cache.reserve(num_slots, length):
            self.slots.resize(self.cache.num_slots, self.cache.capacity)
            if self.speculator is not None:
                self.speculator.resize(self.cache.num_slots)

    def _retire(self, rows: list[int], reasons: list[FinishReason], ends: list[int]) -> Retired:
        """Start copying the outputs of `rows` out, then free their slots, keeping running slots
        contiguous (the copies are queued first, so they read the rows before anything moves in)."""
        s = self.slots
        retired = Retired(s, rows, reasons, ends)
        keep, movers, holes = compaction(self.num_running, rows)
        if holes:
            longest = int(s.length[movers].max())  # no mover has cached anything past it
            s.move(movers, holes)
            src, dst = (
                to_device(torch.tensor(movers), self.device),
                to_device(torch.tensor(holes), self.device),
            )
            self.cache.move(src, dst, longest)
            if self.speculator is not None:
                self.speculator.move(src, dst)
        s.release(keep)
        return retired

    # -- weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy (a subset of) weights into the model in place, dtype-cast; later tokens get `version`.

        Every name and shape is checked before anything is copied, so a bad update changes nothing.
        """
        tied = self.model.config.tie_word_embeddings
        state_dict = dict(state_dict)
        # A draft travels in the same version (`speculative.py`); a server that does not draft drops it.
        if self.speculator is not None:
            draft_updates = self.speculator.take(state_dict)
        else:
            draft_updates = []
            for name in [n for n in state_dict if is_draft_name(n, self.model.config)]:
                del state_dict[name]
        state_dict = dict(state_dict)
        copies = take_int4(state_dict, self.int4_layers, self._params)  # packed int4 + scales
        copies += take_fp8_blocks(state_dict, self.fp8_layers)  # the wire's FP8 blocks as they are
        copies += take_full_precision(state_dict, self.fp8_layers, self._params, tied)  # the rest
        for copy in copies:
            copy()
        if self.speculator is not None:
            self.speculator.apply(draft_updates, version)
        self.version.fill_(version)  # queued: the steps queued before it keep the old one
        if self.device.type == "cuda":
            # The copies are queued behind a step still running: done, the caller may reuse the sources.
            torch.cuda.current_stream(self.device).synchronize()
        self.policy_version = version
