"""Trainer and multi-student engines on tiny CPU problems (ConvNet-D2, width 8, 3x8x8 images)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoct.models import MLP, ConvNet
from decoct.train import (
    GroupedConvNet,
    TrainConfig,
    evaluate_accuracy,
    fit_students,
    lr_at,
    resolve_engine,
    seeded_model,
    train_model,
    train_students,
)
from decoct.train.trainer import target_loss

K = 4


def tiny_convnet(norm: str = "instance") -> ConvNet:
    return ConvNet(K, 3, 8, depth=2, width=8, norm=norm)


def separable(n: int = 32, seed: int = 0, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes plus noise: linearly separable, so 100% train accuracy is reachable."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(K, 3, 8, 8, generator=g)
    y = torch.arange(n) % K
    x = protos[y] + noise * torch.randn(n, 3, 8, 8, generator=g)
    return x, y


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip drawn from the trainer's generator."""
    m = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(m[:, None, None, None], x.flip(3), x)


def flat_params(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# --------------------------------------------------------------------------------------
# TrainConfig and single-model training
# --------------------------------------------------------------------------------------


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="'warmup'"):
        TrainConfig(schedule="warmup")
    with pytest.raises(ValueError, match="'lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch_size=0)


def test_train_model_fits_separable_problem():
    x, y = separable()
    model = seeded_model(tiny_convnet, 0)
    losses: list[float] = []
    cfg = TrainConfig(epochs=15, lr=0.05, batch_size=8)
    out = train_model(model, x, y, cfg, seed=0, log=lambda d: losses.append(d["loss"]))
    assert out is model
    assert len(losses) == 15
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate_accuracy(model, x, y, batch_size=5) == 1.0
    assert model.training  # evaluate_accuracy restores the mode


def test_soft_targets_one_hot_equals_cross_entropy():
    torch.manual_seed(0)
    out = torch.randn(6, K, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = TrainConfig(soft_temperature=1.0)
    soft = F.one_hot(y, K).float().log()  # logits whose softmax is the one-hot vector
    l_soft = target_loss(out, soft, cfg, len(y))
    (g_soft,) = torch.autograd.grad(l_soft, out)
    l_hard = F.cross_entropy(out, y)
    (g_hard,) = torch.autograd.grad(l_hard, out)
    torch.testing.assert_close(l_soft, l_hard)
    torch.testing.assert_close(g_soft, g_hard)
    # temperature: T^2 * KL at T, zero when student logits equal the targets
    assert target_loss(out.detach(), out.detach(), TrainConfig(soft_temperature=4.0), 6).abs() < 1e-6


def test_train_model_soft_targets_learn_teacher():
    x, y = separable(seed=1)
    teacher_logits = 5.0 * F.one_hot(y, K).float()
    model = seeded_model(tiny_convnet, 1)
    cfg = TrainConfig(epochs=15, lr=0.05, batch_size=8, soft_temperature=2.0)
    train_model(model, x, teacher_logits, cfg, seed=1)
    assert evaluate_accuracy(model, x, y) == 1.0
    with pytest.raises(ValueError, match="label_smoothing"):
        train_model(model, x, teacher_logits, TrainConfig(epochs=1, label_smoothing=0.1))


def test_step_schedule_decays_at_half():
    x, y = separable(n=8)
    lrs: list[float] = []
    cfg = TrainConfig(epochs=6, lr=0.02, batch_size=8, schedule="step")
    train_model(seeded_model(tiny_convnet, 0), x, y, cfg, log=lambda d: lrs.append(d["lr"]))
    assert lrs == pytest.approx([0.02] * 3 + [0.002] * 3)
    cos = TrainConfig(epochs=4, lr=1.0, schedule="cosine")
    assert [lr_at(cos, e) for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert lr_at(TrainConfig(epochs=4, schedule="constant"), 3) == 0.01


def test_seeded_model_is_reproducible_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, b, c = seeded_model(tiny_convnet, 3), seeded_model(tiny_convnet, 3), seeded_model(tiny_convnet, 4)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(flat_params(a), flat_params(b))
    assert not torch.equal(flat_params(a), flat_params(c))


def test_amp_on_cpu_raises():
    x, y = separable(n=8)
    with pytest.raises(ValueError, match="amp"):
        train_model(tiny_convnet(), x, y, TrainConfig(epochs=1, amp=True))
    with pytest.raises(ValueError, match="amp"):
        fit_students(tiny_convnet, x, y, TrainConfig(epochs=1, amp=True), seeds=[0], engine="grouped")


def test_bad_targets_raise():
    x, y = separable(n=8)
    with pytest.raises(ValueError, match="length"):
        train_model(tiny_convnet(), x, y[:4], TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="integer"):
        train_model(tiny_convnet(), x, y.float(), TrainConfig(epochs=1))


# --------------------------------------------------------------------------------------
# Multi-student engines
# --------------------------------------------------------------------------------------


def test_grouped_convnet_forward_matches_separate_convnets():
    nets = [seeded_model(tiny_convnet, s) for s in range(3)]
    grouped = GroupedConvNet(nets)
    xs = torch.randn(5, 3, 3, 8, 8)  # (B, R, C, H, W)
    ref = torch.stack([net(xs[:, r]) for r, net in enumerate(nets)])
    torch.testing.assert_close(grouped(xs), ref, atol=1e-5, rtol=1e-5)
    shared = torch.stack([net(xs[:, 0]) for net in nets])
    torch.testing.assert_close(grouped.forward_shared(xs[:, 0]), shared, atol=1e-5, rtol=1e-5)
    copies = grouped.copy_to([tiny_convnet() for _ in range(3)])
    for a, b in zip(copies, nets, strict=True):
        assert torch.equal(flat_params(a), flat_params(b))


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_engines_train_identical_students(norm: str):
    x, y = separable(n=20, seed=2, noise=1.0)
    tx, ty = separable(n=24, seed=3, noise=1.0)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=8)  # 8 + 8 + 4: last smaller batch kept

    def factory() -> ConvNet:
        return tiny_convnet(norm)

    seeds = [0, 1, 5]
    ref = fit_students(factory, x, y, cfg, seeds=seeds, augment=flip, engine="sequential")
    # the sequential engine is exactly R independent train_model runs
    solo = train_model(seeded_model(factory, 5), x, y, cfg, augment=flip, seed=5)
    assert torch.equal(flat_params(solo), flat_params(ref[2]))
    assert not torch.equal(flat_params(ref[2]), flat_params(seeded_model(factory, 5)))
    ref_acc = train_students(factory, x, y, tx, ty, cfg, seeds=seeds, augment=flip, engine="sequential")
    for engine in ("vmap", "grouped"):
        got = fit_students(factory, x, y, cfg, seeds=seeds, augment=flip, engine=engine)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(flat_params(a), flat_params(b), atol=1e-4, rtol=1e-4)
        acc = train_students(factory, x, y, tx, ty, cfg, seeds=seeds, augment=flip, engine=engine)
        assert acc == pytest.approx(ref_acc, abs=1.5 / len(ty))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_engines_soft_targets_agree(optimizer: str):
    x, y = separable(n=12, seed=4)
    soft = torch.randn(12, K)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=8, soft_temperature=2.0, optimizer=optimizer, schedule="cosine")
    # Adam rescales even a zero gradient's rounding noise to a full step: the conv biases in
    # front of instance norm have exactly-zero true gradients, so compare AdamW without norm,
    # and near-zero gradients still amplify summation-order noise (hence the looser atol).
    norm = "instance" if optimizer == "sgd" else "none"
    atol = 1e-4 if optimizer == "sgd" else 2e-3

    def factory() -> ConvNet:
        return tiny_convnet(norm)

    ref = fit_students(factory, x, soft, cfg, seeds=[0, 1], engine="sequential")
    for engine in ("vmap", "grouped"):
        got = fit_students(factory, x, soft, cfg, seeds=[0, 1], engine=engine)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(flat_params(a), flat_params(b), atol=atol, rtol=1e-4)


def test_engine_errors():
    x, y = separable(n=8)
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="'turbo'"):
        fit_students(tiny_convnet, x, y, cfg, seeds=[0], engine="turbo")
    with pytest.raises(ValueError, match="BatchNorm2d"):
        fit_students(lambda: tiny_convnet("batch"), x, y, cfg, seeds=[0, 1], engine="vmap")
    with pytest.raises(ValueError, match="GroupedConvNet"):
        fit_students(lambda: MLP(K, 3, 8, width=16), x, y, cfg, seeds=[0, 1], engine="grouped")
    with pytest.raises(ValueError, match="seeds"):
        fit_students(tiny_convnet, x, y, cfg, seeds=[], engine="sequential")


