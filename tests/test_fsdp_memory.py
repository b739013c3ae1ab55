"""Sharded loading (issue 18): under FSDP2 no trainer rank ever holds the full model.

Two gloo ranks build the trainer's `Actor` (policy plus KL reference) from a checkpoint and
train one step. Each rank reports what it materialised (tests/fsdp_worker.py `memory`): the
bytes it read from the safetensors files per model load, the parameter bytes it holds, and the
largest tensor any torch operation produced. Loading the full model and then sharding it (what
the trainer did before) reads every byte on every rank; here each rank reads its half."""

import json
from pathlib import Path

import pytest
from fsdp_worker import run_two_ranks
from safetensors import safe_open

from mesh_fixtures import build_tiny_model
from slipstream.models.hf import load_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Eight layers: no single FSDP unit (a layer, or the root's embedding) is near the model's size.
    return build_tiny_model(tmp_path_factory.mktemp("sharded") / "model", num_hidden_layers=8)


def _checkpoint_bytes(model_dir: Path) -> tuple[int, int]:
    """(all tensors' bytes, the largest tensor's bytes) of the checkpoint."""
    sizes = []
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            sizes.append(f.get_tensor(name).nbytes)
    return sum(sizes), max(sizes)


def test_no_rank_holds_the_full_model(model_dir, tmp_path):
    full, largest_param = _checkpoint_bytes(model_dir)
    run_two_ranks(model_dir, tmp_path, "memory")
    for rank in (0, 1):
        report = json.loads((tmp_path / f"memory_{rank}.json").read_text())
        assert len(report["loads"]) == 2, report  # the policy and the reference, each sharded
        for load in report["loads"]:
            # Half of every tensor's rows (a row more where one does not halve evenly).
            assert 0.4 * full < load["bytes_read"] < 0.55 * full, (rank, load, full)
            assert load["largest_read"] <= largest_param // 2 + 1024, (rank, load, largest_param)
        for held in (report["policy_bytes_held"], report["ref_bytes_held"]):
            assert 0.4 * full < held < 0.55 * full, (rank, held, full)
        # FSDP gathers one unit (a layer, or the root) at a time for a forward or backward.
        assert report["largest_tensor"] < 0.5 * full, (rank, report["largest_tensor"], full)


def test_a_truncated_checkpoint_is_one_clear_error(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*"):
        load_model(broken)


def _actor(model_dir, device: str, **flags):
    from slipstream.config import config_from_values
    from slipstream.services.trainer.actor import Actor

    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=2, lr=1e-2, device=device,
        rollout_max_response_len=4, use_kl_loss=True, kl_loss_coef=0.1,
    )  # fmt: skip
    return Actor.from_config(config_from_values(values | flags))


def _two_steps(actor) -> list[float]:
    from slipstream.types import Sample, Status

    samples = [
        Sample(tokens=[7, 8, 9, 5 + i, 6 + i], response_length=2, reward=float(i % 2),
               status=Status.COMPLETED, rollout_log_probs=[-1.0, -1.0], policy_versions=[0, 0])
        for i in range(4)
    ]  # fmt: skip
    return [actor.train_rollout(samples, [1.0, -1.0, 0.5, -0.5], 0).loss for _ in range(2)]


def _same_training(model_dir, device: str, offload: dict, **common):
    import torch

    plain, offloaded = _actor(model_dir, device, **common), _actor(model_dir, device, **offload, **common)
    assert _two_steps(plain) == pytest.approx(_two_steps(offloaded), rel=1e-4, abs=1e-6)
    for (n, a), (_, b) in zip(
        plain.model.named_parameters(), offloaded.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-6, msg=n)
    return offloaded


def test_optimizer_cpu_offload_trains_like_the_plain_trainer(model_dir):
    """On the CPU the split (masters + AdamW beside a compute copy, gradients added into the
    masters) is all there is to check: it must not change what is trained."""
    offloaded = _same_training(model_dir, "cpu", dict(optimizer_cpu_offload=True))
    assert offloaded.masters is not None and offloaded.compute is not offloaded.model


@pytest.mark.gpu
def test_offloads_on_gpu_keep_state_on_the_host_and_train_alike(model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # float32: under --bf16 the compute copy is rounded from the masters every step, and a master
    # one float32 rounding apart (AdamW on the CPU against the GPU's) can land on the neighbouring
    # bf16 value, so the second step's gradients differ at bf16's resolution (measured on the
    # H200: up to 9e-4 after two steps at lr 1e-2) and no tight check holds; in float32 the two
    # agree to 1e-6, so this checks that offloading changes nothing it trains.
    offloaded = _same_training(model_dir, "cuda", dict(optimizer_cpu_offload=True, ref_offload=True))
    assert all(p.device.type == "cpu" for p in offloaded.model.parameters())  # masters
    assert all(
        p.device.type == "cpu" for s in offloaded.optimizer.state.values() for p in s.values() if p.dim()
    )
    assert all(p.device.type == "cuda" for p in offloaded.compute.parameters())
    layer = offloaded.ref_model.model.layers[0]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in layer.parameters())  # between forwards
