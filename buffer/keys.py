"""Every Redis key of a run, in one place.

All keys live under `slipstream:{run_id}:` so several runs can share one Redis, one run's keys
can be listed (`SCAN MATCH slipstream:{run_id}:*`) and dropped together, and no other module
ever formats a key string. Add a key here, give it a one-line reason, and use it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "slipstream"
DEFAULT_CONSUMER_GROUP = "trainers"


@dataclass(frozen=True)
class Keys:
    """The key names of one run."""

    run_id: str

    def __post_init__(self) -> None:
        if not self.run_id or any(c in self.run_id for c in " \t\n{}*?"):
            raise ValueError(f"run_id {self.run_id!r}: must be non-empty, without spaces or glob characters")

    @property
    def base(self) -> str:
        return f"{PREFIX}:{self.run_id}"

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of this run."""
        return f"{self.base}:*"

    # ---- replay buffer -----------------------------------------------------------------
    @property
    def groups(self) -> str:
        """Stream of scored GRPO groups (types_pb2.Group bytes), consumed by trainers."""
        return f"{self.base}:groups"

    @property
    def reuse(self) -> str:
        """Stream of trained groups requeued for another training (--max-reuse), oldest first."""
        return f"{self.base}:reuse"

    @property
    def partials(self) -> str:
        """Stream of partial trajectories (types_pb2.Sample bytes) waiting to be continued."""
        return f"{self.base}:partials"

    @property
    def dead_letter(self) -> str:
        """Stream of payloads that could not be decoded or used, with the reason."""
        return f"{self.base}:dead"

    # ---- coordinator and trainer state ------------------------------------------------
    @property
    def coordinator_state(self) -> str:
        """Hash of the coordinator's durable counters (prompt cursor, versions, totals)."""
        return f"{self.base}:coordinator"

    @property
    def assembly(self) -> str:
        """Hash group id -> JournalGroup bytes: every group the coordinator admitted and has not stored."""
        return f"{self.base}:assembly"

    @property
    def last_stored(self) -> str:
        """String: the last store transaction's group ids and sample uids (JSON), for the dispatch
        ledger of a coordinator killed between that commit and its `stored` lines."""
        return f"{self.base}:last-stored"

    @property
    def leases(self) -> str:
        """Hash sample/group id -> lease record of work dispatched to rollout servers."""
        return f"{self.base}:leases"

    @property
    def trainer_state(self) -> str:
        """Hash of the trainer's committed progress (step, consumed ids)."""
        return f"{self.base}:trainer"

    def heartbeat(self, name: str) -> str:
        """String key with a TTL: present while process `name` is alive."""
        return f"{self.base}:heartbeat:{name}"
