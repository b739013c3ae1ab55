"""Each family and each RoPE kind against `transformers`' own model, through the checkpoint format.

For Qwen3, Qwen2 and Llama, with plain, `linear`, `llama3` and `yarn` RoPE, tied and untied: a
checkpoint `transformers` saved gives the same logits here, and one we saved gives the same logits
in `transformers` (which must pick its own class for it). Configs come from transformers' config
classes, so the keys are what real checkpoints carry. The tolerance is tests/test_model.py's (fp32,
atol 1e-5 on O(1) logits); the inverse frequencies and the yarn factor must agree exactly.

Weights are random everywhere: norms away from one and biases away from zero, since a bias or norm
in the wrong place is invisible at its initial value. Sequences run past the scaled kinds'
original context (32 here), where the scalings differ from plain RoPE the most.
"""

import json
from dataclasses import replace

import pytest
import torch
import transformers
from family_fixtures import HF, ROPES, VOCAB, randomise, save_hf_model, shape

from slipstream.models import ModelConfig, init_model, load_config, load_model, save_model
from slipstream.models.rope import frequencies

torch.set_num_threads(1)
ATOL = 1e-5


def input_ids(batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def assert_same_rope(ours, theirs) -> None:
    inv_freq, factor = frequencies(ours.config.rope, torch.device("cpu"))
    assert torch.equal(inv_freq, theirs.model.rotary_emb.inv_freq)
    assert factor == theirs.model.rotary_emb.attention_scaling


CASES = [(f, r, t) for f in HF for r in ROPES for t in (False, True)]


@pytest.mark.parametrize(("family", "rope", "tied"), CASES)
def test_transformers_checkpoint_loads_here_with_equal_logits(tmp_path, family, rope, tied):
    theirs = save_hf_model(family, tmp_path, rope, tie_word_embeddings=tied)
    ours = load_model(tmp_path)
    assert ours.config.model_type == family and ours.config.tie_word_embeddings is tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    assert_same_rope(ours, theirs)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "rope", "tied"), CASES)
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, family, rope, tied):
    config = ModelConfig(
        **shape(family) | {"head_dim": shape(family).get("head_dim", 16)},
        model_type=family,
        rope_theta=10000.0,
        rope_scaling=ROPES[rope],
        tie_word_embeddings=tied,
    )
    ours = init_model(config, seed=0)
    randomise(ours, seed=1)
    save_model(ours, tmp_path)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs) is HF[family][1]
    assert theirs.config.rope_parameters["rope_type"] == rope
    if tied:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert_same_rope(ours, theirs)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        {"attention_bias": True, "mlp_bias": True},  # Llama's switches, off in every Llama 3.x
        {"rope_type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16},
        {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "truncate": False},
    ],
    ids=["llama-biases", "yarn-mscale", "yarn-attention-factor"],
)
def test_less_common_settings_match_transformers(tmp_path, extra):
    rope = {k: v for k, v in extra.items() if not k.endswith("_bias")}
    biases = {k: v for k, v in extra.items() if k.endswith("_bias")}
    if rope:
        biases["rope_parameters"] = {"rope_theta": 10000.0, "original_max_position_embeddings": 32, **rope}
    theirs = save_hf_model("llama", tmp_path, seed=5, **biases)
    ours = load_model(tmp_path)
    want_biases = not rope  # the row without RoPE keys is the one with both bias switches on
    assert ours.config.attention_bias is want_biases and ours.config.mlp_bias is want_biases
    assert_same_rope(ours, theirs)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids()), theirs(input_ids()).logits, atol=ATOL, rtol=0)
    save_model(ours, tmp_path / "again")  # and back: the switches and parameters survive
    again = load_model(tmp_path / "again").config
    assert replace(again, extra={}) == replace(ours.config, extra={})  # save_model rewrites dtype


@pytest.mark.parametrize("family", list(HF))
def test_config_round_trip_both_formats(family):
    config = ModelConfig(**shape(family) | {"head_dim": 16}, model_type=family, rope_scaling=ROPES["llama3"])
    d = config.to_hf_dict()  # the 4.x spelling: rope_theta + rope_scaling
    assert d["model_type"] == family and d["architectures"] == [HF[family][1].__name__]
    assert ModelConfig.from_hf_dict(d) == config
    hf = HF[family][0](**d).to_dict()  # 5.x writes rope_parameters (with rope_theta inside)
    assert "rope_scaling" not in hf or hf["rope_scaling"] is None
    read = ModelConfig.from_hf_dict(hf)
    assert read.rope_theta == config.rope_theta and read.rope == config.rope


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
        ({"rope_scaling": {"type": "su"}}, "rope type 'su'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor, high_freq_factor"),
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(tmp_path, change, message):
    d = ModelConfig(**shape("qwen2") | {"head_dim": 16}, model_type="qwen2").to_hf_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as err:
        load_config(tmp_path)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_qwen2_has_qkv_bias_and_no_qk_norm_llama_neither():
    qwen2 = init_model(ModelConfig(**shape("qwen2") | {"head_dim": 16}, model_type="qwen2"))
    llama = init_model(ModelConfig(**shape("llama"), model_type="llama"))
    names = {name for name, _ in qwen2.named_parameters()}
    assert (
        "model.layers.0.self_attn.q_proj.bias" in names
        and "model.layers.0.self_attn.o_proj.bias" not in names
    )
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert not any(
        n.endswith(".bias") or "_norm.weight" in n and "self_attn" in n for n, _ in llama.named_parameters()
    )
