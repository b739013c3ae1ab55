"""--lora-rank under FSDP2 (issue 18): two gloo ranks train like one process.

The frozen base stays sharded as without LoRA (each rank holds half of it); the adapters are
whole on every rank, trained on each rank's micro-batches and averaged as FSDP averages the
sharded weights. After two steps the push (the merged policy) equals one process's on the same
samples, the base weights are untouched, and the checkpoint (written by the two ranks together)
holds the adapters in PEFT's format and resumes: on two ranks (a third step lands where the
uninterrupted run's does) and on one process."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.models.hf import load_model
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.checkpoint import load_trainer_state

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402

# Two ranks reduce the adapters' gradients in another order than one process sums them; after
# AdamW's normalisation that noise reaches ~1e-6 of weights that move by ~1e-1 (lr 5e-2, 3 steps).
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fsdp_lora") / "model")


@pytest.fixture(scope="module")
def two_ranks(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_lora_out")
    fsdp_worker.run_two_ranks(model_dir, out, "lora")
    return out


def one_process(model_dir) -> Actor:
    torch.manual_seed(0)  # as each rank: the same adapters to start from
    return Actor.from_config(config_from_values(fsdp_worker.lora_values(str(model_dir))))


def test_base_stays_sharded_and_only_adapters_train(model_dir, two_ranks):
    base = load_model(model_dir)
    full = sum(p.nbytes for p in base.parameters())
    for rank in (0, 1):
        held = json.loads((two_ranks / f"base_{rank}.json").read_text())
        assert held["base_sharded"], rank
        assert 0.4 * full < held["base_bytes_held"] < 0.6 * full, (rank, held["base_bytes_held"], full)
        assert len(held["adapters_trained"]) == 2 * 3 * base.config.num_hidden_layers
        assert all(".lora_A." in n or ".lora_B." in n for n in held["adapters_trained"])


def test_two_ranks_push_what_one_process_trains(model_dir, two_ranks):
    single = one_process(model_dir)
    for _ in range(2):
        fsdp_worker.lora_step(single)
    expected = single.state_dict_for_sync()
    pushed = load_file(str(two_ranks / "pushed_2.safetensors"))
    assert pushed.keys() == expected.keys()
    base = dict(load_model(model_dir).named_parameters())
    for name, t in expected.items():
        torch.testing.assert_close(pushed[name], t, **TOL, msg=name)
        adapted = name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
        # Frozen weights are pushed bit for bit as loaded; adapted ones moved.
        assert torch.equal(pushed[name], base[name].detach()) != adapted, name

    # A third step from the checkpoint the two ranks wrote: on two ranks, exactly where the
    # uninterrupted two-rank run lands; on one process, where one process's third step lands.
    third, resumed = (load_file(str(two_ranks / f"{n}_3.safetensors")) for n in ("pushed", "resumed"))
    for name, t in third.items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)
    fsdp_worker.lora_step(single)
    expected = single.state_dict_for_sync()
    for name, t in expected.items():
        torch.testing.assert_close(third[name], t, **TOL, msg=name)


def test_the_checkpoint_is_peft_adapters_and_loads_in_one_process(model_dir, two_ranks):
    ckpt = two_ranks / "ckpt" / "step_000002"
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    adapters = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert all(n.startswith("base_model.model.") and ".lora_" in n for n in adapters)
    resumed = one_process(model_dir)
    torch.manual_seed(1)
    for p in resumed.model.parameters():  # not the adapters it would have started from
        if p.requires_grad:
            p.data.normal_()
    load_trainer_state(ckpt, resumed.model, resumed.optimizer, resumed.scheduler)
    pushed = load_file(str(two_ranks / "pushed_2.safetensors"))
    for name, t in resumed.state_dict_for_sync().items():
        torch.testing.assert_close(t, pushed[name], rtol=0, atol=0, msg=name)
    # model.safetensors is the merged policy, as in one process
    merged = load_model(ckpt)
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p.detach(), pushed[name], rtol=0, atol=0, msg=name)
