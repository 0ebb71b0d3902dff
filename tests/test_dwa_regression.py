"""DWA regressions the rest of the suite would miss: a synthesis step runs through the *adjusted*
teacher (loss and image gradient), and the adjustment is driven by the batch's real images even
when synthesis starts from noise."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoct.decoupled.recover import (
    Recover,
    RecoverConfig,
    batch_generator,
    batch_moments,
    bn_matching_loss,
    directed_weight_adjustment,
)
from decoct.decoupled.squeeze import squeeze

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("dwa") / "teacher"
    squeeze(digits, "convnet_bn", out=out, epochs=2, model_kwargs=dict(width=8), device="cpu", show_progress=False)
    return out


def _dwa(teacher, digits, **kw):
    """A DWA run with no augmentation (jitter 0; the small preset has no crop or flip), so a step
    and its weight adjustment draw nothing from the batch generator and can be recomputed by hand.
    rho 0.5 (preset 0.015) so the adjusted teacher differs from the original by far more than rounding."""
    cfg = dict(iterations=3, jitter=0, dwa_steps=3, dwa_rho=0.5, seed=1)
    cfg.update(kw)
    rec = Recover(RecoverConfig(str(teacher), 1, method="dwa", **cfg))
    rec.init(digits, CPU)
    assert not rec.config.crop and not rec.config.flip and rec.config.jitter == 0
    return rec


def _adjusted(rec, images, y):
    """The original teacher adjusted by hand, as DWA does, on ``images``."""
    net = copy.deepcopy(rec.base)
    directed_weight_adjustment(net, images, y, rec.config.dwa_steps, rec.config.dwa_rho)
    return net


def _params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _objective(rec, net, x, y):
    """The synthesis loss of ``x`` through ``net`` (CE + r_bn x BN matching) and its image gradient."""
    cfg = rec.config
    feats = {}
    names = dict(net.named_modules())
    hooks = [names[n].register_forward_pre_hook(lambda m, inp, n=n: feats.__setitem__(n, batch_moments(inp[0])))
             for n in rec.layers]
    x = x.detach().clone().requires_grad_(True)
    try:
        out = net(x)
    finally:
        for h in hooks:
            h.remove()
    bn = bn_matching_loss([feats[n] for n in rec.layers], rec.targets_running,
                          first_bn_multiplier=cfg.first_bn_multiplier, r_var=cfg.r_var)
    loss = F.cross_entropy(out.float(), y) + cfg.r_bn * bn
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad


def _first_adam_step(rec, x, grad):
    """Adam's first update (bias-corrected: lr * g / (|g| + eps)) at the cosine schedule's t = 0, then the clamp."""
    x1 = x - rec.config.lr * grad / (grad.abs() + 1e-8)
    return torch.maximum(torch.minimum(x1, rec.hi), rec.lo)


def test_a_synthesis_step_runs_through_the_adjusted_teacher(teacher, digits):
    rec = _dwa(teacher, digits)
    rec._start_batch(0)
    x0, y = rec.cur["x"].detach().clone(), rec.cur["y"]
    real = rec._real(rec.mine[0])
    assert torch.equal(x0, real)  # DWA: real initialisation
    adjusted = _adjusted(rec, real, y)
    loss_adj, g_adj = _objective(rec, adjusted, x0, y)
    loss_base, g_base = _objective(rec, rec.base, x0, y)
    assert abs(loss_adj - loss_base) > 1e-2 * abs(loss_base)  # the adjustment matters measurably here

    metrics = rec.step(0)
    x1 = rec.cur["x"].detach()
    assert metrics["loss"] == pytest.approx(loss_adj, rel=1e-5)  # the loss of the adjusted teacher ...
    assert metrics["loss"] != pytest.approx(loss_base, rel=1e-3)  # ... not of the original
    # ... and the image moved along the adjusted teacher's gradient (pixels with a clear gradient sign)
    clear = (g_adj.abs() > 1e-6) & (g_base.abs() > 1e-6)
    want, other = _first_adam_step(rec, x0, g_adj), _first_adam_step(rec, x0, g_base)
    torch.testing.assert_close(x1[clear], want[clear], rtol=0, atol=1e-4)
    assert int(((x1 - other).abs() > 0.1)[clear].sum()) > 10  # the original's gradient would move it elsewhere
    # the adjusted copy stays frozen for the whole batch; the original teacher is never moved
    assert torch.equal(_params(rec.work), _params(adjusted))
    rec.step(1)
    assert torch.equal(_params(rec.work), _params(adjusted))
    assert not torch.equal(_params(rec.base), _params(adjusted))


def test_noise_init_still_adjusts_on_the_batchs_real_images(teacher, digits):
    rec = _dwa(teacher, digits, init="noise")
    batch = rec.mine[0]
    rec._start_batch(0)
    x0, y = rec.cur["x"].detach().clone(), rec.cur["y"]
    c, h, w = rec.info.image_shape
    noise = torch.randn(len(batch.classes), c, h, w, generator=batch_generator(rec.config.seed, batch.index))
    assert torch.equal(x0, noise)  # synthesis starts from noise ...
    real = rec._real(batch)
    by_real, by_noise = _adjusted(rec, real, y), _adjusted(rec, noise, y)
    assert (_params(by_real) - _params(by_noise)).abs().max() > 1e-3  # the images driving it matter
    # ... and the teacher was adjusted on the batch's real images (as in DWA's code), not on the noise
    assert torch.equal(_params(rec.work), _params(by_real))
    d = float((_params(rec.work) - _params(rec.base)).norm())
    assert rec.cur["adjust"] == pytest.approx(d, rel=1e-4) and 0 < d <= 0.5 + 1e-6
    # the first step's loss is the real-adjusted teacher's on the noise images
    metrics = rec.step(0)
    assert metrics["loss"] == pytest.approx(_objective(rec, by_real, x0, y)[0], rel=1e-5)
    assert metrics["loss"] != pytest.approx(_objective(rec, by_noise, x0, y)[0], rel=1e-4)


def test_a_resumed_batch_keeps_the_adjusted_teacher(teacher, digits):
    """A checkpoint taken mid-batch restores the adjusted weights (not the original teacher's)."""
    rec = _dwa(teacher, digits, init="noise")
    rec.step(0)
    state = rec.state_dict()
    adjusted = _params(rec.work).clone()
    again = _dwa(teacher, digits, init="noise")
    again.load_state_dict(state)
    assert torch.equal(_params(again.work), adjusted)
    assert not torch.equal(_params(again.work), _params(again.base))
    assert isinstance(again.work, nn.Module) and again.work is not again.base
