"""The tool demo's task: three-number sums, "23+58+41=" -> "122", with a two-operand calculator.

A tiny model cannot add three numbers in its head; it can call a calculator. A call is the model
writing `[expression]` (its turn stops at `]`); the calculator answers with the value and a
space, and the model takes another turn. The trajectory that gets it right, with the tool's
tokens marked `<...>`:

    23+58+41=  [23+58+41]<122 >122<eos>

so the model only copies, which it can learn; answering at once ("122<eos>") needs the sum it
cannot do. The warm start (`prepare_tool_demo`) teaches both formats by SFT on a mixture, half
the trajectories calling the tool and half answering at once, with the opening `[` trained on
only a third of the former, so the policy starts out calling the tool about one time in five
(and then mostly right) and otherwise answering at once (mostly wrong). RL raises accuracy by learning to call the
tool: the reward only sees the final answer (`reward`, in `tool_generate.py`).

The calculator, the trajectory format and the problems are here; the slime-style generate
function that runs the exchange over `/generate` is `tool_generate.py`.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from slipstream.demo.task import ALPHABET

Split = Literal["train", "eval"]
TOOL_ALPHABET = ALPHABET + "[]"
CALL_OPEN, CALL_CLOSE = "[", "]"
MAX_OPERAND = 100  # operands 0..99
EVAL_EVERY = 10  # one operand triple in ten is held out


@dataclass(frozen=True)
class ToolProblem:
    prompt: str  # "23+58+41="
    label: str  # "122"


def calculate(expression: str) -> str:
    """The tool: the sum of two or three non-negative integers written `a+b(+c)`, else "?"."""
    terms = expression.split("+")
    if not 2 <= len(terms) <= 3 or not all(t.isdigit() and len(t) <= 4 for t in terms):
        return "?"
    return str(sum(int(t) for t in terms))


def tool_result_text(expression: str) -> str:
    """What the tool appends after a call: the result and a space."""
    return calculate(expression) + " "


def _split_of(a: int, b: int, c: int) -> Split:
    digest = hashlib.blake2b(f"{a}+{b}+{c}".encode(), digest_size=4).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_EVERY == 0 else "train"


def sample_tool_problems(n: int, seed: int, split: Split = "train") -> list[ToolProblem]:
    """`n` problems of a split, deterministic in `seed`."""
    rng = random.Random(f"tool:{seed}:{split}")
    out: list[ToolProblem] = []
    while len(out) < n:
        a, b, c = (rng.randrange(MAX_OPERAND) for _ in range(3))
        if _split_of(a, b, c) == split:
            out.append(ToolProblem(f"{a}+{b}+{c}=", str(a + b + c)))
    return out


def trajectory(p: ToolProblem, use_tool: bool) -> list[tuple[str, bool]]:
    """The right trajectory for `p` as (text, is the model's) segments after the prompt; EOS not included."""
    if not use_tool:
        return [(p.label, True)]
    expression = p.prompt.rstrip("=")
    return [(f"[{expression}]", True), (tool_result_text(expression), False), (p.label, True)]


def write_tool_prompts(path: str | Path, problems: list[ToolProblem]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "label": p.label}) + "\n")
    return path


# ---- the warm start ------------------------------------------------------------------------
@dataclass
class ToolWarmStart:
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    tool_share: float = 0.5  # of SFT trajectories that call the tool (so the copying is learned)
    # of those, the share whose opening `[` is trained: the first token's odds are then
    # 1/6 : 1/2, i.e. the policy calls the tool about a quarter of the time (measured ~0.17-0.2)
    call_trained_share: float = 1 / 3
    sft_steps: int = 250  # tool path sampled at temperature 1 right ~0.85 of the time, direct ~0.03
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    num_sft: int = 4096  # SFT trajectories
    num_train_prompts: int = 2048
    num_eval_prompts: int = 128
    num_threads: int = 1


