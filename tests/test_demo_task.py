"""The demo task, its tokenizer and the warm start (a few SFT steps on a very small model)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slipstream.data import encode_prompt, load_prompts
from slipstream.demo.task import ALPHABET, all_problems, sample_problems, write_prompts
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.demo.warmstart import (
    IGNORE,
    WarmStartConfig,
    calibrate_logit_scale,
    encode_problems,
    evaluate,
    prepare_demo,
    smoothed_loss,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def test_prompt_files_are_deterministic_and_labels_correct(tmp_path):
    a = write_prompts(tmp_path / "a.jsonl", 200, seed=3).read_bytes()
    b = write_prompts(tmp_path / "b.jsonl", 200, seed=3).read_bytes()
    c = write_prompts(tmp_path / "c.jsonl", 200, seed=4).read_bytes()
    assert a == b and a != c
    records = load_prompts(str(tmp_path / "a.jsonl"))  # the coordinator's reader accepts it
    assert len(records) == 200
    for r in records:
        x, y = r.prompt.removesuffix("=").split("+")
        assert r.prompt.endswith("=") and r.label == str(int(x) + int(y))
        assert len(r.prompt) <= 12 and len(r.label) <= 12
        assert set(r.prompt + r.label) <= set(ALPHABET)
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "label"}


def test_train_and_eval_splits_are_disjoint_and_cover_every_sum_digit():
    train = {p.prompt for p in all_problems("train")}
    evals = all_problems("eval")
    assert len(train) + len(evals) == 100 * 100
    assert not train & {p.prompt for p in evals}
    # A split that left out whole answer classes would test what training never showed.
    assert {p.label[-1] for p in evals} == set("0123456789")
    assert all(p.prompt in train for p in sample_problems(50, seed=0, split="train"))


def test_tokenizer_is_one_token_per_character_and_round_trips(tokenizer):
    text = "23+58= 81*(4-2)"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids) == list(text)
    assert encode_prompt(tokenizer, "7+5=", apply_chat_template=False) == tokenizer.convert_tokens_to_ids(
        list("7+5=")
    )
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token is not None
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id}) == 2
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_targets_are_the_answer_then_eos(tokenizer):
    problems = sample_problems(20, seed=1)
    enc = encode_problems(tokenizer, problems, len(tokenizer))
    for row, tgt, p in zip(enc.input_ids, enc.targets, problems, strict=True):
        answer = tgt[tgt != IGNORE].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == p.label
        # Position j predicts token j+1: the targets are the input shifted by one.
        start = len(p.prompt) - 1
        assert row[start + 1 : start + 1 + len(p.label)].tolist() == answer[:-1]
    # Smoothing mass only on digits and EOS: a wrong sample is always a different number.
    digits_and_eos = set(tokenizer.convert_tokens_to_ids(list("0123456789"))) | {tokenizer.eos_token_id}
    allowed_ids = set(enc.allowed.nonzero()[:, 2].tolist())
    assert allowed_ids <= digits_and_eos


def test_smoothed_loss_is_minimal_at_the_smoothed_target(tokenizer):
    enc = encode_problems(tokenizer, sample_problems(8, seed=2), len(tokenizer))
    eps = 0.2
    onehot = torch.nn.functional.one_hot(enc.targets.clamp(min=0), len(tokenizer)).float()
    allowed = enc.allowed.float().maximum(onehot)
    soft = eps * allowed / allowed.sum(-1, keepdim=True) + (1 - eps) * onehot
    at_target = smoothed_loss(soft.clamp(min=1e-12).log(), enc.targets, enc.allowed, eps)
    sharper = smoothed_loss(20 * onehot, enc.targets, enc.allowed, eps)
    assert at_target < sharper
    mask = enc.targets != IGNORE
    entropy = -(soft * soft.clamp(min=1e-12).log()).sum(-1)[mask].mean()
    assert torch.isclose(at_target, entropy, atol=1e-5)


class _Oracle(nn.Module):
    """Fixed logits that favour the right next token by a per-position margin: a model whose
    greedy answer is always right, so calibration must land exactly on the target."""

    def __init__(self, targets: torch.Tensor, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(0)
        self.logits = torch.randn(*targets.shape, vocab_size, generator=gen)
        margin = 2 + torch.rand(targets.shape, generator=gen)
        top = self.logits.max(-1).values
        self.logits.scatter_(-1, targets.clamp(min=0)[..., None], (top + margin)[..., None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits[: input_ids.shape[0]]


def test_calibration_hits_the_target_sampled_accuracy(tokenizer):
    problems = sample_problems(64, seed=5)
    enc = encode_problems(tokenizer, problems, len(tokenizer))
    oracle = _Oracle(enc.targets, len(tokenizer))
    scale = calibrate_logit_scale(oracle, enc, target=0.35)
    oracle.logits *= scale
    acc = evaluate(oracle, tokenizer, problems)
    assert acc["greedy_accuracy"] == 1.0
    assert acc["sampled_accuracy"] == pytest.approx(0.35, abs=1e-3)


def test_short_warm_start_writes_a_loadable_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slipstream.models.hf import load_model

    cfg = WarmStartConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sft_steps=6, batch_size=16, warmup_steps=2, check_every=3,
        target_sampled_accuracy=None, num_check=32, num_eval=64, num_train_prompts=16, num_eval_prompts=8,
    )  # fmt: skip
    model_dir = prepare_demo(tmp_path, seed=0, cfg=cfg, log=lambda *_: None)
    assert model_dir == tmp_path / "model"
    assert len(load_prompts(str(tmp_path / "train.jsonl"))) == 16
    assert len(load_prompts(str(tmp_path / "eval.jsonl"))) == 8
    report = json.loads((model_dir / "warmstart.json").read_text())
    assert report["sft_steps"] == 6 and 0 <= report["eval_after_sft"]["sampled_accuracy"] <= 1
    # The SFT was the trainer's (--loss-type sft_loss): its metrics rows and its last checkpoint.
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["num_samples"] == 16 for r in rows)
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text().strip() == "step_000006"

    tok = AutoTokenizer.from_pretrained(model_dir)
    ours = load_model(model_dir)
    assert ours.config.eos_token_id == tok.eos_token_id and ours.config.vocab_size == len(tok)
    problems = all_problems("eval")[: cfg.num_eval]
    assert evaluate(ours, tok, problems) == pytest.approx(report["eval_calibrated"], abs=1e-6)

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok("12+34=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    # The demo's promise is scored by held_out_greedy: every held-out problem, exactly.
    from slipstream.demo.run import held_out_greedy

    whole = evaluate(ours, tok, all_problems("eval"))["greedy_accuracy"]
    assert held_out_greedy(model_dir) == pytest.approx(whole, abs=1e-9)


def test_the_demo_starts_low_and_promises_a_rise():
    """The demo raises a capability: its warm start stops the SFT early (greedy held-out
    accuracy ~0.4, uncalibrated) and its promise is a rise in held-out greedy accuracy."""
    from slipstream.demo.run import END_AT_LEAST, START_AT_MOST

    cfg = WarmStartConfig()
    assert cfg.stop_greedy_accuracy <= START_AT_MOST < END_AT_LEAST
    assert cfg.target_sampled_accuracy is None  # no sharpening of the logits


def test_warm_start_sft_stops_at_the_first_check_that_passes(tmp_path, tokenizer):
    from slipstream.demo.warmstart import model_config, sft_with_trainer
    from slipstream.models.hf import init_model

    cfg = WarmStartConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sft_steps=50, batch_size=8, warmup_steps=2, check_every=2,
        stop_greedy_accuracy=0.0,  # any check passes: the run ends at the first one
    )  # fmt: skip
    model = init_model(model_config(cfg, tokenizer), 0)
    tok_dir = tmp_path / "tok"
    build_char_tokenizer(tok_dir)
    check = encode_problems(tokenizer, sample_problems(8, 0, split="train"), model.config.vocab_size)
    steps, trained = sft_with_trainer(
        model, tok_dir, all_problems("train")[:64], cfg, 0, tmp_path / "sft", check=check, log=lambda *_: None
    )
    assert steps == 2
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not torch.equal(trained.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_warm_start_sft_shows_every_step_to_watch_which_can_end_it(tmp_path, tokenizer):
    """`watch(step, model)` (bench/warmstart_spread.py replays stop rules with it) sees the trainer's
    model after every step, before the check; True ends the run there, with its checkpoint."""
    from slipstream.demo.warmstart import model_config, sft_with_trainer
    from slipstream.models.hf import init_model

    cfg = WarmStartConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sft_steps=50, batch_size=8, warmup_steps=2, check_every=1,
        stop_greedy_accuracy=2.0,  # no check ever passes
    )  # fmt: skip
    model = init_model(model_config(cfg, tokenizer), 0)
    tok_dir = tmp_path / "tok"
    build_char_tokenizer(tok_dir)
    check = encode_problems(tokenizer, sample_problems(8, 0, split="train"), model.config.vocab_size)
    seen: list[tuple[int, torch.Tensor]] = []

    def watch(step, m):
        seen.append((step, m.model.embed_tokens.weight.detach().clone()))
        return step == 3

    steps, trained = sft_with_trainer(
        model, tok_dir, all_problems("train")[:64], cfg, 0, tmp_path / "sft", check=check,
        log=lambda *_: None, watch=watch,
    )  # fmt: skip
    assert steps == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert not torch.equal(seen[0][1], seen[1][1])  # the live weights, step by step
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    torch.testing.assert_close(trained.model.embed_tokens.weight, seen[2][1])
