"""Routed experts on the wire: engine record -> packed `Sample.routed_experts` -> slime's lists.

The rollout server's sample assembly packs what the engine recorded (one byte an id up to 256
experts, two beyond), a continued partial rollout keeps its earlier segments' positions and
appends the rest, and `convert` turns the packed form into `Sample.rollout_routed_experts`
([len(tokens) - 1][moe_layers * top_k]) and back. The engine runs a tiny Qwen3-MoE on the CPU.
"""

import pytest
import torch
from family_fixtures import MOE, VOCAB, save_hf_model

from slipstream.models import Routing, load_model
from slipstream.proto import types_pb2
from slipstream.rpc.convert import SampleError, check_sample, sample_from_proto, sample_to_proto
from slipstream.services.rollout.engine import NativeEngine
from slipstream.services.rollout.samples import finish_sample, make_request
from slipstream.types import Sample

torch.set_num_threads(1)
WIDTH = 2 * MOE["num_experts_per_tok"]  # two MoE layers x top-2


class Tokenizer:
    eos_token_id = None

    def decode(self, token_ids, skip_special_tokens=False):
        return " ".join(map(str, token_ids))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    save_hf_model("qwen3_moe", path, seed=11, tie_word_embeddings=False)
    return load_model(path)


@torch.no_grad()
def test_partial_rollout_segments_append_and_match_a_full_forward(model):
    prompt = [(7 * i + 2) % VOCAB for i in range(11)]
    sample = types_pb2.Sample(uid="p/0", tokens=prompt)
    engine = NativeEngine(model, eos_token_ids=[])
    for max_new in (5, 4):  # two segments: the second sees prompt + first response as its prompt
        request = make_request("r", sample, types_pb2.SamplingParams(max_new_tokens=max_new), 0)
        engine.add_request(request)
        engine.step()  # prefill + first token
        engine.step()  # one decode step
        (result,) = engine.abort_all()  # a partial result, as a weight update's abort gives
        first_ids = sample.routed_experts.ids
        sample = finish_sample(sample, result, Tokenizer())
        assert sample.routed_experts.ids.startswith(first_ids)
    assert len(sample.tokens) == 11 + 2 + 2 and sample.response_length == 4
    check_sample(sample, vocab_size=VOCAB)
    packed = sample.routed_experts
    assert packed.dtype == types_pb2.EXPERT_ID_DTYPE_UINT8 and packed.experts_per_token == WIDTH
    assert len(packed.ids) == (len(sample.tokens) - 1) * WIDTH  # one byte an id, nothing else

    rows = sample_from_proto(sample).rollout_routed_experts
    routing = Routing()
    model(torch.tensor([list(sample.tokens)[:-1]]), routing=routing)
    assert rows == routing.stacked()[0].reshape(len(sample.tokens) - 1, WIDTH).tolist()


def test_python_sample_round_trips_packed_uint8_and_int16():
    small = Sample(
        tokens=[1, 2, 3, 4], response_length=2, reward=0.0, rollout_routed_experts=[[0, 255], [7, 8], [1, 2]]
    )
    p = sample_to_proto(small)
    assert p.routed_experts.dtype == types_pb2.EXPERT_ID_DTYPE_UINT8 and len(p.routed_experts.ids) == 6
    assert len(p.rollout_routed_experts) == 0  # the old repeated field is read, never written
    assert sample_from_proto(types_pb2.Sample.FromString(p.SerializeToString())) == small
    big = Sample(
        tokens=[1, 2, 3], response_length=1, reward=0.0, rollout_routed_experts=[[300, 0], [32767, 5]]
    )
    p = sample_to_proto(big)
    assert p.routed_experts.dtype == types_pb2.EXPERT_ID_DTYPE_INT16 and len(p.routed_experts.ids) == 8
    assert sample_from_proto(p) == big
    legacy = types_pb2.Sample(tokens=[1, 2], rollout_routed_experts=[types_pb2.RoutedExperts(experts=[3, 4])])
    assert sample_from_proto(legacy).rollout_routed_experts == [[3, 4]]


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (dict(ids=b"\x01\x02\x03", dtype=1, experts_per_token=2), "not whole rows"),
        (dict(ids=b"\x01\x02", dtype=0, experts_per_token=2), "not whole rows"),
        (dict(ids=bytes(8), dtype=1, experts_per_token=2), "more positions than its 4 tokens"),
        (dict(ids=b"\xff\xff\x00\x00", dtype=2, experts_per_token=2), "negative expert id"),
    ],
)
def test_malformed_routing_is_refused(packed, message):
    p = types_pb2.Sample(tokens=[1, 2, 3, 4], routed_experts=types_pb2.PackedRoutedExperts(**packed))
    with pytest.raises(SampleError, match=message):
        check_sample(p)
