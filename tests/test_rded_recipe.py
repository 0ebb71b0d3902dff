"""RDED's own student recipe (``--recipe rded``): the values of its validation script at factor 1, the
half-cosine schedule by hand, whole-image views, the ImageNet-size refusal, and an online run that
records the recipe (docs/methods/rded.md#students)."""
from __future__ import annotations

import math

import pytest
import torch

from decoct.augment.recorded_views import ViewRecipe, draw_views, seeded_generator
from decoct.data.types import DatasetInfo
from decoct.train.soft_students import FKDConfig, lr_factor, soft_recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _info(size: int) -> DatasetInfo:
    return DatasetInfo("x", tuple(str(i) for i in range(10)), 3, size, size, (0.5,) * 3, (0.25,) * 3)


def test_rded_recipes_by_image_size():
    tiny, cifar = soft_recipe_for(_info(64), "rded"), soft_recipe_for(_info(32), "rded")
    assert (tiny.name, tiny.batch_size, cifar.name, cifar.batch_size) == ("rded-tiny", 100, "rded-cifar", 50)
    for r in (tiny, cifar):
        assert (r.epochs, r.optimizer, r.lr, r.weight_decay, r.no_decay_1d) == (300, "adamw", 1e-3, 0.01, True)
        assert (r.schedule, r.temperature, r.t2) == ("half_cosine", 20.0, False)
        assert (r.view.crop, r.view.scale, r.view.mix, r.view.mix_alpha) == ("rrc", (1.0, 1.0), "cutmix", 1.0)
    with pytest.raises(ValueError, match="--recipe rded: RDED's ImageNet-size student recipe .* not implemented"):
        soft_recipe_for(_info(224), "rded")


def test_half_cosine_by_hand():
    """½(1 + cos(π e / 2E)) with E = 4: 1, ½(1 + cos(π/8)), ½(1 + cos(π/4)), ½(1 + cos(3π/8)); never below ½."""
    cfg = FKDConfig(epochs=4, schedule="half_cosine")
    want = [1.0, 0.5 * (1 + 0.9238795325), 0.5 * (1 + 0.7071067812), 0.5 * (1 + 0.3826834324)]
    assert [lr_factor(cfg, e) for e in range(4)] == pytest.approx(want, abs=1e-9)
    long = FKDConfig(epochs=300, schedule="half_cosine")
    assert min(lr_factor(long, e) for e in range(300)) > 0.5
    assert lr_factor(long, 299) == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 600)))


@pytest.mark.parametrize("size", [8, 32, 64])
def test_scale_one_crops_are_the_whole_image(size):
    """RandomResizedCrop of scale (1, 1) with the default ratio range keeps the whole square image (every
    draw either rounds to the full side or fails and falls back to the centre crop of ratio 1), as
    torchvision does: RDED's factor-1 student sees whole images, flipped and CutMix-ed."""
    rec = draw_views(500, size, size, ViewRecipe(crop="rrc", scale=(1.0, 1.0)), seeded_generator(0, size))
    assert (rec.crop == torch.tensor([0, 0, size, size], dtype=rec.crop.dtype)).all()
    assert 0 < int(rec.flip.sum()) < 500


def test_recipe_rded_online_is_recorded(digits, train_digits_teacher, random_digits_set, tmp_path):
    from decoct.evaluation.protocols import evaluate

    teacher = train_digits_teacher(epochs=2)
    path = tmp_path / "set"
    random_digits_set(2, config={"ipc": 2, "seed": 0}).save(path)
    with pytest.raises(ValueError, match="the rded recipe trains its students against a live teacher"):
        evaluate(path, "soft", runs=1, dataset=digits, device="cpu", model="mlp", recipe="rded", progress=False)
    r = evaluate(path, "soft", runs=1, dataset=digits, device="cpu", model="mlp", epochs=2, recipe="rded",
                 online_teacher=teacher, progress=False)
    assert r.protocol == "soft-online" and r.extra["recipe"] == "rded-cifar" and r.extra["temperature"] == 20.0
    assert r.extra["view"]["mix"] == "cutmix" and r.extra["view"]["scale"] == [1.0, 1.0]
    assert r.extra["batch_size"] == 20  # RDED's 50, capped at the set's 20 images
