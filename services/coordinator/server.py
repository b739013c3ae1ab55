"""The coordinator service: admission, leases, group assembly, weight relay, over gRPC.

Rollout servers dial in and hold one `Attach` stream each. The coordinator turns prompts
into GRPO groups (one prompt x `n_samples_per_prompt` samples), leases the samples of a
group to the least-loaded server with room for them, and collects results. When the last
sample of a group is in, the group is scored with one `Reward.Score` call and appended to
the replay buffer. A new group is admitted only while the staleness bound allows it, is
generated on weights at least as new as the version it was admitted under, and is stored in
deadline order (`admission.py`); a stream that ends gives its leases back and they are
re-dispatched.

Partial rollout: a sample that comes back ABORTED (its server swapped weights with
`--pause-generation-mode abort`, or over-sampling filled the batch and the coordinator
aborted what still ran) is written to the buffer's partial stream in Redis and, before any
new prompt is admitted, taken back and re-dispatched to continue under the newest weights.
With `--dynamic-sampling-filter-path` a finished group the filter rejects is counted and
dropped, and another prompt takes its place.

Weights pushed by the trainer are checked and kept (`weights_relay.py`); every attached
server is told the new version once its manifest passed and pulls it with `FetchWeights`, which
streams chunks while the push is still arriving (cut-through) and fails if the push does not land.

Everything runs on one asyncio loop, so the state below needs no locks: each handler
updates the ledger and calls `_dispatch()`, which hands out whatever may go out now.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from slipstream import telemetry
from slipstream.algorithms.staleness import StalenessBound
from slipstream.buffer.coordinator_store import CoordinatorStore, Snapshot
from slipstream.buffer.replay import BufferFull
from slipstream.config import Config
from slipstream.data import DataError, PromptCursor, PromptRecord, encode_prompt, load_prompts
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, reward_pb2_grpc, types_pb2
from slipstream.rollout_filters import FilterFn, keeps, load_filter
from slipstream.rpc.channel import aio_channel, wait_healthy
from slipstream.rpc.convert import SampleError, check_sample, sample_from_proto, sample_to_proto
from slipstream.rpc.server import Service, install_signal_handlers, start_server
from slipstream.services.coordinator.admission import may_store
from slipstream.services.coordinator.dispatch_log import DispatchLog
from slipstream.services.coordinator.groups import (
    Assignment,
    GroupState,
    Ledger,
    Slots,
    StaleResult,
    pick_server,
)
from slipstream.services.coordinator.journal import Journal, from_record, to_record
from slipstream.services.coordinator.scoring import score_with_retries
from slipstream.services.coordinator.weights_relay import PushError, WeightRelay, receive_push
from slipstream.types import Sample

log = logging.getLogger(__name__)

BUFFER_FULL_RETRY_S = 1.0
REDIS_CHECK_S = 1.0  # how often the coordinator asks Redis whether it restarted
EPOCH_BITS = 32  # lease epochs are (incarnation << EPOCH_BITS) + a per-sample count


class RedisLost(ConnectionError):
    """Redis stayed unreachable past --reconnect-timeout: the coordinator stops with this line."""


def sample_seed(base_seed: int, uid: str) -> int:
    """A per-sample sampling seed: reproducible for a run, distinct across samples (int63)."""
    digest = hashlib.sha256(f"{base_seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tokenize_prompts(tokenizer: Any, records: list[PromptRecord], cfg: Config) -> list[list[int]]:
    """Every prompt's tokens, checked against `--rollout-max-prompt-len` before serving."""
    out = []
    limit = cfg.rollout.rollout_max_prompt_len
    for i, record in enumerate(records, 1):
        try:
            tokens = encode_prompt(tokenizer, record.prompt, cfg.data.apply_chat_template)
        except DataError as e:
            raise DataError(f"{cfg.data.prompt_data}: record {i}: {e}") from None
        if len(tokens) > limit:
            raise DataError(
                f"{cfg.data.prompt_data}: record {i}: prompt is {len(tokens)} tokens, "
                f"longer than --rollout-max-prompt-len {limit}"
            )
        if not tokens:
            raise DataError(f"{cfg.data.prompt_data}: record {i}: prompt encodes to no tokens")
        out.append(tokens)
    return out


