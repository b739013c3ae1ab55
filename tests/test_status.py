"""`slipstream status --once` against a real coordinator (port 0, real Redis, real reward service).

Two rollout servers attach as test-side peers on the Attach stream (as in test_coordinator.py)
at different policy versions; the command runs as its own process, as an operator runs it, and
its snapshot must name both servers with their versions and load. With tokens on, it gets in
with the mesh's token file and is refused (one line, exit 1) without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import pytest
from machine_speed import scaled

from slipstream.config import config_from_values
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc import security
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.server import start_coordinator

pytestmark = pytest.mark.timeout(120)
TOKEN = "status-test-token"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("status")
    build_char_tokenizer(d / "model")
    (d / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(8))
    )
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def reward_addr(assets):
    """A real reward service (math rule) as its own process, with the test's token."""
    ready = assets / "reward.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream.services.reward", "--rm-type", "math", "--port", "0"]
        + ["--ready-file", str(ready), "--auth-token-file", str(assets / "token")],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"reward service did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    yield f"127.0.0.1:{ready.read_text().strip()}"
    proc.terminate()
    proc.wait(10)


def _attach(stub, server_id: str, version: int, capacity: int):
    """An Attach stream that says Hello and a heartbeat, then stays open until `close` is set."""
    close = asyncio.Event()

    async def events():
        yield coordinator_pb2.RolloutEvent(
            hello=coordinator_pb2.Hello(
                server_id=server_id, policy_version=version, max_concurrent_samples=capacity
            )
        )
        yield coordinator_pb2.RolloutEvent(
            heartbeat=coordinator_pb2.Heartbeat(policy_version=version, idle_seconds=1.0, uptime_seconds=2.0)
        )
        await close.wait()

    call = stub.Attach(events())

    async def drain():
        async for _ in call:  # work items: never answered, they stay leased
            pass

    return close, asyncio.create_task(drain())


async def _status_cli(addr: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slipstream", "status", "--coordinator", addr, "--once", *flags]
    env = {**os.environ, "COLUMNS": "160"}
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)


def test_status_once_names_the_servers_their_versions_and_load(assets, redis_url, run_id, reward_addr):
    cfg = config_from_values(
        dict(
            hf_checkpoint=str(assets / "model"),
            prompt_data=str(assets / "prompts.jsonl"),
            redis_url=redis_url,
            run_id=run_id,
            reward_addr=reward_addr,
            rm_type="math",
            rollout_batch_size=2,
            n_samples_per_prompt=2,
            num_rollout=1,
            max_staleness=1,
            rollout_max_response_len=8,
            micro_batch_size=1,
            auth_token_file=str(assets / "token"),
        )
    )

    async def scenario():
        previous = security.use(security.settings_from_config(cfg, "coordinator"))
        coord = await start_coordinator(cfg)
        channel = aio_channel(f"127.0.0.1:{coord.port}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        streams = [_attach(stub, "rollout-alpha", 0, 4), _attach(stub, "rollout-beta", 0, 2)]
        try:
            deadline = time.monotonic() + scaled(30)
            while len((await stub.GetStatus(coordinator_pb2.GetStatusRequest())).server_versions) < 2:
                assert time.monotonic() < deadline, "the two servers never attached"
                await asyncio.sleep(0.05)
            addr = f"127.0.0.1:{coord.port}"
            done = await _status_cli(addr, "--auth-token-file", str(assets / "token"))
            refused = await _status_cli(addr)
        finally:
            for close, task in streams:
                close.set()
                task.cancel()
            await channel.close()
            await coord.stop()
            security.use(previous)
        return done, refused

    done, refused = asyncio.run(scenario())
    print(done.stdout)  # the snapshot, shown when the test fails
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    alpha = next(line for line in lines if "rollout-alpha" in line)
    beta = next(line for line in lines if "rollout-beta" in line)
    assert "v0" in alpha and "/ 4" in alpha, alpha  # its version, and leased samples against capacity
    assert "v0" in beta and "/ 2" in beta, beta
    assert "policy v0" in done.stdout and "trainer step 0" in done.stdout
    for section in ("buffer", "staleness", "reward"):
        assert section in done.stdout
    assert re.search(r"groups in stream\s+0\s", done.stdout)  # read from Redis (nothing stored yet)
    # Without the token: refused, one line, exit 1.
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0 and "UNAUTHENTICATED" in refused.stderr


def test_status_once_says_when_nothing_answers():
    done = subprocess.run(
        [sys.executable, "-m", "slipstream", "status", "--coordinator", "127.0.0.1:1", "--once"]
        + ["--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    # One line naming the address and the gRPC code (retries on UNAVAILABLE run into the deadline).
    assert done.stderr.count("\n") == 1, done.stderr
    assert re.match(r"slipstream status: 127\.0\.0\.1:1: (UNAVAILABLE|DEADLINE_EXCEEDED): ", done.stderr)
