"""Hostile input at every decoder, driven by hypothesis: whatever arrives, the decoder either
accepts it or refuses it with its own one-line error (never another exception, never a crash,
never an allocation the input chose), and the valid input still goes through.

Decoders covered: `sample_from_proto`/`check_sample` (any bytes parsed as a Sample), the replay
buffer's stream entries (corrupt payloads dead-lettered, valid ones delivered), `WeightStager`
(corrupt, truncated, reordered, duplicated chunks; mutated manifests; random messages), the
coordinator's `receive_push`, and the reward service's `Score` over real gRPC.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.buffer.replay import PAYLOAD, ReplayBuffer
from slipstream.config import config_from_values
from slipstream.proto import reward_pb2, reward_pb2_grpc, types_pb2
from slipstream.rpc.channel import aio_channel
from slipstream.rpc.convert import SampleError, check_sample, sample_from_proto, sample_to_proto
from slipstream.services.coordinator.weights_relay import PushError, receive_push
from slipstream.services.reward.server import start_reward_server
from slipstream.types import Sample
from slipstream.weights import WeightError, WeightStager, iter_messages, pack

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---- samples ------------------------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
proto_samples = st.builds(
    types_pb2.Sample,
    uid=st.text(max_size=20),
    prompt=st.one_of(st.text(max_size=20), st.just("[{"), st.just('[{"role": 1}]')),
    tokens=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
    response_length=st.integers(-(2**31), 2**31 - 1),
    reward=floats,
    loss_mask=st.lists(st.integers(-5, 5), max_size=12),
    rollout_log_probs=st.lists(floats, max_size=12),
    policy_versions=st.lists(st.integers(-3, 3), max_size=12),
    status=st.integers(-2, 9),
    metadata_json=st.one_of(
        st.text(max_size=20), st.just('{"_reward_dict": 3}'), st.just("[1]"), st.just('{"a": 1}')
    ),
    label=st.text(max_size=5),
)


def _good_sample(n: int = 3) -> types_pb2.Sample:
    return sample_to_proto(
        Sample(
            uid="g/0", group_index=0, index=0, prompt="1+1=", tokens=[1, 2, 3, 4, 5], response_length=n,
            response="2", label="2", reward=1.0, loss_mask=[1] * n, rollout_log_probs=[-0.5] * n,
            policy_versions=[0] * n,
        )
    )  # fmt: skip


@FUZZ
@given(proto_samples)
def test_sample_decoding_accepts_or_refuses_with_one_error(p):
    for check in (lambda: sample_from_proto(p), lambda: check_sample(p, vocab_size=100, max_tokens=8)):
        try:
            check()
        except SampleError as e:
            assert "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_as_a_sample(data):
    p = types_pb2.Sample()
    try:
        p.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's own refusal (DecodeError) is fine here
        return
    try:
        check_sample(p, vocab_size=100)
        sample_from_proto(p)
    except SampleError:
        pass


def test_check_sample_names_the_problem():
    good = _good_sample()
    check_sample(good, vocab_size=6, max_tokens=5)
    cases = {
        "outside the vocabulary": dict(tokens=[1, 2, 3, 4, 99]),
        "response_length": dict(response_length=9),
        "rollout_log_probs": dict(rollout_log_probs=[-0.5, float("nan"), -0.5]),
        "reward is": dict(reward=float("inf")),
        "unknown status": dict(status=42),
    }
    for needle, change in cases.items():
        bad = types_pb2.Sample()
        bad.CopyFrom(good)
        for name, value in change.items():
            if isinstance(value, list):
                getattr(bad, name)[:] = value
            else:
                setattr(bad, name, value)
        with pytest.raises(SampleError, match=needle):
            check_sample(bad, vocab_size=6)
    with pytest.raises(SampleError, match="more than"):
        check_sample(good, max_tokens=4)


# ---- the replay buffer's stream entries ----------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.one_of(st.binary(max_size=64), proto_samples.map(lambda s: s)), max_size=5))
def test_corrupt_stream_entries_are_dead_lettered_and_valid_ones_delivered(redis_url, payloads):
    buffer = ReplayBuffer(redis_url, f"fuzz-{uuid.uuid4().hex[:8]}")
    try:
        good = types_pb2.Group(group_id="ok", samples=[_good_sample()])
        raw = [p if isinstance(p, bytes) else types_pb2.Group(group_id="x", samples=[p]).SerializeToString()
               for p in payloads]  # fmt: skip
        for data in raw:
            buffer.redis.xadd(buffer.keys.groups, {PAYLOAD: data})
        buffer.put_group(good)
        got = buffer.read_groups("t", count=100, block_ms=0)
        dead = buffer.dead_letters(count=100)
        # Everything is accounted for exactly once: delivered, or dead-lettered with a reason.
        assert len(got) + len(dead) == len(raw) + 1
        assert "ok" in [g.group_id for _, g in got]
        assert all(row["reason"] for _, row in dead)
        for _, group in got:  # what is delivered, the trainer can use
            for s in group.samples:
                check_sample(s)
                sample_from_proto(s)
        assert buffer.num_pending() == len(got)  # dead letters were acknowledged
    finally:
        buffer.redis.delete(*[k for k in vars(buffer.keys).values() if isinstance(k, str)])
        buffer.close()


# ---- weights ------------------------------------------------------------------------------------


def _weights():
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(130, 40), "b.bias": torch.randn(7), "c.idx": torch.arange(5)}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    manifest, chunks = pack(sd, 1, "fp8", chunk_bytes=4096)
    return shapes, list(iter_messages(manifest, chunks))


SHAPES, MESSAGES = _weights()


def _stage(messages) -> int:
    stager = WeightStager(SHAPES, current_version=0)
    for m in messages:
        stager.add(m)
    return stager.finish()[0]


def test_the_untouched_stream_stages():
    assert _stage(MESSAGES) == 1


def _mutate_manifest(m: types_pb2.WeightManifest, field: str, value) -> types_pb2.WeightManifest:
    out = types_pb2.WeightManifest()
    out.CopyFrom(m)
    if field.startswith("tensor."):
        entry = out.tensors[value[0] % len(out.tensors)]
        name = field.split(".", 1)[1]
        if name == "shape":
            entry.shape[:] = value[1]
        else:
            setattr(entry, name, value[1])
    else:
        setattr(out, field, value)
    return out


manifest_mutations = st.one_of(
    st.tuples(st.just("total_bytes"), st.integers(-(2**62), 2**62)),
    st.tuples(st.just("chunk_bytes"), st.integers(-(2**62), 2**62)),
    st.tuples(st.just("version"), st.integers(-5, 5)),
    st.tuples(st.just("format"), st.text(max_size=12)),
    st.tuples(st.just("model_fingerprint"), st.text(max_size=12)),
    st.tuples(st.just("tensor.offset"), st.tuples(st.integers(0, 9), st.integers(-(2**62), 2**62))),
    st.tuples(st.just("tensor.nbytes"), st.tuples(st.integers(0, 9), st.integers(-(2**62), 2**62))),
    st.tuples(
        st.just("tensor.dtype"), st.tuples(st.integers(0, 9), st.sampled_from(["int8", "float64", ""]))
    ),
    st.tuples(
        st.just("tensor.shape"),
        st.tuples(st.integers(0, 9), st.lists(st.integers(-3, 2**40), max_size=3)),
    ),
    st.tuples(st.just("tensor.name"), st.tuples(st.integers(0, 9), st.text(max_size=8))),
)


@FUZZ
@given(manifest_mutations)
def test_a_mutated_manifest_is_refused_before_anything_is_allocated(mutation):
    field, value = mutation
    manifest = _mutate_manifest(MESSAGES[0].manifest, field, value)
    if manifest == MESSAGES[0].manifest:
        return
    try:
        _stage([types_pb2.WeightMessage(manifest=manifest), *MESSAGES[1:]])
    except WeightError:
        return
    # Accepted only when the change cannot matter (e.g. a shape/offset it already had).
    assert field.startswith("tensor.") or field == "version"


chunk_edits = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 100), st.integers(0, 10_000)),
        st.tuples(st.just("cut"), st.integers(0, 100), st.integers(0, 10_000)),
        st.tuples(st.just("drop"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("swap"), st.integers(0, 100), st.integers(0, 100)),
        st.tuples(st.just("dup"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("reindex"), st.integers(0, 100), st.integers(-3, 100)),
    ),
    min_size=1,
    max_size=3,
)


def _edit(messages, edits):
    out = list(messages)
    for op, i, j in edits:
        k = 1 + i % (len(out) - 1) if len(out) > 1 else 0
        msg = types_pb2.WeightMessage()
        msg.CopyFrom(out[k])
        if op in ("flip", "cut") and msg.WhichOneof("kind") == "chunk":
            data = bytearray(msg.chunk.data)
            if op == "flip" and data:
                data[j % len(data)] ^= 0x5A
            else:
                data = data[: j % max(len(data), 1)]
            msg.chunk.data = bytes(data)
            out[k] = msg
        elif op == "drop":
            del out[k]
        elif op == "swap":
            m = 1 + j % (len(out) - 1) if len(out) > 1 else 0
            out[k], out[m] = out[m], out[k]
        elif op == "dup":
            out.insert(k, msg)
        elif op == "reindex" and msg.WhichOneof("kind") == "chunk":
            msg.chunk.index = j
            out[k] = msg
    return out


@FUZZ
@given(chunk_edits)
def test_corrupt_truncated_or_reordered_chunks_are_refused(edits):
    edited = _edit(MESSAGES, edits)
    if [m.SerializeToString() for m in edited] == [m.SerializeToString() for m in MESSAGES]:
        return
    with pytest.raises(WeightError):
        _stage(edited)


def test_a_manifest_cannot_make_the_stager_allocate_what_it_claims():
    m = _mutate_manifest(MESSAGES[0].manifest, "total_bytes", 2**40)
    m.chunk_bytes = 2**40
    m.chunk_sha256[:] = ["0" * 64]
    with pytest.raises(WeightError, match="exceeds"):
        _stage([types_pb2.WeightMessage(manifest=m)])


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=4))
def test_random_weight_messages(blobs):
    msgs = []
    for b in blobs:
        m = types_pb2.WeightMessage()
        try:
            m.ParseFromString(b)
        except Exception:  # noqa: BLE001 - not even a message: protobuf refuses it first
            continue
        msgs.append(m)
    with pytest.raises(WeightError):
        _stage(msgs)


@FUZZ
@given(chunk_edits)
def test_the_coordinator_refuses_a_broken_push(edits):
    edited = _edit(MESSAGES, edits)
    if [m.SerializeToString() for m in edited] == [m.SerializeToString() for m in MESSAGES]:
        return

    async def go():
        async def stream():
            for m in edited:
                yield m

        return await receive_push(stream(), current_version=0)

    try:
        stored = asyncio.run(go())
    except PushError:
        return
    # The coordinator checks order and count, not bytes or layout: what it lets through, the stager refuses.
    with pytest.raises(WeightError):
        _stage(stored.messages)


# ---- the reward service, over gRPC ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_the_reward_service_answers_every_hostile_sample_and_keeps_serving():
    # Drawn up front: one server for all batches (a server per hypothesis example is too slow).
    batches = [st.lists(proto_samples, min_size=1, max_size=6).example() for _ in range(15)]

    async def go():
        cfg = config_from_values({"rm_type": "math"})
        service, servicer = await start_reward_server(cfg)
        channel = aio_channel(f"127.0.0.1:{service.port}")
        stub = reward_pb2_grpc.RewardStub(channel)
        try:
            for batch in batches:
                reply = await stub.Score(reward_pb2.ScoreRequest(samples=batch), timeout=10)
                assert len(reply.results) == len(batch)
                for r in reply.results:
                    assert r.failed and r.error or not r.failed
            good = await stub.Score(reward_pb2.ScoreRequest(samples=[_good_sample()]), timeout=10)
            return good.results[0]
        finally:
            await channel.close()
            await service.stop(0)

    result = asyncio.run(go())
    assert not result.failed and result.reward == 1.0


def test_an_oversized_request_is_refused_and_the_service_keeps_serving():
    async def go():
        service, _ = await start_reward_server(config_from_values({"rm_type": "math"}))
        channel = aio_channel(f"127.0.0.1:{service.port}")
        stub = reward_pb2_grpc.RewardStub(channel)
        try:
            huge = types_pb2.Sample(response="9" * (65 * 1024 * 1024))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Score(reward_pb2.ScoreRequest(samples=[huge]), timeout=20)
            after = await stub.Score(reward_pb2.ScoreRequest(samples=[_good_sample()]), timeout=10)
            return err.value.code(), after.results[0].reward
        finally:
            await channel.close()
            await service.stop(0)

    code, reward = asyncio.run(go())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reward == 1.0
