"""The demo's warm start: a tiny Qwen3 taught the task only partly, so RL has a capability to raise.

RL with GRPO can only reinforce answers the policy already samples; it cannot teach from
nothing. So the demo starts from a model that has begun to learn to carry: the SFT stops as
soon as its *greedy* accuracy on the check problems reaches `stop_greedy_accuracy` (0.42,
checked after every step), which leaves greedy accuracy on held-out problems around 0.4 (seed 0:
286 steps, 0.415). RL then raises greedy held-out accuracy (seed 0: to 0.720 in the demo's 130
steps of 64 x 8 on 2 cores) -- a capability rising, not a sharpening. Where the SFT stops
decides how far RL gets, and the carry "clicks" within a few steps (greedy 0.23 -> 0.54 in ten
once), so the check runs every step. With today's trainer
(seed 0; docs/benchmarks.md, "The demo"): stopped at 0.30, held-out 0.284 -> 0.51 after 100 RL steps
(0.61 after 160); at 0.40, 0.391 -> 0.637; at 0.45, 0.499 -> 0.728 (too near the 0.5 ceiling);
at 0.42 with 130 steps, 0.415 -> 0.720. (The trainer's SFT before packing stopped at 0.30 on a
warm start that reached 0.70-0.74: the trajectory moves with the trainer's last bits.)
The rule itself is robust to such bits (bench/warmstart_spread.py: a 1e-7 change of the init, the
loss in 3 micro-batches, another data order all stop at held-out greedy 0.41-0.44, sampled
0.24-0.26), but RL from those equivalent warm starts ended at 0.615-0.750, each start's runs
within 0.03 (docs/benchmarks.md): the seed-0 start the demo uses is one of the good ones.

Two knobs shape the model, deterministically:

1. The SFT is the trainer's own (`--loss-type sft_loss`, `sft_with_trainer`): the negative
   log-likelihood of each answer and its EOS, in the trainer's micro-batches with its AdamW,
   lr schedule, checkpoint and metrics.jsonl (under `prep/sft/`), stopped by the greedy check.
   (`sft`, the loop it replaced, with cross-entropy against targets smoothed over the digits and
   EOS, remains for callers that still use it.)
2. An optional calibration (`target_sampled_accuracy`, off by default since issue 14): all
   logits are scaled by one factor, found by bisection, that makes the exact probability of
   sampling the right answer equal the target on the check problems. The factor is folded
   into the final RMSNorm weight (logits are linear in it), so the checkpoint is an ordinary
   Qwen3; scaling logits never moves an argmax, so greedy accuracy is untouched. (Calibrated
   to 0.25 from greedy 0.38, the demo's RL reached only 0.61 held-out greedy in 100 steps.)

Both accuracies are computed exactly from one teacher-forced forward pass, no sampling:
greedy = every answer token and the EOS are the argmax; sampled = the product of their
probabilities, i.e. the chance that temperature-1.0 sampling writes exactly the label.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slipstream.data import encode_prompt
from slipstream.demo.task import DIGITS, Problem, all_problems, sample_problems, write_prompts
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.models.hf import init_model, load_model, save_model
from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.quant.fp8 import round_fp8_weights_

IGNORE = -100


@dataclass
class WarmStartConfig:
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    # Mixture of experts (`slipstream demo --moe`): 0 = the dense Qwen3; else a Qwen3-MoE whose every
    # layer routes each token to num_experts_per_tok of num_experts SwiGLU experts.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 384
    routed_scaling_factor: float = 1.0  # the gate weights times this (models/moe.py says why)
    # Sparse upcycling (Komatsuzaki et al. 2022; Qwen1.5-MoE's start): the SFT trains the dense model,
    # then every expert starts as a copy of its layer's MLP (moe_intermediate_size = intermediate_size)
    # under a random router: the MoE computes the dense warm start's function exactly (`upcycle`).
    upcycle: bool = False
    sft_steps: int = 800  # most optimizer steps of the SFT (the LR schedule spans them)
    # Steps between greedy-accuracy checks on the check problems: every step, because the carry can
    # click within a few (greedy 0.23 -> 0.54 in ten steps once), which overshoots the stop.
    check_every: int = 1
    log_every: int = 10  # steps between the checks printed (the stopping one is always printed)
    stop_greedy_accuracy: float = 0.42  # stop the SFT once greedy accuracy reaches this
    num_check: int = 512  # train problems used for the stopping check and the calibration
    batch_size: int = 192
    micro_batch_size: int = 0  # the SFT trainer's --micro-batch-size; 0 = its auto (a CPU: the whole batch)
    lr: float = 6e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    label_smoothing: float = 0.15  # share of each answer token's target spread over digits+EOS
    target_sampled_accuracy: float | None = None  # calibrate logits so sampling is right this often
    num_eval: int = 1000  # eval problems (never trained on) for the report
    num_train_prompts: int = 4096  # records in train.jsonl (the RL prompts)
    num_eval_prompts: int = 256  # records in eval.jsonl
    num_threads: int = 2


@dataclass
class EncodedProblems:
    """A batch of problems as right-padded tensors, the answer positions marked."""

    input_ids: torch.Tensor  # [N, T] prompt + answer + EOS, right-padded
    targets: torch.Tensor  # [N, T] next-token target at answer/EOS positions, IGNORE elsewhere
    allowed: torch.Tensor  # [N, T, V] bool: tokens that receive smoothing mass at each position


def encode_problems(tokenizer: Any, problems: list[Problem], vocab_size: int) -> EncodedProblems:
    """Tokenize prompts exactly as the mesh does; targets are the answer then EOS."""
    rows, starts = [], []
    for p in problems:
        prompt_ids = encode_prompt(tokenizer, p.prompt, apply_chat_template=False)
        answer_ids = list(tokenizer(p.label, add_special_tokens=False)["input_ids"])
        rows.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        starts.append(len(prompt_ids))
    n, t = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((n, t), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((n, t), IGNORE, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        # Logits at position j predict token j+1: answer tokens and EOS sit at start..len-1.
        targets[i, start - 1 : len(row) - 1] = torch.tensor(row[start:])

    digit_ids = tokenizer.convert_tokens_to_ids(list(DIGITS))
    support = torch.zeros(vocab_size, dtype=torch.bool)
    support[digit_ids + [tokenizer.eos_token_id]] = True
    first = support.clone()
    # A leading '0' would give "081", which a numeric checker reads as 81: no mass there.
    first[tokenizer.convert_tokens_to_ids("0")] = False
    first[tokenizer.eos_token_id] = False
    answer = targets != IGNORE
    is_first = answer & ~torch.cat([torch.zeros(n, 1, dtype=torch.bool), answer[:, :-1]], dim=1)
    allowed = (answer & ~is_first)[..., None] & support
    allowed |= is_first[..., None] & first
    return EncodedProblems(input_ids=input_ids, targets=targets, allowed=allowed)


def smoothed_loss(
    logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor, eps: float
) -> torch.Tensor:
    """Cross-entropy against (1-eps) on the target plus eps uniform over `allowed`, answer tokens only."""
    mask = targets != IGNORE
    logp = F.log_softmax(logits[mask].float(), dim=-1)  # [M, V]
    tgt = targets[mask]
    allow = allowed[mask].float()
    allow[torch.arange(len(tgt)), tgt] = 1.0  # the target itself is always in the support
    soft = eps * allow / allow.sum(-1, keepdim=True)
    soft[torch.arange(len(tgt)), tgt] += 1.0 - eps
    return -(soft * logp).sum(-1).mean()


def _logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    # Ours returns logits; a `transformers` model (handy for cross-checking) returns an output object.
    return out if isinstance(out, torch.Tensor) else out.logits


def answer_logprobs(model: Any, enc: EncodedProblems) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each answer token/EOS, whether it is the argmax), both [N, T], zero/True off-answer.
    Computed on the model's device (the problems are encoded on the CPU)."""
    param = next(model.parameters(), None)  # none: a test's fixed-logit oracle, where the problems are
    logits = _logits(model, enc.input_ids if param is None else enc.input_ids.to(param.device)).float()
    logp = F.log_softmax(logits, dim=-1)
    targets = enc.targets.to(logits.device)
    mask = targets != IGNORE
    tgt = targets.clamp(min=0)
    tok_logp = logp.gather(-1, tgt[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    is_max = (logits.argmax(-1) == tgt) | ~mask
    return tok_logp, is_max


def _accuracies(tok_logp: torch.Tensor, is_max: torch.Tensor) -> dict[str, float]:
    return {
        "greedy_accuracy": is_max.all(-1).float().mean().item(),
        "sampled_accuracy": tok_logp.sum(-1).exp().mean().item(),
    }


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, records: list[Problem] | list[dict[str, str]]) -> dict[str, float]:
    """Exact greedy and temperature-1.0 sampled accuracy of `model` on `records`.

    greedy_accuracy: fraction of records whose every answer token and EOS is the argmax.
    sampled_accuracy: mean over records of prod_i p(answer token i) * p(EOS).
    """
    problems = [
        r if isinstance(r, Problem) else Problem(prompt=r["prompt"], label=r["label"]) for r in records
    ]
    enc = encode_problems(tokenizer, problems, _vocab_size(model))
    was_training = model.training
    model.eval()
    try:
        return _accuracies(*answer_logprobs(model, enc))
    finally:
        model.train(was_training)


@torch.no_grad()
def calibrate_logit_scale(model: Any, enc: EncodedProblems, target: float, iters: int = 40) -> float:
    """The factor s for which sampling from softmax(s * logits) is right `target` of the time.

    Sampled accuracy rises monotonically with s when the argmax is mostly right, so bisection
    on log s is enough; the forward pass is done once and only the softmax is repeated.
    """
    logits = _logits(model, enc.input_ids).float()
    mask = enc.targets != IGNORE
    tgt = enc.targets.clamp(min=0)

    def sampled(s: float) -> float:
        logp = F.log_softmax(logits * s, dim=-1).gather(-1, tgt[..., None]).squeeze(-1)
        return logp.masked_fill(~mask, 0.0).sum(-1).exp().mean().item()

    lo, hi = math.log(1 / 64), math.log(64)
    if not sampled(math.exp(lo)) <= target <= sampled(math.exp(hi)):
        raise RuntimeError(
            f"no logit scale reaches sampled accuracy {target}: the SFT did not learn the task"
        )
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sampled(math.exp(mid)) < target else (lo, mid)
    return math.exp((lo + hi) / 2)


def _vocab_size(model: Any) -> int:
    return model.config.vocab_size if hasattr(model, "config") else model.vocab_size


def _lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.sft_steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft(
    model: Any,
    enc: EncodedProblems,
    cfg: WarmStartConfig,
    seed: int,
    check: EncodedProblems | None = None,
    log: Any = print,
) -> int:
    """Train on random batches of `enc` with the smoothed loss (in place); return the steps taken.

    Every `check_every` steps the greedy accuracy on `check` is measured; training stops as
    soon as it reaches `stop_greedy_accuracy` (how fast the carry is learned varies with the
    seed, so a fixed step count is either slow or unreliable). Everything is seeded, so the
    stopping step is too.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    n = enc.input_ids.shape[0]
    step = 0
    while step < cfg.sft_steps:
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        logits = _logits(model, enc.input_ids[idx])
        loss = smoothed_loss(logits, enc.targets[idx], enc.allowed[idx], cfg.label_smoothing)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if check is not None and step % cfg.check_every == 0:
            model.eval()
            with torch.no_grad():
                greedy = _accuracies(*answer_logprobs(model, check))["greedy_accuracy"]
            model.train()
            if greedy >= cfg.stop_greedy_accuracy or step % cfg.log_every == 0:
                log(
                    f"sft step {step:4d}  loss {loss.item():.4f}  lr {_lr_at(step - 1, cfg):.2e}  greedy {greedy:.3f}"
                )
            if greedy >= cfg.stop_greedy_accuracy:
                break
    model.eval()
    return step


def sft_with_trainer(
    model: Any,
    tokenizer_dir: Path,
    problems: list[Problem],
    cfg: WarmStartConfig,
    seed: int,
    work_dir: Path,
    check: EncodedProblems | None = None,
    log: Any = print,
    device: str = "cpu",
    watch: Any = None,
) -> tuple[int, Any]:
    """Supervised fine-tuning of `model` on `problems` by the trainer itself (`--loss-type
    sft_loss`, services/trainer/sft.py: its micro-batches, AdamW, lr schedule, checkpoints and
    metrics.jsonl, all under `work_dir`); returns (steps taken, the trained model).

    The loss is the negative log-likelihood of each answer and its EOS. Every `check_every`
    steps the greedy accuracy on `check` is measured and the run stops as soon as it reaches
    `stop_greedy_accuracy` (how fast the carry is learned varies with the seed, so a fixed step
    count is either slow or unreliable). Everything is seeded, so the stopping step is too.
    `watch(step, model)`, when given, sees the model after every step first; True ends the run."""
    from slipstream.config import config_from_values
    from slipstream.services.trainer.checkpoint import resolve_checkpoint
    from slipstream.services.trainer.sft import train_sft
    from slipstream.services.trainer.state import TrainerState

    init_dir, data = work_dir / "init", work_dir / "sft.jsonl"
    save_model(model, init_dir)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, init_dir / f.name)
    data.write_text("".join(json.dumps({"prompt": p.prompt, "label": p.label}) + "\n" for p in problems))
    flags = dict(
        hf_checkpoint=str(init_dir), prompt_data=str(data), loss_type="sft_loss", device=device,
        run_dir=str(work_dir), rollout_batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        num_rollout=cfg.sft_steps,
        rollout_shuffle=True, seed=seed, lr=cfg.lr, lr_warmup_iters=cfg.warmup_steps,
        lr_decay_style="cosine", min_lr=0.05 * cfg.lr, weight_decay=cfg.weight_decay, adam_beta2=0.98,
        clip_grad=1.0,
    )  # fmt: skip

    def after_step(step: int, actor: Any) -> bool:
        if watch is not None and watch(step, actor.model):
            return True
        if check is None or step % cfg.check_every:
            return False
        with torch.no_grad():
            actor.model.eval()
            greedy = _accuracies(*answer_logprobs(actor.model, check))["greedy_accuracy"]
            actor.model.train()
        if greedy >= cfg.stop_greedy_accuracy or step % cfg.log_every == 0:
            log(f"sft step {step:4d}  lr {actor.scheduler.lr:.2e}  greedy {greedy:.3f}")
        return greedy >= cfg.stop_greedy_accuracy

    state = train_sft(config_from_values(flags), TrainerState(), after_step=after_step)
    trained = load_model(resolve_checkpoint(str(work_dir / "checkpoints")), device=device)
    return state.step, trained


def model_config(cfg: WarmStartConfig, tokenizer: Any) -> Qwen3Config:
    """The demo model's architecture: a Qwen3 shape with tied embeddings over the char vocabulary
    (a Qwen3-MoE one when `cfg.num_experts`)."""
    moe = (
        dict(
            model_type="qwen3_moe",
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=True,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        if cfg.num_experts
        else {}
    )
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rope_theta=10_000.0,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **moe,
    )


@torch.no_grad()
def upcycle(dense: Any, config: Any, seed: int) -> Any:
    """The MoE of `config` whose every expert is a copy of its layer's dense MLP (router: `init_model`'s
    random draw): with renormalised top-k gates (and no gate scale) any routing gives the dense output."""
    if not (config.norm_topk_prob and config.routed_scaling_factor == 1.0):
        raise ValueError("upcycling keeps the dense function only with norm_topk_prob and no gate scale")
    if config.moe_intermediate_size != dense.config.intermediate_size or config.moe_layers != tuple(
        range(config.num_hidden_layers)
    ):
        raise ValueError("upcycling needs every layer sparse, experts the dense MLP's size")
    moe = init_model(config, seed)
    state = moe.state_dict()
    state.update({n: t for n, t in dense.state_dict().items() if ".mlp." not in n})
    for layer, mlp in enumerate(m.mlp for m in dense.model.layers):
        at, e = f"model.layers.{layer}.mlp.experts.", config.num_experts
        state[at + "gate_up_proj"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None].repeat(
            e, 1, 1
        )
        state[at + "down_proj"] = mlp.down_proj.weight[None].repeat(e, 1, 1)
    moe.load_state_dict(state)
    moe.tie_weights()
    return moe


@torch.no_grad()
def moe_of_dense(dense: Any, k: int, scale: float = 1.0) -> Any:
    """A dense model as a Qwen3-MoE computing the same function: every MLP cut into k experts
    (column blocks of the intermediate; expert e has the gate/up rows and down columns of block e,
    the down block times k / scale), all k routed to every token (top-k of k) by a zero router, so
    each gate weight is exactly scale / k. With scale = k it also trains as the dense model does
    (tests/test_moe_dense_equivalence.py); the router then learns to weigh the experts."""
    cfg = dense.config
    if cfg.num_experts or cfg.intermediate_size % k:
        raise ValueError(f"need a dense model whose intermediate size divides by {k}")
    fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    config = type(cfg)(
        **{
            **fields,
            "model_type": "qwen3_moe",
            "num_experts": k,
            "num_experts_per_tok": k,
            "moe_intermediate_size": cfg.intermediate_size // k,
            "norm_topk_prob": True,
            "routed_scaling_factor": scale,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    )
    moe = init_model(config)
    state = {n: t for n, t in dense.state_dict().items() if ".mlp." not in n}
    for layer, mlp in enumerate(m.mlp for m in dense.model.layers):
        at = f"model.layers.{layer}.mlp."
        gate, up = mlp.gate_proj.weight.chunk(k, dim=0), mlp.up_proj.weight.chunk(k, dim=0)
        state[at + "gate.weight"] = torch.zeros(k, cfg.hidden_size)
        state[at + "experts.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(gate, up, strict=True)])
        state[at + "experts.down_proj"] = torch.stack(mlp.down_proj.weight.chunk(k, dim=1)) * (k / scale)
    moe.load_state_dict(state)
    moe.tie_weights()
    return moe


def fp8_roundtrip(model: Qwen3ForCausalLM) -> Qwen3ForCausalLM:
    """A copy of `model` whose FP8 weights (linear projections, an MoE's stacked experts) went
    through FP8 and back, as a weight push does."""
    out = copy.deepcopy(model)
    round_fp8_weights_(out)
    return out


def prepare_demo(
    run_dir: str | Path,
    seed: int = 0,
    cfg: WarmStartConfig | None = None,
    log: Any = print,
    device: str = "cpu",
) -> Path:
    """Write prompts, tokenizer and a warm-started checkpoint into `run_dir`; return `run_dir/model`.
    `device`: where the SFT runs and the model is evaluated (cuda: bench/learn_vs_trl.py --preset h200).

    Files: `train.jsonl` (the RL prompts) and `eval.jsonl` (held-out problems), `model/`
    (config.json, model.safetensors, tokenizer files) and `model/warmstart.json` (the settings
    and the measured accuracies, also after an FP8 round trip of the weights); `sft/` holds the
    warm start's trainer run (its data, metrics.jsonl and checkpoint).
    """
    cfg = cfg or WarmStartConfig()
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    torch.set_num_threads(cfg.num_threads)

    write_prompts(run_dir / "train.jsonl", cfg.num_train_prompts, seed, split="train")
    write_prompts(run_dir / "eval.jsonl", cfg.num_eval_prompts, seed, split="eval")
    tokenizer = build_char_tokenizer(model_dir)
    sft_cfg = replace(cfg, num_experts=0) if cfg.upcycle else cfg
    model = init_model(model_config(sft_cfg, tokenizer), seed)
    vocab = model.config.vocab_size

    train_problems = all_problems("train")
    check_problems = sample_problems(cfg.num_check, seed, split="train")
    check_enc = encode_problems(tokenizer, check_problems, vocab)
    eval_problems = all_problems("eval")[: cfg.num_eval]

    t0 = time.perf_counter()
    steps, model = sft_with_trainer(
        model, model_dir, train_problems, cfg, seed, run_dir / "sft", check=check_enc, log=log, device=device
    )
    if cfg.upcycle:
        model = upcycle(model, model_config(cfg, tokenizer), seed)
    sft_seconds = time.perf_counter() - t0
    after_sft = evaluate(model, tokenizer, eval_problems)
    log(
        f"SFT: {steps} steps in {sft_seconds:.1f}s; eval greedy {after_sft['greedy_accuracy']:.3f}  "
        f"sampled {after_sft['sampled_accuracy']:.3f}"
    )

    scale = 1.0
    if cfg.target_sampled_accuracy is not None:
        scale = calibrate_logit_scale(model, check_enc, cfg.target_sampled_accuracy)
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)  # logits are linear in the final norm's weight
    calibrated = evaluate(model, tokenizer, eval_problems)
    fp8 = evaluate(fp8_roundtrip(model), tokenizer, eval_problems)
    log(
        f"calibrated (logit scale {scale:.3f}): eval greedy {calibrated['greedy_accuracy']:.3f}  "
        f"sampled {calibrated['sampled_accuracy']:.3f}; with FP8 weights greedy {fp8['greedy_accuracy']:.3f}  "
        f"sampled {fp8['sampled_accuracy']:.3f}"
    )
    save_model(model, model_dir)
    report = {
        "seed": seed,
        "settings": asdict(cfg),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sft_steps": steps,
        "sft_seconds": round(sft_seconds, 2),
        "logit_scale": scale,
        "eval_after_sft": after_sft,
        "eval_calibrated": calibrated,
        "eval_calibrated_fp8": fp8,
    }
    (model_dir / "warmstart.json").write_text(json.dumps(report, indent=2) + "\n")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m slipstream.demo.warmstart --run-dir DIR [--seed N]`: the preparation alone."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m slipstream.demo.warmstart", description=main.__doc__)
    parser.add_argument("--run-dir", required=True, help="Where train.jsonl, eval.jsonl and model/ go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts, the init and the SFT.")
    args = parser.parse_args(argv)
    print(prepare_demo(args.run_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
