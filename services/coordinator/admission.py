"""Admission control: how far rollout may run ahead of training.

Rollout never waits for training, except where the staleness bound says it must. A group
dispatched now is trained at the earliest after the groups already accepted or running, so
the coordinator admits a new group only while the total work that exists (accepted into the
buffer, or still generating) fits in the capacity the trainer can consume within
`max_staleness` more policy versions: AReaL's `(eta + version + 1) * batch` rule, counted
in groups. Admitting by capacity, rather than discarding stale samples after the fact, is
what keeps long, hard rollouts from starving.

Both rules are pure functions so the dispatcher's loop stays readable and the policy is
tested by hand.
"""

from __future__ import annotations


def staleness_capacity(
    max_staleness: int, trained_steps: int, rollout_batch_size: int, num_accepted: int, num_running: int
) -> int:
    """Groups that may still be dispatched without exceeding the staleness bound (may be <= 0)."""
    return (max_staleness + trained_steps + 1) * rollout_batch_size - (num_accepted + num_running)


def may_dispatch_group(
    *,
    max_staleness: int,
    trained_steps: int,
    rollout_batch_size: int,
    num_rollout: int,
    num_accepted: int,
    num_running: int,
    num_dispatched: int,
    num_replaced: int = 0,
) -> bool:
    """True when one more group may be dispatched now.

    `num_dispatched` counts every group ever dispatched; the run needs `num_rollout *
    rollout_batch_size` of them, plus one replacement for each group that was lost
    (`num_replaced`), and never more.
    """
    if num_dispatched >= num_rollout * rollout_batch_size + num_replaced:
        return False
    return staleness_capacity(max_staleness, trained_steps, rollout_batch_size, num_accepted, num_running) > 0
