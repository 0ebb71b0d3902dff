"""``decoct plan``: the configurations of one method family that fit a byte budget, ranked.

A user asks "what is the most accurate set I can ship in 200 KB?". The planner answers in four steps
(docs/plan.md):

1. **Enumerate** the configurations of a family (:func:`enumerate_configs`): images per class, colours K
   (AutoPalette's storage rule gives the image counts of a K-colour recipe: ``IPC x 2^(8 - ceil(log2 K))``,
   :func:`decoct.matching.palette.palette_param.effective_ipc`; plain median-cut quantisation of real or
   distilled images uses the same counts so the two meet at equal budgets), hard or soft labels, LPLD's
   label pruning factor and the label format.
2. **Estimate** the bytes on disk of each from real encoded samples of the dataset
   (:func:`measure_image_bytes`): a seeded sample of real training images per class is encoded exactly
   as the artifact stores them (an 8-bit PNG, or a palette PNG at K colours after median cut, both by
   :func:`decoct.formats.png.encode_png`) and the per-class mean size is scaled to the configuration's
   image count. Label stores are serialised at their real shapes by the store's own code
   (:func:`fp16_store_bytes`; encoded formats by their byte model, :func:`label_format`). Nothing is a
   guessed constant. A configuration *fits* when its estimate plus two standard deviations (PNG sizes
   vary image to image) is within the budget; a configuration that a run built fits by the run's bytes.
3. **Measure** what exists: every run under ``--runs`` whose manifest matches a configuration
   (:func:`config_of_run`) gives its accuracy (its ``eval-*.json``) and its real bytes, so the table
   shows how close the estimate came; the unmeasured configurations of a method and K that has runs get
   their image estimate scaled by what those runs stored (:func:`calibrate`).
4. **Sweep** (``--sweep``): the unmeasured configurations are built and evaluated through the normal
   commands (:func:`sweep`), one run directory each under ``--out``; a rerun skips what is finished.

Budgets (:func:`parse_budget`): ``KB``/``MB``/``GB`` are decimal (1 KB = 1000 bytes, as disk and network
sizes are quoted), ``KiB``/``MiB``/``GiB`` binary (1 KiB = 1024 bytes), a bare number is bytes.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAMILIES: dict[str, tuple[str, ...]] = {
    "coreset": ("random", "herding", "kcenter", "graphcut"),
    "matching": ("dm", "dm+mediancut", "autopalette-dm"),
    "decoupled": ("sre2l", "dwa", "lpld", "rded"),
}
"""The methods each family plans over. Coreset methods with K colours are median-cut after selection;
``dm+mediancut`` is DM followed by ``decoct quantize``; ``autopalette-dm`` is ``distill dm --palette K``."""

DEFAULT_METHODS = {"coreset": ("random",), "matching": ("dm", "dm+mediancut", "autopalette-dm"),
                   "decoupled": ("lpld",)}

BUDGET_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
                "kib": 1024, "mib": 1024**2, "gib": 1024**3}
"""Budget suffixes, case-insensitive: decimal SI (KB = 1000 B) and binary IEC (KiB = 1024 B)."""

FIT_SIGMAS = 2.0
"""A configuration fits when ``estimate + FIT_SIGMAS x sd <= budget`` (sd: :meth:`ImageBytes.estimate`)."""


# ------------------------------------------------------------------------------------------ budget
def parse_budget(text: str | int) -> int:
    """A byte budget: ``200KB`` (200,000), ``1.5MB`` (1,500,000), ``64KiB`` (65,536), ``50000`` (bytes).

    Decimal units (KB, MB, GB) are powers of 1000 and binary ones (KiB, MiB, GiB) powers of 1024;
    suffixes are case-insensitive and may follow a space. Raises ValueError (naming ``--budget``) for
    anything else, a budget that is not a whole number of bytes, or one below one byte.
    """
    if isinstance(text, bool):
        raise ValueError(f"--budget must be a size such as 200KB, 1.5MB, 64KiB or 50000 (bytes), got {text!r}")
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", s)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in BUDGET_UNITS:
        raise ValueError(f"--budget must be a size such as 200KB, 1.5MB, 64KiB or 50000 (bytes; KB/MB/GB are "
                         f"decimal, KiB/MiB/GiB binary), got {str(text)[:60]!r}")
    from fractions import Fraction

    value = Fraction(m.group(1)) * BUDGET_UNITS[unit]
    if value.denominator != 1:
        raise ValueError(f"--budget {s} is not a whole number of bytes ({float(value):g}); give it in bytes or "
                         "a smaller unit")
    if value < 1:
        raise ValueError(f"--budget must be at least 1 byte, got {s}")
    return int(value)


def format_bytes(n: float) -> str:
    """``12,345 B`` below 10 kB, else decimal kB/MB with three significant digits (the budget's units)."""
    if n < 10_000:
        return f"{n:,.0f} B"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:,.0f} B"  # pragma: no cover


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class PlanConfig:
    """One configuration: what to build, described by what its artifact will hold.

    ``ipc`` is the images per class *stored*; ``base_ipc`` the full-colour budget in images per class
    that AutoPalette's rule turned into ``ipc`` (``ipc`` itself for full colour). ``colors`` 0 means
    8-bit PNGs. ``labels`` ``hard`` (none stored) or ``soft`` (an FKD label store made by ``decoct
    relabel``, ``label_epochs`` stored epochs, LPLD ``prune`` factor, ``label_format`` a key of
    :func:`label_format`).
    """

    family: str
    method: str
    ipc: int
    base_ipc: int
    colors: int = 0
    labels: str = "hard"
    prune: int = 1
    label_format: str = "fp16"
    label_epochs: int = 0

    def slug(self) -> str:
        """The run directory name: every field that changes what is stored."""
        s = f"{self.method.replace('+', '-')}-ipc{self.ipc}"
        if self.colors:
            s += f"-k{self.colors}"
        if self.labels == "soft":
            s += f"-soft-e{self.label_epochs}" + (f"-p{self.prune}" if self.prune > 1 else "")
            s += f"-{self.label_format}" if self.label_format != "fp16" else ""
        return s

    def image_slug(self) -> str:
        """The run holding only the images (before a label store is added)."""
        return PlanConfig(self.family, self.method, self.ipc, self.base_ipc, self.colors).slug()

    def describe(self) -> str:
        parts = [self.method, f"{self.ipc}/class"]
        parts.append(f"K={self.colors}" if self.colors else "full colour")
        if self.colors and self.base_ipc != self.ipc:
            parts[-1] += f" (x{self.ipc // self.base_ipc} of IPC {self.base_ipc})"
        if self.labels == "soft":
            lab = f"soft {self.label_epochs} ep"
            lab += f", pruned {self.prune}x" if self.prune > 1 else ""
            lab += f", {self.label_format}" if self.label_format != "fp16" else ""
            parts.append(lab)
        else:
            parts.append("hard labels")
        return ", ".join(parts)

    def key(self) -> tuple[Any, ...]:
        """What a run's manifest must agree on to measure this configuration."""
        return (self.method, self.ipc, self.colors, self.labels, self.prune if self.labels == "soft" else 1,
                self.label_format if self.labels == "soft" else "", self.label_epochs if self.labels == "soft" else 0)


