"""LoRA (issue 18): only the adapters train and get optimizer state, the push is the merged
policy W + (alpha / r) B A, and checkpoints round-trip with the adapters in PEFT's format."""

import json

import pytest
import torch
import transformers
from peft import PeftModel

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.models.hf import load_model
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.checkpoint import load_trainer_state, save_checkpoint
from slipstream.types import Sample, Status

TOKENS = torch.tensor([[3, 7, 8, 9, 5, 6, 4, 2]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("lora") / "model")


def actor(model_dir, **flags) -> Actor:
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=2, lr=5e-2, device="cpu",
        rollout_max_response_len=4, lora_rank=4, lora_alpha=8.0, target_modules="q_proj,v_proj,down_proj",
    )  # fmt: skip
    return Actor.from_config(config_from_values(values | flags))


def samples():
    return [
        Sample(tokens=[7, 8, 9, 5 + i, 6 + i], response_length=2, reward=float(i % 2),
               status=Status.COMPLETED, rollout_log_probs=[-1.0, -1.0], policy_versions=[0, 0])
        for i in range(4)
    ]  # fmt: skip


def train_two_steps(a: Actor) -> None:
    for _ in range(2):
        a.train_rollout(samples(), [1.0, -1.0, 0.5, -0.5], 0)


def test_only_adapters_train_and_get_optimizer_state(model_dir):
    a = actor(model_dir)
    before = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    train_two_steps(a)
    names = {n for n, p in a.model.named_parameters()}
    adapters = {n for n in names if ".lora_" in n}
    assert len(adapters) == 2 * 3 * a.model.config.num_hidden_layers  # A and B, three targets a layer
    for n, p in a.model.named_parameters():
        moved = not torch.equal(p, before[n])
        # lora_A starts random and B at zero; both move once B is non-zero
        assert moved == (n in adapters), n
    state = a.optimizer.state_dict()["state"]
    assert len(state) == len(adapters)
    held = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in a.model.named_parameters() if n in adapters}


def test_the_push_is_base_plus_scaled_ba_and_computes_the_policy(model_dir):
    a = actor(model_dir)
    train_two_steps(a)
    pushed = a.state_dict_for_sync()
    assert not any(".lora_" in n or "base_layer" in n for n in pushed)
    q = a.model.model.layers[1].self_attn.q_proj
    expected = q.base_layer.weight + (q.lora_B["default"].weight @ q.lora_A["default"].weight) * (8.0 / 4)
    torch.testing.assert_close(pushed["model.layers.1.self_attn.q_proj.weight"], expected)
    base = load_model(model_dir)
    torch.testing.assert_close(
        pushed["model.layers.1.self_attn.k_proj.weight"], base.model.layers[1].self_attn.k_proj.weight
    )
    # What the rollout engines load computes what the trainer trains.
    base.load_state_dict(pushed, strict=False)
    a.model.eval()
    torch.testing.assert_close(base(TOKENS), a.model(TOKENS), rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_in_peft_format(model_dir, tmp_path):
    a = actor(model_dir)
    train_two_steps(a)
    a.model.eval()
    logits = a.model(TOKENS)
    ckpt = save_checkpoint(tmp_path, 2, a.model, a.optimizer, {"policy_version": 2}, scheduler=a.scheduler)
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # model.safetensors is the merged policy, a Hugging Face model directory as before.
    torch.testing.assert_close(load_model(ckpt)(TOKENS), logits, rtol=1e-5, atol=1e-5)
    # PEFT itself reads the adapters onto transformers' base model: same policy.
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = PeftModel.from_pretrained(hf_base, ckpt / "adapter").eval()
    torch.testing.assert_close(peft_model(TOKENS).logits, logits, rtol=1e-4, atol=1e-5)
    # A resumed trainer puts the adapters and their moments back on the base model.
    b = actor(model_dir)
    load_trainer_state(ckpt, b.model, b.optimizer, b.scheduler)
    b.model.eval()
    torch.testing.assert_close(b.model(TOKENS), logits)
    for (n, x), (_, y) in zip(
        a.optimizer.state_dict()["state"].items(), b.optimizer.state_dict()["state"].items(), strict=True
    ):
        torch.testing.assert_close(x["exp_avg"], y["exp_avg"], msg=str(n))


def test_lora_reference_is_the_base_model(model_dir):
    a = actor(model_dir, use_kl_loss=True, kl_loss_coef=0.1)
    assert a.ref_model is a.model  # no second copy: the adapters are switched off
    train_two_steps(a)
    from slipstream.services.trainer.batch import collate

    batch = collate(samples()[:1], [0.0])
    base = Actor.from_config(config_from_values(dict(hf_checkpoint=str(model_dir), device="cpu", lr=1e-3)))
    torch.testing.assert_close(a.ref_log_probs([batch])[0], base.log_probs(batch), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.log_probs(batch), base.log_probs(batch))


def test_bad_target_modules_are_one_line(model_dir):
    with pytest.raises(ValueError, match="--target-modules: \\['qkv'\\]"):
        actor(model_dir, target_modules="qkv")
    with pytest.raises(ValueError, match="lm_head"):
        actor(model_dir, target_modules="lm_head")
