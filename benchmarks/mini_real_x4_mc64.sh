#!/usr/bin/env bash
# Issue 3 follow-up: AutoPalette's budget rule applied to real images with a good quantiser —
# 40 random real CIFAR-10 images per class (IPC 10 x 4) median-cut to 64 colours, fast evaluation,
# 3 runs. Compare with DM IPC 10 and AutoPalette-DM in RESULTS.md.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/mini_real_x4_mc64.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct quantize --dataset cifar10 --ipc 40 --colors 64 --method mediancut --out $B/rand40-mc64-c10 --no-progress
T decoct evaluate $B/rand40-mc64-c10 --protocol fast --runs 3 --no-progress
