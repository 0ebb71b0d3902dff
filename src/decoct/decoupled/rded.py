"""RDED (Sun et al., CVPR 2024): a distilled set selected, not optimised, by a frozen teacher.

For each class: take ``candidates`` real training images (a seeded random draw; all of them when
the class has fewer), cut ``crops`` square RandomResizedCrops of ``size // factor`` pixels from
each (area fraction uniform in ``(crop_scale_min, 1)``, aspect ratio 1, antialiased bilinear, as
torchvision's ``RandomResizedCrop(ratio=(1, 1), antialias=True)``), and score every crop by the
teacher's cross-entropy on the true class, ``-log softmax(f(pad(crop)))[y]``, where ``pad``
centres the crop on a ``size x size`` canvas of zeros in normalised space (the mean colour) and
the teacher is in eval mode. Each image keeps its lowest-loss crop; the class keeps the
``ipc * factor**2`` lowest-loss images' crops (so every patch comes from a different image), in
ascending order of loss. Patch of rank ``k * ipc + i`` fills grid cell ``k`` (row-major) of
output image ``i``: with ``factor`` 2 each image is four patches, the top-left cells holding the
best ones; with ``factor`` 1 each image is one crop at full size. Presets by image size
(``PRESETS``; docs/methods/rded.md, Hyper-parameters): 300 candidates, 5 crops, factor 1 up to
64 px (CIFAR, Tiny-ImageNet), factor 2 above (ImageNet and its subsets).

No labels are stored: RDED's students learn from the teacher online (``decoct evaluate RUN
--protocol soft --teacher T``), or from a label store (``decoct relabel``, then ``--protocol soft``).

Where decoct departs from the released code (docs/methods/rded.md, Where decoct departs):

* **Seeded.** The candidates of class ``c`` and their crop boxes come from generators seeded by
  ``(seed, c)`` only: the same seed gives the same set, whatever the device, chunking or number of
  decoding workers. The released synthesis is not seeded at all.
* The crop boxes are drawn from the same uniform numbers for an in-memory split and a streamed
  one; a streamed split is cropped from each file at its native resolution (as RDED does), an
  in-memory split from the stored images (already at the dataset's size).
* Normalisation is the dataset's (the teacher's) mean/std, not ImageNet's for every dataset.
* Images are stored as lossless PNG rounded to 8 bits, not JPEG at quality 75 with truncation.
* A setting that cannot fill the grid (``ipc * factor**2`` above the candidates, or above a
  class's image count) is refused, where the released code would fail or silently reuse fewer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from decoct.augment.recorded_views import cell_spans
from decoct.data import Dataset, DatasetInfo, is_streamed
from decoct.data.sources import BadImageError
from decoct.decoupled.recover import family_for
from decoct.formats.artifact import DistilledSet
from decoct.formats.teacher import Teacher, check_teacher_dataset, load_teacher_full
from decoct.methods.base import METHODS
from decoct.runtime.distributed import resolve_device, world_size

__all__ = [
    "PRESETS",
    "RDED",
    "RDEDConfig",
    "candidate_indices",
    "crop_draws",
    "crop_losses",
    "family_for",
    "rded",
    "resample_weights",
    "resized_crops",
    "select_patches",
    "square_boxes",
    "stitch",
]

TRIES = 10
"""Box draws per crop before torchvision's fallback (the centred largest square)."""

PRESETS: dict[str, dict[str, Any]] = {
    # docs/methods/rded.md, Hyper-parameters: every released script uses 300 candidates per class and
    # 5 crops per image (*_cr5.sh); factor 1 for CIFAR-10/100 and Tiny-ImageNet, 2 for ImageNet-1K,
    # ImageNet-100/10, ImageNette and ImageWoof
    "small": dict(candidates=300, crops=5, factor=1),
    "tiny": dict(candidates=300, crops=5, factor=1),
    "imagenet": dict(candidates=300, crops=5, factor=2),
}


