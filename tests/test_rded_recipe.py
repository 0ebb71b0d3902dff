"""RDED's own student recipe (``--recipe rded``): the values of its validation script at factor 1, the
half-cosine schedule by hand, whole-image views, the ImageNet-size refusal, and an online run that
records the recipe (docs/methods/rded.md#students)."""
from __future__ import annotations

import math

import pytest
import torch

from decoct.augment.recorded_views import (
    ViewRecipe,
    ViewRecord,
    apply_views,
    cell_spans,
    draw_views,
    seeded_generator,
    strip_map,
)
from decoct.decoupled.rded import stitch
from decoct.train.soft_students import FKDConfig, lr_factor, soft_recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rded_recipes_by_image_size(square_info):
    tiny, cifar = soft_recipe_for(square_info(64), "rded"), soft_recipe_for(square_info(32), "rded")
    assert (tiny.name, tiny.batch_size, cifar.name, cifar.batch_size) == ("rded-tiny", 100, "rded-cifar", 50)
    for r in (tiny, cifar):
        assert (r.epochs, r.optimizer, r.lr, r.weight_decay, r.no_decay_1d) == (300, "adamw", 1e-3, 0.01, True)
        assert (r.schedule, r.temperature, r.t2) == ("half_cosine", 20.0, False)
        assert (r.view.crop, r.view.scale, r.view.mix, r.view.mix_alpha) == ("rrc", (1.0, 1.0), "cutmix", 1.0)
    imnet = soft_recipe_for(square_info(224), "rded")
    assert (imnet.name, imnet.batch_size, imnet.schedule, imnet.temperature) == ("rded-imagenet", 100, "half_cosine", 20.0)
    assert (imnet.view.shuffle, imnet.view.scale, imnet.view.mix) == (2, (0.5, 1.0), "cutmix")
    assert tiny.view.shuffle == cifar.view.shuffle == 1
    # the set's factor wins over the size rule (RDED's presets: factor 1 up to 64 px, 2 above)
    assert soft_recipe_for(square_info(96), "rded").view.shuffle == 2
    assert soft_recipe_for(square_info(64), "rded", factor=2).view.shuffle == 2
    three = soft_recipe_for(square_info(224), "rded", factor=3).view
    assert three.shuffle == 3 and three.scale == pytest.approx((1 / 3, 1.0))
    assert soft_recipe_for(square_info(224), "rded", factor=1).name == "rded-tiny"
    with pytest.raises(ValueError, match="factor 2 applies to the rded recipe only"):
        soft_recipe_for(square_info(64), "dwa", factor=2)


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


def test_evaluate_batch_size_and_temperature_overrides(digits, train_digits_teacher, random_digits_set, tmp_path, capsys):
    """--batch-size sets the student batch and --temperature the soft protocol's (each its own result file)."""
    from decoct.cli import main

    teacher = tmp_path / "t"
    from decoct.decoupled.squeeze import squeeze

    squeeze(digits, "convnet_bn", out=teacher, epochs=1, model_kwargs={"width": 8}, show_progress=False)
    run = tmp_path / "run"
    random_digits_set(2, config={"ipc": 2, "seed": 0}).save(run / "artifact")  # a run directory keeps eval-*.json
    base = ["evaluate", str(run), "--protocol", "soft", "--model", "mlp", "--runs", "1", "--epochs", "1",
            "--teacher", str(teacher), "--recipe", "rded", "--no-progress"]
    assert main([*base, "--batch-size", "10"]) == 0
    files = sorted(f.name for f in run.glob("eval-*.json"))
    assert files == ["eval-soft-online-rded-b10-mlp-e1.json"], files
    import json

    ev = json.loads((run / files[0]).read_text())
    assert ev["extra"]["batch_size"] == 10 and ev["protocol"] == "soft-online"
    assert main([*base, "--batch-size", "1"]) == 2
    assert "batch_size must be >= 2" in capsys.readouterr().err
    assert main([*base, "--temperature", "2"]) == 0  # --temperature: its own file, recorded in the result
    ev = json.loads((run / "eval-soft-online-rded-T2-mlp-e1.json").read_text())
    assert ev["extra"]["temperature"] == 2.0
    assert main(["evaluate", str(run), "--protocol", "fast", "--temperature", "2", "--no-progress"]) == 2
    assert "temperature applies to the soft protocol only" in capsys.readouterr().err


