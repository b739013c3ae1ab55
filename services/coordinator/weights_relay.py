"""The weight relay: the trainer pushes a version once, every rollout server pulls it.

The coordinator never decodes weights. It checks what is cheap and catches a broken or
confused push before it reaches N servers: the stream starts with a manifest, the version is
newer than the one it holds, chunks arrive in order, each chunk's sha256 matches the
manifest, and the byte count adds up. Then it keeps the *messages* of the latest version
exactly as received, so `FetchWeights` streams them out unchanged and every server verifies
the same bytes the trainer produced. Only the latest version is kept: a server told about
version v that asks after v+1 landed gets NOT_FOUND and waits for the next notice.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from slipstream.proto import types_pb2


class PushError(ValueError):
    """A push that is refused; the message says exactly why (sent as INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class StoredVersion:
    version: int
    messages: tuple[types_pb2.WeightMessage, ...]  # manifest, then chunks in order
    total_bytes: int


async def receive_push(
    messages: AsyncIterator[types_pb2.WeightMessage], current_version: int
) -> StoredVersion:
    """Read and check one push stream; raise `PushError` on the first thing that is wrong."""
    kept: list[types_pb2.WeightMessage] = []
    manifest: types_pb2.WeightManifest | None = None
    total = 0
    async for msg in messages:
        kind = msg.WhichOneof("kind")
        if manifest is None:
            if kind != "manifest":
                raise PushError("a weight push must start with its manifest")
            manifest = msg.manifest
            if manifest.version <= current_version:
                raise PushError(f"version {manifest.version} is not newer than the current {current_version}")
        elif kind == "chunk":
            chunk = msg.chunk
            expected = len(kept) - 1
            if chunk.version != manifest.version:
                raise PushError(
                    f"chunk {chunk.index} has version {chunk.version}, manifest {manifest.version}"
                )
            if chunk.index != expected:
                raise PushError(f"chunk {chunk.index} out of order (expected {expected})")
            if expected >= len(manifest.chunk_sha256):
                raise PushError(
                    f"chunk {chunk.index} beyond the manifest's {len(manifest.chunk_sha256)} chunks"
                )
            if hashlib.sha256(chunk.data).hexdigest() != manifest.chunk_sha256[expected]:
                raise PushError(f"chunk {chunk.index}: sha256 does not match the manifest")
            total += len(chunk.data)
        else:
            raise PushError(f"unexpected {kind or 'empty'} message after the manifest")
        kept.append(msg)
    if manifest is None:
        raise PushError("empty weight push")
    num_chunks = len(kept) - 1
    if num_chunks != len(manifest.chunk_sha256):
        raise PushError(f"got {num_chunks} chunks, the manifest lists {len(manifest.chunk_sha256)}")
    if total != manifest.total_bytes:
        raise PushError(f"got {total} bytes, the manifest says {manifest.total_bytes}")
    return StoredVersion(manifest.version, tuple(kept), total)


class WeightRelay:
    """Holds the latest pushed version for fetching.

    A restarted coordinator knows the run's version (from its journal) but not its bytes:
    `known_version` is that version, `held` is False until a push brings it (or a newer one),
    and until then a push of the *same* version is accepted: the trainer re-pushes what it has
    when it sees `weights_held == false`.
    """

    def __init__(self, known_version: int = 0) -> None:
        self.latest: StoredVersion | None = None
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

    def commit(self, stored: StoredVersion) -> None:
        # Re-checked here: two pushes may have been received concurrently.
        if stored.version <= self.floor:
            raise PushError(f"version {stored.version} is not newer than the current {self.version}")
        self.latest = stored

    def lookup(self, version: int) -> StoredVersion | None:
        """The kept version when `version` is 0 (latest) or equals it; else None."""
        if self.latest is None or version not in (0, self.latest.version):
            return None
        return self.latest
