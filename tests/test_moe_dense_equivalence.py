"""The MoE path is the dense MLP when routing cannot matter (issue 15 item 6's exact check).

A Qwen3-MoE whose every layer has k experts, top-k of k, and a zero router
(`demo.warmstart.moe_of_dense`) gives each expert the gate weight s/k exactly (a softmax over equal
logits, renormalised, times `routed_scaling_factor` s), so its layer is s times the mean of its k
experts. Built from a dense Qwen3 with intermediate size k * I by cutting each MLP into k column
blocks (expert e: the gate/up rows and down columns of block e, the down block times k/s), it must
compute the dense model's function: the same logits, and gradients that map back onto the dense
ones (gate/up equal, down times s/k: what the gate weight does to an expert's down projection;
equal at s = k). k = 1 is the plainest case: one expert the size of the dense MLP, gate weight 1
for any router. Checked in fp32 in the trainer's real training step (padded and packed rows, with
and without rollout routing replay, the gradients AdamW receives) and in the engine's prefill and
decode (tokens and sampled log-probs), so any difference is the MoE path's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mesh_fixtures import build_tiny_model
from slipstream.config import config_from_values
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.demo.warmstart import WarmStartConfig, model_config, moe_of_dense, prepare_demo, upcycle
from slipstream.models import Routing, init_model, load_model
from slipstream.models.hf import save_model
from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.trainer.actor import Actor
from slipstream.services.trainer.checkpoint import resolve_checkpoint
from slipstream.types import Sample, Status

torch.set_num_threads(1)
SCORES = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5]
ATOL = 2e-6  # fp32: the dense GEMM sums the intermediate in one order, the experts in k blocks


@dataclasses.dataclass
class Pair:
    dense: object  # Path
    moe: object  # Path
    k: int
    scale: float  # routed_scaling_factor

    @property
    def down(self) -> float:
        """An expert's down projection's gradient over the dense block's (its gate weight)."""
        return self.scale / self.k


def save_moe_of_dense(dense_dir, out, k: int, scale: float) -> None:
    save_model(moe_of_dense(load_model(dense_dir), k, scale), out)
    for f in dense_dir.iterdir():  # the tokenizer
        if f.name not in ("config.json", "model.safetensors"):
            (out / f.name).write_bytes(f.read_bytes())


@pytest.fixture(
    scope="module", params=[(1, 1.0), (4, 1.0), (4, 4.0)], ids=["one-expert", "top4-of-4", "top4-of-4-scaled"]
)
def pair(request, tmp_path_factory):
    k, scale = request.param
    root = tmp_path_factory.mktemp(f"equiv{k}")
    dense = build_tiny_model(root / "dense", seed=5)
    save_moe_of_dense(dense, root / "moe", k, scale)
    return Pair(dense, root / "moe", k, scale)


def _samples(k: int, n: int = 8) -> list[Sample]:
    """Samples of mixed lengths with rollout log-probs and, for R3, routed-experts records: a
    permutation of the k experts per position and layer (order must not matter)."""
    g, perm = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 2 + (i * 5) % 9
        toks = torch.randint(5, 20, (p + r,), generator=g).tolist()
        records = [
            torch.cat([torch.randperm(k, generator=perm) for _ in range(2)]).tolist() for _ in toks[:-1]
        ]
        out.append(
            Sample(
                tokens=toks, response_length=r, reward=float(i % 2), status=Status.COMPLETED,
                policy_versions=[0] * r, rollout_log_probs=[-1.0] * r, rollout_routed_experts=records,
            )
        )  # fmt: skip
    return out


def _trained(model_dir, **flags) -> tuple[dict[str, torch.Tensor], object, Actor]:
    """One RL step of the real trainer: (the gradients AdamW received by name, stats, actor)."""
    values = dict(
        hf_checkpoint=str(model_dir), rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
        lr=1e-3, device="cpu", rollout_max_response_len=10, moe_aux_loss_coeff=0.0,
    )  # fmt: skip
    actor = Actor.from_config(config_from_values({**values, **flags}))
    grads: dict[str, torch.Tensor] = {}
    for name, p in actor.model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    stats = actor.train_rollout(_samples(actor.model.config.num_experts or 1), SCORES)
    return grads, stats, actor


