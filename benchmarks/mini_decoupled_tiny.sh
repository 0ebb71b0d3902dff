#!/usr/bin/env bash
# Issue 4 mini benchmark (docs/README.md, Benchmarks and presets) on tinyimagenet10 (64x64, 10
# classes, 500 train/class): CPU teacher (ConvNet-D4-BN width 64), SRe2L / DWA / LPLD recover at IPC
# 10 with the "tiny" presets (iterations cut to $RECOVER_ITERATIONS), FKD relabel with batch 25 (4
# stored batches per epoch) so 40x pruning keeps whole batches, LPLD pruning 10x/40x, soft
# evaluation, 3 runs.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/mini_decoupled_tiny.sh   (outputs in runs/bench/)
set -euo pipefail
B=runs/bench; TE=${TEACHER_EPOCHS:-20}; IT=${RECOVER_ITERATIONS:-300}; EP=${STUDENT_EPOCHS:-30}
D=tinyimagenet10; TT=$B/teacher-cbn64-tiny10
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
[ -d $TT ] || T decoct squeeze --dataset $D --config configs/decoupled/squeeze-convnet_bn-tiny10-mini.yaml \
  --epochs $TE --out $TT --no-progress
[ -d $B/rand-soft-tiny-ipc10 ] || T decoct select random --dataset $D --ipc 10 --out $B/rand-soft-tiny-ipc10 --no-progress
for m in sre2l dwa lpld; do
  [ -d $B/$m-tiny-ipc10 ] || T decoct distill $m --teacher $TT --ipc 10 --iterations $IT --out $B/$m-tiny-ipc10 --no-progress
done
for r in rand-soft-tiny-ipc10 sre2l-tiny-ipc10 dwa-tiny-ipc10 lpld-tiny-ipc10; do
  T decoct relabel $B/$r --teacher $TT --epochs $EP --batch-size 25 --force --no-progress
done
for f in 10 40; do T decoct relabel $B/lpld-tiny-ipc10 --prune $f --out $B/lpld-tiny-ipc10-p$f --force --no-progress; done
for r in rand-soft-tiny-ipc10 sre2l-tiny-ipc10 dwa-tiny-ipc10 lpld-tiny-ipc10 lpld-tiny-ipc10-p10 lpld-tiny-ipc10-p40; do
  T decoct evaluate $B/$r --protocol soft --model convnet_bn --runs 3 --force --no-progress
done
