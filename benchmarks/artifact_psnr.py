"""PSNR of distilled images to the real images they started from, and colours per image.

For runs initialised from real training images (``meta.init_indices`` or ``meta.source_indices``):
how far distillation and quantisation moved each stored uint8 image from its starting image
(mean over images of 10 log10(255^2 / MSE)), and how many distinct RGB colours it holds.

    python benchmarks/artifact_psnr.py runs/bench/apdm-px-w1500-c10-ipc10 runs/bench/rand40-mc64-c10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from palette_warmup_check import colours, psnr

from decoct.data import load_dataset
from decoct.formats.artifact import DistilledSet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories (or their artifact/ folders)")
    args = ap.parse_args()
    cache: dict[str, torch.Tensor] = {}
    for r in args.runs:
        p = Path(r)
        dset = DistilledSet.load(p / "artifact" if (p / "artifact").is_dir() else p)
        idx = dset.meta.get("init_indices") or dset.meta.get("source_indices")
        if not isinstance(idx, list) or len(idx) != len(dset):
            print(f"{r}: no per-image initial indices in meta; skipped")
            continue
        if dset.info.name not in cache:
            cache[dset.info.name] = load_dataset(dset.info.name).train.images
        real = cache[dset.info.name][torch.tensor(idx)]
        print(f"{r}: {len(dset)} images, PSNR to initial real {psnr(dset.images, real):5.2f} dB, "
              f"colours/image {colours(dset.images):5.1f}")


if __name__ == "__main__":
    main()
