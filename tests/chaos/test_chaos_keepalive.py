"""Keepalive is effective: a peer that freezes without closing its socket (SIGSTOP: a hung
process, a dead host, a cut cable) breaks the streams open to it after keepalive time + timeout,
instead of leaving them hanging forever. Same options as production (`keepalive_options`),
with the times shrunk from 20 s + 10 s to 1 s + 1 s."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
from chaos_mesh import ChaosMesh, tiny_values
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.rpc.server import MAX_MESSAGE_BYTES, keepalive_options


def test_a_frozen_peer_breaks_its_streams(chaos_assets, tmp_path, redis_url):
    model, prompts = chaos_assets
    mesh = ChaosMesh(tmp_path / "run", tiny_values(model, prompts, tmp_path / "run", redis_url), auth=False)
    try:
        reward = mesh.start_reward()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *keepalive_options(1000, 1000)]
        ended: list[tuple[str, float]] = []
        first = threading.Event()

        def watch() -> None:
            with grpc.insecure_channel(reward.addr, options=options) as channel:
                try:
                    for _ in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                        first.set()
                except grpc.RpcError as e:
                    ended.append((e.code().name, time.monotonic()))  # type: ignore[attr-defined]

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        assert first.wait(10)
        os.kill(reward.popen.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        thread.join(15)
        os.kill(reward.popen.pid, signal.SIGCONT)
        assert ended and ended[0][0] == "UNAVAILABLE", ended
        detect_s = ended[0][1] - frozen_at
        assert detect_s < 5.0, detect_s
        print(f"frozen peer detected after {detect_s:.2f}s (keepalive 1s + timeout 1s)")
    finally:
        mesh.stop()
