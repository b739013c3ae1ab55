"""The rollout server: one engine, its own `Rollout` endpoint, and a client of the coordinator.

Training work does not come in as RPCs to this server. The server dials the coordinator and
holds one `Attach` stream: it says `Hello` (who it is, which weights it serves, how many
samples it wants in flight), then receives `WorkItem`s and `NewWeights` notices and sends
back results, heartbeats and `WeightsApplied`. Scaling rollout is starting or stopping
servers; the coordinator re-dispatches the leases of a stream that breaks, so on a break
this side aborts what it was generating for that stream and reconnects with backoff.

A new weight version is fetched from the coordinator, staged and verified completely
(`slipstream.weights.WeightStager`), and only then handed to the engine thread, which swaps
it in between two decode steps. A fetch cut or damaged in transit is fetched again (4
attempts, backoff); a version that fails verification otherwise is reported and dropped. The
old one keeps serving throughout. What the swap does to work in flight is the partial-rollout
mode (`version_gate.py`): drain (default: finish on the old weights, then swap), abort (with
`--partial-rollout`: stop, send each partial back ABORTED, swap) or in_place (swap between
decode steps, keep the KV cache). A work item starts only once the engine serves at least its
`min_policy_version`; the coordinator can also abort items (`AbortWork`, over-sampling).

`Rollout.Generate` runs samples through the same engine directly (evaluation, tests,
benchmarks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream import telemetry
from slipstream.config import Config
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, rollout_pb2, rollout_pb2_grpc, types_pb2
from slipstream.services.rollout.version_gate import VersionGate

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 5.0  # backoff; the give-up window is --reconnect-timeout
WEIGHT_FETCH_TIMEOUT = 300.0  # a whole version streams within this deadline, retries included
FETCH_ATTEMPTS, FETCH_RETRY_FIRST = 4, 0.5  # a broken fetch is tried again after 0.5, 1, 2 s
# What a second FetchWeights of the same version can cure: the connection or the coordinator
# hiccuped. NOT_FOUND (a newer version replaced it) and refusals (auth, bad request) cannot.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

_STATUS = {
    "stop": types_pb2.SAMPLE_STATUS_COMPLETED,
    "length": types_pb2.SAMPLE_STATUS_TRUNCATED,
    "abort": types_pb2.SAMPLE_STATUS_ABORTED,
}


@dataclass
class _Work:
    """An attached work item on this server: its engine request id, and whether it was aborted."""

    rid: str
    aborted: bool = False
    submitted: bool = False


class CoordinatorLost(RuntimeError):
    """The coordinator stayed unreachable past the reconnect window."""


class _FetchFailed(Exception):
    """One FetchWeights attempt failed; `transient` when fetching the same version again may work."""

    def __init__(self, reason: str, transient: bool, kind: str):
        super().__init__(reason)
        self.transient = transient
        self.kind = kind  # for the retry counter: a gRPC code name, or "bytes"


def make_request(
    rid: str, sample: types_pb2.Sample, sampling: types_pb2.SamplingParams, default_max_new_tokens: int
) -> Any:
    """The engine request for a sample (its tokens may already hold a partial response)."""
    from slipstream.services.rollout.engine import Request

    return Request(
        rid=rid,
        tokens=list(sample.tokens),
        max_new_tokens=sampling.max_new_tokens or default_max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed or None,
    )


def finish_sample(sample: types_pb2.Sample, result: Any, tokenizer: Any) -> types_pb2.Sample:
    """The sample with the engine's result appended (a continued sample keeps its earlier part)."""
    out = types_pb2.Sample()
    out.CopyFrom(sample)
    out.tokens.extend(result.tokens)
    out.response_length = sample.response_length + len(result.tokens)
    out.rollout_log_probs.extend(result.log_probs)
    out.policy_versions.extend(result.versions)
    del out.loss_mask[:]
    out.loss_mask.extend([1] * out.response_length)
    response = out.tokens[len(out.tokens) - out.response_length :] if out.response_length else []
    out.response = tokenizer.decode(list(response), skip_special_tokens=True)
    out.status = _STATUS[result.finish_reason]
    return out


def _with_status(sample: types_pb2.Sample, status: int) -> types_pb2.Sample:
    out = types_pb2.Sample()
    out.CopyFrom(sample)
    out.status = status
    return out


