#!/usr/bin/env bash
# Second half of benchmarks/mini_decoupled.sh: relabel with batch 25 (4 stored batches per epoch,
# 120 in all) so that 40x pruning keeps whole batches, prune 10x/40x, soft evaluation, 3 runs.
set -euo pipefail
B=runs/bench; EP=${STUDENT_EPOCHS:-30}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
for r in rand-soft-c10-ipc10 sre2l-c10-ipc10 dwa-c10-ipc10 lpld-c10-ipc10; do
  T decoct relabel $B/$r --teacher $B/teacher-cbn64-c10 --epochs $EP --batch-size 25 --force --no-progress
done
for f in 10 40; do T decoct relabel $B/lpld-c10-ipc10 --prune $f --out $B/lpld-c10-ipc10-p$f --force --no-progress; done
for r in rand-soft-c10-ipc10 sre2l-c10-ipc10 dwa-c10-ipc10 lpld-c10-ipc10 lpld-c10-ipc10-p10 lpld-c10-ipc10-p40; do
  T decoct evaluate $B/$r --protocol soft --model convnet_bn --runs 3 --force --no-progress
done