@dataclass(frozen=True)
class LabelFormat:
    """One way to store soft labels: the ``decoct relabel`` flags that make it, and its byte count.

    ``store_bytes(num_images, num_classes, image_shape, epochs, batch, prune, view)`` returns the bytes
    on disk of the store's files; ``matches(header)`` says whether a store header was written in this
    format. :func:`label_format` makes one from a name.
    """

    name: str
    relabel_flags: tuple[str, ...]
    store_bytes: Callable[..., int]
    matches: Callable[[dict[str, Any]], bool]


def _encoding_name(header: dict[str, Any]) -> str:
    """The label encoding a store header records: ``fp16`` (plain logits) unless it has an ``encoding``."""
    enc = header.get("encoding")
    if enc is None:
        return "fp16" if header.get("logits", "float16") == "float16" else "unknown"
    return str(enc.get("name", "unknown")) if isinstance(enc, dict) else "unknown"


def fp16_store_bytes(num_images: int, num_classes: int, image_shape: Sequence[int], epochs: int, batch: int,
                      prune: int, view: Any, teacher: str | dict[str, Any] | None = None) -> int:
    """Bytes on disk of an fp16 FKD label store, by serialising it at its real shapes.

    The batch geometry is :class:`decoct.decoupled.relabel.RelabelPlan`'s (the one relabel uses), the
    header is relabel's own (``teacher``: the teacher directory as typed, or relabel's whole teacher
    description, or None for a placeholder of the same form), and each
    distinct epoch-file shape is written once with :class:`~decoct.formats.label_store.EpochLabels`
    and the artifact's serialiser (zeros: a safetensors file's size depends on shapes, not values).
    Exact up to the lengths of the teacher's path and model name in the header.
    """
    import torch

    from decoct.decoupled.relabel import RelabelPlan, _header
    from decoct.formats.label_store import EpochLabels, _encode_header
    from decoct.runtime.io import tensors_to_bytes

    plan = RelabelPlan(num_images, epochs, batch, None if prune in (None, 1) else prune)
    units = plan.units()
    tdesc = dict(teacher) if isinstance(teacher, dict) else {
        "path": teacher or "teachers/teacher", "model": "resnet18", "dataset": "dataset", "fingerprint": "0" * 64}
    header = _header(plan, "0" * 64, num_classes, tuple(image_shape), view, 0, tdesc)
    header["precision"] = "float32"
    header["stored_epochs"] = {str(e): len(u) for e, u in sorted(units.items())}
    total = len(tensors_to_bytes({"header": _encode_header(header)}))
    sizes: dict[tuple[int, ...], int] = {}
    mixed, cut = view.mix != "none", view.mix == "cutmix"
    for e, us in units.items():
        shape = tuple(plan.size(u) for u in us)
        if shape not in sizes:
            n, k = sum(shape), len(shape)
            ep = EpochLabels(epoch=e, units=torch.tensor(us, dtype=torch.int32),
                             sizes=torch.tensor(shape, dtype=torch.int32), index=torch.zeros(n, dtype=torch.int32),
                             crop=torch.zeros(n, 4, dtype=torch.int16), flip=torch.zeros(n, dtype=torch.bool),
                             logits=torch.zeros(n, num_classes, dtype=torch.float16),
                             perm=torch.zeros(n, dtype=torch.int16) if mixed else None,
                             lam=torch.zeros(k, dtype=torch.float32) if mixed else None,
                             box=torch.zeros(k, 4, dtype=torch.int16) if cut else None)
            sizes[shape] = len(tensors_to_bytes(ep.tensors()))
        total += sizes[shape]
    return total


LABEL_FORMAT_RE = re.compile(r"(?:top(\d+)-(zero|spread)-)?(fp16|q8|q4)")
"""Label format names, as the store's encoding names them (docs/label-store.md, Label encodings): ``fp16``
(all C logits, relabel's default), ``q8``/``q4`` (per-row quantised logits), ``top{k}-{zero|spread}-{fp16|q8|q4}``
(the k largest classes with either fill rule)."""


