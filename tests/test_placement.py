"""Placement arithmetic for slime's flags, and its resolution on a host with N GPUs (pure: no GPU
needed; the GPU count is an input)."""

import json

import pytest

from slipstream.config import parse_config
from slipstream.placement import PlacementError, cuda_visible, given_fields, model_parameters, plan, resolve


def test_cpu_default_uses_rollout_num_servers():
    p = plan(parse_config(["--rollout-num-servers", "3"]))
    assert p.trainer_procs == 1 and p.trainer_gpus == () and p.rollout_gpus == ((), (), ())
    assert cuda_visible(p.trainer_gpus) == {}


def test_disaggregated_gpus_follow_the_trainer():
    p = plan(
        parse_config(
            [
                "--actor-num-gpus-per-node",
                "2",
                "--rollout-num-gpus",
                "3",
            ]
        )
    )
    assert p.trainer_gpus == (0, 1)
    assert p.rollout_gpus == ((2,), (3,), (4,))  # one GPU per engine (more is refused: test_config)
    assert cuda_visible(p.rollout_gpus[1]) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_colocate_shares_the_trainer_gpus():
    p = plan(parse_config(["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2", "--colocate"]))
    assert p.trainer_gpus == (0, 1) and p.rollout_gpus == ((0,), (1,))


# ---- resolve: the placement on a host with a given number of GPUs (issue 13 item 7) ----------


def _resolve(argv, gpus, environ=None):
    return resolve(parse_config(argv), gpus, given_fields(argv, environ or {}))


def test_one_gpu_default_placement_colocates_over_cuda_ipc():
    r = _resolve([], gpus=1)
    assert r.colocate and r.chosen and r.transport == "CUDA IPC"
    assert r.trainer_on == (0,) and r.rollout_on == (0,)
    assert r.line() == (
        "placement: 1 GPU visible: trainer GPU 0, rollout-0 GPU 0; colocated "
        "(chosen: trainer and rollout share GPU 0; --no-colocate keeps the byte path); weights over CUDA IPC; "
        "one rollout server on the shared GPU (--rollout-num-servers sets the number)"
    )


def test_unassigned_servers_share_the_trainers_gpu_on_a_bigger_host_too():
    r = _resolve([], gpus=8)  # no --rollout-num-gpus: every process takes GPU 0
    assert r.colocate and r.rollout_on == (0,) and r.transport == "CUDA IPC"
    r = _resolve(["--device", "cuda:3", "--rollout-num-servers", "1"], gpus=8)
    assert r.colocate and r.trainer_on == (3,) and r.rollout_on == (3,)


def test_one_rollout_gpu_on_a_one_gpu_host_colocates_instead_of_landing_on_a_missing_gpu():
    r = _resolve(["--rollout-num-gpus", "1"], gpus=1)
    assert r.colocate and r.chosen and r.placement.rollout_gpus == ((0,),)
    r = _resolve(["--rollout-num-gpus", "1"], gpus=2)  # room for both: kept apart, bytes
    assert not r.colocate and r.placement.rollout_gpus == ((1,),) and r.transport == "gRPC bytes"
    assert r.line().endswith("rollout-0 GPU 1; not colocated; weights over gRPC bytes")


@pytest.mark.parametrize(
    "argv, environ",
    [(["--no-colocate"], {}), ([], {"SLIPSTREAM_COLOCATE": "false"})],
)
def test_an_explicit_no_colocate_wins(argv, environ):
    r = _resolve(argv, gpus=1, environ=environ)
    assert not r.colocate and not r.chosen and r.transport == "gRPC bytes"
    assert "not colocated; weights over gRPC bytes" in r.line()


def test_a_config_file_setting_colocate_counts_as_given(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"cluster": {"colocate": false}}')
    assert "colocate" in given_fields(["--config", str(path)], {})
    assert "colocate" not in given_fields(["--num-rollout", "3"], {})
    assert "colocate" in given_fields(["--colocate"], {})
    assert "rollout_num_servers" in given_fields([], {"SLIPSTREAM_ROLLOUT_NUM_SERVERS": "2"})


def test_several_trainer_ranks_are_not_colocated_by_the_launcher():
    r = _resolve(["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2"], gpus=4)
    assert not r.colocate and r.trainer_on == (0, 1) and r.rollout_on == (2, 3)
    assert "trainer GPUs 0,1 (2 ranks), rollout-0 GPU 2, rollout-1 GPU 3; not colocated" in r.line()


def test_a_placement_the_host_cannot_hold_is_refused():
    with pytest.raises(PlacementError, match="needs GPUs 0,1 .* but 1 is visible"):
        _resolve(["--rollout-num-gpus", "1", "--no-colocate"], gpus=1)


def test_cpu_host_or_device():
    for r in (_resolve([], gpus=0), _resolve(["--device", "cpu"], gpus=2)):
        assert not r.colocate and r.transport == "gRPC bytes" and r.rollout_on == (None, None)
        assert r.line() == (
            "placement: no GPU: trainer and 2 rollout servers on the CPU; not colocated; weights over gRPC bytes"
        )


def test_visible_gpus_counts_device_nodes_narrowed_by_cuda_visible_devices(tmp_path):
    from slipstream.placement import visible_gpus

    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert visible_gpus({}, tmp_path) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}, tmp_path) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,7,1"}, tmp_path) == 1  # CUDA stops at 7
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"}, tmp_path) == 2
    assert visible_gpus({}, tmp_path / "none") == 0


def test_rollout_servers_sharing_one_gpu_are_one_or_four_by_model_size_unless_asked_for(tmp_path):
    r = _resolve([], gpus=1)
    assert r.servers_chosen == 1 and r.placement.num_rollout_servers == 1 and r.rollout_on == (0,)
    assert "one rollout server on the shared GPU" in r.line()
    r = _resolve(["--rollout-num-servers", "3"], gpus=1)
    assert not r.servers_chosen and r.rollout_on == (0, 0, 0)
    assert not _resolve([], gpus=0).servers_chosen  # the CPU keeps --rollout-num-servers

    # The size comes from config.json: the learn_vs_trl H200 preset's 25M shape, and Qwen3-0.6B's.
    small = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64, intermediate_size=1536, vocab_size=20, tie_word_embeddings=True)  # fmt: skip
    qwen3_06b = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
    for name, c in (("small", small), ("qwen3_06b", qwen3_06b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(c))
    assert model_parameters(str(tmp_path / "small")) == 25_176_064  # its matrices (norms left out)
    assert (
        590e6 < model_parameters(str(tmp_path / "qwen3_06b")) < 600e6
    )  # 596M: 0.44B layers + 0.16B embedding
    assert model_parameters(str(tmp_path / "missing")) is None

    def resolve_for(name, argv=()):
        cfg = parse_config(["--hf-checkpoint", str(tmp_path / name), *argv])
        return resolve(cfg, 1, given_fields(list(argv), {}), model_parameters(str(tmp_path / name)))

    r = resolve_for("small")
    assert r.servers_chosen == 4 and r.rollout_on == (0, 0, 0, 0) and r.colocate
    assert "4 rollout servers on the shared GPU (a model under 100M parameters" in r.line()
    assert resolve_for("qwen3_06b").rollout_on == (0,)
    assert resolve_for("small", ["--rollout-num-servers", "2"]).rollout_on == (0, 0)
