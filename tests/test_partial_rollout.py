"""A trajectory interrupted by a weight update, end to end: real coordinator (in-process, on
port 0), a real rollout server process, a real reward service process, real Redis.

The model is a tiny random Qwen3 that never emits EOS under greedy decoding, so one response
runs for hundreds of tokens (about a second) and a weight push lands in the middle of it.
Then, per mode:

- abort (`--partial-rollout`): the server stops, returns the partial (ABORTED); the coordinator
  parks it in the Redis partial stream and re-dispatches it; it resumes under the new weights.
  The stored sample has version-0 tokens then version-1 tokens, each segment's log-probs are
  those of *its* weights (recomputed here, teacher-forced), and the server generated exactly
  the stored tokens: nothing twice.
- drain (default): the response finishes on the old weights, then the server swaps.
- in_place: the engine swaps between decode steps; one piece, two versions, no partial.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from machine_speed import scaled

from mesh_fixtures import build_tiny_model
from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import config_from_values
from slipstream.models.hf import load_model
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.server import start_coordinator
from slipstream.weights import iter_messages, pack, weights_to_sync

pytestmark = pytest.mark.timeout(120)
RESPONSE_LEN = 900
STEP = 30.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial")
    build_tiny_model(
        d / "model", hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=1024
    )
    (d / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(4))
    )
    return d


def _wait_ready(proc: subprocess.Popen, ready: Path, what: str) -> int:
    deadline = time.monotonic() + STEP
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    return int(ready.read_text())


@pytest.fixture(scope="module")
def reward_addr(assets):
    ready = assets / "reward.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream.services.reward", "--port", "0", "--ready-file", str(ready)],
        stderr=subprocess.PIPE,
        text=True,
    )
    yield f"127.0.0.1:{_wait_ready(proc, ready, 'reward service')}"
    proc.terminate()
    proc.wait(10)


def _new_weights(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Version-1 weights (clearly different), and what the engine holds once it loads them (bf16)."""
    state = load_model(model_dir).state_dict()
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: one tensor
    return new, {k: v.to(torch.bfloat16).float() for k, v in new.items()}


@torch.no_grad()
def _log_probs(model_dir: Path, state: dict | None, tokens: list[int], start: int) -> torch.Tensor:
    """Teacher-forced log-probs of tokens[start:] under `state` (None: the checkpoint)."""
    model = load_model(model_dir)
    if state is not None:
        model.load_state_dict(state)
    ids = torch.tensor([tokens])
    logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return logp[start - 1 :].gather(1, ids[0, start:, None])[:, 0]


async def _aiter(items):
    for item in items:
        yield item


