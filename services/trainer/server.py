"""The trainer process: a small gRPC endpoint (health, GetState) around the training loop.

The loop runs in a worker thread (torch releases the GIL in its kernels); the event loop
serves health checks meanwhile. SIGTERM asks the loop to stop between steps.
"""

from __future__ import annotations

import asyncio
import logging
import os

from slipstream import telemetry
from slipstream.config import Config
from slipstream.proto import trainer_pb2, trainer_pb2_grpc
from slipstream.rpc.server import install_signal_handlers, start_server

from .loop import train
from .state import TrainerState

log = logging.getLogger("slipstream.trainer")


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, state: TrainerState):
        self.state = state

    async def GetState(self, request, context):  # noqa: N802 - gRPC method name
        s = self.state
        return trainer_pb2.TrainerState(
            step=s.step,
            policy_version=s.policy_version,
            num_groups_consumed=s.num_groups_consumed,
            finished=s.finished,
        )


async def serve(cfg: Config) -> None:
    state = TrainerState()
    if int(os.environ.get("RANK", "0")) != 0:
        # A torchrun rank other than 0 serves nothing: rank 0 is the trainer's face to the mesh.
        await asyncio.to_thread(train, cfg, state)
        return
    service = await start_server(
        lambda server: trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(state), server),
        interceptors=[telemetry.RpcMetrics()],
        host=cfg.infra.host,
        port=cfg.infra.port,
        ready_file=cfg.infra.ready_file,
        up=False,  # up once the model is loaded and the coordinator reached (loop.train)
    )

    async def on_signal() -> None:
        log.info("stop requested")
        await service.health.enter_graceful_shutdown()  # probers learn first
        state.stop.set()

    install_signal_handlers(on_signal)
    if telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port, rank_zero_only=True):
        state.observers.append(telemetry.observe_trainer_step)
    try:
        await asyncio.to_thread(train, cfg, state)
    finally:
        await service.stop(grace=1.0)
