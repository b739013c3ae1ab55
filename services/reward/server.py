"""The reward service: `Reward.Score` over gRPC, one result per sample, in request order.

The scorer is picked once at start (`build_scorer`): `--custom-rm-path` wins, then a remote
endpoint (`--rm-url`, or `--rm-type remote_rm`), then the built-in rule `--rm-type`. A request's
samples are scored concurrently (remote endpoints and user functions are mostly waiting), at
most `max_concurrency` at a time across all requests.

A request is a group (the coordinator scores a finished group in one call; samples are split by
`group_index` should one carry several). With --group-rm a --custom-rm-path function scores the
group in one call (slime's `(args, samples) -> list`); a --custom-reward-post-process-path hook
then sees the group's scored samples and replaces their rewards. When either raises, every
sample of that group fails with the line.

Per-sample failures are the boundary here: whatever a reward function raises, or a remote
endpoint answers, becomes `failed=True` with a one-line `error` for that sample alone, so the
coordinator can mark it FAILED and count it; the other samples of the batch are unaffected.
Except when a remote endpoint is down (its circuit breaker is open, breaker.py): that is no
sample's fault, so the whole call fails with UNAVAILABLE, naming the endpoint and the error, and
the coordinator pauses admission and tries again later instead of failing the samples.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

import grpc

from slipstream import telemetry
from slipstream.config import Config
from slipstream.proto import reward_pb2, reward_pb2_grpc, types_pb2
from slipstream.rpc.convert import sample_from_proto
from slipstream.rpc.server import Service, install_signal_handlers, start_server
from slipstream.services.reward import RewardConfigError
from slipstream.services.reward.breaker import EndpointDown
from slipstream.services.reward.custom import CustomReward, PostProcess
from slipstream.services.reward.remote import RemoteReward, check_reachable, read_header_file
from slipstream.services.reward.rules import RULES, RuleFn, warm_up
from slipstream.types import Sample

log = logging.getLogger(__name__)

Scorer = Callable[[Sample], Awaitable[float]]
MAX_CONCURRENCY = 64
MAX_ERROR_CHARS = 500
NO_RETRY = (("grpc-retry-pushback-ms", "-1"),)  # gRPC's retry policy (A6): do not retry this call


class RuleReward:
    """A built-in rule, `rule(response, label)`; cheap, so it runs on the event loop."""

    def __init__(self, name: str, fn: RuleFn):
        self.name = name
        self.fn = fn

    async def __call__(self, sample: Sample) -> float:
        if sample.label is None:
            raise ValueError(f"rm-type {self.name}: sample has no label")
        return self.fn(sample.response, sample.label)


def build_scorer(cfg: Config) -> Scorer:
    """The reward source the flags select; RewardConfigError (one line) if they select none."""
    r = cfg.reward
    if r.custom_rm_path:
        return CustomReward.from_path(r.custom_rm_path, cfg.as_namespace())
    if r.rm_url or r.rm_type == "remote_rm":
        if not r.rm_url:
            raise RewardConfigError("--rm-type remote_rm needs --rm-url")
        headers = read_header_file(r.rm_auth_header_file) if r.rm_auth_header_file else None
        return RemoteReward(
            r.rm_url,
            timeout=r.rm_timeout,
            max_retries=r.rm_max_retries,
            headers=headers,
            reward_key=r.reward_key or "reward",
        )
    if r.rm_type not in RULES:
        choices = ", ".join([*RULES, "remote_rm"])
        raise RewardConfigError(f"--rm-type {r.rm_type}: unknown (choices: {choices}; or --custom-rm-path)")
    return RuleReward(r.rm_type, RULES[r.rm_type])


def describe(cfg: Config) -> str:
    r = cfg.reward
    if r.custom_rm_path:
        return f"custom {r.custom_rm_path}" + (" (--group-rm)" if r.group_rm else "")
    if r.rm_url:
        return f"remote {r.rm_url}"
    return f"rule {r.rm_type}"


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:MAX_ERROR_CHARS]


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(
        self,
        scorer: Scorer,
        max_concurrency: int = MAX_CONCURRENCY,
        *,
        group_rm: bool = False,
        post_process: PostProcess | None = None,
    ):
        self.scorer = scorer
        self.group_rm = group_rm and isinstance(scorer, CustomReward)  # slime: rules score one by one
        self.post_process = post_process
        self._slots = asyncio.Semaphore(max_concurrency)
        self.num_scored = 0
        self.num_failed = 0

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreReply:
        if not (self.group_rm or self.post_process):
            results = await asyncio.gather(*(self._score_one(p) for p in request.samples))
        else:
            groups: dict[int, list[int]] = {}
            for i, p in enumerate(request.samples):
                groups.setdefault(p.group_index, []).append(i)
            results = [None] * len(request.samples)
            for idx, got in zip(
                groups.values(),
                await asyncio.gather(
                    *(self._score_group([request.samples[i] for i in g]) for g in groups.values())
                ),
                strict=True,
            ):
                for i, r in zip(idx, got, strict=True):
                    results[i] = r
        down = [r for r in results if isinstance(r, EndpointDown)]
        if down:  # the samples are not at fault: nothing is scored, the caller tries again later
            # ...and learns it now: a negative pushback stops gRPC's own retries of UNAVAILABLE.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(down[-1]), NO_RETRY)
        return reward_pb2.ScoreReply(results=results)

    async def _score_group(
        self, protos: list[types_pb2.Sample]
    ) -> list[reward_pb2.ScoreResult | EndpointDown]:
        """A group's results: one --group-rm call or one per sample, then the post-process hook."""
        if self.group_rm:
            try:
                async with self._slots:
                    rewards = await self.scorer.score_group([sample_from_proto(p) for p in protos])
                results = [reward_pb2.ScoreResult(reward=r) for r in rewards]
            except Exception as e:  # noqa: BLE001 - the group's boundary: every sample fails with the line
                return self._group_failed(protos, e, "group reward")
            self.num_scored += len(results)
        else:
            results = list(await asyncio.gather(*(self._score_one(p) for p in protos)))
        if self.post_process is None:
            return results
        ok = [i for i, r in enumerate(results) if isinstance(r, reward_pb2.ScoreResult) and not r.failed]
        if not ok:
            return results
        samples = []
        for i in ok:
            sample = sample_from_proto(protos[i])
            sample.reward = results[i].reward
            samples.append(sample)
        try:
            new = await self.post_process(samples)
        except Exception as e:  # noqa: BLE001
            return self._group_failed(protos, e, "reward post-process")
        for i, r in zip(ok, new, strict=True):
            results[i] = reward_pb2.ScoreResult(reward=r)
        return results

    def _group_failed(
        self, protos: list[types_pb2.Sample], e: Exception, what: str
    ) -> list[reward_pb2.ScoreResult]:
        self.num_failed += len(protos)
        log.warning("%s failed for a group of %d: %s", what, len(protos), _one_line(e))
        return [reward_pb2.ScoreResult(failed=True, error=_one_line(e)) for _ in protos]

    async def _score_one(self, proto: types_pb2.Sample) -> reward_pb2.ScoreResult | EndpointDown:
        async with self._slots:
            try:
                reward = float(await self.scorer(sample_from_proto(proto)))
                if not math.isfinite(reward):
                    raise ValueError(f"reward is {reward}")
            except EndpointDown as e:
                return e
            except Exception as e:  # noqa: BLE001 - the per-sample boundary: report, never crash
                self.num_failed += 1
                log.warning("reward failed for sample %s: %s", proto.uid or "?", _one_line(e))
                return reward_pb2.ScoreResult(failed=True, error=_one_line(e))
        self.num_scored += 1
        return reward_pb2.ScoreResult(reward=reward)


