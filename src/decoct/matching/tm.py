"""Trajectory matching (MTT, Cazenavette et al. 2022) with a constant-activation-memory gradient.

Each iteration picks a random expert trajectory (``decoct.formats.expert_set``) and a start epoch
``t ~ U[min_start_epoch, max_start_epoch)``, starts a student at the expert's parameters
``theta_t`` and takes ``N = syn_steps`` SGD steps on minibatches of ``batch_syn`` synthetic images
(DSA-augmented, one fresh draw per step) with a learnable step size ``alpha``::

    theta_{i+1} = theta_i - alpha * g_i,    g_i = grad_theta loss(theta_i; aug_i(x[B_i]), y[B_i])
    L = ||theta_N - theta_{t+M}||^2 / ||theta_t - theta_{t+M}||^2          (M = expert_epochs)

and updates the synthetic images (SGD, ``lr_img``, momentum 0.5) and ``alpha`` (SGD, ``lr_lr``,
momentum 0.5) with dL/dx and dL/dalpha.

Three ways to get those gradients (``grad=``), all on a flat parameter vector through
``torch.func.functional_call``:

* ``unrolled`` — MTT: keep the graph of all N steps (``create_graph``) and back-propagate through
  it. Reference; memory grows linearly with N (activations and double-backward buffers of every
  step).
* ``exact`` (default) — the same gradient, computed by a reverse (adjoint) sweep that rebuilds one
  step's graph at a time. With ``lam_N = dL/dtheta_N = 2 (theta_N - theta*) / D``, for
  ``i = N-1 .. 0``::

      dL/dx     += -alpha * lam_{i+1}^T  d g_i / dx          (vector-Jacobian product)
      dL/dalpha += -lam_{i+1}^T g_i
      lam_i      = lam_{i+1} - alpha * H_i lam_{i+1}         (H_i = d g_i / d theta_i, an HVP)

  (soft labels y get ``-alpha * lam_{i+1}^T d g_i / dy`` like x). Only one step's graph is alive at a
  time, so activation memory does not grow with N. The sweep needs ``theta_i`` in reverse order: it
  keeps a snapshot every ``snapshot_every`` steps from the forward pass and recomputes the steps in
  between (``snapshot_every=1``: all N parameter vectors are kept, no recomputation, N x P floats --
  1.3 MB per step for ConvNet-D3 -- against the unrolled graph's batch x activations per step;
  ``snapshot_every=0``: ceil(sqrt(N)), i.e. about 2 sqrt(N) vectors for one extra forward sweep).
  Equal to ``unrolled`` up to floating-point rounding (tested in float64).
* ``tesla`` — TESLA's identity (Cui et al. 2023, ``justincui03/tesla`` ``distill.py``): a forward
  pass records ``theta_N`` and ``sum_i g_i``; a second forward pass recomputes each ``g_i`` with its
  graph and accumulates ``dL/dx += (2/D) (alpha (theta* - theta_0) + alpha^2 sum_j g_j)^T d g_i/dx``,
  and ``dL/dalpha = -(2/D) (theta_N - theta*)^T sum_j g_j``. Truly constant memory (no snapshots).
  **Assumption**: it treats each ``g_i`` as depending on the images only through its own minibatch,
  i.e. it drops every term that flows through ``theta_i``'s own dependence on the images and on
  alpha (the ``H_j`` Hessian-vector terms above). It is therefore exact only to first order in alpha
  (the dropped terms are O(alpha^2 H)); it is *not* MTT's gradient. Kept because it is what the TESLA
  paper reports numbers with and it needs no parameter snapshots.

Choices where the papers' code is silent or differs (recorded in the run config):

* the step size is a raw scalar (as MTT/TESLA/DATM; not a log-parameter), initialised to
  ``lr_teacher``; nothing keeps it positive, as in MTT;
* inner loss: cross-entropy with hard labels; with ``soft_labels`` (DATM/AutoPalette, off by
  default) learnable logits initialised from the final-epoch parameters of expert 0 on the initial
  images and DATM's soft cross-entropy ``-sum softmax(y) log softmax(out)``, SGD ``lr_labels``,
  momentum 0.9;
* minibatches: a fresh random permutation of the synthetic images split into ``batch_syn`` chunks,
  a new permutation when they run out (MTT); DSA draws per sample, one family per step (MTT's
  non-siamese ``DiffAugment``); each step's indices and seed are stored so every pass replays them;
* DATM options: ``threshold`` (skip the update when the loss is above it; 0 = off),
  ``current_max_start_epoch`` + ``expansion_end_epoch`` (DATM's growing start window; 0 = off),
  ``min_start_epoch``;
* ``lr_decay`` (default: on with ``palette``): AutoPalette's TM schedules
  (docs/methods/autopalette.md, Where decoct departs from the paper or the released code): image lr
  x0.1 once ``iterations // 3`` updates have been *accepted*, palette-network lr x0.1 once
  ``iterations // 2`` have (their LambdaLRs step on accepted iterations only). Computed from the
  accepted count, so a resumed run gets the same rates. Plain MTT/DATM have no image schedule;
  ``lr_decay: true`` without a palette is refused rather than silently doing something the
  AutoPalette code does not;
* not implemented: DATM's correct-sample soft-label init, FTD/GSAM experts.

GPU: ``amp`` runs the student forwards under bf16 autocast (CUDA only; the parameter updates and all
accumulations stay float32, but the matching loss is a small difference of large vectors, so
gradients are noisier -- off by default); ``channels_last`` applies to the student's inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from decoct.augment import DSA
from decoct.augment.dsa import DEFAULT_STRATEGY, MTT_PARAMS, parse_strategy
from decoct.data import Dataset, normalize
from decoct.formats.artifact import DistilledSet
from decoct.formats.expert_set import ExpertSet, experts_command, load_experts
from decoct.methods.base import METHODS
from decoct.models.flat_params import FlatParams
from decoct.runtime.health import DivergedError, check_saturation, check_tensors, rerun_hint

GRAD_MODES = ("exact", "tesla", "unrolled")

Net = Callable[[Tensor, Tensor], Tensor]
"""``net(flat_params, images) -> logits`` (e.g. a :class:`~decoct.models.flat_params.FlatParams`)."""
Augment = Callable[[Tensor, int], Tensor]
"""``augment(images, seed) -> images``: differentiable, the same ``seed`` gives the same draw."""


# ------------------------------------------------------------------------------------------
# the inner problem
# ------------------------------------------------------------------------------------------
def inner_loss(out: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for hard labels (N,); DATM's soft CE ``-sum softmax(t) log softmax(out)`` for
    logits (N, K). Mean over the minibatch (MTT's ``nn.CrossEntropyLoss``)."""
    if out.dtype in (torch.float16, torch.bfloat16):  # autocast logits: the loss in float32
        out = out.float()
    if targets.dim() == 1:
        return F.cross_entropy(out, targets)
    return -(F.softmax(targets.to(out.dtype), dim=-1) * F.log_softmax(out, dim=-1)).sum(-1).mean()


