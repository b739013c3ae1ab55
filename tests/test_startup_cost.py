"""Start-up cost: what every service process pays before it serves, kept from growing back.

A mesh test starts five or six Python processes, and the suite hundreds; an import that one of
them does not need costs its CPU seconds every time (docs/benchmarks.md, the test suite).
"""

from __future__ import annotations

import subprocess
import sys

from mesh_fixtures import build_tiny_model


def test_loading_a_checkpoint_imports_neither_dynamo_nor_sympy(tmp_path):
    """`load_model` builds on the meta device: nn.Embedding's init there would import
    torch._dynamo (~1 CPU s) and `to_empty` sympy (~0.4 s), in every rollout server and trainer.
    The loaded weights are the checkpoint's (tests/test_model.py and others compare them)."""
    model = build_tiny_model(tmp_path / "model")
    code = (
        "import sys\n"
        "from slipstream.models.hf import load_model\n"
        f"load_model({str(model)!r})\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.distributed.tensor') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
