"""What runs next: the waiting queue, who is admitted to the batch, which slots a retire frees.

Requests wait in arrival order and are admitted between steps while the batch has free slots,
so the batch refills as soon as a sequence finishes. A request that cannot run at all (no token
budget, or a prompt that already fills the sequence length) finishes at once as "length".

Prefill is shared within a group: requests admitted together with the same prompt (the n samples
of a GRPO group) form one group; its first member, the leader, is prefilled and the others (the
followers) copy the leader's KV, then each samples its own first token with its own seed. Only
distinct prompts count against one prefill's budget (`max_prefill_tokens`: leaders x the longest
leader's length, the right-padded batch); one request always fits.

Running sequences occupy slots 0..n-1 of the KV cache, in order. When some finish, the running
ones from the tail move into the holes, so the decode step always reads one contiguous block.

Plain Python: no tensors and no device here; `runner.py` says how a step runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from slipstream.services.rollout.engine.request import Request, Result


@dataclass
class Admission:
    """The requests admitted in one step, in slot order: the leaders, then the followers."""

    leaders: list[Request]  # distinct prompts: one right-padded prefill
    followers: list[Request] = field(default_factory=list)  # same prompt as a leader: copy its KV
    leader_of: list[int] = field(default_factory=list)  # [len(followers)] index of each one's leader
    longest: int = 0  # the longest leader prompt (the prefill's padded length)

    @property
    def batch(self) -> list[Request]:
        return self.leaders + self.followers


class Scheduler:
    def __init__(self, max_batch_size: int, max_seq_len: int, max_prefill_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self.waiting.append(req)  # the engine refuses a request id it already holds

    def admit(self, num_running: int, results: list[Result]) -> Admission | None:
        """Take as many waiting requests as fit beside `num_running`; None if none is admitted.

        A request that cannot run at all is taken too, and its "length" result added to `results`.
        """
        leaders: list[Request] = []
        followers: list[Request] = []
        group_of: dict[tuple[int, ...], int] = {}
        longest = 0
        while self.waiting and num_running + len(leaders) + len(followers) < self.max_batch_size:
            req = self.waiting[0]
            if req.max_new_tokens <= 0 or len(req.tokens) >= self.max_seq_len:
                results.append(Result(req.rid, [], [], [], "length"))
                self.waiting.popleft()
                continue
            prompt = tuple(req.tokens)
            if prompt not in group_of:
                t = max(longest, len(req.tokens))
                if leaders and t * (len(leaders) + 1) > self.max_prefill_tokens:
                    break
                group_of[prompt] = len(leaders)
                leaders.append(req)
                longest = t
            else:
                followers.append(req)
            self.waiting.popleft()
        if not leaders:
            return None
        return Admission(leaders, followers, [group_of[tuple(r.tokens)] for r in followers], longest)

    def abort(self, rid: str) -> Result | None:
        """Take `rid` out of the queue: its (empty) "abort" result, or None if it is not waiting."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return Result(rid, [], [], [], "abort")
        return None

    def abort_all(self) -> list[Result]:
        results = [Result(r.rid, [], [], [], "abort") for r in self.waiting]
        self.waiting.clear()
        return results


def compaction(num_running: int, rows: list[int]) -> tuple[int, list[int], list[int]]:
    """Slots 0..num_running-1 with `rows` retired: (how many keep running, movers, holes).

    Each mover (a running slot past the new end) is copied into a hole (a retired slot before it),
    pairwise, so the running ones are 0..keep-1 again.
    """
    gone = set(rows)
    keep = num_running - len(gone)
    holes = [r for r in rows if r < keep]
    movers = [r for r in range(keep, num_running) if r not in gone]
    return keep, movers, holes
