"""Classic colour quantisers: median cut, octree (Pillow) and k-means (torch), batched.

They are the baselines of AutoPalette's Table 8 (docs/methods/quantizers.md, What they do) and the
target quantiser of its alignment loss L_a and colour-guided init (median cut,
docs/methods/autopalette.md, What it does).

Every quantiser maps uint8 images (N, C, H, W) to ``(indices (N, H, W) uint8, palettes (N, K, C)
uint8)`` with ``palettes[n][indices[n]]`` the quantised image. Palettes always have exactly K
entries: entries a quantiser did not use repeat a used colour, so
:meth:`decoct.formats.artifact.DistilledSet.from_palette` accepts them and the stored PNG has one K.

* ``mediancut``: Pillow ``Image.quantize(colors=K, method=MEDIANCUT, dither=NONE)`` (what the
  AutoPalette code calls with ``method=0``; no dithering, as there).
* ``octree``: Pillow ``FASTOCTREE``, no dithering (the paper's "OCTree"; Pillow's method 2).

An image that already has at most K colours is returned unchanged by every method (Pillow's
median cut does so anyway; its fast octree would merge close colours such as grey 33 and 34,
which no reduction asks for), so the Pillow output is used only where colours must be reduced.
* ``kmeans``: Lloyd's k-means on the RGB values (0..255) of each image, k-means++ seeding from
  a seeded generator, run for all images of a chunk at once. Seeding picks every distinct colour
  before any repeat, so an image with at most K colours is reproduced exactly.

Greyscale (C = 1) uses Pillow's ``L`` mode (its palettes are grey) and 1-D k-means.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from decoct.data import DatasetInfo, to_uint8
from decoct.formats.artifact import DistilledSet

QUANTIZERS = ("mediancut", "octree", "kmeans")
_PIL_METHODS = {"mediancut": Image.Quantize.MEDIANCUT, "octree": Image.Quantize.FASTOCTREE}


def _check(images: Tensor, k: int, method: str) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {got}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256:
        raise ValueError(f"colors (k) must be an integer in 2..256, got {k!r}")
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantiser method {method!r}; choose one of {', '.join(QUANTIZERS)}")


def _pad_palette(idx: np.ndarray, pal: np.ndarray, k: int) -> np.ndarray:
    """Palette with exactly k rows; rows no pixel uses repeat the colour of pixel (0, 0)."""
    out = np.empty((k, pal.shape[1]), dtype=np.uint8)
    n = min(len(pal), k)
    out[:n] = pal[:n]
    used = np.zeros(k, dtype=bool)
    used[np.unique(idx)] = True
    out[~used] = out[idx.flat[0]]
    return out


def _quantize_pil(images: Tensor, k: int, method: str) -> tuple[Tensor, Tensor]:
    n, c, h, w = images.shape
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    indices = np.empty((n, h, w), dtype=np.uint8)
    palettes = np.empty((n, k, c), dtype=np.uint8)
    pil_method = _PIL_METHODS[method]
    for i in range(n):
        flat = arr[i].reshape(-1, c)
        colours, inverse = np.unique(flat, axis=0, return_inverse=True)
        if len(colours) <= k:  # nothing to reduce: keep the image exactly (octree would bin it)
            indices[i] = inverse.reshape(h, w)
            palettes[i] = _pad_palette(indices[i], colours, k)
            continue
        im = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i])  # uint8: L or RGB
        q = im.quantize(colors=k, method=pil_method, dither=Image.Dither.NONE)
        idx = np.asarray(q, dtype=np.uint8)
        pal = np.asarray(q.getpalette(), dtype=np.uint8).reshape(-1, 3)
        if int(idx.max()) >= min(len(pal), k):
            raise RuntimeError(f"Pillow {method} returned index {int(idx.max())} for {len(pal)} colours (K={k})")
        indices[i] = idx
        palettes[i] = _pad_palette(idx, pal[:, :c], k)  # grey palettes have R = G = B
    return torch.from_numpy(indices), torch.from_numpy(palettes)


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding for a batch: x (B, P, C) -> centres (B, k, C).

    When every remaining point already coincides with a centre (D^2 = 0 everywhere), the next
    centre repeats a chosen one, so the distinct colours of an image are all picked first.
    """
    b, p, _ = x.shape
    ar = torch.arange(b, device=x.device)
    first = torch.randint(p, (b,), generator=g, device=g.device).to(x.device)
    centres = [x[ar, first]]
    d2 = (x - centres[0][:, None]).pow(2).sum(-1)
    for _ in range(1, k):
        total = d2.sum(1, keepdim=True)
        weights = torch.where(total > 0, d2, torch.ones_like(d2))
        u = torch.rand(b, 1, generator=g, device=g.device).to(x.device)
        cdf = weights.cumsum(1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=p - 1)
        # a zero-weight point can only be hit on a tie at a cdf step; fall back to the arg max
        hit_zero = (weights[ar, pick] == 0) & (total.squeeze(1) > 0)
        pick = torch.where(hit_zero, d2.argmax(1), pick)
        new = x[ar, pick]
        new = torch.where((total > 0), new, centres[0])  # nothing left to cover: repeat
        centres.append(new)
        d2 = torch.minimum(d2, (x - new[:, None]).pow(2).sum(-1))
    return torch.stack(centres, 1)


