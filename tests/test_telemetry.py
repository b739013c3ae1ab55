"""Prometheus metrics: the RPC interceptor on a real grpc.aio server, scrape-time state read on
the service's event loop, trainer-step events, buffer depth from a real Redis, all read back
through the real /metrics HTTP endpoint."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from slipstream import telemetry
from slipstream.proto import types_pb2
from slipstream.rpc.channel import aio_channel
from slipstream.rpc.server import start_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return telemetry.serve_metrics("127.0.0.1", _free_port())


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint as {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _echo_handlers() -> grpc.GenericRpcHandler:
    """A tiny test service: methods that succeed, abort and raise, and an endless server stream."""

    async def ok(request: bytes, context) -> bytes:
        return request

    async def refuse(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")

    async def crash(request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    async def ticks(request: bytes, context):
        while True:
            yield b"tick"
            await asyncio.sleep(0.05)

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {"Ok": ok, "Refuse": refuse, "Crash": crash}.items()
    }
    handlers["Ticks"] = grpc.unary_stream_rpc_method_handler(ticks)
    return grpc.method_handlers_generic_handler("test.Echo", handlers)


def test_interceptor_counts_times_and_codes_every_rpc(metrics_port):
    before = scrape(metrics_port)

    async def main() -> None:
        service = await start_server(
            lambda server: server.add_generic_rpc_handlers((_echo_handlers(),)),
            interceptors=[telemetry.RpcMetrics()],
        )
        channel = aio_channel(f"127.0.0.1:{service.port}")
        call = lambda m: channel.unary_unary(f"/test.Echo/{m}")  # noqa: E731
        assert await call("Ok")(b"hi", timeout=5) == b"hi"
        assert await call("Ok")(b"again", timeout=5) == b"again"
        for method, code in (
            ("Refuse", grpc.StatusCode.INVALID_ARGUMENT),
            ("Crash", grpc.StatusCode.UNKNOWN),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(method)(b"x", timeout=5)
            assert e.value.code() == code
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A server stream, cancelled by the client once it has seen a message.
        ticks = channel.unary_stream("/test.Echo/Ticks")(b"")
        assert await anext(aiter(ticks)) == b"tick"
        during = await asyncio.to_thread(scrape, metrics_port)
        assert value(during, "slipstream_rpc_in_flight", grpc_service="test.Echo", grpc_method="Ticks") == 1
        ticks.cancel()
        await asyncio.sleep(0.3)
        await channel.close()
        await service.stop(0.5)

    asyncio.run(main())
    after = scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    handled = "slipstream_rpc_handled_total"
    assert delta(handled, grpc_service="test.Echo", grpc_method="Ok", grpc_code="OK") == 2
    assert delta(handled, grpc_service="test.Echo", grpc_method="Refuse", grpc_code="INVALID_ARGUMENT") == 1
    assert delta(handled, grpc_service="test.Echo", grpc_method="Crash", grpc_code="UNKNOWN") == 1
    assert delta(handled, grpc_service="test.Echo", grpc_method="Ticks", grpc_code="CANCELLED") == 1
    assert delta(handled, grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK") == 1
    assert delta("slipstream_rpc_duration_seconds_count", grpc_service="test.Echo", grpc_method="Ok") == 2
    # Every call is done: nothing left in flight.
    for m in ("Ok", "Refuse", "Crash", "Ticks"):
        assert value(after, "slipstream_rpc_in_flight", grpc_service="test.Echo", grpc_method=m) == 0


def test_state_is_read_on_the_services_event_loop(metrics_port):
    class Engine:  # stands in for state a service keeps; the reader must run on its loop
        policy_version = 7
        num_running = 3
        num_generated_tokens = 1234

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        seen_loops = []

        def read():
            seen_loops.append(asyncio.get_running_loop())
            return telemetry.rollout_metrics(Engine)

        telemetry.watch("test_rollout", read, loop)
        samples = await asyncio.to_thread(scrape, metrics_port)
        assert seen_loops == [loop]
        return samples

    samples = asyncio.run(main())
    assert value(samples, "slipstream_rollout_policy_version") == 7
    assert value(samples, "slipstream_rollout_running") == 3
    assert value(samples, "slipstream_rollout_generated_tokens") == 1234
    # The loop is gone: the reader is skipped, the scrape still answers.
    assert ("slipstream_rollout_running", ()) not in scrape(metrics_port)


def test_coordinator_status_and_buffer_depth(metrics_port, redis_url, run_id):
    from slipstream.buffer.replay import ReplayBuffer
    from slipstream.proto import coordinator_pb2

    status = coordinator_pb2.CoordinatorStatus(
        policy_version=4,
        num_samples_in_flight=12,
        num_rollout_servers=2,
        server_versions={"rollout-0": 4, "rollout-1": 3},
    )
    with ReplayBuffer(redis_url, run_id) as buffer:
        for i in range(3):
            sample = types_pb2.Sample(uid=f"g{i}/0", tokens=[1, 2])
            buffer.put_group(types_pb2.Group(group_id=f"g{i}", samples=[sample]))
        buffer.read_groups("trainer-0", 2, block_ms=0)  # two delivered, not acknowledged
        telemetry.watch("test_coordinator", lambda: telemetry.coordinator_metrics(status))
        telemetry.watch("test_buffer", lambda: telemetry.buffer_metrics(buffer))
        samples = scrape(metrics_port)
    assert value(samples, "slipstream_coordinator_policy_version") == 4
    assert value(samples, "slipstream_coordinator_num_samples_in_flight") == 12
    assert value(samples, "slipstream_coordinator_finished") == 0
    assert value(samples, "slipstream_rollout_server_policy_version", server_id="rollout-0") == 4
    assert value(samples, "slipstream_rollout_server_policy_version", server_id="rollout-1") == 3
    assert value(samples, "slipstream_buffer_groups") == 3
    assert value(samples, "slipstream_buffer_pending") == 2
    assert value(samples, "slipstream_buffer_partials") == 0


def test_trainer_step_events(metrics_port):
    before = scrape(metrics_port)
    row = {
        "step": 5,
        "policy_version": 5,
        "tokens_per_s": 321.5,
        "staleness_mean": 0.5,
        "staleness_max": 1,
        "wait_data_s": 0.2,
        "compute_s": 1.0,
        "push_weights_s": 0.3,
        "accuracy": 0.75,
    }
    telemetry.observe_trainer_step(row)
    telemetry.observe_trainer_step({**row, "step": 6, "push_weights_s": 0.0})
    after = scrape(metrics_port)
    assert value(after, "slipstream_trainer_step") == 6
    assert value(after, "slipstream_trainer_tokens_per_s") == 321.5
    assert value(after, "slipstream_trainer_staleness_max") == 1

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Only the step that pushed weights counts as a weight sync.
    assert delta("slipstream_trainer_weight_push_seconds_count") == 1
    assert delta("slipstream_trainer_weight_push_seconds_sum") == pytest.approx(0.3)
    assert delta("slipstream_trainer_step_seconds_count") == 2
    assert delta("slipstream_trainer_batch_staleness_max_bucket", le="1.0") == 2
    assert delta("slipstream_trainer_batch_staleness_max_bucket", le="0.0") == 0


def test_metrics_port_zero_is_off():
    assert telemetry.serve_metrics("127.0.0.1", 0) is None
