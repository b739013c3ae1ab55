"""A remote reward endpoint that dies or freezes: said at once, nothing burned, the run pauses, then
resumes or fails with one line (issue 13 item 3).

Real pieces: an HTTP reward endpoint (slime's protocol) in a thread, killed (its port closed) and
brought back on the same port, or frozen (it accepts connections and never answers); the real
reward service and coordinator, in process, over real gRPC and the session's Redis; a rollout
server played on the Attach stream. What the console shows is the `slipstream.console` logger
(the launcher echoes its lines from the service logs: test_console_relay below).

Before: every sample's scoring failed `--reward-max-failures` times and was dead-lettered, new
prompts kept being admitted and burned the same way, and nothing reached the console.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import test_coordinator
from machine_speed import scaled
from test_coordinator import FakeRollout, _cfg, _read_all, _until_stored

from slipstream.buffer.replay import ReplayBuffer
from slipstream.config import config_from_values
from slipstream.console import CONSOLE, ConsoleRelay, console_line
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import aio_channel
from slipstream.services.coordinator.server import start_coordinator
from slipstream.services.reward.server import start_reward_server

pytestmark = pytest.mark.timeout(90)
assets = test_coordinator.assets  # the same fixture: 8 prompts "i+1=" labelled i+1


class Endpoint:
    """A reward endpoint on a fixed port: reward 1.0 for everything; kill(), start(), freeze()."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.thawed = threading.Event()
        self.thawed.set()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> Endpoint:
        thawed = self.thawed

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                thawed.wait()  # frozen: the connection is accepted, no answer comes
                body = b"1.0"
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # thawed after the client gave up: nobody to answer

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def kill(self) -> None:
        """Closed: connections are refused."""
        self.server.shutdown()
        self.server.server_close()

    def freeze(self) -> None:
        self.thawed.clear()

    def thaw(self) -> None:
        self.thawed.set()


