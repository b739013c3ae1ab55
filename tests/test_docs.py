"""docs/flags.md is generated from the config tree and must match it."""

import ast
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flags_doc_is_current():
    render = runpy.run_path(str(ROOT / "scripts" / "gen_flags_doc.py"))["render"]
    assert (ROOT / "docs" / "flags.md").read_text() == render(), "run: python scripts/gen_flags_doc.py"


# ---- every --flag the docs name exists -------------------------------------------------------

# Flags of other programs that the docs and deploy files quote, by program. Ours are found in the
# code (config fields, `--no-<bool>` forms, every `add_argument` in src/, services/, buffer/,
# bench/, scripts/, and the options of scripts/*.sh); anything else must be listed here, under
# the tool it belongs to.
OTHER_TOOLS = {
    "docker / docker compose": {"--build", "--build-arg", "--entrypoint", "--network", "--no-color",
                                "--no-deps", "--profile", "--rm", "--scale"},
    "Dockerfile (COPY, HEALTHCHECK) and useradd": {"--from", "--interval", "--timeout", "--start-period",
                                                   "--retries", "--create-home", "--shell", "--uid"},
    "apt-get, debootstrap": {"--no-install-recommends", "--variant"},
    "pip": {"--extra-index-url", "--find-links", "--no-index", "--no-deps", "--target", "--wheel-dir",
            "--only-binary", "--python-version", "--implementation", "--platform", "--no-compile",
            "--no-cache-dir", "--upgrade", "--dest", "--quiet", "--force-reinstall", "--prefer-binary"},
    "redis-server / redis-cli": {"--appendonly", "--appendfsync", "--dir", "--maxmemory-policy",
                                 "--no-auth-warning"},
    "kubectl": {"--from-literal", "--from-file"},
    "torchrun": {"--nnodes", "--nproc-per-node", "--standalone"},
    "pytest, pytest-xdist": {"--durations", "--noconftest", "--dist", "--no-loadscope-reorder"},
    "py-spy record": {"--nonblocking", "--threads"},
    # slime / Megatron / SGLang names that our flags' help gives as equivalents
    "slime, Megatron, SGLang": {"--calculate-per-token-loss", "--recompute-granularity",
                                "--sglang-kv-cache-dtype"},
    # deploy.md: "every flag --foo-bar is SLIPSTREAM_FOO_BAR"
    "placeholder": {"--foo-bar"},
}  # fmt: skip

_FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w<-])")


def _doc_files() -> list[Path]:
    deploy = [
        p
        for p in (ROOT / "deploy").rglob("*")
        if p.is_file()
        and not {"data", "wheels", "secrets"} & set(p.relative_to(ROOT / "deploy").parts[:-1])
        and p.suffix not in (".json",)
    ]
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(deploy)]


def _our_flags() -> set[str]:
    from slipstream.config import build_parser

    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for folder in ("src", "services", "buffer", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                    names = {
                        a.value
                        for a in node.args
                        if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                    }
                    negatable = any(  # argparse.BooleanOptionalAction adds --no-<name>
                        k.arg == "action" and getattr(k.value, "attr", "") == "BooleanOptionalAction"
                        for k in node.keywords
                    )
                    flags |= names | ({"--no-" + n[2:] for n in names} if negatable else set())
    for path in (ROOT / "scripts").glob("*.sh"):  # a shell script's options: its `case` labels
        flags |= set(re.findall(r"^\s*(--[a-z][a-z0-9-]*)\)", path.read_text(), flags=re.MULTILINE))
    return flags


def test_docs_name_only_flags_that_exist():
    known = _our_flags().union(*OTHER_TOOLS.values())
    unknown = sorted(
        f"{path.relative_to(ROOT)}: {flag}"
        for path in _doc_files()
        for flag in set(_FLAG_RE.findall(path.read_text(errors="replace")))
        if flag not in known
    )
    assert unknown == [], "a flag that does not exist (or another tool's: add it to OTHER_TOOLS)"
