#!/bin/sh
# Fill deploy/docker/wheels with every wheel the image needs (Slipstream, torch, all
# dependencies), so the image builds with no package index: an air-gapped cluster's build, or a
# machine whose containers cannot verify the index's certificates.
#   deploy/docker/build-wheelhouse.sh [PYTHON] [extra pip args, e.g. --extra-index-url ...]
# Then: docker build -f deploy/docker/Dockerfile --build-arg PIP_ARGS="--no-index --find-links /wheels" .
# The wheels must match the image's Python (3.11 for the CPU image) and platform.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${1:-python3}
[ $# -gt 0 ] && shift
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OUT="$ROOT/deploy/docker/wheels"
mkdir -p "$OUT"
# setuptools and wheel: the build backend pip needs to build Slipstream itself in the image.
# async-timeout: redis needs it below Python 3.11.3 (Debian bookworm has 3.11.2), pip on a newer
# host Python would not fetch it.
"$PYTHON" -m pip wheel --wheel-dir "$OUT" "$@" "$TORCH_SPEC" "setuptools>=69" wheel "async-timeout>=4.0.3" "$ROOT"
echo "wheelhouse: $(ls "$OUT" | grep -c '\.whl$') wheels in $OUT"
