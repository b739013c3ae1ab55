"""Trainer ranks under torchrun: rank 0 decides, the other ranks do what it decided.

Rank 0 is the trainer's face to the mesh (buffer reads and acks, weight pushes, progress
reports, metrics). Each step it broadcasts the step's number, samples, scores and trained
version (protobuf bytes, never pickles), or its decision to stop; every rank then trains on
its share of the micro-batches. Every collective after training, the weight gather of a push
and a checkpoint, is announced by rank 0's yes/no (`Parallel.share_flag`), decided in one place
(`Versions.push_due`, `Checkpointer.due`). Followers hold no copy of the schedule, so they
cannot drift from it and hang a collective (nano-vllm's model runner: rank 0 publishes the call,
followers make it). `follow` is the whole of a follower's life, in rank 0's order: train, push,
save; and the last save when told to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.proto import types_pb2
from slipstream.rpc.convert import sample_from_proto, sample_to_proto
from slipstream.types import Sample

from .actor import Actor
from .checkpointer import Checkpointer
from .parallel import Parallel, broadcast_bytes
from .versions import Gather


@dataclass
class SharedStep:
    step: int  # the step this trains (1-based)
    samples: list[Sample]
    scores: list[float]  # per sample
    trained_version: int


def share_step(par: Parallel, work: SharedStep | None) -> SharedStep | None:
    """Rank 0's step (None: the run is over) on every rank; followers pass None and get it."""
    if not par.enabled:
        return work
    if par.is_main:
        head = [float(work is None), *((0.0, 0.0) if work is None else (work.step, work.trained_version))]
    head = par.broadcast_floats(head if par.is_main else None)
    if head[0]:
        return None
    payload = None
    if par.is_main:
        payload = types_pb2.Group(samples=[sample_to_proto(x) for x in work.samples]).SerializeToString()
    group = types_pb2.Group.FromString(broadcast_bytes(payload, par))
    scores = par.broadcast_floats(work.scores if par.is_main else None)
    return SharedStep(int(head[1]), [sample_from_proto(p) for p in group.samples], scores, int(head[2]))


def weight_gather(actor: Actor) -> Gather:
    """`gather(due)`: the full weights when rank 0 says a push is due (a collective under FSDP2:
    every rank calls it at the same point; only rank 0's answer is meaningful)."""

    def gather(due: bool | None):
        if actor.par.share_flag(due if actor.par.is_main else None):
            return actor.state_dict_for_sync()
        return None

    return gather


def follow(actor: Actor, checkpointer: Checkpointer, step: int) -> None:
    """A rank other than 0: train on what rank 0 shares, join every collective, talk to no one."""
    gather = weight_gather(actor)
    gather(None)  # rank 0's push before its first step
    while (work := share_step(actor.par, None)) is not None:
        actor.train_rollout(work.samples, work.scores, work.trained_version)
        step = work.step
        gather(None)
        checkpointer.maybe_save(step)
    checkpointer.maybe_save(step, last=True)
