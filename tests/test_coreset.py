"""Coreset selection rules against hand computations and brute force; select_coreset end to end."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from decoct.coreset import select as coreset
from decoct.coreset.select import (
    CORESET_METHODS,
    graphcut_select,
    graphcut_value,
    herding_select,
    kcenter_select,
    random_select,
    select_coreset,
    similarity_matrix,
)
from decoct.data.types import Dataset, DatasetInfo, ImageSplit


def _rand(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- random


def test_random_select_distinct_and_reproducible():
    a = random_select(20, 7, torch.Generator().manual_seed(3))
    b = random_select(20, 7, torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and len(set(a.tolist())) == 7
    assert a.min() >= 0 and a.max() < 20
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- herding


def test_herding_hand_worked_1d():
    # mu = 3.25. t=1: |3.25 - x| -> x=2 (1.25). t=2: |3.25 - (2+x)/2| = |4.5 - x|/2 over
    # {0, 1, 10} -> x=1 (3.5/2). t=3: |9.75 - 3 - x| = |6.75 - x| over {0, 10} -> x=10 (3.25).
    feats = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert herding_select(feats, 4).tolist() == [2, 1, 3, 0]
    assert herding_select(feats, 2).tolist() == [2, 1]


def test_herding_hand_worked_2d_ties_to_smallest_index():
    # mu = (1, 1) = point 4. t=2: target 2mu - (1,1) = (1,1), all corners at distance^2 2 -> 0.
    # t=3: target 3mu - (1,1) - (0,0) = (2,2) -> 3. t=4: target (1,1), points 1, 2 tie -> 1.
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    assert herding_select(feats, 5).tolist() == [4, 0, 3, 1, 2]


def test_herding_full_is_permutation():
    picks = herding_select(_rand(17, 5, 0), 17)
    assert sorted(picks.tolist()) == list(range(17))


# --------------------------------------------------------------------------- k-center


def test_kcenter_hand_worked_line():
    # x = 0, 1, 3, 7, 8 (y = 0); mean 3.8 -> start at 3 (index 2). Distances to {3}:
    # 3, 2, 0, 4, 5 -> 8 (index 4). To {3, 8}: 3, 2, 0, 1, 0 -> 0 (index 0).
    # To {3, 8, 0}: 0, 1, 0, 1, 0 -> tie between 1 and 7 -> index 1, then index 3.
    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 8.0])
    feats = torch.stack([x, torch.zeros_like(x)], dim=1)
    assert kcenter_select(feats, 5).tolist() == [2, 4, 0, 1, 3]
    assert kcenter_select(feats, 2, first=0).tolist() == [0, 4]


def _brute_farthest_first(feats: np.ndarray, k: int, first: int) -> list[int]:
    picks = [first]
    while len(picks) < k:
        best, best_d = -1, -1.0
        for i in range(len(feats)):
            if i in picks:
                continue
            d = min(float(np.linalg.norm(feats[i] - feats[c])) for c in picks)
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_matches_brute_force(seed):
    feats = _rand(30, 4, seed).numpy()
    first = int(np.argmin(np.linalg.norm(feats - feats.mean(0), axis=1)))
    assert kcenter_select(feats, 10).tolist() == _brute_farthest_first(feats, 10, first)
    assert kcenter_select(feats, 6, first=7).tolist() == _brute_farthest_first(feats, 6, 7)


# --------------------------------------------------------------------------- graph cut


def test_graphcut_value_matches_double_sum():
    feats = _rand(7, 3, 4)
    u = feats / feats.norm(dim=1, keepdim=True)
    sim = similarity_matrix(feats, dtype=torch.float64)
    subset, lam = [5, 1, 3], 1.7
    cover = sum(0.5 + 0.5 * float(u[i] @ u[a]) for i in range(7) for a in subset)
    redundancy = sum(0.5 + 0.5 * float(u[a] @ u[b]) for a in subset for b in subset)
    assert graphcut_value(sim, subset, lam) == pytest.approx(lam * cover - redundancy, abs=1e-12)
    assert graphcut_value(sim, [], lam) == 0.0
    assert sim.min() >= 0 and sim.max() <= 1 + 1e-12


def _brute_max(sim: torch.Tensor, k: int, lam: float) -> float:
    return max(graphcut_value(sim, list(a), lam) for a in itertools.combinations(range(len(sim)), k))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_graphcut_k1_is_optimal(seed, lam):
    feats = _rand(8, 3, seed)
    sim = similarity_matrix(feats, dtype=torch.float64)
    pick = graphcut_select(feats, 1, lam=lam)
    assert graphcut_value(sim, pick, lam) == pytest.approx(_brute_max(sim, 1, lam), abs=1e-12)


def _blocks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three clusters of sizes 3, 3, 2 along orthogonal axes (magnitudes vary, directions
    do not), shuffled. Cross-cluster s = 0.5, within-cluster s = 1, so with lam = 1 the
    dense-cluster bonus (at most 0.5 per point) never pays for a duplicate (cost 1)."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    feats = torch.eye(3, dtype=torch.float64)[cluster] * (1 + 4 * torch.rand(8, 1, generator=g, dtype=torch.float64))
    perm = torch.randperm(8, generator=g)
    return feats[perm], cluster[perm]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 3])
def test_graphcut_blocks_one_per_cluster_and_optimal(seed, k):
    feats, cluster = _blocks(seed)
    sim = similarity_matrix(feats, dtype=torch.float64)
    picks = graphcut_select(feats, k, lam=1.0)
    assert len(set(cluster[picks].tolist())) == k
    # Greedy starts in one of the two size-3 clusters (column sum 5.5 vs 5).
    assert cluster[picks[0]].item() in (0, 1)
    assert graphcut_value(sim, picks, 1.0) == pytest.approx(_brute_max(sim, k, 1.0), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_graphcut_greedy_follows_naive_gains(seed, lam):
    feats = _rand(8, 3, seed + 10)
    sim = similarity_matrix(feats, dtype=torch.float64)
    picks = graphcut_select(feats, 5, lam=lam).tolist()
    chosen: list[int] = []
    for p in picks:
        base = graphcut_value(sim, chosen, lam)
        gains = {c: graphcut_value(sim, chosen + [c], lam) - base for c in range(8) if c not in chosen}
        assert p == max(gains, key=lambda c: (gains[c], -c))
        chosen.append(p)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_graphcut_stochastic_with_full_sample_equals_exact(k):
    feats = _rand(8, 3, 20 + k)
    eps = 1e-6  # r = round(13.8 * n / k) >= n: every remaining candidate is drawn
    assert round(-math.log(eps) * 8 / k) >= 8
    exact = graphcut_select(feats, k, greedy="exact")
    stoch = graphcut_select(feats, k, greedy="stochastic", epsilon=eps, generator=torch.Generator().manual_seed(5))
    assert torch.equal(exact, stoch)


def test_graphcut_stochastic_reproducible():
    feats = _rand(40, 4, 7)

    def run(seed: int) -> torch.Tensor:
        return graphcut_select(feats, 5, greedy="stochastic", generator=torch.Generator().manual_seed(seed))

    a, b = run(1), run(1)
    assert torch.equal(a, b) and len(set(a.tolist())) == 5


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "rule",
    [
        lambda f, k: random_select(len(f), k),
        herding_select,
        kcenter_select,
        graphcut_select,
        lambda f, k: graphcut_select(f, k, greedy="stochastic"),
    ],
)
def test_rules_reject_bad_k(rule):
    feats = _rand(4, 2, 0)
    with pytest.raises(ValueError, match="larger than"):
        rule(feats, 5)
    with pytest.raises(ValueError, match=">= 1"):
        rule(feats, 0)


def test_bad_options_raise():
    feats = _rand(4, 2, 0)
    with pytest.raises(ValueError, match="greedy"):
        graphcut_select(feats, 2, greedy="lazy")
    with pytest.raises(ValueError, match="epsilon"):
        graphcut_select(feats, 2, greedy="stochastic", epsilon=1.5)
    with pytest.raises(ValueError, match="first"):
        kcenter_select(feats, 2, first=9)


def _tiny_dataset(counts: tuple[int, ...] = (6, 5, 7)) -> Dataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    names = ("cat", "dog", "emu", "fox")[: len(counts)]
    info = DatasetInfo("tiny", names, 1, 8, 8, (0.5,), (0.25,))
    return Dataset(info, ImageSplit(images, labels), ImageSplit(images[:2], labels[:2]))


def test_select_coreset_validates_before_embedding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("embedded before validating")

    monkeypatch.setattr(coreset, "_embed_train", boom)
    ds = _tiny_dataset()
    with pytest.raises(ValueError, match=r"IPC 6 is larger than class 1 \('dog'\), which has 5 images"):
        select_coreset(ds, "herding", 6, progress=False)
    with pytest.raises(ValueError, match="IPC must be >= 1"):
        select_coreset(ds, "kcenter", 0, progress=False)
    with pytest.raises(ValueError, match="unknown coreset method 'kmeans'"):
        select_coreset(ds, "kmeans", 1, progress=False)
    with pytest.raises(ValueError, match="unknown embedding 'pretrained'"):
        select_coreset(ds, "herding", 1, embed="pretrained", progress=False)


@pytest.mark.parametrize("method", CORESET_METHODS)
def test_select_coreset_tiny_grouping(method):
    ds = _tiny_dataset()
    idx = select_coreset(ds, method, 3, embed="random", progress=False)
    again = select_coreset(ds, method, 3, embed="random", progress=False)
    assert idx.dtype == torch.long and torch.equal(idx, again)
    assert len(set(idx.tolist())) == 9
    assert ds.train.labels[idx].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_select_coreset_trained_embedding_runs():
    ds = _tiny_dataset()
    idx = select_coreset(ds, "kcenter", 2, embed="trained", embed_epochs=1, model="mlp", progress=False)
    assert ds.train.labels[idx].tolist() == [0, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_select_coreset_on_digits():
    from decoct.data import load_dataset

    ds = load_dataset("digits")
    expected = [c for c in range(10) for _ in range(5)]
    picked = {}
    for method in CORESET_METHODS:
        idx = select_coreset(ds, method, 5, embed_epochs=2, progress=False)
        assert idx.shape == (50,) and len(set(idx.tolist())) == 50
        assert ds.train.labels[idx].tolist() == expected
        picked[method] = set(idx.tolist())
    herd_random = select_coreset(ds, "herding", 5, embed="random", progress=False)
    assert ds.train.labels[herd_random].tolist() == expected
    assert picked["herding"] != picked["random"]
    assert picked["kcenter"] != picked["random"]
    assert picked["kcenter"] != picked["herding"]
