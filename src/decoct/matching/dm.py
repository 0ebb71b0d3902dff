"""Distribution matching (DM, Zhao & Bilen, WACV 2023) over an ``ImageParam`` (pixels or palette).

Each iteration:

1. a freshly initialised ConvNet (the evaluation protocol's ConvNet for the image size: D3 at
   32x32, width 128, instance norm), drawn from the global torch RNG so that resume is exact;
   its parameters are frozen, it only embeds;
2. per class c, ``batch_real`` random real images of c (all of them when the class is smaller,
   as the original DM) and every synthetic image of c;
3. one DSA draw per class (a seed from the global RNG), applied to the class's real *and* synthetic
   images: the siamese augmentation of the original DM. AutoPalette's ``dm_quant.py`` draws
   independently for real and synthetic; we keep DM's shared draw (docs/methods/dm.md, Where decoct
   departs from the paper or the released code);
4. ``L = sum_c || mean_i f(real_c,i) - mean_j f(syn_c,j) ||^2`` with f the penultimate features.
   Normalisation: the original DM's *sum* over classes (its lr_img = 1 is calibrated to it);
   AutoPalette's DM code divides by the number of classes (a x1/C smaller step at the same lr);
5. SGD on the parameterisation (lr_img 1, momentum 0.5; 10 at IPC 50 with a palette, AutoPalette
   Table 9), after ``param.aux_loss`` (AutoPalette's L_m, L_b, L_a; ``None`` for pixels) has been
   back-propagated into the same gradients.

Speed (docs/methods/dm.md, Where decoct departs from the paper or the released code), without
changing the estimator:

* the real images never need gradients: they are embedded under ``torch.no_grad`` in chunks of
  ``real_chunk`` images (``0`` = auto: :func:`real_chunk_for`, a rule on sizes and the device's
  memory, never on timing, so two runs of one seed compute the same chunks; kept in the checkpoint).
  Convolution kernels round differently per batch size, so the chunk is part of what a run is
  (a run-identity key, like the seed): two chunk sizes give results equal up to float32 rounding;
* the synthetic images of *all* classes go through the net in one forward (instance norm is per
  sample, so this equals the per-class forwards) and one backward;
* class means are segment sums (a one-hot matmul), not a Python loop over classes; the real batch
  is drawn for all classes at once (``topk`` of random keys on a padded class table);
* ``channels_last`` (default on: faster for ConvNet with GroupNorm on CPU and GPU) and bf16
  autocast (``amp``, default on for CUDA only: on CPUs without native bf16 it is ~20x slower);
  the class means and the loss are always float32;
* ``compile`` (off by default; ``benchmarks/bench_dm.py`` measures it against eager): the embedding
  goes through ``torch.compile`` (inductor), which fuses each instance norm with its ReLU and
  pooling into the conv output's passes. One net is compiled once; every iteration copies a fresh
  draw's weights into it, so the RNG use (and resume) are those of the eager path. Fused reductions
  round differently from the eager kernels: results equal up to float32 rounding.

What stays a Python loop over classes: the DSA calls (one draw per class picks a different
augmentation family, so they cannot share one call); they are cheap element-wise ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decoct.augment import DSA, ZCA
from decoct.augment.dsa import DEFAULT_STRATEGY, parse_strategy
from decoct.data import Dataset, normalize
from decoct.formats.artifact import DistilledSet
from decoct.methods.base import METHODS
from decoct.models import model_for
from decoct.runtime.health import check_saturation, check_tensors, rerun_hint

INITS = ("real", "noise", "graphcut")
PALETTE_RECIPES = ("paper", "authors-code")
"""AutoPalette-DM variants (``--palette-recipe``; docs/methods/autopalette.md, AutoPalette-DM: paper or code).

