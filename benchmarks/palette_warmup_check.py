"""How well does the palette network quantise real CIFAR-10 images, with and without warm-up?

Issue 3's AutoPalette-DM cell (100 DM iterations, ZCA) stored images with ~21 of 64 colours in use
and 16 dB PSNR to their initial real images, while median cut at 64 colours gives 35 dB. This
measures the quantisation of 400 real images (the AP-DM IPC 10 initial set) by a fresh palette
network and after ``--steps`` warm-up steps (``--palette-warmup``) on random real batches of 64.

``--zca`` whitens the training space as the AutoPalette CIFAR runs do; ``--input whitened`` then
feeds the network the whitened image (the authors' code, and decoct before c935a66) instead of
the pixel-space one decoct uses (see :mod:`decoct.matching.palette.palette_param`).

    python benchmarks/palette_warmup_check.py --steps 300 --report-every 100
    python benchmarks/palette_warmup_check.py --steps 300 --report-every 100 --zca --input whitened
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from decoct.augment import ZCA
from decoct.data import load_dataset, normalize
from decoct.matching.palette import make_param, warmup_palette
from decoct.matching.palette.network import gather_palette
from decoct.matching.palette.quantize import quantize


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-9)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def colours(t: torch.Tensor) -> float:
    return sum(len(torch.unique(im.reshape(im.shape[0], -1).T, dim=0)) for im in t) / len(t)


class WhitenedInput(nn.Module):
    """The palette network fed whitened images (the param hands it pixel-space ones)."""

    def __init__(self, net: nn.Module, zca: ZCA) -> None:
        super().__init__()
        self.inner, self.zca = net, zca

    def probs(self, x: Tensor) -> Tensor:
        return self.inner.probs(self.zca.transform(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--colors", type=int, default=64)
    ap.add_argument("--zca", action="store_true", help="whiten the training space (fit on the training set)")
    ap.add_argument("--input", choices=("pixel", "whitened"), default="pixel",
                    help="what the network sees under --zca: pixel space (decoct) or whitened (the code)")
    ap.add_argument("--report-every", type=int, default=0, help="also report every N steps (0 = at the end)")
    args = ap.parse_args()
    if args.input == "whitened" and not args.zca:
        ap.error("--input whitened needs --zca")
    torch.manual_seed(0)
    ds = load_dataset("cifar10")
    info = ds.info
    zca = ZCA().fit(normalize(ds.train.images, info)) if args.zca else None

    def space(u8: Tensor) -> Tensor:
        x = normalize(u8, info)
        return zca.transform(x) if zca is not None else x

    idx = torch.randperm(len(ds.train))[: args.images]
    real = ds.train.images[idx]
    param = make_param(space(real), ds.train.labels[idx], zca, args.colors, info=info)
    if args.input == "whitened":
        param.net = WhitenedInput(param.net, zca)

    def report(tag: str) -> None:
        ind, pal = param.stored()
        img = gather_palette(ind, pal)
        print(f"{tag:<28} PSNR {psnr(img, real):5.2f} dB, colours/image {colours(img):5.1f}", flush=True)

    ind, pal = quantize(real, args.colors, "mediancut")
    print(f"{'median cut (Pillow)':<28} PSNR {psnr(gather_palette(ind, pal), real):5.2f} dB, "
          f"colours/image {colours(gather_palette(ind, pal)):5.1f}")
    report("palette net, fresh")
    t0 = time.perf_counter()
    every = args.report_every or args.steps
    done = 0
    while done < args.steps:
        n = min(every, args.steps - done)
        warmup_palette(param, {"palette_warmup": n}, len(ds.train), lambda i: space(ds.train.images[i]), seed=done)
        done += n
        report(f"after {done} warm-up steps")
    print(f"warm-up: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
