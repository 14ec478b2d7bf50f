#!/usr/bin/env bash
# One-GPU check (<= 8 min on one H200-class GPU): ViT-B/32 CLIP (random init) for 20 steps in bf16
# under DeepSpeed ZeRO-1 and ZeRO-3 with the gradient cache at global batch 4096; samples/s vs a
# plain open_clip loop (autocast bf16); tiled InfoNCE vs ClipLoss at B=65536. Prints one JSON line
# and exits non-zero on any failure (tools/gpu_check.py has the details).
#
#   tools/gpu_check.sh [--out FILE] [--steps N] [--batch N] [--chunk N] [--loss-batch N]
#   tools/gpu_check.sh --dry-run     # the same code path on CPU (gloo, fp32, tiny model): seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT=${GPU_CHECK_TIMEOUT:-480}  # 8 minutes
rc=0
timeout --kill-after=10 "$LIMIT" "$PY" tools/gpu_check.py "$@" || rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 124 ] && why=", killed after ${LIMIT}s" || why=""
  echo "gpu_check.sh: FAILED (exit $rc$why)" >&2
  exit 1
fi
