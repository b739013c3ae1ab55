"""Every flag in docs/flags.md either works or is refused (issue 13: flags accepted and ignored).

A flag works when some code reads its config field: an attribute read `.field_name` in src/,
services/ or buffer/ (outside config.py), or inside a config property that such code reads
(`effective_max_staleness` reads `sync`). A flag that only `__post_init__` looks at must be in
REFUSED, and a value other than its default must then raise ConfigError: what `--rollout-engine
sglang` and `--actor-num-nodes 2` did before, silently accepted, is caught here.

The walk is by name, so a field called like an attribute of something else (`tensor.dtype`,
`json.load`) could look read when it is not: reads through a module name are skipped, and the
names in GENERIC count only when read through their section (`cfg.infra.port`, `infra.port`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from slipstream.config import _SECTION_TYPES, FIELDS, ConfigError, config_from_values

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PY = ROOT / "src" / "slipstream" / "config.py"

# Fields whose every value but one is refused in __post_init__, with what is supported said in
# the error; no code needs to read them. field -> a value that must be refused.
REFUSED = {
    "rollout_engine": "sglang",  # the native engine is the only one
    "actor_num_nodes": 2,  # the trainer runs on one node
    "speculative_eagle_topk": 2,  # chain drafting (top-k 1) only
    "speculative_num_draft_tokens": 5,  # = --speculative-num-steps + 1 under top-k 1
}

# Fields read only through `Config.as_namespace()`, the flat `args` that slime hooks
# (--custom-rm-path, --dynamic-sampling-filter-path functions) receive: user code reads them, ours
# does not. Each entry says which hook it is for. None today.
NAMESPACE_ONLY: dict[str, str] = {}

# Field names that tensors, processes, sockets and stores also have as attributes: they count as
# read only through their section (`cfg.model.dtype`, `infra.port`, `self.train.save`).
GENERIC = {"dtype", "device", "host", "port", "load", "save", "seed", "sync"}


def documented_fields() -> list[str]:
    text = (ROOT / "docs" / "flags.md").read_text()
    flags = re.findall(r"^\| `--([a-z0-9-]+)` \|", text, flags=re.MULTILINE)
    assert len(flags) > 50, "docs/flags.md: table rows not found"
    return [f.replace("-", "_") for f in flags]


def _module_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _field_reads(tree: ast.AST, modules: set[str], self_section: str = "") -> set[str]:
    """Fields `tree` reads as attributes (GENERIC ones only through their section; inside a
    section's own methods, `self` is that section)."""
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in FIELDS):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in modules:
            continue  # json.load, torch.save, random.seed
        if node.attr in GENERIC:
            section = FIELDS[node.attr][0]
            via = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if via != section and not (via == "self" and self_section == section):
                continue
        found.add(node.attr)
    return found


def read_fields() -> set[str]:
    read, attrs_used = set(), set()
    for folder in ("src", "services", "buffer"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == CONFIG_PY:
                continue
            tree = ast.parse(path.read_text(), str(path))
            read |= _field_reads(tree, _module_names(tree))
            attrs_used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # Config properties and methods that code outside config.py uses pass their reads on;
    # __post_init__ only validates, which is not reading.
    sections = {cls.__name__: name for name, cls in _SECTION_TYPES.items()}
    tree = ast.parse(CONFIG_PY.read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            if fn.name != "__post_init__" and fn.name in attrs_used:
                read |= _field_reads(fn, set(), sections.get(cls.name, ""))
    return read


def test_every_documented_flag_is_a_field():
    assert [f for f in documented_fields() if f not in FIELDS] == []
    assert sorted(set(FIELDS) - set(documented_fields())) == []


def test_every_documented_flag_is_read_or_refused():
    read = read_fields()
    ignored = [
        "--" + f.replace("_", "-")
        for f in documented_fields()
        if f not in read and f not in REFUSED and f not in NAMESPACE_ONLY
    ]
    assert ignored == [], (
        "flags no code reads: make them work, or refuse them (REFUSED) with what is supported"
    )


def test_namespace_only_stays_honest():
    # (A REFUSED field may be read too: refused values fail, the supported one is used.)
    assert [f for f in NAMESPACE_ONLY if f in read_fields()] == [], "read now: take it off NAMESPACE_ONLY"


@pytest.mark.parametrize("field, value", sorted(REFUSED.items()))
def test_refused_flags_are_refused(field, value):
    with pytest.raises(ConfigError, match="not supported"):
        config_from_values({field: value})
