"""Our Qwen3 against `transformers`' Qwen3 on the same weights, through the checkpoint format.

The tolerance is fp32 with atol 1e-5 on logits of a tiny random model (logits are O(1)): the two
implementations do the same operations in the same order, so any real difference (a missing
q/k norm, the wrong RoPE convention, GQA head mapping, a tied head that is not tied) shows up
orders of magnitude above it.
"""

import json

import pytest
import torch
import transformers

from slipstream.models import Qwen3Config, Qwen3ForCausalLM, init_model, load_config, load_model, save_model

ATOL = 1e-5

torch.set_num_threads(1)


def tiny_config(**overrides) -> Qwen3Config:
    kw = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def randomise_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Norm weights start at one, which would hide a norm applied in the wrong place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


def input_ids(batch: int = 3, length: int = 11, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("tied", [False, True])
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, tied):
    ours = init_model(tiny_config(tie_word_embeddings=tied), seed=0)
    randomise_norms(ours)
    save_model(ours, tmp_path)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings is tied
    if tied:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ids = input_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == (3, 11, 64)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_transformers_checkpoint_loads_here_with_equal_logits(tmp_path):
    hf_config = transformers.Qwen3Config(**tiny_config().to_hf_dict())
    torch.manual_seed(3)
    theirs = transformers.Qwen3ForCausalLM(hf_config).eval()
    randomise_norms(theirs, seed=4)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.rope_theta == 10000.0 and ours.config.num_key_value_heads == 2
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)
        # The trainer's chunked-head path: hidden states then lm_head.
        torch.testing.assert_close(ours.lm_head(ours.model(ids)), theirs(ids).logits, atol=ATOL, rtol=0)


def test_tied_round_trip_shares_one_tensor(tmp_path):
    model = init_model(tiny_config(tie_word_embeddings=True), seed=5)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_bf16_load_casts_every_parameter(tmp_path):
    save_model(init_model(tiny_config(), seed=0), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(input_ids()).dtype == torch.bfloat16


def test_causal_and_right_padding_harmless():
    """Tokens after position t never change logits at t (what makes right padding safe)."""
    model = init_model(tiny_config(), seed=2)
    ids = input_ids(batch=1, length=10)
    padded = torch.cat([ids[:, :6], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :6], model(ids)[:, :6], atol=ATOL, rtol=0)


def test_config_round_trip_and_transformers_format():
    config = tiny_config(eos_token_id=[2, 3])
    d = config.to_hf_dict()
    assert d["model_type"] == "qwen3" and d["architectures"] == ["Qwen3ForCausalLM"]
    assert Qwen3Config.from_hf_dict(d) == config
    assert Qwen3Config.from_hf_dict(d).eos_token_ids == [2, 3]
    # transformers 5.x writes rope_parameters instead of rope_theta.
    hf = transformers.Qwen3Config(**d).to_dict()
    assert Qwen3Config.from_hf_dict(hf).rope_theta == 10000.0


def test_missing_and_malformed_checkpoints_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
    other = Qwen3ForCausalLM(tiny_config(num_hidden_layers=1))
    save_model(other, tmp_path / "one_layer")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    (tmp_path / "one_layer" / "config.json").replace(tmp_path / "unused.json")
    (tmp_path / "one_layer" / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)
