#!/usr/bin/env bash
# AutoPalette's Table 8 in one command: quantise a distilled set (or random real images) with
# median cut, octree and k-means at 2..256 colours, evaluate every cell with the same protocol,
# and write the accuracy / bytes table and plot with `decoct report`.
# Usage: bash benchmarks/quantize_table.sh SRC OUT [PROTOCOL] [RUNS]
#   SRC: a run directory (e.g. runs/dm-c10-ipc10), or "DATASET:IPC" for random real images
#        (e.g. cifar10:10); OUT: directory for the cells, OUT/report.md and OUT/report.png.
# Environment: COLORS (default "2 4 8 16 32 64 128 256"), METHODS (default "mediancut octree kmeans"),
#   EPOCHS (protocol default when unset), EXTRA (more `decoct evaluate` flags, e.g. "--device cuda").
set -euo pipefail
SRC=${1:?SRC (run dir or DATASET:IPC)}; OUT=${2:?OUT}; PROTOCOL=${3:-fast}; RUNS=${4:-3}
COLORS=${COLORS:-"2 4 8 16 32 64 128 256"}; METHODS=${METHODS:-"mediancut octree kmeans"}
if [[ "$SRC" == *:* && ! -e "$SRC" ]]; then
  SRC_ARGS=(--dataset "${SRC%%:*}" --ipc "${SRC##*:}")
else
  SRC_ARGS=("$SRC")
fi
# shellcheck disable=SC2086
decoct quantize "${SRC_ARGS[@]}" --colors $COLORS --method $METHODS --out "$OUT" --no-progress
EP=(); [ -n "${EPOCHS:-}" ] && EP=(--epochs "$EPOCHS")
for cell in "$OUT"/*-k*/; do
  # shellcheck disable=SC2086
  decoct evaluate "$cell" --protocol "$PROTOCOL" --runs "$RUNS" "${EP[@]}" --no-progress ${EXTRA:-}
done
decoct report "$OUT"/*-k*/ --out "$OUT/report"
