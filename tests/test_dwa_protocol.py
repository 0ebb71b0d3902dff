"""DWA evaluated as its paper does (issue 13, point 5): its own student recipes against a live teacher
(``--recipe dwa``), CutMix as its Tiny-ImageNet script draws it (torchvision's ``RandomCutmix``: the
previous image of the batch as partner), an online evaluation that neither counts nor sizes its
baseline by a label store it does not use; and the ablation switch ``--dwa-steps 0`` (issue 13,
point 6)."""

import json
import math

import pytest
import torch

from decoct.augment.recorded_views import (
    ViewRecipe,
    ViewRecord,
    apply_views,
    cutmix_box,
    draw_views,
    seeded_generator,
)
from decoct.formats.artifact import DistilledSet
from decoct.train.soft_students import RECIPES, soft_recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ CutMix: box and partner by hand
def test_cutmix_box_hand_examples():
    """lam 0.75: sqrt(1 - lam) = 0.5, side floor(8 * 0.5) = 4, half-side 2; centre (3, 6) gives rows
    1:5 and columns 4:8 (6 + 2 = 8, the edge). lam 0: half-side 4, centre (0, 0) clipped to 0:4.
    lam 1: an empty box. torchvision's RandomCutmix half-side int(0.5 sqrt(1 - lam) W) agrees."""
    assert cutmix_box(8, 8, 0.75, 3, 6) == (1, 4, 5, 8)
    assert cutmix_box(8, 8, 0.0, 0, 0) == (0, 0, 4, 4)
    # sqrt(.36) = .6: sides floor(3.6) = 3 and 6, half-sides 1 and 3; rows 5-1:5+1 -> 4:6, columns 1-3:1+3 -> 0:4
    assert cutmix_box(6, 10, 0.64, 5, 1) == (4, 0, 6, 4)
    a1, b1, a2, b2 = cutmix_box(8, 8, 1.0, 4, 4)
    assert a1 == a2 and b1 == b2
    for lam in torch.linspace(0, 1, 101).tolist():
        for size in (8, 32, 64, 224):
            assert int(size * math.sqrt(1 - lam)) // 2 == int(0.5 * math.sqrt(1 - lam) * size)
    with pytest.raises(ValueError, match="lam must be in"):
        cutmix_box(8, 8, 1.5, 0, 0)


def test_cutmix_with_the_previous_image_by_hand():
    """Three constant images 1, 2, 3; roll partners paste image i-1 into rows 1:3, columns 1:4 of image i."""
    x = torch.stack([torch.full((1, 4, 4), float(v)) for v in (1, 2, 3)])
    rec = ViewRecord(crop=torch.tensor([[0, 0, 4, 4]] * 3, dtype=torch.int16), flip=torch.zeros(3, dtype=torch.bool),
                     perm=torch.tensor([2, 0, 1], dtype=torch.int16), lam=torch.tensor(0.5),
                     box=torch.tensor([1, 1, 3, 4], dtype=torch.int16))
    want = x.clone()
    want[0, 0, 1:3, 1:4] = 3.0
    want[1, 0, 1:3, 1:4] = 1.0
    want[2, 0, 1:3, 1:4] = 2.0
    assert torch.equal(apply_views(x, rec), want)

    recipe = ViewRecipe(crop="none", flip=0.0, mix="cutmix", partner="roll")
    for s in range(10):
        r = draw_views(5, 8, 8, recipe, seeded_generator(s))
        assert r.perm.tolist() == [4, 0, 1, 2, 3]  # x.roll(1, 0)[i] == x[i - 1]
        y = torch.randn(5, 2, 8, 8)
        a1, b1, a2, b2 = r.box.tolist()
        out = apply_views(y, r)
        assert torch.equal(out[:, :, a1:a2, b1:b2], y.roll(1, 0)[:, :, a1:a2, b1:b2])
    # the default partner is still a seeded random permutation, drawn as before
    p = draw_views(5, 8, 8, ViewRecipe(crop="none", flip=0.0, mix="cutmix"), seeded_generator(3))
    g = seeded_generator(3)
    torch.rand(5, generator=g)  # the flip draw comes first
    assert torch.equal(p.perm, torch.randperm(5, generator=g).to(torch.int16))


