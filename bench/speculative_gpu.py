"""Speculative rollout on the GPU: acceptance length and tokens/s, with and without a draft (issue 19).

    sh scripts/gpu_env.sh run python3 bench/speculative_gpu.py --out bench/results/speculative_gpu.json

Acceptance only means something when the policy is not random, so the target is first trained
on the GPU (plain SFT, a few hundred steps) on a synthetic structured task: token chains over a
512-token slice of the vocabulary where each next token is a fixed function of the current one
90% of the time (otherwise uniform), so at temperature 1 a trained policy is peaked but not
deterministic. Two phases mimic a policy that keeps moving, as in RL:

- phase A: the target learns rule f; the draft trains online beside it (the trainer's
  `DraftTrainer` loss: trunk detached). The draft as it is at the end of A is kept: "frozen".
- phase B: the target keeps training on rule g (g = f on half the tokens, different on the
  other half): the policy has moved. The online draft keeps training beside it: "online".

Several online drafts train beside the same target on the same batches, one per --draft-lrs
(bf16 autocast, like the target) and one in fp32 (--fp32-draft-lr), each with its own AdamW and
its gradient norm clipped to 1 as the trainer clips the draft (steps.py). Session 5's bench did not clip, and
its draft (lr 1e-3, same target, data and seed) ended phase A at ln(512) nats, the best a draft
that ignores its input can do; clipped, the same recipe is at 1.2 nats by step 20 (H200,
session 11). The run records each draft's cross-entropy, regression loss and pre-norm residual
(its RMS, and the share of it that depends on the input: a collapsed draft outputs one vector)
every --log-every steps. The draft that ends phase B lowest is the "online" (and its end-of-A
copy the "frozen") measured in full; the others' online rows follow.

Then, on phase-B prompts with the final target, at batch 1/16/64/256 (one wave of that many
requests, 16-token prompts, --new-tokens new tokens each, temperature 1): tokens/s of the plain
engine (its defaults: fused decode in CUDA graphs; also unfused in CUDA graphs, the same forward
the speculative verify runs) and of the speculative engine (k = --steps draft tokens, draft and
verify and accept in one CUDA graph per bucket) with an untrained draft, the frozen draft, and the
online draft; and each draft's acceptance length (tokens kept per sequence per verify step, 1 to
k+1). Target (issue 19): >= +40% tokens/s at batch <= 16 with the online draft.

The end-to-end mesh step time with and without speculation is the other mode (one rollout server,
bench/mesh_gpu.py's random 0.6B checkpoint and run, the draft trained online in the run):

    sh scripts/gpu_env.sh run python3 bench/speculative_gpu.py --mesh --budget-s 130 --out bench/results/speculative_mesh_gpu.json

Shapes: Qwen3-0.6B (default) or --shape 1.7b (Qwen3-1.7B's dense shape). Bounded: each timed
configuration runs --repeats timed waves (median and range reported; session 11 ran one, and
batch 1 varied by ~20% between recipes of equal acceptance) after a warm-up that captures its
graphs; the script stops adding configurations past --budget-s and says which it skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from slipstream.models import Qwen3Config, Qwen3ForCausalLM
from slipstream.models.draft import init_draft
from slipstream.services.rollout.engine import Request
from slipstream.services.rollout.engine.native import NativeEngine
from slipstream.services.trainer.draft import DraftTrainer
from slipstream.services.trainer.step_metrics import StepMeans

SUB_VOCAB = 512  # the task's tokens: ids 1000..1511
OFFSET = 1000
NOISE = 0.1
SHAPES = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    # CPU smoke: small enough to learn the chains in ~100 steps at --lr 3e-3 on two cores
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),  # fmt: skip
}


def config(shape: str) -> Qwen3Config:
    kw = dict(num_key_value_heads=8, head_dim=128) | SHAPES[shape]
    return Qwen3Config(
        vocab_size=2048 if shape == "tiny" else 151936, tie_word_embeddings=True, max_position_embeddings=4096,
        **kw,
    )  # fmt: skip


def rules(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """f and g: next-token maps over the task's tokens; g = f on half of them."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randperm(SUB_VOCAB, generator=gen)
    g = f.clone()
    moved = torch.randperm(SUB_VOCAB, generator=gen)[: SUB_VOCAB // 2]
    g[moved] = torch.randperm(SUB_VOCAB, generator=gen)[: SUB_VOCAB // 2]
    return f, g


def chains(rule: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, length] token chains: x_{t+1} = rule(x_t) with probability 1 - NOISE, else uniform."""
    x = torch.empty((batch, length), dtype=torch.int64)
    x[:, 0] = torch.randint(0, SUB_VOCAB, (batch,), generator=gen)
    for t in range(1, length):
        noise = torch.rand(batch, generator=gen) < NOISE
        x[:, t] = torch.where(noise, torch.randint(0, SUB_VOCAB, (batch,), generator=gen), rule[x[:, t - 1]])
    return x + OFFSET


class OnlineDraft:
    """One draft trained beside the target with the trainer's loss (`DraftTrainer`), its own AdamW
    and the trainer's clipping; `bf16` runs its loss under the target's autocast, else in fp32."""

    def __init__(self, name: str, cfg, lr: float, bf16: bool, args) -> None:
        self.name, self.lr, self.bf16 = name, lr, bf16
        self.trainer = DraftTrainer(cfg, 1, "", 1.0, torch.device(args.device))
        self.opt = torch.optim.AdamW(self.trainer.parameters(), lr=lr, fused=args.device == "cuda")
        self.trajectory: list[dict] = []
        self.frozen: dict[str, torch.Tensor] = {}  # the head's weights at the end of phase A
        self.probe: dict[str, float] = {}
        for layer in self.trainer.head.modules_in_order:  # the pre-norm residual, for the trajectory
            layer.register_forward_hook(self._record)

    def _record(self, module, inputs, out) -> None:
        x = out.detach().float().flatten(0, 1)
        rms = x.pow(2).mean().sqrt()
        # How much of the residual depends on the input: a collapsed draft outputs one vector.
        self.probe = {"resid_rms": rms, "input_dependent": (x - x.mean(0)).pow(2).mean().sqrt() / rms}

    def step(self, hidden, batch, model, weights, device: str) -> StepMeans:
        """One optimizer step of the draft on the target's (detached) hidden states of this batch."""
        means = StepMeans()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.trainer.loss(hidden, batch, model, weights, means)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainer.parameters(), 1.0)  # as steps.py clips the draft
        self.opt.step()
        return means

    def log(self, means: StepMeans, phase: str, step: int, target_loss: float) -> float:
        stats = means.result() | {k: float(v) for k, v in self.probe.items()}
        self.trajectory.append({"phase": phase, "step": step, "target_loss": target_loss} | {
            k: round(stats[k], 4) for k in ("mtp_loss", "mtp_regression_loss", "resid_rms", "input_dependent")
        })  # fmt: skip
        return self.trajectory[-1]["mtp_loss"]


def sft(model, drafts: list[OnlineDraft], rule, steps: int, args, gen, phase: str) -> dict:
    """Train the target on `rule` (bf16 autocast, fp32 weights) with every draft beside it on the
    same batches; the target's loss and each draft's cross-entropy every --log-every steps."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, fused=args.device == "cuda")
    rows = []
    for step in range(steps):
        ids = chains(rule, args.train_batch, args.train_len, gen).to(args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            hidden = model.model(ids[:, :-1])
            logits = model.lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The drafts step on this batch before the target does: the embedding and LM head they
        # read are the ones that produced `hidden`, as in the trainer's single step.
        mask = torch.ones_like(ids[:, 1:], dtype=torch.float32)
        batch = SimpleNamespace(targets=ids[:, 1:], loss_mask=mask)
        stepped = [
            d.step(hidden.detach().float(), batch, model, mask / mask.sum(), args.device) for d in drafts
        ]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            row = {"phase": phase, "step": step, "loss": round(loss.item(), 4)}
            for d, means in zip(drafts, stepped, strict=True):
                row[f"draft_ce[{d.name}]"] = d.log(means, phase, step, row["loss"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"steps": steps, "first": rows[0], "last": rows[-1]}


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def run_engine(
    engine: NativeEngine, batch: int, prompts: list[list[int]], args
) -> tuple[list[float], list[float]]:
    """Seconds for each of --repeats timed waves of `batch` requests, after a warm-up wave that
    captures the graphs, and the milliseconds of each `step()` of the last timed wave (reading
    late, a step returns once the one before it is done, so these are the pipeline's step times:
    session 13's batch-1 waves ran ~1 ms a step slower than the profiled steady step, and
    these say where in the wave); a speculator's counters cover the timed waves."""
    times: list[float] = []
    step_ms: list[float] = []
    for wave in range(1 + args.repeats):
        reqs = [
            Request(f"{wave}-{i}", prompts[i], args.new_tokens, temperature=1.0, seed=wave * 10_000 + i)
            for i in range(batch)
        ]
        for r in reqs:
            engine.add_request(r)
        spec = engine.speculator
        if spec is not None and wave == 1:
            spec.reset_tallies()
        sync(args)
        t0 = time.perf_counter()
        done, step_ms = 0, []
        while engine.has_work():
            t = time.perf_counter()
            done += len(engine.step())
            step_ms.append(1e3 * (time.perf_counter() - t))
        sync(args)
        if wave:
            times.append(time.perf_counter() - t0)
        assert done == batch
    return times, step_ms


def timed_row(variant: str, batch: int, timed: tuple[list[float], list[float]], args) -> dict:
    """tokens/s of the median wave, the range over the waves, and the last wave's step times."""
    times, step_ms = timed
    tps = sorted(batch * args.new_tokens / dt for dt in times)
    return {
        "variant": variant, "batch": batch, "tokens_per_s": round(tps[len(tps) // 2], 1),
        "tokens_per_s_range": [round(tps[0], 1), round(tps[-1], 1)], "seconds": [round(dt, 3) for dt in times],
        "last_wave_step_ms": [round(ms, 3) for ms in step_ms],
    }  # fmt: skip


def profile_steps(engine: NativeEngine, batch: int, prompts: list[list[int]], args, steps: int = 16) -> dict:
    """Where one decode step's time goes, at `batch` (graphs already captured by `run_engine`):
    wall clock per step, GPU kernel time per step, and the top host and device ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(batch):
        engine.add_request(Request(f"p-{i}", prompts[i], args.new_tokens, temperature=1.0, seed=7 + i))
    for _ in range(3):  # past the prefill
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sync(args)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(args)
        wall = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def top(key, n: int = 8) -> list[dict]:
        rows = sorted(events, key=key, reverse=True)[:n]
        return [
            {"op": e.key[:80], "us_per_step": round(key(e) / steps, 1), "calls_per_step": e.count / steps}
            for e in rows
        ]

    return {
        "batch": batch, "steps": steps, "wall_ms_per_step": round(1e3 * wall / steps, 3),
        "gpu_ms_per_step": round(sum(device_us(e) for e in events) / steps / 1e3, 3),
        "top_host": top(lambda e: float(e.self_cpu_time_total)), "top_device": top(device_us),
    }  # fmt: skip


SPECULATIVE_FLAGS = [
    "--rollout-num-servers", "1", "--mtp-num-layers", "1", "--enable-mtp-training",
    "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "4",
]  # fmt: skip


def mesh(out: str, steps: int, budget_s: float) -> None:
    """bench/mesh_gpu.py's run, one rollout server, with and then without speculation (its JSON at
    `out`). Speculation first: the plain run's step is known from earlier calls (2.98 s in
    session 12, 3.19 s in mesh_gpu.json), so where the budget cuts, it cuts the known one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mesh_gpu

    mesh_gpu.VARIANTS["one-server-speculative"] = SPECULATIVE_FLAGS
    sys.argv = [
        "mesh_gpu.py", "--variants", "one-server-speculative", "one-server", "--skip-parts",
        "--steps", str(steps), "--budget-s", str(budget_s), "--out", out,
    ]  # fmt: skip
    mesh_gpu.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/speculative_gpu.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=3, help="draft tokens per verify (--speculative-num-steps)")
    ap.add_argument("--phase-a-steps", type=int, default=200)
    ap.add_argument("--phase-b-steps", type=int, default=120)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--draft-lrs",
        type=float,
        nargs="+",
        default=[1e-3, 3e-4, 1e-4],
        help="one online draft per lr (bf16 autocast), all trained beside the same target",
    )
    ap.add_argument("--fp32-draft-lr", type=float, default=1e-3, help="and one trained in fp32 (0: none)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument(
        "--profile-batches", type=int, nargs="*", default=[1, 64],
        help="profile a few decode steps at these batches (plain, untrained and online speculative)",
    )  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed waves per configuration (the median is reported)"
    )
    ap.add_argument("--budget-s", type=float, default=250.0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (--shape tiny)")
    ap.add_argument("--mesh", action="store_true", help="the end-to-end mesh step time instead (see above)")
    ap.add_argument("--mesh-steps", type=int, default=5, help="trainer steps per mesh run")
    args = ap.parse_args()
    if args.mesh:
        mesh(args.out, args.mesh_steps, args.budget_s)
        return
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg = config(args.shape)

    with torch.device(args.device):
        model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    untrained = init_draft(cfg, 1)
    drafts = [OnlineDraft(f"lr{lr:g}", cfg, lr, True, args) for lr in args.draft_lrs]
    if args.fp32_draft_lr > 0:
        drafts.append(OnlineDraft(f"lr{args.fp32_draft_lr:g}-fp32", cfg, args.fp32_draft_lr, False, args))
    f, g = rules()
    gen = torch.Generator().manual_seed(1)
    model.train()
    phase_a = sft(model, drafts, f, args.phase_a_steps, args, gen, "A")
    for d in drafts:
        d.frozen = {k: v.clone() for k, v in d.trainer.state_dict().items()}
    phase_b = sft(model, drafts, g, args.phase_b_steps, args, gen, "B")
    # The online draft measured in full is the recipe that ended phase B lowest (all are reported).
    drafts.sort(key=lambda d: d.trajectory[-1]["mtp_loss"])
    train_s = time.perf_counter() - t_start
    serve = model.to(torch.bfloat16).eval()
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()

    max_batch, max_len = max(args.batches), 16 + args.new_tokens
    prompts = chains(g, max_batch, 16, torch.Generator().manual_seed(2)).tolist()
    results, skipped = [], []

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(what)
            return True
        return False

    plain_tps: dict[int, float] = {}
    profiles: dict[str, dict] = {}
    for name, kw in (("plain", {}), ("plain-unfused", {"fused_decode": False})):
        engine = NativeEngine(serve, [], max_batch_size=max_batch, max_seq_len=max_len, **kw)
        for b in args.batches:
            if over_budget(f"{name} batch {b}"):
                continue
            results.append(timed_row(name, b, run_engine(engine, b, prompts, args), args))
            if name == "plain":
                plain_tps[b] = results[-1]["tokens_per_s"]
            if b in args.profile_batches:
                profiles[f"{name} batch {b}"] = profile_steps(engine, b, prompts, args)
            print(json.dumps(results[-1]), flush=True)
        del engine

    engine = NativeEngine(
        serve, [], max_batch_size=max_batch, max_seq_len=max_len, draft=copy.deepcopy(untrained),
        speculative_num_steps=args.steps,
    )  # fmt: skip
    best = drafts[0]
    heads = [("untrained", untrained.state_dict()), (f"frozen-{best.name}", best.frozen)]
    heads += [(f"online-{d.name}", d.trainer.state_dict()) for d in drafts]
    for name, weights in heads:
        engine.speculator.draft.load_state_dict(weights)  # the draft under test, bf16
        for b in args.batches:
            if over_budget(f"{name} batch {b}"):
                continue
            row = timed_row(f"speculative-{name}", b, run_engine(engine, b, prompts, args), args)
            row["acceptance_length"] = round(engine.speculator.acceptance_length, 3)
            row["speedup_vs_plain"] = round(row["tokens_per_s"] / plain_tps[b], 3) if b in plain_tps else None
            results.append(row)
            print(json.dumps(row), flush=True)
            if b in args.profile_batches and name in (f"online-{best.name}", "untrained"):
                profiles[f"speculative-{name} batch {b}"] = profile_steps(engine, b, prompts, args)

    online_small = [
        r["speedup_vs_plain"] for r in results
        if r["variant"] == f"speculative-online-{best.name}" and r["batch"] <= 16 and r["speedup_vs_plain"]
    ]  # fmt: skip
    out = {
        "shape": args.shape,
        "task": f"token chains over {SUB_VOCAB} ids, next = rule(current) w.p. {1 - NOISE}; phase A rule f, phase B rule g (= f on half)",
        "speculative_num_steps": args.steps,
        "new_tokens": args.new_tokens,
        "sft": {"phase_a": phase_a, "phase_b": phase_b, "seconds": round(train_s, 1)},
        "drafts": {
            d.name: {"lr": d.lr, "loss_dtype": "bf16" if d.bf16 else "fp32", "trajectory": d.trajectory}
            for d in drafts
        },
        "online_draft_measured": best.name,
        "results": results,
        "skipped_for_budget": skipped,
        "profiles": profiles,
        "target_met_online_batch_le_16": bool(online_small) and min(online_small) >= 1.4,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
