"""Coreset selection baselines: random, herding, k-center and graph-cut, chosen per class.

The selection rules are pure functions of one class's embedding matrix (numpy or torch,
``(n, d)``) and return a ``LongTensor`` of row indices in selection order. They work in
float64 and break ties towards the smallest index, so the same input always gives the same
picks. :func:`select_coreset` embeds a dataset's training images with a (fresh or briefly
trained) network and applies one rule class by class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from decoct.data.types import Dataset, normalize
from decoct.models import model_for
from decoct.runtime.progress import progress as progress_bar

CORESET_METHODS: tuple[str, ...] = ("random", "herding", "kcenter", "graphcut")
EMBEDDINGS: tuple[str, ...] = ("random", "trained")
GREEDY_MODES: tuple[str, ...] = ("exact", "stochastic")

ArrayLike = Tensor | np.ndarray


# --------------------------------------------------------------------------- helpers


def _check_k(k: int, n: int) -> None:
    """The shared k/n validation, so every rule fails the same way on bad sizes."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the {n} points given")


def _as_feats(feats: ArrayLike) -> Tensor:
    """Features as float64 (n, d): float32 rounding could otherwise flip near-ties."""
    x = torch.as_tensor(feats).detach()
    if x.dim() != 2:
        raise ValueError(f"features must be a 2-D (n, d) matrix, got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _first_argmin(x: Tensor) -> int:
    """Index of the minimum, the smallest one on ties (documented, not left to the backend)."""
    return int(torch.nonzero(x == x.min(), as_tuple=False)[0, 0])


def _first_argmax(x: Tensor) -> int:
    """Index of the maximum, the smallest one on ties."""
    return int(torch.nonzero(x == x.max(), as_tuple=False)[0, 0])


# --------------------------------------------------------------------------- selection rules


def random_baseline_indices(dataset: Dataset, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` random training images of every class (a seeded torch.Generator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(dataset.info.num_classes):
        idx = dataset.train.class_indices(c)
        if per_class > len(idx):
            raise ValueError(f"random baseline needs {per_class} images of class {c}, it has {len(idx)}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out)


def random_select(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct indices out of ``range(n)``, uniformly at random.

    The baseline every other rule must beat. Without a ``generator`` a fresh one seeded 0
    is used, so the result is deterministic either way (the global RNG is never touched).
    """
    _check_k(k, n)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[:k]


def herding_select(feats: ArrayLike, k: int) -> Tensor:
    """Greedy herding (Welling 2009, the iCaRL exemplar rule): keep the running mean of the
    chosen points as close as possible to the class mean.

    At step ``t`` (1-based) it adds the unchosen ``i`` minimising
    ``|| mu - (sum_chosen + f_i) / t ||``; ties go to the smallest index. Each step scores all
    candidates at once as ``|| t*mu - sum_chosen - f_i ||^2`` (the same arg min, scaled by t^2),
    expanded to ``||f_i||^2 - 2 f_i . target`` (+ a constant) so a step is one mat-vec.
    """
    x = _as_feats(feats)
    n = x.shape[0]
    _check_k(k, n)
    mu = x.mean(dim=0)
    sq = x.pow(2).sum(dim=1)
    chosen_sum = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []
    for t in range(1, k + 1):
        target = t * mu - chosen_sum
        score = sq - 2.0 * (x @ target)
        score[taken] = math.inf
        i = _first_argmin(score)
        picks.append(i)
        taken[i] = True
        chosen_sum += x[i]
    return torch.tensor(picks, dtype=torch.long)


def kcenter_select(feats: ArrayLike, k: int, first: int | None = None) -> Tensor:
    """Greedy k-center (farthest-first traversal): cover the class with the smallest radius.

    Starts from ``first`` or, by default, the point nearest the class mean (deterministic,
    unlike the usual random start); then repeatedly adds the point farthest from its nearest
    chosen centre (ties to the smallest index). The nearest-centre distance vector is updated
    with one new centre per step: one mat-vec, O(n d), per step.
    """
    x = _as_feats(feats)
    n = x.shape[0]
    _check_k(k, n)
    sq = x.pow(2).sum(dim=1)

    def sq_dist(c: Tensor) -> Tensor:  # squared distances: same ordering as distances, no sqrt
        return (sq - 2.0 * (x @ c) + c.pow(2).sum()).clamp_(min=0.0)

    if first is None:
        first = _first_argmin(sq_dist(x.mean(dim=0)))
    elif not 0 <= first < n:
        raise ValueError(f"first={first} is not an index into the {n} points given")
    picks = [int(first)]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[first] = True
    min_d = sq_dist(x[first])
    for _ in range(k - 1):
        # Chosen points get -1, so duplicates of a centre (distance 0) still win over them.
        i = _first_argmax(torch.where(taken, torch.full_like(min_d, -1.0), min_d))
        picks.append(i)
        taken[i] = True
        min_d = torch.minimum(min_d, sq_dist(x[i]))
    return torch.tensor(picks, dtype=torch.long)


def _unit_rows(feats: ArrayLike) -> Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is 0)."""
    return F.normalize(_as_feats(feats), dim=1)


def similarity_matrix(feats: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
    """The graph-cut kernel ``s(i, j) = 0.5 + 0.5 * cos(f_i, f_j)`` in [0, 1], as (n, n).

    AutoPalette's choice: shifting cosine into [0, 1] keeps every pair's contribution
    non-negative. A zero feature vector has cosine 0 with everything (itself included).
    """
    u = _unit_rows(feats)
    return (0.5 + 0.5 * (u @ u.T)).to(dtype)


def graphcut_value(sim: ArrayLike, subset: Sequence[int] | Tensor, lam: float = 1.0) -> float:
    """The generalised graph-cut objective
    ``f(A) = lam * sum_{i in V} sum_{a in A} s(i, a) - sum_{a1, a2 in A} s(a1, a2)``:
    how well ``A`` represents the whole class minus how redundant it is.
    """
    s = torch.as_tensor(sim).to(torch.float64)
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be a square (n, n) matrix, got shape {tuple(s.shape)}")
    a = torch.as_tensor(subset, dtype=torch.long).flatten()
    if a.numel() == 0:
        return 0.0
    return float(lam * s[:, a].sum() - s[a][:, a].sum())


def graphcut_select(
    feats: ArrayLike,
    k: int,
    lam: float = 1.0,
    greedy: str = "exact",
    epsilon: float = 0.9,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedily maximise the graph-cut objective (see :func:`graphcut_value`) with the
    cosine kernel of :func:`similarity_matrix`, as AutoPalette selects its coreset.

    The marginal gain of ``c`` given ``A`` is
    ``lam * sum_i s(i, c) - 2 * sum_{a in A} s(a, c) - s(c, c)``. The official code drops the
    ``s(c, c)`` term; with cosine similarity it is 1 for every non-zero feature vector, so
    the arg max is the same, but we keep it so the gain is exact even for zero vectors.
    Gains start from the column sums (computed as ``0.5 n + 0.5 u_c . sum_i u_i``, no (n, n)
    matrix needed) and drop by ``2 s(new, c)`` after each pick, one kernel row per step.

    ``greedy='exact'`` adds the best remaining candidate at every step, the first pick
    included, so it is deterministic. ``greedy='stochastic'`` (Mirzasoleiman et al. 2015, the
    official code's default with ``epsilon=0.9``) adds the best of
    ``r = max(round(-ln(epsilon) * n / k), 1)`` remaining candidates drawn uniformly without
    replacement from ``generator`` (a fresh one seeded 0 when None). The official code
    (inherited from DeepCore) pairs the redundancy term, ordered by sorted candidate index,
    with the coverage term in draw order, so its gains are permuted; we deliberately compute
    the correct gain for every drawn candidate instead. Ties go to the smallest index.
    """
    u = _unit_rows(feats)
    col_sums = 0.5 * u.shape[0] + 0.5 * (u @ u.sum(dim=0))
    self_sim = 0.5 + 0.5 * u.pow(2).sum(dim=1)
    return _greedy_cut(lam * col_sums - self_sim, lambda c: 0.5 + 0.5 * (u @ u[c]), k, greedy, epsilon, generator)


def graphcut_select_kernel(sim: Tensor, k: int, lam: float = 1.0, greedy: str = "exact", epsilon: float = 0.9,
                           generator: torch.Generator | None = None) -> Tensor:
    """Greedy graph cut on a precomputed symmetric kernel ``sim`` (n, n); picks in order.

    Gain of ``c`` given ``A``: ``lam sum_i s(i, c) - 2 sum_{a in A} s(a, c) - s(c, c)``, i.e.
    ``f(A + c) - f(A)`` for ``f`` of :func:`graphcut_value`. Same greedy, tie-breaking (smallest
    index) and stochastic sampler as :func:`graphcut_select`, which never builds the kernel. Raises
    ValueError for a non-square ``sim``, ``k`` outside 1..n or an unknown ``greedy``.
    """
    s = torch.as_tensor(sim).to(torch.float64)
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be a square (n, n) matrix, got shape {tuple(s.shape)}")
    return _greedy_cut(lam * s.sum(dim=0) - s.diagonal(), lambda c: s[c], k, greedy, epsilon, generator)


def _greedy_cut(gains: Tensor, column: Callable[[int], Tensor], k: int, greedy: str, epsilon: float,
                generator: torch.Generator | None) -> Tensor:
    """The graph-cut greedy both selectors share: ``gains`` (n,) the gain of each candidate given the
    empty set; after each pick ``c`` every gain drops by ``2 column(c)`` (``column(c)`` = ``s(c, .)``)."""
    if greedy not in GREEDY_MODES:
        raise ValueError(f"unknown greedy mode {greedy!r}; known: {', '.join(GREEDY_MODES)}")
    n = gains.shape[0]
    _check_k(k, n)
    if greedy == "stochastic":
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        r = max(round(-math.log(epsilon) * n / k), 1)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
    gains = gains.clone()
    taken = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []
    for _ in range(k):
        if greedy == "exact":
            c = _first_argmax(torch.where(taken, torch.full_like(gains, -math.inf), gains))
        else:
            remaining = torch.nonzero(~taken, as_tuple=False).flatten()
            drawn = remaining[torch.randperm(len(remaining), generator=g)[:r]]
            drawn = drawn.sort().values  # so the tie-break below means "smallest index"
            c = int(drawn[_first_argmax(gains[drawn])])
        picks.append(c)
        taken[c] = True
        gains -= 2.0 * column(c)
    return torch.tensor(picks, dtype=torch.long)


# --------------------------------------------------------------------------- top level


def _check_request(
    dataset: Dataset, method: str, ipc: int, embed: str, embed_epochs: int
) -> list[Tensor]:
    """Validate everything cheap up front so bad input fails before any network work."""
    if method not in CORESET_METHODS:
        raise ValueError(f"unknown coreset method {method!r}; known: {', '.join(CORESET_METHODS)}")
    if embed not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embed!r}; known: {', '.join(EMBEDDINGS)}")
    if embed == "trained" and method != "random" and embed_epochs < 1:
        raise ValueError(f"embed_epochs must be >= 1 for a trained embedding, got {embed_epochs}")
    if ipc < 1:
        raise ValueError(f"IPC must be >= 1, got {ipc}")
    info = dataset.info
    per_class = [dataset.train.class_indices(c) for c in range(info.num_classes)]
    for c, idx in enumerate(per_class):
        if ipc > len(idx):
            raise ValueError(
                f"IPC {ipc} is larger than class {c} ({info.classes[c]!r}), "
                f"which has {len(idx)} images"
            )
    return per_class


def _train_embedder(
    net: torch.nn.Module, dataset: Dataset, epochs: int, device: torch.device | str,
    generator: torch.Generator, progress: bool,
) -> None:
    """Plain SGD + cross-entropy on the real training set: features that know the classes."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = dataset.train.images, dataset.train.labels
    n = len(labels)
    net.train()
    bar = progress_bar(total=epochs * n, desc="coreset: train embedder", enabled=progress, unit="img",
                       span=f"{epochs} epochs")
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, 256):
            idx = order[start : start + 256]
            x = normalize(images[idx], dataset.info, device)
            loss = F.cross_entropy(net(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(len(idx))
    bar.close()


def _embed_train(
    dataset: Dataset, embed: str, model: str, embed_epochs: int, seed: int,
    device: torch.device | str, batch_size: int, progress: bool,
) -> Tensor:
    """Penultimate features of every training image, (N, d) float32 on the CPU."""
    with torch.random.fork_rng(devices=[]):  # a fixed init without disturbing the caller's RNG
        torch.manual_seed(seed)
        net = model_for(model, dataset.info).to(device)
    if embed == "trained":
        _train_embedder(net, dataset, embed_epochs, device, torch.Generator().manual_seed(seed), progress)
    net.eval()
    images = dataset.train.images
    out: list[Tensor] = []
    with torch.no_grad():
        for start in progress_bar(range(0, len(images), batch_size), desc="coreset: embed", enabled=progress,
                                  unit="batch"):
            x = normalize(images[start : start + batch_size], dataset.info, device)
            out.append(net.embed(x).flatten(1).float().cpu())
    return torch.cat(out)


def select_coreset(
    dataset: Dataset,
    method: str,
    ipc: int,
    *,
    seed: int = 0,
    embed: str = "trained",
    model: str = "convnet",
    embed_epochs: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = True,
) -> Tensor:
    """Pick ``ipc`` training images per class with a coreset rule (see ``CORESET_METHODS``).

    Returns indices into ``dataset.train``, grouped class by class in class order and, within
    a class, in selection order. The embedding rules work on penultimate features of
    ``model``, freshly initialised with ``seed`` (``embed='random'``, as DM does) or trained on
    the real set for ``embed_epochs`` epochs (``embed='trained'``). ``graphcut`` uses the
    exact greedy here, so only ``random`` depends on ``seed`` beyond the network.
    """
    per_class = _check_request(dataset, method, ipc, embed, embed_epochs)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.cat([idx[random_select(len(idx), ipc, g)] for idx in per_class])

    feats = _embed_train(dataset, embed, model, embed_epochs, seed, device, batch_size, progress)
    rule = {"herding": herding_select, "kcenter": kcenter_select, "graphcut": graphcut_select}[method]
    return torch.cat([idx[rule(feats[idx], ipc)] for idx in per_class])


__all__ = [
    "CORESET_METHODS",
    "graphcut_select",
    "graphcut_select_kernel",
    "graphcut_value",
    "herding_select",
    "kcenter_select",
    "random_baseline_indices",
    "random_select",
    "select_coreset",
    "similarity_matrix",
]