def label_format(name: str) -> LabelFormat:
    """The :class:`LabelFormat` a name describes (:data:`LABEL_FORMAT_RE`).

    ``fp16`` is serialised by :func:`fp16_store_bytes` (exact). The encoded formats are made by ``decoct
    relabel --label-topk K --label-fill F --label-bits B`` and sized by
    :func:`decoct.formats.label_pruning.label_store_bytes` (its ``on_disk``: exact but for the teacher
    path in the JSON header). Raises ValueError for another name.
    """
    m = LABEL_FORMAT_RE.fullmatch(str(name))
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"--label-formats: unknown format {name!r}; known: fp16, q8, q4, "
                         "top<K>-<zero|spread>-<fp16|q8|q4> (e.g. top5-zero-fp16, top2-spread-q8)")
    if name == "fp16":
        return LabelFormat("fp16", (), fp16_store_bytes, lambda h: _encoding_name(h) == "fp16")
    topk = int(m.group(1)) if m.group(1) else None
    fill = m.group(2)
    bits = {"fp16": 16, "q8": 8, "q4": 4}[m.group(3)]
    flags: tuple[str, ...] = ("--label-topk", str(topk), "--label-fill", fill) if topk else ()
    flags += ("--label-bits", str(bits)) if bits != 16 else ()

    def store_bytes(num_images: int, num_classes: int, image_shape: Sequence[int], epochs: int, batch: int,
                    prune: int, view: Any, teacher: Any = None) -> int:
        try:
            from decoct.formats.label_pruning import label_store_bytes
        except ImportError:  # pragma: no cover - a decoct without label encodings
            raise ValueError(f"--label-formats {name}: this decoct has no label encodings; use fp16") from None
        if topk is not None and topk >= num_classes:
            raise ValueError(f"--label-formats {name}: top-{topk} keeps every one of the {num_classes} classes")
        return int(label_store_bytes(num_images, num_classes, epochs, batch, prune=prune, topk=topk, bits=bits,
                                     mix=view.mix, image_shape=tuple(image_shape), view=view)["on_disk"])

    return LabelFormat(name, flags, store_bytes, lambda h, n=name: _encoding_name(h) == n)


def enumerate_configs(family: str, methods: Sequence[str], ipcs: Sequence[int], colors: Sequence[int],
                      labels: Sequence[str], prunes: Sequence[int], label_formats: Sequence[str],
                      label_epochs: int | None, max_per_class: int | None = None) -> list[PlanConfig]:
    """Every configuration of the grid, before any byte is estimated.

    Full colour (K = 0): ``ipc`` images per class for each value of ``ipcs``. K colours: the AutoPalette
    rule's ``ipc x 2^(8 - ceil(log2 K))`` for each ``ipc``, for ``autopalette-dm`` (which stores exactly
    that many) and for median-cut recipes (coresets, ``dm+mediancut``) alike. ``dm`` takes K = 0 only and
    ``dm+mediancut``/``autopalette-dm`` K > 0 only; coresets take both; the decoupled family plans
    full-colour sets (K = 0) whatever ``colors`` says. Soft labels get every pruning
    factor and label format. Counts above ``max_per_class`` (the smallest class of the training split)
    are left out. Raises ValueError for an unknown family, method, format or pruning factor.
    """
    from decoct.formats.label_pruning import PRUNE_FACTORS
    from decoct.matching.palette.palette_param import effective_ipc

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    for m in methods:
        if m not in FAMILIES[family]:
            raise ValueError(f"--methods: {m!r} is not a {family} method; choose from {', '.join(FAMILIES[family])}")
    for f in label_formats:
        label_format(f)  # unknown names fail here
    for p in prunes:
        if p not in PRUNE_FACTORS:
            raise ValueError(f"--prune: {p} is not an LPLD factor; choose from {', '.join(map(str, PRUNE_FACTORS))}")
    for lab in labels:
        if lab not in ("hard", "soft"):
            raise ValueError(f"--labels must be hard or soft, got {lab!r}")
    if "soft" in labels and not label_epochs:
        raise ValueError("soft labels need --label-epochs E (the epochs relabel stores; they set the label bytes)")
    out: list[PlanConfig] = []
    for method in methods:
        if family == "matching":
            ks = [k for k in colors if (k == 0) == (method == "dm")]
        else:  # coresets: full colour and median cut; decoupled: full colour (the soft protocol's sets)
            ks = list(colors) if family == "coreset" else [0]
        for k in ks:
            for b in ipcs:
                n = effective_ipc(b, k) if k else b
                if max_per_class is not None and n > max_per_class:
                    continue
                for lab in labels:
                    if lab == "hard":
                        out.append(PlanConfig(family, method, n, b, k))
                        continue
                    for p in prunes:
                        for f in label_formats:
                            out.append(PlanConfig(family, method, n, b, k, "soft", p, f, int(label_epochs or 0)))
    return out


# ------------------------------------------------------------------------------------------ estimates
@dataclass
class ImageBytes:
    """Measured PNG bytes per image of a dataset: per colour count K (0 = 8-bit), per class mean and
    variance over a seeded sample of ``sample`` real training images per class."""

    dataset: str
    sample: int
    seed: int
    mean: dict[int, list[float]] = field(default_factory=dict)
    var: dict[int, list[float]] = field(default_factory=dict)

    def estimate(self, colors: int, ipc: int) -> tuple[float, float]:
        """(expected bytes, standard deviation) of ``ipc`` images per class stored at ``colors``.

        The sd combines the spread of ``ipc`` fresh images per class (``ipc x var``) and the error of the
        sample mean (``ipc^2 x var / sample``), summed over classes.
        """
        mu, var = self.mean[colors], self.var[colors]
        est = ipc * sum(mu)
        sd = math.sqrt(sum(ipc * v + ipc * ipc * v / self.sample for v in var))
        return est, sd


