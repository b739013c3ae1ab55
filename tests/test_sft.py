"""--loss-type sft_loss: the trainer alone on a JSONL of examples, without the mesh.

A tiny Qwen3 learns the demo's additions from prompt/label pairs (its loss falls); chat
conversations are masked to their assistant turns under a chat template built here with
`tokenizers`/`transformers` classes; a run stopped and resumed with --load continues the same
loss and learning-rate curve; `slipstream train --loss-type sft_loss` runs it end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.config import config_from_values
from slipstream.data import DataError, PromptRecord
from slipstream.models.hf import init_model, save_model
from slipstream.models.qwen3 import Qwen3Config
from slipstream.services.trainer.sft import chat_tokens, encode_example, train_sft

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>", "<|unk|>"]


def chat_tokenizer(out: Path):
    """One token per character of the demo's alphabet, the chat markers as special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate("0123456789+-*=() abcdefghijklmnopqrstuvwxyz?")}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<|unk|>",
        additional_special_tokens=SPECIALS[:3], chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3 over the chat tokenizer's vocabulary, with the tokenizer beside it."""
    out = tmp_path_factory.mktemp("chat") / "model"
    tok = chat_tokenizer(out)
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    save_model(init_model(config, seed=0), out)
    return out


CONVERSATIONS = [
    [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "and 2+2="},
        {"role": "assistant", "content": "4"},
    ],
    *(
        [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
        for a, b in [(12, 7), (30, 45), (8, 8), (61, 2), (5, 19), (40, 40), (3, 77)]
    ),
]


def test_chat_masks_cover_exactly_the_assistant_turns(chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    tokens, mask = chat_tokens(tok, CONVERSATIONS[0])
    pieces = tok.convert_ids_to_tokens(tokens)
    assert (
        "".join(pieces)
        == "<|system|>add<|end|><|user|>1+2=<|end|><|assistant|>3<|end|><|user|>and 2+2=<|end|><|assistant|>4<|end|>"
    )
    assert [p for p, m in zip(pieces, mask, strict=True) if m] == ["3", "<|end|>", "4", "<|end|>"]

    # As a Sample: the response starts at the first assistant token; the user turn between is masked.
    record = PromptRecord(prompt=CONVERSATIONS[0], label="", where="x:1")
    s = encode_example(tok, record, apply_chat_template=True)
    assert s.tokens == tokens and s.prompt_length == pieces.index("3")
    assert s.loss_mask == mask[s.prompt_length :] and s.loss_mask[:2] == [1, 1] and s.loss_mask[-2:] == [1, 1]
    assert sum(s.loss_mask) == 4

    # A prompt/response pair under the template: the response becomes the assistant turn.
    pair = encode_example(tok, PromptRecord(prompt="1+2=", label="3", where="x:2"), apply_chat_template=True)
    assert tok.convert_ids_to_tokens(pair.response_tokens) == ["3", "<|end|>"] and pair.loss_mask == [1, 1]
    # Without the template: prompt tokens, then the response and EOS, all trained.
    raw = encode_example(tok, PromptRecord(prompt="1+2=", label="3", where="x:3"), apply_chat_template=False)
    assert tok.convert_ids_to_tokens(raw.tokens) == ["1", "+", "2", "=", "3", "<|end|>"]
    assert raw.response_length == 2 and raw.loss_mask == [1, 1]

    with pytest.raises(DataError, match="x:4: no assistant turn"):
        encode_example(
            tok, PromptRecord(prompt=[{"role": "user", "content": "1"}], label="", where="x:4"), True
        )
    tok.chat_template = "{% for m in messages[-1:] %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    with pytest.raises(DataError, match="not render a conversation as a prefix"):
        chat_tokens(tok, CONVERSATIONS[0])


def _cfg(model: Path, data: Path, run_dir: Path, **kw):
    values = dict(
        hf_checkpoint=str(model), prompt_data=str(data), loss_type="sft_loss", run_dir=str(run_dir),
        rollout_batch_size=8, global_batch_size=4, micro_batch_size=2, lr=1e-2, device="cpu",
        num_rollout=12, save_interval=0,
    )  # fmt: skip
    values.update(kw)
    return config_from_values(values)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_falls_on_prompt_label_pairs(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    data = build_prompts(tmp_path / "train.jsonl", n=32)
    state = train_sft(_cfg(model, data, tmp_path / "run", lr_decay_style="cosine", lr_warmup_iters=2))
    rows = _rows(tmp_path / "run")
    assert state.finished and [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["num_optimizer_steps"] == 2 for r in rows)  # 8 examples a step, 4 per optimizer step
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    print(f"sft loss {first:.3f} -> {last:.3f}")
    assert last < 0.75 * first
    assert rows[0]["lr"] == pytest.approx(1e-2 / 2)  # optimizer step 1 of a 2-step warmup
    assert rows[-1]["lr"] < rows[5]["lr"] < 1e-2  # cosine decay over the run's 24 optimizer steps
    assert rows[-1]["epoch"] == 3.0  # 12 steps x 8 of 32 examples
    assert (tmp_path / "run" / "checkpoints" / "step_000012" / "model.safetensors").is_file()


def test_chat_sft_resumes_exactly_from_a_checkpoint(chat_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    kw = dict(
        input_key="messages", apply_chat_template=True, rollout_batch_size=4, global_batch_size=2,
        lr_decay_style="linear", lr_warmup_iters=1, lr_decay_iters=12, rollout_shuffle=True, num_epoch=3,
    )  # fmt: skip
    whole = tmp_path / "whole"
    train_sft(_cfg(chat_model, data, whole, **kw))
    ref = _rows(whole)
    assert len(ref) == 6  # 3 epochs of 8 conversations, 4 a step

    part = tmp_path / "part"
    train_sft(_cfg(chat_model, data, part, **{**kw, "num_epoch": 0, "num_rollout": 4, "save_interval": 2}))
    resumed = train_sft(_cfg(chat_model, data, part, load=str(part / "checkpoints" / "step_000002"), **kw))
    assert resumed.finished
    rows = {r["step"]: r for r in _rows(part)}  # steps 3 and 4 ran twice: the resumed run's rows win
    for r in ref:
        assert rows[r["step"]]["lr"] == r["lr"]
        assert rows[r["step"]]["loss"] == pytest.approx(r["loss"], abs=1e-6), r["step"]


def test_slipstream_train_takes_the_direct_path(tmp_path):
    """No Redis, coordinator, rollout or reward process: the command trains and checkpoints alone."""
    model = build_tiny_model(tmp_path / "model")
    data = build_prompts(tmp_path / "train.jsonl", n=8)
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "slipstream", "train", "--loss-type", "sft_loss", "--hf-checkpoint", str(model),
        "--prompt-data", str(data), "--run-dir", str(run_dir), "--rollout-batch-size", "4",
        "--micro-batch-size", "4", "--num-epoch", "1", "--device", "cpu", "--torch-threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (run_dir / "redis").exists()

    bad = subprocess.run(argv[:-4] + ["--label-key", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .endswith("no response (--label-key); chat messages need --apply-chat-template")
    )
