#!/usr/bin/env bash
# Install lightning_op and what it needs: `bash install.sh` (the package) or `bash install.sh test`.
#
# An installed torch is kept (GPU machines keep their CUDA build). With none installed, a machine
# with an NVIDIA GPU gets the default build and a CPU-only machine gets torch 2.13.0 (on this
# project's CI and dev machines that is the CPU build on local disk; an unpinned torch would pull
# a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet torch
  else
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".${extras:+[$extras]}"
