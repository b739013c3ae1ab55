"""Write docs/flags.md from the config tree (tests/test_docs.py fails when it is out of date)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from slipstream.config import _SECTION_TYPES, FIELDS, field_default

ROOT = Path(__file__).resolve().parent.parent


def render() -> str:
    lines = [
        "# Flags",
        "",
        "Generated from `src/slipstream/config.py` by `scripts/gen_flags_doc.py`; do not edit by hand.",
        "Names follow slime/miles where slime has the same knob; those marked (Slipstream) are ours.",
        "Booleans also accept `--no-<flag>`. Every flag can also be set in a `--config` JSON/YAML file,",
        "nested by section or flat by field name.",
        "",
    ]
    for section, cls in _SECTION_TYPES.items():
        lines += [f"## {section}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            _, fld = FIELDS[f.name]
            default = field_default(fld)
            help_text = fld.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `--{f.name.replace('_', '-')}` | `{default!r}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    out = ROOT / "docs" / "flags.md"
    out.write_text(render())
    print(f"wrote {out}", file=sys.stderr)
