"""A service started by hand (docker compose, Kubernetes, docs/deploy.md) without an address it
needs stops at once with one line and exit code 2, the parser's convention (issue 13 item 5).
Before: a coordinator without --reward-addr printed a gRPC C-core trace and never served; a
trainer without --coordinator-addr waited 120 s."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = {
    "coordinator without --reward-addr": (
        "coordinator", ["--redis-url", "redis://127.0.0.1:9/0"], "--reward-addr (host:port of the reward service"
    ),
    "coordinator without --redis-url": (
        "coordinator", ["--reward-addr", "127.0.0.1:9"], "--redis-url (the Redis holding the run's buffer"
    ),
    "trainer without --coordinator-addr": (
        "trainer", ["--redis-url", "redis://127.0.0.1:9/0"], "--coordinator-addr (host:port of the coordinator"
    ),
    "trainer without --redis-url": (
        "trainer", ["--coordinator-addr", "127.0.0.1:9"], "--redis-url (the Redis holding the run's buffer"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_missing_address_is_one_line_and_exit_2(case, tmp_path):
    service, flags, needle = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", f"slipstream.services.{service}", "--run-dir", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"slipstream {service}: error: missing ") and needle in lines[0]


def test_every_missing_address_is_named_in_the_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "slipstream.services.coordinator", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--redis-url" in line and "SLIPSTREAM_REDIS_URL" in line
    assert "--reward-addr" in line and "SLIPSTREAM_REWARD_ADDR" in line