def measure_image_bytes(data: Any, colors: Sequence[int], sample: int = 16, seed: int = 0) -> ImageBytes:
    """Encode ``sample`` random training images per class as the artifact stores them, per K in ``colors``.

    K = 0: 8-bit PNG; K > 0: median cut to K colours (:func:`decoct.matching.palette.quantize.quantize`,
    ``decoct quantize``'s default quantiser) and a palette PNG. Both by
    :func:`decoct.formats.png.encode_png`, the artifact's encoder, so the sizes are real. A class with
    fewer images than ``sample`` uses all it has.
    """
    import torch

    from decoct.formats.png import encode_png
    from decoct.matching.palette.quantize import gather, quantize

    if sample < 2:
        raise ValueError(f"--sample must be >= 2 images per class, got {sample}")
    g = torch.Generator().manual_seed(seed)
    out = ImageBytes(dataset=data.info.name, sample=sample, seed=seed)
    per_class = []
    for c in range(data.info.num_classes):
        idx = data.train.class_indices(c)
        per_class.append(data.train.images[idx[torch.randperm(len(idx), generator=g)[:sample]]])
    for k in sorted(set(colors)):
        means, vars_ = [], []
        for imgs in per_class:
            if k:
                ind, pal = quantize(imgs, k, "mediancut")
                rgb = gather(ind, pal)
                sizes = [len(encode_png(rgb[i], ind[i], pal[i])) for i in range(len(imgs))]
            else:
                sizes = [len(encode_png(imgs[i])) for i in range(len(imgs))]
            m = sum(sizes) / len(sizes)
            means.append(m)
            vars_.append(sum((s - m) ** 2 for s in sizes) / max(1, len(sizes) - 1))
        out.mean[k], out.var[k] = means, vars_
    return out


@dataclass
class Estimate:
    """A configuration's estimated bytes on disk: images (with palettes) and labels."""

    images: float
    images_sd: float
    labels: int

    @property
    def total(self) -> float:
        return self.images + self.labels

    @property
    def upper(self) -> float:
        return self.total + FIT_SIGMAS * self.images_sd

    def scaled(self, factor: float) -> Estimate:
        """The same estimate with its image bytes (and their sd) times ``factor``; labels unchanged."""
        return Estimate(self.images * factor, self.images_sd * factor, self.labels)


def estimate(cfg: PlanConfig, ib: ImageBytes, info: Any, batch: int, view: Any, teacher: str | None = None,
             cache: dict[tuple[Any, ...], int] | None = None) -> Estimate:
    """The bytes a configuration's artifact will hold: images from ``ib``, labels from the store format.

    ``info`` is the dataset's :class:`~decoct.data.types.DatasetInfo`; ``batch`` and ``view`` the relabel
    batch size and view recipe (the dataset's soft recipe by default). Hard labels cost nothing on disk
    (they are the manifest's).
    """
    img, sd = ib.estimate(cfg.colors, cfg.ipc)
    labels = 0
    if cfg.labels == "soft":
        n = cfg.ipc * info.num_classes
        key = (cfg.label_format, n, cfg.label_epochs, batch, cfg.prune)
        if cache is None or key not in cache:
            val = label_format(cfg.label_format).store_bytes(n, info.num_classes, info.image_shape, cfg.label_epochs,
                                                              batch, cfg.prune, view, teacher)
            if cache is not None:
                cache[key] = val
        labels = cache[key] if cache is not None else val
    return Estimate(img, sd, labels)


# ------------------------------------------------------------------------------------------ runs
def _artifact_manifest(run: Path) -> tuple[Path, dict[str, Any]] | None:
    art = run / "artifact" if (run / "artifact").is_dir() else run
    m = art / "manifest.json"
    if not m.is_file():
        return None
    try:
        d = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return (art, d) if isinstance(d, dict) and d.get("format") == "decoct-distilled-set" else None


def _store_header(art: Path) -> dict[str, Any] | None:
    """The FKD store header of an artifact (labels/fkd.safetensors), or None without a store."""
    f = art / "labels" / "fkd.safetensors"
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    from decoct.formats.label_store import _decode_header

    return _decode_header(load_file(str(f)))


def config_of_run(run: str | Path, family: str) -> tuple[PlanConfig, dict[str, Any]] | None:
    """The configuration a run directory (or artifact) holds, read from its manifest, and the manifest;
    None when it is not a finished set of this family or its classes hold unequal counts.

    Method names as the commands write them: ``coreset-<m>`` (select), ``<src>+mediancut<K>``
    (quantize; ``random+...`` from ``quantize --dataset``), ``dm`` with palette storage (AutoPalette-DM,
    the paper recipe), ``sre2l``/``dwa``/``lpld``/``rded``. Soft labels: an FKD store in ``labels/``
    (its header gives epochs, pruning factor and format).
    """
    from decoct.matching.palette.palette_param import effective_ipc

    found = _artifact_manifest(Path(run))
    if found is None:
        return None
    art, m = found
    counts = m.get("counts_per_class") or []
    if not counts or len(set(counts)) != 1:
        return None
    n = int(counts[0])
    method = str(m.get("method", ""))
    colors = 0
    mc = re.fullmatch(r"(.+)\+mediancut(\d+)", method)
    if mc:
        method, colors = mc.group(1), int(mc.group(2))
    method = method.removeprefix("coreset-")
    palette = m.get("image_storage") == "png-palette"
    if method == "dm" and palette and not mc:
        method, colors = "autopalette-dm", int((m.get("palette_sizes") or [0])[0])
    elif method == "dm" and mc:
        method = "dm+mediancut"
    if method not in FAMILIES[family]:
        return None
    base = n
    if colors:
        factor = effective_ipc(1, colors)
        base = n // factor if n % factor == 0 else n
    cfg = PlanConfig(family, method, n, base, colors)
    header = _store_header(art)
    if header is not None:
        fmt = _encoding_name(header)
        if fmt != "unknown" and LABEL_FORMAT_RE.fullmatch(fmt) is None:
            fmt = "unknown"
        prune = int((header.get("prune") or {}).get("factor", 1))
        cfg = PlanConfig(family, method, n, base, colors, "soft", prune, fmt, int(header.get("epochs", 0)))
    return cfg, m


