"""Shared fixtures: a real Valkey/Redis server for the whole test session; wait bounds scaled to
the machine's speed.

Infrastructure in tests is real (STYLE.md): `redis_url` is an embedded server started with the
same command line the launcher uses (AOF on, loopback only) in a temporary directory. Tests
share one server (one per worker under `make test`'s pytest-xdist); each uses its own run_id so
their keys never meet.

Bounds are written for an idle 2-core machine and scaled by how slow this one is now
(machine_speed.py): every `@pytest.mark.timeout(N)` and the ini's `timeout` here, each wait in a
test through `scaled(N)` (importable, or the fixture of that name).
"""

from __future__ import annotations

import os
import uuid

# OpenMP's threads sleep between parallel regions instead of spinning. Torch on more than one
# thread (a test module's own, the demo's warm start) spins its idle threads after every op by
# default; with the other pytest worker and a mesh's services wanting the same 2 cores, that
# spinning was most of their CPU (the warm start's first 40 SFT steps: 100 CPU s spinning, 21
# passive, at load ~12). libgomp reads it when torch loads it: pytest's plugins do not import
# torch, so it holds in this process, and in every process a test starts (they inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from machine_speed import load_per_core, measured_slowdown, scaled, slowdown  # noqa: E402

from slipstream.buffer.embedded import EmbeddedRedis  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"wait bounds x{slowdown():.2f} (CPU workload x{measured_slowdown():.2f} of an idle 2-core box, "
        f"load {load_per_core():.2f}/core; SLIPSTREAM_TEST_SLOWDOWN forces one)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """pytest-timeout's bounds (a test's marker, else the ini's `timeout`) times the slowdown."""
    factor = slowdown()
    if factor <= 1.0:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        kwargs = dict(marker.kwargs) if marker else {}
        seconds = marker.args[0] if marker and marker.args else kwargs.pop("timeout", default)
        if seconds:
            item.add_marker(
                pytest.mark.timeout(float(seconds) * factor, *marker.args[1:] if marker else (), **kwargs),
                append=False,
            )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The slowest test files (setup, call and teardown of their tests summed), beside pytest's
    slowest tests: what `make test`'s two workers share out file by file (--dist loadfile)."""
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                path = report.nodeid.split("::")[0]
                per_file[path] = per_file.get(path, 0.0) + report.duration
    if not per_file:
        return
    terminalreporter.write_sep(
        "=", f"slowest test files (of {len(per_file)}, {sum(per_file.values()):.0f} s in all)"
    )
    for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:10]:
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")


@pytest.fixture(name="scaled", scope="session")
def scaled_fixture():
    """`scaled(30)`: a bound that holds on an idle 2-core box, for this machine now."""
    return scaled


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """URL of a real embedded server, alive for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    with server:
        yield server.url


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny tensors more threads only contend on a shared box
    (40x slower measured). A file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch  # here, not at the top: OMP_WAIT_POLICY above must be set before torch loads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id unique to one test, so tests sharing `redis_url` never see each other's keys."""
    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
