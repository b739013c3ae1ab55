"""SIGTERM each service of a running, authenticated mesh: each turns NOT_SERVING first, then
exits 0 within the launcher's grace period (5 s; Kubernetes gives 30)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
from chaos_mesh import ChaosMesh, tiny_values, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from machine_speed import scaled

from slipstream.processes import GRACE_S


def _watch(addr: str, seen: list[str], started: threading.Event) -> None:
    """Record every status the health Watch stream reports until it ends."""
    with grpc.insecure_channel(addr) as channel:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            ):
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                started.set()
        except grpc.RpcError as e:
            seen.append(e.code().name)  # type: ignore[attr-defined]
            started.set()


def test_sigterm_each_service_is_graceful(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    mesh = ChaosMesh(
        tmp_path / "run", tiny_values(model, prompts, tmp_path / "run", redis_url, num_rollout=1000)
    )
    try:
        mesh.start_reward()
        mesh.start_coordinator()
        mesh.start_rollout(0)
        mesh.start_trainer()
        wait_for(mesh.metrics, 120, "a first training step")  # the mesh works, tokens and all
        exits = {}
        for name in ("trainer", "rollout-0", "coordinator", "reward"):
            service = mesh.services[name]
            seen: list[str] = []
            started = threading.Event()
            watcher = threading.Thread(target=_watch, args=(service.addr, seen, started), daemon=True)
            watcher.start()
            assert started.wait(5) and seen[0] == "SERVING", (name, seen)
            t0 = time.monotonic()
            service.popen.send_signal(signal.SIGTERM)
            code = service.popen.wait(timeout=scaled(30))
            exits[name] = (code, time.monotonic() - t0)
            watcher.join(5)
            assert seen[1:2] == ["NOT_SERVING"], (name, seen)  # the first thing a prober learns
            assert "Traceback" not in service.log(), service.log()[-3000:]
        for name, (code, seconds) in exits.items():
            assert code == 0, (name, code, mesh.services[name].log()[-2000:])
            assert seconds < GRACE_S, (name, seconds)
        print("sigterm exit seconds:", {n: round(s, 2) for n, (_, s) in exits.items()})
    finally:
        mesh.stop()
