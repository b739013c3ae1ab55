"""The trainer's progress reports, sent at once and answered one step later.

At the end of every step the trainer tells the coordinator how far it got (ReportProgress: the
coordinator's admission control follows it) and applies the version rules of the reply
(`Versions.after_report`). The coordinator answers from its event loop, and on a busy mesh that
loop is handling the rollout servers' results when the report arrives: with four rollout servers
and 2,048 samples a step the reply took 25-190 ms (the 2-core box) and the trainer waited for it,
every step, with the GPU idle.

So a report is sent when its step ends and its reply is read when the next step ends, just before
that step's report goes: the coordinator sees the trainer's progress as soon as before, and the
trainer trains meanwhile. What reads the reply one step late: the version rules (a confirmed IPC
buffer is freed a step later; a coordinator that lost its weights is pushed to a step later) and the
coordinator's counters in the metrics row (as of the previous step's report). The first report of
a run and the last (the run is over) are waited for. A report goes through the reconnect rules on
a worker thread, so a coordinator that is down is said on the console at once and retried as
before; the trainer waits for it (and gets `Unreachable` past --reconnect-timeout) when the next
step ends.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from slipstream.proto import coordinator_pb2

from .reconnect import Reconnect


class ProgressReports:
    def __init__(self, stub, addr: str, rpc_timeout: float, reconnect: Reconnect) -> None:
        self.stub, self.rpc_timeout, self.reconnect = stub, rpc_timeout, reconnect
        self.what = f"coordinator at {addr} (ReportProgress)"
        # One report at a time, on its own thread, through the same reconnect rules as before: a
        # dead coordinator is said on the console at once, not when the next step ends.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self.pending: Future | None = None
        self.last: coordinator_pb2.CoordinatorStatus | None = None  # the newest reply read

    def send(self, progress: coordinator_pb2.TrainerProgress) -> coordinator_pb2.CoordinatorStatus:
        """Send `progress`; returns the reply to the previous report, or to this one when it is
        waited for (the first of this process, or `progress.finished`)."""
        self.settle()
        if self.last is None or progress.finished:
            self.last = self._call(progress)
            return self.last
        self.pending = self.worker.submit(self._call, progress)
        return self.last

    def settle(self) -> None:
        """Wait for the report in flight, if there is one (its retries included; `Unreachable`
        when the coordinator stayed away for --reconnect-timeout)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.last = pending.result()

    def close(self) -> None:
        """Stop waiting for a report in flight (a stop shrinks its retry window to a second)."""
        self.worker.shutdown(wait=False, cancel_futures=True)

    def _call(self, progress: coordinator_pb2.TrainerProgress) -> coordinator_pb2.CoordinatorStatus:
        return self.reconnect.call(
            self.what, lambda: self.stub.ReportProgress(progress, timeout=self.rpc_timeout)
        )
