#!/usr/bin/env bash
# Issue 13, points 2 and 4: the AutoPalette-DM CIFAR-10 IPC 10 mini cell (K = 64, x4 images, ZCA, real init,
# 100 iterations, --palette-warmup 1563: the settings of mini_apdm_pixel.sh) in the authors' recipe
# (--palette-recipe authors-code: expert 0's logits as fixed soft labels, DSA drawn independently for real
# and synthetic, the un-quantised images stored and evaluated), evaluated with the fast protocol (3 runs)
# beside the equal-bytes baseline (--baseline mediancut: random real x4 per class median-cut to 64 colours,
# hard labels, same seeds); then the same baseline beside the paper-recipe run of the cell (PAPER_RUN, made by
# mini_apdm_pixel.sh with WARMUP=1563). With a finished eval-fast-convnet-e300.json in a run, only the
# baseline's students are trained (the set's are read back: same seeds, same numbers).
# Checkpointed every 10 iterations: an interrupted distillation continues with the same command plus --resume.
# The baseline alone (same numbers, no run needed): benchmarks/mini_apdm_mediancut_baseline.py.
# Usage: OMP_NUM_THREADS=1 EXPERTS=DIR [OUT=DIR] [PAPER_RUN=RUN] bash benchmarks/mini_apdm_recipes.sh
#   EXPERTS: CIFAR-10 experts with ZCA, e.g. decoct experts --dataset cifar10 --num-experts 2 --epochs 3 --width 32
set -euo pipefail
O=${OUT:-runs/bench}
E=${EXPERTS:?set EXPERTS to a CIFAR-10 expert directory made by decoct experts}
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
T decoct distill dm --dataset cifar10 --ipc 10 --iterations 100 --palette 64 --zca --palette-init real \
  --palette-warmup 1563 --palette-recipe authors-code --experts "$E" --out "$O/apdm-code-c10-ipc10" --no-progress \
  --checkpoint-every 10
T decoct evaluate "$O/apdm-code-c10-ipc10" --protocol fast --runs 3 --baseline mediancut --no-progress
if [ -n "${PAPER_RUN:-}" ]; then
  T decoct evaluate "$PAPER_RUN" --protocol fast --runs 3 --baseline mediancut --no-progress
fi
decoct report "$O/apdm-code-c10-ipc10" ${PAPER_RUN:+"$PAPER_RUN"} --out "$O/report-apdm-recipes"
