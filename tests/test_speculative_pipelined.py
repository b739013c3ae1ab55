"""A speculative step is read one step late too (`speculative.py`, `finishes.py`): the host queues
step t+1 before it knows how many tokens step t kept, so its lengths are upper bounds until the
step's statuses bring the device's back, and a row that finished runs one more step (keeping
nothing) before it retires. Results must not change: each scenario runs on the CPU reading late
and in the synchronous order, as `test_engine_pipelined.py` runs plain decode, and every request's
tokens, versions and finish reason must be equal, log-probs to fp32 noise (the two orders batch
rows differently), and so must the acceptance tallies (a finished row's extra step counts
nothing). Reading late admits a request a step later, so a row's tokens must not depend on its
batch: near the sequence limit a row speculates as anywhere else (a batch once decoded plainly as
a whole when one row was within k of the limit).
"""

import copy

import pytest
import torch
from test_engine_pipelined import (
    Script,
    add,
    assert_requests_ended_as_scripted,
    assert_same,
    dense_model,
    reading_late,
    requests,
    run,
    synchronous,
)

from slipstream.models.draft import init_draft
from slipstream.services.rollout.engine import NativeEngine, Request
from slipstream.services.rollout.engine.graphs import DecodeGraphs

torch.set_num_threads(1)


def engine(model, draft, order, graphed: bool = False, **kw) -> NativeEngine:
    e = order(NativeEngine(copy.deepcopy(model), [], draft=copy.deepcopy(draft), **kw))
    if graphed:  # the step a CUDA graph captures, run eagerly, its batch padded to 2/4/8/16
        e.runner.graphs = DecodeGraphs(e.runner)
        e.runner.graphs.buckets = [b for b in (2, 4, 8, 16) if b < e.max_batch_size] + [e.max_batch_size]
    return e


def both(script: Script, graphed: bool = False, **kw) -> tuple[dict, dict, NativeEngine, NativeEngine]:
    model = dense_model()
    draft = init_draft(model.config, 1, seed=7)
    late_engine = engine(model, draft, reading_late, graphed, **kw)
    sync_engine = engine(model, draft, synchronous, graphed, **kw)
    (late, _), (sync, _) = run(late_engine, script), run(sync_engine, script)
    return late, sync, late_engine, sync_engine


def assert_same_tallies(late: NativeEngine, sync: NativeEngine) -> None:
    a, b = late.speculator, sync.speculator
    assert b.num_verified_rows > 0 and 1.2 < b.acceptance_length < b.num_steps + 1
    assert (a.num_verified_rows, a.num_kept_tokens) == (b.num_verified_rows, b.num_kept_tokens)


@pytest.mark.parametrize("steps", [2, 3, 4])
@pytest.mark.parametrize(
    "graphed, preallocate",
    [(False, False), (False, True), (True, True)],
    ids=["grown", "preallocated", "graphed"],
)
def test_a_tight_batch_returns_what_the_synchronous_order_returns(steps, graphed, preallocate):
    """Three slots for nine requests: admissions wait for retirements (a step later reading late),
    survivors move into holes, rows finish by stop, by max_new_tokens and by the sequence limit,
    speculating up to it."""
    late, sync, late_engine, sync_engine = both(
        {0: [add(requests() + requests("x-"))]}, graphed, max_batch_size=3, max_seq_len=24,
        preallocate=preallocate, speculative_num_steps=steps,
    )  # fmt: skip
    assert_same(late, sync, atol=1e-5)
    assert_same_tallies(late_engine, sync_engine)
    assert_requests_ended_as_scripted(sync)


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_aborts_weights_and_joins_between_steps_return_the_same(graphed):
    """Weights with a draft mid-run, then weights without one (plain decode after a speculative
    step, on the host's bounds), then with one again; aborts of running requests and of ones that
    finished in the last step, requests joining, abort_all with finished results in flight."""
    model = dense_model(seed=1)
    draft = init_draft(model.config, 1, seed=8).state_dict()
    with_draft, without = {**model.state_dict(), **draft}, model.state_dict()
    second = {"b-greedy", "b-g0", "b-stop", "b-edge", "b-one"}
    script: Script = {
        0: [add(requests("a-"))],
        2: [lambda e: [e.abort("a-one"), e.abort("a-nope")]],
        3: [lambda e: e.load_weights(with_draft, version=1) or []],
        5: [lambda e: [e.abort("a-greedy")], add([r for r in requests("b-") if r.rid in second])],
        6: [lambda e: [e.abort("b-stop"), e.abort("b-one")], lambda e: e.load_weights(without, 2) or []],
        8: [lambda e: e.abort_all()],
        9: [lambda e: e.load_weights(with_draft, version=3) or [], add(requests("c-"))],
    }
    late, sync, late_engine, sync_engine = both(
        script, graphed, max_batch_size=16, max_seq_len=24, preallocate=True, speculative_num_steps=3
    )
    assert_same(late, sync, atol=1e-5)
    assert_same_tallies(late_engine, sync_engine)
    assert sync["a-one"].finish_reason == "length" and sync["a-greedy"].finish_reason == "abort"
    assert 0 in sync["a-greedy"].versions and 1 in sync["a-greedy"].versions
    assert any(2 in r.versions for r in sync.values()) and any(3 in r.versions for r in sync.values())
    assert all(r.finish_reason != "abort" for rid, r in sync.items() if rid.startswith("c-"))


def test_the_host_lengths_are_bounds_until_the_statuses_come_back():
    """Read late, after each step the host's length of a running row is at most k above the
    device's (it added k + 1, the step kept 1..k+1) and never below it. The finished row runs one
    more step, which counts nothing in the tallies."""
    model = dense_model()
    e = engine(model, init_draft(model.config, 1, seed=7), reading_late, speculative_num_steps=3)
    e.add_request(Request("r", [1, 2, 3], 40, seed=0))
    slots, overshoot, results = e.runner.slots, set(), []
    while not results:
        results = e.step()
        if e.num_running:
            overshoot.add(int(slots.length[0] - slots.dev_ints[0, 0]))
    assert overshoot <= {0, 1, 2, 3} and overshoot - {0}, overshoot
    assert len(results[0].tokens) == 40 and not e.has_work()
    # prefill, the verify steps, the finished row's extra step, then its outputs' read
    assert e.speculator.num_verify_steps == e.speculator.num_verified_rows + 1


def test_a_rows_tokens_do_not_depend_on_its_batch_near_the_sequence_limit():
    """A request alone, and beside one that reaches the sequence limit while it runs: the same
    tokens (with the batch decoding plainly whenever one row was within k of the limit, they were
    not), in either order."""
    model = dense_model()
    draft = init_draft(model.config, 1, seed=7)
    alone = Request("r", [1, 2, 3], 16, seed=5)
    edge = Request("edge", [(7 * i + 1) % 64 for i in range(20)], 30, seed=6)  # ends at max_seq_len
    for order in (reading_late, synchronous):
        e = engine(model, draft, order, max_seq_len=32, speculative_num_steps=3)
        (want,) = e.generate([copy.deepcopy(alone)])
        e = engine(model, draft, order, max_seq_len=32, speculative_num_steps=3)
        got, beside = e.generate([copy.deepcopy(alone), edge])
        assert beside.finish_reason == "length" and len(beside.tokens) == 32 - 20
        assert got.tokens == want.tokens and got.versions == want.versions
        torch.testing.assert_close(
            torch.tensor(got.log_probs), torch.tensor(want.log_probs), atol=1e-5, rtol=0
        )
