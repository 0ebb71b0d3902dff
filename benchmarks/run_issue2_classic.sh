#!/usr/bin/env bash
# Issue 2 benchmark: classic protocol (ConvNet-D3, 1000 epochs, DSA, 5 runs) on the
# CIFAR-10 IPC-10 coresets. Usage: bash benchmarks/run_issue2_classic.sh
set -euo pipefail
for m in random herding kcenter; do
  [ -d runs/c10-$m-ipc10 ] || decoct select $m --dataset cifar10 --ipc 10 --out runs/c10-$m-ipc10 --no-progress
done
for m in random herding kcenter; do
  /usr/bin/time -f "%e s wall" decoct evaluate runs/c10-$m-ipc10 --protocol classic --runs 5 --no-progress
done
cp -rn runs/c10-random-ipc10 runs/c10-random-ipc10-grouped 2>/dev/null || true
/usr/bin/time -f "%e s wall" decoct evaluate runs/c10-random-ipc10-grouped --protocol classic --runs 5 --engine grouped --no-progress