async def start_reward_server(cfg: Config) -> tuple[Service, RewardServicer]:
    """Build the scorer, check a remote endpoint is up, bind and start serving."""
    scorer = build_scorer(cfg)
    if isinstance(scorer, RemoteReward):
        await asyncio.to_thread(check_reachable, scorer.url, min(cfg.reward.rm_timeout, 5.0))
    if isinstance(scorer, RuleReward) and scorer.name == "math":
        warm_up()
    r = cfg.reward
    post = (
        PostProcess.from_path(r.custom_reward_post_process_path, cfg.as_namespace())
        if r.custom_reward_post_process_path
        else None
    )
    servicer = RewardServicer(scorer, group_rm=r.group_rm, post_process=post)

    def add_servicers(server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)

    service = await start_server(
        add_servicers,
        host=cfg.infra.host,
        port=cfg.infra.port,
        ready_file=cfg.infra.ready_file,
        interceptors=[telemetry.RpcMetrics()],
    )
    log.info("scoring with %s", describe(cfg))
    return service, servicer


async def serve(cfg: Config) -> None:
    """Serve until SIGTERM/SIGINT."""
    service, servicer = await start_reward_server(cfg)
    telemetry.watch("reward", lambda: telemetry.reward_metrics(servicer), asyncio.get_running_loop())
    telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port)
    install_signal_handlers(service.stop)
    await service.server.wait_for_termination()
    if isinstance(servicer.scorer, RemoteReward):
        servicer.scorer.close()
    log.info("stopped: %d scored, %d failed", servicer.num_scored, servicer.num_failed)
