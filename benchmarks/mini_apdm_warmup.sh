#!/usr/bin/env bash
# Issue 3 follow-up: AutoPalette-DM at IPC 10 (K = 64, x4 images) as in mini_matching.sh, plus the
# palette-network warm-up (--palette-warmup 1500 steps of 64 real images, ~2 epochs of CIFAR-10 as
# the code's --use_warmup), then the same fast evaluation (3 runs).
# Usage: OMP_NUM_THREADS=1 bash benchmarks/mini_apdm_warmup.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench; W=${WARMUP:-1500}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct distill dm --dataset cifar10 --ipc 10 --iterations 100 --palette 64 --zca --palette-init real \
  --palette-warmup $W --out $B/apdm-w$W-c10-ipc10 --no-progress
T decoct evaluate $B/apdm-w$W-c10-ipc10 --protocol fast --runs 3 --no-progress
