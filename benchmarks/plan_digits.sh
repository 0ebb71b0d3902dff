#!/usr/bin/env bash
# decoct plan on digits (issue 14): how close the byte estimate (real images encoded as the artifact stores
# them) comes to the artifacts the sweep builds, for real images (coreset family) and for DM-synthesised
# ones (matching family: dm, dm + median cut, AutoPalette-DM), with the accuracy of each (fast protocol).
# Usage: bash benchmarks/plan_digits.sh [OUT]   (default runs/plan-digits; CPU, ~10-20 minutes)
set -euo pipefail
B=${1:-runs/plan-digits}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
decoct plan --dataset digits --family coreset --budget 30KB --ipc 1 2 5 10 20 --colors 0 4 16 64 \
    --out "$B/coreset" --sweep --eval-runs 3 --device cpu --no-progress
decoct plan --dataset digits --family matching --budget 30KB --ipc 1 2 5 10 20 --colors 0 16 64 \
    --iterations 200 --out "$B/matching" --sweep --eval-runs 3 --device cpu --no-progress
