"""The weight relay: the trainer pushes a version once, every rollout server pulls it.

The coordinator never decodes weights. It checks what is cheap and catches a broken or
confused push before it reaches N servers: the stream starts with a manifest, the version is
newer than the one it holds, chunks arrive in order, each chunk's sha256 matches the
manifest, and the byte count adds up. It keeps the *messages* of a version exactly as
received, so `FetchWeights` streams them out unchanged and every server verifies the same
bytes the trainer produced. Only the latest version is kept: a server told about version v
that asks after v+1 landed gets NOT_FOUND and waits for the next notice.

Cut-through. A version is fetchable as soon as its manifest passed the checks (`RelayedVersion`
is registered as the relay's `incoming` one): a fetch streams each chunk once the relay has
verified it and waits for the next, so pushing and fetching overlap instead of adding up. The
fetch stream *ends* only when the push did: cleanly once the version is committed, or with
`PushError` (a gRPC error to the fetcher) when the push broke off or was refused, so a server
never sees a complete stream of a version that did not land, and keeps its old one.

Hashing runs on the shared sha256 thread pool (hashlib drops the GIL), up to `_WINDOW` chunks
in flight, so the event loop keeps receiving while earlier chunks are checked; chunks are
released to fetchers in order, only after their hash matched.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable

from slipstream.proto import types_pb2
from slipstream.weights.packer import hash_pool

_WINDOW = 16  # chunk hashes in flight (16 x 8 MiB held until checked)


class PushError(ValueError):
    """A push that is refused; the message says exactly why (sent as INVALID_ARGUMENT)."""


class VersionNotNewer(PushError):
    """A push of a version the relay already holds or has passed (sent as ALREADY_EXISTS, so the
    trainer knows from the status code, not from this text, that its weights are there)."""


class RelayedVersion:
    """One version as the relay holds it: its checked messages so far, and how its push ended."""

    def __init__(self, manifest_msg: types_pb2.WeightMessage) -> None:
        self.manifest = manifest_msg.manifest
        self.version = self.manifest.version
        self.messages: list[types_pb2.WeightMessage] = [manifest_msg]  # manifest, then chunks in order
        self.total_bytes = 0
        self.committed = False
        self.error = ""  # why the push failed ('' while in flight or once committed)
        self._wake = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self.committed or bool(self.error)

    def append(self, msg: types_pb2.WeightMessage, nbytes: int) -> None:
        self.messages.append(msg)
        self.total_bytes += nbytes
        self._notify()

    def commit(self) -> None:
        self.committed = True
        self._notify()

    def fail(self, reason: str) -> None:
        if not self.ended:
            self.error = reason
            self._notify()

    async def stream(self) -> AsyncIterator[types_pb2.WeightMessage]:
        """Every message, each as soon as it is checked; raises `PushError` if the push fails."""
        sent = 0
        while True:
            while sent < len(self.messages):
                yield self.messages[sent]
                sent += 1
            if self.committed:
                return
            if self.error:
                raise PushError(f"the push of version {self.version} failed: {self.error}")
            wake = self._wake  # no await between the checks above and this: nothing is missed
            await wake.wait()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()


def _sha256(msg: types_pb2.WeightMessage) -> tuple[str, int]:
    data = msg.chunk.data  # a copy out of the message (upb): taken once, here, off the event loop
    return hashlib.sha256(data).hexdigest(), len(data)


async def receive_push(
    messages: AsyncIterator[types_pb2.WeightMessage],
    current_version: int,
    on_manifest: Callable[[RelayedVersion], None] | None = None,
) -> RelayedVersion:
    """Read and check one push stream; raise `PushError` on the first thing that is wrong.

    `on_manifest(version)` is called once the manifest passed its checks, so the version can be
    fetched while it arrives. The result is not committed: the caller commits it (or fails it)."""
    incoming: RelayedVersion | None = None

    def begin(version: RelayedVersion) -> None:
        nonlocal incoming
        incoming = version
        if on_manifest is not None:
            on_manifest(version)

    try:
        return await _receive(messages, current_version, begin)
    except PushError as e:
        if incoming is not None:
            incoming.fail(str(e))
        raise
    except BaseException as e:  # the stream broke (cancelled, connection lost): fetchers must hear of it
        if incoming is not None:
            incoming.fail(f"the push stream broke off ({type(e).__name__})")
        raise


async def _receive(messages, current_version, on_manifest) -> RelayedVersion:
    loop = asyncio.get_running_loop()
    incoming: RelayedVersion | None = None
    pending: deque[tuple[types_pb2.WeightMessage, asyncio.Future]] = deque()
    received = 0  # chunks received (checked or not)
    failure = ""

    def release(_: object = None) -> None:
        """Hand the checked chunks at the head to fetchers, in order (runs as each hash finishes,
        so a chunk goes on without waiting for the next one to arrive)."""
        nonlocal failure
        while pending and pending[0][1].done() and not failure:
            msg, future = pending.popleft()
            if future.cancelled():
                return
            digest, nbytes = future.result()
            if digest != incoming.manifest.chunk_sha256[msg.chunk.index]:
                failure = f"chunk {msg.chunk.index}: sha256 does not match the manifest"
                incoming.fail(failure)  # its fetchers hear of it now, not at the end of the push
                return
            incoming.append(msg, nbytes)

    try:
        async for msg in messages:
            if failure:
                raise PushError(failure)
            kind = msg.WhichOneof("kind")
            if incoming is None:
                if kind != "manifest":
                    raise PushError("a weight push must start with its manifest")
                if msg.manifest.version <= current_version:
                    raise VersionNotNewer(
                        f"version {msg.manifest.version} is not newer than the current {current_version}"
                    )
                incoming = RelayedVersion(msg)
                on_manifest(incoming)  # from here on, a push that fails fails its fetchers
                continue
            if kind != "chunk":
                raise PushError(f"unexpected {kind or 'empty'} message after the manifest")
            chunk, manifest = msg.chunk, incoming.manifest
            if chunk.version != manifest.version:
                raise PushError(
                    f"chunk {chunk.index} has version {chunk.version}, manifest {manifest.version}"
                )
            if chunk.index != received:
                raise PushError(f"chunk {chunk.index} out of order (expected {received})")
            if received >= len(manifest.chunk_sha256):
                raise PushError(
                    f"chunk {chunk.index} beyond the manifest's {len(manifest.chunk_sha256)} chunks"
                )
            received += 1
            future = loop.run_in_executor(hash_pool(), _sha256, msg)
            future.add_done_callback(release)
            pending.append((msg, future))
            if len(pending) > _WINDOW:  # bounds the chunks held only for their check
                await asyncio.wait([pending[0][1]])
                release()
        if incoming is None:
            raise PushError("empty weight push")
        if pending:
            await asyncio.wait([f for _, f in pending])
            release()
        if failure:
            raise PushError(failure)
    finally:
        for _, future in pending:
            future.cancel()
    manifest = incoming.manifest
    if received != len(manifest.chunk_sha256):
        raise PushError(f"got {received} chunks, the manifest lists {len(manifest.chunk_sha256)}")
    if incoming.total_bytes != manifest.total_bytes:
        raise PushError(f"got {incoming.total_bytes} bytes, the manifest says {manifest.total_bytes}")
    return incoming


class WeightRelay:
    """Holds the latest pushed version for fetching, and the one being pushed.

    A restarted coordinator knows the run's version (from its journal) but not its bytes:
    `known_version` is that version, `held` is False until a push brings it (or a newer one),
    and until then a push of the *same* version is accepted: the trainer re-pushes what it has
    when it sees `weights_held == false`.
    """

    def __init__(self, known_version: int = 0) -> None:
        self.latest: RelayedVersion | None = None
        self.incoming: RelayedVersion | None = None  # a push in flight, fetchable as it arrives
        self.known_version = known_version

    @property
    def version(self) -> int:
        return max(self.latest.version if self.latest else 0, self.known_version)

    @property
    def held(self) -> bool:
        """Whether the bytes of `version` are here (version 0 is the base checkpoint: nothing to hold)."""
        return self.version == 0 or (self.latest is not None and self.latest.version == self.version)

    @property
    def floor(self) -> int:
        """A push must carry a version greater than this."""
        return self.version if self.held else self.version - 1

    def begin(self, incoming: RelayedVersion) -> None:
        """A push's manifest passed: fetches of its version stream it while it arrives. (A push
        it replaces here keeps streaming to the fetchers it has, and ends as that push does.)"""
        self.incoming = incoming

    def commit(self, stored: RelayedVersion) -> None:
        # Re-checked here: two pushes may have been received concurrently.
        if self.incoming is stored:
            self.incoming = None
        if stored.version <= self.floor:
            stored.fail("a concurrent push landed first")
            raise VersionNotNewer(f"version {stored.version} is not newer than the current {self.version}")
        self.latest = stored
        stored.commit()

    def abandon(self, incoming: RelayedVersion | None) -> None:
        """A push failed: its version is no longer fetchable (its fetchers were failed)."""
        if incoming is not None and self.incoming is incoming:
            self.incoming = None

    def lookup(self, version: int) -> RelayedVersion | None:
        """The version being pushed when `version` names it; else the kept version when `version`
        is 0 (latest) or equals it; else None."""
        if self.incoming is not None and version == self.incoming.version and not self.incoming.error:
            return self.incoming
        if self.latest is None or version not in (0, self.latest.version):
            return None
        return self.latest