def eval_files(run: Path, protocol: str, model: str | None = None) -> list[Path]:
    """A run's ``eval-<protocol>-*.json`` files, sorted; only ``eval-<protocol>-<model>-*.json`` when a
    student ``model`` is named (:func:`decoct.api.eval_filename` writes them)."""
    return sorted(run.glob(f"eval-{protocol}-{model + '-' if model else ''}*.json"))


def eval_result(run: Path, protocol: str, model: str | None = None) -> dict[str, Any] | None:
    """The finished :func:`eval_files` entry of a run (not an online-teacher one) with the most students."""
    best = None
    for f in eval_files(run, protocol, model):
        if f.name.startswith(f"eval-{protocol}-online"):
            continue
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict) or r.get("partial") or "mean" not in r:
            continue
        if best is None or len(r.get("accuracies", [])) > len(best.get("accuracies", [])):
            best = dict(r, file=str(f))
    return best


SOURCES = "_sources"
"""The sweep's folder of intermediate runs (a set before median cut or before its label store)."""


def find_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories under ``dirs`` (each a run, or a folder of runs, searched two levels deep);
    a sweep's :data:`SOURCES` folder is not searched (its runs are steps, not configurations)."""
    out: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"--runs {d}: no such directory")
        cands = [d, *sorted(p for p in d.iterdir() if p.is_dir() and p.name != SOURCES)]
        cands += [q for p in cands[1:] for q in sorted(p.iterdir()) if q.is_dir() and q.name != "artifact"]
        out += [c for c in cands if _artifact_manifest(c) is not None and c.name != "artifact"]
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class PlanRow:
    """One line of the plan: a configuration, its estimate, and what a matching run measured."""

    config: PlanConfig
    estimate: Estimate
    fits: bool
    run: str | None = None
    accuracy: float | None = None
    accuracy_std: float | None = None
    actual_bytes: int | None = None
    actual_image_bytes: int | None = None
    protocol: str | None = None
    calibration: float | None = None
    """The factor its image estimate was scaled by (:func:`calibrate`), None when it was not."""

    @property
    def error(self) -> float | None:
        """(estimate - actual) / actual of the artifact's bytes on disk, when a run exists."""
        if self.actual_bytes is None or self.actual_bytes == 0:
            return None
        return (self.estimate.total - self.actual_bytes) / self.actual_bytes

    def to_dict(self) -> dict[str, Any]:
        return dict(config=asdict(self.config), describe=self.config.describe(), slug=self.config.slug(),
                    estimate_bytes=round(self.estimate.total), estimate_sd=round(self.estimate.images_sd, 1),
                    estimate_images=round(self.estimate.images), estimate_labels=self.estimate.labels,
                    fits=self.fits, run=self.run, accuracy=self.accuracy, accuracy_std=self.accuracy_std,
                    actual_bytes=self.actual_bytes, actual_image_bytes=self.actual_image_bytes,
                    estimate_error=self.error, protocol=self.protocol, calibration=self.calibration)


