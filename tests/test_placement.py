"""Placement arithmetic for slime's flags (pure: no GPU needed)."""

from slipstream.config import parse_config
from slipstream.placement import cuda_visible, plan


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
