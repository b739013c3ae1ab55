"""Multi-turn rollouts (`--custom-generate-function-path`), in process: a real native engine on its
worker thread, the real SGLang-compatible HTTP API on a real port, and slime-style generate
functions that post to it (or use the in-process client). What must hold: tool tokens carry
loss_mask 0 and log-prob 0, versions are filled per token, the turn limit and the wall-clock
budget bound a runaway function, a coordinator abort and an abort-mode swap stop a trajectory
mid-turn, and the partial continues under new weights with versions showing both.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import pytest
from machine_speed import scaled

from mesh_fixtures import build_tiny_model
from slipstream.models.hf import load_model, load_tokenizer
from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.rpc.convert import sample_from_proto
from slipstream.services.rollout.custom_generate import (
    CustomGenerateConfig,
    CustomGenerator,
    GenerateFunctionError,
    engine_client,
    load_generate_function,
)
from slipstream.services.rollout.engine import NativeEngine
from slipstream.services.rollout.http_api import HttpApi, start_http
from slipstream.services.rollout.worker import EngineWorker
from slipstream.types import Sample

pytestmark = pytest.mark.timeout(120)
TOOL_TEXT = "(1+2)"
turn_two_started: asyncio.Event | None = None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("multi_turn") / "model", max_position_embeddings=512)


async def _post(args, payload):
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    async with aiohttp.ClientSession() as session, session.post(url, json=payload) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def _append(sample: Sample, ids, log_probs, versions, trained: bool) -> None:
    sample.tokens = list(sample.tokens) + list(ids)
    sample.response_length += len(ids)
    sample.loss_mask = (sample.loss_mask or []) + [int(trained)] * len(ids)
    sample.rollout_log_probs = (sample.rollout_log_probs or []) + list(log_probs)
    sample.policy_versions = (sample.policy_versions or []) + list(versions)


async def two_turns_over_http(args, sample: Sample, sampling_params: dict) -> Sample:
    """slime's shape: model turn, tool text, model turn (a long one), all through POST /generate.
    Continues a partial sample from where it stopped (its tokens hold the response so far)."""
    tok = load_tokenizer(args.hf_checkpoint)
    tool = tok(TOOL_TEXT, add_special_tokens=False)["input_ids"]
    done = sample.metadata.get("turns_done", 0)  # a continued partial says where it stopped
    while done < 2:
        long_turn = done == 1
        if long_turn and turn_two_started is not None:
            turn_two_started.set()
        params = {**sampling_params, "max_new_tokens": 200 if long_turn else 3}
        out = await _post(
            args, {"input_ids": sample.tokens, "sampling_params": params, "return_logprob": True}
        )
        meta = out["meta_info"]
        lps = [lp for lp, _, _ in meta["output_token_logprobs"]]
        _append(sample, out["output_ids"], lps, meta["output_token_versions"], trained=True)
        if meta["finish_reason"]["type"] == "abort":
            sample.metadata["turns_done"] = done
            sample.status = Sample.Status.ABORTED
            return sample
        done += 1
        if done == 1:
            last = sample.policy_versions[-1]
            _append(sample, tool, [0.0] * len(tool), [last] * len(tool), trained=False)
    sample.metadata["turns_done"] = done
    sample.status = Sample.Status.COMPLETED
    return sample


async def tool_loop_in_process(args, sample: Sample, sampling_params: dict) -> Sample:
    """A runaway agent: one-token turns and a tool token after each, until the engine says stop."""
    tok = load_tokenizer(args.hf_checkpoint)
    tool = tok("+", add_special_tokens=False)["input_ids"]
    client = engine_client()
    while True:
        out = await client.generate(
            {"input_ids": sample.tokens, "sampling_params": {**sampling_params, "max_new_tokens": 1},
             "return_logprob": True}
        )  # fmt: skip
        if not out["output_ids"]:  # the turn limit: nothing generated, finish "length"
            assert out["meta_info"]["finish_reason"]["type"] == "length"
            sample.status = Sample.Status.TRUNCATED
            return sample
        lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        _append(sample, out["output_ids"], lps, out["meta_info"]["output_token_versions"], trained=True)
        _append(sample, tool, [0.0], [sample.policy_versions[-1]], trained=False)


async def one_turn_then_hang(args, sample: Sample, sampling_params: dict) -> Sample:
    out = await _post(args, {"input_ids": sample.tokens, "sampling_params": {**sampling_params, "max_new_tokens": 2},
                             "return_logprob": True})  # fmt: skip
    lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    sample.tokens = list(sample.tokens) + out["output_ids"]  # in place, as slime's helpers append
    sample.response_length = len(out["output_ids"])
    sample.loss_mask, sample.rollout_log_probs = [1] * len(lps), lps
    await asyncio.sleep(3600)
    return sample


async def no_log_probs(args, sample: Sample, sampling_params: dict) -> Sample:
    sample.tokens = list(sample.tokens) + [1, 2]
    sample.response_length = 2
    return sample


async def two_samples(args, sample: Sample, sampling_params: dict) -> list[Sample]:
    return [sample, sample]


def _mask_runs(mask) -> int:
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def _item(tokenizer, work_id="g0/0", sample: types_pb2.Sample | None = None) -> coordinator_pb2.WorkItem:
    if sample is None:
        sample = types_pb2.Sample(uid=work_id, prompt="12+34=", tokens=tokenizer("12+34=")["input_ids"])
    return coordinator_pb2.WorkItem(
        work_id=work_id,
        lease_epoch=1,
        sample=sample,
        sampling=types_pb2.SamplingParams(temperature=1.0, max_new_tokens=400, seed=7),
    )


def _run(model_dir, scenario, fn, max_turns=8, timeout=0.0):
    """Run `scenario(runner, api, worker, tokenizer)` with a fresh engine, HTTP API and runner."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)

    async def main():
        worker = EngineWorker(
            NativeEngine(model, [], max_batch_size=8, max_seq_len=512), asyncio.get_running_loop()
        )
        worker.start()
        api = HttpApi(worker, tokenizer, model_path=str(model_dir), default_max_new_tokens=8,
                      vocab_size=model.config.vocab_size)  # fmt: skip
        runner_http, port = await start_http(api, "127.0.0.1", 0)
        args = argparse.Namespace(
            hf_checkpoint=str(model_dir), sglang_router_ip="127.0.0.1", sglang_router_port=port
        )
        settings = CustomGenerateConfig(max_turns=max_turns, timeout=timeout, max_response_len=400)
        runner = CustomGenerator(
            fn, args, settings, worker, tokenizer, vocab_size=model.config.vocab_size, http=api
        )
        try:
            return await scenario(runner, api, worker, tokenizer, model)
        finally:
            await runner_http.cleanup()
            worker.stop()

    return asyncio.run(main())