def test_auto_engine_rule():
    assert resolve_engine("auto", tiny_convnet(), "cpu") == "sequential"  # measured fastest
    assert resolve_engine("auto", tiny_convnet("batch"), "cpu") == "sequential"
    assert resolve_engine("auto", MLP(K, 3, 8), "cpu") == "sequential"
    assert resolve_engine("auto", tiny_convnet(), "cuda") == "vmap"
    assert resolve_engine("auto", tiny_convnet("batch"), "cuda") == "sequential"
    x, y = separable(n=8)
    accs = train_students(tiny_convnet, x, y, x, y, TrainConfig(epochs=1), seeds=[0, 1])
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)


def test_engines_agree_in_channels_last():
    x, y = separable(n=12, seed=5)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=8, channels_last=True)
    ref = fit_students(tiny_convnet, x, y, TrainConfig(epochs=2, lr=0.05, batch_size=8), seeds=[0, 1],
                       augment=flip, engine="sequential")
    for engine in ("sequential", "vmap", "grouped"):
        got = fit_students(tiny_convnet, x, y, cfg, seeds=[0, 1], augment=flip, engine=engine)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(flat_params(a), flat_params(b), atol=1e-4, rtol=1e-4)


def test_vmap_engine_trains_mlp():
    x, y = separable(n=12)
    factory = lambda: MLP(K, 3, 8, width=16)  # noqa: E731
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=8)
    ref = fit_students(factory, x, y, cfg, seeds=[0, 1], engine="sequential")
    got = fit_students(factory, x, y, cfg, seeds=[0, 1], engine="vmap")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(flat_params(a), flat_params(b), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- progress inside an epoch (issue 10, point 9)
@pytest.mark.parametrize("engine", ["sequential", "grouped"])
def test_progress_counts_images_inside_the_epoch_in_plain_lines(engine, monkeypatch, capsys):
    """Into a file (not a terminal) the trainers print plain lines counting images, not epochs, so an
    epoch of a large set shows progress before it ends; no carriage-return redraws."""
    import decoct.runtime.progress as prog

    monkeypatch.setattr(prog, "QUIET_S", 0.0)  # tiny loops: print every 10 % line
    monkeypatch.delenv("DECOCT_PROGRESS", raising=False)
    x, y = separable(n=600)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.01)
    fit_students(tiny_convnet, x, y, cfg, seeds=[0, 1], engine=engine, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train")]
    bars = 2 if engine == "sequential" else 1  # one bar per training loop
    assert "\r" not in err and 8 * bars <= len(lines) <= 12 * bars, err
    first = lines[0]  # crossing 10 % of 1200 images: after 2 batches of 64, inside epoch 1
    assert "% 128/1200 img" in first and "img/s" in first, first
    assert lines[-1].split(":", 1)[1].lstrip().startswith("100% 1200/1200 img")
