"""Kernel checks written once as a script and run twice: under Triton's interpreter on the CPU
(where Triton and a NumPy it works with are installed) and on a GPU. A script, not a test body,
because TRITON_INTERPRET is read when Triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec

import pytest


def interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter turns a runtime loop bound into an index through `int()` of a
    one-element array, which NumPy 2.3 and later refuse."""
    if find_spec("triton") is None:
        return False
    import numpy

    return tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 3)


needs_interpreter = pytest.mark.skipif(
    not interpreter_runs_loops(), reason="needs Triton and NumPy < 2.3 (its interpreter)"
)


def run_checks(script: str, interpret: bool) -> None:
    """Run `script`, which prints "ok" last when every check held."""
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else None
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
