"""AutoPalette's colour-guided initialisation: graph-cut selection on colour-quantised real images.

Pipeline (docs/methods/autopalette.md, What it does and Where decoct departs from the paper or the
released code):

1. quantise every real training image to K colours (median cut, as the code: Pillow, no dither);
2. train a ConvNet (ConvNet-D3 at 32x32) on the quantised set: SGD lr 0.1, momentum 0.9, wd 5e-4,
   batch 128, plain cross-entropy, no augmentation, constant lr, for ``epochs`` (code: 40, README
   50; the default here is small because it runs on CPU: presets carry the paper's value);
3. describe each quantised image by its penultimate features (the code's choice, default) or by
   the last-layer cross-entropy gradient (the paper's Eq. 10, ``similarity="gradients"``);
4. per class, greedily maximise the generalised graph cut with ``s = 0.5 + 0.5 cos`` and
   ``lambda = 1``, picking ``ipc`` images.

The caller then copies the **original** (not quantised) images at these indices into the synthetic
set. The greedy computes the correct marginal gain for every candidate (exact greedy by default;
``greedy="stochastic"`` is the code's epsilon = 0.9 sampler, without DeepCore's index-alignment bug,
docs/methods/coresets.md): the feature path reuses :func:`decoct.coreset.select.graphcut_select`;
the gradient path, whose vectors are too long to materialise, uses
:func:`decoct.coreset.select.graphcut_select_kernel` (the same greedy) on the per-class kernel (the
cosine of ``(p - y) (x) [1, e]`` factorises as ``cos(p_i - y_i, p_j - y_j) * cos([1, e_i], [1, e_j])``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from decoct.coreset.select import GREEDY_MODES, graphcut_select, graphcut_select_kernel
from decoct.data import Dataset, normalize
from decoct.models import model_for
from decoct.train import TrainConfig, train_model

SIMILARITIES: tuple[str, ...] = ("features", "gradients")


def gradient_kernel(residual: Tensor, embed: Tensor) -> Tensor:
    """``0.5 + 0.5 cos`` between last-layer CE gradients ``(p - y) (x) [1, e]``, as (n, n).

    ``residual`` (n, classes) = softmax - one-hot, ``embed`` (n, d) the classifier's input.
    """
    r = F.normalize(residual.double(), dim=1)
    e = F.normalize(torch.cat([torch.ones(len(embed), 1, dtype=torch.float64), embed.double()], 1), dim=1)
    return 0.5 + 0.5 * (r @ r.T) * (e @ e.T)


def quantized_train_images(dataset: Dataset, colors: int, quantizer: str = "mediancut",
                           chunk: int = 4096) -> Tensor:
    """uint8 training images reduced to ``colors`` colours (``colors == 0``: unchanged, 8-bit)."""
    from decoct.matching.palette.quantize import gather, quantize

    images = dataset.train.images
    if colors == 0:
        return images
    out = []
    for s in range(0, len(images), chunk):
        out.append(gather(*quantize(images[s:s + chunk], colors, quantizer)))
    return torch.cat(out)


def colour_guided_indices(dataset: Dataset, ipc: int, colors: int, *, seed: int = 0,
                          device: torch.device | str = "cpu", epochs: int = 1, lr: float = 0.1,
                          batch_size: int = 128, model: str = "convnet", similarity: str = "features",
                          greedy: str = "exact", epsilon: float = 0.9, quantizer: str = "mediancut",
                          progress: bool = False) -> Tensor:
    """``ipc`` training-set indices per class chosen by graph cut on ``colors``-colour images.

    ``ipc`` is the number of synthetic images per class actually distilled (already enlarged by
    :func:`decoct.matching.palette.effective_ipc`). ``colors = 0`` selects on the 8-bit images (the paper's
    "Graph Cut Real" ablation). Indices are grouped class by class in class order and, within a
    class, in selection order. Deterministic for a given ``seed`` (network init, batch order,
    stochastic draws).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown init similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
    if greedy not in GREEDY_MODES:
        raise ValueError(f"unknown init greedy {greedy!r}; known: {', '.join(GREEDY_MODES)}")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"init epochs >= 0, lr > 0 and batch_size >= 1 are required, got {epochs}, {lr}, "
                         f"{batch_size}")
    if colors != 0 and not 2 <= colors <= 256:
        raise ValueError(f"colors must be 0 (8-bit) or in 2..256, got {colors}")
    info = dataset.info
    per_class = [dataset.train.class_indices(c) for c in range(info.num_classes)]
    for c, idx in enumerate(per_class):
        if not 1 <= ipc <= len(idx):
            raise ValueError(f"ipc {ipc} must be in 1..{len(idx)} (the size of class {c} {info.classes[c]!r})")

    images = quantized_train_images(dataset, colors, quantizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = model_for(model, info)
    if not (hasattr(net, "embed") and hasattr(net, "classifier")):
        raise ValueError(f"init model {model!r} has no embed()/classifier; use a convnet")
    dev = torch.device(device)
    x_all = normalize(images, info)
    labels = dataset.train.labels
    if epochs > 0:
        cfg = TrainConfig(epochs=epochs, lr=lr, momentum=0.9, weight_decay=5e-4, batch_size=batch_size,
                          schedule="constant")
        train_model(net, x_all, labels, cfg, seed=seed, device=dev, progress=progress)
    net.to(dev).eval()
    feats, resid = [], []
    with torch.no_grad():
        for s in range(0, len(x_all), 1024):
            e = net.embed(x_all[s:s + 1024].to(dev)).flatten(1)
            feats.append(e.float().cpu())
            if similarity == "gradients":
                p = torch.softmax(net.classifier(e), dim=1).cpu()
                resid.append(p - F.one_hot(labels[s:s + 1024], info.num_classes).float())
    emb = torch.cat(feats)
    res = torch.cat(resid) if resid else None
    g = torch.Generator().manual_seed(seed)
    out = []
    for idx in per_class:
        if similarity == "features":
            pick = graphcut_select(emb[idx], ipc, greedy=greedy, epsilon=epsilon, generator=g)
        else:
            sim = gradient_kernel(res[idx], emb[idx])  # type: ignore[index]
            pick = graphcut_select_kernel(sim, ipc, greedy=greedy, epsilon=epsilon, generator=g)
        out.append(idx[pick])
    return torch.cat(out)


__all__ = ["SIMILARITIES", "colour_guided_indices", "gradient_kernel", "quantized_train_images"]
