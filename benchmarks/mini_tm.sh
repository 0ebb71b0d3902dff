#!/usr/bin/env bash
# Issue 3 mini benchmark, TM cells (CPU): CIFAR-10 IPC 1 with 2 short, narrow experts
# (ConvNet-D3 width 32, 3 epochs, ZCA) -- a CPU-sized stand-in for MTT's 100 x 50-epoch width-128
# experts; the synthetic sets are then evaluated with the protocol's width-128 ConvNet (fast, 3 runs).
# Usage: OMP_NUM_THREADS=1 [B=outdir] bash benchmarks/mini_tm.sh   (outputs in $B, default runs/bench/;
# the experts step resumes: finished experts with the same settings are kept)
set -euo pipefail
B=${B:-runs/bench}; IT=${TM_ITERATIONS:-200}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct experts --dataset cifar10 --num-experts 2 --epochs 3 --width 32 --out $B/experts-c10-w32 --no-progress
[ -d $B/random-c10-ipc1 ] || T decoct select random --dataset cifar10 --ipc 1 --out $B/random-c10-ipc1 --no-progress
ev() { T decoct evaluate $B/$1 --protocol fast --runs 3 --no-progress; }  # each cell as soon as it exists
T decoct distill tm --dataset cifar10 --ipc 1 --experts $B/experts-c10-w32 --syn-steps 20 --expert-epochs 2 \
  --max-start-epoch 1 --lr-img 1000 --iterations $IT --out $B/tm-c10-ipc1 --no-progress
ev tm-c10-ipc1
T decoct distill tm --dataset cifar10 --ipc 1 --experts $B/experts-c10-w32 --syn-steps 20 --expert-epochs 2 \
  --max-start-epoch 1 --lr-img 1000 --iterations $IT --palette 64 --palette-init real --out $B/aptm-c10-ipc1 --no-progress
ev aptm-c10-ipc1
ev random-c10-ipc1