@dataclass
class Plan:
    dataset: str
    family: str
    budget: int
    rows: list[PlanRow]
    sample: ImageBytes
    notes: list[str] = field(default_factory=list)
    train_images: int = 0
    """Images in the dataset's training split (the sweep's default palette warm-up is two epochs of it)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(dataset=self.dataset, family=self.family, budget=self.budget, fit_sigmas=FIT_SIGMAS,
                    sample_per_class=self.sample.sample, sample_seed=self.sample.seed,
                    rows=[r.to_dict() for r in self.rows], notes=self.notes)


def protocol_for(cfg: PlanConfig, hard_protocol: str) -> str:
    """Soft-label configurations are measured by the soft protocol; hard ones by ``hard_protocol``."""
    return "soft" if cfg.labels == "soft" else hard_protocol


def make_plan(dataset: str, family: str, budget: int, *, methods: Sequence[str] | None = None,
              ipcs: Sequence[int] = (1, 2, 5, 10, 20, 50, 100), colors: Sequence[int] = (0, 256, 64, 16),
              labels: Sequence[str] | None = None, prunes: Sequence[int] = (1, 10),
              label_formats: Sequence[str] = ("fp16",), label_epochs: int | None = None,
              label_batch: int | None = None, runs: Sequence[str | Path] = (), protocol: str = "fast",
              keep: str = "largest", sample: int = 16, seed: int = 0, data_root: str | None = None,
              download: bool = False, teacher: str | None = None, model: str | None = None) -> Plan:
    """Enumerate, estimate, fit and rank (module docstring). Rows: measured configurations first, by
    accuracy (best first), then the unmeasured ones that fit, by estimated bytes (largest first). ``model``:
    only evaluations of that student count (default: any, i.e. each protocol's own).

    ``keep="largest"`` lists, per recipe (everything but the image count), only the largest image count
    that fits: the same recipe with fewer images costs fewer bytes but is not expected to be more
    accurate; measured configurations are always listed. ``keep="all"`` lists every fitting one.
    """
    from decoct.data import load_dataset
    from decoct.train.soft_students import soft_recipe_for

    if keep not in ("largest", "all"):
        raise ValueError(f"--keep must be largest or all, got {keep!r}")
    if protocol not in ("classic", "fast"):
        raise ValueError(f"--protocol is the protocol of hard-label configurations: classic or fast, got {protocol!r}")
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    methods = list(methods) if methods else list(DEFAULT_METHODS[family])
    labels = list(labels or (("soft",) if family == "decoupled" else ("hard",)))
    data = load_dataset(dataset, root=data_root, download=download)
    from decoct.data import is_streamed

    if is_streamed(data):
        raise ValueError(f"decoct plan samples images of in-memory datasets; {dataset} is streamed from disk")
    info = data.info
    smallest = int(data.train.class_counts(info.num_classes).min())
    configs = enumerate_configs(family, methods, ipcs, colors, labels, prunes, label_formats, label_epochs,
                                max_per_class=smallest)
    notes = []
    pixels = int(info.image_shape[1]) * int(info.image_shape[2])
    too_many = sorted({c.colors for c in configs if c.colors > pixels})
    if too_many:  # a palette larger than the image: the K = pixels image at more bytes, never better
        notes.append(f"left out K={', '.join(map(str, too_many))}: more colours than the {pixels} pixels of one "
                     f"{info.image_shape[1]}x{info.image_shape[2]} image")
        configs = [c for c in configs if c.colors <= pixels]
    if not configs:
        raise ValueError("no configuration to plan: the --ipc/--colors grid gives no image count the dataset "
                         f"has (its smallest class holds {smallest} training images)")
    recipe = soft_recipe_for(info)
    batch = label_batch or recipe.batch_size
    matched = []  # (run, its configuration, its manifest): runs of this family and dataset
    for run in find_runs(runs):
        found = config_of_run(run, family)
        if found is not None and found[1].get("dataset", {}).get("name") == info.name:
            matched.append((run, *found))
    sampled = {c.colors for c in configs} | {cfg.colors for _, cfg, _ in matched if cfg.colors <= pixels}
    ib = measure_image_bytes(data, sorted(sampled), sample=sample, seed=seed)
    cache: dict[tuple[Any, ...], int] = {}
    rows: dict[tuple[Any, ...], PlanRow] = {}
    for c in configs:
        try:
            est = estimate(c, ib, info, batch, recipe.view, teacher, cache)
        except ValueError as e:  # a store that cannot exist (a pruning that keeps no batch, top-k >= C)
            notes.append(f"left out {c.describe()}: {e}")
            continue
        rows[c.key()] = PlanRow(c, est, est.upper <= budget)
    # measured runs
    for run, cfg, manifest in matched:
        proto = protocol_for(cfg, protocol)
        res = eval_result(run, proto, model)
        row = rows.get(cfg.key())
        if row is None:
            if cfg.label_format == "unknown":
                notes.append(f"{run}: its label store is in a format the planner does not know; not matched")
                continue
            if cfg.colors not in ib.mean:
                notes.append(f"{run}: K={cfg.colors} is more colours than one image's pixels; not matched")
                continue
            try:
                est = estimate(cfg, ib, info, batch, recipe.view, teacher, cache)
            except ValueError as e:
                notes.append(f"{run}: its configuration cannot be estimated ({e}); not matched")
                continue
            row = rows[cfg.key()] = PlanRow(cfg, est, est.upper <= budget)
        if row.run is not None and (res is None or (row.accuracy is not None and row.accuracy >= res["mean"])):
            continue  # keep the better-measured of two runs of the same configuration
        row.run = str(run)
        row.actual_bytes = int(manifest["storage"]["bytes_on_disk"]["total"])
        row.actual_image_bytes = int(manifest["storage"]["bytes_on_disk"]["images"])
        row.fits = row.actual_bytes <= budget  # a built set fits by its own bytes, not by the estimate
        row.protocol = proto
        if res is not None:
            row.accuracy, row.accuracy_std = float(res["mean"]), float(res["std"])
    notes += calibrate(list(rows.values()), budget)
    listed = [r for r in rows.values() if r.fits or r.run is not None]
    if keep == "largest":
        best: dict[tuple[Any, ...], PlanRow] = {}
        for r in listed:
            if r.fits:  # measured or not: a measured largest count leaves no smaller one to build
                k = r.config.key()[:1] + r.config.key()[2:]
                if k not in best or r.config.ipc > best[k].config.ipc:
                    best[k] = r
        listed = [r for r in listed if r.run is not None or best.get(r.config.key()[:1] + r.config.key()[2:]) is r]
    listed.sort(key=lambda r: (r.accuracy is None, -(r.accuracy or 0.0), -r.estimate.total, r.config.slug()))
    return Plan(info.name, family, budget, listed, ib, notes, train_images=int(len(data.train.labels)))


def calibrate(rows: Sequence[PlanRow], budget: int) -> list[str]:
    """Scale the image estimates of unmeasured rows by what runs of the same method and K stored.

    The estimate encodes real images, but a method's own images compress differently (recovered LPLD
    images came out 1.3x the bytes of real ones on CIFAR-10, which put a planned 150 KB set at 157 KB).
    Per (method, K), the factor is the runs' image bytes on disk over their rows' image estimates,
    summed over the runs; every unmeasured row of that method and K gets its image bytes and sd scaled
    by it and is fitted again. Measured rows keep the real-image estimate, so the table's error column
    still says how far that estimate was. Returns one note per factor applied.
    """
    seen: dict[tuple[str, int], list[PlanRow]] = {}
    for r in rows:
        if r.actual_image_bytes is not None and r.estimate.images > 0:
            seen.setdefault((r.config.method, r.config.colors), []).append(r)
    notes = []
    for (method, colors), runs in sorted(seen.items()):
        factor = sum(r.actual_image_bytes or 0 for r in runs) / sum(r.estimate.images for r in runs)
        scaled = [r for r in rows if r.run is None and (r.config.method, r.config.colors) == (method, colors)]
        for r in scaled:
            r.estimate, r.calibration = r.estimate.scaled(factor), factor
            r.fits = r.estimate.upper <= budget
        if scaled:
            notes.append(f"{method} at {f'K={colors}' if colors else 'full colour'}: image estimates of unmeasured "
                         f"configurations scaled x{factor:.3f}, the image bytes its {len(runs)} run(s) store over "
                         f"their real-image estimate")
    return notes


def plan_table(plan: Plan) -> list[str]:
    """The plan as markdown lines (what ``decoct plan`` prints and writes to ``plan.md``)."""
    lines = [f"plan: {plan.family} on {plan.dataset}, budget {plan.budget:,} B ({format_bytes(plan.budget)}); "
             f"bytes estimated from {plan.sample.sample} real images per class encoded as the artifact stores them; "
             f"fits = estimate + {FIT_SIGMAS:g} sd <= budget", "",
             "| # | configuration | est. bytes (images + labels) | fits | accuracy (%) | actual bytes | "
             "est. error | run |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(plan.rows, 1):
        e = r.estimate
        est = f"{e.total:,.0f} ± {e.images_sd:,.0f}" + (f" ({e.images:,.0f} + {e.labels:,})" if e.labels else "")
        if r.calibration is not None:
            est += f", images x{r.calibration:.2f} from runs"
        acc = (f"{100 * r.accuracy:.2f} ± {100 * (r.accuracy_std or 0):.2f} ({r.protocol})" if r.accuracy is not None
               else ("unmeasured" if r.run is None else f"not evaluated ({r.protocol})"))
        actual = f"{r.actual_bytes:,}" if r.actual_bytes is not None else "–"
        err = f"{100 * r.error:+.1f}%" if r.error is not None else "–"
        fits = "yes" if r.fits else "no"
        if r.actual_bytes is not None and not r.fits:
            fits += " (run over budget)"
        lines.append(f"| {i} | {r.config.describe()} | {est} | {fits} | {acc} | {actual} | {err} | {r.run or '–'} |")
    errs = [abs(r.error) for r in plan.rows if r.error is not None]
    if errs:
        lines += ["", f"estimate vs the artifacts' bytes on disk over {len(errs)} run(s): mean |error| "
                      f"{100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%"]
    lines += [f"note: {n}" for n in plan.notes]
    return lines


# ------------------------------------------------------------------------------------------ sweep
@dataclass
class SweepOptions:
    """What the sweep passes to the normal commands."""

    out: Path
    dataset: str
    protocol: str = "fast"
    eval_runs: int = 3
    eval_epochs: int | None = None
    eval_model: str | None = None
    baseline: str | None = None
    iterations: int | None = None
    teacher: str | None = None
    label_batch: int | None = None
    palette_warmup: int = 0
    """``distill dm --palette-warmup`` of autopalette-dm configurations (0: none; DM's palette then collapses)."""
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)


