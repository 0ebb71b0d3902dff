"""AutoPalette-DM at zero DM iterations: the palette network quantising the initial real images.

The control for the AP-DM IPC 10 cell (benchmarks/mini_apdm_pixel.sh): the same configuration and
seed, so the same 400 initial real images (``meta.init_indices``, identical to ``decoct quantize
--dataset cifar10 --ipc 40``'s ``source_indices``), the same palette warm-up, and then straight to
storage without any DM iteration. Comparing its accuracy with median cut of the same images
(``runs/bench/rand40-mc64-c10``) isolates the quantiser; comparing it with AP-DM after 100
iterations isolates what DM adds on top of the palette.

    python benchmarks/palette_quantize_init.py --warmup 1500 --out runs/bench/apq-px-w1500-c10-ipc10
    decoct evaluate runs/bench/apq-px-w1500-c10-ipc10 --protocol fast --runs 3
"""

from __future__ import annotations

import argparse
import time

import torch

from decoct.data import load_dataset
from decoct.matching.dm import DistributionMatching, DMConfig
from decoct.runtime.runs import Run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=1500)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = DMConfig(ipc=10, iterations=1, palette=64, zca=True, seed=0,
                   palette_flags={"palette_init": "real", "palette_warmup": args.warmup})
    run = Run.open(args.out, {"dataset": "cifar10", "benchmark": "palette_quantize_init", "warmup": args.warmup})
    torch.manual_seed(cfg.seed)
    dm = DistributionMatching(cfg)
    dm.init(load_dataset("cifar10"), torch.device("cpu"))
    print("warm-up end:", {k: round(v, 3) for k, v in dm.warm_start().items()})
    dset = dm.result()
    dset.meta.update(dm_iterations=0, seconds=round(time.perf_counter() - t0, 3))
    dset.save(run.artifact_dir, overwrite=True)
    run.log(event="finished", iterations=0, seconds=dset.meta["seconds"], num_images=len(dset))
    run.finish()
    print(f"{len(dset)} images -> {args.out} in {dset.meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
