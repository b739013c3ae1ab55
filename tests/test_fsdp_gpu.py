"""The FSDP2 paths of tests/test_fsdp_qat.py and tests/test_fsdp_wire.py on two GPUs (NCCL): the
quantize-in-forward units and the shard-by-shard push where they run in production. On the GPU a
rank quantizes its FP8 rows with the Triton kernel (`kernels.fp8_block`), rank 0's packer the
gathered fp32 state on the CPU with the PyTorch definition: the bytes must still be the same."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.services.trainer.actor import Actor

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("fsdp_gpu") / "model", hidden_size=256, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip


def _two_gpus(model_dir: Path, out: Path, mode: str) -> None:
    fsdp_worker.run_two_ranks(
        model_dir, out, mode, timeout=300, env=os.environ | {"FSDP_WORKER_DEVICE": "cuda"}
    )


def test_shard_by_shard_push_packs_the_same_bytes_on_gpus(model_dir, tmp_path):
    _two_gpus(model_dir, tmp_path, "wire")
    for fmt in fsdp_worker.WIRE_MODES:
        report = json.loads((tmp_path / f"wire_{fmt}_0.json").read_text())
        assert report["same_manifest"] and report["same_chunks"], (fmt, report)
        assert report["sharded"]["received"] < 0.35 * report["gathered"]["received"], (fmt, report)


def test_qat_on_two_gpus_trains_like_one(model_dir, tmp_path):
    _two_gpus(model_dir, tmp_path, "qat")
    for mode in fsdp_worker.QAT_MODES:
        values = fsdp_worker.qat_values(str(model_dir), mode) | {"device": "cuda"}
        losses = fsdp_worker.qat_steps(Actor.from_config(config_from_values(values)))
        theirs = json.loads((tmp_path / f"qat_{mode}.json").read_text())["losses"]
        # bf16 compute: both sides round the same GEMMs the same way; reduction order differs
        torch.testing.assert_close(torch.tensor(theirs), torch.tensor(losses), rtol=1e-3, atol=1e-5, msg=mode)