def _assign(x: Tensor, centres: Tensor) -> Tensor:
    """Nearest centre of every point, (B, P); ties go to the lower index.

    |x|^2 is the same for every centre, so it is left out of the arg min.
    """
    d = centres.pow(2).sum(-1)[:, None, :] - 2 * x @ centres.transpose(1, 2)
    return d.argmin(-1)


def _kmeans_batch(x: Tensor, k: int, g: torch.Generator, iters: int) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm on x (B, P, C) float32 -> (assignments (B, P), uint8 centres (B, k, C))."""
    b, p, c = x.shape
    centres = _kmeans_pp(x, k, g)
    assign = _assign(x, centres)
    ones = torch.ones(b, p, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        sums = torch.zeros(b, k, c, dtype=x.dtype, device=x.device).scatter_add_(
            1, assign[..., None].expand(-1, -1, c), x)
        counts = torch.zeros(b, k, dtype=x.dtype, device=x.device).scatter_add_(
            1, assign, ones)
        # an empty cluster keeps its centre (it stays a legal, unused palette entry)
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
        new = _assign(x, centres)
        if torch.equal(new, assign):
            break
        assign = new
    # store what is used: round the centres to 8 bits, then assign to the rounded palette
    pal = centres.round().clamp(0, 255)
    assign = _assign(x, pal)
    return assign, pal.to(torch.uint8)


def _quantize_kmeans(images: Tensor, k: int, seed: int, iters: int,
                     device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    n, c, h, w = images.shape
    dev = torch.device(device) if device is not None else images.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    x_all = images.to(dev).permute(0, 2, 3, 1).reshape(n, h * w, c).float()
    # chunk so one (B, P, k) distance tensor stays near 2^25 entries
    per = max(1, (1 << 25) // (h * w * k))
    idx_out, pal_out = [], []
    for s in range(0, n, per):
        assign, pal = _kmeans_batch(x_all[s:s + per], k, g, iters)
        idx_out.append(assign.to(torch.uint8).view(-1, h, w).cpu())
        pal_out.append(pal.cpu())
    indices, palettes = torch.cat(idx_out), torch.cat(pal_out)
    # entries no pixel uses repeat a used colour (as the Pillow paths do)
    used = torch.zeros(n, k, dtype=torch.bool).scatter_(1, indices.flatten(1).long(), True)
    fill = palettes[torch.arange(n), indices[:, 0, 0].long()]
    palettes = torch.where(used[..., None], palettes, fill[:, None, :])
    return indices, palettes


def quantize(images: Tensor, k: int, method: str = "mediancut", *, seed: int = 0, iters: int = 30,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Reduce every image to at most ``k`` colours.

    Returns ``(indices (N, H, W) uint8, palettes (N, k, C) uint8)`` on the CPU. ``seed``, ``iters``
    and ``device`` only affect ``kmeans`` (the Pillow quantisers are deterministic, CPU only).
    """
    _check(images, k, method)
    images = images.detach()
    if method == "kmeans":
        return _quantize_kmeans(images, k, seed, iters, device)
    return _quantize_pil(images.cpu(), k, method)


