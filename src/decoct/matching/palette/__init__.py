"""AutoPalette (palette network, losses, colour-guided init) and classic quantisers.

Shared entry points used by DM and TM (they only call these):

* ``add_palette_args(parser)``: the ``--palette K`` family of flags on ``distill dm|tm``.
* ``effective_ipc(ipc, palette)``: the paper's storage-budget rule (images per class distilled).
* ``palette_budget(ipc, palette, image_shape)``: that rule next to the true bit count.
* ``make_param(init, labels, zca, palette, **options) -> ImageParam``: pixels when
  ``palette == 0``, :class:`~decoct.matching.palette.palette_param.PaletteParam` otherwise.
* ``palette_options(config, info=...)``: the parsed flags -> ``make_param`` keyword options.
* ``init_indices(dataset, ipc, palette, method, seed, device, **options)`` and
  ``init_options(config)``: which real images initialise the synthetic set (``real`` or
  AutoPalette's ``graphcut``).

Typical use in a method (``cfg`` = the resolved config / argparse namespace)::

    n = effective_ipc(cfg.ipc, cfg.palette)
    idx = init_indices(dataset, n, cfg.palette, seed=seed, device=dev, **init_options(cfg))
    param = make_param(init, labels, zca, cfg.palette, **palette_options(cfg, info=dataset.info))
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from decoct.augment import ZCA
from decoct.data import DatasetInfo
from decoct.matching.image_param import ImageParam, PixelParam
from decoct.matching.palette.palette_param import PaletteParam, effective_ipc, palette_budget

INIT_METHODS: tuple[str, ...] = ("real", "graphcut")

# flag dest -> make_param keyword (PaletteParam option)
_PARAM_KEYS = {
    "lr_palette": "lr_palette",
    "palette_alpha": "alpha",
    "palette_beta": "beta",
    "palette_gamma": "gamma",
    "palette_conf": "conf",
    "palette_sample_ratio": "sample_ratio",
    "palette_aux_images": "aux_images",
    "palette_quantizer": "quantizer",
}
# flag dest -> init_indices keyword
_INIT_KEYS = {
    "palette_init": "method",
    "palette_init_epochs": "epochs",
    "palette_init_lr": "lr",
    "palette_init_similarity": "similarity",
    "palette_init_greedy": "greedy",
    "palette_quantizer": "quantizer",  # one flag, both uses: L_a's target and the init's quantised images
}


def add_palette_args(p: argparse.ArgumentParser) -> None:
    """Add the AutoPalette flags (defaults: the paper's CIFAR values, except the init epochs)."""
    from decoct.matching.palette.init import SIMILARITIES
    from decoct.matching.palette.quantize import QUANTIZERS

    g = p.add_argument_group("AutoPalette")
    g.add_argument("--palette", type=int, default=0,
                   help="K colours per synthetic image (AutoPalette); 0 = full-colour pixels. The images "
                        "per class become IPC x 2^(8 - ceil(log2 K)) (the paper's budget rule)")
    g.add_argument("--lr-palette", type=float, default=0.05, help="palette network SGD lr (ImageNette: 0.01)")
    g.add_argument("--palette-alpha", type=float, default=1.0, help="weight of L_m, the maximum-colour loss")
    g.add_argument("--palette-beta", type=float, default=1.0, help="weight of L_b, the palette-balance loss")
    g.add_argument("--palette-gamma", type=float, default=3.0, help="weight of L_a, the median-cut alignment loss")
    g.add_argument("--palette-conf", type=float, default=0.0,
                   help="weight of the per-pixel confidence loss (code only, not in the paper)")
    g.add_argument("--palette-sample-ratio", type=float, default=0.3, help="fraction of pixels L_a compares")
    g.add_argument("--palette-aux-images", type=int, default=64,
                   help="random detached images per step for the auxiliary losses (DM 64, TM 50)")
    g.add_argument("--palette-quantizer", default="mediancut", choices=QUANTIZERS,
                   help="reference quantiser of L_a and of the graph-cut init")
    g.add_argument("--palette-init", default="graphcut", choices=INIT_METHODS,
                   help="initial real images with --palette: random real, or graph cut on quantised images")
    g.add_argument("--palette-init-epochs", type=int, default=1,
                   help="epochs of the init's selection ConvNet on the quantised set (paper 50; small for CPU)")
    g.add_argument("--palette-init-lr", type=float, default=0.1, help="lr of the init's selection ConvNet")
    g.add_argument("--palette-init-similarity", default="features", choices=SIMILARITIES,
                   help="graph-cut kernel: penultimate features (code) or last-layer gradients (paper Eq. 10)")
    g.add_argument("--palette-warmup", type=int, default=0,
                   help="steps training the palette network alone on real batches (L_m + L_b + L_a) before "
                        "distillation; the code's --use_warmup (2 epochs = 2N/batch steps), not in the paper. "
                        "0 = off. DM needs it: a fresh network's first DM step collapses it to 2-3 colours "
                        "(the AutoPalette-DM presets set 1563)")
    g.add_argument("--palette-warmup-batch", type=int, default=64, help="real images per warm-up step (code: 64)")
    g.add_argument("--palette-init-greedy", default="exact", choices=("exact", "stochastic"),
                   help="exact greedy (paper Alg. 1) or stochastic greedy eps=0.9 (code)")


def _get(config: Mapping[str, Any] | argparse.Namespace) -> Mapping[str, Any]:
    return vars(config) if isinstance(config, argparse.Namespace) else config


def palette_options(config: Mapping[str, Any] | argparse.Namespace, info: DatasetInfo | None = None
                    ) -> dict[str, Any]:
    """The ``make_param`` options held in a parsed config (keys absent there keep their defaults)."""
    cfg = _get(config)
    out = {key: cfg[dest] for dest, key in _PARAM_KEYS.items() if dest in cfg}
    if info is not None:
        out["info"] = info
    return out


def init_options(config: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """The ``init_indices`` keywords (``method`` included) held in a parsed config.

    With a palette the method is ``palette_init`` (default ``graphcut``); without one (``palette`` 0
    or absent) it is the config's own ``init`` key, else ``real``. The graph-cut knobs are only
    returned for ``graphcut`` (``real`` takes none).
    """
    cfg = _get(config)
    method = cfg.get("palette_init", "graphcut") if cfg.get("palette", 0) else cfg.get("init", "real")
    if method != "graphcut":
        return {"method": method}
    out = {key: cfg[dest] for dest, key in _INIT_KEYS.items() if dest in cfg}
    out["method"] = method
    if "progress" in cfg:
        out["progress"] = bool(cfg["progress"])
    return out


def warmup_palette(param: ImageParam, config: Mapping[str, Any] | argparse.Namespace, num_train: int,
                   real_batch: Any, seed: int, show_progress: bool = False) -> dict[str, float]:
    """Run :meth:`PaletteParam.warmup` for ``palette_warmup`` steps of ``palette_warmup_batch``
    random training images (``real_batch(idx)`` gives them in the training space); {} when off.

    Its own generator (from ``seed``), so a warm-up never shifts the run's other random draws.
    """
    cfg = _get(config)
    steps, batch = int(cfg.get("palette_warmup", 0) or 0), int(cfg.get("palette_warmup_batch", 64) or 64)
    if steps < 0 or batch < 1:
        raise ValueError(f"palette_warmup must be >= 0 and palette_warmup_batch >= 1, got {steps}, {batch}")
    if steps == 0:
        return {}
    if not isinstance(param, PaletteParam):
        raise ValueError("palette_warmup trains the palette network and needs --palette K > 0")
    from decoct.runtime.runs import progress as progress_bar

    gen = torch.Generator().manual_seed(int(seed) + 104729)

    def batches() -> Any:
        for _ in range(steps):
            yield real_batch(torch.randint(num_train, (batch,), generator=gen))

    bar = progress_bar(total=steps, desc="palette warm-up", enabled=show_progress)
    try:
        return param.warmup(batches(), generator=gen,
                            progress=lambda m: (bar.update(1), bar.set_postfix(colors=f"{m['colors_used']:.1f}",
                                                                               refresh=False)))
    finally:
        bar.close()


def make_param(init: Tensor, labels: Tensor, zca: ZCA | None = None, palette: int = 0,
               **options: Any) -> ImageParam:
    """Pixels (``palette == 0``; palette options are then ignored) or AutoPalette with K = ``palette``.

    Options for the palette (see :class:`~decoct.matching.palette.palette_param.PaletteParam`): ``info``
    (required), ``lr_palette``, ``palette_momentum``, ``palette_weight_decay``, ``alpha``, ``beta``,
    ``gamma``, ``conf``, ``sample_ratio``, ``aux_images``, ``quantizer``, ``hidden``, ``soften``.
    """
    if palette == 0:
        return PixelParam(init, labels, zca)
    known = {"info", "lr_palette", "palette_momentum", "palette_weight_decay", "alpha", "beta", "gamma", "conf",
             "sample_ratio", "aux_images", "quantizer", "hidden", "soften"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown palette option(s) {unknown}; known: {sorted(known)}")
    return PaletteParam(init, labels, zca, palette, **options)


def init_indices(dataset: Any, ipc: int, palette: int = 0, method: str = "real", seed: int = 0,
                 device: Any = "cpu", **options: Any) -> Tensor:
    """Training-set indices of the real images that initialise ``ipc`` synthetic images per class.

    ``ipc`` is the count actually distilled (pass ``effective_ipc(...)`` for palette runs). Grouped
    class by class in class order. ``real``: uniformly random per class (seeded). ``graphcut``:
    AutoPalette's colour-guided init (:func:`decoct.matching.palette.init.colour_guided_indices`) on images
    quantised to ``palette`` colours (8-bit when 0); ``options``: ``epochs``, ``lr``, ``batch_size``,
    ``model``, ``similarity``, ``greedy``, ``epsilon``, ``quantizer``, ``progress``.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; known: {', '.join(INIT_METHODS)}")
    if method == "graphcut":
        from decoct.matching.palette.init import colour_guided_indices

        return colour_guided_indices(dataset, ipc, palette, seed=seed, device=device, **options)
    if options:
        raise ValueError(f"init 'real' takes no options, got {sorted(options)}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(dataset.info.num_classes):
        idx = dataset.train.class_indices(c)
        if ipc > len(idx):
            raise ValueError(f"--ipc {ipc} asks for more images than class {c} has ({len(idx)})")
        out.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return torch.cat(out)


__all__ = ["INIT_METHODS", "PaletteParam", "add_palette_args", "effective_ipc", "init_indices", "init_options",
           "make_param", "palette_budget", "palette_options", "warmup_palette"]
