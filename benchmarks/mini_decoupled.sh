#!/usr/bin/env bash
# Issue 4 mini benchmark (docs/README.md, Benchmarks and presets): CIFAR-10, IPC 10, CPU teacher
# (ConvNet-BN width 64), SRe2L / DWA / LPLD recover, FKD relabel (stored epochs = student epochs),
# LPLD pruning 10x/40x, soft evaluation with a ConvNet-BN student, 3 runs.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/mini_decoupled.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench; TE=${TEACHER_EPOCHS:-4}; IT=${RECOVER_ITERATIONS:-500}; EP=${STUDENT_EPOCHS:-30}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct squeeze --dataset cifar10 --config configs/decoupled/squeeze-convnet_bn-cifar10-mini.yaml \
  --epochs $TE --out $B/teacher-cbn64-c10 --no-progress
[ -d $B/rand-soft-c10-ipc10 ] || T decoct select random --dataset cifar10 --ipc 10 --out $B/rand-soft-c10-ipc10 --no-progress
for m in sre2l dwa lpld; do
  T decoct distill $m --teacher $B/teacher-cbn64-c10 --ipc 10 --iterations $IT --out $B/$m-c10-ipc10 --no-progress
done
for r in rand-soft-c10-ipc10 sre2l-c10-ipc10 dwa-c10-ipc10 lpld-c10-ipc10; do
  T decoct relabel $B/$r --teacher $B/teacher-cbn64-c10 --epochs $EP --no-progress
done
for f in 10 40; do T decoct relabel $B/lpld-c10-ipc10 --prune $f --out $B/lpld-c10-ipc10-p$f --no-progress; done
for r in rand-soft-c10-ipc10 sre2l-c10-ipc10 dwa-c10-ipc10 lpld-c10-ipc10 lpld-c10-ipc10-p10 lpld-c10-ipc10-p40; do
  T decoct evaluate $B/$r --protocol soft --model convnet_bn --runs 3 --no-progress
done