@dataclass
class RDEDConfig:
    """Options of one RDED run; ``None`` means "the preset for this image size" (:data:`PRESETS`)."""

    teacher: str
    ipc: int
    candidates: int | None = None
    crops: int | None = None
    factor: int | None = None
    crop_scale_min: float = 0.08
    batch_size: int = 100
    seed: int = 0
    amp: bool = False

    def resolved(self, info: DatasetInfo) -> RDEDConfig:
        """A copy with every ``None`` filled from the preset, validated (raises naming the option)."""
        values = asdict(self)
        for k, v in PRESETS[family_for(info)].items():
            if values.get(k) is None:
                values[k] = v
        cfg = RDEDConfig(**values)
        cfg.validate(info)
        return cfg

    def validate(self, info: DatasetInfo) -> None:
        """Raise ValueError naming the option for a value RDED cannot run with."""
        for name in ("ipc", "candidates", "crops", "factor", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        size = min(info.height, info.width)
        if self.factor > size:
            raise ValueError(f"--factor {self.factor} is larger than the {size}-pixel images; use --factor 1 or 2")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop-scale-min must be in (0, 1], got {self.crop_scale_min}")
        keep = self.ipc * self.factor ** 2
        if keep > self.candidates:
            raise ValueError(f"ipc {self.ipc} x factor {self.factor}^2 = {keep} patches per class need at least "
                             f"{keep} candidates, got --candidates {self.candidates}; raise --candidates or lower "
                             "--ipc/--factor")
        if info.height != info.width:
            raise ValueError(f"RDED stitches square patches into square images; {info.name!r} has "
                             f"{info.height}x{info.width} images")


# ---------------------------------------------------------------------------------------------
# the pieces, each testable on its own
def _generator(seed: int, c: int, salt: int) -> torch.Generator:
    """A CPU generator that depends on (seed, class, purpose) only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (int(c) + 1) + 104_729 * salt) % (2**63 - 1))


def candidate_indices(labels: Tensor, c: int, n: int, seed: int) -> Tensor:
    """The candidates of class ``c``: a seeded random ``min(n, count)`` of its images (split indices)."""
    idx = torch.nonzero(labels == c, as_tuple=False).flatten()
    perm = torch.randperm(len(idx), generator=_generator(seed, c, 1))[:n]
    return idx[perm]


def crop_draws(seed: int, c: int, n: int, crops: int) -> Tensor:
    """The uniform numbers of class ``c``'s crop boxes: float64 (n, crops, TRIES, 3) in [0, 1).

    Drawn before the image sizes are known, so an in-memory and a streamed split (whose files
    are decoded in worker processes) turn the same numbers into boxes (:func:`square_boxes`).
    """
    return torch.rand(n, crops, TRIES, 3, generator=_generator(seed, c, 2), dtype=torch.float64)


def square_boxes(u: Tensor, h: int, w: int, scale: tuple[float, float] = (0.08, 1.0)) -> Tensor:
    """Square RandomResizedCrop boxes (top, left, side, side) of an ``h x w`` image: long (..., 4).

    torchvision's rule with ratio (1, 1): area fraction ``scale[0] + u0 (scale[1] - scale[0])``,
    side ``round(sqrt(area))``, top and left uniform over the positions that fit; the first of
    the ``TRIES`` draws (``u``: (..., TRIES, 3)) that fits is used, otherwise the centred square
    of the shorter side.
    """
    area = float(h * w) * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    side = torch.round(torch.sqrt(area))
    ok = (side > 0) & (side <= h) & (side <= w)
    top = torch.floor(u[..., 1] * (h - side + 1).clamp(min=1))
    left = torch.floor(u[..., 2] * (w - side + 1).clamp(min=1))
    first = ok.long().argmax(-1, keepdim=True)
    pick = lambda t: t.gather(-1, first).squeeze(-1)  # noqa: E731
    box = torch.stack([pick(top), pick(left), pick(side), pick(side)], -1)
    s = min(h, w)
    fallback = torch.tensor([(h - s) // 2, (w - s) // 2, s, s], dtype=box.dtype, device=box.device)
    return torch.where(ok.any(-1, keepdim=True), box, fallback).long()


def resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Rows that crop ``[start, start + length)`` of an axis of ``in_size`` pixels and resize it to
    ``out_size``: float32 (..., out_size, in_size), each row summing to 1.

    Antialiased bilinear (a triangle filter widened by the shrink factor, clipped to the crop and
    renormalised): the filter of torchvision's ``resize(..., antialias=True)`` (PIL's), which is
    plain bilinear with ``align_corners=False`` when enlarging. Pinned to torchvision in the tests.
    """
    start = start.double()
    length = length.double()
    scale = length / out_size
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5) * scale[..., None]
    r = torch.arange(in_size, dtype=torch.float64, device=start.device) - start[..., None]  # (..., in)
    x = (r[..., None, :] + 0.5 - centre[..., :, None]) / support[..., None, None]
    wgt = (1 - x.abs()).clamp(min=0) * ((r >= 0) & (r < length[..., None]))[..., None, :]
    return (wgt / wgt.sum(-1, keepdim=True)).float()


