#!/usr/bin/env bash
# Issue 14, point 4: the CIFAR-10 accuracy-vs-bytes frontier at three budgets (50 KB, 150 KB, 400 KB on disk),
# built by decoct plan --sweep: random real (full colour and median cut to 64/16 colours), DM, DM + median cut,
# AutoPalette-DM (the matching family, 100 DM iterations, as the mini cells), and LPLD with pruned and quantised
# soft labels (the decoupled family: the issue-4 teacher, 500 recover iterations, 30 stored epochs of batch 25).
# Hard-label runs are measured with the fast protocol (300 epochs), soft-label runs with the stored-label soft
# protocol; 3 students each. Every budget's plan searches the earlier budgets' runs (--runs), so a configuration is
# built once; a rerun skips finished runs. Then decoct report draws every run and the frontier per protocol and
# student; the coreset family's random-real runs are the simple baseline at each budget.
# Usage: OMP_NUM_THREADS=1 DECOCT_DATA=... TEACHER=DIR [OUT=DIR] [BUDGETS="50KB 150KB 400KB"] [PRUNE="1 10"]
#        [LABEL_FORMATS="fp16 q4 top2-zero-fp16"]
#        bash benchmarks/mini_frontier_c10.sh [coreset] [coreset-soft] [matching] [decoupled] [report]
#   coreset-soft: random real with the decoupled family's soft labels (same teacher, epochs, batch, pruning, format),
#   LPLD's simple baseline at equal bytes; not in the default families.
#   TEACHER: decoct squeeze --dataset cifar10 --config configs/decoupled/squeeze-convnet_bn-cifar10-mini.yaml
#   --epochs 4 (benchmarks/mini_dwa_ablation.sh teacher). CPU time: hours (each AutoPalette-DM run ~30 min).
set -euo pipefail
B=${OUT:-runs/bench-frontier}; BUDGETS=${BUDGETS:-50KB 150KB 400KB}
PRUNE=${PRUNE:-1 10}; LABEL_FORMATS=${LABEL_FORMATS:-fp16 q4 top2-zero-fp16}  # the decoupled family's label grid
mkdir -p "$B"  # plan --runs reads it before the first sweep writes there
COMMON=(--dataset cifar10 --runs "$B" --sweep --eval-runs 3 --device cpu --no-progress)
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
families=("$@"); [ ${#families[@]} -gt 0 ] || families=(coreset matching decoupled report)
for f in "${families[@]}"; do
  for budget in $BUDGETS; do
    case $f in
      coreset) T decoct plan "${COMMON[@]}" --family coreset --budget "$budget" --methods random --colors 0 64 16 \
                 --out "$B/coreset-$budget" ;;
      coreset-soft) T decoct plan "${COMMON[@]}" --family coreset --labels soft --budget "$budget" --methods random \
                      --colors 0 --prune $PRUNE --label-formats $LABEL_FORMATS --teacher "${TEACHER:?set TEACHER}" \
                      --label-epochs 30 --label-batch 25 --out "$B/coreset-soft-$budget" ;;
      matching) T decoct plan "${COMMON[@]}" --family matching --budget "$budget" \
                  --methods dm dm+mediancut autopalette-dm --colors 0 64 --iterations 100 --out "$B/matching-$budget" ;;
      decoupled) T decoct plan "${COMMON[@]}" --family decoupled --budget "$budget" --methods lpld --prune $PRUNE \
                   --label-formats $LABEL_FORMATS --teacher "${TEACHER:?set TEACHER}" --label-epochs 30 \
                   --label-batch 25 --iterations 500 --out "$B/decoupled-$budget" ;;
      report) ;;
      *) echo "unknown family '$f' (coreset coreset-soft matching decoupled report)" >&2; exit 2 ;;
    esac
  done
done
runs=$(find "$B" -mindepth 3 -maxdepth 3 -name DONE -printf '%h\n' | grep -v /_sources/ | sort)
# shellcheck disable=SC2086
T decoct report $runs --out "$B/report"