def gather(indices: Tensor, palettes: Tensor) -> Tensor:
    """The uint8 images (N, C, H, W) that ``indices`` and ``palettes`` describe."""
    n = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1)
    return palettes[n, indices.long()].permute(0, 3, 1, 2).contiguous()


def colours_in_use(images: Tensor) -> Tensor:
    """Distinct colours of each image (N,) int64; ``images`` (N, C, H, W) in [0, 1] (rounded to 8 bits)
    or uint8. A palette set's images use at most K each; far fewer means its palette collapsed."""
    x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    flat = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # (N, pixels, C)
    return torch.tensor([len(torch.unique(im, dim=0)) for im in flat], dtype=torch.int64)


COLLAPSE_FRACTION = 1 / 8
"""A palette set whose images use on average fewer than ``K x COLLAPSE_FRACTION`` colours is flagged as
collapsed (:func:`palette_collapse_note`): DM without a palette warm-up leaves 2-3 of 64 (docs/methods/autopalette.md)."""


def palette_collapse_note(images: Tensor, k: int, hint: str) -> str | None:
    """A one-line warning when ``images`` (N, C, H, W) use on average fewer than ``k x COLLAPSE_FRACTION``
    colours of their ``k``-colour palettes, naming ``hint`` (what to change); None otherwise."""
    if k <= 0 or len(images) == 0:
        return None
    mean = colours_in_use(images).float().mean().item()
    if mean >= k * COLLAPSE_FRACTION:
        return None
    return (f"warning: the palette collapsed: the images use {mean:.1f} of their {k} colours on average "
            f"(under {k * COLLAPSE_FRACTION:g}); {hint}")


