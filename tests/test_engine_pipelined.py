"""A GPU engine reads each step's finished flags one step late (`finishes.py`): a finished row decodes
one token more before it retires, and admission may wait a step for its slot. Results must not
change: each scenario runs twice on the CPU, reading late (`read_late`, which the CPU engine leaves
off by default: there it only costs) and in the synchronous order (every step's finishes read and
retired before it returns), and every request's tokens, log-probs, versions, finish reason and
routed experts must be equal. Under --true-on-policy-mode the kernels are batch-invariant, so a
row's numbers do not depend on its batch and the two runs agree bit for bit; the default kernels'
log-probs may move in the last bit with the batch (as they always could: a request's batch was
never fixed), so there they are compared to fp32 noise. The GPU test runs the real thing: pinned
copies, events and CUDA graphs.
"""

import copy
from collections.abc import Callable

import pytest
import torch
from family_fixtures import shape

from slipstream.models import ModelConfig, Qwen3Config, init_model
from slipstream.services.rollout.engine import NativeEngine, Request, Result

torch.set_num_threads(1)
VOCAB = 64
STOPS = [5, 17, 33, 40]


def dense_model(seed: int = 0):
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
    )  # fmt: skip
    model = init_model(config, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked, but sampling still wanders into the stop tokens
    return model


def moe_model(seed: int = 0):
    return init_model(ModelConfig(**shape("qwen3_moe"), model_type="qwen3_moe"), seed=seed)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(7 * i + 3 * offset + 1) % VOCAB for i in range(n)]


Script = dict[int, list[Callable[[NativeEngine], list[Result | None]]]]  # after step i: actions


def run(engine: NativeEngine, script: Script) -> tuple[dict[str, Result], list[int]]:
    """Drive `engine` through `script` until it is idle: every result by request id, and the step
    (1-based) each one came back in (0: from an action)."""
    results: dict[str, Result] = {}
    came_back: dict[str, int] = {}

    def take(batch: list[Result | None], step: int) -> None:
        for r in batch:
            if r is not None:
                assert r.rid not in results, f"{r.rid} came back twice"
                results[r.rid], came_back[r.rid] = r, step

    step = 0
    while True:
        for action in script.get(step, []):
            take(action(engine), 0)
        if not engine.has_work() and step >= max(script, default=0):
            return results, came_back
        step += 1
        take(engine.step(), step)


def reading_late(engine: NativeEngine) -> NativeEngine:
    engine.read_late = True  # what a GPU engine does (the CPU's default reads at once)
    return engine


def synchronous(engine: NativeEngine) -> NativeEngine:
    engine.read_late = False  # each step's finishes read and retired before it returns
    return engine


def assert_same(late: dict[str, Result], sync: dict[str, Result], atol: float = 0.0) -> None:
    """The same results by request id; log-probs bit for bit (atol 0) or to `atol`."""
    assert late.keys() == sync.keys()
    for rid, want in sync.items():
        got = late[rid]
        assert got.tokens == want.tokens and got.versions == want.versions, rid
        assert got.finish_reason == want.finish_reason, rid
        if atol == 0:
            assert got.log_probs == want.log_probs, rid
        else:
            torch.testing.assert_close(
                torch.tensor(got.log_probs), torch.tensor(want.log_probs), atol=atol, rtol=0
            )
        if want.routed_experts is None:
            assert got.routed_experts is None
        else:
            assert torch.equal(got.routed_experts, want.routed_experts), rid


def requests(tag: str = "") -> list[Request]:
    """Stops, both length limits, greedy and truncated sampling, a group, a request without a seed."""
    group = [Request(f"{tag}g{i}", prompt(7, 9), 12, seed=50 + i, stop_token_ids=STOPS) for i in range(3)]
    return [
        Request(f"{tag}greedy", prompt(5), 9, temperature=0.0),
        group[0],
        Request(f"{tag}stop", prompt(4, 1), 20, seed=1, stop_token_ids=STOPS),
        Request(f"{tag}edge", prompt(20, 2), 30, seed=2),  # runs into max_seq_len
        *group[1:],
        Request(f"{tag}topk", prompt(6, 3), 8, top_k=3, top_p=0.9, seed=3, stop_token_ids=STOPS),
        Request(f"{tag}one", prompt(3, 4), 1, seed=4),  # finishes at its first token (prefill)
        Request(f"{tag}noseed", prompt(8, 5), 6, stop_token_ids=STOPS),
        Request(f"{tag}full", prompt(24, 6), 5),  # its prompt fills the sequence: refused, "length"
    ]


def assert_requests_ended_as_scripted(results: dict[str, Result]) -> None:
    """`requests()` at max_seq_len 24: how its rows must end, whatever order they ran in."""
    reasons = {rid: r.finish_reason for rid, r in results.items()}
    assert reasons["edge"] == "length" and len(results["edge"].tokens) == 24 - 20
    assert "stop" in reasons.values() and reasons["one"] == "length" and results["full"].tokens == []
    assert len({tuple(results[f"g{i}"].tokens) for i in range(3)}) > 1


def both(make, script: Script, **kw) -> tuple[dict[str, Result], dict[str, Result], dict[str, int]]:
    """The results of `script` on the engine as it runs and in the synchronous order, and the step
    each came back in as the engine runs."""
    model = make()
    late, came_back = run(reading_late(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)), script)
    sync, _ = run(synchronous(NativeEngine(copy.deepcopy(model), eos_token_ids=[], **kw)), script)
    return late, sync, came_back


def add(reqs: list[Request]) -> Callable[[NativeEngine], list[Result | None]]:
    def action(engine: NativeEngine) -> list[Result | None]:
        for req in reqs:
            engine.add_request(req)
        return []

    return action