def _run(assets: Path, redis_url: str, run_id: str, reward_addr: str, mode: str):
    partial = {"drain": {}, "abort": {"partial_rollout": True}, "in_place": {"partial_rollout": True}}[mode]
    cfg = config_from_values(
        dict(
            hf_checkpoint=str(assets / "model"),
            prompt_data=str(assets / "prompts.jsonl"),
            redis_url=redis_url,
            run_id=run_id,
            reward_addr=reward_addr,
            rollout_batch_size=1,
            n_samples_per_prompt=2,
            num_rollout=1,
            max_staleness=1,
            rollout_max_prompt_len=16,
            rollout_max_response_len=RESPONSE_LEN,
            rollout_temperature=0.0,
            micro_batch_size=1,
            pause_generation_mode="in_place" if mode == "in_place" else "abort",
            **partial,
        )
    )
    new_state, engine_state = _new_weights(assets / "model")
    manifest, chunks = pack(weights_to_sync(new_state, tie_word_embeddings=True), 1, "bf16")
    ready = assets / f"rollout-{mode}.port"

    async def scenario():
        coord = await start_coordinator(cfg)
        flags = ["--partial-rollout", "--pause-generation-mode", mode] if partial else []
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "slipstream.services.rollout",
                "--hf-checkpoint", str(assets / "model"), "--coordinator-addr", f"127.0.0.1:{coord.port}",
                "--port", "0", "--ready-file", str(ready), "--torch-threads", "1",
                "--rollout-max-prompt-len", "16", "--rollout-max-response-len", str(RESPONSE_LEN),
                "--rollout-max-batch-size", "8", *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            port = await asyncio.to_thread(_wait_ready, proc, ready, "rollout server")

            async def status():
                return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)

            deadline = time.monotonic() + STEP
            while (await status()).num_samples_in_flight < 2:
                assert time.monotonic() < deadline, "work never went out"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a few hundred tokens in
            await stub.PushWeights(_aiter(list(iter_messages(manifest, chunks))), timeout=30)
            while (await status()).num_groups_completed < 1:
                assert time.monotonic() < deadline + STEP, "the group never completed"
                await asyncio.sleep(0.05)
            while (await status()).server_versions and min((await status()).server_versions.values()) < 1:
                assert time.monotonic() < deadline + STEP, "the server never applied version 1"
                await asyncio.sleep(0.05)
            final = await status()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as rc:
                info = await rollout_pb2_grpc.RolloutStub(rc).GetInfo(rollout_pb2.GetInfoRequest(), timeout=5)
            return final, info
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
            await channel.close()
            await coord.stop()

    status, info = asyncio.run(asyncio.wait_for(scenario(), scaled(100)))
    buffer = ReplayBuffer(redis_url, run_id)
    try:
        (group,) = [g for _, g in buffer.read_groups("test", count=10, block_ms=0)]
        assert buffer.partials.count() == 0  # every parked partial was taken back
    finally:
        buffer.close()
    return status, info, list(group.samples), engine_state


def _segments(versions: list[int]) -> list[tuple[int, int]]:
    """(version, length) runs."""
    runs: list[tuple[int, int]] = []
    for v in versions:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


@pytest.mark.parametrize("mode", ["abort", "drain", "in_place"])
def test_weight_update_mid_trajectory(assets, redis_url, run_id, reward_addr, mode):
    status, info, samples, engine_state = _run(assets, redis_url, run_id, reward_addr, mode)
    total = sum(s.response_length for s in samples)
    # Nothing generated twice: the server produced exactly the tokens that were stored.
    assert info.num_generated_tokens == total
    for s in samples:
        # the old weights never emit EOS greedily; the new ones may
        assert s.response_length == len(s.rollout_log_probs) == len(s.policy_versions) <= RESPONSE_LEN
        segments = _segments(list(s.policy_versions))
        if mode == "drain":
            assert segments == [(0, RESPONSE_LEN)]  # finished on the old weights
            continue
        assert [v for v, _ in segments] == [0, 1], segments  # interrupted once, resumed under v1
        prompt_len = len(s.tokens) - s.response_length
        cut = prompt_len + segments[0][1]
        rollout = torch.tensor(list(s.rollout_log_probs))
        old = _log_probs(assets / "model", None, list(s.tokens), prompt_len)
        new = _log_probs(assets / "model", engine_state, list(s.tokens), prompt_len)
        n0 = segments[0][1]
        # each segment's log-probs are its own weights' (and not the other version's)
        torch.testing.assert_close(rollout[:n0], old[:n0], atol=2e-3, rtol=0)
        assert (rollout[n0:] - old[n0:]).abs().max() > 0.1
        if mode == "abort":
            # A continuation is prefilled afresh under v1: exactly v1's log-probs. (in_place keeps
            # the KV cache the old weights computed, so its v1 tokens attend over v0 keys/values
            # and match neither model teacher-forced: that is what in_place trades for speed.)
            torch.testing.assert_close(rollout[n0:], new[n0:], atol=2e-3, rtol=0)
        assert cut > prompt_len
    if mode == "abort":
        assert status.num_partials_recycled == 2  # both samples were parked and continued
    else:
        assert status.num_partials_recycled == 0