def resized_crops(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``m`` boxes from each image and resize them to ``size``: (B, C, H, W) float, (B, m, 4)
    long -> (B, m, C, size, size), as two batched matrix products (no loop over images or crops)."""
    _, _, h, w = x.shape
    b = boxes.to(x.device)
    wy = resample_weights(b[..., 0], b[..., 2], h, size).to(x.dtype)  # (B, m, size, H)
    wx = resample_weights(b[..., 1], b[..., 3], w, size).to(x.dtype)  # (B, m, size, W)
    rows = torch.einsum("bmih,bchw->bmciw", wy, x)
    return torch.einsum("bmciw,bmjw->bmcij", rows, wx)


def crop_losses(model: torch.nn.Module, crops: Tensor, label: int, info: DatasetInfo, size: int, *,
                amp: bool = False) -> Tensor:
    """The teacher's cross-entropy of ``label`` on every crop, each centred on a ``size x size``
    canvas of zeros after normalising: crops (B, m, C, s, s) in [0, 1] -> float32 (B, m).

    ``model`` should be in eval mode (the score of a crop must not depend on its batch).
    """
    bsz, m, c, s, _ = crops.shape
    mean = torch.tensor(info.mean, device=crops.device, dtype=crops.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=crops.device, dtype=crops.dtype).view(1, -1, 1, 1)
    x = (crops.reshape(bsz * m, c, s, s) - mean) / std
    lo = (size - s) // 2
    x = F.pad(x, (lo, size - s - lo, lo, size - s - lo))
    with torch.no_grad():
        if amp:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                logits = model(x)
        else:
            logits = model(x)
        y = torch.full((bsz * m,), int(label), dtype=torch.long, device=x.device)
        return F.cross_entropy(logits.float(), y, reduction="none").view(bsz, m)


def select_patches(losses: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """RDED's selection: ``losses`` (N images, m crops) -> (best crop of each image (N,), the
    ``keep`` images with the lowest best loss, in ascending order of loss (keep,)).

    Ties go to the first crop and the earlier image, so the choice is reproducible.
    """
    if keep > losses.shape[0]:
        raise ValueError(f"cannot keep {keep} patches from {losses.shape[0]} images")
    best_loss, best = losses.min(dim=1)
    order = torch.sort(best_loss, stable=True).indices[:keep]
    return best, order


def stitch(patches: Tensor, ipc: int, factor: int, size: int) -> Tensor:
    """Tile ``ipc * factor**2`` patches (in ascending order of loss) into ``ipc`` images of ``size``.

    Cell ``k`` (row-major) of image ``i`` gets patch ``k * ipc + i``. Cells follow
    :func:`~decoct.augment.recorded_views.cell_spans` (with ``size % factor = r > 0`` the first ``r``
    rows and columns of cells are one pixel larger, the patch enlarged to fit by nearest-neighbour,
    as RDED's ``mix_images``), the strips ShufflePatches later moves.
    """
    n, c = patches.shape[:2]
    if n != ipc * factor ** 2:
        raise ValueError(f"stitch needs ipc x factor^2 = {ipc * factor ** 2} patches, got {n}")
    spans = cell_spans(size, factor)
    starts = [sum(spans[:i]) for i in range(factor)]
    out = patches.new_zeros(ipc, c, size, size)
    for k in range(factor * factor):
        r, q = divmod(k, factor)
        part = patches[k * ipc:(k + 1) * ipc]
        if part.shape[-2:] != (spans[r], spans[q]):
            part = F.interpolate(part, size=(spans[r], spans[q]), mode="nearest")
        out[:, :, starts[r]:starts[r] + spans[r], starts[q]:starts[q] + spans[q]] = part
    return out


# ---------------------------------------------------------------------------------------------
# reading the candidates' crops: an in-memory split at once, a streamed split file by file
class _FileCrops(torch.utils.data.Dataset):
    """Item ``(class, k, n, file index)`` -> the ``crops`` crops of that file at native resolution.

    Runs in DataLoader workers; a file that does not decode comes back as its message (raised in
    the main process as one clear line, not a worker traceback).
    """

    def __init__(self, split: Any, cfg: RDEDConfig, size: int, channels: int) -> None:
        self.split, self.cfg, self.size, self.channels = split, cfg, size, channels
        self._draws: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[Tensor | None, str | None]:
        from decoct.data.stream import decode_file

        c, k, n, i = item
        cfg = self.cfg
        if self._draws is None or self._draws[0] != c:
            self._draws = (c, crop_draws(cfg.seed, c, n, cfg.crops))
        try:
            img = decode_file(self.split.index.path(i), self.channels)
        except BadImageError as e:
            return None, str(e)
        h, w = img.shape[-2:]
        boxes = square_boxes(self._draws[1][k], h, w, (cfg.crop_scale_min, 1.0))
        x = img.float().div_(255.0)[None]
        return resized_crops(x, boxes[None], self.size)[0], None


def _collate(items: list[tuple[Tensor | None, str | None]]) -> tuple[Tensor | None, str | None]:
    bad = next((msg for _, msg in items if msg is not None), None)
    return (None, bad) if bad is not None else (torch.stack([x for x, _ in items]), None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decode per worker process; the workers are the parallelism


class RDED:
    """RDED as a :class:`~decoct.methods.base.DistillMethod`: one iteration per class, so
    :func:`~decoct.methods.base.run_method` gives it resume, checkpoints, the log and the artifact."""

    name = "rded"

    def __init__(self, config: RDEDConfig, *, teacher: Teacher | None = None) -> None:
        self.teacher = teacher if teacher is not None else load_teacher_full(config.teacher, "cpu", with_stats=False)
        self.info = self.teacher.info
        self.config = config.resolved(self.info)
        self.iterations = self.info.num_classes
        self.keep = self.config.ipc * self.config.factor ** 2
        self.n_images = self.info.num_classes * self.config.ipc
        self._ready = False

    # ------------------------------------------------------------------ setup
    def check_data(self, dataset: Dataset, device: torch.device | str) -> None:
        """Raise a clear error, before any work, when the data or the device cannot serve this run:
        other classes or image shape than the teacher's, a class with fewer than ``ipc * factor**2``
        images (every patch comes from a different image), amp off CUDA."""
        cfg = self.config
        if cfg.amp and torch.device(device).type != "cuda":
            raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {device}")
        check_teacher_dataset(self.info, dataset.info, cfg.teacher)
        counts = torch.bincount(dataset.train.labels, minlength=self.info.num_classes)
        short = torch.nonzero(counts < self.keep).flatten()
        if len(short):
            c = int(short[0])
            raise ValueError(f"class {c} ({self.info.classes[c]!r}) has {int(counts[c])} training images; ipc "
                             f"{cfg.ipc} x factor {cfg.factor}^2 needs {self.keep} distinct images per class; "
                             "lower --ipc or --factor")

    def init(self, dataset: Dataset, device: torch.device) -> None:
        """Check the data against the teacher and the settings; load the teacher on ``device``."""
        self.device = torch.device(device)
        self.check_data(dataset, self.device)
        self.dataset = dataset
        self.streamed = is_streamed(dataset)
        self.model = self.teacher.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        c, h, w = self.info.image_shape
        self.out = torch.zeros(self.n_images, c, h, w, dtype=torch.uint8)
        self.done = torch.zeros(self.info.num_classes, dtype=torch.bool)
        self.last_metrics: dict[int, dict[str, float]] = {}
        self._stream: Iterator | None = None
        self._stream_next = -1
        self._ready = True

    # ------------------------------------------------------------------ crops of one class
    def _memory_chunks(self, c: int, idx: Tensor) -> Iterator[Tensor]:
        cfg = self.config
        size = self.info.height // cfg.factor
        h, w = self.info.height, self.info.width
        boxes = square_boxes(crop_draws(cfg.seed, c, len(idx), cfg.crops), h, w, (cfg.crop_scale_min, 1.0))
        images = self.dataset.train.images
        for lo in range(0, len(idx), cfg.batch_size):
            x = images[idx[lo:lo + cfg.batch_size]].to(self.device).float().div_(255.0)
            yield resized_crops(x, boxes[lo:lo + cfg.batch_size], size)

    def _stream_from(self, first: int) -> Iterator[tuple[int, Tensor]]:
        """(class, crops) chunks of every class from ``first`` on, decoded by the split's workers."""
        cfg = self.config
        split = self.dataset.train
        labels = split.labels
        batches = []
        for c in range(first, self.info.num_classes):
            idx = candidate_indices(labels, c, cfg.candidates, cfg.seed).tolist()
            items = [(c, k, len(idx), i) for k, i in enumerate(idx)]
            batches += [items[lo:lo + cfg.batch_size] for lo in range(0, len(items), cfg.batch_size)]
        ds = _FileCrops(split, cfg, self.info.height // cfg.factor, self.info.channels)
        workers = int(getattr(split, "workers", 0) or 0)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
            worker_init_fn=_worker_init if workers else None, prefetch_factor=2 if workers else None)
        for items, (crops, bad) in zip(batches, loader, strict=True):
            if bad is not None:
                raise BadImageError(bad)
            yield items[0][0], crops

    def _stream_chunks(self, c: int, n: int) -> Iterator[Tensor]:
        if self._stream is None or self._stream_next != c:
            self._stream = self._stream_from(c)
        got = 0
        while got < n:
            cls, crops = next(self._stream)
            if cls != c:
                raise RuntimeError(f"rded: expected the crops of class {c}, got class {cls}")
            got += len(crops)
            yield crops.to(self.device)
        self._stream_next = c + 1

    # ------------------------------------------------------------------ the loop
    def step(self, it: int) -> dict[str, float]:
        """Select and stitch the images of class ``it``."""
        if not self._ready:
            raise RuntimeError("call init(dataset, device) before step()")
        cfg = self.config
        c = it
        idx = candidate_indices(self.dataset.train.labels, c, cfg.candidates, cfg.seed)
        chunks = self._stream_chunks(c, len(idx)) if self.streamed else self._memory_chunks(c, idx)
        best_crops, losses = [], []
        for crops in chunks:  # only each image's best crop is kept past its chunk
            loss = crop_losses(self.model, crops, c, self.info, self.info.height, amp=cfg.amp)
            best_crops.append(crops[torch.arange(len(loss), device=loss.device), loss.min(dim=1).indices])
            losses.append(loss)
        loss = torch.cat(losses)
        best, order = select_patches(loss, self.keep)
        loss_best = loss.gather(1, best[:, None]).squeeze(1)
        patches = torch.cat(best_crops)[order]
        images = stitch(patches, cfg.ipc, cfg.factor, self.info.height)
        pos = slice(c * cfg.ipc, (c + 1) * cfg.ipc)
        self.out[pos] = images.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        self.done[c] = True
        metrics = {"loss": float(loss_best[order].mean()), "loss_best_crop": float(loss_best.mean()),
                   "loss_all_crops": float(loss.mean()), "candidates": float(len(idx))}
        self.last_metrics[c] = metrics
        return metrics

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"out": self.out.clone(), "done": self.done.clone(),
                "last_metrics": {str(k): v for k, v in self.last_metrics.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.out = state["out"].clone()
        self.done = state["done"].clone()
        self.last_metrics = {int(k): v for k, v in state.get("last_metrics", {}).items()}
        self._stream = None

    # ------------------------------------------------------------------ output
    def labels(self) -> Tensor:
        return torch.arange(self.info.num_classes).repeat_interleave(self.config.ipc)

    def result(self) -> DistilledSet:
        cfg = self.config
        t = self.teacher
        per_class = [self.last_metrics[c] for c in sorted(self.last_metrics)]

        def mean(key: str) -> float | None:
            return round(sum(m[key] for m in per_class) / len(per_class), 6) if per_class else None

        meta: dict[str, Any] = dict(
            teacher=str(t.path) if t.path else cfg.teacher, teacher_model=t.meta.get("model"),
            teacher_test_accuracy=t.meta.get("test_accuracy"),
            teacher_sha256=t.meta.get("files", {}).get("model.safetensors"), family=family_for(self.info),
            ipc=cfg.ipc, factor=cfg.factor, patch_size=self.info.height // cfg.factor,
            crop_source="files at native resolution" if getattr(self, "streamed", False) else "in-memory split",
            labels="none stored: train with an online teacher (evaluate --protocol soft --teacher T) or relabel",
            complete=bool(self.done.all()),
            # mean teacher cross-entropy per class: of the kept patches, of each candidate's best crop,
            # of all crops scored (what random crops of the same images score)
            teacher_loss={"kept": mean("loss"), "best_crop": mean("loss_best_crop"),
                          "all_crops": mean("loss_all_crops")},
            resolved=asdict(cfg))
        source = getattr(getattr(self, "dataset", None), "source", None)
        if source:  # how later commands (evaluate) find this data again
            meta["data_source"] = source
        return DistilledSet(self.info, self.out.clone(), self.labels(), method="rded", config=asdict(cfg), meta=meta)


def _factory(config: dict[str, Any]) -> RDED:
    known = {f.name for f in fields(RDEDConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"rded: unknown option(s) {unknown}; known: {sorted(known)}")
    return RDED(RDEDConfig(**config))


METHODS.register("rded")(_factory)


# ---------------------------------------------------------------------------------------------
RUNTIME_KEYS = ("max_iterations", "checkpoint_every", "device", "download", "data_root", "workers")
"""CLI keys that do not change the result and may differ between a run and its --resume."""


def prepare(*, teacher: str | Path, ipc: int, dataset: str | None = None, data_root: str | None = None,
            download: bool = False, data_options: dict[str, Any] | None = None,
            **options: Any) -> tuple[RDED, Dataset]:
    """Build and validate an RDED run *before any work*: teacher, dataset, options.

    Without ``dataset`` the data is the teacher's, found from the source its teacher.json records
    (registry name and root; ``data_root`` overrides the root), as for ``decoct distill sre2l``.
    """
    from decoct.data.provenance import SOURCE_KEY, load_for, read_source

    known = {f.name for f in fields(RDEDConfig)} - {"teacher", "ipc"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"rded: unknown option(s) {unknown}; known: {sorted(known)}")
    t = load_teacher_full(teacher, "cpu", with_stats=False)
    method = RDED(RDEDConfig(teacher=str(teacher), ipc=ipc, **options), teacher=t)
    recorded = read_source(t.meta.get(SOURCE_KEY), f"{teacher}/teacher.json")
    data = load_for(t.info, recorded, dataset=dataset, data_root=data_root, download=download,
                    what=f"teacher {teacher}", options=data_options)
    check_teacher_dataset(t.info, data.info, teacher)
    return method, data


def rded(teacher: str | Path, ipc: int, out: str | Path, *, dataset: str | None = None, data_root: str | None = None,
         download: bool = False, data_options: dict[str, Any] | None = None, seed: int = 0, device: str = "auto",
         resume: bool = False, force: bool = False, show_progress: bool = True, checkpoint_every: int = 100,
         stop_after: int | None = None, config: dict[str, Any] | None = None, **options: Any) -> DistilledSet:
    """Select an RDED set from the teacher's data into the run directory ``out``; the API behind
    ``decoct distill rded``. ``options``: the :class:`RDEDConfig` fields (candidates, crops, factor,
    crop_scale_min, batch_size, amp). ``stop_after`` ends after that many classes (``--resume``
    continues). Returns the set (the finished one, read back, when ``out`` already holds it)."""
    from decoct.methods.base import run_method
    from decoct.runtime.runs import Run, resolve_artifact

    if world_size() > 1:
        raise ValueError("rded runs in one process (one teacher pass per class); start it without torchrun")
    method, data = prepare(teacher=teacher, ipc=ipc, dataset=dataset, data_root=data_root, download=download,
                           data_options=data_options, seed=seed, **options)
    dev = resolve_device(device)
    method.check_data(data, dev)  # before the run directory is made
    run_cfg = dict(config) if config is not None else dict(method="rded", teacher=str(teacher), ipc=ipc,
                                                             out=str(out), dataset=dataset, seed=seed, **options)
    for k in RUNTIME_KEYS:
        run_cfg.pop(k, None)
    run = Run.open(out, run_cfg, resume=resume, force=force)
    if run.done:
        return DistilledSet.load(resolve_artifact(run.path))
    return run_method(method, run, data, dev, seed=seed, checkpoint_every=checkpoint_every,
                      show_progress=show_progress, images_per_step=method.config.ipc, stop_after=stop_after)