def test_tool_tokens_are_masked_and_versions_filled_over_http(model_dir):
    async def scenario(runner, api, worker, tokenizer, model):
        item = _item(tokenizer)
        out = await runner.generate(item, "g0/0#1", set())
        tool = tokenizer(TOOL_TEXT, add_special_tokens=False)["input_ids"]
        assert out.status == types_pb2.SAMPLE_STATUS_COMPLETED
        assert out.uid == "g0/0" and list(out.tokens[: len(item.sample.tokens)]) == list(item.sample.tokens)
        n = out.response_length
        assert len(out.loss_mask) == len(out.rollout_log_probs) == len(out.policy_versions) == n
        first = list(out.loss_mask).index(0)
        assert list(out.tokens[len(item.sample.tokens) + first :][: len(tool)]) == tool
        assert list(out.loss_mask) == [1] * first + [0] * len(tool) + [1] * (n - first - len(tool))
        assert all(out.rollout_log_probs[first + i] == 0.0 for i in range(len(tool)))
        assert all(lp < 0 for i, lp in enumerate(out.rollout_log_probs) if out.loss_mask[i])
        assert set(out.policy_versions) == {0}
        return out

    _run(model_dir, scenario, two_turns_over_http)


def test_turn_limit_refuses_in_process_turns_and_cuts_http_ones(model_dir):
    async def in_process(runner, api, worker, tokenizer, model):
        return await runner.generate(_item(tokenizer), "g0/0#1", set())

    out = _run(model_dir, in_process, tool_loop_in_process, max_turns=3)
    assert _mask_runs(out.loss_mask) == 3 and out.status == types_pb2.SAMPLE_STATUS_TRUNCATED

    out = _run(model_dir, in_process, two_turns_over_http, max_turns=1)  # the function takes two
    assert _mask_runs(out.loss_mask) == 1 and out.status == types_pb2.SAMPLE_STATUS_TRUNCATED
    assert len(out.rollout_log_probs) == out.response_length < 3 + len(TOOL_TEXT) + 1


def test_wall_clock_budget_cancels_and_keeps_what_was_appended(model_dir):
    async def scenario(runner, api, worker, tokenizer, model):
        return await runner.generate(_item(tokenizer), "g0/0#1", set())

    # the budget must leave room for the first 2-token turn, whatever the machine's load
    out = _run(model_dir, scenario, one_turn_then_hang, timeout=scaled(2.0))
    assert out.status == types_pb2.SAMPLE_STATUS_TRUNCATED
    assert 1 <= out.response_length <= 2 and list(out.loss_mask) == [1] * out.response_length


