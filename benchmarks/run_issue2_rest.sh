#!/usr/bin/env bash
# Continues benchmarks/run_issue2_classic.sh: herding and k-center under the classic protocol.
set -euo pipefail
while kill -0 11018 2>/dev/null; do sleep 20; done
for m in herding kcenter; do
  /usr/bin/time -f "%e s wall" decoct evaluate runs/c10-$m-ipc10 --protocol classic --runs 5 --no-progress
done
