"""Fixtures of the chaos suite: the tiny model and prompts, and a mesh torn down whatever happens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mesh_fixtures

from mesh_fixtures import build_prompts, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def chaos_assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    return build_tiny_model(d / "model"), build_prompts(d / "train.jsonl")