@pytest.mark.parametrize("true_on_policy", [True, False], ids=["invariant", "default"])
@pytest.mark.parametrize("preallocate", [True, False], ids=["preallocated", "grown"])
def test_a_tight_batch_returns_what_the_synchronous_order_returns(true_on_policy, preallocate):
    """Three slots for nine requests: admissions wait for retirements, survivors move into holes,
    rows finish by stop, by max_new_tokens and by the sequence limit (whose extra token lies past
    a preallocated cache's last position)."""
    late, sync, _ = both(
        dense_model, {0: [add(requests())]}, max_batch_size=3, max_seq_len=24, preallocate=preallocate,
        true_on_policy=true_on_policy,
    )  # fmt: skip
    assert_same(late, sync, atol=0 if true_on_policy else 1e-5)
    assert_requests_ended_as_scripted(sync)


@pytest.mark.parametrize("true_on_policy", [True, False], ids=["invariant", "default"])
def test_aborts_weights_and_joins_between_steps_return_the_same(true_on_policy):
    """A weights version mid-run, an abort of a running request, an abort of one that finished in
    the last step (late, its finished result comes back from `abort`), requests joining, abort_all
    with finished results in flight, and a second wave after it."""
    new_weights = dense_model(seed=1).state_dict()
    second = {"b-greedy", "b-g0", "b-stop", "b-edge", "b-one"}
    script: Script = {
        0: [add(requests("a-"))],
        2: [lambda e: [e.abort("a-one"), e.abort("a-nope")]],  # finished at step 1, already back or not
        3: [lambda e: e.load_weights(new_weights, version=1) or []],  # load_weights returns None
        5: [lambda e: [e.abort("a-greedy")], add([r for r in requests("b-") if r.rid in second])],
        6: [lambda e: [e.abort("b-stop"), e.abort("b-one")]],  # b-one finished in step 6 itself
        8: [lambda e: e.abort_all()],
        9: [add(requests("c-"))],
    }
    late, sync, came_back = both(
        dense_model, script, max_batch_size=16, max_seq_len=24, true_on_policy=true_on_policy
    )
    assert_same(late, sync, atol=0 if true_on_policy else 1e-5)
    # Both finished before their abort, which returned their finished results (0: from an action).
    assert sync["a-one"].finish_reason == sync["b-one"].finish_reason == "length"
    assert came_back["a-one"] == came_back["b-one"] == 0
    assert sync["a-greedy"].finish_reason == "abort" and len(sync["a-greedy"].tokens) == 5
    assert sync["a-greedy"].versions == [0, 0, 0, 1, 1]
    assert sync["b-stop"].finish_reason == "abort" and len(sync["b-stop"].tokens) == 1
    assert any(r.finish_reason == "abort" and r.tokens for rid, r in sync.items() if rid.startswith("b-"))
    assert all(r.finish_reason != "abort" for rid, r in sync.items() if rid.startswith("c-"))


@pytest.mark.parametrize("true_on_policy", [True, False], ids=["invariant", "default"])
def test_moe_routed_experts_come_back_the_same(true_on_policy):
    late, sync, _ = both(
        moe_model, {0: [add(requests())]}, max_batch_size=3, max_seq_len=24, true_on_policy=true_on_policy
    )
    assert_same(late, sync, atol=0 if true_on_policy else 1e-5)
    assert all(r.routed_experts is not None for r in sync.values() if r.tokens)


def test_a_finish_is_read_one_step_late_and_its_extra_token_dropped():
    """The engine never waits for a step's finishes: a request's result comes back two steps after
    its last token (its finish is read after the next step is queued, its outputs a step after
    that), and the token it decoded meanwhile is not in it."""
    script: Script = {0: [add([Request("r", prompt(5), 3, temperature=0.0)])]}
    late, came_back = run(reading_late(NativeEngine(dense_model(), eos_token_ids=[])), script)
    sync, sync_came_back = run(synchronous(NativeEngine(dense_model(), eos_token_ids=[])), script)
    assert sync_came_back["r"] == 3 and came_back["r"] == 5
    assert late["r"].tokens == sync["r"].tokens and len(late["r"].tokens) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scenario", ["tight", "events"])
def test_on_cuda_graphs_the_late_reads_return_the_same(scenario):
    """On a GPU the reads are really late (pinned copies and events; decode replayed from CUDA
    graphs, a finished row's extra token at the preallocated cache's last position). The two
    orders batch rows differently and cuBLAS picks kernels by batch, so log-probs agree to 1e-4."""
    new_weights = dense_model(seed=1).state_dict()
    script: Script = {0: [add(requests())]}
    batch = 3  # admissions wait for retirements
    if scenario == "events":  # every request admitted as it comes, in both orders
        batch = 16
        script |= {
            3: [lambda e: e.load_weights(new_weights, version=1) or []],
            5: [lambda e: [e.abort("greedy")], add(requests("b-")[:5])],
            8: [lambda e: e.abort_all()],
            9: [add(requests("c-"))],
        }
    engines = [
        make(NativeEngine(dense_model().cuda(), eos_token_ids=[], max_batch_size=batch, max_seq_len=24))
        for make in (lambda e: e, synchronous)
    ]
    (late, _), (sync, _) = (run(engine, script) for engine in engines)
    assert engines[0].read_late, "a GPU engine reads late by default"
    assert all(engine.graphs is not None and engine.graphs.graphs for engine in engines)
    assert_same(late, sync, atol=1e-4)
    assert sync["edge"].finish_reason == "length" and len(sync["edge"].tokens) == 24 - 20
