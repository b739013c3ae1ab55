"""slime's reward knobs: the deepscaler/dapo/f1 rules, --reward-key, --group-rm and the reward
post-process hook, each through the real reward service over gRPC (test_reward.py's helpers)."""

from __future__ import annotations

import pytest
from test_reward import _Handler, http_url, sample, score  # noqa: F401 - http_url is a fixture

from slipstream.config import config_from_values
from slipstream.services.reward import RewardConfigError
from slipstream.services.reward.rules import dapo_reward, deepscaler_reward, f1_reward
from slipstream.services.reward.server import start_reward_server
from slipstream.types import Sample


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("let me think</think>so \\boxed{3/4}", "0.75", 1.0),
        ("<think>x</think> \\boxed{5}", "4", 0.0),
        ("\\boxed{4}", "4", 0.0),  # no reasoning end: not graded
        ("</think> the answer is 4", "4", 0.0),  # no boxed answer
        ("###Response \\boxed{x+1}", "1+x", 1.0),
    ],
)
def test_deepscaler(response, label, want):
    assert deepscaler_reward(response, label) == want


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("work...\nAnswer: 1,000", "1000", 1.0),
        ("Answer: $\\frac{1}{2}$", "\\dfrac{1}{2}", 1.0),
        ("Answer: 5", "6", -1.0),
        ("no marker 6", "6", -1.0),
        ("Answer: 6" + " filler" * 60, "6", -1.0),  # outside the last 300 characters
        ("Answer: 7\nthen Answer: 6", "6", 1.0),  # the last one counts
    ],
)
def test_dapo(response, label, want):
    assert dapo_reward(response, label) == want


def test_f1():
    assert f1_reward("The cat sat", "a cat sat down") == pytest.approx(0.8)
    assert f1_reward("Paris!", "paris") == 1.0
    assert f1_reward("yes", "no") == 0.0
    assert f1_reward("dog", "cat") == 0.0
    assert f1_reward("Paris", ["London", "paris"]) == 1.0
    with pytest.raises(ValueError, match="no label"):
        f1_reward("x", "")


def test_rules_through_the_service():
    got = score({"rm_type": "dapo"}, [sample(0, "Answer: 4"), sample(1, "Answer: 5")])
    assert [r.reward for r in got] == [1.0, -1.0]
    got = score({"rm_type": "f1"}, [sample(0, "4"), sample(1, "four")])
    assert [r.reward for r in got] == [1.0, 0.0]
    got = score({"rm_type": "deepscaler"}, [sample(0, "</think>\\boxed{4}")])
    assert got[0].reward == 1.0


REWARDS = """
import asyncio
def parts(args, sample):
    return {"acc": 1.0 if sample.response == sample.label else 0.0, "fmt": 0.5}
async def group(args, samples):
    await asyncio.sleep(0)
    assert len(samples) == args.n_samples_per_prompt
    right = [s.response == s.label for s in samples]
    return [1.0 / sum(right) if r else 0.0 for r in right]  # share one point among the right ones
def group_wrong_length(args, samples):
    return [1.0]
def center(args, samples):
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards)
    return rewards, [r - mean for r in rewards]  # slime's (raw, processed)
def boom(args, samples):
    raise RuntimeError("post-process broke")
"""


def test_reward_key_picks_the_dict_entry(tmp_path, http_url):  # noqa: F811
    path = tmp_path / "r.py"
    path.write_text(REWARDS)
    samples = [sample(0, "4"), sample(1, "5")]
    assert [r.reward for r in score({"custom_rm_path": f"{path}:parts", "reward_key": "acc"}, samples)] == [
        1.0,
        0.0,
    ]
    assert [r.reward for r in score({"custom_rm_path": f"{path}:parts", "reward_key": "fmt"}, samples)] == [
        0.5,
        0.5,
    ]
    (missing,) = score({"custom_rm_path": f"{path}:parts"}, samples[:1])  # default key "reward"
    assert missing.failed and "'reward'" in missing.error
    # a remote endpoint's object reply: {"reward": 0.25, "prompt_seen": ...}
    (remote,) = score({"rm_url": f"{http_url}/object", "reward_key": "prompt_seen"}, samples[:1])
    assert remote.failed and "not a finite number" in remote.error  # the key was read
    # the trainer side reads the same flag through the flat namespace
    args = config_from_values({"reward_key": "acc"}).as_namespace()
    assert Sample(prompt="p", reward={"acc": 0.75, "reward": 0.0}).get_reward_value(args) == 0.75


def test_group_rm_scores_the_group_in_one_call(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(REWARDS)
    group = [sample(i, r) for i, r in enumerate(["4", "4", "3", "4"])]
    got = score({"custom_rm_path": f"{path}:group", "group_rm": True, "n_samples_per_prompt": 4}, group)
    assert [r.reward for r in got] == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    bad = score({"custom_rm_path": f"{path}:group_wrong_length", "group_rm": True}, group[:2])
    assert all(r.failed and "returned 1 rewards for 2 samples" in r.error for r in bad)
    # two groups in one request are two calls
    two = [types_sample(i, "4", g) for i, g in enumerate([0, 0, 1, 1, 1])]
    got = score({"custom_rm_path": f"{path}:group", "group_rm": True, "n_samples_per_prompt": 2}, two)
    assert [r.failed for r in got] == [False, False, True, True, True]  # group 1 has 3, not 2


def types_sample(i: int, response: str, group: int):
    s = sample(i, response)
    s.group_index = group
    return s


def test_post_process_hook(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(REWARDS)
    group = [sample(0, "4"), sample(1, "5"), sample(2, "4"), sample(3, "4", label=None)]
    got = score({"rm_type": "exact", "custom_reward_post_process_path": f"{path}:center"}, group)
    assert [r.reward for r in got[:3]] == pytest.approx([1 / 3, -2 / 3, 1 / 3])  # over the scored ones
    assert got[3].failed
    got = score({"rm_type": "exact", "custom_reward_post_process_path": f"{path}:boom"}, group[:2])
    assert all(r.failed and "post-process broke" in r.error for r in got)


def test_post_process_path_that_does_not_load_is_one_line(tmp_path):
    import asyncio

    cfg = config_from_values({"port": 0, "custom_reward_post_process_path": f"{tmp_path}/nope.py:f"})
    with pytest.raises(RewardConfigError, match="^--custom-reward-post-process-path .*no such file"):
        asyncio.run(start_reward_server(cfg))
