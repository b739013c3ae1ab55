"""Weight fetch: a new version from the coordinator, staged and verified completely, or a reason why not.

A version is streamed from the coordinator (`FetchWeights`) into a fresh
`slipstream.weights.WeightStager`, which checks the manifest against the model before any byte,
then every chunk's length and hash, and decodes the tensors where the engine computes (one
host-to-GPU copy of the blob, then FP8 dequantized on the GPU; a version by reference, a CUDA
IPC handle or a shared-memory file on this host, is opened there too). Only a version staged
whole comes back; nothing half-staged is ever handed on.

A fetch that breaks — the connection cut, the coordinator briefly away, bytes damaged in transit
(the trainer hashed them; this server is where they are checked) — is fetched again from scratch, up to
`FETCH_ATTEMPTS` times with backoff within `WEIGHT_FETCH_TIMEOUT`. A refusal a second fetch
cannot cure (NOT_FOUND: a newer version replaced it; auth; a manifest that does not match the
model) ends it at once, and so does a newer version's notice or the server stopping. The caller
keeps serving the old version throughout; the swap itself is `attach.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from slipstream import telemetry
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHT_FETCH_TIMEOUT = 300.0  # a whole version streams within this deadline, retries included
FETCH_ATTEMPTS, FETCH_RETRY_FIRST = 4, 0.5  # a broken fetch is tried again after 0.5, 1, 2 s
# What a second FetchWeights of the same version can cure: the connection or the coordinator
# hiccuped. NOT_FOUND (a newer version replaced it) and refusals (auth, bad request) cannot.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass
class Staged:
    """A version staged and verified whole, ready for the engine."""

    version: int
    tensors: dict[str, torch.Tensor]  # name -> tensor on the engine's device, in its dtype
    format: str  # the wire format it came in (for the log)


class WeightFetchError(Exception):
    """The version could not be fetched; the message says why (it goes into `WeightsApplied.error`)."""


class _AttemptFailed(Exception):
    """One FetchWeights attempt failed; `transient` when fetching the same version again may work."""

    def __init__(self, reason: str, transient: bool, kind: str):
        super().__init__(reason)
        self.transient = transient
        self.kind = kind  # for the retry counter: a gRPC code name, or "bytes"


class WeightFetcher:
    def __init__(
        self,
        coordinator: grpc.aio.Channel,
        expected_shapes: dict[str, tuple[int, ...]],
        device: str,
        dtype: torch.dtype,
        stopping: asyncio.Event,
        keep_int4: bool = False,
        keep_fp8: bool = False,
        server_id: str = "",
    ):
        """`expected_shapes`: the model's synced tensors, what every manifest is checked against;
        `keep_int4` / `keep_fp8`: int4 / FP8 tensors come back as they travel, for an engine with
        W4A16 / FP8 layers (`WeightStager`); `server_id`: this server's name in a broadcast group."""
        self.coordinator = coordinator
        self.expected_shapes = expected_shapes
        self.device = device
        self.dtype = dtype
        self.stopping = stopping
        self.keep_int4, self.keep_fp8 = keep_int4, keep_fp8
        self.server_id = server_id
        self._receiver = None  # joined to the trainer's weights group at the first broadcast version

    async def fetch(self, version: int, current: int, newest: Callable[[], int]) -> Staged:
        """`version`, staged and verified (retried as the module says); `WeightFetchError` if not.

        `current` is the version served now (the stager refuses anything not newer); `newest()`
        the newest version announced so far: once it is past `version`, retrying is pointless.
        """
        deadline = time.monotonic() + WEIGHT_FETCH_TIMEOUT
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._fetch_once(version, current, deadline)
            except _AttemptFailed as e:
                backoff = FETCH_RETRY_FIRST * 2 ** (attempt - 1)
                why_not = self._why_not_retry(
                    e, attempt, version, newest(), deadline - time.monotonic() - backoff
                )
                if why_not:
                    raise WeightFetchError(
                        f"{e} ({attempt} attempts; {why_not})" if attempt > 1 else str(e)
                    ) from None
                telemetry.WEIGHT_FETCH_RETRIES.labels(reason=e.kind).inc()
                log.warning(
                    "weights version %d: fetch attempt %d of %d failed (%s); retrying in %.1fs",
                    version,
                    attempt,
                    FETCH_ATTEMPTS,
                    e,
                    backoff,
                )
                await asyncio.sleep(backoff)

    async def _fetch_once(self, version: int, current: int, deadline: float) -> Staged:
        """One FetchWeights stream into a fresh stager, or `_AttemptFailed`."""
        from slipstream.weights import WeightError, WeightStager
        from slipstream.weights.broadcast import BroadcastReceiver
        from slipstream.weights.packer import by_reference

        if self._receiver is None:
            self._receiver = BroadcastReceiver(self.server_id)
        stager = WeightStager(
            self.expected_shapes, current, device=self.device, dtype=self.dtype,
            keep_int4=self.keep_int4, keep_fp8=self.keep_fp8, receiver=self._receiver,
        )  # fmt: skip
        stub = coordinator_pb2_grpc.CoordinatorStub(self.coordinator)
        call = stub.FetchWeights(
            coordinator_pb2.FetchWeightsRequest(version=version),
            timeout=max(deadline - time.monotonic(), 0.001),
        )

        def bytes_failed(e: WeightError) -> _AttemptFailed:
            # The stager checks the manifest against the model before any byte: a refusal there
            # is final. What fails after it (a chunk's hash or length, chunks missing) is the
            # bytes, which the coordinator verified when they were pushed: damaged or cut in
            # transit, so a second fetch can succeed. A version by reference (a CUDA IPC handle, a
            # shared-memory file) is not bytes in transit: the trainer sends its byte form instead.
            return _AttemptFailed(
                str(e), transient=bool(stager.format) and not by_reference(stager.format), kind="bytes"
            )

        try:
            async for msg in call:
                try:
                    stager.add(msg)
                except WeightError as e:
                    raise bytes_failed(e) from None
            try:
                staged_version, tensors = await asyncio.to_thread(stager.finish)
            except WeightError as e:
                raise bytes_failed(e) from None
        except grpc.aio.AioRpcError as e:
            code = e.code()
            ours = code == grpc.StatusCode.CANCELLED and self.stopping.is_set()
            raise _AttemptFailed(
                f"FetchWeights: {code.name}: {e.details()}",
                transient=code in _TRANSIENT_CODES and not ours,
                kind=code.name,
            ) from None
        finally:
            call.cancel()  # a stream left early (a bad chunk) must not keep streaming
        if staged_version != version:
            raise _AttemptFailed(f"asked for version {version}, received {staged_version}", False, "bytes")
        return Staged(staged_version, tensors, stager.format)

    def _why_not_retry(
        self, e: _AttemptFailed, attempt: int, version: int, newest: int, time_left: float
    ) -> str:
        """Why this failed fetch is not tried again ('' when it is)."""
        if not e.transient:
            return "not transient"
        if attempt >= FETCH_ATTEMPTS:
            return "attempts exhausted"
        if self.stopping.is_set():
            return "stopping"
        if newest > version:
            return f"version {newest} announced"
        if time_left <= 0:
            return f"the {WEIGHT_FETCH_TIMEOUT:.0f}s fetch deadline is spent"
        return ""