class Console(logging.Handler):
    """What the console channel said, with when."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.levelname, record.getMessage()))

    async def said(self, text: str, within: float) -> float:
        """When a line containing `text` was said (waiting up to `within` seconds)."""
        deadline = time.monotonic() + within
        while True:
            for t, _, message in self.lines:
                if text in message:
                    return t
            assert time.monotonic() < deadline, f"the console never said {text!r}: {self.lines}"
            await asyncio.sleep(0.05)


@pytest.fixture
def console():
    handler = Console()
    logger = logging.getLogger(CONSOLE)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def _dead_letters(redis_url: str, run_id: str) -> list:
    buffer = ReplayBuffer(redis_url, run_id)
    try:
        return buffer.dead_letters()
    finally:
        buffer.close()


async def _mesh(endpoint: Endpoint, assets, redis_url, run_id, tmp_path, **flags):
    reward, servicer = await start_reward_server(
        config_from_values({"rm_url": endpoint.url, "port": 0, "rm_timeout": 1.0, "rm_max_retries": 3})
    )
    cfg = _cfg(
        assets, redis_url, run_id, f"127.0.0.1:{reward.port}",
        max_staleness=4, num_rollout=4, run_dir=str(tmp_path), **flags,
    )  # fmt: skip
    coord = await start_coordinator(cfg)
    channel = aio_channel(f"127.0.0.1:{coord.port}")

    async def stop():
        await channel.close()
        await coord.stop()
        servicer.scorer.close()
        await reward.stop(0.5)

    return coord, channel, coordinator_pb2_grpc.CoordinatorStub(channel), stop


async def _status(stub) -> coordinator_pb2.CoordinatorStatus:
    return await stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=5)


def test_a_killed_endpoint_pauses_admission_burns_nothing_and_the_run_resumes(
    assets, redis_url, run_id, tmp_path, console
):
    endpoint = Endpoint().start()

    async def scenario():
        coord, channel, stub, stop = await _mesh(endpoint, assets, redis_url, run_id, tmp_path)
        try:
            rollout = FakeRollout(channel, "r0", capacity=2).start()  # one group of 2 at a time
            for item in await rollout.work(2):  # p0, scored while the endpoint is up
                rollout.answer(item, "x")
            await _until_stored(stub, 1, "p0 stored")
            p1 = await rollout.work(2)

            endpoint.kill()
            killed = time.monotonic()
            for item in p1:
                rollout.answer(item, "x")
            down = await console.said(f"reward endpoint {endpoint.url} down: connection refused", scaled(5))
            paused = await console.said("admission paused", scaled(5))
            assert max(down, paused) - killed < scaled(5)
            for item in await rollout.work(2):  # p2 was admitted with p1's last result, before it was known
                rollout.answer(item, "x")
            await rollout.nothing_more(scaled(2))  # paused: no p3 while two groups wait for their reward
            status = await _status(stub)
            assert (status.num_dead_lettered, status.num_reward_failures, status.num_groups_completed) == (
                0,
                0,
                1,
            )
            assert _dead_letters(redis_url, run_id) == []

            endpoint.start()  # back on its port: the probe closes the breaker, scoring resumes
            back = time.monotonic()
            await console.said("answers again", scaled(15))
            await console.said("admission resumed", scaled(10))
            await _until_stored(stub, 3, "p1 and p2 stored once the endpoint is back")
            p3 = await rollout.work(2)  # admission resumed
            assert {i.work_id.split("/")[0] for i in p3} == {"p3"}
            print(
                f"outage said {down - killed:.2f}s after the kill, admission paused {paused - killed:.2f}s "
                f"after; resumed {time.monotonic() - back:.2f}s after the endpoint came back"
            )
            await rollout.close()
        finally:
            await stop()

    asyncio.run(asyncio.wait_for(scenario(), scaled(60)))
    groups = {g.group_id: g for g in _read_all(redis_url, run_id)}
    assert sorted(groups) == ["p0", "p1", "p2"]
    assert all(s.reward == 1.0 for g in groups.values() for s in g.samples)  # none failed
    assert _dead_letters(redis_url, run_id) == []
    events = [json.loads(line)["event"] for line in (tmp_path / "dispatch.jsonl").read_text().splitlines()]
    assert "dead_lettered" not in events and "reward_failed" not in events


def test_a_frozen_endpoint_is_said_at_once_and_the_outage_timeout_fails_the_run(
    assets, redis_url, run_id, tmp_path, console
):
    endpoint = Endpoint().start()

    async def scenario():
        coord, channel, stub, stop = await _mesh(
            endpoint, assets, redis_url, run_id, tmp_path, reward_outage_timeout=2.0
        )
        stopped = asyncio.Event()
        coord.reward_gate.on_fatal = stopped.set  # serve() stops the coordinator here
        try:
            rollout = FakeRollout(channel, "r0", capacity=2).start()
            endpoint.freeze()
            frozen = time.monotonic()
            for item in await rollout.work(2):
                rollout.answer(item, "x")
            # --rm-timeout 1: "no answer" at 0.5 s, the breaker open after 3 timeouts in a row.
            stalled = await console.said(f"reward endpoint {endpoint.url}: no answer for", scaled(5))
            down = await console.said("down: timed out", scaled(10))
            assert stalled - frozen < scaled(3) and down - frozen < scaled(8)
            await asyncio.wait_for(stopped.wait(), scaled(10))
            fatal = coord.reward_gate.fatal
            assert fatal.startswith("reward unavailable for 2s (--reward-outage-timeout): reward endpoint")
            assert endpoint.url in fatal and "timed out" in fatal and "\n" not in fatal
            assert (await _status(stub)).num_dead_lettered == 0
            await rollout.close()
        finally:
            endpoint.thaw()
            await stop()

    asyncio.run(asyncio.wait_for(scenario(), scaled(60)))
    assert _dead_letters(redis_url, run_id) == []
    errors = [m for _, level, m in console.lines if level == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("reward unavailable for 2s")


def test_console_relay_echoes_the_channel_of_every_service_log_and_nothing_else(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "reward.log").write_text("12:00:00 reward WARNING slipstream.console: from an earlier run\n")
    relay = ConsoleRelay(logs)  # earlier lines are never shown
    with (logs / "reward.log").open("a") as f:
        f.write("12:00:01 reward WARNING slipstream.services.reward.server: reward failed for sample p/0\n")
        f.write(
            "12:00:01 reward WARNING slipstream.console: reward endpoint http://h/ down: connection refused\n"
        )
        f.write(
            "12:00:02 reward INFO slipstream.console: reward endpoint http://h/ answers ag"
        )  # half a line
    (logs / "trainer.log").write_text(
        "12:00:03 trainer WARNING slipstream.console: step 1 trained 0 tokens\n"
    )
    assert relay.poll() == [
        "reward: warning: reward endpoint http://h/ down: connection refused",
        "trainer: warning: step 1 trained 0 tokens",
    ]
    with (logs / "reward.log").open("a") as f:
        f.write("ain after 3.0s down\n")
    assert relay.poll() == ["reward: reward endpoint http://h/ answers again after 3.0s down"]
    assert relay.poll() == []
    assert (
        console_line("12:00:04 coordinator ERROR slipstream.console: x", "coordinator")
        == "coordinator: error: x"
    )


class _DiesAfter(BaseHTTPRequestHandler):
    """Answers with a 400 (the sample's own failure) until every sample of one prompt has had one,
    so one whole group fails, then the endpoint dies: its port closes and every later request is
    refused. Groups are scored concurrently, so "the first N requests" need not be one group."""

    GROUP = 2  # --n-samples-per-prompt
    seen: collections.Counter[str] = collections.Counter()
    died_at: float | None = None
    lock = threading.Lock()
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        cls = type(self)
        with cls.lock:
            answer = cls.died_at is None and max(cls.seen.values(), default=0) < cls.GROUP
            if answer:
                cls.seen[prompt] += 1
            elif cls.died_at is None:
                cls.died_at = time.monotonic()
                threading.Thread(target=lambda: (cls.server.shutdown(), cls.server.server_close())).start()
        if answer:
            body = b"cannot grade this"
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.close_connection = True  # no answer


@pytest.mark.slow
def test_the_launcher_console_says_it_and_the_run_fails_with_one_line(tmp_path):
    """The whole mesh from train.py: one group's samples fail (a 400: dead-lettered, so step 1
    trains 0 tokens and says so), then the endpoint dies: the console names it within seconds, and
    after --reward-outage-timeout the run fails with one line."""
    import subprocess
    import sys
    from pathlib import Path

    from mesh_fixtures import build_prompts, build_tiny_model

    model, prompts = build_tiny_model(tmp_path / "model"), build_prompts(tmp_path / "train.jsonl")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DiesAfter)
    server.daemon_threads = True
    _DiesAfter.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    outage_s = round(scaled(8))  # step 1 must be trained before the coordinator gives up
    argv = [
        sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
        "--hf-checkpoint", str(model), "--prompt-data", str(prompts), "--run-dir", str(tmp_path / "run"),
        "--rollout-batch-size", "1", "--n-samples-per-prompt", "2", "--num-rollout", "3",
        "--rollout-max-response-len", "4", "--global-batch-size", "2", "--micro-batch-size", "2",
        "--rollout-num-servers", "1", "--rm-url", url, "--rm-timeout", "2", "--reward-max-failures", "1",
        "--reward-outage-timeout", str(outage_s),
    ]  # fmt: skip
    launcher = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[tuple[float, str]] = []
    try:
        for line in launcher.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))
        launcher.wait(timeout=scaled(120))
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = "\n".join(line for _, line in lines)
    print(text)
    assert launcher.returncode == 1, text[-3000:]
    assert _DiesAfter.died_at is not None, text[-3000:]
    down = [
        (t, line)
        for t, line in lines
        # the request in flight when it dies sees a reset; the next ones see a refusal: either is said
        if re.search(
            rf"reward: warning: reward endpoint {re.escape(url)} down: connection (refused|reset)", line
        )
    ]
    assert down, text[-3000:]
    assert down[0][0] - _DiesAfter.died_at < scaled(5), text[-3000:]
    assert any(
        "coordinator: warning: reward unavailable" in line and "admission paused" in line for _, line in lines
    )
    assert any(
        "trainer: warning: step 1 trained 0 tokens: all 2 samples failed" in line for _, line in lines
    ), text[-3000:]
    last = lines[-1][1]
    assert last.startswith("slipstream: error: coordinator died (exit code 1)"), text[-3000:]
    assert f"reward unavailable for {outage_s}s (--reward-outage-timeout)" in last and url in last, last


def test_why_a_step_trained_nothing():
    from slipstream.algorithms.staleness import StalenessReport
    from slipstream.services.trainer.nothing_trained import why_nothing_trained
    from slipstream.types import Sample, Status

    failed = [Sample(prompt="p", status=Status.FAILED, response_length=3) for _ in range(4)]
    assert why_nothing_trained(failed, StalenessReport()).startswith("all 4 samples failed (reward failures")
    ok = Sample(prompt="p", status=Status.COMPLETED, response_length=3)
    said = why_nothing_trained([failed[0], ok, ok], StalenessReport(num_dropped=2))
    assert said == "of 3 samples: 1 failed (reward failures), 2 dropped as too stale (--max-staleness)"
    assert why_nothing_trained([], StalenessReport()) == "the batch held no samples"


def test_a_gate_nobody_waits_on_goes_back_up():
    """The pipeline whose scoring saw the outage is replaced (a Redis reload cancels its tasks):
    the gate must not stay down, pausing admission until the outage timeout, with nobody asking."""
    import grpc

    from slipstream.proto import types_pb2
    from slipstream.services.coordinator.scoring import RewardGate, score_with_retries

    class Down:
        async def Score(self, request, timeout):
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "endpoint down"
            )

    async def scenario():
        gate = RewardGate(outage_timeout=60)
        task = asyncio.create_task(
            score_with_retries(Down(), [types_pb2.Sample(uid="p0/0")], 5, 3, gate=gate)
        )
        while gate.is_up:
            await asyncio.sleep(0.01)
        assert gate.last_error == "endpoint down" and not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert gate.is_up and not gate.fatal

    asyncio.run(asyncio.wait_for(scenario(), scaled(10)))
