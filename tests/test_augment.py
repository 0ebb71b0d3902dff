"""Tests for decoct.augment: DSA (siamese, differentiable, batched) and ZCA whitening."""

from __future__ import annotations

import io
import math

import pytest
import torch

from decoct.augment import DSA, ZCA, DSAParams, dsa
from decoct.augment.dsa import (
    DEFAULT_STRATEGY,
    FAMILIES,
    _cutout,
    _rotate,
    _scale,
    _translate,
    parse_strategy,
)

FAMILY_NAMES = list(FAMILIES)


def _images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


# ----------------------------------------------------------------------------- siamese


@pytest.mark.parametrize("strategy", FAMILY_NAMES + [DEFAULT_STRATEGY])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_same_seed_same_transform_across_batch_sizes(strategy: str, mode: str) -> None:
    a = _images(2, seed=1)
    b = torch.cat([_images(4, seed=2), a[:1], _images(2, seed=3)])  # a[0] at index 4
    for seed in range(5):
        out_a = dsa(a, strategy, seed=seed, mode=mode)
        out_b = dsa(b, strategy, seed=seed, mode=mode)
        torch.testing.assert_close(out_a[0], out_b[4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", FAMILY_NAMES + [DEFAULT_STRATEGY])
def test_seeded_batch_mode_shares_one_draw(strategy: str) -> None:
    x = _images(1).expand(5, -1, -1, -1).clone()
    out = dsa(x, strategy, seed=7)
    for i in range(1, 5):
        torch.testing.assert_close(out[i], out[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", FAMILY_NAMES + [DEFAULT_STRATEGY])
def test_different_seeds_differ(strategy: str) -> None:
    x = _images(2)
    ref = dsa(x, strategy, seed=0)
    assert any(not torch.allclose(dsa(x, strategy, seed=s), ref) for s in range(1, 12))


def test_seeded_mode_leaves_global_rng_untouched() -> None:
    x = _images(3)
    state = torch.get_rng_state()
    dsa(x, DEFAULT_STRATEGY, seed=3, mode="M")
    DSA()(x, seed=4)
    assert torch.equal(torch.get_rng_state(), state)


def test_explicit_generator_is_reproducible_and_leaves_global_rng() -> None:
    x = _images(4)
    state = torch.get_rng_state()
    out1 = dsa(x, DEFAULT_STRATEGY, mode="M", generator=torch.Generator().manual_seed(5))
    out2 = dsa(x, DEFAULT_STRATEGY, mode="M", generator=torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_and_generator_together_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        dsa(_images(1), "flip", seed=1, generator=torch.Generator())


@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_unseeded_mode_draws_per_sample(strategy: str) -> None:
    x = _images(1).expand(16, -1, -1, -1).clone()
    out = dsa(x, strategy, generator=torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 1


def test_unseeded_global_rng_follows_manual_seed() -> None:
    x = _images(3)
    torch.manual_seed(11)
    out1 = DSA(mode="M")(x)
    torch.manual_seed(11)
    out2 = DSA(mode="M")(x)
    assert torch.equal(out1, out2)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("strategy", FAMILY_NAMES + [DEFAULT_STRATEGY])
@pytest.mark.parametrize("seed", [None, 2])
def test_gradients_flow(strategy: str, seed: int | None) -> None:
    x = _images(3).requires_grad_(True)
    weights = _images(3, seed=9)
    torch.manual_seed(0)
    out = dsa(x, strategy, seed=seed, params=DSAParams(prob_flip=1.0), mode="M")
    (out * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- hand cases


def test_flip_prob_one_equals_torch_flip() -> None:
    x = _images(4)
    p = DSAParams(prob_flip=1.0)
    assert torch.equal(dsa(x, "flip", seed=0, params=p), torch.flip(x, [3]))
    assert torch.equal(dsa(x, "flip", params=p), torch.flip(x, [3]))
    assert torch.equal(dsa(x, "flip", params=DSAParams(prob_flip=0.0)), x)


def test_translate_matches_hand_shift() -> None:
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    # dx=1 moves content right by one, dy=-1 moves it up by one.
    expected = torch.zeros_like(x)
    expected[:, :, 0:3, 1:4] = x[:, :, 1:4, 0:3]
    assert torch.equal(_translate(x, torch.tensor([1]), torch.tensor([-1])), expected)

    batch = torch.cat([x, x])
    out = _translate(batch, torch.tensor([0, -2]), torch.tensor([0, 3]))
    assert torch.equal(out[0], x[0])
    expected2 = torch.zeros_like(x[0])
    expected2[:, 3:4, 0:2] = x[0, :, 0:1, 2:4]
    assert torch.equal(out[1], expected2)


def test_crop_is_a_bounded_integer_shift() -> None:
    x = _images(1, c=2, h=16, w=16)
    max_shift = int(16 * DSAParams().ratio_crop_pad + 0.5)
    shifts = range(-max_shift, max_shift + 1)
    for seed in range(5):
        out = dsa(x, "crop", seed=seed)
        matches = [
            (dx, dy)
            for dx in shifts
            for dy in shifts
            if torch.equal(out, _translate(x, torch.tensor([dx]), torch.tensor([dy])))
        ]
        assert matches, f"seed {seed}: crop is not a shift within +-{max_shift}"


def test_cutout_zeros_expected_square() -> None:
    x = torch.ones(2, 1, 6, 6)
    out = _cutout(x, torch.tensor([1, 0]), torch.tensor([5, 0]), 3, 4)
    expected = torch.ones(2, 1, 6, 6)
    expected[0, :, 0:3, 3:6] = 0  # rows [1-1, 1-1+3), cols [5-2, 5-2+4) clipped at 6
    expected[1, :, 0:2, 0:2] = 0  # rows [-1, 2), cols [-2, 2): clipped at the corner
    assert torch.equal(out, expected)


def test_random_cutout_hole_is_a_clipped_square() -> None:
    x = torch.ones(1, 1, 8, 8)
    side = int(8 * DSAParams().ratio_cutout + 0.5)
    for seed in range(10):
        hole = dsa(x, "cutout", seed=seed)[0, 0] == 0
        rows = hole.any(dim=1).nonzero().flatten()
        cols = hole.any(dim=0).nonzero().flatten()
        assert 0 < len(rows) <= side and 0 < len(cols) <= side
        assert int(hole.sum()) == len(rows) * len(cols)  # a filled rectangle


def test_color_matches_formula() -> None:
    x = _images(2)
    p = DSAParams()
    seed = 13
    g = torch.Generator().manual_seed(seed)
    r_b, r_s, r_c = (torch.rand(1, generator=g).item() for _ in range(3))
    y = x + (r_b - 0.5) * p.brightness
    m = y.mean(dim=1, keepdim=True)
    y = (y - m) * (r_s * p.saturation) + m
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * (r_c + p.contrast) + m
    torch.testing.assert_close(dsa(x, "color", seed=seed, mode="M"), y)


def test_rotate_zero_and_scale_one_are_identity() -> None:
    x = _images(3)
    torch.testing.assert_close(_rotate(x, torch.zeros(3)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(_scale(x, torch.ones(3), torch.ones(3)), x, atol=1e-5, rtol=0)
    p = DSAParams(ratio_rotate=0.0, ratio_scale=1.0)
    torch.testing.assert_close(dsa(x, "rotate_scale", params=p, mode="M"), x, atol=1e-5, rtol=0)


def test_rotate_quarter_turn() -> None:
    x = _images(1, h=5, w=5)
    out = _rotate(x, torch.tensor([math.pi / 2]))
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))


def test_mode_s_applies_exactly_one_family() -> None:
    x = _images(1) + 100.0  # no pixel is zero
    p = DSAParams(prob_flip=1.0)
    seen = set()
    for seed in range(20):
        out = dsa(x, "flip_cutout", seed=seed, params=p, mode="S")
        if torch.equal(out, torch.flip(x, [3])):
            seen.add("flip")
        else:
            kept = out != 0
            assert (~kept).any() and torch.equal(out[kept], x[kept])
            seen.add("cutout")
    assert seen == {"flip", "cutout"}


# ----------------------------------------------------------------------------- API details


def test_unknown_family_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="blur") as info:
        dsa(_images(1), "color_blur")
    assert "rotate" in str(info.value)  # lists the known families
    with pytest.raises(ValueError, match="blur"):
        DSA("blur")
    with pytest.raises(ValueError, match="mode"):
        DSA(mode="X")


@pytest.mark.parametrize("strategy", ["none", "", "None"])
def test_none_strategy_is_identity(strategy: str) -> None:
    x = _images(2)
    assert dsa(x, strategy, seed=1) is x
    assert DSA(strategy)(x) is x
    assert parse_strategy(strategy) == ()


@pytest.mark.parametrize("strategy", FAMILY_NAMES)
def test_channels_last_matches_contiguous(strategy: str) -> None:
    x = _images(3)
    x_cl = x.to(memory_format=torch.channels_last)
    out = dsa(x, strategy, seed=4)
    out_cl = dsa(x_cl, strategy, seed=4)
    torch.testing.assert_close(out_cl, out, atol=1e-6, rtol=1e-6)
    if strategy in ("crop", "cutout", "color"):
        assert out_cl.is_contiguous(memory_format=torch.channels_last)


def test_dsa_class_matches_functional() -> None:
    x = _images(3)
    aug = DSA(DEFAULT_STRATEGY, DSAParams(), mode="S")
    assert torch.equal(aug(x, seed=21), dsa(x, DEFAULT_STRATEGY, seed=21))
    assert "color" in repr(aug)


# ----------------------------------------------------------------------------- ZCA


def _correlated(n: int = 600, shape: tuple[int, ...] = (3, 2, 2), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    z = torch.randn(n, d, generator=g) @ mix + torch.randn(d, generator=g)
    return z.view(n, *shape)


def _cov64(x: torch.Tensor) -> torch.Tensor:
    return torch.cov(x.reshape(x.shape[0], -1).double().T)


def test_zca_whitened_covariance_in_eigenbasis() -> None:
    x = _correlated()
    eps = 0.1
    zca = ZCA().fit(x, eps=eps)
    evals, evecs = torch.linalg.eigh(_cov64(x))
    cov_y = evecs.T @ _cov64(zca.transform(x)) @ evecs
    expected = torch.diag(evals / (evals + eps))
    torch.testing.assert_close(cov_y, expected, atol=2e-4, rtol=0)


def test_zca_tiny_eps_whitens_to_identity() -> None:
    x = _correlated()
    zca = ZCA().fit(x, eps=1e-6)
    cov_y = _cov64(zca.transform(x))
    torch.testing.assert_close(
        cov_y, torch.eye(cov_y.shape[0], dtype=torch.float64), atol=1e-3, rtol=0
    )
    assert zca.transform(x).reshape(len(x), -1).mean(0).abs().max() < 1e-4


def test_zca_inverse_roundtrip() -> None:
    x = _correlated()
    zca = ZCA().fit(x)
    torch.testing.assert_close(zca.inverse(zca.transform(x)), x, atol=1e-4, rtol=0)


def test_zca_chunked_fit_matches_single_chunk() -> None:
    x = _correlated(n=101)
    a = ZCA().fit(x, chunk_size=7)
    b = ZCA().fit(x, chunk_size=1000)
    for key in ("mean", "W"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a._inverse_matrix(), b._inverse_matrix(), atol=1e-5, rtol=1e-5)


def test_zca_state_dict_roundtrip() -> None:
    x = _correlated()
    zca = ZCA().fit(x)
    sd = zca.state_dict()
    assert set(sd) == {"mean", "evecs", "evals", "shape"}  # one D x D matrix, not two
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["evecs"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = ZCA.from_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(loaded.transform(x), zca.transform(x))
    assert torch.equal(loaded.inverse(x), zca.inverse(x))


def test_zca_legacy_w_winv_state_loads() -> None:
    """Artifacts written before the eigendecomposition format (W and W_inv) still load."""
    x = _correlated()
    zca = ZCA().fit(x)
    legacy = {"mean": zca.mean, "W": zca.W, "W_inv": zca._inverse_matrix(), "shape": torch.tensor(zca.shape)}
    loaded = ZCA.from_state_dict(legacy)
    assert torch.equal(loaded.transform(x), zca.transform(x))
    assert set(loaded.state_dict()) == {"mean", "W", "W_inv", "shape"}


def test_zca_shape_mismatch_and_misuse_raise() -> None:
    zca = ZCA()
    with pytest.raises(RuntimeError, match="not fitted"):
        zca.transform(torch.zeros(1, 3, 2, 2))
    zca.fit(_correlated())
    with pytest.raises(ValueError, match="shape"):
        zca.transform(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        zca.inverse(torch.zeros(2, 1, 2, 2))
    with pytest.raises(KeyError, match="evecs"):
        ZCA.from_state_dict({"mean": zca.mean, "W": zca.W, "shape": torch.tensor([3, 2, 2])})
    with pytest.raises(ValueError, match="eigenvalues"):
        ZCA.from_state_dict({"mean": zca.mean, "evecs": zca.evecs, "evals": -zca.evals,
                             "shape": torch.tensor([3, 2, 2])})
    with pytest.raises(ValueError, match="eps"):
        ZCA().fit(_correlated(), eps=0.0)


def test_zca_transform_is_differentiable() -> None:
    zca = ZCA().fit(_correlated())
    x = _correlated(n=4, seed=1).requires_grad_(True)
    zca.transform(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_dsa_and_zca_match_on_cuda() -> None:
    x = _images(3)
    for seed in range(6):
        out_cpu = dsa(x, DEFAULT_STRATEGY, seed=seed, mode="M")
        out_gpu = dsa(x.cuda(), DEFAULT_STRATEGY, seed=seed, mode="M")
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    zca = ZCA().fit(_correlated())
    y = _correlated(n=4, seed=1)
    torch.testing.assert_close(
        zca.transform(y.cuda()).cpu(), zca.transform(y), atol=1e-5, rtol=1e-5
    )
