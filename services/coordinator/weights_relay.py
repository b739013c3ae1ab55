"""The weight relay: the trainer pushes a version once, every rollout server pulls it.

The coordinator never decodes weights. Each chunk's sha256 is made by the trainer's `pack` (on all
its cores) and checked by each rollout server's stager as the bytes arrive there (a chunk damaged
on the second hop fails it; the server fetches again). The relay hashes each chunk too, beside the
transfer, and refuses to commit a push whose bytes do not match its manifest: a version damaged on
the first hop held as the latest would block every good push of it. It also checks what is cheap
and catches a confused push before it reaches N servers: the stream starts with a manifest, the version is newer than the one it holds, chunks
arrive in order and as many as the manifest lists. It keeps the *messages* of a version exactly
as received, so `FetchWeights` streams them out unchanged and every server verifies the bytes
the trainer produced. Only the latest version is kept: a server told about version v that asks
after v+1 landed gets NOT_FOUND and waits for the next notice.

Cut-through. A version is fetchable as soon as its manifest passed the checks (`RelayedVersion`
is registered as the relay's `incoming` one): a fetch streams each chunk as soon as it is here
and waits for the next, so pushing and fetching overlap instead of adding up. The fetch stream
*ends* only when the push did: cleanly once the version is committed, or with `PushError` (a
gRPC error to the fetcher) when the push broke off or was refused, so a server never sees a
complete stream of a version that did not land, and keeps its old one.

By reference. A version whose bytes travel another way (shared memory on one host, `weights.shm`)
is a manifest plus one small document chunk. Its byte form may follow as a second push of the
*same* version (`WeightRelay.floor`): the trainer sends it when a server cannot open the reference
(another host), and it replaces the held messages, so later fetches stream bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

from slipstream.proto import types_pb2
from slipstream.weights.packer import by_reference, hash_pool


class PushError(ValueError):
    """A push that is refused; the message says exactly why (sent as INVALID_ARGUMENT)."""


class VersionNotNewer(PushError):
    """A push of a version the relay already holds or has passed (sent as ALREADY_EXISTS, so the
    trainer knows from the status code, not from this text, that its weights are there)."""


class RelayedVersion:
    """One version as the relay holds it: its messages so far, and how its push ended."""

    def __init__(self, manifest_msg: types_pb2.WeightMessage) -> None:
        self.manifest = manifest_msg.manifest
        self.version = self.manifest.version
        self.messages: list[types_pb2.WeightMessage] = [manifest_msg]  # manifest, then chunks in order
        self.committed = False
        self.error = ""  # why the push failed ('' while in flight or once committed)
        self._wake = asyncio.Event()

    @property
    def total_bytes(self) -> int:
        """What the manifest says its chunks hold (each server checks them against it)."""
        return self.manifest.total_bytes

    @property
    def by_reference(self) -> bool:
        """Its bytes travel another way (the one chunk is a document saying where)."""
        return by_reference(self.manifest.format)

    @property
    def ended(self) -> bool:
        return self.committed or bool(self.error)

    def append(self, msg: types_pb2.WeightMessage) -> None:
        self.messages.append(msg)
        self._notify()

    def commit(self) -> None:
        self.committed = True
        self._notify()

    def fail(self, reason: str) -> None:
        if not self.ended:
            self.error = reason
            self._notify()

    async def stream(self) -> AsyncIterator[types_pb2.WeightMessage]:
        """Every message, each as soon as it is here; raises `PushError` if the push fails."""
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


async def receive_push(
    messages: AsyncIterator[types_pb2.WeightMessage],
    current_version: int,
    on_manifest: Callable[[RelayedVersion], None] | None = None,
    byte_form_of: RelayedVersion | None = None,
) -> RelayedVersion:
    """Read and check one push stream; raise `PushError` on the first thing that is wrong.

    A push must carry a version above `current_version` (the relay's `floor`), or be the byte form of `byte_form_of` (a held
    by-reference version: same version, same tensors). `on_manifest(version)` is called once the
    manifest passed its checks, so the version can be fetched while it arrives. The result is not
    committed: the caller commits it (or fails it)."""
    incoming: RelayedVersion | None = None

    def begin(version: RelayedVersion) -> None:
        nonlocal incoming
        incoming = version
        if on_manifest is not None:
            on_manifest(version)

    try:
        return await _receive(messages, current_version, byte_form_of, begin)
    except PushError as e:
        if incoming is not None:
            incoming.fail(str(e))
        raise
    except BaseException as e:  # the stream broke (cancelled, connection lost): fetchers must hear of it
        if incoming is not None:
            incoming.fail(f"the push stream broke off ({type(e).__name__})")
        raise


def _check_manifest(m: types_pb2.WeightManifest, floor: int, byte_form_of: RelayedVersion | None) -> None:
    if m.version > floor:
        return
    held = byte_form_of.manifest if byte_form_of is not None else None
    if held is not None and m.version == held.version and not by_reference(m.format):
        if list(m.tensors) != list(held.tensors) or m.model_fingerprint != held.model_fingerprint:
            raise PushError(f"the byte form of version {m.version} lists other tensors than the version held")
        return
    raise VersionNotNewer(f"version {m.version} is not newer than the current {floor}")


def _sha256(msg: types_pb2.WeightMessage) -> str:
    return hashlib.sha256(msg.chunk.data).hexdigest()


async def _receive(messages, floor, byte_form_of, on_manifest) -> RelayedVersion:
    incoming: RelayedVersion | None = None
    loop = asyncio.get_running_loop()
    digests: list[asyncio.Future[str]] = []
    async for msg in messages:
        kind = msg.WhichOneof("kind")
        if incoming is None:
            if kind != "manifest":
                raise PushError("a weight push must start with its manifest")
            _check_manifest(msg.manifest, floor, byte_form_of)
            incoming = RelayedVersion(msg)
            on_manifest(incoming)  # from here on, a push that fails fails its fetchers
            continue
        if kind != "chunk":
            raise PushError(f"unexpected {kind or 'empty'} message after the manifest")
        chunk, manifest = msg.chunk, incoming.manifest
        if chunk.version != manifest.version:
            raise PushError(f"chunk {chunk.index} has version {chunk.version}, manifest {manifest.version}")
        received = len(incoming.messages) - 1
        if chunk.index != received:
            raise PushError(f"chunk {chunk.index} out of order (expected {received})")
        if received >= len(manifest.chunk_sha256):
            raise PushError(f"chunk {chunk.index} beyond the manifest's {len(manifest.chunk_sha256)} chunks")
        incoming.append(msg)  # fetchers stream it now; each server checks its length and sha256
        digests.append(loop.run_in_executor(hash_pool(), _sha256, msg))
    if incoming is None:
        raise PushError("empty weight push")
    received = len(incoming.messages) - 1
    if received != len(incoming.manifest.chunk_sha256):
        raise PushError(f"got {received} chunks, the manifest lists {len(incoming.manifest.chunk_sha256)}")
    # Before the version is committed: a push whose bytes do not match its own manifest must not
    # become the held version (every later, good push of that version would be refused as not
    # newer, and no server could ever apply it). Hashed beside the transfer, on the pool.
    for i, (got, want) in enumerate(
        zip(await asyncio.gather(*digests), incoming.manifest.chunk_sha256, strict=True)
    ):
        if got != want:
            raise PushError(f"chunk {i} fails its sha256 check")
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
        """A push must carry a version greater than this (or be `byte_form_of`'s byte form)."""
        return self.version if self.held else self.version - 1

    @property
    def byte_form_of(self) -> RelayedVersion | None:
        """The held version when it is by reference: its byte form may still be pushed."""
        if self.latest is not None and self.latest.by_reference and self.latest.version == self.version:
            return self.latest
        return None

    def begin(self, incoming: RelayedVersion) -> None:
        """A push's manifest passed: fetches of its version stream it while it arrives. (A push
        it replaces here keeps streaming to the fetchers it has, and ends as that push does.)"""
        self.incoming = incoming

    def commit(self, stored: RelayedVersion) -> None:
        # Re-checked here: two pushes may have been received concurrently.
        if self.incoming is stored:
            self.incoming = None
        held = self.byte_form_of
        byte_form = held is not None and stored.version == held.version and not stored.by_reference
        if stored.version <= self.floor and not byte_form:
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
