#!/usr/bin/env bash
# Issue 14, point 3: accuracy against label bytes on the CIFAR-10 IPC 10 mini cell. One set (random real
# IPC 10, seed 0) with one full fp16 label store (the issue-4 teacher, 30 stored epochs of batch 25), re-encoded
# without the teacher into every label format: fp16, q8, q4 (--label-bits), top-5 / top-2 with each fill rule
# (--label-topk K --label-fill zero|spread), each with LPLD pruning 1x and 10x, and top-2 zero q4 at 10x.
# Each is evaluated with the stored-label soft protocol (ConvNet-BN, 30 epochs, 3 runs, the same seeds).
# Usage: OMP_NUM_THREADS=1 DECOCT_DATA=... RUN=DIR [OUT=DIR] bash benchmarks/mini_label_bytes.sh [cell ...]
#   RUN: a relabelled random IPC 10 run (benchmarks/mini_dwa_ablation.sh random: decoct select random
#   --dataset cifar10 --ipc 10, then decoct relabel RUN --teacher T --epochs 30 --batch-size 25);
#   cells (default all, in this order): q8-p1 q4-p1 top2z-p1 top2s-p1 fp16-p10 q4-p10 top2z-p10 top2s-p10
#   top5z-p1 top5s-p1 q8-p10 top5z-p10 top5s-p10 top2z-q4-p10; summary prints the table.
set -euo pipefail
R=${RUN:?set RUN to a relabelled random IPC 10 run}; O=${OUT:-runs/bench-labels}
mkdir -p "$O"
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }
flags() {  # the relabel flags of a cell name: <format>-p<prune>
  local f=${1%-p*} p=${1##*-p} out=()
  [ "$p" = 1 ] || out+=(--prune "$p")
  case $f in
    fp16) ;;
    q8) out+=(--label-bits 8) ;;
    q4) out+=(--label-bits 4) ;;
    top5z|top2z) out+=(--label-topk "${f:3:1}" --label-fill zero) ;;
    top5s|top2s) out+=(--label-topk "${f:3:1}" --label-fill spread) ;;
    top2z-q4) out+=(--label-topk 2 --label-fill zero --label-bits 4) ;;
    *) echo "unknown cell '$1'" >&2; exit 2 ;;
  esac
  echo "${out[@]}"
}
cell() {
  local n=$1
  [ -f "$O/$n/DONE" ] || decoct relabel "$R" $(flags "$n") --out "$O/$n" --no-progress
  compgen -G "$O/$n/eval-soft-convnet_bn-e*.json" >/dev/null || \
    T decoct evaluate "$O/$n" --protocol soft --model convnet_bn --runs 3 --no-progress
}
summary() {
  echo "| labels | accuracy (3 runs) | label bytes on disk | label payload | images |"
  echo "|---|---|---|---|---|"
  for f in "$R"/eval-soft-convnet_bn-e*.json "$O"/*/eval-soft-convnet_bn-e*.json; do
    [ -f "$f" ] || continue
    jq -r --arg n "$(basename "$(dirname "$f")")" 'def pct: . * 10000 | round / 100;
      "| \($n) (\(.extra.label_format // "fp16"), prune \(.extra.prune_factor)x) | \(.mean | pct) ± \(.std | pct) % | \(.extra.label_bytes) | \(.extra.label_payload_bytes) | \(.extra.image_bytes) |"' "$f"
  done
}
cells=("$@"); [ ${#cells[@]} -gt 0 ] || cells=(q8-p1 q4-p1 top2z-p1 top2s-p1 fp16-p10 q4-p10 top2z-p10 top2s-p10
                                              top5z-p1 top5s-p1 q8-p10 top5z-p10 top5s-p10 top2z-q4-p10 summary)
for c in "${cells[@]}"; do
  if [ "$c" = summary ]; then summary; else cell "$c"; fi
done