class RolloutServer(rollout_pb2_grpc.RolloutServicer):
    def __init__(
        self,
        cfg: Config,
        server_id: str,
        worker: Any,
        tokenizer: Any,
        expected_shapes: dict[str, tuple[int, ...]],
        coordinator: grpc.aio.Channel | None = None,
    ):
        self.cfg = cfg
        self.server_id = server_id
        self.worker = worker  # EngineWorker
        self.tokenizer = tokenizer
        self.expected_shapes = expected_shapes
        self.coordinator = coordinator
        self.stopping = asyncio.Event()
        self._rids = itertools.count(1)
        self._outbox: asyncio.Queue | None = None  # events for the live Attach stream
        self._attached_rids: set[str] = set()  # engine requests of the live stream
        self._work: dict[str, _Work] = {}  # work id -> attached work item not yet answered
        self.gate = VersionGate(lambda: self.worker.policy_version)
        r = cfg.rollout
        self.pause_mode = r.pause_generation_mode if r.partial_rollout else "drain"
        self._weights_lock = asyncio.Lock()
        self._newest_notice = 0  # the newest version the coordinator announced
        self._tasks: set[asyncio.Task] = set()

    @property
    def default_max_new_tokens(self) -> int:
        return self.cfg.rollout.rollout_max_response_len

    # ---- the Rollout service -----------------------------------------------------------
    async def Generate(self, request, context):
        if not request.samples:
            return rollout_pb2.GenerateReply()
        if any(not s.tokens for s in request.samples):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "every sample needs prompt tokens")
        try:
            requests = [
                make_request(f"gen{next(self._rids)}", s, request.sampling, self.default_max_new_tokens)
                for s in request.samples
            ]
        except ValueError as e:  # bad sampling parameters
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        futures = [self.worker.submit(r) for r in requests]
        try:
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self.worker.abort([r.rid for r in requests])
            raise
        return rollout_pb2.GenerateReply(
            samples=[
                finish_sample(s, r, self.tokenizer) for s, r in zip(request.samples, results, strict=True)
            ]
        )

    async def GetInfo(self, request, context):
        return rollout_pb2.RolloutInfo(
            server_id=self.server_id,
            policy_version=self.worker.policy_version,
            num_running=self.worker.num_running,
            engine="native",
            num_generated_tokens=self.worker.num_generated_tokens,
        )

    # ---- the coordinator stream --------------------------------------------------------
    async def attach_forever(self) -> None:
        """Hold an Attach stream, reconnecting with backoff; `CoordinatorLost` after --reconnect-timeout down.

        A restarted coordinator (same address) is simply attached to again: it re-dispatches what
        this server was generating, under new epochs.
        """
        assert self.coordinator is not None
        health = health_pb2_grpc.HealthStub(self.coordinator)
        down_since: float | None = None
        backoff = RECONNECT_FIRST
        while not self.stopping.is_set():
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    raise ConnectionError("coordinator not serving")
                down_since, backoff = None, RECONNECT_FIRST
                reason = await self._attach_once()
            except (grpc.aio.AioRpcError, ConnectionError) as e:
                reason = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            if self.stopping.is_set():
                return
            now = time.monotonic()
            down_since = down_since or now
            give_up = self.cfg.infra.reconnect_timeout
            if now - down_since >= give_up:
                raise CoordinatorLost(
                    f"coordinator at {self.cfg.infra.coordinator_addr} unreachable for "
                    f"{give_up:.0f}s (--reconnect-timeout; {reason})"
                )
            log.warning("coordinator stream down (%s); retrying in %.1fs", reason, backoff)
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _attach_once(self) -> str:
        """One Attach stream, until it ends; returns why it ended."""
        outbox: asyncio.Queue = asyncio.Queue()
        outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                hello=coordinator_pb2.Hello(
                    server_id=self.server_id,
                    policy_version=self.worker.policy_version,
                    max_concurrent_samples=self.cfg.rollout.rollout_max_batch_size,
                )
            )
        )

        async def events():
            while (event := await outbox.get()) is not None:
                yield event

        stub = coordinator_pb2_grpc.CoordinatorStub(self.coordinator)
        call = stub.Attach(events())
        self._outbox = outbox
        heartbeat = asyncio.create_task(self._heartbeat(outbox))
        stop_wait = asyncio.create_task(self.stopping.wait())
        stop_wait.add_done_callback(lambda _t: call.cancel())
        log.info("attached to coordinator %s as %s", self.cfg.infra.coordinator_addr, self.server_id)
        try:
            async for cmd in call:
                self._on_command(cmd, outbox)
            return "the coordinator ended the stream"
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.stopping.is_set():
                return "stopping"
            return f"{e.code().name}: {e.details()}"
        finally:
            stop_wait.cancel()
            heartbeat.cancel()
            outbox.put_nowait(None)
            self._outbox = None
            # The coordinator re-dispatches this stream's leases: stop generating them here.
            if self._attached_rids:
                self.worker.abort(list(self._attached_rids))
                self._attached_rids.clear()
            if self._work:  # items still waiting at the gate: let them go
                self._abort_work(list(self._work))

    async def _heartbeat(self, outbox: asyncio.Queue) -> None:
        while True:  # the first one at once: the coordinator's baseline for idle time
            outbox.put_nowait(
                coordinator_pb2.RolloutEvent(
                    heartbeat=coordinator_pb2.Heartbeat(
                        policy_version=self.worker.policy_version,
                        num_running=self.worker.num_running,
                        idle_seconds=self.worker.idle_seconds,
                        uptime_seconds=self.worker.uptime_seconds,
                    )
                )
            )
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def _on_command(self, cmd: coordinator_pb2.RolloutCommand, outbox: asyncio.Queue) -> None:
        kind = cmd.WhichOneof("kind")
        if kind == "work":
            item = cmd.work
            # Registered now, not in the task: an AbortWork right behind it must find it.
            self._work[item.work_id] = _Work(rid=f"{item.work_id}#{item.lease_epoch}")
            self._spawn(self._serve_work(item, outbox))
        elif kind == "new_weights":
            self._newest_notice = max(self._newest_notice, cmd.new_weights.version)
            self._spawn(self._apply_weights(cmd.new_weights.version))
        elif kind == "abort":
            self._abort_work(list(cmd.abort.work_ids))
        elif kind == "shutdown":
            log.info("the coordinator asked this server to shut down")
            self.stopping.set()
        else:
            log.warning("ignoring an unknown command from the coordinator")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _abort_work(self, work_ids: list[str]) -> None:
        """Stop these items: running ones return their partial, waiting ones return unchanged."""
        running = []
        for work_id in work_ids:
            work = self._work.get(work_id)
            if work is None:
                continue  # already answered
            work.aborted = True
            if work.submitted:
                running.append(work.rid)
        if running:
            self.worker.abort(running)
        self._spawn(self.gate.poke())

    async def _serve_work(self, item: coordinator_pb2.WorkItem, outbox: asyncio.Queue) -> None:
        work = self._work.setdefault(item.work_id, _Work(rid=f"{item.work_id}#{item.lease_epoch}"))
        try:
            if not await self.gate.enter(item.min_policy_version, lambda: work.aborted):
                sample = _with_status(item.sample, types_pb2.SAMPLE_STATUS_ABORTED)
            else:
                try:
                    sample = await self._generate_one(item, work)
                finally:
                    await self.gate.leave()
        finally:
            if self._work.get(item.work_id) is work:  # a re-issued lease may have replaced it
                del self._work[item.work_id]
        outbox.put_nowait(
            coordinator_pb2.RolloutEvent(
                result=coordinator_pb2.SampleResult(
                    work_id=item.work_id, lease_epoch=item.lease_epoch, sample=sample
                )
            )
        )

    async def _generate_one(self, item: coordinator_pb2.WorkItem, work: _Work) -> types_pb2.Sample:
        if item.sampling.max_new_tokens <= 0 and item.sample.response_length > 0:
            # A continued sample with no budget left is already complete.
            return _with_status(item.sample, types_pb2.SAMPLE_STATUS_TRUNCATED)
        rid = work.rid  # "<work id>#<epoch>": unique even when a lease comes back re-issued
        try:
            request = make_request(rid, item.sample, item.sampling, self.default_max_new_tokens)
            self._attached_rids.add(rid)
            try:
                future = self.worker.submit(request)
                work.submitted = True
                if work.aborted:  # the abort came while it was passing the gate
                    self.worker.abort([rid])
                result = await future
            finally:
                self._attached_rids.discard(rid)
        except ValueError as e:
            # Unusable work (bad parameters, refused by the engine): answer FAILED, do not sit on the lease.
            log.error("work item %s refused: %s", item.work_id, e)
            return _with_status(item.sample, types_pb2.SAMPLE_STATUS_FAILED)
        return finish_sample(item.sample, result, self.tokenizer)

    async def _apply_weights(self, version: int) -> None:
        """Fetch, stage and verify `version`, then swap it in; report the outcome either way.

        A fetch that breaks (the connection cut, the coordinator briefly away, bytes damaged in
        transit) is tried again from scratch, with a fresh stager, up to `FETCH_ATTEMPTS` times
        within `WEIGHT_FETCH_TIMEOUT`; the old version serves meanwhile and nothing half-staged
        is ever applied. A refusal a second fetch cannot cure (NOT_FOUND, a manifest that does
        not match the model) ends it at once, and so does a newer version's notice.
        """
        async with self._weights_lock:  # versions are applied one at a time, in order
            current = self.worker.policy_version
            if version <= current:
                return
            t0 = time.monotonic()
            deadline = t0 + WEIGHT_FETCH_TIMEOUT
            error, stager = "", None
            for attempt in itertools.count(1):
                try:
                    stager, staged_version, tensors = await self._fetch(version, current, deadline)
                    error = ""
                    break
                except _FetchFailed as e:
                    error = str(e)
                    backoff = FETCH_RETRY_FIRST * 2 ** (attempt - 1)
                    why_not = self._why_not_retry(e, attempt, version, deadline - time.monotonic() - backoff)
                    if why_not:
                        if attempt > 1:
                            error += f" ({attempt} attempts; {why_not})"
                        break
                    telemetry.WEIGHT_FETCH_RETRIES.labels(reason=e.kind).inc()
                    log.warning(
                        "weights version %d: fetch attempt %d of %d failed (%s); retrying in %.1fs",
                        version,
                        attempt,
                        FETCH_ATTEMPTS,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
            if not error:
                try:
                    async with self.gate.swapping(drain=self.pause_mode == "drain"):
                        if self.pause_mode == "abort" and self._attached_rids:
                            # Each comes back ABORTED with what it generated; the coordinator
                            # continues it under the new weights. The engine thread runs the abort
                            # before the swap, so every token it kept is of the old version.
                            self.worker.abort(list(self._attached_rids))
                        await self.worker.load_weights(tensors, staged_version)
                except ValueError as e:  # the engine refusing a name/shape
                    error = str(e)
            seconds = time.monotonic() - t0
            telemetry.WEIGHT_APPLY_SECONDS.labels(ok=str(not error).lower()).observe(seconds)
            if error:
                log.warning("weights version %d refused, still serving %d: %s", version, current, error)
            else:
                log.info("now serving weights version %d (%s, %.2fs)", version, stager.format, seconds)
            if self._outbox is not None:
                self._outbox.put_nowait(
                    coordinator_pb2.RolloutEvent(
                        weights_applied=coordinator_pb2.WeightsApplied(
                            version=version, ok=not error, error=error, seconds=seconds
                        )
                    )
                )

    async def _fetch(self, version: int, current: int, deadline: float) -> tuple[Any, int, dict]:
        """One FetchWeights stream into a fresh stager: (stager, version, tensors), or `_FetchFailed`."""
        from slipstream.weights import WeightError, WeightStager, ipc

        # Decoded where the engine computes (one host-to-GPU copy of the blob, then FP8
        # dequantized on the GPU); a colocated (CUDA IPC) version is opened there too.
        device, dtype = _device_and_dtype(self.cfg)
        stager = WeightStager(self.expected_shapes, current, device=device, dtype=dtype)
        stub = coordinator_pb2_grpc.CoordinatorStub(self.coordinator)
        call = stub.FetchWeights(
            coordinator_pb2.FetchWeightsRequest(version=version),
            timeout=max(deadline - time.monotonic(), 0.001),
        )

        def bytes_failed(e: WeightError) -> _FetchFailed:
            # The stager checks the manifest against the model before any byte: a refusal there
            # is final. What fails after it (a chunk's hash or length, chunks missing) is the
            # bytes, which the coordinator verified when they were pushed: damaged or cut in
            # transit, so a second fetch can succeed. (A CUDA IPC handle is not bytes in transit.)
            colocated = stager.format.endswith(ipc.IPC_SUFFIX)
            return _FetchFailed(str(e), transient=bool(stager.format) and not colocated, kind="bytes")

        try:
            async for msg in call:
                try:
                    stager.add(msg)
                except WeightError as e:
                    raise bytes_failed(e) from None
            try:
                staged_version, tensors = await asyncio.to_thread(stager.finish)
            except WeightError as e:
                raise bytes_failed(e) from None
        except grpc.aio.AioRpcError as e:
            code = e.code()
            ours = code == grpc.StatusCode.CANCELLED and self.stopping.is_set()
            raise _FetchFailed(
                f"FetchWeights: {code.name}: {e.details()}",
                transient=code in _TRANSIENT_CODES and not ours,
                kind=code.name,
            ) from None
        finally:
            call.cancel()  # a stream left early (a bad chunk) must not keep streaming
        if staged_version != version:
            raise _FetchFailed(f"asked for version {version}, received {staged_version}", False, "bytes")
        return stager, staged_version, tensors

    def _why_not_retry(self, e: _FetchFailed, attempt: int, version: int, time_left: float) -> str:
        """Why this failed fetch is not tried again ('' when it is)."""
        if not e.transient:
            return "not transient"
        if attempt >= FETCH_ATTEMPTS:
            return "attempts exhausted"
        if self.stopping.is_set():
            return "stopping"
        if self._newest_notice > version:
            return f"version {self._newest_notice} announced"
        if time_left <= 0:
            return f"the {WEIGHT_FETCH_TIMEOUT:.0f}s fetch deadline is spent"
        return ""

    async def close(self) -> None:
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _device_and_dtype(cfg: Config):
    import torch

    device = cfg.infra.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.model.dtype)
    return device, dtype


