#!/usr/bin/env bash
# The GPU check of issue 12: one prepared command for a lent GPU (under 8 minutes on one H200).
# Prints one JSON object on stdout (progress on stderr); see benchmarks/gpu_check.py for what it measures.
#
#   bash benchmarks/gpu_check.sh                 # CUDA
#   bash benchmarks/gpu_check.sh --cpu --tiny    # anywhere, seconds
#
# Works from an uninstalled checkout (src/ on PYTHONPATH: the GPU machine starts bare). Files go to
# $GPU_CHECK_WORK (default /tmp/decoct-gpu-check); the JSON is also written to $OUT/gpu_check.json
# when $OUT is set (the device machine's folder that comes back), else to the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="$(command -v python3 || command -v python)"
WORK="${GPU_CHECK_WORK:-/tmp/decoct-gpu-check}"
JSON="${OUT:-$WORK}/gpu_check.json"
mkdir -p "$(dirname "$JSON")"
# 470 s: the sections stop starting at --budget-s (420 s by default); this is the hard stop
exec timeout 470 "$PY" benchmarks/gpu_check.py --work "$WORK" --out "$JSON" "$@"
