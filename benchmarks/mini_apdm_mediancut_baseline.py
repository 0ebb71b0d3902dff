"""Issue 13, point 4: the equal-bytes baseline of the AutoPalette-DM CIFAR-10 IPC 10 mini cell, on its own.

``decoct evaluate RUN --baseline mediancut`` trains, beside a K-colour set of N images per class, students on
random real images (``random_baseline_indices`` with the evaluation seed) quantised by median cut to K
colours, with the set's ZCA and the protocol's seeds. For the mini cell (K = 64, 40 images per class, ZCA
fitted on the training set as DM fits it, fast protocol, seeds 0..runs-1) that baseline does not depend on the
set's pixels, so it is the same for the paper-recipe and the authors-code runs of the cell. This script trains
exactly those students without a run directory, one at a time, writing the result after each student
(``--out`` JSON; rerun the same command to continue), so the number exists before (or without) the cells.

Usage: OMP_NUM_THREADS=1 python benchmarks/mini_apdm_mediancut_baseline.py --out runs/bench/mc64-x40-baseline.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from decoct.augment import ZCA
from decoct.coreset.select import random_baseline_indices
from decoct.data import load_dataset, normalize
from decoct.evaluation.protocols import mediancut_baseline, protocol_config, train_and_test
from decoct.formats.artifact import DistilledSet
from decoct.runtime.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="result JSON (partial after each student; rerun to continue)")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--colors", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=40, help="images per class (IPC 10 x4 at K = 64)")
    ap.add_argument("--protocol", default="fast")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zca", dest="zca", action="store_false")
    a = ap.parse_args()
    out = Path(a.out)
    done = json.loads(out.read_text())["accuracies"] if out.exists() else []
    data = load_dataset(a.dataset)
    info = data.info
    zca = None
    if a.zca:  # as DistributionMatching.init fits it (the set's attachment)
        zca = ZCA().fit(normalize(data.train.images, info, "cpu"), input_mean=info.mean, input_std=info.std)
    # a placeholder K-colour set of the cell's shape: mediancut_baseline reads only its K and class counts
    idx = random_baseline_indices(data, a.per_class, a.seed)
    shape = DistilledSet(info, data.train.images[idx], data.train.labels[idx], meta={"palette": {"colors": a.colors}})
    base = mediancut_baseline(shape, data, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base.save(Path(tmp) / "b")
        st = base.storage(Path(tmp) / "b")
    cfg = protocol_config(a.protocol)
    record = dict(what=f"random real x{a.per_class}/class median-cut to {a.colors} colours (evaluate --baseline "
                       "mediancut of the AutoPalette-DM mini cell)", dataset=a.dataset, protocol=a.protocol,
                  epochs=cfg["epochs"], seed=a.seed, requested_runs=a.runs, zca=a.zca, num_images=len(base),
                  bytes_on_disk=st["bytes_on_disk"]["total"], raw_bytes=st["raw_bytes"]["total"])
    t0 = time.perf_counter()

    def save(accs: list[float]) -> None:
        n = len(accs)
        mean = sum(accs) / n
        std = (sum((x - mean) ** 2 for x in accs) / (n - 1)) ** 0.5 if n > 1 else 0.0
        atomic_write_json(out, dict(record, accuracies=list(accs), mean=mean, std=std, partial=n < a.runs,
                                    seconds=round(time.perf_counter() - t0, 1)))
        print(f"{n}/{a.runs} students: {100 * mean:.2f} ± {100 * std:.2f} %", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    train_and_test(base.images, base.labels, data, zca, cfg, a.runs, a.seed, torch.device("cpu"), "auto", False,
                done, 1, save)


if __name__ == "__main__":
    main()
