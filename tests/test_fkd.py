"""Recorded FKD augmentation (draw / apply) and the soft-label student trainer."""

import math

import pytest
import torch
import torch.nn.functional as F

from decoct.augment.recorded_views import (
    ViewRecipe,
    ViewRecord,
    apply_views,
    draw_views,
    seeded_generator,
)
from decoct.train.soft_students import (
    FKDConfig,
    _optimizer,
    kd_loss,
    lr_factor,
    soft_recipe_for,
    train_fkd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rec(crop, flip, **kw):
    return ViewRecord(crop=torch.tensor(crop, dtype=torch.int16), flip=torch.tensor(flip), **kw)


def test_apply_matches_hand_computed_crop_flip():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    # 2x2 crop at (1, 0) upsampled to 4x4: 1-D taps [a, .75a+.25b, .25a+.75b, b] (align_corners=False)
    t = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    patch = x[0, 0, 1:3, 0:2]
    want = t @ patch @ t.T
    out = apply_views(x, _rec([[1, 0, 2, 2]], [False]))
    assert torch.allclose(out[0, 0], want, atol=1e-6)
    flipped = apply_views(x, _rec([[1, 0, 2, 2]], [True]))
    assert torch.allclose(flipped[0, 0], want.flip(1), atol=1e-6)
    # padded crop: top -1, left 2, full size; outside the image reads the fill value
    pad = apply_views(x, _rec([[-1, 2, 4, 4]], [False]), fill=torch.tensor([-9.0]))
    want_pad = torch.full((4, 4), -9.0)
    want_pad[1:, :2] = x[0, 0, :3, 2:]
    assert torch.equal(pad[0, 0], want_pad)
    # the identity box returns the image unchanged, bit for bit
    assert torch.equal(apply_views(x, _rec([[0, 0, 4, 4]], [False])), x)


def test_apply_matches_interpolate_and_is_deterministic():
    x = torch.randn(6, 3, 12, 12)
    rec = draw_views(6, 12, 12, ViewRecipe(crop="rrc"), seeded_generator(1, 2))
    out = apply_views(x, rec)
    assert torch.equal(out, apply_views(x, rec))
    for i in range(6):
        t, left, h, w = rec.crop[i].tolist()
        ref = F.interpolate(x[i:i + 1, :, t:t + h, left:left + w], size=(12, 12), mode="bilinear",
                            align_corners=False)
        if rec.flip[i]:
            ref = ref.flip(-1)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)


def test_draw_is_seeded_and_boxes_are_valid():
    recipe = ViewRecipe(crop="rrc", scale=(0.08, 1.0))
    a = draw_views(64, 16, 16, recipe, seeded_generator(0, "view", 3, 1))
    b = draw_views(64, 16, 16, recipe, seeded_generator(0, "view", 3, 1))
    c = draw_views(64, 16, 16, recipe, seeded_generator(0, "view", 3, 2))
    assert torch.equal(a.crop, b.crop) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.crop, c.crop)
    top, left, h, w = a.crop.long().unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 16).all() and (left + w <= 16).all()
    area = (h * w).float() / 256
    assert area.min() >= 0.08 * 0.5 and a.flip.any() and not a.flip.all()
    # no box satisfies aspect in [2, 3] at full area: torchvision's central fallback
    fb = draw_views(4, 16, 16, ViewRecipe(crop="rrc", scale=(1.0, 1.0), ratio=(2.0, 3.0)), seeded_generator(0))
    assert fb.crop.tolist() == [[4, 0, 8, 16]] * 4  # w = 16, h = round(16 / 2), centred
    pad = draw_views(200, 8, 8, ViewRecipe(crop="pad", padding=2), seeded_generator(5))
    assert pad.crop[:, :2].min() == -2 and pad.crop[:, :2].max() == 2 and (pad.crop[:, 2:] == 8).all()


def test_cutmix_box_and_lambda():
    x = torch.randn(5, 2, 10, 10)
    for s in range(40):
        rec = draw_views(5, 10, 10, ViewRecipe(crop="none", flip=0.0, mix="cutmix"), seeded_generator(s))
        lam = float(rec.lam)
        a1, b1, a2, b2 = rec.box.tolist()
        assert 0.0 <= lam < 1.0 and 0 <= a1 <= a2 <= 10 and 0 <= b1 <= b2 <= 10
        cut_h = int(10 * math.sqrt(1 - lam))
        # unclipped sides are exactly 2 * (cut // 2); clipped ones are shorter
        if 0 < a1 and a2 < 10:
            assert a2 - a1 == 2 * (cut_h // 2)
        assert a2 - a1 <= 2 * (cut_h // 2) and b2 - b1 <= 2 * (cut_h // 2)
        assert sorted(rec.perm.tolist()) == list(range(5))
        out = apply_views(x, rec)
        perm = rec.perm.long()
        inside = torch.zeros(10, 10, dtype=torch.bool)
        inside[a1:a2, b1:b2] = True
        assert torch.equal(out[:, :, inside], x[perm][:, :, inside])
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])


