"""What runs next in the native engine, as plain functions: admission, groups, aborts, compaction.

The scheduler holds no tensors, so these need no model; `test_engine.py` checks the whole engine
against a full recompute. Last, the native engine satisfies the `Engine` protocol the server types
its seams with.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from slipstream.services.rollout.engine import Engine, Request, Result
from slipstream.services.rollout.engine.scheduler import Scheduler, compaction


def req(rid: str, tokens: list[int], max_new_tokens: int = 4) -> Request:
    return Request(rid, tokens, max_new_tokens)


def test_admission_fills_the_free_slots_in_arrival_order():
    s = Scheduler(max_batch_size=4, max_seq_len=64, max_prefill_tokens=1000)
    for i in range(5):
        s.add(req(f"r{i}", [i + 1, 2, 3]))
    results: list[Result] = []
    admission = s.admit(num_running=1, results=results)
    assert [r.rid for r in admission.batch] == ["r0", "r1", "r2"]  # 1 running + 3 = the batch
    assert [r.rid for r in s.waiting] == ["r3", "r4"] and results == []
    assert s.admit(num_running=4, results=results) is None  # full: nobody joins


def test_same_prompts_form_one_group_led_by_the_first():
    s = Scheduler(max_batch_size=8, max_seq_len=64, max_prefill_tokens=1000)
    a, b = [1, 2, 3], [4, 5]
    for rid, tokens in [("a0", a), ("b0", b), ("a1", a), ("b1", b), ("a2", a)]:
        s.add(req(rid, tokens))
    admission = s.admit(num_running=0, results=[])
    assert [r.rid for r in admission.leaders] == ["a0", "b0"]
    assert [r.rid for r in admission.followers] == ["a1", "b1", "a2"]
    assert admission.leader_of == [0, 1, 0]
    assert admission.longest == 3
    assert [r.rid for r in admission.batch] == ["a0", "b0", "a1", "b1", "a2"]


def test_prefill_budget_counts_distinct_prompts_and_one_always_fits():
    s = Scheduler(max_batch_size=8, max_seq_len=64, max_prefill_tokens=10)
    for rid, tokens in [("a", [1] * 6), ("a'", [1] * 6), ("b", [2] * 4), ("c", [3] * 20)]:
        s.add(req(rid, tokens))
    first = s.admit(num_running=0, results=[])
    # a (6) and its follower fit; b would pad the prefill to 2 x 6 = 12 > 10 tokens.
    assert [r.rid for r in first.batch] == ["a", "a'"]
    assert [r.rid for r in s.admit(num_running=2, results=[]).batch] == ["b"]  # b then c: 2 x 20 > 10
    assert [r.rid for r in s.admit(num_running=3, results=[]).batch] == ["c"]  # alone, over budget


def test_a_request_that_cannot_run_finishes_at_once_as_length():
    s = Scheduler(max_batch_size=4, max_seq_len=5, max_prefill_tokens=1000)
    s.add(req("no-budget", [1, 2], max_new_tokens=0))
    s.add(req("too-long", [1, 2, 3, 4, 5]))
    s.add(req("ok", [1, 2]))
    results: list[Result] = []
    admission = s.admit(num_running=0, results=results)
    assert [(r.rid, r.finish_reason, r.tokens) for r in results] == [
        ("no-budget", "length", []),
        ("too-long", "length", []),
    ]
    assert [r.rid for r in admission.batch] == ["ok"]


def test_abort_takes_waiting_requests_out_of_the_queue():
    s = Scheduler(max_batch_size=4, max_seq_len=64, max_prefill_tokens=1000)
    for rid in ("a", "b", "c"):
        s.add(req(rid, [1]))
    assert s.abort("b") == Result("b", [], [], [], "abort")
    assert s.abort("nope") is None
    assert [r.rid for r in s.abort_all()] == ["a", "c"] and not s.waiting


@pytest.mark.parametrize(
    "num_running, rows, expected",
    [
        (5, [1, 3], (3, [4], [1])),  # 3 was past the new end: only 4 moves, into 1
        (5, [0, 1], (3, [3, 4], [0, 1])),
        (4, [2, 3], (2, [], [])),  # the tail retires: nothing moves
        (3, [0, 1, 2], (0, [], [])),
    ],
)
def test_compaction_keeps_the_running_slots_contiguous(num_running, rows, expected):
    keep, movers, holes = compaction(num_running, rows)
    assert (keep, movers, holes) == expected
    slots = list(range(num_running))
    for src, dst in zip(movers, holes, strict=True):
        slots[dst] = slots[src]
    assert sorted(slots[:keep]) == sorted(set(range(num_running)) - set(rows))


def test_the_native_engine_satisfies_the_engine_protocol():
    from slipstream.models import Qwen3Config, init_model
    from slipstream.services.rollout.engine import NativeEngine

    config = Qwen3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    engine = NativeEngine(init_model(config, seed=0), eos_token_ids=[], max_batch_size=2)
    assert isinstance(engine, Engine)
    assert engine.name == "native" and engine.policy_version == 0 and engine.max_batch_size == 2
    engine.add_request(Request("r", [1, 2, 3], 2, temperature=0.0))
    assert engine.has_work() and engine.step() == [] and engine.num_running == 1
    results = []
    while engine.has_work():  # the result comes back a couple of steps after its last token
        results += engine.step()
    (result,) = results
    assert result.rid == "r" and len(result.tokens) == 2 and engine.num_running == 0


def test_the_engine_protocol_is_declared_without_torch():
    code = (
        "import sys\n"
        "from slipstream.services.rollout.engine import Engine, Request, Result\n"
        "from slipstream.services.rollout.engine.scheduler import Scheduler\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