def test_partner_round_trips_and_old_headers_stay_byte_equal():
    assert "partner" not in ViewRecipe(mix="cutmix").to_dict()  # label-store headers as before the field
    d = ViewRecipe(mix="cutmix", partner="roll").to_dict()
    assert d["partner"] == "roll" and ViewRecipe.from_dict(d).partner == "roll"
    assert ViewRecipe.from_dict(ViewRecipe(mix="mixup").to_dict()).partner == "perm"
    with pytest.raises(ValueError, match="unknown mix partner 'shuffle'; known: perm, roll"):
        ViewRecipe(partner="shuffle")


# ------------------------------------------------------------------ DWA's student recipes
def test_dwa_recipes_by_image_size(square_info):
    tiny = soft_recipe_for(square_info(64), "dwa")
    assert tiny.name == "dwa-tiny" and (tiny.epochs, tiny.batch_size, tiny.optimizer, tiny.lr) == (200, 64, "sgd", 0.2)
    assert (tiny.weight_decay, tiny.no_decay_1d, tiny.schedule, tiny.warmup_epochs) == (1e-4, False, "warmup_cosine", 5)
    assert (tiny.temperature, tiny.t2) == (20.0, True)
    assert (tiny.view.crop, tiny.view.mix, tiny.view.mix_alpha, tiny.view.partner) == ("rrc", "cutmix", 1.0, "roll")
    lpld_tiny = soft_recipe_for(square_info(64))
    assert lpld_tiny.name == "tiny" and lpld_tiny.epochs == 100 and lpld_tiny.view.mix == "none"

    cifar = soft_recipe_for(square_info(32), "dwa")
    assert cifar.name == "dwa-cifar" and (cifar.epochs, cifar.batch_size, cifar.temperature) == (400, 128, 30.0)
    assert (cifar.view.crop, cifar.view.padding, cifar.view.mix, cifar.view.mix_alpha) == ("pad", 4, "mixup", 0.8)
    imnet = soft_recipe_for(square_info(224), "dwa")
    assert imnet.name == "dwa-imagenet" and (imnet.epochs, imnet.batch_size, imnet.no_decay_1d) == (300, 128, True)
    assert (imnet.view.mix, imnet.view.partner) == ("cutmix", "perm")
    for a, b in (("dwa-cifar", "cifar"), ("dwa-imagenet", "imagenet")):  # same values, own names
        ra, rb = RECIPES[a], RECIPES[b]
        assert [getattr(ra, k) for k in ra.__dataclass_fields__ if k not in ("name", "source")] == \
               [getattr(rb, k) for k in rb.__dataclass_fields__ if k not in ("name", "source")]
    with pytest.raises(ValueError, match="unknown soft recipe 'lpld'; known: auto, dwa, rded"):
        soft_recipe_for(square_info(32), "lpld")


# ------------------------------------------------------------------ evaluate with the live teacher
@pytest.fixture(scope="module")
def teacher(train_digits_teacher):
    return train_digits_teacher(epochs=2)


@pytest.fixture(scope="module")
def relabelled(digits, teacher, random_digits_set, tmp_path_factory):
    """Random real IPC 2 of digits with a 3-epoch label store."""
    from decoct.decoupled.relabel import relabel

    path = tmp_path_factory.mktemp("dwa-eval") / "a"
    random_digits_set(2, config={"ipc": 2, "seed": 0}).save(path)
    relabel(path, teacher, epochs=3, batch_size=8, seed=0, device="cpu")
    return path


def test_online_evaluation_neither_counts_nor_sizes_by_the_unused_store(relabelled, teacher, digits):
    """With a live teacher the label store is not used: bytes are the images', and the random baseline
    has the set's IPC (2), not the IPC the store's bytes would buy (old code: counted, IPC 4)."""
    from decoct.evaluation.protocols import evaluate

    st = DistilledSet.load(relabelled).storage(relabelled)
    assert st["bytes_on_disk"]["labels"] > 0
    r = evaluate(relabelled, "soft", runs=1, dataset=digits, device="cpu", model="mlp", epochs=1, batch_size=8,
                 online_teacher=teacher, baseline="random", progress=False)
    assert r.bytes_on_disk == st["bytes_on_disk"]["images"] and r.extra["label_bytes"] == 0
    assert r.raw_bytes == 20 * 64 + 20 * 4 // 8  # 20 uint8 8x8 grey images + 4-bit hard labels, no store
    assert r.baseline.extra["ipc"] == 2 and r.baseline.num_images == 20
    stored = evaluate(relabelled, "soft", runs=1, dataset=digits, device="cpu", model="mlp", epochs=1, progress=False)
    assert stored.bytes_on_disk == st["bytes_on_disk"]["total"] and stored.extra["label_bytes"] > 0


