"""Prometheus metrics: one registry per process, an RPC interceptor, and the /metrics endpoint.

Every service exports its own metrics on `--metrics-port` (0 = off), so Prometheus scrapes the
coordinator, each rollout server, the reward service and the trainer as separate targets and
the pod/container labels say which is which. What a service knows comes out three ways:

- **RPCs**, for free: `RpcMetrics` is a gRPC server interceptor, so every method a service
  serves is counted by status code, timed in a histogram and tracked while in flight, and the
  handlers carry no metrics code at all.
- **State**, read when scraped: buffer depth, the policy version of each rollout server,
  samples in flight. `watch(name, read, loop)` registers a function that builds those series
  from the live objects at scrape time (on the service's own event loop, so it reads a
  consistent state without locks). Nothing is copied on the hot path and nothing goes stale.
- **Events**, observed where they happen: a trained step (`observe_trainer_step`, with
  staleness, tokens/s and weight-push time), a weight version swapped in on a rollout server
  (`WEIGHT_APPLY_SECONDS`; fetches tried again, `WEIGHT_FETCH_RETRIES`).

The registry is ours, not prometheus_client's global one, so importing a library that
registers its own metrics never adds to (or collides with) what a service exports.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # CPU, memory, open fds of this process
PlatformCollector(registry=REGISTRY)

# Unary calls take milliseconds; streams (weights, Attach) take seconds to the whole run.
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_HANDLED = Counter(
    "slipstream_rpc_handled",
    "RPCs finished by this server, by gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "slipstream_rpc_duration_seconds",
    "Time from receiving an RPC to its last response (a stream: its whole life).",
    ["grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
    registry=REGISTRY,
)
RPC_IN_FLIGHT = Gauge(
    "slipstream_rpc_in_flight",
    "RPCs being handled right now (open streams included).",
    ["grpc_service", "grpc_method"],
    registry=REGISTRY,
)
WEIGHT_PUSH_SECONDS = Histogram(
    "slipstream_trainer_weight_push_seconds",
    "Trainer: quantize, pack and push one weight version to the coordinator.",
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
WEIGHT_APPLY_SECONDS = Histogram(
    "slipstream_rollout_weight_apply_seconds",
    "Rollout server: fetch, verify and swap in one weight version.",
    ["ok"],
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
WEIGHT_FETCH_RETRIES = Counter(
    "slipstream_rollout_weight_fetch_retries",
    "Rollout server: weight fetches tried again after a transient failure, by gRPC code "
    "('bytes': damaged or cut short in transit).",
    ["reason"],
    registry=REGISTRY,
)
TRAINER_STEP_SECONDS = Histogram(
    "slipstream_trainer_step_seconds",
    "Trainer: one step, waiting for data included.",
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
TRAINER_WAIT_SECONDS = Histogram(
    "slipstream_trainer_wait_data_seconds",
    "Trainer: time a step waited for the buffer to hold a batch (rollout is the bottleneck when high).",
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
STALENESS = Histogram(
    "slipstream_trainer_batch_staleness_max",
    "Trainer: policy versions between the trained policy and the oldest token of each batch.",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
    registry=REGISTRY,
)


# ---- RPCs ------------------------------------------------------------------------------------


def _code_name(context: Any, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context without a code: fall back below
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    return "UNKNOWN" if error is not None else "OK"


class _Call:
    """The metrics of one RPC, from its start to its end."""

    def __init__(self, service: str, method: str):
        self.labels = (service, method)
        self.t0 = time.perf_counter()
        RPC_IN_FLIGHT.labels(*self.labels).inc()

    def end(self, context: Any, error: BaseException | None) -> None:
        RPC_IN_FLIGHT.labels(*self.labels).dec()
        RPC_SECONDS.labels(*self.labels).observe(time.perf_counter() - self.t0)
        RPC_HANDLED.labels(*self.labels, _code_name(context, error)).inc()


def _unary_response(inner: Callable, service: str, method: str) -> Callable:
    async def behavior(request: Any, context: Any) -> Any:
        call = _Call(service, method)
        try:
            reply = inner(request, context)
            if inspect.isawaitable(reply):  # a coroutine handler; plain functions answer at once
                reply = await reply
        except BaseException as e:
            call.end(context, e)
            raise
        call.end(context, None)
        return reply

    return behavior


def _stream_response(inner: Callable, service: str, method: str) -> Callable:
    async def behavior(request: Any, context: Any):
        call = _Call(service, method)
        try:
            replies = inner(request, context)
            if hasattr(replies, "__aiter__"):
                async for reply in replies:
                    yield reply
            elif inspect.isawaitable(replies):  # a coroutine that answers with context.write()
                await replies
            else:
                for reply in replies:
                    yield reply
        except BaseException as e:
            call.end(context, e)
            raise
        call.end(context, None)

    return behavior


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts, times and tracks in flight every RPC of a `grpc.aio` server."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED itself
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary_response(handler.unary_unary, service, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_unary_response(handler.stream_unary, service, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream_response(handler.unary_stream, service, method))
        return handler._replace(stream_stream=_stream_response(handler.stream_stream, service, method))


# ---- state, read at scrape time ----------------------------------------------------------------

Read = Callable[[], Iterable[Metric]]


class _Watches(Collector):
    """The registered state readers; a name registered again replaces the old reader."""

    def __init__(self) -> None:
        self._readers: dict[str, tuple[Read, asyncio.AbstractEventLoop | None]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, read: Read, loop: asyncio.AbstractEventLoop | None) -> None:
        with self._lock:
            self._readers[name] = (read, loop)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            readers = list(self._readers.items())
        for name, (read, loop) in readers:
            try:
                if loop is None:
                    metrics = list(read())
                else:
                    metrics = _on_loop(loop, read)
            except Exception as e:  # noqa: BLE001 - one failing reader must not break the scrape
                log.warning("metrics %s: %s: %s", name, type(e).__name__, e)
                continue
            yield from metrics


def _on_loop(loop: asyncio.AbstractEventLoop, read: Read) -> list[Metric]:
    async def run() -> list[Metric]:
        return list(read())

    if loop.is_closed():
        return []
    return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=5.0)


_WATCHES = _Watches()
REGISTRY.register(_WATCHES)


def watch(name: str, read: Read, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Export what `read()` returns at every scrape; with `loop`, `read` runs on that event loop."""
    _WATCHES.add(name, read, loop)


