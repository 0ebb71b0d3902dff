"""AutoPalette's colour-guided init: graph-cut greedy (vs brute force), gradient kernel, digits run."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from decoct.coreset.select import (
    graphcut_select,
    graphcut_select_kernel,
    graphcut_value,
    similarity_matrix,
)
from decoct.matching.palette import init_indices
from decoct.matching.palette.init import (
    colour_guided_indices,
    gradient_kernel,
    quantized_train_images,
)


def _kernel(seed, n=7, d=3):
    g = torch.Generator().manual_seed(seed)
    return similarity_matrix(torch.randn(n, d, generator=g), dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_kernel_greedy_follows_brute_force_gains(seed, lam):
    """Each pick maximises f(A + c) - f(A) over all remaining c (graphcut_value, brute force)."""
    s = _kernel(seed)
    picks = graphcut_select_kernel(s, 5, lam=lam).tolist()
    chosen: list[int] = []
    for p in picks:
        gains = {c: graphcut_value(s, chosen + [c], lam) - graphcut_value(s, chosen, lam)
                 for c in range(len(s)) if c not in chosen}
        best = max(gains.values())
        assert gains[p] == pytest.approx(best, abs=1e-9)
        assert p == min(c for c, v in gains.items() if abs(v - best) <= 1e-12)  # ties -> smallest
        chosen.append(p)


@pytest.mark.parametrize("k", [2, 3])
def test_kernel_greedy_finds_brute_force_optimum_on_clusters(k):
    """Three tight, well-separated clusters: greedy takes one per cluster = the global optimum."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    feats = torch.cat([c + 0.1 * torch.randn(3, 3, generator=g) for c in centres])
    s = similarity_matrix(feats, dtype=torch.float64)
    picks = graphcut_select_kernel(s, k)
    best = max(itertools.combinations(range(9), k), key=lambda a: graphcut_value(s, list(a)))
    assert graphcut_value(s, picks) == pytest.approx(graphcut_value(s, list(best)), abs=1e-9)
    assert len({int(p) // 3 for p in picks}) == k


@pytest.mark.parametrize("greedy", ["exact", "stochastic"])
def test_kernel_greedy_matches_coreset_graphcut_on_features(greedy):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(40, 5, generator=g)
    a = graphcut_select(feats, 6, greedy=greedy, generator=torch.Generator().manual_seed(1))
    b = graphcut_select_kernel(similarity_matrix(feats, torch.float64), 6, greedy=greedy,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_kernel_greedy_validation():
    s = _kernel(0)
    with pytest.raises(ValueError, match="k must be"):
        graphcut_select_kernel(s, 0)
    with pytest.raises(ValueError, match="square"):
        graphcut_select_kernel(s[:3], 1)
    with pytest.raises(ValueError, match="greedy"):
        graphcut_select_kernel(s, 1, greedy="lazy")


def test_gradient_kernel_is_cosine_of_last_layer_gradients():
    g = torch.Generator().manual_seed(0)
    n, classes, d = 5, 3, 4
    logits, emb = torch.randn(n, classes, generator=g), torch.randn(n, d, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    resid = torch.softmax(logits, 1) - F.one_hot(y, classes)
    # explicit gradient of CE w.r.t. (bias, weight) of a linear layer: (p - y) and (p - y) e^T
    grads = torch.stack([torch.cat([r, torch.outer(r, e).flatten()]) for r, e in zip(resid, emb, strict=True)]).double()
    u = F.normalize(grads, dim=1)
    assert torch.allclose(gradient_kernel(resid, emb), 0.5 + 0.5 * u @ u.T, atol=1e-10)


def test_quantized_train_images(digits):
    small = type(digits)(digits.info, digits.train.subset(torch.arange(20)), digits.test)
    q = quantized_train_images(small, 2)
    assert q.shape == small.train.images.shape and q.dtype == torch.uint8
    assert all(len(im.unique()) <= 2 for im in q)
    assert torch.equal(quantized_train_images(small, 0), small.train.images)


@pytest.fixture(scope="module")
def small(digits):
    """15 training images per class of digits: the whole init pipeline in about a second."""
    keep = torch.cat([digits.train.class_indices(c)[:15] for c in range(10)]).sort().values
    return type(digits)(digits.info, digits.train.subset(keep), digits.test)


def test_colour_guided_indices_on_digits(small):
    idx = colour_guided_indices(small, 3, 4, seed=0, epochs=1)
    assert len(idx) == 30 and len(idx.unique()) == 30
    assert torch.equal(small.train.labels[idx], torch.arange(10).repeat_interleave(3))
    again = init_indices(small, 3, 4, "graphcut", seed=0, epochs=1)
    assert torch.equal(idx, again)
    assert not torch.equal(idx, init_indices(small, 3, 4, "real", seed=0))


def test_colour_guided_indices_selects_graphcut_of_quantised_embeddings(small, monkeypatch):
    """The rule sees the embeddings of the *quantised* images (spied), and its picks are returned."""
    import decoct.matching.palette.init as pinit

    seen = []

    def spy(feats, k, **kw):
        seen.append(feats.clone())
        return graphcut_select(feats, k, **kw)

    monkeypatch.setattr(pinit, "graphcut_select", spy)
    idx = colour_guided_indices(small, 2, 2, seed=0, epochs=0)
    assert len(seen) == 10 and all(len(f) == 15 for f in seen)
    from decoct.data import normalize
    from decoct.models import model_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = model_for("convnet", small.info).eval()
    with torch.no_grad():
        want = net.embed(normalize(quantized_train_images(small, 2), small.info)).flatten(1)
    c0 = small.train.class_indices(0)
    assert torch.allclose(seen[0], want[c0], atol=1e-5)
    assert torch.equal(idx[:2], c0[graphcut_select(want[c0], 2)])


def test_colour_guided_indices_gradient_similarity(small):
    grad = colour_guided_indices(small, 2, 4, seed=0, epochs=1, similarity="gradients", greedy="stochastic")
    assert torch.equal(small.train.labels[grad], torch.arange(10).repeat_interleave(2))
    assert len(grad.unique()) == 20


def test_colour_guided_indices_validation(small):
    with pytest.raises(ValueError, match="similarity"):
        colour_guided_indices(small, 1, 4, similarity="hessian")
    with pytest.raises(ValueError, match="greedy"):
        colour_guided_indices(small, 1, 4, greedy="lazy")
    with pytest.raises(ValueError, match="ipc"):
        colour_guided_indices(small, 16, 4)
    with pytest.raises(ValueError, match="colors"):
        colour_guided_indices(small, 1, 1)


def test_palette_quantizer_flag_reaches_the_init(small):
    """--palette-quantizer sets the colour-guided init's quantiser too (it used to stop at L_a): the
    parsed flag goes through init_options into init_indices, and another quantiser picks other images."""
    import argparse

    from decoct.matching.palette import add_palette_args, init_options

    p = argparse.ArgumentParser()
    add_palette_args(p)
    picks = {}
    for q in ("mediancut", "kmeans"):
        opts = init_options(p.parse_args(["--palette", "2", "--palette-quantizer", q, "--palette-init-epochs", "0"]))
        assert opts["quantizer"] == q and opts["method"] == "graphcut"
        picks[q] = init_indices(small, 3, 2, seed=0, **opts)
    assert torch.equal(picks["mediancut"], colour_guided_indices(small, 3, 2, seed=0, epochs=0))
    assert not torch.equal(picks["mediancut"], picks["kmeans"])