@dataclass
class StepPlan:
    """What synthetic step ``i`` sees: which images (``indices``) and which augmentation (``seed``)."""

    indices: Tensor
    seed: int


def make_plan(num_images: int, syn_steps: int, batch_syn: int, generator: torch.Generator) -> list[StepPlan]:
    """MTT's minibatching: shuffle, cut into ``batch_syn`` chunks, reshuffle when exhausted."""
    if syn_steps < 1 or batch_syn < 1:
        raise ValueError(f"syn_steps and batch_syn must be >= 1, got {syn_steps}, {batch_syn}")
    plan: list[StepPlan] = []
    chunks: list[Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch_syn))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        plan.append(StepPlan(chunks.pop(0), seed))
    return plan


def dsa_augment(strategy: str = DEFAULT_STRATEGY) -> Augment | None:
    """A replayable DSA: per-sample draws from a CPU generator seeded with the step's seed; scale and
    rotate resample with ``align_corners=True`` as MTT's (and DATM's, AutoPalette's) code does."""
    if not parse_strategy(strategy):
        return None
    dsa = DSA(strategy, MTT_PARAMS)

    def aug(x: Tensor, seed: int) -> Tensor:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        return dsa(x, generator=g)

    return aug


@dataclass
class MatchResult:
    """The matching loss and its gradients w.r.t. the images, the step size and soft labels."""

    loss: Tensor
    grad_x: Tensor
    grad_lr: Tensor
    grad_y: Tensor | None
    param_dist: Tensor