def test_recipe_dwa_needs_the_live_teacher_and_is_recorded(relabelled, teacher, digits):
    from decoct.evaluation.protocols import evaluate

    with pytest.raises(ValueError, match="the dwa recipe trains its students against a live teacher"):
        evaluate(relabelled, "soft", runs=1, dataset=digits, device="cpu", model="mlp", recipe="dwa", progress=False)
    with pytest.raises(ValueError, match="--recipe chooses the soft protocol's student recipe; it does not apply"):
        evaluate(relabelled, "classic", runs=1, dataset=digits, device="cpu", recipe="dwa", progress=False)
    r = evaluate(relabelled, "soft", runs=1, dataset=digits, device="cpu", model="mlp", epochs=2, recipe="dwa",
                 online_teacher=teacher, progress=False)
    assert r.protocol == "soft-online" and r.extra["recipe"] == "dwa-cifar" and r.extra["temperature"] == 30.0
    assert r.extra["view"]["mix"] == "mixup" and r.epochs == 2


def test_cli_recipe_dwa(digits, tmp_path, capsys):
    from decoct.cli import main
    from decoct.decoupled.squeeze import squeeze

    squeeze(digits, model="convnet_bn", model_kwargs=dict(width=8), out=tmp_path / "t", epochs=1,
            show_progress=False, device="cpu")
    run = tmp_path / "run"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(run), "--no-progress"]) == 0
    base = ["evaluate", str(run), "--protocol", "soft", "--model", "mlp", "--epochs", "1", "--runs", "1",
            "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--recipe", "dwa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --teacher DIR" in err
    assert main([*base, "--teacher", str(tmp_path / "t")]) == 0
    assert main([*base, "--teacher", str(tmp_path / "t"), "--recipe", "dwa"]) == 0
    assert "already evaluated" not in capsys.readouterr().out  # not the auto recipe's result file
    ev = json.loads((run / "eval-soft-online-dwa-mlp-e1.json").read_text())
    assert ev["extra"]["recipe"] == "dwa-cifar" and ev["protocol"] == "soft-online"
    assert json.loads((run / "eval-soft-online-mlp-e1.json").read_text())["extra"]["recipe"] == "cifar"
    assert main(["evaluate", str(run), "--scores", "ddranking", "--recipe", "dwa", "--no-progress"]) == 2
    assert "drop --recipe" in capsys.readouterr().err


# ------------------------------------------------------------------ the ablation switch
def test_dwa_steps_zero_is_real_init_without_adjustment(digits, tmp_path, monkeypatch):
    """--dwa-steps 0 is accepted and means no adjustment: the teacher used is the original one, never
    copied or moved, and the batch starts from its real images (DWA's other ingredient kept)."""
    import decoct.decoupled.recover as rmod
    from decoct.cli import build_parser
    from decoct.cli.common import _resolve
    from decoct.decoupled.squeeze import squeeze

    args = _resolve(build_parser(), ["distill", "dwa", "--teacher", "T", "--ipc", "1", "--out", "R",
                                     "--init", "real", "--dwa-steps", "0"])
    assert args.dwa_steps == 0 and args.init == "real"
    squeeze(digits, "convnet_bn", out=tmp_path / "t", epochs=1, model_kwargs=dict(width=8), device="cpu",
            show_progress=False)

    def boom(*a, **k):
        raise AssertionError("directed_weight_adjustment called with dwa_steps=0")

    monkeypatch.setattr(rmod, "directed_weight_adjustment", boom)
    rec = rmod.Recover(rmod.RecoverConfig(str(tmp_path / "t"), 1, method="dwa", init="real", dwa_steps=0,
                                          iterations=2))
    rec.init(digits, torch.device("cpu"))
    assert rec.config.dwa_steps == 0 and rec.config.init == "real" and rec.config.r_var == 11.0
    assert rec.work is rec.base
    before = [p.detach().clone() for p in rec.base.parameters()]
    rec._start_batch(0)
    assert torch.equal(rec.cur["x"].detach(), rec._real(rec.mine[0]))
    m = rec.step(0)
    assert "adjust" not in m
    rec.step(1)
    assert all(torch.equal(a, p) for a, p in zip(before, rec.base.parameters(), strict=True))
