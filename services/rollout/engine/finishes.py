"""Which rows finished, and their results, on their way from the device to the host.

A step's status codes (running/stop/length, `Slots.record`) are copied to pinned host memory
behind an event as the step is queued (`Statuses`: two buffers and two events, used in turn, so a
step costs the host one copy and one event record), and read at the next `settle`, after the
next step is queued: the host waits for that step only, and the GPU always has work. The rows
they say finished then retire: their outputs start their way to the host the same way (`Retired`)
and are read, as `Result`s, at the `settle` after. So a finished row decodes one token more before
it retires (it lies past the length the row finished at, which each row records, and is never
returned), and a result reaches the caller two steps after its last token. `drain` reads
everything in flight at once (a device sync): an abort, the CPU engine (its steps are done when
they return).

A speculative step keeps a number of tokens a row that only the device knows; the host has moved
its lengths by the most a row can keep (`Slots.advance_at_most`). Its statuses then bring the
device's lengths along, in the same copy: a finished row's end, and for every row still in a slot
how far the host's length overshot, which is taken off when they are read.

Rows are found by their request, not their slot: retiring compacts the running slots
(`scheduler.compaction`), so a slot may hold another request by the time its status is read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slipstream.services.rollout.engine.request import FinishReason, Result
from slipstream.services.rollout.engine.slots import LENGTH, STOP, Slots, to_device

_REASONS: dict[int, FinishReason] = {STOP: "stop", LENGTH: "length"}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in pinned host memory, queued; valid once the caller's event is done."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _recorded(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far (None on the CPU, where that work is done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class _Turns:
    """Pinned host buffers and their events, used in turn (CUDA). A step's statuses are read at the
    next step's `settle`, before the step after that copies into the same buffer: two suffice."""

    def __init__(self) -> None:
        self.buffers = [torch.empty(0, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0

    def copy(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """`t`'s copy on the host, queued, and the event after it."""
        i, self.turn = self.turn, 1 - self.turn
        if self.buffers[i].numel() < t.numel():  # the old one stays alive until its copy has run
            self.buffers[i] = torch.empty(2 * t.numel(), dtype=t.dtype, pin_memory=True)
        host = self.buffers[i][: t.numel()]
        host.copy_(t, non_blocking=True)
        self.events[i].record(torch.cuda.current_stream(t.device))
        return host, self.events[i]


class Statuses:
    """One step's status codes on their way to the host, with the rows they describe then."""

    def __init__(self, status: torch.Tensor, slots: Slots, turns: _Turns | None) -> None:
        """`status` [n]: the codes of slots 0..n-1 (every occupied slot) after the step just queued;
        `turns`: the pinned buffers to copy them into (None on the CPU: they are the host's). After
        a speculative step (`slots.bounded`) the device's lengths come too."""
        n = status.shape[0]
        self.requests = list(slots.requests)
        self.lengths = slots.length[:n].clone()  # where a finished response ends, or a bound of it
        self.exact = not slots.bounded
        if not self.exact:
            status = torch.cat([status, slots.dev_ints[0, :n]])
            slots.bounded = False
        self.codes, self.event = turns.copy(status) if turns is not None else (status, None)

    def finished(self, slots: Slots) -> list[tuple[int, FinishReason, int]]:
        """(slot now, reason, length when it finished) of each finished row still in a slot; waits
        for the step. Slots may have moved since (compaction), so rows are found by their request.
        After a speculative step, the host's lengths of the rows still in a slot are corrected."""
        if self.event is not None:
            self.event.synchronize()
        n = len(self.requests)
        codes, lengths = self.codes[:n], self.lengths if self.exact else self.codes[n:]
        done = torch.nonzero(codes).squeeze(1).tolist()
        if self.exact and not done:
            return []
        slot_of = {id(req): i for i, req in enumerate(slots.requests)}
        if not self.exact:  # rows retired already (an earlier finish) are gone
            here = [(i, slot_of[id(req)]) for i, req in enumerate(self.requests) if id(req) in slot_of]
            if here:
                rows, now = torch.tensor(here).T
                slots.length[now] -= self.lengths[rows] - lengths[rows]
        return [
            (slot_of[id(self.requests[i])], _REASONS[int(codes[i])], int(lengths[i]))
            for i in done
            if id(self.requests[i]) in slot_of  # else retired already (an earlier finish)
        ]


class Retired:
    """The outputs of retiring slots on their way to the host; `results()` waits and builds them.

    Queued before the slots are reused, so the copies read what the slots held at retirement.
    """

    def __init__(self, slots: Slots, rows: list[int], reasons: list[FinishReason], ends: list[int]) -> None:
        """`ends`: each row's length when it finished (a response is prompt_len..end-1)."""
        index = to_device(torch.tensor(rows), slots.device)
        width = max(ends)
        self.tokens, self.log_probs, self.versions = (
            _to_host(t[index, :width]) for t in (slots.out_tokens, slots.out_log_probs, slots.out_versions)
        )
        self.experts = _to_host(slots.out_experts[index, :width]) if slots.out_experts.shape[2] else None
        self.rows = [
            (slots.requests[row].rid, int(slots.prompt_len[row]), end, reason)
            for row, reason, end in zip(rows, reasons, ends, strict=True)
        ]
        self.event = _recorded(slots.device)

    def results(self) -> list[Result]:
        if self.event is not None:
            self.event.synchronize()
        results = []
        for k, (rid, prompt_len, end, reason) in enumerate(self.rows):
            span = slice(prompt_len, end)
            results.append(
                Result(
                    rid=rid,
                    tokens=self.tokens[k, span].tolist(),
                    log_probs=self.log_probs[k, span].tolist(),
                    versions=self.versions[k, span].tolist(),
                    finish_reason=reason,
                    routed_experts=None if self.experts is None else self.experts[k, : end - 1].clone(),
                )
            )
        return results


# (rows, reasons, ends) -> their outputs on the way out; frees the rows' slots (the runner's)
Retire = Callable[[list[int], list[FinishReason], list[int]], Retired]


class Finishes:
    """What is on its way to the host: the last step's statuses and the outputs of the rows the
    last read retired. `retire` frees slots (`ModelRunner._retire`: compaction, KV moves)."""

    def __init__(self, slots: Slots, retire: Retire) -> None:
        self.slots, self.retire = slots, retire
        self.turns = _Turns() if slots.device.type == "cuda" else None
        self.statuses: Statuses | None = None
        self.retired: Retired | None = None

    @property
    def in_flight(self) -> bool:
        return self.statuses is not None or self.retired is not None

    def settle(self, status: torch.Tensor | None) -> list[Result]:
        """Hand in the statuses of the step just queued (slots 0..n-1; None: no step); get back the
        results of the slots retired a step ago. Reads what the last step sent the host, which waits
        for that step only: this one is queued behind it. Slots it says finished retire now."""
        results = self.retired.results() if self.retired is not None else []
        finished = self.statuses.finished(self.slots) if self.statuses is not None else []
        self.statuses = Statuses(status, self.slots, self.turns) if status is not None else None
        self.retired = self.retire(*map(list, zip(*finished, strict=True))) if finished else None
        return results

    def drain(self) -> list[Result]:
        """The results of every slot that finished so far, now (waits for the device)."""
        results = []
        while self.in_flight:
            results += self.settle(None)
        return results

    def abort(self, rows: list[int]) -> list[Result]:
        """Retire `rows` as they are now, "abort"; `drain` first (a row may have finished, and
        slots move when finished rows retire)."""
        if self.in_flight:
            raise RuntimeError("abort: drain() first, the slots may still move")
        ends = [int(self.slots.length[row]) for row in rows]
        self.retired = self.retire(rows, ["abort"] * len(rows), ends)
        return self.drain()
