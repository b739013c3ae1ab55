"""A mixture-of-experts policy under FSDP2 trains like one process, load-balancing loss included.

The MoE layers hand their router logits and expert ids back through a side channel passed to
every decoder layer (`moe.Routing`). FSDP2 hooks the backward of a unit's inputs and rebuilds any
dataclass among them that holds a tensor requiring grad: once the first layer had put its router
logits in, each later layer appended to a copy, so the aux loss (and the captured routing) held
the first MoE layer only, and two ranks trained another model than one process."""

import json
import sys
from pathlib import Path

import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.services.trainer.actor import Actor

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402


def test_moe_with_aux_loss_on_two_ranks_trains_like_one_process(tmp_path):
    model_dir = build_tiny_model(
        tmp_path / "moe", hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=128,
    )  # fmt: skip
    fsdp_worker.run_two_ranks(model_dir, tmp_path, "moe")
    single = Actor.from_config(config_from_values(fsdp_worker.moe_values(str(model_dir))))
    losses = fsdp_worker.qat_steps(single)
    theirs = json.loads((tmp_path / "moe.json").read_text())["losses"]
    # Same samples and weights: the first step's loss is the same sum in another order.
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(losses), rtol=1e-4, atol=1e-7)