def _as_moe(dense: dict[str, torch.Tensor], k: int, *, down_scale: float) -> dict[str, torch.Tensor]:
    """Dense per-name tensors in the MoE's names and layout (down blocks times `down_scale`)."""
    out = {n: t for n, t in dense.items() if ".mlp." not in n}
    layers = {n.split(".mlp.")[0] for n in dense if ".mlp." in n}
    for p in layers:
        gate, up = (dense[f"{p}.mlp.{w}_proj.weight"].chunk(k, dim=0) for w in ("gate", "up"))
        down = dense[f"{p}.mlp.down_proj.weight"].chunk(k, dim=1)
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat(gu) for gu in zip(gate, up, strict=True)]
        )
        out[f"{p}.mlp.experts.down_proj"] = torch.stack(down) * down_scale
    return out


@pytest.mark.parametrize(
    "flags",
    [{}, dict(use_rollout_routing_replay=True), dict(use_dynamic_batch_size=True, max_tokens_per_gpu=40),
     dict(use_dynamic_batch_size=True, max_tokens_per_gpu=40, use_rollout_routing_replay=True)],
    ids=["padded", "padded-r3", "packed", "packed-r3"],
)  # fmt: skip
def test_trainer_step_equals_the_dense_one(pair, flags):
    dense_grads, dense_stats, dense_actor = _trained(
        pair.dense, **{k: v for k, v in flags.items() if "routing" not in k}
    )
    moe_grads, moe_stats, moe_actor = _trained(pair.moe, **flags)
    if flags.get("use_rollout_routing_replay"):
        assert moe_stats.metrics["moe_routing_agreement"] == 1.0
    # the same loss and log-prob gap to the "rollout"; with one expert also the gradient norm (k > 1:
    # the down projections' gradients are s/k of the dense ones, and the router has one)
    for key in ("loss", "logprob_abs_diff_mean", *(("grad_norm",) if pair.k == 1 else ())):
        assert getattr(moe_stats, key) == pytest.approx(getattr(dense_stats, key), rel=1e-5), key
    want = _as_moe(dense_grads, pair.k, down_scale=pair.down)
    for name, g in moe_grads.items():
        if name.endswith("mlp.gate.weight"):  # the router: the dense model has none
            assert pair.k > 1 or not g.any(), name  # a softmax over one expert is 1 whatever its logit
            continue
        torch.testing.assert_close(g, want[name], atol=ATOL, rtol=1e-5, msg=name)
    assert set(moe_grads) - set(want) == {n for n in moe_grads if n.endswith("mlp.gate.weight")}
    if pair.k == 1:  # after AdamW the two still compute the same function
        ids = torch.tensor([s.tokens for s in _samples(1)[:1]])
        with torch.no_grad():
            torch.testing.assert_close(moe_actor.model(ids), dense_actor.model(ids), atol=1e-5, rtol=0)


def test_adamw_moves_a_mean_of_k_experts_k_times_less(pair):
    """Why an MoE of the dense model's function learns slower: AdamW's first step is ~lr per
    weight whatever the gradient's scale, so each expert's down projection takes the dense one's
    step, while the layer's output sees it times its gate weight s/k (gate/up: the same step): a
    mean of k experts (s = 1) moves k times less than the dense MLP, s = k moves as it does.
    (AdamW's eps is made negligible here: its first step is then exactly lr * sign(gradient).)"""
    start = {
        kind: {n: p.detach().clone() for n, p in load_model(path).named_parameters()}
        for kind, path in (("dense", pair.dense), ("moe", pair.moe))
    }
    _, _, dense = _trained(pair.dense, adam_eps=1e-30)
    _, _, moe = _trained(pair.moe, adam_eps=1e-30)
    dense_step = _as_moe(
        {n: p.detach() - start["dense"][n] for n, p in dense.model.named_parameters()}, pair.k, down_scale=1.0
    )
    for name, p in moe.model.named_parameters():
        if name in dense_step and ".mlp." in name:
            torch.testing.assert_close(
                p.detach() - start["moe"][name], dense_step[name], atol=1e-9, rtol=1e-4
            )


