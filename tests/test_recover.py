"""Recover (SRe2L / DWA / LPLD): the loss, the weight adjustment, batching, resume, errors, end to end."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoct.cli import main
from decoct.data import Dataset, DatasetInfo, normalize
from decoct.decoupled.recover import (
    Recover,
    RecoverConfig,
    batch_moments,
    bn_matching_loss,
    directed_weight_adjustment,
    mixture_targets,
    plan_batches,
    real_assignment,
    shard_range,
)
from decoct.decoupled.squeeze import squeeze
from decoct.formats.artifact import DistilledSet
from decoct.formats.teacher import TeacherError
from decoct.methods.base import METHODS, run_method
from decoct.runtime.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("rec") / "teacher"
    squeeze(digits, "convnet_bn", out=out, epochs=2, model_kwargs=dict(width=8), device="cpu", show_progress=False)
    return out


def test_bn_loss_against_hand_computation():
    feats = [(torch.tensor([3.0, 4.0]), torch.tensor([7.0, 9.0])),
             (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([2.0, 0.0, 0.0]))]
    targets = [(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])),  # diffs (3,4) -> 5, (6,8) -> 10
               (torch.zeros(3), torch.zeros(3))]                      # diffs 1 and 2
    # SRe2L: 10 * (5 + 10) + (1 + 2) = 153 ; DWA r_var = 11: 10 * (5 + 110) + (1 + 22) = 1173
    assert float(bn_matching_loss(feats, targets)) == pytest.approx(153.0)
    assert float(bn_matching_loss(feats, targets, r_var=11.0)) == pytest.approx(1173.0)
    assert float(bn_matching_loss(feats, targets, first_bn_multiplier=1.0)) == pytest.approx(18.0)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])  # (2, 2, 1, 2)
    m, v = batch_moments(x)
    assert m.tolist() == [4.0, 1.0] and v.tolist() == [5.0, 1.0]  # biased: mean of squared deviations


def test_mixture_targets_are_pooled_moments():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=g) + 2, torch.randn(50, 3, generator=g) * 3
    cm = torch.stack([a.mean(0), b.mean(0)])
    cv = torch.stack([a.var(0, unbiased=False), b.var(0, unbiased=False)])
    mu, var = mixture_targets(cm, cv, torch.tensor([0, 1]))
    both = torch.cat([a, b])
    torch.testing.assert_close(mu, both.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, both.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    mu1, var1 = mixture_targets(cm, cv, torch.tensor([1, 1, 1]))
    assert torch.equal(mu1, cm[1]) and torch.equal(var1, cv[1])


def _hand_dwa(W, b, x, y, steps, rho):
    """Closed-form CE gradient of a linear model z = x W^T + b, normalised ascent steps."""
    W, b = W.clone(), b.clone()
    onehot = F.one_hot(y, W.shape[0]).float()
    for _ in range(steps):
        z = x @ W.T + b
        dz = (torch.softmax(z, 1) - onehot) / len(x)
        gW, gb = dz.T @ x, dz.sum(0)
        norm = math.sqrt(float((gW ** 2).sum() + (gb ** 2).sum()))
        W = W + (rho / steps) * gW / (norm + 1e-12)
        b = b + (rho / steps) * gb / (norm + 1e-12)
    return W, b


@pytest.mark.parametrize("steps", [1, 3])
def test_dwa_adjustment_against_hand_worked_linear_model(steps):
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.3]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7], [2.0, 0.0]])
    y = torch.tensor([0, 2, 1, 1])
    W, b = _hand_dwa(lin.weight.detach(), lin.bias.detach(), x, y, steps, 0.5)
    before = F.cross_entropy(lin(x), y).item()
    moved = directed_weight_adjustment(lin, x, y, steps, 0.5)
    torch.testing.assert_close(lin.weight.detach(), W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), b, rtol=1e-5, atol=1e-6)
    assert moved == pytest.approx(0.5, rel=1e-4) if steps == 1 else moved <= 0.5 + 1e-6
    assert F.cross_entropy(lin(x), y).item() > before  # ascent: the adjusted model is worse on B
    assert lin.weight.requires_grad  # requires_grad flags restored


def test_dwa_moves_parameters_not_bn_buffers(teacher):
    from decoct.formats.teacher import load_teacher

    model, info, _ = load_teacher(teacher)
    for p in model.parameters():
        p.requires_grad_(False)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.clone() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    moved = directed_weight_adjustment(model, x, y, 4, 0.015)
    assert 0 < moved <= 0.015 + 1e-7
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert all(not torch.equal(params[k], v) for k, v in model.named_parameters())  # BN gamma/beta too
    assert not any(p.requires_grad for p in model.parameters())


def test_batch_plans():
    sre = plan_batches(5, 3, "ipc", 2)
    assert len(sre) == 9 and all(len(set(b.classes.tolist())) == len(b.classes) for b in sre)
    assert all(len(set(b.slots.tolist())) == 1 for b in sre)
    lp = plan_batches(5, 3, "class", None)
    assert len(lp) == 5 and all(len(set(b.classes.tolist())) == 1 and len(b.classes) == 3 for b in lp)
    for plan, ipc in ((sre, 3), (lp, 3), (plan_batches(5, 7, "class", 3), 7)):
        idx = torch.cat([b.image_index(ipc) for b in plan])
        assert sorted(idx.tolist()) == list(range(5 * ipc))  # every (class, slot) exactly once
    covered = [i for r in range(3) for i in shard_range(10, r, 3)]
    assert covered == list(range(10))


def test_real_assignment_is_per_class_and_distinct():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0])
    a = real_assignment(labels, 3, 2, seed=0)
    assert a.shape == (3, 2)
    assert (labels[a] == torch.arange(3)[:, None]).all()
    assert a[0, 0] != a[0, 1] and a[1, 0] != a[1, 1]
    with pytest.raises(ValueError, match="no training images"):
        real_assignment(torch.tensor([0, 0]), 2, 1, seed=0)


def test_presets_follow_the_papers():
    cifar = DatasetInfo("c", tuple("abcdefghij"), 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    tiny = DatasetInfo("t", tuple("abcdefghij"), 3, 64, 64, (0.5,) * 3, (0.25,) * 3)
    d = RecoverConfig("x", 10, method="dwa").resolved(cifar)
    assert (d.init, d.lr, d.iterations, d.r_bn, d.r_var, d.dwa_steps, d.dwa_rho, d.jitter, d.crop) == \
        ("real", 0.25, 1000, 0.01, 11.0, 12, 0.015, 4, False)
    s = RecoverConfig("x", 10, method="sre2l").resolved(tiny)
    assert (s.init, s.iterations, s.lr, s.r_bn, s.jitter_mode, s.crop, s.flip) == \
        ("noise", 4000, 0.1, 1.0, "symmetric", True, True)
    lp = RecoverConfig("x", 10, method="lpld", lr=0.3).resolved(tiny)
    assert (lp.batching, lp.bn_target, lp.r_bn, lp.lr) == ("class", "class", 0.05, 0.3)
    with pytest.raises(ValueError, match="jitter_mode"):
        RecoverConfig("x", 10, jitter_mode="sideways").resolved(cifar)
    with pytest.raises(ValueError, match="dwa_rho"):
        RecoverConfig("x", 10, dwa_steps=3, dwa_rho=0.0).resolved(cifar)


def _rec(teacher, method, **kw):
    kw.setdefault("iterations", 4)
    return Recover(RecoverConfig(str(teacher), kw.pop("ipc", 2), method=method, **kw))


def test_step_loss_equals_manual_objective(teacher, digits):
    rec = _rec(teacher, "sre2l", jitter=0, r_bn=0.5)
    rec.init(digits, torch.device("cpu"))
    rec._start_batch(0)
    x0 = rec.cur["x"].detach().clone()
    y = rec.cur["y"]
    metrics = rec.step(0)
    model = rec.base
    feats = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: feats.__setitem__(n, inp[0]))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        ce = F.cross_entropy(model(x0), y)
    for h in hooks:
        h.remove()
    bn = 0.0
    for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)):
        f = feats[n]
        mean, var = f.mean((0, 2, 3)), f.var((0, 2, 3), unbiased=False)
        w = 10.0 if i == 0 else 1.0
        bn += w * (float((mean - m.running_mean).norm()) + float((var - m.running_var).norm()))
    assert metrics["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert metrics["bn"] == pytest.approx(bn, rel=1e-5)
    assert metrics["loss"] == pytest.approx(float(ce) + 0.5 * bn, rel=1e-5)
    assert sorted(y.tolist()) == list(range(10))  # SRe2L batch: one image per class


def test_lpld_batches_hold_one_class_and_match_its_statistics(teacher, digits):
    for stats in ("ema", "exact"):
        rec = _rec(teacher, "lpld", ipc=3, class_stats=stats)
        rec.init(digits, torch.device("cpu"))
        assert len(rec.batches_all) == 10
        st = rec.teacher.stats
        suffix = "" if stats == "ema" else "_exact"
        for b in rec.batches_all:
            assert len(set(b.classes.tolist())) == 1 and len(b.classes) == 3
            c = int(b.classes[0])
            for name, (mu, var) in zip(rec.layers, rec._targets(b), strict=True):
                assert torch.equal(mu, st.stats[name]["class_mean" + suffix][c])
                assert torch.equal(var, st.stats[name]["class_var" + suffix][c])


def test_dwa_batch_uses_an_adjusted_copy(teacher, digits):
    rec = _rec(teacher, "dwa", iterations=2)
    rec.init(digits, torch.device("cpu"))
    base = {k: v.clone() for k, v in rec.base.state_dict().items()}
    rec._start_batch(0)
    # initial images are the batch's real images
    idx = rec.assign[rec.mine[0].classes, rec.mine[0].slots]
    assert torch.equal(rec.cur["x"].detach(), normalize(digits.train.images[idx], digits.info))
    d = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(rec.work.parameters(), rec.base.parameters(), strict=True)))
    assert 0 < float(d) <= 0.015 + 1e-7 and rec.cur["adjust"] == pytest.approx(float(d), rel=1e-4)
    assert all(torch.equal(base[k], v) for k, v in rec.base.state_dict().items())  # original untouched
    for (n, bw), (_, bb) in zip(rec.work.named_buffers(), rec.base.named_buffers(), strict=True):
        assert torch.equal(bw, bb), n


@pytest.mark.parametrize("method,stop", [("dwa", 3), ("dwa", 6), ("lpld", 5)])
def test_resume_equals_uninterrupted(teacher, digits, tmp_path, method, stop):
    kw = dict(iterations=4, ipc=2)
    dev = torch.device("cpu")
    full = run_method(_rec(teacher, method, **kw), Run.open(tmp_path / "a", {}), digits, dev, show_progress=False,
                      checkpoint_every=1000)
    run = Run.open(tmp_path / "b", {})
    run_method(_rec(teacher, method, **kw), run, digits, dev, show_progress=False, stop_after=stop,
               checkpoint_every=1000)
    assert not run.done
    resumed = run_method(_rec(teacher, method, **kw), Run.open(tmp_path / "b", {}, resume=True), digits, dev,
                         show_progress=False, checkpoint_every=1000)
    assert torch.equal(full.images, resumed.images) and full.meta["complete"]


def test_float_storage_keeps_the_optimised_floats(teacher, digits, tmp_path):
    from decoct.data import to_uint8

    dset = run_method(_rec(teacher, "sre2l", iterations=2, float_storage="float32"), Run.open(tmp_path / "f", {}),
                      digits, torch.device("cpu"), show_progress=False)
    assert dset.float_images is not None and dset.float_images.dtype == torch.float32
    assert torch.equal(dset.images, to_uint8(dset.float_images, digits.info))
    loaded = DistilledSet.load(tmp_path / "f" / "artifact")
    assert torch.equal(loaded.float_images, dset.float_images)


def test_registered_presets(teacher):
    rec = METHODS.get("lpld")({"teacher": str(teacher), "ipc": 1, "iterations": 2})
    assert rec.name == "lpld" and rec.iterations == 20
    with pytest.raises(ValueError, match="unknown option"):
        METHODS.get("dwa")({"teacher": str(teacher), "ipc": 1, "rho": 0.1})


def test_bad_inputs_fail_before_any_work(teacher, digits, tmp_path, capsys):
    other = DatasetInfo("digits", tuple(f"d{i}" for i in range(10)), 1, 8, 8, digits.info.mean, digits.info.std)
    rec = _rec(teacher, "sre2l")
    with pytest.raises(TeacherError, match="classes"):
        rec.init(Dataset(other, digits.train, digits.test), torch.device("cpu"))
    # a teacher made for other classes, used with the digits dataset from the CLI
    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    meta = json.loads((bad / "teacher.json").read_text())
    meta["dataset"]["classes"] = list(other.classes)
    (bad / "teacher.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    assert main(["distill", "sre2l", "--teacher", str(bad), "--dataset", "digits", "--ipc", "1",
                 "--out", str(out), "--no-progress"]) == 2
    assert "classes" in capsys.readouterr().err and not out.exists()
    assert main(["distill", "lpld", "--teacher", str(tmp_path / "none"), "--ipc", "1", "--out", str(out),
                 "--no-progress"]) == 2
    assert "teacher.json" in capsys.readouterr().err and not out.exists()
    assert main(["squeeze", "--dataset", "digits", "--model", "resnet7", "--out", str(out)]) == 2
    assert "unknown model" in capsys.readouterr().err and not out.exists()


def test_end_to_end_cli_on_digits(tmp_path, capsys):
    t = tmp_path / "t"
    assert main(["squeeze", "--dataset", "digits", "--model", "convnet_bn", "--model-kwargs", "width=8",
                 "--epochs", "2", "--out", str(t), "--no-progress", "--device", "cpu"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    for method in ("sre2l", "dwa", "lpld"):
        out = tmp_path / method
        assert main(["distill", method, "--teacher", str(t), "--ipc", "2", "--iterations", "3", "--out", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
        assert DistilledSet.verify(out / "artifact") == []
        dset = DistilledSet.load(out / "artifact")
        assert len(dset) == 20 and dset.method == method and dset.ipc == [2] * 10
        assert dset.config["iterations"] == 3 and dset.meta["complete"] and (out / "grid.png").exists()
        # a finished run is a no-op
        assert main(["distill", method, "--teacher", str(t), "--ipc", "2", "--iterations", "3", "--out",
                     str(out), "--no-progress", "--device", "cpu"]) == 0


def test_config_files_match_presets_and_parse():
    from pathlib import Path

    import yaml

    from decoct.cli import build_parser
    from decoct.cli.common import _resolve
    from decoct.decoupled.recover import PRESETS

    root = Path(__file__).resolve().parents[1] / "configs" / "decoupled"
    fam = {"cifar": "small", "tiny": "tiny", "imagenet": "imagenet"}
    parser = build_parser()
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 12
    for f in files:
        method, _, rest = f.stem.partition("-")
        if method == "squeeze":
            args = _resolve(parser, ["squeeze", "--dataset", "digits", "--out", "x", "--config", str(f)])
            assert args.model in ("resnet18", "convnet_bn")
            continue
        if method == "rded":  # checked against its own presets in tests/test_rded.py
            continue
        if rest == "eval":  # an evaluation preset (DWA's live-teacher recipe): parses as `decoct evaluate`
            args = _resolve(parser, ["evaluate", "x", "--config", str(f)])
            assert (args.protocol, args.recipe) == ("soft", method), f.name
            continue
        args = _resolve(parser, ["distill", method, "--teacher", "t", "--ipc", "1", "--out", "x",
                                 "--config", str(f)])
        for key, value in PRESETS[method][fam[rest]].items():
            assert getattr(args, key) == value, (f.name, key)
        assert set(yaml.safe_load(f.read_text())) <= set(vars(args))
