#!/usr/bin/env bash
# Issue 3 mini benchmark (docs/README.md, Benchmarks and presets): CIFAR-10, IPC 10, CPU, fast
# evaluation (300 epochs), 3 runs.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/mini_matching.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench; IT=${DM_ITERATIONS:-100}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
[ -d $B/random-c10-ipc10 ] || T decoct select random --dataset cifar10 --ipc 10 --out $B/random-c10-ipc10 --no-progress
T decoct distill dm --dataset cifar10 --ipc 10 --iterations $IT --out $B/dm-c10-ipc10 --no-progress
T decoct quantize $B/dm-c10-ipc10 --colors 64 --method mediancut --out $B/dm-c10-ipc10-mc64 --no-progress
for r in random-c10-ipc10 dm-c10-ipc10 dm-c10-ipc10-mc64; do
  T decoct evaluate $B/$r --protocol fast --runs 3 --no-progress
done
# AutoPalette-DM (K = 64, x4 images, ZCA, 100 it., the code's warm-up): its own script
WARMUP=1500 bash benchmarks/mini_apdm_pixel.sh
