#!/usr/bin/env bash
# Issue 13 points 6 and 9 on tinyimagenet10 (64x64, 10 classes, 500 train / 50 test per class), IPC 10:
# SRe2L, DWA and its two ablations, LPLD, RDED and random real images side by side with ONE label
# store recipe (FKD relabel, 30 stored epochs x batch 25 = 120 stored batches, so every set's label
# bytes are equal), soft evaluation with ConvNet-BN students, 3 runs. Same teacher and recover recipe
# as benchmarks/mini_decoupled_tiny.sh (ConvNet-D4-BN width 64, 20 epochs; recover 300 iterations per
# batch with the tiny presets).
#   dwa-realinit : DWA preset, --dwa-steps 0  (real-image initialisation, no weight adjustment)
#   dwa-noise    : DWA preset, --init noise   (weight adjustment on the batch's real images, noise start)
#   rded         : decoct distill rded (tiny preset: 300 candidates, 5 crops, factor 1); also with a live
#                  teacher (RDED's own protocol) against random real images with the same online labels.
# Usage: OMP_NUM_THREADS=1 DECOCT_DATA=... bash benchmarks/mini_tiny_side_by_side.sh [stage ...]
#   stages (default, in this order): teacher random rded dwa dwa-realinit dwa-noise rded-live lpld sre2l summary
#   B=outdir (default runs/bench-tiny), RECOVER_ITERATIONS=300, LABEL_EPOCHS=30, LIVE_EPOCHS=60.
# Every stage skips what its output directory already holds, so stages can run in separate shells once
# the teacher exists.
set -euo pipefail
B=${B:-runs/bench-tiny}; TE=${TEACHER_EPOCHS:-20}; IT=${RECOVER_ITERATIONS:-300}
LE=${LABEL_EPOCHS:-30}; LIVE=${LIVE_EPOCHS:-60}
D=tinyimagenet10; TT=$B/teacher
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }

teacher() {
  [ -f $TT/teacher.json ] || T decoct squeeze --dataset $D --config configs/decoupled/squeeze-convnet_bn-tiny10-mini.yaml \
    --epochs $TE --out $TT --no-progress
}
# stored labels (relabel, then soft evaluation) for run $1
stored() {
  compgen -G "$B/$1/eval-soft-convnet_bn-e*.json" >/dev/null && return 0
  T decoct relabel $B/$1 --teacher $TT --epochs $LE --batch-size 25 --force --no-progress
  T decoct evaluate $B/$1 --protocol soft --model convnet_bn --runs 3 --no-progress
}
recover() {  # recover NAME METHOD [extra flags]
  local n=$1 m=$2; shift 2
  [ -f $B/$n/artifact/manifest.json ] || T decoct distill $m --teacher $TT --ipc 10 --iterations $IT "$@" \
    --out $B/$n --no-progress
  stored $n
}
random() {
  [ -f $B/rand/artifact/manifest.json ] || T decoct select random --dataset $D --ipc 10 --out $B/rand --no-progress
  stored rand
}
rded() {
  [ -f $B/rded/artifact/manifest.json ] || T decoct distill rded --teacher $TT --ipc 10 --out $B/rded --no-progress
  stored rded
}
rded_live() {
  compgen -G "$B/rded/eval-soft-online-*-random.json" >/dev/null || T decoct evaluate $B/rded --protocol soft \
    --model convnet_bn --runs 3 --epochs $LIVE --teacher $TT --baseline random --no-progress
}
summary() {
  echo "| cell | accuracy (3 runs) | image bytes | label bytes | protocol |"
  echo "|---|---|---|---|---|"
  for f in $B/*/eval-soft*.json; do
    jq -r --arg n "$(basename "$(dirname "$f")")" '
      def pct: . * 10000 | round / 100;
      "| \($n) | \(.mean | pct) ± \(.std | pct) % | \(.extra.image_bytes) | \(if .extra.unlimited_labels then "unlimited (live teacher)" else .extra.label_bytes end) | \(.protocol) \(.epochs) ep, \(.extra.label_source) |",
      (if .baseline then "| random real (baseline of \($n)) | \(.baseline.mean | pct) ± \(.baseline.std | pct) % | \(.baseline.bytes_on_disk // "?") | unlimited | \(.protocol) \(.epochs) ep |" else empty end)' "$f"
  done
}

stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(teacher random rded dwa dwa-realinit dwa-noise rded-live lpld sre2l summary)
for s in "${stages[@]}"; do
  case $s in
    teacher) teacher ;;
    random) random ;;
    rded) rded ;;
    rded-live) rded_live ;;
    dwa) recover dwa dwa ;;
    dwa-realinit) recover dwa-realinit dwa --dwa-steps 0 ;;
    dwa-noise) recover dwa-noise dwa --init noise ;;
    lpld) recover lpld lpld ;;
    sre2l) recover sre2l sre2l ;;
    summary) summary ;;
    *) echo "unknown stage '$s' (teacher random rded dwa dwa-realinit dwa-noise rded-live lpld sre2l summary)" >&2; exit 2 ;;
  esac
done
