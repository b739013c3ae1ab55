"""Shared fixtures: a real Valkey/Redis server for the whole test session.

Infrastructure in tests is real (STYLE.md): `redis_url` is an embedded server started with the
same command line the launcher uses (AOF on, loopback only) in a temporary directory. Tests
share one server; each uses its own run_id so their keys never meet.
"""

from __future__ import annotations

import uuid

import pytest

from slipstream.buffer.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """URL of a real embedded server, alive for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    with server:
        yield server.url


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id unique to one test, so tests sharing `redis_url` never see each other's keys."""
    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
