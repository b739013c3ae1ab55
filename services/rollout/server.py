"""The rollout server: one engine, its own `Rollout` endpoint, and a client of the coordinator.

`serve()` builds the parts once, from the config, and wires them:
- the engine, chosen by --rollout-engine (`engine/base.py` says what any engine must offer;
  the native one is `engine/native.py`), run in its own thread by `worker.py`;
- the coordinator client (`attach.py`): the `Attach` stream that brings training work and
  weight notices, with the weight fetch (`weights_fetch.py`) it swaps new versions in from;
- the `Rollout` service below: `Generate` runs samples through the same engine directly
  (evaluation, tests, benchmarks), past the version gate; `GetInfo` says what this server is;
- with --http-port, SGLang's HTTP API (`http_api.py`: /generate, /health, /model_info,
  /abort_request) on the same loop and the same engine worker, for slime-style generate functions;
- with --custom-generate-function-path, the user's multi-turn function (`custom_generate.py`)
  generates each attached sample, posting to that HTTP API (started on any free port if
  --http-port is 0) or using its in-process client.

Sample assembly, wire to engine and back, is `samples.py`; the settings the parts read are
`settings.py`. Without --coordinator-addr the server only answers `Rollout.Generate`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING

import grpc

from slipstream import telemetry
from slipstream.config import Config
from slipstream.proto import rollout_pb2, rollout_pb2_grpc
from slipstream.services.rollout import late_compiles
from slipstream.services.rollout.attach import CoordinatorClient
from slipstream.services.rollout.engine import Engine
from slipstream.services.rollout.samples import Tokenizer, eos_token_ids, finish_sample, make_request
from slipstream.services.rollout.settings import EngineConfig, ServerConfig
from slipstream.services.rollout.worker import EngineWorker

if TYPE_CHECKING:
    from slipstream.models import Qwen3ForCausalLM

log = logging.getLogger(__name__)


class RolloutService(rollout_pb2_grpc.RolloutServicer):
    def __init__(self, settings: ServerConfig, worker: EngineWorker, tokenizer: Tokenizer):
        self.settings = settings
        self.worker = worker
        self.tokenizer = tokenizer
        self._rids = itertools.count(1)

    async def Generate(self, request, context):
        if not request.samples:
            return rollout_pb2.GenerateReply()
        if any(not s.tokens for s in request.samples):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "every sample needs prompt tokens")
        default_max_new_tokens = self.settings.default_max_new_tokens
        try:
            requests = [
                make_request(f"gen{next(self._rids)}", s, request.sampling, default_max_new_tokens)
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
            server_id=self.settings.server_id,
            policy_version=self.worker.policy_version,
            num_running=self.worker.num_running,
            engine=self.worker.engine.name,
            num_generated_tokens=self.worker.num_generated_tokens,
        )


def build_engine(settings: EngineConfig, model: Qwen3ForCausalLM, eos_ids: list[int]) -> Engine:
    """The engine --rollout-engine names, serving `model` (a new engine is one more branch)."""
    if settings.unified_fp8:  # version 0 as the unified FP8 trainer computes it; later ones come rounded
        from slipstream.quant import round_fp8_weights_

        round_fp8_weights_(model)
    if settings.engine == "native":
        from slipstream.services.rollout.engine.native import NativeEngine

        return NativeEngine(
            model,
            eos_ids,
            max_batch_size=settings.max_batch_size,
            max_seq_len=settings.max_seq_len,
            fp8=settings.fp8,
            kv_cache_dtype=settings.kv_cache_dtype,
            int4_targets=settings.int4_targets,
            draft=_draft(settings, model),
            speculative_num_steps=settings.speculative_num_steps,
            true_on_policy=settings.true_on_policy,
        )
    raise ValueError(f"--rollout-engine {settings.engine}: no such engine")


def _draft(settings: EngineConfig, model: Qwen3ForCausalLM):
    """The draft head to decode speculatively with (None: no drafting), of version 0."""
    if not settings.speculative_num_steps:
        return None
    from slipstream.models.draft import init_draft, load_draft

    if settings.draft_model_path:
        return load_draft(settings.draft_model_path, model.config, settings.mtp_num_layers)
    return init_draft(model.config, settings.mtp_num_layers)


async def _engine_death(worker: EngineWorker) -> None:
    await worker.died.wait()
    raise RuntimeError(f"the engine thread failed: {worker.error}")


async def _start_http(
    settings: ServerConfig,
    engine_cfg: EngineConfig,
    worker: EngineWorker,
    tokenizer,
    vocab_size: int,
    host: str,
    wanted: bool,
):
    """SGLang's HTTP API on --http-port (any free port when 0 and `wanted`: a custom generate
    function posts to it), on this loop, in front of the same worker: (runner, api, port), or Nones."""
    if not settings.http_port and not wanted:
        return None, None, 0
    from slipstream.services.rollout.http_api import HttpApi, start_http

    api = HttpApi(
        worker,
        tokenizer,
        model_path=engine_cfg.model_path,
        default_max_new_tokens=settings.default_max_new_tokens,
        vocab_size=vocab_size,
    )
    runner, port = await start_http(api, host, settings.http_port)
    log.info("SGLang-compatible HTTP API on http://%s:%d (/generate)", host, port)
    return runner, api, port


def _custom_generator(cfg: Config, worker: EngineWorker, tokenizer, vocab_size: int, api, http_port: int):
    """The --custom-generate-function-path runner (None without one); its `args` point
    sglang_router_ip/port at --sglang-router-ip/--sglang-router-port, else at this server's HTTP API."""
    path = cfg.rollout.custom_generate_function_path
    if not path:
        return None
    from slipstream.services.rollout.custom_generate import (
        CustomGenerateConfig,
        CustomGenerator,
        load_generate_function,
    )

    fn = load_generate_function(path)
    args = cfg.as_namespace()
    args.sglang_router_ip = cfg.infra.sglang_router_ip or cfg.infra.host
    args.sglang_router_port = cfg.infra.sglang_router_port or http_port
    settings = CustomGenerateConfig(
        max_turns=cfg.rollout.custom_generate_max_turns,
        timeout=cfg.rollout.custom_generate_timeout,
        max_response_len=cfg.rollout.rollout_max_response_len,
    )
    log.info(
        "generating with %s (its /generate: %s:%s)", path, args.sglang_router_ip, args.sglang_router_port
    )
    return CustomGenerator(fn, args, settings, worker, tokenizer, vocab_size=vocab_size, http=api)