def gauge(name: str, doc: str, value: float, labels: Mapping[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    return family


def message_gauges(prefix: str, message: Any, doc: str) -> Iterable[Metric]:
    """One gauge per numeric or bool field of a protobuf message (`prefix_<field>`).

    Fields added to the message later are exported without touching this code.
    """
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if isinstance(value, bool | int | float):  # repeated and map fields are containers
            yield gauge(f"{prefix}_{f.name}", f"{doc} ({f.name})", float(value))


def coordinator_metrics(status: Any) -> Iterable[Metric]:
    """The coordinator's status message and the policy version each rollout server serves."""
    yield from message_gauges("slipstream_coordinator", status, "Coordinator status")
    versions = GaugeMetricFamily(
        "slipstream_rollout_server_policy_version",
        "Policy version each attached rollout server serves (from its heartbeats).",
        labels=["server_id"],
    )
    for server_id, version in sorted(status.server_versions.items()):
        versions.add_metric([server_id], float(version))
    yield versions


def buffer_metrics(buffer: Any) -> Iterable[Metric]:
    """Replay-buffer depth: groups in the stream, entries read but not acknowledged, partials."""
    yield gauge("slipstream_buffer_groups", "Groups in the replay buffer stream.", buffer.num_groups())
    yield gauge(
        "slipstream_buffer_pending",
        "Buffer entries delivered to a trainer and not yet acknowledged.",
        buffer.num_pending(),
    )
    yield gauge(
        "slipstream_buffer_partials", "Partial trajectories waiting to be recycled.", buffer.partials.count()
    )


def rollout_metrics(worker: Any) -> Iterable[Metric]:
    """A rollout server's engine: its weights' version, requests running, tokens generated."""
    yield gauge(
        "slipstream_rollout_policy_version", "Policy version this server serves.", worker.policy_version
    )
    yield gauge("slipstream_rollout_running", "Sequences the engine is generating now.", worker.num_running)
    tokens = GaugeMetricFamily(
        "slipstream_rollout_generated_tokens",
        "Tokens generated since start (rate() of it is tokens/s).",
    )
    tokens.add_metric([], float(worker.num_generated_tokens))
    yield tokens


def reward_metrics(servicer: Any) -> Iterable[Metric]:
    """The reward service's samples scored and failed (RPC counts come from the interceptor)."""
    yield gauge("slipstream_reward_scored", "Samples scored since start.", servicer.num_scored)
    yield gauge("slipstream_reward_failed", "Samples whose reward failed since start.", servicer.num_failed)


# ---- events ------------------------------------------------------------------------------------

_last_step: dict[str, float] = {}


def observe_trainer_step(row: Mapping[str, Any]) -> None:
    """One trainer step's `metrics.jsonl` row: histograms of its durations, gauges of the rest."""
    seconds = float(row.get("wait_data_s", 0.0)) + float(row.get("compute_s", 0.0))
    TRAINER_STEP_SECONDS.observe(seconds + float(row.get("push_weights_s", 0.0)))
    TRAINER_WAIT_SECONDS.observe(float(row.get("wait_data_s", 0.0)))
    if row.get("push_weights_s"):
        WEIGHT_PUSH_SECONDS.observe(float(row["push_weights_s"]))
    if "staleness_max" in row:
        STALENESS.observe(float(row["staleness_max"]))
    _last_step.clear()
    _last_step.update(
        {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    )


def _trainer_step_gauges() -> Iterable[Metric]:
    # Every numeric field of the last row: step, policy_version, tokens_per_s, staleness_mean, ...
    for key, value in sorted(_last_step.items()):
        yield gauge(f"slipstream_trainer_{key}", f"Trainer, last step: {key}", value)


watch("trainer_step", _trainer_step_gauges)


# ---- the endpoint ------------------------------------------------------------------------------


def serve_metrics(host: str, port: int, rank_zero_only: bool = False) -> int | None:
    """Start the /metrics HTTP endpoint in a daemon thread; port 0 means off. Returns the port.

    Under torchrun every rank runs the same command; with `rank_zero_only` only rank 0 (the
    trainer's face to the mesh) binds the port.
    """
    if not port or (rank_zero_only and os.environ.get("RANK", "0") != "0"):
        return None
    start_http_server(port, addr=host, registry=REGISTRY)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
