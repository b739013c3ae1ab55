"""When to save, and what a save means: checkpoint, then trained.jsonl, then the Redis commit.

The loop offers the checkpointer every step (`maybe_save(step)`) and once more when it stops
(`maybe_save(step, last=True)`), as torchtitan's `checkpointer.save(step, last_step=...)`:
the checkpointer alone knows the cadence. A checkpoint is due every --save-interval steps, and
at the end unless that very step was just saved. `--save-interval 0` keeps meaning "checkpoint
only at the end", and so the whole run commits at the end: a trainer that dies without any
checkpoint has trained nothing that counts, and a new one (same consumer name) trains the same
entries from the start. Between commits the entries sit in the pending list: memory Redis cannot
trim yet, and with --max-reuse > 1 the requeued groups only become readable at the commit. Long
runs want --save-interval.

A save is a collective under FSDP2 (every rank gathers its shards; rank 0 writes), so only rank
0 decides whether one is due and every other rank does what it is told (`Parallel.share_flag`,
nano-vllm's way: followers never re-derive the cadence, so they cannot drift from it). On rank
0 a save is followed by what it makes durable: the steps it covers are appended to
trained.jsonl and flushed, then committed to Redis (`Feed.commit`). The checkpoint is the truth
about what was trained; Redis follows it (`feed.py` tells what a crash between any two of these
leaves behind, and how `recover` finishes it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slipstream.faults import crash_point

from .checkpoint import Draft, save_checkpoint
from .feed import Feed
from .ledger import StepRecord, TrainedLedger
from .parallel import Parallel
from .schedule import LRScheduler

log = logging.getLogger("slipstream.trainer")


class Checkpointer:
    def __init__(
        self,
        save_dir: Path,
        interval: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        par: Parallel,
        *,
        saved_at: int = -1,
        tokenizer_dir: str | None = None,
        describe: Callable[[], dict[str, Any]] = dict,
        feed: Feed | None = None,
        ledger: TrainedLedger | None = None,
        scheduler: LRScheduler | None = None,
        draft: Draft | None = None,
    ):
        """`interval`: --save-interval (0: only at the end); `saved_at`: the step of the checkpoint
        this run resumed from (-1: none). Rank 0 passes `describe` (the trainer state a checkpoint
        records), `feed` and `ledger`; the other ranks only join the collective saves."""
        self.save_dir, self.interval, self.par = save_dir, interval, par
        self.model, self.optimizer, self.tokenizer_dir = model, optimizer, tokenizer_dir
        self.saved_at, self.describe, self.feed, self.ledger = saved_at, describe, feed, ledger
        self.scheduler, self.draft = scheduler, draft

    def due(self, step: int, last: bool = False) -> bool:
        """Whether a checkpoint of `step` is due (`last`: the run stops at `step`)."""
        if last:  # stopped before its first step, a fresh run has nothing to save
            return step != self.saved_at and step > 0
        return bool(self.interval) and step % self.interval == 0

    def maybe_save(self, step: int, last: bool = False) -> bool:
        """Save `step` if rank 0 finds it due; every rank calls this at the same point."""
        save = self.par.share_flag(self.due(step, last) if self.par.is_main else None)
        if save:
            self.save(step)
        return save

    def save(self, step: int) -> None:
        t0 = time.monotonic()
        save_checkpoint(
            self.save_dir, step, self.model, self.optimizer, self.describe(),
            tokenizer_dir=self.tokenizer_dir, par=self.par, scheduler=self.scheduler, draft=self.draft,
        )  # fmt: skip
        if self.feed is not None and self.ledger is not None:
            records, groups = self.feed.consumption.take_uncommitted()
            self.ledger.append(records)
            crash_point("after_checkpoint", step)
            self.feed.commit(records, groups)
            crash_point("after_commit", step)
        self.saved_at = step
        if self.par.is_main:  # what a run's last seconds are spent on (the final save)
            log.info("checkpoint step %d saved in %.1fs (%s)", step, time.monotonic() - t0,
                     self.save_dir / f"step_{step:06d}")  # fmt: skip

    def recover(self, last_steps: list[StepRecord], lease_timeout: float) -> None:
        """Before the first step: finish what the checkpoint resumed from may not have done."""
        assert self.feed is not None and self.ledger is not None, "rank 0 only"
        self.ledger.append(last_steps)  # again: the crash may have come before they were written
        self.feed.recover(last_steps, lease_timeout)
