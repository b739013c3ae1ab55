"""A tiny model, tokenizer and prompt file for tests that run real services (built once per session)."""

from __future__ import annotations

from pathlib import Path

from slipstream.demo.task import write_prompts
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.models.hf import init_model, save_model
from slipstream.models.qwen3 import Qwen3Config


def build_tiny_model(out: Path, seed: int = 0, **shape: int) -> Path:
    """A random ~50k-parameter Qwen3 with the demo's character tokenizer, in Hugging Face format.

    `shape` overrides any of the sizes below (a larger model for weight-transfer tests, longer
    positions for long generations)."""
    tok = build_char_tokenizer(out)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    config = Qwen3Config(
        vocab_size=len(tok),
        **{**sizes, **shape},
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_model(init_model(config, seed=seed), out)
    return out


def build_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    return write_prompts(path, n, seed)


def push_like_the_trainer(channel, messages, timeout: float = 10.0):
    """`PushWeights` through a blocking stub on `channel` (a `grpc.Channel`), as the trainer's
    `WeightPusher` does; run it with `asyncio.to_thread` from async tests.

    Tests that expect a push to be *refused* push this way: when the server ends the call while
    chunks are still being sent, grpc.aio's client reports INTERNAL ("Internal error from Core")
    instead of the server's status ~6% of the time (9 of 150 refused pushes, measured with grpcio
    1.84), while the blocking client reported the server's status 150 times of 150."""
    from slipstream.proto import coordinator_pb2_grpc

    return coordinator_pb2_grpc.CoordinatorStub(channel).PushWeights(iter(list(messages)), timeout=timeout)
