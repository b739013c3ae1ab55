"""The rollout server as a real process on a tiny random model.

Standalone (no coordinator): `Rollout.Generate` and `GetInfo` over real gRPC. Attached: a
test-side coordinator peer (it plays the other end of the Attach stream; it is not our
coordinator) sends work and weight notices, and checks what comes back: results under the
same lease epoch, per-token versions, a verified weight swap, a refused version that leaves
the old one serving, and a reconnect after the stream ends.
"""

from __future__ import annotations

import asyncio
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
from slipstream.models.hf import init_model, load_config, load_tokenizer
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, rollout_pb2, rollout_pb2_grpc, types_pb2
from slipstream.rpc import bursts
from slipstream.rpc.channel import sync_channel
from slipstream.rpc.server import start_server
from slipstream.weights import iter_messages, pack, weights_to_sync

pytestmark = pytest.mark.timeout(90)
STEP = 20.0  # any one expected event on an idle 2-core box (process start included); scaled()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("rollout") / "model")


def _spawn(model_dir: Path, ready: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slipstream.services.rollout",
            "--hf-checkpoint",
            str(model_dir),
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--rollout-max-batch-size",
            "8",
            "--rollout-max-prompt-len",
            "16",
            "--rollout-max-response-len",
            "6",
            "--torch-threads",
            "1",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_port(proc: subprocess.Popen, ready: Path) -> int:
    deadline = time.monotonic() + scaled(STEP)
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rollout server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    return int(ready.read_text())


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(scaled(15))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_generate_and_get_info(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    proc = _spawn(model_dir, tmp_path / "port", "--server-id", "solo")
    try:
        port = _wait_port(proc, tmp_path / "port")
        stub = rollout_pb2_grpc.RolloutStub(sync_channel(f"127.0.0.1:{port}"))
        prompts = ["12+34=", "7*8="]
        samples = [
            types_pb2.Sample(uid=f"s{i}", prompt=p, tokens=tok(p, add_special_tokens=False)["input_ids"])
            for i, p in enumerate(prompts)
        ]
        greedy = types_pb2.SamplingParams(temperature=0.0, max_new_tokens=5)
        reply = stub.Generate(
            rollout_pb2.GenerateRequest(samples=samples, sampling=greedy), timeout=scaled(30)
        )
        assert [s.uid for s in reply.samples] == ["s0", "s1"]
        for prompt, out in zip(samples, reply.samples, strict=True):
            n = out.response_length
            assert 1 <= n <= 5 and list(out.tokens[: len(prompt.tokens)]) == list(prompt.tokens)
            assert len(out.tokens) == len(prompt.tokens) + n
            assert len(out.rollout_log_probs) == n and all(lp <= 0 for lp in out.rollout_log_probs)
            assert list(out.policy_versions) == [0] * n and list(out.loss_mask) == [1] * n
            assert out.response == tok.decode(list(out.tokens[-n:]), skip_special_tokens=True)
            eos_last = out.tokens[-1] == tok.eos_token_id
            assert out.status == (
                types_pb2.SAMPLE_STATUS_COMPLETED if eos_last else types_pb2.SAMPLE_STATUS_TRUNCATED
            )
        again = stub.Generate(
            rollout_pb2.GenerateRequest(samples=samples, sampling=greedy), timeout=scaled(30)
        )
        assert [list(s.tokens) for s in again.samples] == [
            list(s.tokens) for s in reply.samples
        ]  # greedy repeats
        info = stub.GetInfo(rollout_pb2.GetInfoRequest(), timeout=scaled(5))
        assert info.server_id == "solo" and info.engine == "native" and info.policy_version == 0
        assert info.num_generated_tokens == 2 * sum(s.response_length for s in reply.samples)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(
                rollout_pb2.GenerateRequest(
                    samples=samples, sampling=types_pb2.SamplingParams(temperature=-1.0, max_new_tokens=2)
                ),
                timeout=scaled(10),
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert _stop(proc) == 0


class PeerCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """The coordinator's end of the protocol, driven by the test."""

    def __init__(self) -> None:
        self.events: asyncio.Queue = asyncio.Queue()  # (stream number, RolloutEvent)
        self.outbox: asyncio.Queue | None = None
        self.streams = 0
        self.weights: dict[int, list[types_pb2.WeightMessage]] = {}

    async def Attach(self, request_iterator, context):
        self.streams += 1
        number = self.streams
        outbox: asyncio.Queue = asyncio.Queue()
        self.outbox = outbox

        async def read():
            async for event in request_iterator:
                await self.events.put((number, event))
            await outbox.put(None)

        reader = asyncio.create_task(read())
        try:
            while (cmd := await outbox.get()) is not None:
                yield cmd
        finally:
            reader.cancel()

    async def FetchWeights(self, request, context):
        if request.version not in self.weights:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no version {request.version}")
        for msg in self.weights[request.version]:
            yield msg

    async def next(self, kind: str) -> tuple[int, object]:
        while True:
            number, event = await asyncio.wait_for(self.events.get(), scaled(STEP))
            if event.WhichOneof("kind") == kind:
                return number, getattr(event, kind)

    def send(self, **command) -> None:
        self.outbox.put_nowait(coordinator_pb2.RolloutCommand(**command))

    async def results(self, count: int) -> list[coordinator_pb2.SampleResult]:
        """The next `count` results, whether they came one a message or in a `ResultBatch`."""
        got: list[coordinator_pb2.SampleResult] = []
        while len(got) < count:
            _, event = await asyncio.wait_for(self.events.get(), scaled(STEP))
            if event.WhichOneof("kind") in ("result", "results"):
                got += bursts.items(event, "result", "results")
        assert len(got) == count, got
        return got


def test_attached_server_generates_swaps_weights_and_reconnects(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    new_model = init_model(load_config(model_dir), seed=99)
    synced = weights_to_sync(new_model.state_dict(), new_model.config.tie_word_embeddings)
    good = list(iter_messages(*pack(synced, 1, "fp8")))
    wrong_shape = dict(synced)
    wrong_shape["model.norm.weight"] = torch.ones(3)
    bad = list(iter_messages(*pack(wrong_shape, 2, "bf16")))
    prompt = tok("5+5=", add_special_tokens=False)["input_ids"]

    def work(work_id: str, epoch: int) -> coordinator_pb2.WorkItem:
        return coordinator_pb2.WorkItem(
            work_id=work_id,
            lease_epoch=epoch,
            sample=types_pb2.Sample(uid=work_id, prompt="5+5=", tokens=prompt, label="10"),
            sampling=types_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4, seed=5),
        )

    async def scenario():
        peer = PeerCoordinator()
        peer.weights = {1: good, 2: bad}
        service = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(peer, s)
        )
        proc = _spawn(
            model_dir,
            tmp_path / "port",
            "--server-id",
            "r7",
            "--coordinator-addr",
            f"127.0.0.1:{service.port}",
        )
        try:
            _, hello = await peer.next("hello")
            assert (hello.server_id, hello.policy_version, hello.max_concurrent_samples) == ("r7", 0, 8)
            peer.send(work=work("p0/0", 3))
            _, result = await peer.next("result")
            assert (result.work_id, result.lease_epoch) == ("p0/0", 3)
            s = result.sample
            assert s.response_length >= 1 and list(s.policy_versions) == [0] * s.response_length
            assert s.label == "10" and list(s.tokens[: len(prompt)]) == prompt

            peer.send(new_weights=coordinator_pb2.NewWeights(version=1))
            _, applied = await peer.next("weights_applied")
            assert applied.ok and applied.version == 1, applied.error
            # A group in one message: every item generated and answered (results may come batched).
            ids = [f"p1/{i}" for i in range(3)]
            peer.send(work_batch=coordinator_pb2.WorkBatch(items=[work(w, 1) for w in ids]))
            results = await peer.results(3)
            assert sorted(r.work_id for r in results) == ids
            for result in results:
                assert list(result.sample.policy_versions) == [1] * result.sample.response_length

            peer.send(new_weights=coordinator_pb2.NewWeights(version=2))  # does not fit the model
            _, applied = await peer.next("weights_applied")
            assert not applied.ok and applied.version == 2 and "model.norm.weight" in applied.error
            _, beat = await peer.next("heartbeat")
            assert beat.policy_version == 1  # the old version keeps serving

            peer.outbox.put_nowait(None)  # the coordinator ends the stream: the server dials again
            number, hello = await peer.next("hello")
            assert number == 2 and hello.policy_version == 1
        finally:
            code = await asyncio.to_thread(_stop, proc)
            await service.stop(0)
        assert code == 0

    asyncio.run(asyncio.wait_for(scenario(), scaled(80)))


def test_gives_up_when_the_coordinator_stays_unreachable(model_dir):
    """A dead coordinator: backoff retries, then `CoordinatorLost` (the CLI's one line, exit 1).

    The window is --reconnect-timeout (120 s by default), shortened here; everything else is the
    real code path.
    """
    from slipstream.config import config_from_values
    from slipstream.models.hf import load_model
    from slipstream.rpc.channel import aio_channel
    from slipstream.services.rollout.attach import CoordinatorClient, CoordinatorLost
    from slipstream.services.rollout.engine import NativeEngine
    from slipstream.services.rollout.settings import ServerConfig
    from slipstream.services.rollout.weights_fetch import WeightFetcher
    from slipstream.services.rollout.worker import EngineWorker

    cfg = config_from_values(
        {"coordinator_addr": "127.0.0.1:1", "reconnect_timeout": 1.5, "server_id": "lonely"}
    )
    model = load_model(model_dir)

    async def scenario():
        worker = EngineWorker(NativeEngine(model, [0], max_batch_size=2), asyncio.get_running_loop())
        worker.start()
        channel = aio_channel(cfg.infra.coordinator_addr)
        stopping = asyncio.Event()
        fetcher = WeightFetcher(channel, {}, "cpu", torch.float32, stopping)
        settings = ServerConfig.from_sections(cfg.rollout, cfg.infra)
        client = CoordinatorClient(settings, channel, worker, load_tokenizer(model_dir), fetcher, stopping)
        t0 = time.monotonic()
        try:
            with pytest.raises(CoordinatorLost, match="unreachable for"):
                await asyncio.wait_for(client.attach_forever(), 15)
            assert 1.5 <= time.monotonic() - t0 < 10
        finally:
            worker.stop()
            await channel.close()

    asyncio.run(scenario())