@torch.no_grad()
def test_engine_prefill_and_decode_equal_the_dense_ones(pair):
    """Sampled at temperature 1 with per-request seeds: the same tokens and sampled log-probs."""
    prompts = [[(5 * j + 3 * i + 1) % 16 + 3 for j in range(n)] for i, n in enumerate([9, 3, 14, 6])]
    reqs = [Request(f"r{i}", p, 10, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    got = {}
    for kind, path in (("dense", pair.dense), ("moe", pair.moe)):
        got[kind] = NativeEngine(load_model(path), eos_token_ids=[], max_batch_size=3).generate(reqs)
    for req, d, m in zip(reqs, got["dense"], got["moe"], strict=True):
        assert m.tokens == d.tokens
        torch.testing.assert_close(torch.tensor(m.log_probs), torch.tensor(d.log_probs), atol=1e-5, rtol=0)
        assert m.routed_experts.shape == (len(req.tokens) + len(m.tokens) - 1, 2 * pair.k)


@torch.no_grad()
def test_upcycled_moe_is_the_dense_model_whatever_the_routing(tmp_path):
    """Sparse upcycling (`warmstart.upcycle`, the MoE demo's start): every expert a copy of its
    layer's MLP, renormalised top-2 of 4: the dense logits under its own routing and under any
    replayed ids, and the engine samples the dense model's tokens."""
    tok = build_char_tokenizer(tmp_path)
    cfg = WarmStartConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, upcycle=True)  # fmt: skip
    dense = init_model(model_config(dataclasses.replace(cfg, num_experts=0), tok), seed=3)
    moe = upcycle(dense, model_config(cfg, tok), seed=3)
    ids = torch.randint(3, 19, (3, 11), generator=torch.Generator().manual_seed(0))
    own = Routing()
    torch.testing.assert_close(moe(ids, routing=own), dense(ids), atol=ATOL, rtol=0)
    assert len({tuple(r) for r in own.stacked().reshape(-1, 2).sort(-1).values.tolist()}) > 1  # really routed
    given = [torch.randint(0, 4, (3, 11, 2), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    torch.testing.assert_close(moe(ids, routing=Routing(replay=given)), dense(ids), atol=ATOL, rtol=0)
    reqs = [Request(f"r{i}", [4 + i, 7, 9], 8, temperature=1.0, seed=i) for i in range(3)]
    got = [NativeEngine(m, eos_token_ids=[]).generate(reqs) for m in (dense, moe)]
    assert [r.tokens for r in got[0]] == [r.tokens for r in got[1]]
    with pytest.raises(ValueError, match="norm_topk_prob and no gate scale"):
        upcycle(dense, model_config(dataclasses.replace(cfg, routed_scaling_factor=2.0), tok), seed=3)


def test_upcycled_warm_start_is_the_dense_sft_as_an_moe(tmp_path):
    """`prepare_demo` with `upcycle`: the SFT trains the dense model, the checkpoint is the MoE
    upcycled from its result (same logits), which the demo then trains with R3."""
    cfg = WarmStartConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sft_steps=4, batch_size=16, warmup_steps=1, check_every=2,
        num_check=16, num_eval=32, num_train_prompts=16, num_eval_prompts=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, upcycle=True,
    )  # fmt: skip
    moe = load_model(prepare_demo(tmp_path, seed=0, cfg=cfg, log=lambda *_: None))
    sft = load_model(resolve_checkpoint(str(tmp_path / "sft" / "checkpoints")))
    assert sft.config.model_type == "qwen3" and moe.config.model_type == "qwen3_moe"
    assert moe.config.moe_layers == (0, 1) and moe.config.num_experts == 4
    ids = torch.randint(3, 19, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), sft(ids), atol=ATOL, rtol=0)
