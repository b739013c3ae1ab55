"""docs/flags.md is generated from the config tree and must match it."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flags_doc_is_current():
    render = runpy.run_path(str(ROOT / "scripts" / "gen_flags_doc.py"))["render"]
    assert (ROOT / "docs" / "flags.md").read_text() == render(), "run: python scripts/gen_flags_doc.py"
