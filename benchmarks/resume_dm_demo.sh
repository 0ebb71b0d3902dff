#!/usr/bin/env bash
# Issue 3 resume check on real data: a DM run on CIFAR-10 is killed (SIGKILL) midway, continued
# with --resume, and compared pixel for pixel with an uninterrupted run of the same seed.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/resume_dm_demo.sh   (outputs in runs/bench/resume-*)
set -euo pipefail
B=runs/bench; IT=${ITERATIONS:-12}
ARGS=(distill dm --dataset cifar10 --ipc 1 --iterations "$IT" --batch-real 64 --checkpoint-every 4 --seed 3 --no-progress)
rm -rf $B/resume-full $B/resume-killed
/usr/bin/time -f "  [%e s wall] uninterrupted" decoct "${ARGS[@]}" --out $B/resume-full
decoct "${ARGS[@]}" --out $B/resume-killed & pid=$!
while [ ! -f $B/resume-killed/checkpoint.pt ]; do sleep 0.5; done
sleep 3; kill -9 $pid; wait $pid || true
python - <<'PY'
import torch
c = torch.load("runs/bench/resume-killed/checkpoint.pt", weights_only=True, map_location="cpu")
print(f"killed with SIGKILL; last checkpoint at iteration {c['iteration']}")
PY
/usr/bin/time -f "  [%e s wall] resumed" decoct "${ARGS[@]}" --out $B/resume-killed --resume
python - <<'PY'
import torch
from decoct.formats.artifact import DistilledSet
a = DistilledSet.load("runs/bench/resume-full/artifact")
b = DistilledSet.load("runs/bench/resume-killed/artifact")
same = torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
print(f"resumed == uninterrupted (images, labels): {same}")
raise SystemExit(0 if same else 1)
PY
