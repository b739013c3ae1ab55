"""Generate the Python gRPC stubs from protos/ into src/slipstream/proto/.

    python scripts/gen_protos.py            # write the stubs
    python scripts/gen_protos.py --out DIR  # write them under DIR instead (the staleness test)

Generated files are committed and never edited by hand; tests/test_protos.py fails when
they differ from what this script produces from the .proto sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(PROTOS.glob("slipstream/proto/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = generate(args.out)
    print(f"generated stubs for {len(sources)} protos under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
