"""Evaluation while training: held-out prompts generated on the rollout fleet at a policy version.

With --eval-prompt-data NAME PATH ... and --eval-interval N, the coordinator runs an evaluation
round at version 0 (the first version the fleet serves), at every version divisible by N and at
the run's last version. A round sends every prompt of every set, --n-samples-per-eval-prompt
times, as work items on the same Attach streams as training work, pinned to the round's version
(`min_policy_version`; a server already past it serves a newer one, which the round reports), with
--eval-temperature / --eval-top-p / --eval-max-response-len. Training goes on meanwhile: eval
items share the engines with training samples and never enter the buffer; under --sync servers
drain before each swap, so a round finishes between two steps on its version. A
--custom-generate-function-path function generates eval samples too.

Eval items are not leased through the pipeline's ledger: their work ids start with `eval/`, the
server answers them like any item, and `on_result` takes them here. A stream that goes away
takes its eval items with it: they are sent again to the others. The round's samples are scored
by the reward service like training samples, and one row is appended to `<run_dir>/eval.jsonl`
and to `metrics.jsonl` (at the `step` that made the version: the report plots `eval/NAME/*`):
`eval/NAME/accuracy` (reward 1: the answer is right), `eval/NAME/pass@k` (k = the samples per
prompt: a prompt counts if any of its samples is right), `eval/NAME/response_len_mean`, and the
versions the tokens were generated with (`eval_version`, and `eval_versions_min/max`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.proto import coordinator_pb2, types_pb2
from slipstream.services.coordinator.prompts import sample_seed

log = logging.getLogger(__name__)

CORRECT = 1.0 - 1e-6  # a rule reward of 1.0: the answer was right (the trainer's `accuracy` rule)
PREFIX = "eval/"


@dataclass(frozen=True)
class EvalSet:
    name: str
    samples: list[types_pb2.Sample]  # one template per prompt (tokens = the prompt's)


@dataclass(frozen=True)
class EvalSettings:
    interval: int  # --eval-interval
    last_version: int  # --num-rollout / --update-weights-interval: the run's final version
    n_samples: int  # --n-samples-per-eval-prompt
    sampling: types_pb2.SamplingParams  # --eval-temperature/--eval-top-p/--eval-max-response-len
    run_dir: Path
    steps_per_version: int = 1  # --update-weights-interval: a row's `step` is version x this
    seed: int = 0  # --seed: the samples' seeds

    def due(self, version: int) -> bool:
        return version == 0 or version % self.interval == 0 or version == self.last_version


@dataclass
class _Round:
    version: int
    items: dict[str, coordinator_pb2.WorkItem]  # work id -> item
    results: dict[str, types_pb2.Sample] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # work id -> conn id it was sent to
    done: asyncio.Event = field(default_factory=asyncio.Event)


Score = Callable[[list[types_pb2.Sample], Callable[[types_pb2.Sample, str], None]], Awaitable[list]]


class Evaluator:
    """Rounds of evaluation; `poke(version)` starts the one due, `on_result` collects its samples."""

    def __init__(
        self,
        settings: EvalSettings,
        sets: list[EvalSet],
        send: Callable[[str, coordinator_pb2.RolloutCommand], None],
        streams: Callable[[], list[str]],
        score: Score,
    ):
        self.settings = settings
        self.sets = sets
        self.send = send
        self.streams = streams  # attached conn ids
        self.score = score
        self.started: set[int] = set()
        self.rounds: dict[int, _Round] = {}
        self._tasks: set[asyncio.Task] = set()

    def poke(self, version: int) -> None:
        """A version is served (or a stream attached): run its round if one is due and not run yet."""
        if version in self.started or not self.settings.due(version) or not self.streams():
            return
        self.started.add(version)
        task = asyncio.create_task(self._run(version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_result(self, conn_id: str, result: coordinator_pb2.SampleResult) -> bool:
        """True when the result was an eval item's (taken here)."""
        if not result.work_id.startswith(PREFIX):
            return False
        version = int(result.work_id.split("/", 2)[1])
        r = self.rounds.get(version)
        if r is None or result.work_id not in r.items or result.work_id in r.results:
            return True
        if result.sample.status == types_pb2.SAMPLE_STATUS_ABORTED:  # a swap cut it: generate it again
            self._send(r, [result.work_id])
            return True
        r.results[result.work_id] = result.sample
        if len(r.results) == len(r.items):
            r.done.set()
        return True

    def on_detach(self, conn_id: str) -> None:
        for r in self.rounds.values():
            lost = [w for w, c in r.where.items() if c == conn_id and w not in r.results]
            if lost:
                self._send(r, lost)

    def _send(self, r: _Round, work_ids: list[str]) -> None:
        conns = self.streams()
        if not conns:
            return  # sent again when a stream attaches (`on_attach`)
        for i, work_id in enumerate(work_ids):
            conn = conns[i % len(conns)]
            item = r.items[work_id]
            item.lease_epoch += 1
            r.where[work_id] = conn
            self.send(conn, coordinator_pb2.RolloutCommand(work=item))

    def on_attach(self) -> None:
        for r in self.rounds.values():
            lost = [w for w in r.items if w not in r.results and r.where.get(w) not in self.streams()]
            if lost:
                self._send(r, lost)

    async def _run(self, version: int) -> None:
        s = self.settings
        items: dict[str, coordinator_pb2.WorkItem] = {}
        for eval_set in self.sets:
            for i, template in enumerate(eval_set.samples):
                for j in range(s.n_samples):
                    work_id = f"{PREFIX}{version}/{eval_set.name}/{i}/{j}"
                    sample = types_pb2.Sample()
                    sample.CopyFrom(template)
                    sample.uid, sample.index = work_id, j
                    sampling = types_pb2.SamplingParams()
                    sampling.CopyFrom(s.sampling)
                    sampling.seed = sample_seed(s.seed, work_id)
                    items[work_id] = coordinator_pb2.WorkItem(
                        work_id=work_id, lease_epoch=0, sample=sample, sampling=sampling,
                        min_policy_version=version,
                    )  # fmt: skip
        r = self.rounds[version] = _Round(version, items)
        t0 = time.monotonic()
        self._send(r, list(items))
        await r.done.wait()
        del self.rounds[version]
        samples = [r.results[w] for w in items]
        scored = await self.score(samples, lambda sample, error: None)
        row = self._row(version, samples, [x.reward if not x.failed else None for x in scored])
        row["eval_seconds"] = round(time.monotonic() - t0, 3)
        line = json.dumps(row) + "\n"
        for name in ("eval.jsonl", "metrics.jsonl"):  # one short O_APPEND write: whole lines
            with open(s.run_dir / name, "a") as f:
                f.write(line)
        log.info("eval at version %d: %s", version, {k: v for k, v in row.items() if k.endswith("accuracy")})

    def _row(self, version: int, samples: list[types_pb2.Sample], rewards: list[float | None]) -> dict:
        row: dict = {"step": version * self.settings.steps_per_version, "eval_version": version}
        versions = [v for s in samples for v in s.policy_versions]
        row["eval_versions_min"] = min(versions) if versions else None
        row["eval_versions_max"] = max(versions) if versions else None
        for eval_set in self.sets:
            key = f"{PREFIX}{eval_set.name}/"
            picked = [
                (s, rw)
                for s, rw in zip(samples, rewards, strict=True)
                if s.uid.split("/")[2] == eval_set.name
            ]
            right = [rw is not None and rw >= CORRECT for _, rw in picked]
            by_prompt: dict[str, bool] = {}
            for (s, _), ok in zip(picked, right, strict=True):
                prompt = s.uid.split("/")[3]
                by_prompt[prompt] = by_prompt.get(prompt, False) or ok
            row[key + "accuracy"] = sum(right) / len(right) if right else None
            row[key + f"pass@{self.settings.n_samples}"] = (
                sum(by_prompt.values()) / len(by_prompt) if by_prompt else None
            )
            lengths = [s.response_length for s, _ in picked]
            row[key + "response_len_mean"] = sum(lengths) / len(lengths) if lengths else None
        return row

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