# ------------------------------------------------------------------ ShufflePatches (factor 2, ImageNet)
def test_strip_map_by_hand():
    """5 pixels in 2 strips: [0, 3) and [3, 5) (the first takes the remainder, as RDED's stitched cells;
    RDED's ShufflePatches drops it)."""
    assert strip_map(torch.tensor([[1, 0], [0, 1]]), 5).tolist() == [[3, 4, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert strip_map(torch.tensor([[2, 0, 1]]), 7).tolist() == [[5, 6, 0, 1, 2, 3, 4]]
    assert cell_spans(7, 3) == [3, 2, 2] and cell_spans(6, 2) == [3, 3]
    with pytest.raises(ValueError, match="cannot cut 3 pixels into 4"):
        cell_spans(3, 4)


def test_shuffle_of_a_stitched_image_moves_whole_patches():
    """Factor 2 on 5x5, both axes' strips swapped: every shuffled strip holds one stitched patch."""
    patches = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 3, 3).clone()  # patch k is constant k
    img = stitch(patches, ipc=1, factor=2, size=5)
    swap = strip_map(torch.tensor([[1, 0]]), 5)[0]
    out = img[:, :, swap][:, :, :, swap][0, 0]
    assert out[:2, :2].unique().tolist() == [3.0] and out[2:, 2:].unique().tolist() == [0.0]
    assert out[:2, 2:].unique().tolist() == [2.0] and out[2:, :2].unique().tolist() == [1.0]


def _shuffled(x: torch.Tensor, strips: torch.Tensor) -> torch.Tensor:
    """RDED's ShufflePatches by hand: cut, reorder and concatenate column strips, then row strips."""
    out = []
    for img, (cols, rows) in zip(x, strips.tolist(), strict=True):
        f = len(cols)
        for dim, order in ((2, cols), (1, rows)):
            size = img.shape[dim]
            t, rem = divmod(size, f)
            spans = [t + 1 if k < rem else t for k in range(f)]
            parts = list(img.split(spans, dim))
            img = torch.cat([parts[k] for k in order], dim)
        out.append(img)
    return torch.stack(out)


def test_shuffle_then_view_equals_the_view_of_the_shuffled_image():
    """A record with strips gives exactly the view (crop, flip, CutMix) of the hand-shuffled images."""
    g = seeded_generator(1)
    x = torch.randn(6, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    rec = draw_views(6, 9, 11, ViewRecipe(crop="rrc", scale=(0.5, 1.0), mix="cutmix", shuffle=2), g)
    assert rec.strips.shape == (6, 2, 2) and rec.flip.any()
    plain = ViewRecord(crop=rec.crop, flip=rec.flip, perm=rec.perm, lam=rec.lam, box=rec.box)
    assert torch.equal(apply_views(x, rec), apply_views(_shuffled(x, rec.strips), plain))
    whole = ViewRecord(crop=torch.tensor([[0, 0, 9, 11]] * 6, dtype=torch.int16), flip=torch.zeros(6, dtype=torch.bool),
                       strips=rec.strips)
    assert torch.equal(apply_views(x, whole), _shuffled(x, rec.strips))
    assert any(not torch.equal(_shuffled(x, rec.strips)[i], x[i]) for i in range(6))


def test_shuffle_is_drawn_last_and_refused_by_label_stores(digits, train_digits_teacher, random_digits_set, tmp_path):
    a = draw_views(8, 8, 8, ViewRecipe(mix="cutmix"), seeded_generator(3))
    b = draw_views(8, 8, 8, ViewRecipe(mix="cutmix", shuffle=2), seeded_generator(3))
    assert torch.equal(a.crop, b.crop) and torch.equal(a.flip, b.flip) and torch.equal(a.perm, b.perm)
    assert a.strips is None and sorted(b.strips[0, 0].tolist()) == [0, 1]
    assert "shuffle" not in ViewRecipe().to_dict() and ViewRecipe.from_dict({"shuffle": 2}).shuffle == 2
    with pytest.raises(ValueError, match="shuffle"):
        ViewRecipe(shuffle=0)
    from decoct.decoupled.relabel import relabel

    path = tmp_path / "s"
    random_digits_set(2).save(path)
    with pytest.raises(ValueError, match="a label store does not record strip orders"):
        relabel(path, train_digits_teacher(epochs=1), epochs=1, batch_size=8, view=ViewRecipe(shuffle=2), device="cpu")


@pytest.mark.parametrize("kw", [dict(protocol="soft", temperature=0.0), dict(protocol="fast", temperature=2.0),
                                dict(protocol="soft", temperature=float("nan")), dict(protocol="soft", batch_size=1)])
def test_api_checks_temperature_and_batch_before_reading_the_set(tmp_path, kw):
    """The API refuses what the CLI's config rule refuses, before it looks for the artifact."""
    from decoct.api import evaluate_run

    with pytest.raises(ValueError, match="temperature applies to the soft protocol only|batch_size must be >= 2"):
        evaluate_run(tmp_path / "missing", **kw)