@dataclass
class Attached:
    """One rollout server's live `Attach` stream."""

    conn_id: str  # unique per stream: a server that reconnects gets a new one
    server_id: str
    max_concurrent: int
    version: int
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # RolloutCommand, None = close
    idle_s: float = 0.0  # engine idle seconds since its first heartbeat on this stream
    uptime_s: float = 0.0  # seconds since its first heartbeat on this stream
    idle_base: tuple[float, float] | None = None  # (idle, uptime) of that first heartbeat
    last_seen: float = field(default_factory=time.monotonic)  # its last event: the lease clock


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        cfg: Config,
        records: list[PromptRecord],
        prompt_tokens: list[list[int]],
        buffer: Any,
        reward: reward_pb2_grpc.RewardStub,
        group_filter: FilterFn | None = None,
        store: CoordinatorStore | None = None,
    ):
        self.cfg = cfg
        self.buffer = buffer  # slipstream.buffer.replay.ReplayBuffer (sync; called in a thread)
        self.store = store or CoordinatorStore(cfg.infra.redis_connect_url, cfg.infra.effective_run_id)
        self.reward = reward
        self.cursor = PromptCursor(records, shuffle=cfg.data.rollout_shuffle, seed=cfg.train.seed)
        # The cursor hands out records; their tokens were computed once at start.
        self._tokens = {id(r): t for r, t in zip(records, prompt_tokens, strict=True)}
        self.ledger = Ledger()
        self.relay = WeightRelay()
        self.conns: dict[str, Attached] = {}
        self._conn_seq = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        rm = cfg.reward
        self.score_timeout = max(cfg.infra.rpc_timeout, rm.rm_timeout * (rm.rm_max_retries + 1) + 5.0)
        r = cfg.rollout
        self.bound = StalenessBound.from_config(cfg)
        self.group_filter = group_filter
        self.args = cfg.as_namespace()  # what slime hooks receive as `args`
        self.unstored: dict[str, int] = {}  # group id -> deadline, for every group admitted, not yet stored
        self.ready: list[GroupState] = []  # scored and kept, waiting for their turn in the buffer
        self._store_queue: asyncio.Queue = asyncio.Queue()  # groups in buffer order
        self._storer: asyncio.Task | None = None
        self._aborting: set[str] = set()  # work ids an abort was sent for
        self._num_parking = 0  # partials being written to the partial stream
        self._taking = False  # a take_partials is under way
        # Counters (groups unless named otherwise).
        self.num_dispatched = 0
        self.num_accepted = 0  # given a buffer position (stored, or being stored)
        self.num_stored = 0  # in the buffer
        self.num_running = 0  # admitted, not yet given a position nor filtered nor lost
        self.num_reward_failures = 0  # samples
        self.num_partials_recycled = 0  # samples
        self.num_groups_filtered = 0
        self.num_stale_samples = 0
        self.rollout_idle_fraction = 0.0
        self._gone_idle = [0.0, 0.0]  # idle and uptime seconds of detached servers
        self._idle_mark = (0.0, 0.0)  # totals at the last trainer report
        self.num_dead_lettered = 0  # samples whose reward failed --reward-max-failures times
        self.num_lease_expiries = 0  # streams detached for lack of heartbeats
        self.trained_steps = 0
        self.finished = False
        # Durability (journal.py, buffer/coordinator_store.py). All Redis writes of the ledger
        # (journal rounds, stores, reloads) take this lock, so they never interleave.
        self._redis_lock = asyncio.Lock()
        self.journal = Journal(self.store, self._journal_snapshot, self._redis_lock)
        self.finishing: dict[str, GroupState] = {}  # complete, out of the ledger, not stored nor filtered
        self.incarnation = 0  # bumped at each resume from the journal; lease epochs are issued above it
        self.generation = 0  # bumped when the ledger is reloaded: work of an older generation is dropped
        self.redis_run_id = ""  # the Redis server's run_id: a new one means Redis restarted
        self._resync = asyncio.Event()  # a Redis write failed: reload from the journal once it answers
        self._background: list[asyncio.Task] = []
        self.fatal = ""  # why the coordinator must stop (Redis lost for good)
        self.on_fatal = lambda: None
        self.dispatch_log = DispatchLog(cfg.infra.run_dir)
        # Bounds every result is checked against (0 = unchecked; start_coordinator sets the vocabulary).
        self.vocab_size = 0
        self.max_tokens = r.rollout_max_prompt_len + r.rollout_max_response_len

    # ---- admission and dispatch --------------------------------------------------------
    @property
    def version(self) -> int:
        return self.relay.version

    def _admit(self) -> bool:
        # Parked partials go out before any new prompt: they are older work.
        return (
            not self.finished
            and not self.ledger.parked
            and self.bound.may_dispatch(self.version, self.num_accepted, self.num_running)
        )

    def _dispatch(self) -> None:
        """Store what may be stored, hand out queued samples, then admit new groups while there is room."""
        self._flush_ready()
        if self.bound.window_full(self.version, self.num_accepted):
            # The trainer cannot take another group before the next version: recycle what still runs.
            self._abort_running()
            return
        self._recycle_partials()
        slots = {cid: Slots(self.ledger.in_flight(cid), c.max_concurrent) for cid, c in self.conns.items()}
        n = self.cfg.rollout.n_samples_per_prompt
        while True:
            placed = self.ledger.place_next(slots)
            if placed:
                for a in placed:
                    self.conns[a.conn_id].outbox.put_nowait(self._work_item(a))
                continue
            if self.ledger.num_queued or pick_server(n, slots) is None or not self._admit():
                return
            self._new_group()

    def _abort_running(self) -> None:
        for cid, conn in self.conns.items():
            ids = [w for w in self.ledger.running_on(cid) if w not in self._aborting]
            if ids:
                self._aborting.update(ids)
                conn.outbox.put_nowait(
                    coordinator_pb2.RolloutCommand(abort=coordinator_pb2.AbortWork(work_ids=ids))
                )
                log.info("batch full: aborting %d samples on %s to recycle them", len(ids), conn.server_id)

    def _new_group(self) -> None:
        index, record = self.cursor.next()
        group_id = f"p{index}"
        tokens = self._tokens[id(record)]
        samples = [
            sample_to_proto(
                Sample(
                    uid=f"{group_id}/{i}",
                    group_index=index,
                    index=i,
                    prompt=record.prompt,
                    tokens=list(tokens),
                    label=record.label,
                    metadata=dict(record.metadata),
                )
            )
            for i in range(self.cfg.rollout.n_samples_per_prompt)
        ]
        version = self.version
        deadline = self.bound.accept_limit(version)
        self.ledger.add_group(group_id, samples, version=version, deadline=deadline)
        self.unstored[group_id] = deadline
        self.num_dispatched += 1
        self.num_running += 1
        self.journal.mark(group_id)
        self.dispatch_log.event("dispatched", group_id, [s.uid for s in samples])

    def _work_item(self, a: Assignment) -> coordinator_pb2.RolloutCommand:
        r = self.cfg.rollout
        sampling = types_pb2.SamplingParams(
            temperature=r.rollout_temperature,
            top_p=r.rollout_top_p,
            top_k=max(r.rollout_top_k, 0),
            # A continued (partial) sample only gets what is left of the response budget.
            max_new_tokens=r.rollout_max_response_len - a.sample.response_length,
            stop_token_ids=r.rollout_stop_token_ids,
            seed=sample_seed(self.cfg.train.seed, a.work_id),
        )
        # Fresh work is generated on the version it was admitted under (or newer); a partial
        # being continued goes on under the newest weights.
        work = coordinator_pb2.WorkItem(
            work_id=a.work_id,
            lease_epoch=a.epoch,
            sample=a.sample,
            sampling=sampling,
            min_policy_version=self.version if a.continued else a.group_version,
        )
        return coordinator_pb2.RolloutCommand(work=work)

    # ---- rollout servers ---------------------------------------------------------------
    async def Attach(self, request_iterator, context):
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Attach message must be Hello")
        hello = first.hello
        if hello.max_concurrent_samples <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Hello.max_concurrent_samples must be positive"
            )
        server_id = hello.server_id or context.peer()
        conn = Attached(
            f"{server_id}#{next(self._conn_seq)}",
            server_id,
            hello.max_concurrent_samples,
            hello.policy_version,
        )
        self.conns[conn.conn_id] = conn
        log.info(
            "rollout server %s attached (capacity %d, version %d)",
            server_id,
            conn.max_concurrent,
            conn.version,
        )
        if self.relay.held and self.relay.version > conn.version:  # not held: told when it is pushed
            conn.outbox.put_nowait(
                coordinator_pb2.RolloutCommand(
                    new_weights=coordinator_pb2.NewWeights(version=self.relay.version)
                )
            )
        reader = asyncio.create_task(self._read_events(conn, request_iterator))
        self._dispatch()
        try:
            while (cmd := await conn.outbox.get()) is not None:
                yield cmd
        finally:
            reader.cancel()
            self._detach(conn)

    async def _read_events(self, conn: Attached, events) -> None:
        try:
            async for event in events:
                self._on_event(conn, event)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("stream of %s broke: %s", conn.server_id, e)
        finally:
            conn.outbox.put_nowait(None)

    def _on_event(self, conn: Attached, event: coordinator_pb2.RolloutEvent) -> None:
        conn.last_seen = time.monotonic()  # any event renews the stream's leases
        kind = event.WhichOneof("kind")
        if kind == "result":
            self._on_result(conn, event.result)
        elif kind == "heartbeat":
            hb = event.heartbeat
            conn.version = hb.policy_version
            if conn.idle_base is None:  # time before it attached is not rollout idling
                conn.idle_base = (hb.idle_seconds, hb.uptime_seconds)
            conn.idle_s = hb.idle_seconds - conn.idle_base[0]
            conn.uptime_s = hb.uptime_seconds - conn.idle_base[1]
        elif kind == "weights_applied":
            w = event.weights_applied
            if w.ok:
                conn.version = w.version
                log.info("%s serves version %d (%.2fs)", conn.server_id, w.version, w.seconds)
            else:
                log.warning("%s could not apply version %d: %s", conn.server_id, w.version, w.error)
        else:
            log.warning("ignoring an unexpected %s event from %s", kind, conn.server_id)

    def _on_result(self, conn: Attached, result: coordinator_pb2.SampleResult) -> None:
        sample = result.sample
        try:
            check_sample(sample, self.vocab_size, self.max_tokens)
        except SampleError as e:
            # Garbage from a server (ids past the vocabulary, NaN log-probs...) must not reach the
            # trainer: the sample counts as FAILED, with the prompt only, and the run goes on.
            log.warning("result from %s refused: %s", conn.server_id, e)
            if result.work_id in self.ledger.leases:
                sample = types_pb2.Sample()
                sample.CopyFrom(self.ledger.sample_of(result.work_id))
                sample.status = types_pb2.SAMPLE_STATUS_FAILED
        try:
            group = self.ledger.accept_result(conn.conn_id, result.work_id, result.lease_epoch, sample)
        except StaleResult as e:
            log.info("ignored from %s: %s", conn.server_id, e)
            return
        self._aborting.discard(result.work_id)
        self.journal.mark(result.work_id.rsplit("/", 1)[0])
        if result.sample.status == types_pb2.SAMPLE_STATUS_ABORTED:
            self.num_partials_recycled += 1
            self._spawn(self._park(self.ledger.sample_of(result.work_id), self.generation))
        if group is not None:
            self.finishing[group.group_id] = group
            self._spawn(self._finish_group(group, self.generation))
        self._dispatch()

    def _detach(self, conn: Attached) -> None:
        if self.conns.pop(conn.conn_id, None) is None:
            return
        released = self.ledger.release(conn.conn_id)
        self._aborting.difference_update(w for w in list(self._aborting) if w not in self.ledger.leases)
        self._gone_idle[0] += conn.idle_s
        self._gone_idle[1] += conn.uptime_s
        log.info("rollout server %s detached; %d samples go to other servers", conn.server_id, released)
        self._dispatch()

    # ---- finished groups ---------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_group(self, group: GroupState, generation: int) -> None:
        """Score a complete group, run the dynamic filter, and queue it for its buffer position."""
        samples = group.finished_samples()

        def failed(sample: types_pb2.Sample, error: str) -> None:
            log.warning("reward failed for %s: %s", sample.uid, error)
            self.dispatch_log.event("reward_failed", group.group_id, [sample.uid])

        scored = await score_with_retries(
            self.reward, samples, self.score_timeout, self.cfg.reward.reward_max_failures, failed
        )
        if generation != self.generation:
            return  # the ledger was reloaded from Redis meanwhile: this group is someone else's now
        dead = []
        for sample, result in zip(samples, scored, strict=True):
            if result.failed:
                sample.status = types_pb2.SAMPLE_STATUS_FAILED  # never trained on
                sample.reward = 0.0
                self.num_reward_failures += 1
                self.num_dead_lettered += 1
                dead.append((sample, f"reward failed {result.attempts} times: {result.error}"))
            else:
                sample.reward = result.reward
        for sample, reason in dead:
            try:
                await asyncio.to_thread(
                    self.buffer.dead_letter, sample.SerializeToString(), reason, "reward", sample.uid
                )
            except redis.exceptions.RedisError as e:
                log.error("could not dead-letter %s (%s): %s", sample.uid, reason, e)
            self.dispatch_log.event("dead_lettered", group.group_id, [sample.uid])
        if generation != self.generation:
            return
        if self.group_filter is not None and not self._keep(group.group_id, samples):
            self.num_groups_filtered += 1
            self.num_running -= 1
            del self.unstored[group.group_id]
            self.finishing.pop(group.group_id, None)
            self.journal.drop(group.group_id)
            self.dispatch_log.event("filtered", group.group_id, [s.uid for s in samples])
            self._dispatch()  # another prompt takes its place
            return
        self.ready.append(group)
        self._dispatch()

    def _keep(self, group_id: str, samples: list[types_pb2.Sample]) -> bool:
        try:
            return keeps(self.group_filter(self.args, [sample_from_proto(s) for s in samples]))
        except Exception:  # noqa: BLE001 - a broken user filter keeps the group rather than lose it
            log.exception("--dynamic-sampling-filter-path failed on group %s; keeping it", group_id)
            return True

    def _flush_ready(self) -> None:
        """Give buffer positions to ready groups, earliest deadline first, while the bound allows."""
        while self.ready and not self.bound.window_full(self.version, self.num_accepted):
            for group in sorted(self.ready, key=lambda g: g.deadline):
                others = [d for gid, d in self.unstored.items() if gid != group.group_id]
                if may_store(self.num_accepted, group.deadline, others):
                    break
            else:
                return  # each ready group would take a position an earlier, running group needs
            self.ready.remove(group)
            self._reserve_position(group)

    def _reserve_position(self, group: GroupState) -> None:
        position = self.num_accepted
        self.num_accepted += 1
        self.num_running -= 1
        del self.unstored[group.group_id]
        samples = group.finished_samples()
        stale = [
            s for s in samples if s.policy_versions and self.bound.is_stale(position, min(s.policy_versions))
        ]
        if stale:
            self.num_stale_samples += len(stale)
            log.warning(
                "group %s: %d samples hold tokens older than --max-staleness %d allows at position %d",
                group.group_id,
                len(stale),
                self.bound.max_staleness,
                position,
            )
        pb = types_pb2.Group(
            group_id=group.group_id, samples=samples, created_unix_ms=int(time.time() * 1000)
        )
        self._store_queue.put_nowait((self.generation, pb))
        if self._storer is None:
            self._storer = asyncio.create_task(self._store_loop())

    async def _store_loop(self) -> None:
        """Append groups to the buffer one at a time, in the order their positions were given.

        Each store is one transaction (`CoordinatorStore.store_group`): in the buffer and out of
        assembly together. A Redis error leaves it unknown whether the transaction ran, so the
        group is not retried: the coordinator reloads its state from Redis, which knows.
        """
        while True:
            generation, pb = await self._store_queue.get()
            while generation == self.generation:  # a reload drops what was queued before it
                try:
                    async with self._redis_lock:
                        if generation != self.generation:
                            break
                        # With the journal's pending changes: the buffer never gets ahead of it.
                        dirty, dropped, counters, put = self.journal.take()
                        try:
                            await asyncio.to_thread(
                                self.store.store_group, pb, counters, put, sorted(dropped)
                            )
                        except BaseException:
                            self.journal.give_back(dirty, dropped)
                            raise
                        self.finishing.pop(pb.group_id, None)
                except BufferFull as e:  # backpressure: the group waits, nothing is dropped
                    log.warning("%s; retrying in %.0fs", e, BUFFER_FULL_RETRY_S)
                    await asyncio.sleep(BUFFER_FULL_RETRY_S)
                    continue
                except redis.exceptions.RedisError as e:
                    log.warning("could not store group %s (%s); reloading from Redis", pb.group_id, e)
                    self._resync.set()
                    break
                except Exception:  # noqa: BLE001 - a lost group is replaced, the run goes on
                    log.exception("could not store group %s; it will be replaced", pb.group_id)
                    self.num_accepted -= 1  # later groups only move up: still within the bound
                    break
                self.num_stored += 1
                self.dispatch_log.event("stored", pb.group_id, [smp.uid for smp in pb.samples])
                break
            self._dispatch()

    # ---- partial trajectories ----------------------------------------------------------
    async def _park(self, sample: types_pb2.Sample, generation: int) -> None:
        """Write a partial to the partial stream; it stays parked in the ledger until taken back."""
        self._num_parking += 1
        try:
            await asyncio.to_thread(self.buffer.put_partial, sample)
        except Exception as e:  # noqa: BLE001 - Redis refused it: continue it from memory, nothing lost
            log.warning("could not park partial %s (%s); continuing it from memory", sample.uid, e)
            if generation == self.generation:
                self.ledger.resume(sample)
        finally:
            self._num_parking -= 1
        self._dispatch()

    def _recycle_partials(self) -> None:
        in_stream = len(self.ledger.parked) - self._num_parking
        if in_stream > 0 and not self._taking:
            self._taking = True
            self._spawn(self._take_partials(in_stream))

    async def _take_partials(self, count: int | None = None) -> None:
        """Take partials back from the stream and queue them (None: all of them, after a reload:
        a parked partial the stream lost is then continued from the journal's copy)."""
        generation, everything = self.generation, count is None
        try:
            if count is None:
                count = await asyncio.to_thread(self.buffer.num_partials)
            partials = await asyncio.to_thread(self.buffer.take_partials, count)
        except redis.exceptions.RedisError as e:
            log.warning("could not take partials back: %s", e)
            return
        finally:
            self._taking = False
        if generation != self.generation:
            return  # taken by a ledger that was replaced since: the reload takes them again
        for partial in partials:
            if self.ledger.resume(partial):
                self.journal.mark(partial.uid.rsplit("/", 1)[0])
            else:
                log.warning("partial %s belongs to no group in flight; dropped", partial.uid)
        if everything:
            for uid in sorted(self.ledger.parked):  # the stream lost it (Redis restart): the journal has it
                log.warning("partial %s is not in the partial stream; continuing it from the journal", uid)
                self.ledger.resume(self.ledger.sample_of(uid))
        self._dispatch()

    # ---- weights -----------------------------------------------------------------------
    async def PushWeights(self, request_iterator, context):
        # Servers are told of the version as soon as its manifest passed the relay's checks, and
        # fetch it while it arrives (cut-through, weights_relay.py): their fetch ends only once
        # this push committed, or fails if it does not.
        notice = coordinator_pb2.RolloutCommand()
        notified: set[str] = set()
        incoming = None

        def announce(version) -> None:
            nonlocal incoming
            incoming = version
            self.relay.begin(version)
            notice.new_weights.version = version.version
            for conn_id, conn in self.conns.items():
                conn.outbox.put_nowait(notice)
                notified.add(conn_id)

        try:
            stored = await receive_push(request_iterator, self.relay.floor, on_manifest=announce)
            self.relay.commit(stored)
        except PushError as e:
            self.relay.abandon(incoming)
            log.warning("weight push refused: %s", e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BaseException:
            self.relay.abandon(incoming)
            raise
        for conn_id, conn in self.conns.items():  # attached while the version streamed in
            if conn_id not in notified:
                conn.outbox.put_nowait(notice)
                notified.add(conn_id)
        log.info(
            "weights version %d received (%d bytes), %d servers notified",
            stored.version,
            stored.total_bytes,
            len(notified),
        )
        self.journal.touch()  # the version is journaled
        self._dispatch()  # a new version opens the staleness window
        return coordinator_pb2.PushWeightsReply(version=stored.version, num_servers_notified=len(notified))

    async def FetchWeights(self, request, context):
        stored = self.relay.lookup(request.version)
        if stored is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"weights version {request.version} not held (latest is {self.relay.version})",
            )
        try:
            async for msg in stored.stream():
                yield msg
        except PushError as e:  # the version was streaming in and its push failed: nothing lands
            await context.abort(grpc.StatusCode.ABORTED, str(e))

    # ---- trainer and status ------------------------------------------------------------
    async def ReportProgress(self, request, context):
        self.trained_steps = max(self.trained_steps, request.step)
        idle, uptime = self._idle_totals()
        if uptime > self._idle_mark[1]:
            self.rollout_idle_fraction = (idle - self._idle_mark[0]) / (uptime - self._idle_mark[1])
            self._idle_mark = (idle, uptime)
        if request.finished and not self.finished:
            self.finished = True
            log.info("trainer finished at step %d; no new groups", request.step)
        self._dispatch()
        return self.status()

    async def GetStatus(self, request, context):
        return self.status()

    def _idle_totals(self) -> tuple[float, float]:
        """Idle and up seconds summed over every rollout server this coordinator has seen."""
        idle = self._gone_idle[0] + sum(c.idle_s for c in self.conns.values())
        uptime = self._gone_idle[1] + sum(c.uptime_s for c in self.conns.values())
        return idle, uptime

    def status(self) -> coordinator_pb2.CoordinatorStatus:
        return coordinator_pb2.CoordinatorStatus(
            policy_version=self.relay.version,
            num_groups_dispatched=self.num_dispatched,
            num_groups_completed=self.num_stored,
            num_samples_in_flight=len(self.ledger.leases),
            num_rollout_servers=len(self.conns),
            server_versions={c.server_id: c.version for c in self.conns.values()},
            finished=self.finished,
            num_reward_failures=self.num_reward_failures,
            num_partials_recycled=self.num_partials_recycled,
            num_groups_filtered=self.num_groups_filtered,
            num_stale_samples=self.num_stale_samples,
            rollout_idle_fraction=self.rollout_idle_fraction,
            weights_held=self.relay.held,
        )

    # ---- durability: the journal, restart, Redis restart, leases ----------------------
    def _counters(self) -> dict[str, int]:
        return {
            "cursor": self.cursor.position,
            "version": self.relay.version,
            "incarnation": self.incarnation,
            "num_filtered": self.num_groups_filtered,
            "num_reward_failures": self.num_reward_failures,
            "num_partials_recycled": self.num_partials_recycled,
            "num_stale_samples": self.num_stale_samples,
            "num_dead_lettered": self.num_dead_lettered,
        }

    def _journal_snapshot(self, dirty: set[str]) -> tuple[dict[str, int], dict[str, bytes]]:
        """Counters, and the records of the dirty groups still in assembly (stored ones are gone)."""
        put = {}
        for group_id in dirty:
            group = self.ledger.groups.get(group_id) or self.finishing.get(group_id)
            if group is not None:
                put[group_id] = to_record(group, self.ledger.parked).SerializeToString()
        return self._counters(), put

    def restore(self, snap: Snapshot) -> None:
        """Take up the journal's state: cursor, version, counters, and every group in assembly
        (finished results kept, unfinished samples queued under epochs above any issued before)."""
        self.cursor.position = self.num_dispatched = snap.get("cursor")
        self.relay.known_version = max(self.relay.known_version, snap.get("version"))
        self.num_stored = self.num_accepted = snap.get("num_stored")
        self.num_groups_filtered = snap.get("num_filtered")
        self.num_reward_failures = snap.get("num_reward_failures")
        self.num_partials_recycled = snap.get("num_partials_recycled")
        self.num_stale_samples = snap.get("num_stale_samples")
        self.num_dead_lettered = snap.get("num_dead_lettered")
        self.ledger.epoch_base = self.incarnation << EPOCH_BITS
        self.num_running = len(snap.groups)
        for group_id in snap.corrupt:
            log.error("journal record of group %s does not decode; it is lost", group_id)
        for record in snap.groups:
            group = from_record(record)
            self.unstored[group.group_id] = group.deadline
            if group.complete:  # finished before the crash: score it again and store it
                self.finishing[group.group_id] = group
                self._spawn(self._finish_group(group, self.generation))
            else:
                self.ledger.restore_group(group, set(record.parked))
        if self.ledger.parked:
            self._taking = True
            self._spawn(self._take_partials(None))
        log.info(
            "resumed (incarnation %d): cursor %d, version %d%s, %d stored, %d groups in assembly "
            "(%d samples to generate, %d partials parked)",
            self.incarnation,
            self.cursor.position,
            self.relay.version,
            "" if self.relay.held else " (weights not held: waiting for the trainer's push)",
            self.num_stored,
            len(snap.groups),
            self.ledger.num_queued,
            len(self.ledger.parked),
        )

    async def reload(self, reason: str) -> None:
        """Replace the in-memory ledger by the journal's (Redis restarted or a write failed).

        Redis holds a consistent prefix of what was written (AOF), buffer and journal alike; the
        coordinator goes back to it. Leases are voided (their servers are told to abort; their
        results come back under old epochs and are refused), everything unfinished is generated
        again, and whatever was admitted after the journal's cursor is admitted again, under
        the same group ids.
        """
        run_id = await self._wait_for_redis(reason)
        async with self._redis_lock:
            snap = await asyncio.to_thread(self.store.load) or Snapshot()
            self.generation += 1
            for cid, conn in self.conns.items():
                running = self.ledger.running_on(cid)
                if running:
                    conn.outbox.put_nowait(
                        coordinator_pb2.RolloutCommand(abort=coordinator_pb2.AbortWork(work_ids=running))
                    )
            self.ledger, self.ready, self.finishing, self.unstored = Ledger(), [], {}, {}
            self._aborting.clear()
            while not self._store_queue.empty():
                self._store_queue.get_nowait()
            self.journal.reset()
            self.incarnation = max(self.incarnation, snap.get("incarnation")) + 1
            self.restore(snap)
            await asyncio.to_thread(self.store.write, self._counters(), {}, [])
            self.redis_run_id = run_id
            self._resync.clear()
        self._dispatch()

    async def _wait_for_redis(self, reason: str) -> str:
        """Redis's run_id once it answers again; `RedisLost` after --reconnect-timeout."""
        limit = self.cfg.infra.reconnect_timeout
        log.warning("Redis %s; waiting up to %.0fs for it, then reloading from the journal", reason, limit)
        t0, backoff = time.monotonic(), 0.1
        while True:
            try:
                return await asyncio.to_thread(self.store.server_run_id)
            except redis.exceptions.RedisError as e:
                if time.monotonic() - t0 > limit:
                    raise RedisLost(
                        f"Redis unreachable for {limit:.0f}s (--reconnect-timeout): {e}"
                    ) from None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch_redis(self) -> None:
        """Every second: is Redis the same server as before? If not (or a write failed), reload."""
        while True:
            try:
                await asyncio.wait_for(self._resync.wait(), REDIS_CHECK_S)
                reason = "write failed"
            except TimeoutError:
                try:
                    run_id = await asyncio.to_thread(self.store.server_run_id)
                except redis.exceptions.RedisError as e:
                    reason = f"unreachable ({e})"
                else:
                    if run_id == self.redis_run_id:
                        continue
                    reason = "restarted (new run_id)"
            try:
                t0 = time.monotonic()
                await self.reload(reason)
                log.info("reloaded from the journal in %.2fs", time.monotonic() - t0)
            except RedisLost as e:
                self.fatal = str(e)
                log.error("%s", e)
                self.on_fatal()
                return
            except redis.exceptions.RedisError as e:  # it went away again mid-reload: start over
                log.warning("reload from the journal failed (%s); retrying", e)
                self._resync.set()

    async def _watch_leases(self) -> None:
        """Detach a stream silent for --lease-timeout: its leases go to other servers (new epochs)."""
        timeout = self.cfg.infra.lease_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for conn in list(self.conns.values()):
                silent = now - conn.last_seen
                if silent > timeout:
                    log.warning(
                        "rollout server %s silent for %.1fs (--lease-timeout %g): detaching it",
                        conn.server_id,
                        silent,
                        timeout,
                    )
                    self.num_lease_expiries += 1
                    conn.outbox.put_nowait(None)  # ends its Attach stream; it re-attaches when alive
                    self._detach(conn)

    def start_background(self) -> None:
        self.journal.start()
        self._background += [
            asyncio.create_task(self._watch_leases()),
            asyncio.create_task(self._watch_redis()),
        ]

    async def close(self) -> None:
        for conn in self.conns.values():
            conn.outbox.put_nowait(None)
        tasks = list(self._tasks) + self._background + ([self._storer] if self._storer else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.journal.close()
        await self.journal.flush()  # what changed last (best effort: a crash would lose it too)
        self.dispatch_log.close()


@dataclass
class RunningCoordinator:
    service: Service
    servicer: CoordinatorServicer
    reward_channel: grpc.aio.Channel
    buffer: Any

    @property
    def port(self) -> int:
        return self.service.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.service.health.enter_graceful_shutdown()  # probers learn first
        await self.servicer.close()
        await self.service.stop(grace)
        await self.reward_channel.close()
        self.buffer.close()
        self.servicer.store.close()


async def start_coordinator(cfg: Config) -> RunningCoordinator:
    """Load and check the prompts, connect to the buffer and reward service, then serve.

    Raises `DataError` for unusable prompts before anything listens.
    """
    from slipstream.buffer.replay import ReplayBuffer
    from slipstream.models.hf import load_config, load_tokenizer

    records = load_prompts(
        cfg.data.prompt_data, cfg.data.input_key, cfg.data.label_key, cfg.data.metadata_key
    )
    tokenizer = load_tokenizer(cfg.model.hf_checkpoint)
    prompt_tokens = tokenize_prompts(tokenizer, records, cfg)
    log.info("%d prompts from %s", len(records), cfg.data.prompt_data)
    spec = cfg.rollout.dynamic_sampling_filter_path
    group_filter = load_filter(spec) if spec else None  # FilterLoadError: one line, before serving
    buffer = ReplayBuffer(cfg.infra.redis_connect_url, cfg.infra.effective_run_id)
    await asyncio.to_thread(buffer.ping)
    store = CoordinatorStore(cfg.infra.redis_connect_url, cfg.infra.effective_run_id)
    snapshot = await asyncio.to_thread(store.load)
    reward_channel = aio_channel(cfg.infra.reward_addr)
    await wait_healthy(
        reward_channel, timeout=cfg.infra.rpc_timeout, what=f"reward service at {cfg.infra.reward_addr}"
    )
    servicer = CoordinatorServicer(
        cfg, records, prompt_tokens, buffer, reward_pb2_grpc.RewardStub(reward_channel), group_filter, store
    )
    if snapshot is not None:  # this run has a journal: a restarted coordinator resumes it
        servicer.incarnation = snapshot.get("incarnation") + 1
        servicer.restore(snapshot)
    # Written before serving: the new incarnation must be durable before any epoch above it goes out.
    await asyncio.to_thread(store.write, servicer._counters(), {}, [])
    servicer.redis_run_id = await asyncio.to_thread(store.server_run_id)
    servicer.start_background()
    if (Path(cfg.model.hf_checkpoint) / "config.json").is_file():  # results are checked against it
        servicer.vocab_size = load_config(cfg.model.hf_checkpoint).vocab_size
    service = await start_server(
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
        interceptors=[telemetry.RpcMetrics()],
        host=cfg.infra.host,
        port=cfg.infra.port,
        ready_file=cfg.infra.ready_file,
    )
    return RunningCoordinator(service, servicer, reward_channel, buffer)


async def serve(cfg: Config) -> None:
    running = await start_coordinator(cfg)
    status, buffer = running.servicer.status, running.buffer
    loop = asyncio.get_running_loop()
    telemetry.watch("coordinator", lambda: telemetry.coordinator_metrics(status()), loop)
    telemetry.watch("buffer", lambda: telemetry.buffer_metrics(buffer))  # sync Redis: off the event loop
    telemetry.serve_metrics(cfg.infra.host, cfg.infra.metrics_port)
    install_signal_handlers(running.stop)
    running.servicer.on_fatal = lambda: asyncio.ensure_future(running.stop())
    await running.service.server.wait_for_termination()
    if running.servicer.fatal:
        raise RedisLost(running.servicer.fatal)