def eos_token_ids(model_config: Any, tokenizer: Any) -> list[int]:
    """EOS ids from config.json and the tokenizer, both honoured (they differ in some releases)."""
    ids = list(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{model_config}: no EOS token in config.json or the tokenizer")
    return ids


async def _engine_death(worker: Any) -> None:
    await worker.died.wait()
    raise RuntimeError(f"the engine thread failed: {worker.error}")


async def serve(cfg: Config) -> None:
    import os
    import socket

    import torch

    from slipstream.models.hf import load_model, load_tokenizer
    from slipstream.rpc.channel import aio_channel
    from slipstream.rpc.server import install_signal_handlers, start_server
    from slipstream.services.rollout.engine import NativeEngine
    from slipstream.services.rollout.worker import EngineWorker
    from slipstream.weights import weights_to_sync

    torch.set_num_threads(cfg.infra.torch_threads or 1)
    device, dtype = _device_and_dtype(cfg)
    path = cfg.model.hf_checkpoint
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(path)
    engine = NativeEngine(
        model,
        eos_token_ids(model.config, tokenizer),
        max_batch_size=cfg.rollout.rollout_max_batch_size,
        max_seq_len=cfg.rollout.rollout_max_prompt_len + cfg.rollout.rollout_max_response_len,
        fp8=cfg.rollout.rollout_fp8,
        kv_cache_dtype=cfg.rollout.kv_cache_dtype,
    )
    synced = weights_to_sync(model.state_dict(), model.config.tie_word_embeddings)
    expected_shapes = {name: tuple(t.shape) for name, t in synced.items()}
    worker = EngineWorker(engine, asyncio.get_running_loop())
    worker.start()
    server_id = cfg.infra.server_id or f"{socket.gethostname()}:{os.getpid()}"
    coordinator = aio_channel(cfg.infra.coordinator_addr) if cfg.infra.coordinator_addr else None
    servicer = RolloutServer(cfg, server_id, worker, tokenizer, expected_shapes, coordinator)
    service = await start_server(
        lambda server: rollout_pb2_grpc.add_RolloutServicer_to_server(servicer, server),
        interceptors=[telemetry.RpcMetrics()],
        host=cfg.infra.host,
        port=cfg.infra.port,
        ready_file=cfg.infra.ready_file,
    )
    log.info("rollout server %s: model %s on %s (%s)", server_id, path, device, dtype)
    telemetry.watch("rollout", lambda: telemetry.rollout_metrics(worker), asyncio.get_running_loop())
    telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port)

    async def on_signal() -> None:
        servicer.stopping.set()

    install_signal_handlers(on_signal)
    waits = [asyncio.create_task(servicer.stopping.wait()), asyncio.create_task(_engine_death(worker))]
    if coordinator is not None:
        waits.append(asyncio.create_task(servicer.attach_forever()))
    else:
        log.info("no --coordinator-addr: serving Rollout.Generate only")
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # CoordinatorLost propagates to the CLI
    finally:
        servicer.stopping.set()
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        service.set_serving(False)
        worker.abort_all()  # Generate callers get their partial samples back, ABORTED
        await servicer.close()
        await service.stop(grace=2.0)
        worker.stop()
        if coordinator is not None:
            await coordinator.close()
