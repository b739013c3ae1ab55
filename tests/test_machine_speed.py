"""Wait bounds scale with the machine's measured speed, and the suite names its slowest tests.

Under a load average of ~8 on a 2-core box, fixed bounds failed tests that pass alone (the chaos
demo past pytest's 600 s, "both servers holding work within 60 s", a 30 s start-up bound at load
~13). The conftest multiplies every pytest-timeout bound by `slowdown()`, tests wait through
`scaled(N)`, and pytest prints the 15 slowest tests.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import machine_speed
from machine_speed import MAX_SLOWDOWN, scaled, slowdown

pytest_plugins = ("pytester",)
TESTS = Path(__file__).resolve().parent


def test_scaled_follows_the_forced_slowdown_and_never_shrinks_a_bound(monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_TEST_SLOWDOWN", "4")
    assert scaled(30) == 120.0
    monkeypatch.setenv("SLIPSTREAM_TEST_SLOWDOWN", "0.5")  # a fast machine keeps the written bound
    assert scaled(30) == 30.0


def test_slowdown_reads_the_load_and_is_capped(monkeypatch):
    monkeypatch.delenv("SLIPSTREAM_TEST_SLOWDOWN", raising=False)
    monkeypatch.setattr(machine_speed, "measured_slowdown", lambda: 1.0)
    monkeypatch.setattr(machine_speed.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    monkeypatch.setattr(machine_speed.os, "cpu_count", lambda: 2)
    assert slowdown() == 4.0  # load 8 on 2 cores
    monkeypatch.setattr(machine_speed.os, "getloadavg", lambda: (100.0, 0.0, 0.0))
    assert slowdown() == MAX_SLOWDOWN  # a real hang still fails, later


def test_the_conftest_scales_every_timeout(pytester, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_TEST_SLOWDOWN", "3")
    pytester.syspathinsert(TESTS)
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makeini("[pytest]\ntimeout = 600\n")
    pytester.makepyfile(
        test_bounds="""
import pytest

@pytest.mark.timeout(60)
def test_marked(request):
    assert request.node.get_closest_marker("timeout").args[0] == 180

def test_default(request):
    assert request.node.get_closest_marker("timeout").args[0] == 1800

def test_fixture(scaled):
    assert scaled(10) == 30
"""
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_the_suite_prints_its_slowest_tests():
    pytest_ini = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--durations=15" in pytest_ini["addopts"].split()
