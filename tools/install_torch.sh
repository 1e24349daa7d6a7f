#!/usr/bin/env bash
# The torch build for this machine, installed before requirements.txt (whose torch==X pin it satisfies):
#   - an NVIDIA GPU (nvidia-smi lists one): the default build from the package index (CUDA, ~2.7 GB);
#   - otherwise the CPU build X+cpu (~200 MB): from pip's configured indexes and wheel folders if they have
#     it, else from PyTorch's CPU index ($TORCH_CPU_INDEX); if neither answers within seconds, the default
#     build after all (it runs on a CPU too), said in one line.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
version=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$(dirname "$0")/../requirements.txt")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: torch $version, default (CUDA) build"
    exit 0
fi
quick=(-q --timeout 10 --retries 0)
if "$PY" -m pip install "${quick[@]}" "torch==$version+cpu" 2>/dev/null; then
    echo "install: no NVIDIA GPU: torch $version+cpu (CPU build, from pip's configured sources)"
elif "$PY" -m pip install "${quick[@]}" --extra-index-url "$TORCH_CPU_INDEX" "torch==$version+cpu" 2>/dev/null; then
    echo "install: no NVIDIA GPU: torch $version+cpu (CPU build, from $TORCH_CPU_INDEX)"
else
    echo "install: no NVIDIA GPU, but the CPU build torch $version+cpu could not be had: installing the default build"
fi