def test_coordinator_abort_stops_the_function(model_dir):
    async def scenario(runner, api, worker, tokenizer, model):
        task = asyncio.create_task(runner.generate(_item(tokenizer), "g0/0#1", set()))
        while "g0/0#1" not in runner._tasks:
            await asyncio.sleep(0.01)
        runner.abort(["g0/0#1"])
        return await task

    out = _run(model_dir, scenario, one_turn_then_hang)
    assert out.status == types_pb2.SAMPLE_STATUS_ABORTED


def test_abort_mode_swap_mid_turn_then_the_partial_continues_under_new_weights(model_dir):
    async def scenario(runner, api, worker, tokenizer, model):
        global turn_two_started
        turn_two_started = asyncio.Event()
        task = asyncio.create_task(runner.generate(_item(tokenizer), "g0/0#1", set()))
        await turn_two_started.wait()
        while not api._mine:  # the long turn is in the engine
            await asyncio.sleep(0.005)
        runner.abort_turns()  # what an abort-mode swap does to HTTP turns
        partial = await task
        turn_two_started = None
        await worker.load_weights(model.state_dict(), 1)
        budget = 400 - partial.response_length
        item = _item(tokenizer, sample=partial)
        item.sampling.max_new_tokens = budget
        done = await runner.generate(item, "g0/0#2", set())
        return partial, done

    partial, done = _run(model_dir, scenario, two_turns_over_http)
    assert partial.status == types_pb2.SAMPLE_STATUS_ABORTED
    assert 0 in partial.loss_mask and set(partial.policy_versions) == {0}
    assert done.status == types_pb2.SAMPLE_STATUS_COMPLETED
    n = partial.response_length
    assert list(done.tokens[: len(partial.tokens)]) == list(partial.tokens)  # kept, then continued
    assert list(done.loss_mask[:n]) == list(partial.loss_mask)
    assert list(done.policy_versions[:n]) == list(partial.policy_versions)
    assert set(done.policy_versions[n:]) == {1} and done.response_length > n
    assert sample_from_proto(done).loss_mask == list(done.loss_mask)


@pytest.mark.parametrize(
    "fn, why",
    [(no_log_probs, "rollout_log_probs"), (two_samples, "2 samples")],
)
def test_unusable_returns_fail_the_sample(model_dir, fn, why, caplog):
    async def scenario(runner, api, worker, tokenizer, model):
        return await runner.generate(_item(tokenizer), "g0/0#1", set())

    out = _run(model_dir, scenario, fn)
    assert out.status == types_pb2.SAMPLE_STATUS_FAILED and out.response_length == 0
    assert why in caplog.text


def test_load_generate_function_names_what_is_wrong(tmp_path):
    assert load_generate_function("test_multi_turn:two_turns_over_http") is two_turns_over_http
    assert load_generate_function("test_multi_turn.two_turns_over_http") is two_turns_over_http
    f = tmp_path / "gen.py"
    f.write_text("async def generate(args, sample, sampling_params):\n    return sample\n")
    assert load_generate_function(f"{f}:generate").__name__ == "generate"
    for spec, says in [
        ("nowhere_module:generate", "cannot import nowhere_module"),
        ("test_multi_turn:_mask_runs", "no async function '_mask_runs'"),
        (f"{tmp_path}/missing.py:generate", "no such file"),
    ]:
        with pytest.raises(GenerateFunctionError, match=says):
            load_generate_function(spec)


def test_in_place_swap_mid_turn_shows_in_the_versions(model_dir):
    async def scenario(runner, api, worker, tokenizer, model):
        global turn_two_started
        turn_two_started = asyncio.Event()
        task = asyncio.create_task(runner.generate(_item(tokenizer), "g0/0#1", set()))
        await turn_two_started.wait()
        while not api._mine:  # the long turn is in the engine
            await asyncio.sleep(0.005)
        await worker.load_weights(model.state_dict(), 1)  # between two decode steps, KV cache kept
        out = await task
        turn_two_started = None
        return out

    out = _run(model_dir, scenario, two_turns_over_http)
    assert out.status == types_pb2.SAMPLE_STATUS_COMPLETED
    versions = list(out.policy_versions)
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1
    tool = list(out.loss_mask).index(0)
    assert versions[tool] == versions[tool - 1]  # a tool token takes its model turn's version