def quantize_float(x: Tensor, info: DatasetInfo, k: int, method: str = "mediancut",
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
    """:func:`quantize` for normalised float images (what distillation optimises)."""
    return quantize(to_uint8(x.detach().float().cpu(), info), k, method, **kwargs)


def quantize_set(dset: DistilledSet, k: int, method: str = "mediancut", *, seed: int = 0,
                 **kwargs: Any) -> DistilledSet:
    """A palette copy of a distilled set: same hard labels, soft labels and attachments (ZCA).

    Label files (``labels/<name>.safetensors``, e.g. an FKD label store) are dropped: they hold a
    teacher's logits of views of the *source* pixels (an FKD store is even tied to them by its
    fingerprint), so the quantised set could not use them and must not pay for their bytes;
    relabel the quantised set to get a store for it. Per-image soft labels are kept: they are
    the targets the images were distilled with (TM/DATM learn them jointly), a per-image class
    distribution rather than a teacher's reading of particular pixels, and the palette image is
    the same image with fewer colours. Both decisions are recorded in ``meta["quantizer"]``
    (``dropped_label_files``, ``soft_labels``). The method is recorded as
    ``<source method>+<quantiser><k>``; the storage is what the palette PNGs cost once saved.
    """
    idx, pal = quantize(dset.images, k, method, seed=seed, **kwargs)
    q: dict[str, Any] = dict(method=method, colors=k, seed=seed, source_method=dset.method,
                             dropped_label_files=sorted(dset.label_files))
    try:  # how the dropped store was made, so the note can give the relabel command as typed
        from decoct.formats.label_store import LabelStore

        store = LabelStore.from_label_files(dset.label_files)
        if store is not None:
            q["dropped_store"] = dict(teacher=store.header.get("teacher", {}).get("path"),
                                      epochs=int(store.header["epochs"]))
    except (ValueError, AttributeError):
        pass
    if dset.soft_labels is not None:
        q["soft_labels"] = "kept from the source set (per-image targets the images were distilled with)"
    meta = dict(dset.meta, quantizer=q)
    meta.pop("seconds", None)
    return DistilledSet.from_palette(dset.info, idx, pal, dset.labels, soft_labels=dset.soft_labels,
                                     method=f"{dset.method}+{method}{k}", config=dict(dset.config),
                                     meta=meta, attachments=dset.attachments)


def quantize_command(src: str | Path | None = None, *, colors: int, method: str = "mediancut",
                     out: str | Path, dataset: str | None = None, ipc: int | None = None, seed: int = 0,
                     data_root: str | None = None, download: bool = False, device: str = "auto",
                     resume: bool = False, force: bool = False,
                     config: dict[str, Any] | None = None) -> Any:
    """The API of ``decoct quantize``: quantise an artifact (``src``) or ``ipc`` random real images
    per class of ``dataset`` to ``colors`` colours, and save a palette artifact as a run in ``out``.

    Returns the run summary (``decoct.methods.base.RunSummary``): images, bytes on disk and raw bytes.
    """
    from decoct.coreset.select import random_baseline_indices
    from decoct.data import load_dataset
    from decoct.methods.base import run_summary
    from decoct.report import save_grid
    from decoct.runtime.distributed import resolve_device
    from decoct.runtime.runs import Run, resolve_artifact

    if (src is None) == (dataset is None):
        raise ValueError("quantize takes either SRC (an artifact or run) or --dataset with --ipc, not both")
    if dataset is not None and (ipc is None or ipc < 1):
        raise ValueError("--dataset needs --ipc N (N >= 1 random real images per class)")
    if src is not None and ipc is not None:
        raise ValueError("--ipc only applies with --dataset")
    _check(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), colors, method)
    config = config or dict(src=str(src) if src else None, dataset=dataset, ipc=ipc, colors=colors,
                            method=method, seed=seed)
    run = Run.open(out, config, resume=resume, force=force)
    if run.done:
        return run_summary(run, skipped=True)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    if src is not None:
        base = DistilledSet.load(resolve_artifact(src))
    else:
        data = load_dataset(dataset, root=data_root, download=download)
        idx = random_baseline_indices(data, ipc, seed)
        base = DistilledSet(info=data.info, images=data.train.images[idx], labels=data.train.labels[idx],
                            method="random", meta=dict(ipc=ipc, seed=seed, source_indices=idx.tolist(),
                                                       data_source=data.source))
    dset = quantize_set(base, colors, method, seed=seed, device=dev if method == "kmeans" else None)
    dset.config = config
    seconds = time.perf_counter() - t0
    dset.meta["seconds"] = round(seconds, 3)
    dset.save(run.artifact_dir, overwrite=True)
    save_grid(dset.images, dset.labels, run.path / "grid.png")
    st = dset.storage(run.artifact_dir)
    dropped = dset.meta["quantizer"]["dropped_label_files"]
    run.log(event="quantized", method=method, colors=colors, num_images=len(dset), seconds=round(seconds, 3),
            bytes_on_disk=st["bytes_on_disk"]["total"], raw_bytes=st["raw_bytes"]["total"],
            dropped_label_files=dropped)
    if dropped:
        made = dset.meta["quantizer"].get("dropped_store") or {}
        teacher, epochs = made.get("teacher") or "TEACHER_DIR", made.get("epochs") or "EPOCHS"
        print(f"note: {out}: dropped the source's label files ({', '.join(dropped)}): they label the "
              f"un-quantised pixels and do not count towards this set; to give it a label store: "
              f"decoct relabel {out} --teacher {teacher} --epochs {epochs}")
    run.finish()
    return run_summary(run, skipped=False)


def quantize_grid(src: str | Path | None = None, *, colors: list[int], methods: list[str], out: str | Path,
                  config: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
    """Every (method, K) of AutoPalette's Table 8 in one call: one run per cell in
    ``out/<method>-k<K>`` (same source images for all cells); returns their summaries."""
    if not colors or not methods:
        raise ValueError("quantize needs at least one --colors value and one --method")
    out_l = []
    for method in methods:
        for k in colors:
            cell = Path(out) / f"{method}-k{k}"
            cfg = dict(config, colors=k, method=method, out=str(cell)) if config is not None else None
            out_l.append(quantize_command(src, colors=k, method=method, out=cell, config=cfg, **kwargs))
    return out_l


__all__ = ["COLLAPSE_FRACTION", "QUANTIZERS", "colours_in_use", "gather", "palette_collapse_note", "quantize",
           "quantize_command", "quantize_float", "quantize_grid", "quantize_set"]
