"""DSA's scale and rotate resample as the references do: align_corners=False (DSA's own code, used by
DM), True where MTT's copy of it is the reference (experts, TM)."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from decoct.augment import DSA, DSAParams, dsa
from decoct.augment.dsa import _rotate, _scale

dsa_mod = importlib.import_module("decoct.augment.dsa")  # MTT_PARAMS looked up per test

pytestmark = pytest.mark.usefixtures("one_thread")

# x[r, c] = 4 r + c + 1 on a 2 x 4 image (non-square: the only case where the two conventions differ)
X24 = torch.arange(1.0, 9.0).view(1, 1, 2, 4)


def test_quarter_turn_matches_hand_computed_align_corners_false() -> None:
    """theta [[0, 1, 0], [-1, 0, 0]]. align_corners=False puts output pixel (i, j) at base
    ((2j + 1) / 4 - 1, (2i + 1) / 2 - 1) and reads input pixel x = ((u + 1) 4 - 1) / 2 = 0.5 | 2.5 (rows
    i = 0 | 1), y = 0.5 - base_x = 1.25, 0.75, 0.25, -0.25 (columns j); bilinear with zero padding."""
    want_false = torch.tensor([[4.125, 4.5, 2.5, 1.125], [5.625, 6.5, 4.5, 2.625]]).view(1, 1, 2, 4)
    # align_corners=True: x = 0 | 3 (columns 0 and 3), y = 1, 2/3, 1/3, 0
    want_true = torch.tensor([[5, 11 / 3, 7 / 3, 1], [8, 20 / 3, 16 / 3, 4]]).view(1, 1, 2, 4)
    quarter = torch.tensor([math.pi / 2])
    torch.testing.assert_close(_rotate(X24, quarter), want_false, atol=1e-5, rtol=0)
    torch.testing.assert_close(_rotate(X24, quarter, align_corners=True), want_true, atol=1e-5, rtol=0)
    theta = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]])
    with pytest.warns(UserWarning, match="align_corners"):  # PyTorch's default, as DSA's code calls them
        grid = F.affine_grid(theta, [1, 1, 2, 4])
        torch.testing.assert_close(F.grid_sample(X24, grid), want_false, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_rotate_family_resamples_as_dsa_code_by_default(seed: int) -> None:
    """The random family (mode M: one uniform draw for the angle) equals grid_sample(align_corners=False)
    through the same theta, and not the True convention, on a non-square batch."""
    x = torch.randn(2, 3, 4, 12, generator=torch.Generator().manual_seed(seed))
    p = DSAParams(ratio_rotate=60.0)
    g = torch.Generator().manual_seed(seed)
    angle = (float(torch.rand(1, generator=g)) - 0.5) * 2 * math.radians(p.ratio_rotate)
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]]).expand(2, 2, 3)

    def ref(align: bool) -> torch.Tensor:
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=align), align_corners=align)

    out = dsa(x, "rotate", seed=seed, mode="M", params=p)
    torch.testing.assert_close(out, ref(False), atol=1e-5, rtol=0)
    assert (ref(True) - ref(False)).abs().max() > 0.05  # the conventions really differ here
    mtt = DSAParams(ratio_rotate=60.0, align_corners=True)
    torch.testing.assert_close(dsa(x, "rotate", seed=seed, mode="M", params=mtt), ref(True), atol=1e-5, rtol=0)


def test_scale_is_the_same_in_both_conventions() -> None:
    """Scaling about the centre samples the same pixel positions either way (any image shape)."""
    x = torch.randn(3, 2, 5, 9, generator=torch.Generator().manual_seed(0))
    sx, sy = torch.tensor([0.8, 1.0, 1.2]), torch.tensor([1.2, 0.9, 0.85])
    torch.testing.assert_close(_scale(x, sx, sy), _scale(x, sx, sy, align_corners=True), atol=1e-5, rtol=0)


def test_trajectory_matching_uses_mtt_resampling(digits, tmp_path, monkeypatch) -> None:
    """TM's replayable DSA and the experts' DSA resample with align_corners=True, as MTT's utils.py."""
    from decoct.matching import experts as experts_mod
    from decoct.matching.tm import dsa_augment

    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(dsa_augment("rotate")(x, 7), DSA("rotate", dsa_mod.MTT_PARAMS)(x, generator=g))
    assert dsa_mod.MTT_PARAMS.align_corners and not DSAParams().align_corners

    made: list[DSA] = []

    class Made(Exception):
        pass

    class Recording(DSA):  # records the experts' DSA, then stops before any training
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
            raise Made

    monkeypatch.setattr(experts_mod, "DSA", Recording)
    with pytest.raises(Made):
        experts_mod.train_experts(digits, tmp_path / "e", num_experts=1, epochs=1, device="cpu", progress=False,
                                  model_kwargs=dict(width=4, norm="instance"))
    assert len(made) == 1 and made[0].params.align_corners is True