``paper``: what the paper's text describes: hard labels, DM's siamese DSA, the stored and evaluated
images are the hard-quantised K-colour images. ``authors-code``: what the authors' ``dm_quant.py``
does: fixed soft labels = the logits of one trajectory expert (expert 0 at its final epoch, the
first trajectory of TM's expert buffer) on the initial, un-quantised images; DSA drawn
independently for the real and the synthetic images; the images evaluated (and so stored here)
are the un-quantised optimised pixels, not the palette images."""
PRESET_ITERATIONS = 20000
"""DM's iteration count in the paper (``main_DM.py``: ``Iteration=20000``) for every setting."""


# ------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------
def class_sums(emb: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class sum of ``emb`` (N, D) under ``labels`` (N,) -> (num_classes, D), float32.

    A one-hot matmul: on CPU ``index_add_`` measured ~8x slower for 512 x 512 embeddings.
    """
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    return onehot.T @ emb.float()


def class_means(emb: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean of ``emb`` (N, D) under ``labels`` (N,) -> (num_classes, D), float32.

    Classes without a sample get a zero row.
    """
    counts = torch.bincount(labels, minlength=num_classes).clamp_(min=1).to(emb.device, torch.float32)
    return class_sums(emb, labels, num_classes) / counts[:, None]


def dm_loss(real_means: Tensor, syn_means: Tensor) -> Tensor:
    """``sum_c ||real_means[c] - syn_means[c]||^2`` (original DM: summed over classes)."""
    return (real_means.float() - syn_means.float()).pow(2).sum()


def dm_loss_reference(embed: Any, real: list[Tensor], syn: list[Tensor], seeds: list[int] | None = None,
                      augment: Any = None) -> Tensor:
    """The plain per-class loop of the original DM (tests and the speed benchmark's baseline).

    ``real[c]`` and ``syn[c]`` are class c's images; class c is augmented with ``seeds[c]``
    (``augment(x, seed)``), embedded separately, and the squared mean distance summed.
    """
    loss = torch.zeros(())
    for c, (xr, xs) in enumerate(zip(real, syn, strict=True)):
        if augment is not None and seeds is not None:
            xr, xs = augment(xr, seeds[c]), augment(xs, seeds[c])
        out_r = embed(xr).detach()
        out_s = embed(xs)
        loss = loss.to(out_s.device) + ((out_r.mean(0) - out_s.mean(0)) ** 2).sum()
    return loss


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass
class DMConfig:
    """Hyper-parameters of a DM run; names are the CLI flags (``--batch-real`` -> ``batch_real``).

    ``palette_flags``: the AutoPalette flags by their argparse names (``palette_init``,
    ``lr_palette``, ``palette_alpha``, ...), as :func:`decoct.matching.palette.add_palette_args` defines
    them; turned into parameterisation and init options by ``decoct.matching.palette``. ``lr_img`` None
    means the paper's value (:attr:`resolved_lr_img`); ``amp`` / ``channels_last`` None mean the
    per-device default (:func:`resolve_speed_flags`); ``real_chunk`` 0 means :func:`real_chunk_for`;
    ``compile`` runs the embedding through ``torch.compile`` (see the module docstring).
    """

    ipc: int = 10
    iterations: int = PRESET_ITERATIONS
    batch_real: int = 256
    lr_img: float | None = None
    momentum: float = 0.5
    init: str = "real"
    zca: bool = False
    model: str = "convnet"
    width: int = 128
    norm: str = "instance"
    dsa: str = DEFAULT_STRATEGY
    amp: bool | None = None
    channels_last: bool | None = None
    real_chunk: int = 0
    compile: bool = False
    palette: int = 0
    palette_flags: dict[str, Any] = field(default_factory=dict)
    palette_recipe: str = "paper"
    experts: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("ipc", "iterations", "batch_real", "width"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("real_chunk", "palette"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.lr_img is not None and not self.lr_img > 0:
            raise ValueError(f"lr_img must be > 0, got {self.lr_img}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")
        if self.dsa not in ("", "none"):
            parse_strategy(self.dsa)
        if self.palette_recipe not in PALETTE_RECIPES:
            raise ValueError(f"--palette-recipe must be one of {', '.join(PALETTE_RECIPES)}, "
                             f"got {self.palette_recipe!r}")
        if self.palette_recipe == "authors-code":
            if not self.palette:
                raise ValueError("--palette-recipe authors-code is AutoPalette's DM script and needs --palette K "
                                 "(K > 0); drop it for plain DM")
            if not self.experts:
                raise ValueError("--palette-recipe authors-code labels the images with a trajectory expert's "
                                 "logits and needs --experts DIR (made by: decoct experts --dataset NAME --out DIR)")
        elif self.experts:
            raise ValueError("--experts is used only by --palette-recipe authors-code (the expert's logits become "
                             "the soft labels); drop --experts or add --palette-recipe authors-code")

    @property
    def authors_code(self) -> bool:
        """True for the ``authors-code`` AutoPalette-DM recipe (see :data:`PALETTE_RECIPES`)."""
        return self.palette_recipe == "authors-code"

    @property
    def resolved_lr_img(self) -> float:
        """lr_img, or its default: 1 (DM), 10 at IPC >= 50 with a palette (AutoPalette Table 9)."""
        if self.lr_img is not None:
            return float(self.lr_img)
        return 10.0 if self.palette and self.ipc >= 50 else 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DMConfig:
        """Build from a (resolved CLI) dict, ignoring keys that are not DM hyper-parameters."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_speed_flags(device: torch.device, amp: bool | None, channels_last: bool | None) -> tuple[bool, bool]:
    """Per-device defaults: channels_last on everywhere, bf16 autocast on CUDA only.

    Measured on the 2-core CPU of this project (ConvNet-D3, GroupNorm, 256 images, no grad):
    channels_last ~560-620 img/s against ~430-490 NCHW; bf16 autocast on that CPU is ~20x slower,
    so asking for it there is an error rather than a silent slowdown.
    """
    if amp and device.type != "cuda":
        raise ValueError(f"--amp (bf16 autocast) is supported on CUDA only, got device {device}: "
                         "on CPUs without native bf16 it is about 20x slower")
    return (device.type == "cuda") if amp is None else bool(amp), True if channels_last is None else bool(
        channels_last)


REAL_CHUNK_BUDGET_CPU = 16 * 2**20
"""Bytes of the largest activation map of one real chunk on a CPU: ConvNet width 128 at 32x32 in
float32 gives 32 images (512 at 8x8, 8 at 64x64). Chosen from idle timings on this project's 2-core
CPU (``benchmarks/bench_dm.py``, session 10, RESULTS.md issue 13 point 12): chunks of 16-32 images run a
DM iteration 1.25-1.5x faster than 256 (the earlier default); smaller chunks keep each conv's output
in cache."""
REAL_CHUNK_CAP = {"cpu": 512, "cuda": 4096}
"""Largest chunk per device type (the range the timing autotune chose from)."""


def real_chunk_for(shape: tuple[int, int, int], width: int, device: torch.device | str, *, amp: bool,
                   max_images: int) -> int:
    """Real images per no-grad forward when ``real_chunk`` is 0: a rule on sizes alone.

    The largest power of two whose largest activation map (``max(C, width) x H x W`` values, 2 bytes
    each under bf16 autocast, else 4) fits the budget: :data:`REAL_CHUNK_BUDGET_CPU` on a CPU, 1/32
    of the device's total memory on CUDA (a property of the device, not of its current load),
    capped by :data:`REAL_CHUNK_CAP` and by ``max_images`` (the real images of one iteration).
    The chunk decides the conv kernels' batch size and so the float rounding of the result: it is
    never chosen by timing, which made two runs of one seed write different sets.
    """
    dev = torch.device(device)
    c, h, w = shape
    per_image = max(int(c), int(width)) * int(h) * int(w) * (2 if amp else 4)
    if dev.type == "cuda":
        budget = torch.cuda.get_device_properties(dev).total_memory // 32
    else:
        budget = REAL_CHUNK_BUDGET_CPU
    cap = REAL_CHUNK_CAP["cuda" if dev.type == "cuda" else "cpu"]
    chunk = 1
    while chunk * 2 <= cap and chunk * 2 * per_image <= budget:
        chunk *= 2
    return max(1, min(chunk, int(max_images)))


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------
# the method
def expert_logits(experts: Any, dataset: Dataset, x: Tensor, *, zca: bool, device: torch.device | str = "cpu",
                  chunk: int = 512) -> tuple[Tensor, str]:
    """Logits (N, classes) float32 on the CPU of expert 0 at its final epoch on normalised pixel-space
    images ``x`` (N, C, H, W), whitened first with the experts' own ZCA when they were trained with one.

    AutoPalette's ``dm_quant.py`` (its DM script; autopalette.md §6) loads a TM expert buffer and takes
    the logits of its first trajectory's final parameters on the initial synthetic images as the set's
    labels, fixed during DM and used as soft labels at evaluation; TM's ``--soft-labels`` starts from the
    same expert (:class:`decoct.matching.tm.TrajectoryMatching`). ``experts``: a directory or an
    :class:`~decoct.formats.expert_set.ExpertSet`; it must fit ``dataset`` and ``zca`` (else
    :class:`~decoct.formats.expert_set.ExpertMismatchError`, a ValueError). Returns the logits and the
    experts' path (recorded in the set's meta).
    """
    from decoct.formats.expert_set import ExpertMismatchError, ExpertSet, load_experts
    from decoct.models.flat_params import FlatParams

    es = experts if isinstance(experts, ExpertSet) else load_experts(experts)
    try:
        es.check(dataset.info, zca=zca)
    except ExpertMismatchError as e:  # one line for the CLI: what differs, and the command that fits
        raise ExpertMismatchError(" ".join(line.strip() for line in str(e).splitlines())) from None
    dev = torch.device(device)
    net = FlatParams(es.build_model().to(dev))
    net.model.train()  # as TM's soft-label init (instance norm: train and eval agree)
    final = es.params(0, [es.epochs])[0].to(dev)
    ezca = es.zca.to(dev) if es.zca is not None else None
    out = []
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            xb = x[s:s + chunk].to(dev).float()
            out.append(net(final, ezca.transform(xb) if ezca is not None else xb).float().cpu())
    return torch.cat(out), str(es.path)


# ------------------------------------------------------------------------------------------
class DistributionMatching:
    """DM as a :mod:`decoct.methods.base` method over an ``ImageParam`` (pixels or palette)."""

    name = "dm"

    def __init__(self, config: DMConfig | dict[str, Any]) -> None:
        self.cfg = config if isinstance(config, DMConfig) else DMConfig.from_dict(config)
        self.iterations = int(self.cfg.iterations)
        self.real_chunk: int | None = self.cfg.real_chunk or None
        self._net: nn.Module | None = None  # with compile: the one net the compiled embedding runs
        self._compiled: Any = None

    # --- set-up -----------------------------------------------------------------------------
    def init(self, dataset: Dataset, device: torch.device) -> None:
        from decoct.matching.palette import (
            effective_ipc,
            init_indices,
            init_options,
            make_param,
            palette_options,
        )

        cfg = self.cfg
        dev = torch.device(device)
        self.amp, self.channels_last = resolve_speed_flags(dev, cfg.amp, cfg.channels_last)
        info = dataset.info
        self.info, self.device, self.num_classes = info, dev, info.num_classes
        self.lr_img = cfg.resolved_lr_img

        # real data: uint8 on the device, normalised per batch (ZCA runs keep the whitened floats)
        train = dataset.train
        self.zca: ZCA | None = None
        if cfg.zca:
            x_all = normalize(train.images, info, dev)
            self.zca = ZCA().fit(x_all, input_mean=info.mean, input_std=info.std)  # on [0, 1] pixels, as the references
            self.real_float: Tensor | None = self.zca.transform(x_all)
            self.real_u8: Tensor | None = None
            del x_all
        else:
            self.real_float = None
            self.real_u8 = train.images.to(dev)
        mean = torch.tensor(info.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=dev).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        sizes = torch.stack([(train.labels == c).sum() for c in range(self.num_classes)])
        if int(sizes.min()) == 0:
            raise ValueError(f"class {int(sizes.argmin())} of {info.name} has no training images")
        self.class_sizes = sizes
        nmax = int(sizes.max())
        table = torch.zeros(self.num_classes, nmax, dtype=torch.long)
        for c in range(self.num_classes):
            idx = train.class_indices(c)
            table[c, : len(idx)] = idx
        self.table = table
        self.pad = torch.arange(nmax)[None, :] >= sizes[:, None]  # (C, nmax) True where padding

        # synthetic set
        flags = {**cfg.palette_flags, "palette": cfg.palette, "init": cfg.init}
        self.ipc_eff = effective_ipc(cfg.ipc, cfg.palette)
        if cfg.init == "noise":
            labels = torch.arange(self.num_classes).repeat_interleave(self.ipc_eff)
            g = torch.Generator().manual_seed(int(cfg.seed))
            x0 = torch.randn(len(labels), *info.image_shape, generator=g).to(dev)
            self.init_source: list[int] | None = None
            self.init_method = "noise"
        else:
            idx = init_indices(dataset, self.ipc_eff, cfg.palette, seed=int(cfg.seed), device=dev,
                               **init_options(flags)).cpu()
            self.init_source = idx.tolist()
            self.init_method = init_options(flags).get("method", cfg.init)
            labels = train.labels[idx]
            x0 = self._real_batch(idx.to(dev))
        popts = palette_options(flags, info=info) if cfg.palette else {}
        self.param = make_param(x0, labels, self.zca, cfg.palette, **popts).to(dev)
        self.palette_flags, self.num_train = flags, len(train)
        self.soft_labels: Tensor | None = None
        self.experts_path: str | None = None
        if cfg.authors_code:  # fixed soft labels: an expert's logits on the initial, un-quantised images
            x_px = (normalize(train.images[idx], info, dev) if self.init_source is not None
                    else (self.zca.inverse(x0) if self.zca is not None else x0))
            self.soft_labels, self.experts_path = expert_logits(cfg.experts, dataset, x_px, zca=cfg.zca, device=dev)
        self.warmup_metrics: dict[str, float] = {}
        self.opts = self.param.optimizers(lr_img=self.lr_img, momentum=cfg.momentum,
                                          lr_palette=popts.get("lr_palette"))
        syn_labels = self.param.labels.cpu()
        self.syn_index = [(syn_labels == c).nonzero().flatten() for c in range(self.num_classes)]
        if any(len(i) == 0 for i in self.syn_index):
            raise ValueError("every class needs at least one synthetic image")
        order = torch.cat(self.syn_index)
        self.syn_counts = [len(i) for i in self.syn_index]
        self.syn_order = order.to(dev)
        self.syn_sorted_labels = syn_labels[order].to(dev)
        self.dsa = DSA(cfg.dsa) if cfg.dsa not in ("", "none") else None
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        with torch.random.fork_rng(devices=[]):  # the probe net must not shift the seeded run
            probe = model_for(cfg.model, info, width=cfg.width, norm=cfg.norm)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules()):
            raise ValueError(f"DM embeds all classes (and chunks of real images) in shared forwards, which equals "
                             f"the per-class forwards only for per-sample norms; --model {cfg.model} "
                             f"--norm {cfg.norm} has batch norm. Use --norm instance (the paper's) or none")
        self.feature_dim = int(getattr(probe, "feature_dim", 0)) or int(
            probe.embed(torch.zeros(1, *info.image_shape)).shape[1])
        if self.real_chunk is None:  # from sizes alone: the real images of one iteration, the net, the device
            self.real_chunk = real_chunk_for(info.image_shape, cfg.width, dev, amp=self.amp,
                                             max_images=int(sizes.clamp(max=cfg.batch_real).sum()))
        if cfg.compile:  # built once, off the seeded RNG stream; _new_net copies each fresh draw into it
            with torch.random.fork_rng(devices=[]):
                self._net = self._prepare_net(model_for(cfg.model, info, width=cfg.width, norm=cfg.norm))

    def _new_net(self) -> nn.Module:
        """A fresh frozen embedding net, initialised from the global CPU RNG (device independent).

        With ``compile`` the fresh draw's weights are copied into the one compiled net: the same RNG
        use and the same weights as the eager path, and no recompilation per iteration.
        """
        cfg = self.cfg
        net = model_for(cfg.model, self.info, width=cfg.width, norm=cfg.norm)
        if self._net is not None:
            with torch.no_grad():
                for dst, src in zip(self._net.state_dict().values(), net.state_dict().values(), strict=True):
                    dst.copy_(src)
            return self._net
        return self._prepare_net(net)

    def _prepare_net(self, net: nn.Module) -> nn.Module:
        """Frozen, train mode (per-sample norms: no running statistics), on the device, in the memory format."""
        net = net.to(self.device).requires_grad_(False)
        net.train()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def _embed(self, net: nn.Module, x: Tensor) -> Tensor:
        """``net.embed(x)``; through the compiled embedding when ``compile`` is on and ``net`` is its net.

        A compiler failure (no C++ compiler, an unsupported op) is re-raised as one RuntimeError line
        naming ``--compile``, the CLI's exit 2.
        """
        if self._net is None or net is not self._net:
            return net.embed(x)
        if self._compiled is None:  # wrapped at first use: importing the compiler costs seconds
            self._compiled = torch.compile(self._net.embed, dynamic=False)
        try:
            return self._compiled(x)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise RuntimeError(f"--compile: torch.compile of the embedding failed on {self.device} "
                               f"({type(e).__name__}: {first}); run without --compile") from e

    def _real_batch(self, idx: Tensor) -> Tensor:
        """Normalised (and whitened) real images at training-set indices ``idx`` (on the device)."""
        if self.real_float is not None:
            return self.real_float[idx]
        return self.real_u8[idx].float() * self._scale + self._shift  # type: ignore[index]

    def sample_real(self) -> tuple[Tensor, Tensor]:
        """``batch_real`` random training indices per class (all of a smaller class), from the global RNG.

        Returns (indices (M,), labels (M,)) grouped class by class.
        """
        c, nmax = self.table.shape
        keys = torch.rand(c, nmax)
        keys.masked_fill_(self.pad, 2.0)
        k = min(self.cfg.batch_real, nmax)
        pos = keys.topk(k, dim=1, largest=False).indices
        valid = keys.gather(1, pos) < 2.0
        idx = self.table.gather(1, pos)[valid]
        labels = torch.arange(c)[:, None].expand(c, k)[valid]
        return idx, labels

    def _forward_chunks(self, net: nn.Module, pieces: Iterable[tuple[Tensor, int]], sums: Tensor) -> None:
        """Embed the (image, class) pieces in chunks of ``real_chunk`` and add into per-class sums."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        chunk = int(self.real_chunk or 256)
        buf: list[Tensor] = []
        lab: list[Tensor] = []
        n = 0

        def flush(size: int) -> None:
            nonlocal buf, lab, n
            x = torch.cat(buf) if len(buf) > 1 else buf[0]
            y = torch.cat(lab) if len(lab) > 1 else lab[0]
            xb, yb = x[:size].contiguous(memory_format=fmt), y[:size]
            with _autocast(self.device, self.amp):
                emb = self._embed(net, xb)
            sums.add_(class_sums(emb, yb, self.num_classes))
            buf, lab, n = ([x[size:]], [y[size:]], n - size) if n > size else ([], [], 0)

        for x, c in pieces:
            buf.append(x)
            lab.append(torch.full((len(x),), c, dtype=torch.long, device=x.device))
            n += len(x)
            while n >= chunk:
                flush(chunk)
        if n:
            flush(n)

    def real_means(self, net: nn.Module, idx: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        """Mean embedding of each class's augmented real batch, (C, D) float32, no graph.

        Classes are augmented one at a time as the chunked forward consumes them, so memory holds
        about one chunk plus one class batch, whatever the number of classes.
        """
        dev = self.device
        counts = torch.bincount(labels, minlength=self.num_classes)
        ends = torch.cumsum(counts, 0).tolist()

        def pieces():
            for c in range(self.num_classes):
                x = self._real_batch(idx[ends[c] - int(counts[c]): ends[c]].to(dev))
                yield (self.dsa(x, seed=seeds[c]) if self.dsa is not None else x), c

        with torch.no_grad():
            sums = torch.zeros(self.num_classes, self.feature_dim, device=dev)
            self._forward_chunks(net, pieces(), sums)
        return sums / counts.to(dev, torch.float32).clamp(min=1)[:, None]

    def syn_means(self, net: nn.Module, x: Tensor, seeds: list[int]) -> Tensor:
        """Mean embedding of each class's augmented synthetic images: ONE forward for all classes."""
        parts = x[self.syn_order].split(self.syn_counts)
        if self.dsa is not None:
            parts = [self.dsa(xc, seed=seeds[c]) for c, xc in enumerate(parts)]
        xs = torch.cat(parts)
        if self.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.amp):
            emb = self._embed(net, xs)
        return class_means(emb, self.syn_sorted_labels, self.num_classes)

    # --- one iteration ----------------------------------------------------------------------
    def step(self, it: int) -> dict[str, float]:
        net = self._new_net()
        seeds = torch.randint(0, 2**31 - 1, (self.num_classes,)).tolist()
        # authors-code: dm_quant.py draws the synthetic images' DSA independently of the real ones'
        syn_seeds = torch.randint(0, 2**31 - 1, (self.num_classes,)).tolist() if self.cfg.authors_code else seeds
        idx, labels = self.sample_real()
        real = self.real_means(net, idx, labels, seeds)
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        syn = self.syn_means(net, self.param(), syn_seeds)
        loss = dm_loss(real, syn)
        if self.cfg.palette:
            # AutoPalette's DM divides by the number of classes and its image/palette learning rates
            # (Table 9) are tuned for that scale; with the plain sum the palette net's first step is
            # 10x too large and it collapses to ~2 colours (measured on CIFAR-10, K=64).
            loss = loss / self.num_classes
        loss.backward()
        metrics = {"loss": float(loss.detach())}
        aux, aux_metrics = self.param.aux_loss(self.gen)
        if aux is not None:
            aux.backward()
        metrics.update({k: float(v) for k, v in aux_metrics.items()})
        for opt in self.opts.values():
            opt.step()
        return metrics

    # --- validity (decoct.runtime.health; run_method calls check after every step) ------------------
    @property
    def divergence_hint(self) -> str:
        """What to change when the run diverges: the learning rates of what DM optimises."""
        flags: list[tuple[str, Any]] = [("--lr-img", self.lr_img)]
        if self.cfg.palette:
            flags.append(("--lr-palette", self.opts["palette"].param_groups[0]["lr"]))
        return rerun_hint(*flags)

    def check(self, it: int) -> None:
        """The learned tensors are finite after step ``it``; every 10 steps (and the last) the pixels
        are not mostly saturated (an exploding image lr drives them far outside [0, 1])."""
        where = f"iteration {it + 1}"
        check_tensors(((f"synthetic {n}", t.detach()) for n, t in self.param.named_parameters()), "dm", where,
                      self.divergence_hint)
        if (it + 1) % 10 == 0 or it + 1 == self.iterations:
            check_saturation(self.param, self.info, "dm", where, self.divergence_hint)

    # --- resume -----------------------------------------------------------------------------
    def warm_start(self, show_progress: bool = False) -> dict[str, float]:
        """The palette network's optional warm-up on real batches (``palette_warmup``; see
        :func:`decoct.matching.palette.warmup_palette`); {} when off. Fresh runs only (see methods.base)."""
        from decoct.matching.palette import warmup_palette

        self.warmup_metrics = warmup_palette(self.param, self.palette_flags, self.num_train,
                                             lambda i: self._real_batch(i.to(self.device)), seed=int(self.cfg.seed),
                                             show_progress=show_progress)
        return self.warmup_metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "param": {k: v.detach().cpu().clone() for k, v in self.param.state_dict().items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "gen": self.gen.get_state(),
            "real_chunk": int(self.real_chunk or 0),
            "warmup_metrics": dict(self.warmup_metrics),
            "soft_labels": None if self.soft_labels is None else self.soft_labels.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param.load_state_dict(state["param"])
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        self.gen.set_state(state["gen"])
        self.real_chunk = int(state.get("real_chunk", 0)) or self.real_chunk
        self.warmup_metrics = dict(state.get("warmup_metrics", {}))
        if state.get("soft_labels") is not None:  # the labels the run started with (fixed), not recomputed
            self.soft_labels = state["soft_labels"].clone()

    # --- output -----------------------------------------------------------------------------
    def result(self) -> DistilledSet:
        cfg = self.cfg
        config = dict(asdict(cfg), lr_img=self.lr_img)
        siamese = ("DSA, one draw per class shared by real and synthetic (siamese, original DM; "
                   "AutoPalette's code draws independently)")
        meta = dict(ipc=cfg.ipc, images_per_class=self.ipc_eff, lr_img=self.lr_img, amp=self.amp,
                    channels_last=self.channels_last, real_chunk=int(self.real_chunk or 0),
                    loss=("mean" if cfg.palette else "sum") + " over classes of ||mean f(real_c) - mean f(syn_c)||^2 "
                         "(sum: original DM; mean: AutoPalette's DM, whose learning rates assume it)",
                    augmentation=siamese if not cfg.authors_code else
                    "DSA, independent draws per class for real and synthetic (AutoPalette's dm_quant.py)",
                    embed_net=dict(model=cfg.model, width=cfg.width, norm=cfg.norm, fresh_each_iteration=True),
                    labels="hard" if self.soft_labels is None else "soft",
                    zca=self.zca is not None, init=self.init_method,
                    init_indices=self.init_source, palette_warmup_end=self.warmup_metrics or None)
        if not cfg.palette:
            return self.param.to_set(self.info, method="dm", config=config, meta=meta)
        meta["autopalette_dm"] = autopalette_dm_record(cfg.palette_recipe, cfg.palette, self.experts_path)
        if not cfg.authors_code:
            return self.param.to_set(self.info, method="dm", config=config, meta=meta)
        return self._unquantized_set(config, meta)

    def _unquantized_set(self, config: dict[str, Any], meta: dict[str, Any]) -> DistilledSet:
        """The authors-code artifact: the un-quantised optimised pixels (ZCA undone) as 8-bit RGB PNGs,
        the expert's logits as soft labels (float16, ``labels/soft.safetensors``), the ZCA attached.

        What ``decoct evaluate`` trains on is what is stored and counted: full-colour images (the palette
        network is not applied), so the bytes are those of IPC x 2^(8 - ceil(log2 K)) full-colour images
        per class plus the soft labels, not the paper's K-colour budget. ``meta.palette`` still records
        K and the budget rule the run was distilled under.
        """
        from decoct.matching.palette.palette_param import index_bits, palette_budget

        param, info = self.param, self.info
        bits = index_bits(self.cfg.palette)
        c, h, w = info.image_shape
        meta["palette"] = {"colors": self.cfg.palette, "index_bits_per_image": h * w * bits,
                           "palette_bits_per_image": self.cfg.palette * c * 8, "paper_factor": 2 ** (8 - bits),
                           "zca_palette_space": "pixel" if self.zca is not None else None,
                           "budget": palette_budget(self.cfg.ipc, self.cfg.palette, info.image_shape),
                           "stored": "un-quantised pixels (authors-code recipe): the palette network is not applied"}
        x = param.images.detach()
        x = (self.zca.inverse(x) if self.zca is not None else x).cpu()
        attachments = {"zca": self.zca.state_dict()} if self.zca is not None else {}
        return DistilledSet.from_float(info, x, param.labels.cpu(), soft_labels=self.soft_labels, method="dm",
                                       config=config, meta=meta, attachments=attachments)


def autopalette_dm_record(recipe: str, colors: int, experts: str | None = None) -> dict[str, Any]:
    """What an AutoPalette-DM artifact records in ``meta.autopalette_dm``: which recipe made it and what
    that means for its labels, augmentation and stored images (``decoct evaluate`` reads it back)."""
    if recipe not in PALETTE_RECIPES:
        raise ValueError(f"unknown AutoPalette-DM recipe {recipe!r}; known: {', '.join(PALETTE_RECIPES)}")
    if recipe == "paper":
        return dict(recipe="paper", labels="hard", augmentation="siamese DSA (one draw per class for real and "
                    "synthetic, original DM)", images=f"hard-quantised {colors}-colour palette images (paper text)")
    return dict(recipe="authors-code", experts=experts,
                labels="soft: logits of expert 0 at its final epoch on the initial un-quantised images, fixed "
                       "(AutoPalette's dm_quant.py)",
                augmentation="DSA drawn independently for real and synthetic (dm_quant.py)",
                images="un-quantised optimised pixels as 8-bit RGB (dm_quant.py evaluates image_syn, not the "
                       f"{colors}-colour images); bytes counted are those of the stored full-colour images")


@METHODS.register("dm")
def _make_dm(config: dict[str, Any]) -> DistributionMatching:
    """Registry factory: ``config`` holds the DM hyper-parameters (see :class:`DMConfig`)."""
    return DistributionMatching(DMConfig.from_dict(config))


def distill_dm(dataset: str | Dataset, out: str | Path, *, config: DMConfig | dict[str, Any] | None = None,
               run_config: dict[str, Any] | None = None, device: str = "auto", data_root: str | None = None,
               download: bool = False, resume: bool = False, force: bool = False, progress: bool = True,
               checkpoint_every: int = 100, stop_after: int | None = None, **options: Any) -> DistilledSet:
    """Distil ``dataset`` by distribution matching into the run directory ``out`` (the Python API).

    ``config``: a :class:`DMConfig` or dict; ``options`` override single fields
    (``distill_dm("digits", "runs/dm", ipc=2, iterations=200)``). ``run_config``: what is saved as
    the run's ``config.yaml`` (the CLI passes its resolved flags). Returns the stored set
    (re-loaded when the run had finished before).
    """
    from decoct.data import load_dataset
    from decoct.matching.palette import effective_ipc
    from decoct.methods.base import run_method
    from decoct.runtime.distributed import resolve_device
    from decoct.runtime.runs import Run

    name = dataset.info.name if isinstance(dataset, Dataset) else str(dataset)
    base = config if isinstance(config, DMConfig) else DMConfig.from_dict(dict(config or {}))
    unknown = sorted(set(options) - {f.name for f in fields(DMConfig)})
    if unknown:
        raise ValueError(f"unknown DM option(s) {unknown}; known: {sorted(f.name for f in fields(DMConfig))}")
    cfg = DMConfig.from_dict({**asdict(base), **options})
    saved = run_config or {"dataset": name, **asdict(cfg)}
    run = Run.open(out, saved, resume=resume, force=force)
    if run.done:
        return DistilledSet.load(run.artifact_dir)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root=data_root, download=download)
    dev = resolve_device(device)
    per_step = data.info.num_classes * (cfg.batch_real + effective_ipc(cfg.ipc, cfg.palette))
    return run_method(DistributionMatching(cfg), run, data, dev, seed=cfg.seed, checkpoint_every=checkpoint_every,
                      show_progress=progress, stop_after=stop_after, images_per_step=per_step)


__all__ = ["DMConfig", "DistributionMatching", "INITS", "PALETTE_RECIPES", "PRESET_ITERATIONS", "autopalette_dm_record",
           "expert_logits", "class_means", "distill_dm", "dm_loss",
           "dm_loss_reference", "real_chunk_for", "resolve_speed_flags"]