class _Steps:
    """Replays the planned synthetic steps: batches, first-order and graph-building gradients."""

    def __init__(self, net: Net, plan: list[StepPlan], augment: Augment | None, amp: bool,
                 channels_last: bool) -> None:
        self.net, self.plan, self.augment = net, plan, augment
        self.amp, self.channels_last = amp, channels_last

    def batch(self, i: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s = self.plan[i]
        idx = s.indices.to(x.device)
        xb = x[idx]
        if self.augment is not None:
            xb = self.augment(xb, s.seed)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, y[idx]

    def grad(self, theta: Tensor, i: int, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
        """``g_i`` at ``theta`` (a leaf requiring grad); with ``create_graph`` its graph is kept."""
        xb, yb = self.batch(i, x, y)
        ctx = torch.autocast(xb.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            out = self.net(theta, xb)
        return torch.autograd.grad(inner_loss(out, yb), theta, create_graph=create_graph)[0]

    def first_order(self, theta: Tensor, i: int, x: Tensor, y: Tensor) -> Tensor:
        """``g_i`` at ``theta`` with no graph kept (forward sweeps)."""
        th = theta.detach().requires_grad_(True)
        return self.grad(th, i, x.detach(), y.detach(), create_graph=False).detach()


def match_gradients(net: Net, theta0: Tensor, target: Tensor, x: Tensor, y: Tensor, lr: Tensor | float,
                    plan: list[StepPlan], *, augment: Augment | None = None, mode: str = "exact",
                    snapshot_every: int = 1, amp: bool = False, channels_last: bool = False) -> MatchResult:
    """Matching loss and its gradients for one expert segment (see the module docstring).

    ``x``: synthetic images (N, C, H, W) in the training space; ``y``: hard labels (N,) or soft
    logits (N, K) (then ``grad_y`` is returned); ``theta0`` / ``target``: expert parameters at
    epochs t and t+M; ``lr``: the synthetic step size. Inputs are not modified and need no grad.
    """
    if mode not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {mode!r}; known: {', '.join(GRAD_MODES)}")
    if theta0.shape != target.shape or theta0.dim() != 1:
        raise ValueError(f"theta0 and target must be flat vectors of one size, got {tuple(theta0.shape)} "
                         f"and {tuple(target.shape)}")
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0 (0 = sqrt(syn_steps)), got {snapshot_every}")
    soft = y.is_floating_point()
    lr_t = torch.as_tensor(lr, dtype=theta0.dtype, device=theta0.device).detach()
    steps = _Steps(net, plan, augment, amp, channels_last)
    theta0, target = theta0.detach(), target.detach()
    dist = (theta0 - target).pow(2).sum()
    if not dist > 0:
        raise ValueError("the expert did not move between the start and target epochs (zero distance)")
    with torch.enable_grad():
        if mode == "unrolled":
            return _unrolled(steps, theta0, target, x, y, lr_t, dist, soft)
        if mode == "tesla":
            return _tesla(steps, theta0, target, x, y, lr_t, dist, soft)
        return _exact(steps, theta0, target, x, y, lr_t, dist, soft, snapshot_every)


def _unrolled(steps: _Steps, theta0: Tensor, target: Tensor, x: Tensor, y: Tensor, lr: Tensor,
              dist: Tensor, soft: bool) -> MatchResult:
    x_leaf = x.detach().requires_grad_(True)
    y_leaf = y.detach().requires_grad_(True) if soft else y
    lr_leaf = lr.clone().requires_grad_(True)
    theta = theta0.clone().requires_grad_(True)
    for i in range(len(steps.plan)):
        g = steps.grad(theta, i, x_leaf, y_leaf, create_graph=True)
        theta = theta - lr_leaf * g
    loss = (theta - target).pow(2).sum() / dist
    inputs = [x_leaf, lr_leaf] + ([y_leaf] if soft else [])
    grads = torch.autograd.grad(loss, inputs)
    return MatchResult(loss.detach(), grads[0], grads[1], grads[2] if soft else None, dist)


def _forward(steps: _Steps, theta0: Tensor, x: Tensor, y: Tensor, lr: Tensor, keep_every: int = 0
             ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """First-order sweep: (theta_N, sum of g_i, snapshots {i: theta_i} every ``keep_every`` steps)."""
    theta = theta0
    gsum = torch.zeros_like(theta0)
    snaps: dict[int, Tensor] = {}
    for i in range(len(steps.plan)):
        if keep_every and i % keep_every == 0:
            snaps[i] = theta
        g = steps.first_order(theta, i, x, y)
        gsum += g
        theta = (theta - lr * g).detach()
    return theta, gsum, snaps


def _accumulate(acc: Tensor, g: Tensor | None) -> None:
    if g is not None:
        acc += g


def _exact(steps: _Steps, theta0: Tensor, target: Tensor, x: Tensor, y: Tensor, lr: Tensor, dist: Tensor,
           soft: bool, snapshot_every: int) -> MatchResult:
    n = len(steps.plan)
    k = snapshot_every or max(1, math.ceil(math.sqrt(n)))
    theta_n, _, snaps = _forward(steps, theta0, x, y, lr, keep_every=k)
    diff = theta_n - target
    loss = diff.pow(2).sum() / dist
    lam = 2 * diff / dist
    x_leaf = x.detach().requires_grad_(True)
    y_leaf = y.detach().requires_grad_(True) if soft else y.detach()
    gx = torch.zeros_like(x_leaf)
    gy = torch.zeros_like(y_leaf) if soft else None
    glr = torch.zeros((), dtype=theta0.dtype, device=theta0.device)
    for seg in reversed(range(0, n, k)):
        end = min(seg + k, n)
        thetas = [snaps.pop(seg)]
        for i in range(seg, end - 1):  # recompute theta_{seg+1..end-1} from the snapshot
            thetas.append((thetas[-1] - lr * steps.first_order(thetas[-1], i, x, y)).detach())
        for i in reversed(range(seg, end)):
            th = thetas.pop().detach().requires_grad_(True)
            g = steps.grad(th, i, x_leaf, y_leaf, create_graph=True)
            glr -= (lam * g.detach()).sum()
            inputs = [th, x_leaf] + ([y_leaf] if soft else [])
            vjp = torch.autograd.grad(g, inputs, grad_outputs=-lr * lam, allow_unused=True)
            _accumulate(gx, vjp[1])
            if soft:
                _accumulate(gy, vjp[2])
            if vjp[0] is not None:
                lam = lam + vjp[0]
            del g, vjp, th
    return MatchResult(loss.detach(), gx, glr, gy, dist)


def _tesla(steps: _Steps, theta0: Tensor, target: Tensor, x: Tensor, y: Tensor, lr: Tensor, dist: Tensor,
           soft: bool) -> MatchResult:
    theta_n, gsum, _ = _forward(steps, theta0, x, y, lr)
    diff = theta_n - target
    loss = diff.pow(2).sum() / dist
    c = 2 * diff / dist
    glr = -(c * gsum).sum()
    x_leaf = x.detach().requires_grad_(True)
    y_leaf = y.detach().requires_grad_(True) if soft else y.detach()
    gx = torch.zeros_like(x_leaf)
    gy = torch.zeros_like(y_leaf) if soft else None
    theta = theta0
    for i in range(len(steps.plan)):
        th = theta.detach().requires_grad_(True)
        g = steps.grad(th, i, x_leaf, y_leaf, create_graph=True)
        inputs = [x_leaf] + ([y_leaf] if soft else [])
        vjp = torch.autograd.grad(g, inputs, grad_outputs=-lr * c, allow_unused=True)
        _accumulate(gx, vjp[0])
        if soft:
            _accumulate(gy, vjp[1])
        theta = (th - lr * g).detach()
        del g, vjp
    return MatchResult(loss.detach(), gx, glr, gy, dist)


class SavedTensorMeter:
    """Peak number (and bytes) of tensors autograd holds for backward at the same time.

    A device-independent memory measure: inside ``with SavedTensorMeter() as m:`` every tensor an
    op saves for its backward is wrapped, and the wrapper counts itself while the graph keeps it
    alive. ``m.peak`` / ``m.peak_bytes`` grow with ``syn_steps`` for ``grad='unrolled'`` and stay
    flat for ``exact`` / ``tesla`` (tests and ``benchmarks/bench_tm_memory.py``). Bytes count each
    saved reference (a parameter saved by two ops counts twice).
    """

    def __init__(self) -> None:
        self.live = self.live_bytes = self.peak = self.peak_bytes = 0
        self._ctx: Any = None

    def _add(self, n: int, nbytes: int) -> None:
        self.live += n
        self.live_bytes += nbytes
        self.peak = max(self.peak, self.live)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __enter__(self) -> SavedTensorMeter:
        meter = self

        class _Held:
            __slots__ = ("t", "nbytes")

            def __init__(self, t: Tensor) -> None:
                self.t = t
                self.nbytes = t.numel() * t.element_size()
                meter._add(1, self.nbytes)

            def __del__(self) -> None:
                meter._add(-1, -self.nbytes)

        self._ctx = torch.autograd.graph.saved_tensors_hooks(_Held, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------------
# the method
SYN_LR_LIMIT = 100.0
"""The learned step size may grow to this multiple of its start (``lr_teacher``) before the run counts
as diverged. Healthy runs stay within a few x: the CIFAR-10 runs in benchmarks/logs learned
0.026-0.035 from 0.01, and MTT/DATM report learned rates of the same order as their teachers'. A run
that grew it to 2.2 (220 x) scored chance accuracy with 98 % of its pixels saturated
(docs/methods/tm.md, Hyper-parameters)."""


# ------------------------------------------------------------------------------------------
@dataclass
class TMConfig:
    """Hyper-parameters of a TM run; names are the CLI flags (``--syn-steps`` -> ``syn_steps``)."""

    ipc: int = 1
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    min_start_epoch: int = 0
    current_max_start_epoch: int = 0
    expansion_end_epoch: int = 0
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01
    batch_syn: int = 0
    iterations: int = 5000
    grad: str = "exact"
    snapshot_every: int = 1
    soft_labels: bool = False
    lr_labels: float = 2.0
    threshold: float = 0.0
    lr_decay: bool | None = None
    zca: bool | None = None
    init: str = "real"
    palette: int = 0
    palette_flags: dict[str, Any] = field(default_factory=dict)
    dsa: str = DEFAULT_STRATEGY
    amp: bool = False
    channels_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        ints = dict(ipc=1, syn_steps=1, expert_epochs=1, max_start_epoch=1, iterations=1)
        for k, lo in ints.items():
            if int(getattr(self, k)) < lo:
                raise ValueError(f"{k} must be >= {lo}, got {getattr(self, k)}")
        for k in ("min_start_epoch", "current_max_start_epoch", "expansion_end_epoch", "batch_syn",
                  "snapshot_every", "palette"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.min_start_epoch >= self.max_start_epoch:
            raise ValueError(f"min_start_epoch ({self.min_start_epoch}) must be < max_start_epoch "
                             f"({self.max_start_epoch})")
        if self.current_max_start_epoch and not self.expansion_end_epoch:
            raise ValueError("current_max_start_epoch (DATM's growing window) needs expansion_end_epoch > 0")
        for k in ("lr_img", "lr_lr", "lr_teacher", "lr_labels"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 = off), got {self.threshold}")
        if self.lr_decay and not self.palette:
            raise ValueError("lr_decay is AutoPalette's TM schedule and needs palette > 0 "
                             "(plain MTT/DATM keep the image lr constant)")
        if self.grad not in GRAD_MODES:
            raise ValueError(f"unknown grad {self.grad!r}; known: {', '.join(GRAD_MODES)}")
        parse_strategy(self.dsa)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TMConfig:
        """Build from a (resolved CLI) dict, ignoring keys that are not TM hyper-parameters."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def lr_factors(self, accepted: int) -> dict[str, float]:
        """Multipliers of the image and palette-net lrs after ``accepted`` accepted updates."""
        if not (self.palette and self.lr_decay is not False):
            return {"images": 1.0, "palette": 1.0}
        return {"images": 0.1 if accepted >= self.iterations // 3 else 1.0,
                "palette": 0.1 if accepted >= self.iterations // 2 else 1.0}

    def start_window(self, it: int) -> tuple[int, int]:
        """[lo, hi) of the start epoch at iteration ``it`` (DATM's growing window when enabled)."""
        hi = self.max_start_epoch
        if self.current_max_start_epoch:
            grown = self.current_max_start_epoch + int(
                (self.max_start_epoch - self.current_max_start_epoch) * it / self.expansion_end_epoch)
            hi = min(self.max_start_epoch, max(grown, self.min_start_epoch + 1))
        return self.min_start_epoch, hi


class TrajectoryMatching:
    """TM as a :mod:`decoct.methods.base` method over an ``ImageParam`` (pixels or palette)."""

    name = "tm"

    def __init__(self, config: TMConfig | dict[str, Any], experts: ExpertSet | str | Path) -> None:
        self.cfg = config if isinstance(config, TMConfig) else TMConfig.from_dict(config)
        self.experts = experts if isinstance(experts, ExpertSet) else load_experts(experts)
        self.iterations = int(self.cfg.iterations)
        self.accepted = 0

    # --- set-up -----------------------------------------------------------------------------
    def init(self, dataset: Dataset, device: torch.device) -> None:
        from decoct.matching.palette import (
            effective_ipc,
            init_indices,
            init_options,
            make_param,
            palette_options,
        )

        cfg, es = self.cfg, self.experts
        dev = torch.device(device)
        if (cfg.amp or cfg.channels_last) and dev.type != "cuda":
            raise ValueError(f"amp / channels_last are supported on CUDA only, got device {dev}")
        # start epochs are drawn from [min_start_epoch, max_start_epoch), targets lie M epochs later
        es.check(dataset.info, zca=cfg.zca, min_epochs=cfg.max_start_epoch - 1 + cfg.expert_epochs)
        self.info, self.device = dataset.info, dev
        self.zca = es.zca.to(dev) if es.zca is not None else None
        self.ipc_eff = effective_ipc(cfg.ipc, cfg.palette)
        flags = {**cfg.palette_flags, "palette": cfg.palette, "init": cfg.init}
        idx = init_indices(dataset, self.ipc_eff, cfg.palette, seed=cfg.seed, device=dev, **init_options(flags))
        self.init_indices = idx.cpu()
        self.palette_flags, self.train_images = flags, dataset.train.images
        x0 = self._real_batch(idx.cpu())
        labels = dataset.train.labels[idx.cpu()]
        self.param = make_param(x0, labels, self.zca, cfg.palette,
                                **palette_options(flags, info=dataset.info)).to(dev)
        self.warmup_metrics: dict[str, float] = {}
        self.opts = self.param.optimizers(lr_img=cfg.lr_img, momentum=0.5)
        self.base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.opts.items()}
        # 0 = all images; a batch larger than the set is the whole set (as MTT/DATM's chunking gives)
        self.batch_syn = min(cfg.batch_syn or self.param.num_images, self.param.num_images)
        self.net = FlatParams(es.build_model().to(dev))
        self.net.model.train()
        self.syn_lr = torch.tensor(float(cfg.lr_teacher), device=dev, requires_grad=True)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=0.5)
        self.labels_soft: Tensor | None = None
        if cfg.soft_labels:
            final = es.params(0, [es.epochs])[0].to(dev)
            with torch.no_grad():  # on the initial, un-quantised images (as DATM/AutoPalette)
                logits = self.net(final, x0)
            self.labels_soft = logits.detach().clone().requires_grad_(True)
            self.opt_y = torch.optim.SGD([self.labels_soft], lr=cfg.lr_labels, momentum=0.9)
        self.augment = dsa_augment(cfg.dsa)
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.accepted = 0

    # --- one iteration ----------------------------------------------------------------------
    def step(self, it: int) -> dict[str, float]:
        cfg, es = self.cfg, self.experts
        k = int(torch.randint(len(es), (1,), generator=self.gen))
        lo, hi = cfg.start_window(it)
        t = int(torch.randint(lo, hi, (1,), generator=self.gen))
        pair = es.params(k, [t, t + cfg.expert_epochs]).to(self.device)
        plan = make_plan(self.param.num_images, cfg.syn_steps, self.batch_syn, self.gen)

        x_all = self.param()
        y = self.labels_soft if self.labels_soft is not None else self.param.labels
        res = match_gradients(self.net, pair[0], pair[1], x_all.detach(), y.detach(), self.syn_lr.detach(), plan,
                              augment=self.augment, mode=cfg.grad, snapshot_every=cfg.snapshot_every,
                              amp=cfg.amp, channels_last=cfg.channels_last)
        loss = float(res.loss)
        if not math.isfinite(loss):  # before any update: a NaN gradient must not reach the images
            raise DivergedError("tm", f"iteration {it + 1}", "loss", loss, self.divergence_hint)
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        accept = not cfg.threshold or loss <= cfg.threshold
        metrics = {"loss": loss, "start_epoch": float(t), "syn_lr": float(self.syn_lr.detach())}
        if accept:
            x_all.backward(res.grad_x)
            self.syn_lr.grad = res.grad_lr.detach().reshape(()).to(self.syn_lr.dtype)
            if self.labels_soft is not None and res.grad_y is not None:
                self.labels_soft.grad = res.grad_y.detach()
            aux, aux_metrics = self.param.aux_loss(self.gen)
            if aux is not None:
                aux.backward()
            metrics.update({k: float(v) for k, v in aux_metrics.items()})
            self._apply_lr_factors()
            for opt in self._optimizers():
                opt.step()
            self.accepted += 1
        else:
            del x_all
        metrics["accepted"] = float(accept)
        return metrics

    # --- validity (decoct.runtime.health; run_method calls check after every step) ------------------
    @property
    def divergence_hint(self) -> str:
        """What to change when the run diverges: the learning rates of what TM optimises."""
        cfg = self.cfg
        flags: list[tuple[str, Any]] = [("--lr-img", cfg.lr_img), ("--lr-lr", cfg.lr_lr)]
        if self.labels_soft is not None:
            flags.append(("--lr-labels", cfg.lr_labels))
        return rerun_hint(*flags)

    def check(self, it: int) -> None:
        """After step ``it``: the learned step size is finite, positive and at most ``SYN_LR_LIMIT`` x
        ``lr_teacher``; images, palette net and soft labels are finite; every 10 steps (and the last)
        the pixels are not mostly saturated."""
        cfg, where = self.cfg, f"iteration {it + 1}"
        lr = float(self.syn_lr.detach())
        if not math.isfinite(lr) or lr <= 0:  # overshooting: many synthetic steps make dL/dlr large
            raise DivergedError("tm", where, "the learned step size (syn_lr)", lr,
                                rerun_hint(("--lr-lr", cfg.lr_lr), ("--syn-steps", cfg.syn_steps)))
        if lr > SYN_LR_LIMIT * cfg.lr_teacher:
            raise DivergedError("tm", where, "the learned step size (syn_lr)",
                                f"{lr:.4g}, more than {SYN_LR_LIMIT:g} x --lr-teacher {cfg.lr_teacher:g}",
                                rerun_hint(("--lr-lr", cfg.lr_lr)))
        tensors = [(f"synthetic {n}", t.detach()) for n, t in self.param.named_parameters()]
        if self.labels_soft is not None:
            tensors.append(("the soft labels", self.labels_soft.detach()))
        check_tensors(tensors, "tm", where, self.divergence_hint)
        if (it + 1) % 10 == 0 or it + 1 == self.iterations:
            check_saturation(self.param, self.info, "tm", where, self.divergence_hint)

    def _apply_lr_factors(self) -> None:
        """Set each optimiser's lr from the accepted count (the schedule is a pure function of it)."""
        factors = self.cfg.lr_factors(self.accepted)
        for k, opt in self.opts.items():
            for g, base in zip(opt.param_groups, self.base_lrs[k], strict=True):
                g["lr"] = base * factors.get(k, 1.0)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opts = list(self.opts.values()) + [self.opt_lr]
        if self.labels_soft is not None:
            opts.append(self.opt_y)
        return opts

    # --- resume -----------------------------------------------------------------------------
    def warm_start(self, show_progress: bool = False) -> dict[str, float]:
        """The palette network's optional warm-up on real batches (``palette_warmup``; see
        :func:`decoct.matching.palette.warmup_palette`); {} when off. Fresh runs only (see methods.base)."""
        from decoct.matching.palette import warmup_palette

        self.warmup_metrics = warmup_palette(self.param, self.palette_flags, len(self.train_images),
                                             self._real_batch, seed=int(self.cfg.seed), show_progress=show_progress)
        return self.warmup_metrics

    def _real_batch(self, idx: Tensor) -> Tensor:
        """Training images at CPU indices ``idx`` in the training space: normalised, whitened if ZCA."""
        x = normalize(self.train_images[idx], self.info, self.device)
        return self.zca.transform(x) if self.zca is not None else x

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "param": {k: v.detach().cpu().clone() for k, v in self.param.state_dict().items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "syn_lr": self.syn_lr.detach().cpu().clone(),
            "opt_lr": self.opt_lr.state_dict(),
            "gen": self.gen.get_state(),
            "accepted": self.accepted,
            "warmup_metrics": dict(self.warmup_metrics),
        }
        if self.labels_soft is not None:
            state["labels_soft"] = self.labels_soft.detach().cpu().clone()
            state["opt_y"] = self.opt_y.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param.load_state_dict(state["param"])
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.gen.set_state(state["gen"])
        self.accepted = int(state["accepted"])
        self.warmup_metrics = dict(state.get("warmup_metrics", {}))
        self._apply_lr_factors()
        if self.labels_soft is not None:
            if "labels_soft" not in state:
                raise ValueError("checkpoint has no soft labels but the run uses --soft-labels")
            with torch.no_grad():
                self.labels_soft.copy_(state["labels_soft"])
            self.opt_y.load_state_dict(state["opt_y"])

    # --- output -----------------------------------------------------------------------------
    def result(self) -> DistilledSet:
        cfg, es = self.cfg, self.experts
        config = asdict(cfg)
        meta = dict(syn_lr=float(self.syn_lr.detach()), accepted_iterations=self.accepted,
                    ipc=cfg.ipc, images_per_class=self.ipc_eff, experts=str(es.path), num_experts=len(es),
                    expert_epochs_available=es.epochs, expert_final_accuracy=round(es.final_accuracy(), 6),
                    student_model=es.model_name, student_model_kwargs=es.model_kwargs,
                    zca=es.zca is not None, grad=cfg.grad, lr_parameterisation="raw (as MTT)",
                    soft_label_init="logits of expert 0 at its final epoch" if cfg.soft_labels else None,
                    init_indices=self.init_indices.tolist(), palette_warmup_end=self.warmup_metrics or None)
        kwargs: dict[str, Any] = dict(method="tm", config=config, meta=meta)
        if self.labels_soft is not None:
            kwargs["soft_labels"] = self.labels_soft.detach().float().cpu()
        return self.param.to_set(self.info, **kwargs)


@METHODS.register("tm")
def _make_tm(config: dict[str, Any]) -> TrajectoryMatching:
    """Registry factory: ``config`` holds the TM hyper-parameters plus ``experts`` (a directory)."""
    if not config.get("experts"):
        raise ValueError("TM needs expert trajectories (config key 'experts'); make them with: "
                         + experts_command(str(config.get("dataset", "DATASET"))))
    return TrajectoryMatching(TMConfig.from_dict(config), config["experts"])


def distill_tm(dataset: str | Dataset, out: str | Path, experts: str | Path | ExpertSet | None, *,
               config: TMConfig | dict[str, Any] | None = None, run_config: dict[str, Any] | None = None,
               device: str = "auto", data_root: str | None = None, download: bool = False, resume: bool = False,
               force: bool = False, progress: bool = True, checkpoint_every: int = 100,
               stop_after: int | None = None, **options: Any) -> DistilledSet:
    """Distil ``dataset`` by trajectory matching into the run directory ``out`` (the Python API).

    ``config``: a :class:`TMConfig` or dict; ``options`` override single fields
    (``distill_tm("digits", "runs/tm", "experts/digits", ipc=1, iterations=100)``).
    ``run_config``: what is saved as the run's ``config.yaml`` (the CLI passes its resolved
    flags). Returns the stored set (re-loaded when the run had finished before).
    """
    from decoct.data import load_dataset
    from decoct.matching.palette import effective_ipc
    from decoct.methods.base import run_method
    from decoct.runtime.distributed import resolve_device
    from decoct.runtime.runs import Run

    name = dataset.info.name if isinstance(dataset, Dataset) else str(dataset)
    if experts is None:
        raise ValueError("TM matches expert trajectories, and none were given (--experts DIR). Train them once "
                         f"(they are reused by every TM run on this dataset):\n  {experts_command(name)}\n"
                         f"then: decoct distill tm --dataset {name} --experts experts/{name} ...")
    base = config if isinstance(config, TMConfig) else TMConfig.from_dict(dict(config or {}))
    cfg = TMConfig.from_dict({**asdict(base), **options})
    es = experts if isinstance(experts, ExpertSet) else load_experts(experts)
    saved = run_config or {"dataset": name, "experts": str(es.path), **asdict(cfg)}
    if (Path(out) / "DONE").exists() and not force:
        return DistilledSet.load(Run.open(out, saved).artifact_dir)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root=data_root, download=download)
    es.check(data.info, zca=cfg.zca, min_epochs=cfg.max_start_epoch - 1 + cfg.expert_epochs)  # before any write
    run = Run.open(out, saved, resume=resume, force=force)
    dev = resolve_device(device)
    method = TrajectoryMatching(cfg, es)
    n_images = data.info.num_classes * effective_ipc(cfg.ipc, cfg.palette)
    batch = min(cfg.batch_syn or n_images, n_images)
    return run_method(method, run, data, dev, seed=cfg.seed, checkpoint_every=checkpoint_every,
                      show_progress=progress, stop_after=stop_after, images_per_step=batch * cfg.syn_steps)


__all__ = ["GRAD_MODES", "MatchResult", "SYN_LR_LIMIT", "StepPlan", "TMConfig", "TrajectoryMatching", "distill_tm", "dsa_augment",
           "inner_loss", "make_plan", "match_gradients"]
