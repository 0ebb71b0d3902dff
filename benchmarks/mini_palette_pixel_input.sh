#!/usr/bin/env bash
# Issue 3 re-measurement after the palette network moved to pixel-space input under ZCA (c935a66):
# AutoPalette-TM IPC 1, same settings as mini_tm.sh (reuses its experts), fast evaluation, 3 runs.
# (The AutoPalette-DM half moved to mini_apdm_pixel.sh: without a warm-up it collapses, see RESULTS.md.)
# Usage: [B=outdir] [L=logdir] bash benchmarks/mini_palette_pixel_input.sh   (outputs in $B, default runs/bench/;
# log in $L, default benchmarks/logs/)
set -euo pipefail
B=${B:-runs/bench}; L=${L:-benchmarks/logs}; mkdir -p $L
export OMP_NUM_THREADS=1
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
aptm() {
  T decoct distill tm --dataset cifar10 --ipc 1 --experts $B/experts-c10-w32 --syn-steps 20 --expert-epochs 2 \
    --max-start-epoch 1 --lr-img 1000 --iterations 200 --palette 64 --palette-init real \
    --out $B/aptm-px-c10-ipc1 --no-progress
  T decoct evaluate $B/aptm-px-c10-ipc1 --protocol fast --runs 3 --no-progress
}
aptm > $L/aptm-px.log 2>&1