async def _shut_down(service, worker: EngineWorker, http_runner, client, coordinator) -> None:
    """Stop serving, hand back what runs (ABORTED), then close every part, engine thread last."""
    service.set_serving(False)
    worker.abort_all()  # Generate callers get their partial samples back, ABORTED
    if http_runner is not None:
        await http_runner.cleanup()
    if client is not None:
        await client.close()
    await service.stop(grace=2.0)
    worker.stop()
    if coordinator is not None:
        await coordinator.close()


async def serve(cfg: Config) -> None:
    import torch

    from slipstream.models.hf import load_model, load_tokenizer
    from slipstream.rpc.channel import aio_channel
    from slipstream.rpc.server import install_signal_handlers, start_server
    from slipstream.services.rollout.weights_fetch import WeightFetcher
    from slipstream.weights import weights_to_sync

    torch.set_num_threads(cfg.infra.torch_threads or 1)
    engine_cfg = EngineConfig.from_sections(
        cfg.model, cfg.rollout, cfg.infra, cuda_available=torch.cuda.is_available(), train=cfg.train
    )
    settings = ServerConfig.from_sections(cfg.rollout, cfg.infra)
    device, dtype = engine_cfg.device, engine_cfg.torch_dtype
    model = load_model(engine_cfg.model_path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(engine_cfg.model_path)
    # The checkpoint's names and shapes, what every version is checked against: taken before the
    # engine swaps in its FP8 / W4A16 layers (a W4A16 layer holds no [out, in] weight).
    synced = weights_to_sync(model.state_dict(), model.config.tie_word_embeddings)
    expected_shapes = {name: tuple(t.shape) for name, t in synced.items()}
    if engine_cfg.draft_in_weights:  # every version carries the draft (--enable-mtp-training)
        from slipstream.models.draft import draft_shapes

        expected_shapes.update(draft_shapes(model.config, engine_cfg.mtp_num_layers))
    engine = build_engine(engine_cfg, model, eos_token_ids(model.config, tokenizer))
    started = time.perf_counter()
    if captured := engine.warm_up():  # before it serves: the first batches replay at once
        log.info("rollout server %s: %d decode graphs captured in %.1f s", settings.server_id,
                 captured, time.perf_counter() - started)  # fmt: skip
    if device.startswith("cuda"):
        late_compiles.watch(settings.server_id)
    worker = EngineWorker(engine, asyncio.get_running_loop())
    worker.start()
    stopping = asyncio.Event()
    # Before the gRPC server: its ready file says every port of this server answers.
    vocab_size = model.config.vocab_size
    http_runner, http_api, http_port = await _start_http(
        settings, engine_cfg, worker, tokenizer, vocab_size, cfg.infra.host,
        wanted=bool(cfg.rollout.custom_generate_function_path),
    )  # fmt: skip
    custom = _custom_generator(cfg, worker, tokenizer, vocab_size, http_api, http_port)
    coordinator = aio_channel(settings.coordinator_addr) if settings.coordinator_addr else None
    client = None
    if coordinator is not None:
        fetcher = WeightFetcher(
            coordinator,
            expected_shapes,
            device,
            dtype,
            stopping,
            keep_int4=bool(engine_cfg.int4_targets),
            keep_fp8=engine_cfg.fp8,
            server_id=settings.server_id,
        )
        client = CoordinatorClient(settings, coordinator, worker, tokenizer, fetcher, stopping, custom)
    servicer = RolloutService(settings, worker, tokenizer)
    service = await start_server(
        lambda server: rollout_pb2_grpc.add_RolloutServicer_to_server(servicer, server),
        interceptors=[telemetry.RpcMetrics()],
        host=cfg.infra.host,
        port=cfg.infra.port,
        ready_file=cfg.infra.ready_file,
    )
    log.info(
        "rollout server %s: model %s on %s (%s)", settings.server_id, engine_cfg.model_path, device, dtype
    )
    telemetry.watch("rollout", lambda: telemetry.rollout_metrics(worker), asyncio.get_running_loop())
    telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port)

    async def on_signal() -> None:
        stopping.set()

    install_signal_handlers(on_signal)
    waits = [asyncio.create_task(stopping.wait()), asyncio.create_task(_engine_death(worker))]
    if client is not None:
        waits.append(asyncio.create_task(client.attach_forever()))
    else:
        log.info("no --coordinator-addr: serving Rollout.Generate only")
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # CoordinatorLost propagates to the CLI
    finally:
        stopping.set()
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await _shut_down(service, worker, http_runner, client, coordinator)
