#!/usr/bin/env bash
# Issue 13 points 5 and 6 on CIFAR-10, IPC 10 (the issue-4 mini cell, benchmarks/mini_decoupled.sh):
# DWA's two ingredients separated, each set evaluated with stored labels AND with the live teacher
# (DWA's own protocol), random real images with the same labels beside; then one stronger teacher.
#   dwa           : DWA preset (real init + weight adjustment), 500 recover iterations per batch
#   dwa-realinit  : --dwa-steps 0  (real-image initialisation, no weight adjustment)
#   dwa-noise     : --init noise   (weight adjustment on the batch's real images, noise start)
#   rand          : random real IPC 10 (decoct select random, seed 0)
# Stored labels: decoct relabel RUN --teacher T --epochs 30 --batch-size 25 (120 stored batches, equal
# label bytes), then decoct evaluate RUN --protocol soft --model convnet_bn --runs 3 (30 epochs).
# Live teacher: decoct evaluate RUN --protocol soft --model convnet_bn --runs 3 --epochs 120 --teacher T
# (batch 100: 120 student steps, as the stored protocol's 30 x 4), --baseline random on the full-DWA cell
# (random real IPC 10, the same seeds and live labels; a label store the set carries is not counted).
# Stronger teacher: the same ConvNet-BN recipe trained STRONG_EPOCHS epochs; DWA vs random real with its
# labels, live and stored.
# Usage: OMP_NUM_THREADS=1 DECOCT_DATA=... bash benchmarks/mini_dwa_ablation.sh [stage ...]
#   stages (default, in this order): teacher random dwa dwa-realinit dwa-noise live strong-teacher
#   strong strong-live strong-stored summary; live = live-dwa live-realinit live-noise
#   B=outdir (default runs/bench), TEACHER (default $B/teacher-cbn64-c10, trained TEACHER_EPOCHS=4 if
#   missing), RECOVER_ITERATIONS=500, LABEL_EPOCHS=30, LIVE_EPOCHS=120, STRONG_EPOCHS=12; LIVE_BASELINE=0
#   leaves the random-real baseline out of live-dwa (it is the same students as RDED's live cell's baseline:
#   same teacher, seeds and selection).
# Every stage skips what its output already holds, so stages can run in separate shells.
set -euo pipefail
B=${B:-runs/bench}; TE=${TEACHER_EPOCHS:-4}; IT=${RECOVER_ITERATIONS:-500}
LE=${LABEL_EPOCHS:-30}; LIVE=${LIVE_EPOCHS:-120}; SE=${STRONG_EPOCHS:-12}
TT=${TEACHER:-$B/teacher-cbn64-c10}; ST=$B/teacher-cbn64-c10-e$SE
CFG=configs/decoupled/squeeze-convnet_bn-cifar10-mini.yaml
EV=(--protocol soft --model convnet_bn --runs 3 --no-progress)
T() { /usr/bin/time -f "  [%e s wall] $*" "$@"; }

squeeze_to() {  # squeeze_to DIR EPOCHS
  # an interrupted squeeze (checkpointed every epoch) continues with --resume
  [ -f $1/teacher.json ] || T decoct squeeze --dataset cifar10 --config $CFG --epochs $2 --out $1 --no-progress \
    $([ -d $1 ] && echo --resume)
}
stored() {  # stored RUN TEACHER [OUT]: relabel (into OUT when given), then the stored-label evaluation
  local run=$1 t=$2 out=${3:-$1}
  compgen -G "$out/eval-soft-convnet_bn-e*.json" >/dev/null && return 0
  if [ "$out" = "$run" ]; then
    T decoct relabel $run --teacher $t --epochs $LE --batch-size 25 --no-progress
  else
    [ -f $out/DONE ] || T decoct relabel $run --teacher $t --epochs $LE --batch-size 25 --out $out --no-progress
  fi
  T decoct evaluate $out "${EV[@]}"
}
recover() {  # recover NAME TEACHER [flags]
  local n=$1 t=$2; shift 2
  [ -f $B/$n/artifact/manifest.json ] || T decoct distill dwa --teacher $t --ipc 10 --iterations $IT "$@" \
    --out $B/$n --no-progress
}
live() {  # live RUN TEACHER [--baseline random]
  local run=$1 t=$2; shift 2
  compgen -G "$run/eval-soft-online-convnet_bn-e$LIVE*.json" >/dev/null || \
    T decoct evaluate $run "${EV[@]}" --epochs $LIVE --teacher $t "$@"
}
summary() {
  echo "| cell | protocol | accuracy (3 runs) | image bytes | label bytes |"
  echo "|---|---|---|---|---|"
  for f in $B/{rand,dwa,dwa-realinit,dwa-noise,dwa-e$SE,rand-e$SE}/eval-soft*.json; do
    [ -f "$f" ] || continue
    jq -r --arg n "$(basename "$(dirname "$f")")" '
      def pct: . * 10000 | round / 100;
      "| \($n) | \(.protocol) \(.epochs) ep | \(.mean | pct) ± \(.std | pct) % | \(.extra.image_bytes) | \(if .extra.unlimited_labels then "live teacher" else .extra.label_bytes end) |",
      (if .baseline then "| random real ipc \(.baseline.extra.ipc) (baseline of \($n)) | \(.protocol) \(.epochs) ep | \(.baseline.mean | pct) ± \(.baseline.std | pct) % | \(.baseline.bytes_on_disk) | live teacher |" else empty end)' "$f"
  done
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(teacher random dwa dwa-realinit dwa-noise live strong-teacher strong strong-live
                                   strong-stored summary)
for s in "${stages[@]}"; do
  case $s in
    teacher) squeeze_to $TT $TE ;;
    random) [ -f $B/rand/artifact/manifest.json ] || T decoct select random --dataset cifar10 --ipc 10 --out $B/rand \
              --no-progress
            stored $B/rand $TT ;;
    dwa) recover dwa $TT; stored $B/dwa $TT ;;
    dwa-realinit) recover dwa-realinit $TT --dwa-steps 0; stored $B/dwa-realinit $TT ;;
    dwa-noise) recover dwa-noise $TT --init noise; stored $B/dwa-noise $TT ;;
    live) live $B/dwa $TT --baseline random; live $B/dwa-realinit $TT; live $B/dwa-noise $TT ;;
    live-dwa) if [ "${LIVE_BASELINE:-1}" = 1 ]; then live $B/dwa $TT --baseline random; else live $B/dwa $TT; fi ;;
    live-realinit) live $B/dwa-realinit $TT ;;
    live-noise) live $B/dwa-noise $TT ;;
    strong-teacher) squeeze_to $ST $SE ;;
    strong) recover dwa-e$SE $ST ;;
    strong-live) live $B/dwa-e$SE $ST --baseline random ;;
    strong-stored) stored $B/dwa-e$SE $ST; stored $B/rand $ST $B/rand-e$SE ;;
    summary) summary ;;
    *) echo "unknown stage '$s' (teacher random dwa dwa-realinit dwa-noise live live-dwa live-realinit live-noise" \
            "strong-teacher strong strong-live strong-stored summary)" >&2; exit 2 ;;
  esac
done
