#!/usr/bin/env bash
# Issue 3: AutoPalette-DM IPC 10 (K = 64, x4 images, ZCA, 100 it.) with the palette network on
# pixel-space input (c935a66), with and without the code's warm-up (WARMUP steps of 64 real images;
# default 1563 = 2 epochs at batch 64, what the AutoPalette-DM presets set; RESULTS.md's issue 3 cell
# used 1500), then the fast evaluation (3 runs). WARMUP=0 runs the no-warm-up cell.
# Usage: OMP_NUM_THREADS=1 [B=outdir] WARMUP=1563 bash benchmarks/mini_apdm_pixel.sh   (outputs in $B,
# default runs/bench/)
set -euo pipefail
B=${B:-runs/bench}; W=${WARMUP:-1563}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct distill dm --dataset cifar10 --ipc 10 --iterations 100 --palette 64 --zca --palette-init real \
  --palette-warmup $W --out $B/apdm-px-w$W-c10-ipc10 --no-progress
T decoct evaluate $B/apdm-px-w$W-c10-ipc10 --protocol fast --runs 3 --no-progress
