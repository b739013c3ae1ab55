"""The decode step a CUDA graph captures (`graphs.py`) is the engine's whole step: it reads its
inputs from the slots' device tables, writes the sampled tokens, log-probs and versions, moves the
lengths on and computes each row's status inside the graph, and pads the batch up to its bucket
with rows that must not touch a live sequence. On the CPU the same step runs eagerly
(`DecodeGraphs` without capture), so its logic is tested here against the plain engine: stops,
both length limits, truncated sampling, groups, admissions into padded buckets, compaction,
aborts, weight versions and MoE routing record, reading finishes late and at once. The GPU test
runs the captured graphs against the eager engine, with a stop-id table that widens after
capture (the graphs that read the old table must be dropped).
"""

import copy

import pytest
import torch
from test_engine_pipelined import (
    Script,
    add,
    assert_same,
    dense_model,
    moe_model,
    reading_late,
    requests,
    run,
    synchronous,
)

from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.rollout.engine.graphs import DecodeGraphs

torch.set_num_threads(1)


def graphed(engine: NativeEngine) -> NativeEngine:
    """`engine` decoding through the graph's step (run eagerly off CUDA)."""
    engine.runner.graphs = DecodeGraphs(engine.runner)
    return engine


def events(new_weights: dict[str, torch.Tensor]) -> Script:
    second = {"b-greedy", "b-g0", "b-stop", "b-edge", "b-one"}
    return {
        0: [add(requests("a-"))],
        2: [lambda e: [e.abort("a-one")]],
        3: [lambda e: e.load_weights(new_weights, version=1) or []],
        5: [lambda e: [e.abort("a-greedy")], add([r for r in requests("b-") if r.rid in second])],
        6: [lambda e: [e.abort("b-stop"), e.abort("b-one")]],
        8: [lambda e: e.abort_all()],
        9: [add(requests("c-"))],
    }


@pytest.mark.parametrize("order", [reading_late, synchronous], ids=["late", "sync"])
@pytest.mark.parametrize("true_on_policy", [True, False], ids=["invariant", "default"])
@pytest.mark.parametrize(
    "make, batch, scenario",
    [(dense_model, 5, "tight"), (dense_model, 16, "events"), (moe_model, 5, "tight")],
    ids=["tight", "events", "moe"],
)
def test_the_graph_step_returns_what_the_plain_step_returns(make, batch, scenario, true_on_policy, order):
    """Buckets 1, 2, 4, 5 (or up to 16): three or six running rows decode in a bucket of four or
    eight, so padding rows run beside live ones every step."""
    model = make()
    script = {0: [add(requests())]} if scenario == "tight" else events(dense_model(seed=1).state_dict())
    kw = dict(max_batch_size=batch, max_seq_len=24, preallocate=True, true_on_policy=true_on_policy)
    engine = graphed(order(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)))
    got, _ = run(engine, script)
    want, _ = run(synchronous(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)), script)
    assert engine.runner.graphs is not None and engine.runner.graphs.buckets[:3] == [1, 2, 4]
    assert_same(got, want, atol=0 if true_on_policy else 1e-5)
    assert want.keys() == got.keys() and any(r.finish_reason == "stop" for r in want.values())
    if scenario == "events":
        assert want["a-greedy"].versions == [0, 0, 0, 1, 1]


def test_padding_rows_leave_the_live_rows_and_their_own_lengths_alone():
    """One row in a bucket of two: the padding slot's device length stays, its status is not read,
    and the live row's device and host lengths move together."""
    engine = graphed(NativeEngine(dense_model(), eos_token_ids=[], max_batch_size=4, preallocate=True))
    engine.runner.graphs.buckets = [2, 4]  # force padding at one running row
    engine.add_request(Request("r", [1, 2, 3], 6, seed=0))
    engine.step()
    slots = engine.runner.slots
    slots.dev_ints[0, 1] = 7  # a free slot's stale length
    for _ in range(3):
        engine.step()
    assert slots.dev_ints[0, 1] == 7
    assert torch.equal(slots.dev_ints[0, :1], slots.length[:1]) and int(slots.length[0]) == 3 + 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_return_what_the_eager_engine_returns():
    """The real graphs against the engine without them, in one order (late); then requests with
    more stop ids than the table holds arrive after capture: the graphs are captured again."""
    model = dense_model().cuda()
    many_stops = [
        Request(f"s{i}", [3, 1 + i, 4], 10, seed=i, stop_token_ids=[5, 17, 33, 40, 41, 42, 43])
        for i in range(3)
    ]
    script: Script = {0: [add(requests())], 4: [add(many_stops)]}
    kw = dict(max_batch_size=16, max_seq_len=24)
    engine = NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)
    got, _ = run(engine, script)
    want, _ = run(NativeEngine(copy.deepcopy(model), eos_token_ids=[], cuda_graphs=False, **kw), script)
    assert engine.graphs is not None and engine.graphs.graphs
    assert (
        engine.runner.slots.dev_stop_ids.shape[1] == 7
        and engine.graphs._generation == engine.runner.slots.generation
    )
    assert_same(got, want, atol=1e-4)


@pytest.mark.parametrize("true_on_policy", [True, False], ids=["invariant", "default"])
def test_warming_up_every_bucket_changes_nothing(true_on_policy):
    """`warm_up` runs a group of two through prefill, decode and retire, then every batch bucket's
    step (off CUDA: eagerly, what a capture runs first) with all rows padding: the run after it
    returns what an engine that never warmed up returns, bit for bit (its request without a seed
    included: the seeds drawn for prefills are put back)."""
    model = dense_model()
    kw = dict(max_batch_size=16, max_seq_len=24, preallocate=True, true_on_policy=true_on_policy)
    script = events(dense_model(seed=1).state_dict())
    engine = graphed(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw))
    assert engine.warm_up() == 0 and engine.runner.num_prefill_tokens == 0  # nothing captured off CUDA
    slots = engine.runner.slots
    slots.dev_ints[0, :] = 5  # stale lengths in the free slots must stay
    before = slots.dev_ints.clone(), slots.last_token.clone()
    engine.runner.graphs.warm_up()  # every bucket's step again
    assert torch.equal(slots.dev_ints, before[0]) and torch.equal(slots.last_token, before[1])
    got, _ = run(engine, script)
    want, _ = run(graphed(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)), script)
    assert_same(got, want, atol=0)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.add_request(Request("busy", [1, 2], 4, seed=0))
        engine.step()
        engine.warm_up()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_captured_before_any_request_return_what_the_eager_engine_returns():
    """The rollout server's start-up capture: every batch bucket at the first KV bucket, then a
    run that replays them (and captures the rest lazily) against the engine without graphs."""
    model = dense_model().cuda()
    kw = dict(max_batch_size=16, max_seq_len=24)
    engine = NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)
    assert engine.warm_up() == len(engine.graphs.buckets) == len(engine.graphs.graphs)
    assert engine.warm_up() == len(engine.graphs.buckets)  # nothing new to capture
    script = events(dense_model(seed=1).cuda().state_dict())
    got, _ = run(engine, script)
    want, _ = run(NativeEngine(copy.deepcopy(model), eos_token_ids=[], cuda_graphs=False, **kw), script)
    assert_same(got, want, atol=1e-4)