def default_palette_warmup(train_images: int, batch: int = 64) -> int:
    """Two epochs of the training set at ``batch`` real images per step: the AutoPalette code's
    ``--use_warmup`` and decoct's AutoPalette-DM presets (1563 steps on CIFAR's 50,000 images)."""
    return math.ceil(2 * train_images / batch)


def _common_flags(o: SweepOptions) -> list[str]:
    flags = ["--device", o.device, "--no-progress"]
    return flags + (["--data-root", o.data_root] if o.data_root else [])


def build_steps(cfg: PlanConfig, o: SweepOptions) -> list[tuple[Path, list[str]]]:
    """The commands that build a configuration: (run directory, ``decoct`` argv) in order, the last one
    the configuration's own run ``out/<slug>``; shared sources (the set before median cut or before a
    label store) live in ``out/_sources/<slug>`` and are built once for every configuration that needs them."""
    src_dir = o.out / SOURCES
    final = o.out / cfg.slug()
    img_final = final if cfg.labels == "hard" else src_dir / cfg.image_slug()
    common = _common_flags(o)
    seed = ["--seed", str(o.seed)]
    ds = ["--dataset", o.dataset]
    steps: list[tuple[Path, list[str]]] = []
    m = cfg.method
    if cfg.family == "coreset":
        if cfg.colors:
            src = src_dir / PlanConfig(cfg.family, m, cfg.ipc, cfg.ipc).slug()
            steps.append((src, ["select", m, *ds, "--ipc", str(cfg.ipc), "--out", str(src), *seed, *common]))
            steps.append((img_final, ["quantize", str(src), "--colors", str(cfg.colors), "--out", str(img_final),
                                      *seed, *common]))
        else:
            steps.append((img_final, ["select", m, *ds, "--ipc", str(cfg.ipc), "--out", str(img_final), *seed,
                                      *common]))
    elif cfg.family == "matching":
        it = ["--iterations", str(o.iterations)] if o.iterations else []
        extra = o.extra.get("dm", [])
        if m == "dm+mediancut":
            src = src_dir / PlanConfig(cfg.family, "dm", cfg.ipc, cfg.ipc).slug()
            steps.append((src, ["distill", "dm", *ds, "--ipc", str(cfg.ipc), *it, "--out", str(src), *seed, *extra,
                                *common]))
            steps.append((img_final, ["quantize", str(src), "--colors", str(cfg.colors), "--out", str(img_final),
                                      *seed, *common]))
        else:
            pal = ["--palette", str(cfg.colors)] if m == "autopalette-dm" else []
            if pal and o.palette_warmup:
                pal += ["--palette-warmup", str(o.palette_warmup)]
            ipc = cfg.base_ipc if m == "autopalette-dm" else cfg.ipc
            steps.append((img_final, ["distill", "dm", *ds, "--ipc", str(ipc), *pal, *it, "--out", str(img_final),
                                      *seed, *extra, *common]))
    else:
        if not o.teacher:
            raise ValueError("--sweep of the decoupled family needs --teacher DIR (decoct squeeze)")
        it = ["--iterations", str(o.iterations)] if o.iterations and m != "rded" else []
        steps.append((img_final, ["distill", m, "--teacher", o.teacher, *ds, "--ipc", str(cfg.ipc), *it, "--out",
                                  str(img_final), *seed, *o.extra.get(m, []), *common]))
    if cfg.labels == "soft":
        if not o.teacher:
            raise ValueError("--sweep of soft-label configurations needs --teacher DIR (decoct squeeze)")
        prune = ["--prune", str(cfg.prune)] if cfg.prune > 1 else []
        batch = ["--batch-size", str(o.label_batch)] if o.label_batch else []
        steps.append((final, ["relabel", str(img_final), "--teacher", o.teacher, "--epochs", str(cfg.label_epochs),
                              *batch, *prune, *label_format(cfg.label_format).relabel_flags, "--out", str(final),
                              "--seed", str(o.seed), *common]))
    return steps