def test_mixup_apply():
    x = torch.randn(4, 1, 6, 6)
    rec = draw_views(4, 6, 6, ViewRecipe(crop="none", flip=0.0, mix="mixup", mix_alpha=0.8), seeded_generator(7))
    lam = float(rec.lam)
    assert rec.box is None and 0 <= lam <= 1
    assert torch.allclose(apply_views(x, rec), lam * x + (1 - lam) * x[rec.perm.long()])


def test_bad_records_and_recipes():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="describes 1 images"):
        apply_views(x, _rec([[0, 0, 4, 4]], [False]))
    with pytest.raises(ValueError, match="larger than the image"):
        apply_views(x, _rec([[0, 0, 5, 4], [0, 0, 4, 4]], [False, False]))
    with pytest.raises(ValueError, match="unknown mix"):
        ViewRecipe(mix="cutout")
    with pytest.raises(ValueError, match="scale"):
        ViewRecipe(scale=(0.5, 0.2))


def test_kd_loss_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 4.0
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, T, t2=False), kl, atol=1e-7)
    assert torch.allclose(kd_loss(s, t, T, t2=True), kl * 16, atol=1e-6)
    assert kd_loss(t, t, T, t2=True).abs() < 1e-7


def test_lr_schedules_and_weight_decay_groups():
    cos = FKDConfig(epochs=4, schedule="cosine")
    assert [round(lr_factor(cos, e), 6) for e in range(4)] == [1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6),
                                                                0.5, round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6)]
    wc = FKDConfig(epochs=10, schedule="warmup_cosine", warmup_epochs=5)
    assert [round(lr_factor(wc, e), 4) for e in range(6)] == [0.01, 0.208, 0.406, 0.604, 0.802, 1.0]
    assert lr_factor(wc, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = _optimizer(model, FKDConfig(epochs=1, weight_decay=0.01, no_decay_1d=True))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert len(_optimizer(model, FKDConfig(epochs=1, no_decay_1d=False)).param_groups) == 1


def test_recipes_follow_the_references():
    from decoct.data.types import DatasetInfo

    def info(size):
        return DatasetInfo("x", tuple("abc"), 3, size, size, (0.5,) * 3, (0.5,) * 3)

    im, tiny, cifar = soft_recipe_for(info(224)), soft_recipe_for(info(64)), soft_recipe_for(info(32))
    assert (im.optimizer, im.lr, im.epochs, im.batch_size, im.temperature, im.t2, im.view.mix) == \
        ("adamw", 1e-3, 300, 128, 20.0, False, "cutmix")
    assert (tiny.optimizer, tiny.lr, tiny.epochs, tiny.batch_size, tiny.t2, tiny.view.mix, tiny.warmup_epochs) == \
        ("sgd", 0.2, 100, 64, True, "none", 5)
    assert (cifar.temperature, cifar.view.crop, cifar.view.padding, cifar.view.mix, cifar.epochs) == \
        (30.0, "pad", 4, "mixup", 400)
    assert soft_recipe_for(info(8)).view.padding == 1


def test_train_fkd_online_learns_and_checks_its_inputs():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 4, 4)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    cfg = FKDConfig(epochs=30, batch_size=16, lr=0.05, temperature=1.0)
    view = ViewRecipe(crop="none", flip=0.0)
    with torch.no_grad():
        before = kd_loss(student(x), teacher(x), 1.0, False)
    stats = train_fkd(student, x, cfg, teacher=teacher, view=view)
    with torch.no_grad():
        after = kd_loss(student(x), teacher(x), 1.0, False)
    assert stats["label_source"] == "online_teacher" and stats["steps"] == 60
    assert after < 0.2 * before
    with pytest.raises(ValueError, match="exactly one"):
        train_fkd(student, x, cfg)
    with pytest.raises(ValueError, match="unknown granularity"):
        FKDConfig(epochs=1, granularity="random")
