"""``PaletteParam``: AutoPalette as a parameterisation of synthetic images (DM and TM use it).

What is optimised (docs/methods/autopalette.md, What it does): full-resolution float images in the
training space (ZCA-whitened when ZCA is on), initialised from real images, plus one palette network
(:class:`~decoct.matching.palette.network.PaletteNet`) shared by all images. What the task loss
sees, ``param(idx)``, is the *soft* palette image; what is stored, ``param.to_set(info)``, is the
*hard* one as palette-indexed PNGs (at most K colours each).

Gradient routing (docs/methods/autopalette.md, What it does): the task loss reaches the pixels and
the network; :meth:`PaletteParam.aux_loss` (``alpha L_m + beta L_b + gamma L_a (+ conf)``) runs on a
random subset of the **detached** images, so it reaches the network only. The caller does
``task.backward(); aux.backward(); step every optimiser``.

Storage rule (a deliberate deviation from the code, recorded here): the stored artifact is
palette PNGs with at most K colours, and **loading it reproduces the training-time hard
quantised image** (rounded to uint8). Without ZCA that is the code's behaviour. With ZCA the
code keeps the palette in whitened space, so its images are K-colour only there and lose that
property after inverse ZCA. Here the bucket assignment ``m`` is still computed from the whitened
image (what the network sees, as in the code), but each palette colour is the mean of the
*de-whitened* (normalised pixel-space) pixels of its bucket; the quantised image is built in pixel
space and whitened (a linear map) before the task network sees it. The stored PNG is that hard
pixel-space image rounded to uint8; evaluation re-applies the ZCA attachment, exactly as during
training. :meth:`PaletteParam.quantized` gives that training-space image from the uint8 palettes.

For the same reason the palette **network sees the pixel-space image** (ZCA undone), not the
whitened one the code feeds it: a 1x1 network assigns buckets from one pixel's three values, and
whitened values describe local contrast, not colour, so with pixel-space palettes the buckets
mixed unrelated colours. Measured on 400 real CIFAR-10 images at K = 64
(benchmarks/palette_warmup_check.py): whitened input stored images at 15.6 dB PSNR fresh and
16.7 dB after 300 warm-up steps (20 colours in use); pixel-space input 22.1 -> 25.6 dB, exactly
as without ZCA. Without ZCA the two are the same thing.

L_a's median-cut target is computed on the real RGB rendering of the current images (ZCA undone, the
dataset's own mean/std undone), not on the code's fixed CIFAR-statistics rendering
(docs/methods/autopalette.md, Where decoct departs from the paper or the released code).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.augment import ZCA
from decoct.data import DatasetInfo, normalize, to_uint8
from decoct.formats.artifact import DistilledSet
from decoct.matching.image_param import ImageParam
from decoct.matching.palette.losses import (
    alignment_loss,
    balance_loss,
    confidence_loss,
    max_color_loss,
    sample_pixels,
)
from decoct.matching.palette.network import PaletteNet, gather_palette, hard_quantize, soft_quantize


def index_bits(colors: int) -> int:
    """Bits of one palette index, ``ceil(log2 K)`` (K = 64 -> 6)."""
    if isinstance(colors, bool) or not isinstance(colors, int) or not 2 <= colors <= 256:
        raise ValueError(f"--palette (K colours) must be an integer in 2..256, got {colors!r}")
    return math.ceil(math.log2(colors))


def effective_ipc(ipc: int, palette: int) -> int:
    """Images per class actually distilled: ``ipc x 2^(8 - ceil(log2 K))`` (the code's rule).

    K = 64 -> x4, 32 -> x8, 16 -> x16, 8 -> x32, 4 -> x64, 2 -> x128, 256 -> x1. The paper
    counts only index bits (palettes, which it treats as free, are charged nowhere); see
    :func:`palette_budget` for the true bits.
    """
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if palette == 0:
        return ipc
    return ipc * 2 ** (8 - index_bits(palette))


def palette_budget(ipc: int, palette: int, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The paper's budget rule next to the true information size, per class.

    Budget = ``ipc`` full-colour images (8 bits per channel). A K-colour image costs
    ``H W ceil(log2 K)`` index bits plus ``K C 8`` palette bits. Returns the paper's image count
    (``paper_ipc``), the bits it really takes (``paper_bits``, and ``paper_over_budget`` = their ratio
    to the budget), and how many K-colour images truly fit (``true_ipc``; ``true_ipc_index_only``
    charges the indices alone, the paper's accounting).
    """
    c, h, w = image_shape
    full = c * h * w * 8
    budget = ipc * full
    if palette == 0:
        return {"colors": 0, "ipc": ipc, "paper_ipc": ipc, "paper_factor": 1, "budget_bits": budget,
                "bits_per_image": full, "index_bits_per_image": 0, "palette_bits_per_image": 0,
                "paper_bits": budget, "paper_over_budget": 1.0, "true_ipc": ipc, "true_ipc_index_only": ipc}
    bits = index_bits(palette)
    idx_bits, pal_bits = h * w * bits, palette * c * 8
    per_image = idx_bits + pal_bits
    paper_ipc = effective_ipc(ipc, palette)
    return {
        "colors": palette, "ipc": ipc, "paper_ipc": paper_ipc, "paper_factor": paper_ipc // ipc,
        "budget_bits": budget, "bits_per_image": per_image, "index_bits_per_image": idx_bits,
        "palette_bits_per_image": pal_bits, "paper_bits": paper_ipc * per_image,
        "paper_over_budget": paper_ipc * per_image / budget,
        "true_ipc": budget // per_image, "true_ipc_index_only": budget // idx_bits,
    }


class PaletteParam(ImageParam):
    """Float images + a palette network; soft palette images in training, hard ones stored.

    Options (all keyword; the ``make_param`` keys):

    * ``info`` (required): the dataset's :class:`DatasetInfo` (mean/std turn normalised pixels
      into the uint8 RGB that median cut and the PNGs use).
    * ``lr_palette`` 0.05, ``palette_momentum`` 0.5, ``palette_weight_decay`` 5e-4: the palette
      network's SGD (paper/code values for CIFAR; ImageNette 0.01).
    * ``alpha`` 1, ``beta`` 1, ``gamma`` 3, ``conf`` 0: weights of L_m, L_b, L_a and the code-only
      per-pixel confidence loss.
    * ``sample_ratio`` 0.3: fraction of pixels L_a samples per image.
    * ``aux_images`` 64: size of the random detached subset of the auxiliary losses (DM 64, TM 50).
    * ``quantizer`` ``"mediancut"``: L_a's reference quantiser (see :mod:`decoct.matching.palette.quantize`).
    * ``hidden`` 256, ``soften`` 1.0: the network's width and softmax temperature factor.
    """

    def __init__(self, init: Tensor, labels: Tensor, zca: ZCA | None = None, colors: int = 64, *,
                 info: DatasetInfo | None = None, lr_palette: float = 0.05, palette_momentum: float = 0.5,
                 palette_weight_decay: float = 5e-4, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 3.0, conf: float = 0.0, sample_ratio: float = 0.3, aux_images: int = 64,
                 quantizer: str = "mediancut", hidden: int = 256, soften: float = 1.0) -> None:
        super().__init__(labels, zca)
        from decoct.matching.palette.quantize import QUANTIZERS

        index_bits(colors)
        if not isinstance(info, DatasetInfo):
            raise ValueError("the palette parameterisation needs info=DatasetInfo (mean/std for the uint8 "
                             "rendering of median cut and of the stored PNGs)")
        if init.dim() != 4 or init.shape[0] != labels.shape[0] or tuple(init.shape[1:]) != info.image_shape:
            raise ValueError(f"init must be (N, C, H, W) = ({labels.shape[0]}, *{info.image_shape}), "
                             f"got {tuple(init.shape)}")
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("conf", conf),
                        ("palette_weight_decay", palette_weight_decay), ("palette_momentum", palette_momentum)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if lr_palette <= 0:
            raise ValueError(f"lr_palette must be > 0, got {lr_palette}")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        if aux_images < 1:
            raise ValueError(f"aux_images must be >= 1, got {aux_images}")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {quantizer!r} for L_a; known: {', '.join(QUANTIZERS)}")
        self.info, self.colors = info, colors
        self.images = nn.Parameter(init.detach().float().clone())
        self.net = PaletteNet(info.channels, colors, hidden, soften).to(init.device)
        self.lr_palette, self.palette_momentum = float(lr_palette), float(palette_momentum)
        self.palette_weight_decay = float(palette_weight_decay)
        self.alpha, self.beta, self.gamma, self.conf = float(alpha), float(beta), float(gamma), float(conf)
        self.sample_ratio, self.aux_images, self.quantizer = float(sample_ratio), int(aux_images), quantizer

    # ------------------------------------------------------------------ images
    def _pixels(self, x: Tensor) -> Tensor:
        """Training space -> normalised pixel space (ZCA undone)."""
        return self.zca.inverse(x) if self.zca is not None else x

    def _whiten(self, x: Tensor) -> Tensor:
        return self.zca.transform(x) if self.zca is not None else x

    def forward(self, idx: Tensor | None = None) -> Tensor:
        """Soft palette images in the training space (differentiable w.r.t. pixels and network)."""
        x = self._pixels(self.images if idx is None else self.images[idx])
        img, _ = soft_quantize(x, self.net.probs(x))
        return self._whiten(img)

    @torch.no_grad()
    def hard(self, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hard assignment in normalised pixel space: ``(indices (N, H, W) long, palette (N, K, C))``."""
        x = self._pixels(self.images if idx is None else self.images[idx])
        _, ind, pal = hard_quantize(x, self.net.probs(x))
        return ind, pal

    @torch.no_grad()
    def stored(self, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What the PNGs hold: ``(indices (N, H, W) uint8, palettes (N, K, C) uint8)`` on the CPU."""
        ind, pal = self.hard(idx)
        pal8 = to_uint8(pal.permute(0, 2, 1).unsqueeze(-1).float(), self.info).squeeze(-1).permute(0, 2, 1)
        return ind.to(torch.uint8).cpu(), pal8.contiguous().cpu()

    @torch.no_grad()
    def quantized(self, idx: Tensor | None = None) -> Tensor:
        """The stored (uint8) images as the training pipeline sees them: normalised, whitened.

        What an evaluation network trained on the saved artifact gets (use it for in-loop
        evaluation, TM's hard-quantised path).
        """
        ind, pal = self.stored(idx)
        img = gather_palette(ind, pal).contiguous()
        return self._whiten(normalize(img, self.info, self.images.device))

    # ------------------------------------------------------------------ optimisation
    def optimizers(self, lr_img: float, momentum: float = 0.5, lr_palette: float | None = None,
                   **_: Any) -> dict[str, torch.optim.Optimizer]:
        """Images: SGD(lr_img, momentum); palette net: SGD(lr_palette, momentum 0.5, wd 5e-4)."""
        lr_p = self.lr_palette if lr_palette is None else float(lr_palette)
        return {
            "images": torch.optim.SGD([self.images], lr=lr_img, momentum=momentum),
            "palette": torch.optim.SGD(self.net.parameters(), lr=lr_p, momentum=self.palette_momentum,
                                       weight_decay=self.palette_weight_decay),
        }

    def reference_indices(self, x: Tensor) -> Tensor:
        """L_a's target: the reference quantiser's buckets of training-space images ``x``, (B, H, W)."""
        return self._reference_of_pixels(self._pixels(x.detach()))

    def _reference_of_pixels(self, px: Tensor) -> Tensor:
        """:meth:`reference_indices` of images already in normalised pixel space."""
        from decoct.matching.palette.quantize import quantize

        img8 = to_uint8(px.detach().float(), self.info).cpu()
        return quantize(img8, self.colors, self.quantizer)[0].to(px.device)

    def aux_loss(self, generator: torch.Generator | None = None) -> tuple[Tensor | None, dict[str, float]]:
        """``alpha L_m + beta L_b + gamma L_a + conf L_conf`` on ``aux_images`` random detached images.

        ``generator`` (CPU or on the images' device) drives the subset and L_a's pixel sample, so
        a seeded run repeats exactly. Metrics: each term and ``colors_used`` (mean number of buckets
        that win at least one pixel, out of K: the collapse Fig. 2 of the paper shows).
        """
        dev = self.images.device
        gdev = generator.device if generator is not None else torch.device("cpu")
        n = min(self.aux_images, self.num_images)
        sub = torch.randperm(self.num_images, generator=generator, device=gdev)[:n].to(dev)
        return self._aux_on(self.images.detach()[sub], generator)

    def _aux_on(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
        """The auxiliary losses of training-space images ``x`` (no gradient reaches ``x``)."""
        dev, n = x.device, x.shape[0]
        px = self._pixels(x.detach())  # once: the network and L_a's target both work in pixel space
        m = self.net.probs(px)
        l_m, l_b = max_color_loss(m), balance_loss(m)
        total = self.alpha * l_m + self.beta * l_b
        metrics = {"L_m": float(l_m.detach()), "L_b": float(l_b.detach())}
        if self.gamma > 0:
            sample = sample_pixels(n, x.shape[2] * x.shape[3], self.sample_ratio, generator).to(dev)
            l_a = alignment_loss(m, self._reference_of_pixels(px), sample=sample)
            total = total + self.gamma * l_a
            metrics["L_a"] = float(l_a.detach())
        if self.conf > 0:
            l_c = confidence_loss(m)
            total = total + self.conf * l_c
            metrics["L_conf"] = float(l_c.detach())
        used = F.one_hot(m.detach().argmax(1), self.colors).amax(dim=(1, 2)).sum(1).float().mean()
        metrics["colors_used"] = float(used)
        return total, metrics

    def warmup(self, batches: Iterable[Tensor], generator: torch.Generator | None = None,
               progress: Any = None) -> dict[str, float]:
        """Train the palette network alone on real images before distillation (the code's
        ``--use_warmup``, docs/methods/autopalette.md, Where decoct departs from the paper or the
        released code): ``alpha L_m + beta L_b + gamma L_a`` on each batch of training-space images,
        no task loss, no confidence loss, an SGD of the palette optimiser's settings. Not in the
        paper (the authors use it for ImageNet subsets). Measured on 400 real CIFAR-10 images at K =
        64 (benchmarks/palette_warmup_check.py): 300 steps raise the argmax colours in use from 5.7
        to 14.0 and the stored images' PSNR from 22.1 to 25.6 dB, with or without ZCA (the network
        sees pixel space); median cut: 35.1 dB. DM needs it: a fresh network's near-uniform soft
        output makes flat images, DM's first loss is ~11x its usual size (174.7 vs 15.4 after 300
        warm-up steps, CIFAR-10 IPC 10) and its gradient (norm 372 vs 0.19 from the auxiliary
        losses) leaves 2 colours in use for good (benchmarks/palette_dm_grad_probe.py). It does not
        replace a long run. Returns the last batch's metrics.
        """
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr_palette, momentum=self.palette_momentum,
                              weight_decay=self.palette_weight_decay)
        metrics: dict[str, float] = {}
        for x in batches:
            loss, metrics = self._aux_on(x, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(metrics)
        return metrics

    # ------------------------------------------------------------------ storage
    def to_set(self, info: DatasetInfo, **kwargs: Any) -> DistilledSet:
        """Palette PNGs of the hard-quantised images; the ZCA travels as an attachment.

        ``meta["palette"]`` records K, the index and palette bits per image and the paper's
        budget factor; when ``meta`` carries the budget ``ipc`` (DM and TM put it there) it also holds
        ``budget`` = :func:`decoct.matching.palette.palette_budget` (the paper's rule next to the true bits).
        """
        if info.image_shape != self.info.image_shape:
            raise ValueError(f"info describes {info.image_shape} images, the parameters are {self.info.image_shape}")
        attachments = dict(kwargs.pop("attachments", {}))
        if self.zca is not None:
            attachments["zca"] = self.zca.state_dict()
        meta = dict(kwargs.pop("meta", {}))
        bits = index_bits(self.colors)
        c, h, w = info.image_shape
        meta["palette"] = {
            "colors": self.colors,
            "index_bits_per_image": h * w * bits,
            "palette_bits_per_image": self.colors * c * 8,
            "paper_factor": 2 ** (8 - bits),
            "zca_palette_space": "pixel" if self.zca is not None else None,
        }
        if isinstance(meta.get("ipc"), int):
            meta["palette"]["budget"] = palette_budget(meta["ipc"], self.colors, info.image_shape)
        ind, pal = self.stored()
        return DistilledSet.from_palette(info, ind, pal, self.labels.cpu(), attachments=attachments, meta=meta,
                                         **kwargs)


__all__ = ["PaletteParam", "effective_ipc", "index_bits", "palette_budget"]
