#!/usr/bin/env bash
# Issue 3: AutoPalette-DM IPC 10 (K = 64, x4 images, ZCA, 100 it.) with the palette network on
# pixel-space input (c935a66), with and without the code's warm-up (1500 steps of 64 real images),
# then the fast evaluation (3 runs). WARMUP=0 runs the no-warm-up cell.
# Usage: OMP_NUM_THREADS=1 WARMUP=1500 bash benchmarks/mini_apdm_pixel.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench; W=${WARMUP:-1500}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct distill dm --dataset cifar10 --ipc 10 --iterations 100 --palette 64 --zca --palette-init real \
  --palette-warmup $W --out $B/apdm-px-w$W-c10-ipc10 --no-progress
T decoct evaluate $B/apdm-px-w$W-c10-ipc10 --protocol fast --runs 3 --no-progress
