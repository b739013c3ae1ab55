"""The attached rollout streams: who is connected, with what room, and whether they are alive.

A rollout server holds one `Attach` stream; each stream is `Attached` here under a conn id of
its own (a server that reconnects is a new stream). What the coordinator sends it goes through
its outbox, a queue the servicer's `Attach` drains (None ends the stream). Any event on the
stream renews its leases (`last_seen`); a stream silent for `--lease-timeout` is detached by
`watch_leases` and the caller gives its samples to other streams.

Heartbeats carry the server's policy version and its engine's idle and up seconds; the registry
turns those into the fleet's idle fraction between two trainer reports.

Under the launcher a fresh run waits for its fleet before the first dispatch (`fleet_ready`): every
service starts at once, and a server that attaches a few seconds after another would otherwise
find the first groups (and, in a short run, every version) taken. It waits for the servers the
launcher started (--rollout-num-servers), at most --rollout-attach-grace seconds after the first
one attached, so a server that never comes holds nothing up; once open, the gate stays open
(servers come and go). A coordinator run on its own (compose, Kubernetes) dispatches at once.

No ledger here: what a stream holds is the pipeline's business; this is the phone book.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from slipstream.proto import coordinator_pb2

log = logging.getLogger(__name__)


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
    host_id: str = ""  # its Hello's: the trainer writes weights to /dev/shm when all share its host

    def on_heartbeat(self, hb: coordinator_pb2.Heartbeat) -> None:
        self.version = hb.policy_version
        if self.idle_base is None:  # time before it attached is not rollout idling
            self.idle_base = (hb.idle_seconds, hb.uptime_seconds)
        self.idle_s = hb.idle_seconds - self.idle_base[0]
        self.uptime_s = hb.uptime_seconds - self.idle_base[1]


class Streams:
    def __init__(self, lease_timeout: float, expected_servers: int = 0, grace_s: float = 0.0):
        """`expected_servers`: how many to wait for before the first dispatch (0: none)."""
        self.lease_timeout = lease_timeout
        self.expected_servers, self.grace_s = expected_servers, grace_s
        self._first_attach: float | None = None
        self._fleet_open = expected_servers <= 1 or grace_s <= 0
        self.conns: dict[str, Attached] = {}
        self._seq = itertools.count(1)
        self._gone_idle = (0.0, 0.0)  # idle and uptime seconds of detached streams
        self._idle_mark = (0.0, 0.0)  # totals at the last `measure_idle`
        self.idle_fraction = 0.0  # of the fleet's engine time, between the last two measures
        self.num_lease_expiries = 0  # streams detached for lack of heartbeats
        self._watcher: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.conns)

    def attach(self, server_id: str, max_concurrent: int, version: int) -> Attached:
        conn = Attached(f"{server_id}#{next(self._seq)}", server_id, max_concurrent, version)
        self.conns[conn.conn_id] = conn
        if self._first_attach is None:
            self._first_attach = time.monotonic()
        return conn

    def fleet_opened_now(self) -> bool:
        """True when this very call opened the gate (its caller then dispatches)."""
        was_open = self._fleet_open
        return self.fleet_ready() and not was_open

    def fleet_ready(self) -> bool:
        """Whether work may go out: the expected servers attached, or the grace ran out."""
        if self._fleet_open or self._first_attach is None:
            return self._fleet_open
        if len(self.conns) >= self.expected_servers:
            self._fleet_open = True
        elif time.monotonic() - self._first_attach >= self.grace_s:
            self._fleet_open = True
            log.warning(
                "dispatching with %d of %d rollout servers attached (--rollout-num-servers) after "
                "waiting %.0f s for the rest",
                len(self.conns),
                self.expected_servers,
                self.grace_s,
            )
        return self._fleet_open

    def detach(self, conn: Attached) -> bool:
        """Forget a stream; False when it was already gone."""
        if self.conns.pop(conn.conn_id, None) is None:
            return False
        self._gone_idle = (self._gone_idle[0] + conn.idle_s, self._gone_idle[1] + conn.uptime_s)
        return True

    def send(self, conn_id: str, cmd: coordinator_pb2.RolloutCommand) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            conn.outbox.put_nowait(cmd)

    def capacity(self) -> dict[str, int]:
        """Every attached stream's max concurrent samples, by conn id (none before `fleet_ready`)."""
        if not self.fleet_ready():
            return {}
        return {cid: c.max_concurrent for cid, c in self.conns.items()}

    def server_versions(self) -> dict[str, int]:
        return {c.server_id: c.version for c in self.conns.values()}

    def measure_idle(self) -> None:
        """The fleet's idle fraction since the last call (a trainer report)."""
        idle = self._gone_idle[0] + sum(c.idle_s for c in self.conns.values())
        uptime = self._gone_idle[1] + sum(c.uptime_s for c in self.conns.values())
        if uptime > self._idle_mark[1]:
            self.idle_fraction = (idle - self._idle_mark[0]) / (uptime - self._idle_mark[1])
            self._idle_mark = (idle, uptime)

    def start(self, on_expired: Callable[[Attached], None]) -> None:
        self._watcher = asyncio.create_task(self._watch_leases(on_expired))

    async def _watch_leases(self, on_expired: Callable[[Attached], None]) -> None:
        """End a stream silent for --lease-timeout; `on_expired` gives its leases to others."""
        timeout = self.lease_timeout
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
                    on_expired(conn)

    async def close(self) -> None:
        for conn in self.conns.values():
            conn.outbox.put_nowait(None)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
