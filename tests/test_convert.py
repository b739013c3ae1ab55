"""Sample <-> proto: every field survives the wire, and the proto mirrors slime's Sample."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from slipstream.proto import types_pb2
from slipstream.rpc.convert import sample_from_proto, sample_to_proto
from slipstream.types import Sample, Status

SLIME_FIELDS = {
    "prompt",
    "tokens",
    "response",
    "reward",
    "loss_mask",
    "status",
    "metadata",
    "rollout_log_probs",
    "rollout_routed_experts",
    "group_index",
    "index",
    "label",
    "response_length",
}


def test_sample_has_slime_fields():
    names = {f.name for f in dataclasses.fields(Sample)}
    assert SLIME_FIELDS <= names
    assert Sample.Status.COMPLETED is Status.COMPLETED  # slime spells it Sample.Status


def _full_sample() -> Sample:
    return Sample(
        group_index=3,
        index=1,
        prompt="2+2=",
        tokens=[5, 6, 7, 8, 9],
        response="4",
        response_length=2,
        label="4",
        reward=1.0,
        loss_mask=[1, 0],
        rollout_log_probs=[-0.5, -1.25],
        rollout_routed_experts=[[1, 2], [3, 4]],
        status=Status.TRUNCATED,
        metadata={"source": "test"},
        uid="p3/1",
        policy_versions=[2, 3],
    )


def test_round_trip_keeps_every_field():
    s = _full_sample()
    wire = sample_to_proto(s).SerializeToString()
    back = sample_from_proto(types_pb2.Sample.FromString(wire))
    assert back == s


def test_dict_reward_and_chat_prompt_survive():
    s = dataclasses.replace(
        _full_sample(), reward={"reward": 0.5, "format": 1.0}, prompt=[{"role": "user", "content": "hi"}]
    )
    back = sample_from_proto(sample_to_proto(s))
    assert back.reward == {"reward": 0.5, "format": 1.0}
    assert back.prompt == [{"role": "user", "content": "hi"}]


@given(
    prompt_len=st.integers(1, 20),
    response=st.lists(
        st.tuples(st.integers(0, 50_000), st.floats(-50, 0, width=32), st.integers(0, 10)), max_size=20
    ),
    status=st.sampled_from(list(Status)),
)
def test_round_trip_property(prompt_len, response, status):
    tokens = list(range(prompt_len)) + [t for t, _, _ in response]
    s = Sample(
        tokens=tokens,
        response_length=len(response),
        status=status,
        uid="u",
        rollout_log_probs=[lp for _, lp, _ in response] or None,
        policy_versions=[v for _, _, v in response] or None,
        loss_mask=[1] * len(response) or None,
        group_index=0,
        index=0,
        reward=0.0,
    )
    back = sample_from_proto(types_pb2.Sample.FromString(sample_to_proto(s).SerializeToString()))
    assert back == s