def encode_trajectories(
    tokenizer: Any, problems: list[ToolProblem], tools: list[bool], first: list[bool] | None = None
):
    """Teacher-forcing rows: model tokens (and EOS) are targets, prompt and tool tokens are not;
    `first[i]` False leaves row i's first response token untrained (it sets no first-token odds)."""
    import torch

    from slipstream.demo.warmstart import IGNORE, EncodedProblems

    rows: list[tuple[list[int], list[int]]] = []
    for i, (p, use_tool) in enumerate(zip(problems, tools, strict=True)):
        ids = list(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
        targets = [IGNORE] * len(ids)
        for text, trained in trajectory(p, use_tool):
            seg = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += seg
            targets += seg if trained else [IGNORE] * len(seg)
        ids.append(tokenizer.eos_token_id)
        targets.append(tokenizer.eos_token_id)
        if first is not None and not first[i]:
            targets[len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])] = IGNORE
        rows.append((ids, targets))
    n, t = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((n, t), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((n, t), IGNORE, dtype=torch.long)
    for i, (ids, tgt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        targets[i, : len(ids) - 1] = torch.tensor(tgt[1:])  # logits at j predict token j+1
    allowed = torch.zeros((n, t, len(tokenizer)), dtype=torch.bool)  # no smoothing: the target only
    return EncodedProblems(input_ids=input_ids, targets=targets, allowed=allowed)


def tool_accuracies(model: Any, tokenizer: Any, problems: list[ToolProblem]) -> dict[str, float]:
    """Exact, teacher-forced: the chance the first token opens a call, and greedy correctness of
    each path once its first token is written (every later model token of the right trajectory
    the argmax, the tool's given)."""
    import torch

    from slipstream.demo.warmstart import answer_logprobs

    out: dict[str, float] = {}
    with torch.no_grad():
        for use_tool in (True, False):
            # the path given its first token: whether it is taken is p_call_tool
            enc = encode_trajectories(
                tokenizer, problems, [use_tool] * len(problems), [False] * len(problems)
            )
            logp, is_max = answer_logprobs(model, enc)
            path = "tool_path" if use_tool else "direct_path"
            out[f"greedy_{path}"] = is_max.all(-1).float().mean().item()
            out[f"sampled_{path}"] = logp.sum(-1).exp().mean().item()  # temperature 1.0
        enc = encode_trajectories(tokenizer, problems, [True] * len(problems))
        logits = model(enc.input_ids).float()
        open_id = tokenizer.convert_tokens_to_ids(CALL_OPEN)
        first = [len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) - 1 for p in problems]
        probs = torch.stack([logits[i, j].softmax(-1)[open_id] for i, j in enumerate(first)])
        out["p_call_tool"] = probs.mean().item()
    return out


def prepare_tool_demo(
    run_dir: str | Path, seed: int = 0, cfg: ToolWarmStart | None = None, log: Any = print
) -> Path:
    """Prompts (train.jsonl, eval.jsonl), the tokenizer and the warm-started model in `run_dir`/model."""
    import torch

    from slipstream.demo.tokenizer import build_char_tokenizer
    from slipstream.demo.warmstart import WarmStartConfig, model_config, sft
    from slipstream.models.hf import init_model, save_model

    cfg = cfg or ToolWarmStart()
    run_dir, model_dir = Path(run_dir), Path(run_dir) / "model"
    torch.set_num_threads(cfg.num_threads)
    write_tool_prompts(run_dir / "train.jsonl", sample_tool_problems(cfg.num_train_prompts, seed, "train"))
    eval_problems = sample_tool_problems(cfg.num_eval_prompts, seed, "eval")
    write_tool_prompts(run_dir / "eval.jsonl", eval_problems)
    tokenizer = build_char_tokenizer(model_dir, alphabet=TOOL_ALPHABET)
    shape = WarmStartConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        sft_steps=cfg.sft_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        label_smoothing=0.0,
    )
    model = init_model(model_config(shape, tokenizer), seed)
    rng = random.Random(f"tool-sft:{seed}")
    problems = sample_tool_problems(cfg.num_sft, seed + 1, "train")
    tools = [rng.random() < cfg.tool_share for _ in problems]
    first = [not t or rng.random() < cfg.call_trained_share for t in tools]
    enc = encode_trajectories(tokenizer, problems, tools, first)
    t0 = time.perf_counter()
    sft(model, enc, shape, seed, check=None, log=log)
    seconds = time.perf_counter() - t0
    measured = tool_accuracies(model, tokenizer, eval_problems)
    log(
        f"SFT: {cfg.sft_steps} steps in {seconds:.1f}s; held-out: calls the tool first "
        f"{measured['p_call_tool']:.2f} of the time, greedy tool path {measured['greedy_tool_path']:.3f}, "
        f"greedy direct answer {measured['greedy_direct_path']:.3f}"
    )
    save_model(model, model_dir)
    report = {"seed": seed, "settings": asdict(cfg), "sft_seconds": round(seconds, 2), "held_out": measured}
    (model_dir / "warmstart.json").write_text(json.dumps(report, indent=2) + "\n")
    return model_dir
