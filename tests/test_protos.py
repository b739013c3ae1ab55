"""The generated stubs are exactly what scripts/gen_protos.py makes from protos/ (never stale)."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(
        p.relative_to(ROOT / "src") for p in (ROOT / "src" / "slipstream" / "proto").glob("*_pb2*.py*")
    )
    assert fresh == committed, "run `make protos`: the set of generated files changed"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "src" / p, shallow=False)]
    assert stale == [], f"stale generated stubs (run `make protos`): {stale}"


def test_every_service_has_a_proto_and_stub():
    from slipstream.proto import coordinator_pb2_grpc, reward_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc

    for module, name in [
        (coordinator_pb2_grpc, "Coordinator"),
        (reward_pb2_grpc, "Reward"),
        (rollout_pb2_grpc, "Rollout"),
        (trainer_pb2_grpc, "Trainer"),
    ]:
        assert hasattr(module, f"{name}Stub") and hasattr(module, f"{name}Servicer")