def eval_step(cfg: PlanConfig, o: SweepOptions, run: Path | None = None) -> list[str]:
    """The ``decoct evaluate`` argv that measures a built configuration (``run``: default ``out/<slug>``)."""
    run = run if run is not None else o.out / cfg.slug()
    argv = ["evaluate", str(run), "--protocol", protocol_for(cfg, o.protocol), "--runs", str(o.eval_runs),
            "--seed", str(o.seed)]
    if o.eval_epochs:
        argv += ["--epochs", str(o.eval_epochs)]
    if o.eval_model:
        argv += ["--model", o.eval_model]
    if o.baseline:
        argv += ["--baseline", o.baseline]
    return argv + _common_flags(o)


def _run_done(path: Path) -> bool:
    return (path / "DONE").exists()


def sweep(plan: Plan, o: SweepOptions, runner: Callable[[list[str]], int],
          log: Callable[[str], None] = print) -> list[list[str]]:
    """Build and evaluate every listed configuration that fits and has no accuracy yet.

    Each step is skipped when its run directory is finished (``DONE``); an unfinished one is continued
    with ``--resume``; an evaluation whose result file is partial is resumed the same way. ``runner``
    runs one ``decoct`` argv (the CLI passes :func:`decoct.cli.main`, so every step is the normal
    command); a non-zero exit stops the sweep with the command in the error. Returns the argvs that ran.
    """
    ran: list[list[str]] = []

    def run(argv: list[str]) -> None:
        log("$ decoct " + shlex.join(argv))
        code = runner(argv)
        ran.append(argv)
        if code != 0:
            raise RuntimeError(f"sweep: `decoct {shlex.join(argv)}` exited with {code}; fix the cause and rerun "
                               "the same plan command (finished runs are kept)")

    todo = [r for r in plan.rows if r.fits and r.accuracy is None]
    for r in todo:
        final = Path(r.run) if r.run is not None else o.out / r.config.slug()  # a built run is evaluated in place
        if r.run is None:
            for path, argv in build_steps(r.config, o):
                if _run_done(path):
                    continue
                run(argv + (["--resume"] if path.exists() and any(path.iterdir()) else []))
        proto = protocol_for(r.config, o.protocol)
        if eval_result(final, proto, o.eval_model) is None:
            partial = False
            for f in eval_files(final, proto, o.eval_model):
                try:
                    partial = partial or bool(json.loads(f.read_text()).get("partial"))
                except (OSError, ValueError):
                    pass
            run(eval_step(r.config, o, final) + (["--resume"] if partial else []))
    return ran


def write_plan(plan: Plan, out: Path) -> tuple[Path, Path]:
    """``plan.json`` (every row, machine-readable) and ``plan.md`` (the table) in ``out``."""
    from decoct.runtime.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "plan.json", plan.to_dict())
    atomic_write_text(out / "plan.md", "\n".join(plan_table(plan)) + "\n")
    return out / "plan.json", out / "plan.md"


__all__ = ["BUDGET_UNITS", "FAMILIES", "ImageBytes", "LABEL_FORMAT_RE", "LabelFormat", "Plan", "PlanConfig",
           "PlanRow", "SOURCES", "SweepOptions", "build_steps", "calibrate", "default_palette_warmup", "config_of_run",
           "enumerate_configs", "estimate", "eval_files", "eval_result", "find_runs", "format_bytes", "fp16_store_bytes",
           "label_format", "make_plan", "measure_image_bytes", "parse_budget", "plan_table", "sweep",
           "write_plan"]
