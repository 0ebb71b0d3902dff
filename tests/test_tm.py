"""Trajectory matching: exact constant-memory gradient == unrolled autograd, memory, resume, e2e."""

import math

import pytest
import torch

from decoct.matching.experts import train_experts
from decoct.matching.tm import (
    SavedTensorMeter,
    TMConfig,
    TrajectoryMatching,
    distill_tm,
    dsa_augment,
    inner_loss,
    make_plan,
    match_gradients,
)
from decoct.methods.base import METHODS, run_method
from decoct.models.convnet import ConvNet
from decoct.models.flat_params import FlatParams
from decoct.runtime.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(dtype=torch.float64, seed=0):
    """A 1-block ConvNet on 2x4x4 images, 3 classes, with a target 'expert' nearby."""
    torch.manual_seed(seed)
    net = FlatParams(ConvNet(3, channels=2, image_size=4, depth=1, width=4).to(dtype))
    theta0 = net.flatten().clone()
    target = theta0 + 0.05 * torch.randn(net.num_params, dtype=dtype)
    x = torch.randn(6, 2, 4, 4, dtype=dtype)
    return net, theta0, target, x


def _plan(n_images=6, steps=4, batch=4, seed=1):
    return make_plan(n_images, steps, batch, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("soft", [False, True])
def test_exact_gradient_equals_unrolled_autograd(soft):
    net, theta0, target, x = _tiny()
    y = torch.randn(6, 3, dtype=torch.float64) if soft else torch.tensor([0, 1, 2, 0, 1, 2])
    plan, aug, lr = _plan(steps=5), dsa_augment(), torch.tensor(0.1, dtype=torch.float64)
    ref = match_gradients(net, theta0, target, x, y, lr, plan, augment=aug, mode="unrolled")
    assert ref.grad_x.abs().max() > 1e-4 and ref.grad_lr.abs() > 1e-4  # a non-trivial problem
    for every in (1, 0, 2, 5):  # keep all snapshots, sqrt(N), segments of 2, one segment
        r = match_gradients(net, theta0, target, x, y, lr, plan, augment=aug, mode="exact", snapshot_every=every)
        assert torch.allclose(r.loss, ref.loss, rtol=1e-12)
        assert torch.allclose(r.grad_x, ref.grad_x, rtol=1e-9, atol=1e-14)
        assert torch.allclose(r.grad_lr, ref.grad_lr, rtol=1e-9, atol=1e-14)
        if soft:
            assert ref.grad_y.abs().max() > 1e-5
            assert torch.allclose(r.grad_y, ref.grad_y, rtol=1e-9, atol=1e-14)
        else:
            assert r.grad_y is None


def test_exact_gradient_matches_finite_differences():
    """Guards against a bug shared by both autograd paths (e.g. a detach in the wrong place)."""
    net, theta0, target, x = _tiny(seed=3)
    y, plan, aug = torch.tensor([0, 1, 2, 0, 1, 2]), _plan(steps=3, seed=4), dsa_augment()

    def loss(lr, xx):
        return float(match_gradients(net, theta0, target, xx, y, torch.tensor(lr, dtype=torch.float64), plan,
                                     augment=aug, mode="exact").loss)

    r = match_gradients(net, theta0, target, x, y, torch.tensor(0.1, dtype=torch.float64), plan, augment=aug)
    eps = 1e-6
    assert math.isclose((loss(0.1 + eps, x) - loss(0.1 - eps, x)) / (2 * eps), float(r.grad_lr), rel_tol=1e-6)
    for pos in [(1, 0, 2, 1), (4, 1, 0, 3)]:
        xp, xm = x.clone(), x.clone()
        xp[pos] += eps
        xm[pos] -= eps
        fd = (loss(0.1, xp) - loss(0.1, xm)) / (2 * eps)
        assert math.isclose(fd, float(r.grad_x[pos]), rel_tol=1e-5, abs_tol=1e-10)


def test_tesla_is_the_first_order_identity():
    """TESLA == autograd of the surrogate where each step's parameters are detached (its assumption);
    equal to the exact gradient for one step, different (O(alpha^2)) for several."""
    net, theta0, target, x = _tiny(seed=5)
    y, plan, aug = torch.tensor([0, 1, 2, 0, 1, 2]), _plan(steps=4, seed=6), dsa_augment()
    lr = torch.tensor(0.2, dtype=torch.float64)
    t = match_gradients(net, theta0, target, x, y, lr, plan, augment=aug, mode="tesla")
    # brute-force surrogate: theta_N = theta_0 - lr * sum_i g(theta_i.detach(), x_i)
    x_leaf, lr_leaf = x.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    theta, gsum = theta0.clone(), torch.zeros_like(theta0)
    for s in plan:
        th = theta.detach().requires_grad_(True)
        xb = aug(x_leaf[s.indices], s.seed)
        g = torch.autograd.grad(inner_loss(net(th, xb), y[s.indices]), th, create_graph=True)[0]
        gsum = gsum + g
        theta = (th - lr.detach() * g).detach()
    surrogate = (theta0 - lr_leaf * gsum - target).pow(2).sum() / (theta0 - target).pow(2).sum()
    gx, glr = torch.autograd.grad(surrogate, [x_leaf, lr_leaf])
    assert torch.allclose(t.grad_x, gx, rtol=1e-9, atol=1e-14) and torch.allclose(t.grad_lr, glr, rtol=1e-9)
    exact = match_gradients(net, theta0, target, x, y, lr, plan, augment=aug, mode="exact")
    assert torch.allclose(t.loss, exact.loss) and not torch.allclose(t.grad_x, exact.grad_x, rtol=1e-3)
    one = plan[:1]
    t1 = match_gradients(net, theta0, target, x, y, lr, one, augment=aug, mode="tesla")
    e1 = match_gradients(net, theta0, target, x, y, lr, one, augment=aug, mode="exact")
    assert torch.allclose(t1.grad_x, e1.grad_x, rtol=1e-10) and torch.allclose(t1.grad_lr, e1.grad_lr)


def test_memory_does_not_grow_with_syn_steps_except_unrolled():
    torch.manual_seed(0)
    net = FlatParams(ConvNet(3, channels=2, image_size=8, depth=2, width=8))
    theta0 = net.flatten()
    target = theta0 + 0.05 * torch.randn(net.num_params)
    x, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    peak = {}
    for mode in ("unrolled", "exact", "tesla"):
        for n in (2, 8):
            with SavedTensorMeter() as m:
                match_gradients(net, theta0, target, x, y, 0.01, _plan(steps=n, batch=3), mode=mode)
            assert m.live == 0  # every graph was freed
            peak[mode, n] = (m.peak, m.peak_bytes)
    assert peak["unrolled", 8][1] > 3 * peak["unrolled", 2][1]
    for mode in ("exact", "tesla"):
        assert peak[mode, 8] == peak[mode, 2]
        assert peak[mode, 8][1] < peak["unrolled", 2][1]
    # with DSA the per-step graph depends on the family drawn, but stays bounded
    with SavedTensorMeter() as m:
        match_gradients(net, theta0, target, x, y, 0.01, _plan(steps=12, batch=3), augment=dsa_augment())
    assert m.peak_bytes < 1.5 * peak["exact", 2][1]


# ------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------
def test_inner_loss_hand_computed():
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    expect = (math.log(1 + math.exp(-2)) + math.log(1 + math.e)) / 2
    assert math.isclose(float(inner_loss(out, y)), expect, rel_tol=1e-6)
    soft = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # probabilities (1/2, 1/2) and (3/4, 1/4)
    lq = torch.log_softmax(out, -1)
    expect = -(0.5 * lq[0, 0] + 0.5 * lq[0, 1] + 0.75 * lq[1, 0] + 0.25 * lq[1, 1]) / 2
    assert math.isclose(float(inner_loss(out, soft)), float(expect), rel_tol=1e-6)


def test_plan_covers_images_then_reshuffles():
    plan = make_plan(10, 5, 4, torch.Generator().manual_seed(0))
    sizes = [len(s.indices) for s in plan]
    assert sizes == [4, 4, 2, 4, 4]
    assert sorted(torch.cat([s.indices for s in plan[:3]]).tolist()) == list(range(10))
    again = make_plan(10, 5, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a.indices, b.indices) and a.seed == b.seed for a, b in zip(plan, again, strict=True))
    assert len({s.seed for s in plan}) == 5


def test_dsa_augment_replays_exactly():
    aug = dsa_augment()
    x = torch.randn(4, 3, 8, 8)
    assert all(torch.equal(aug(x, s), aug(x, s)) for s in range(8))
    assert not all(torch.equal(aug(x, 0), aug(x, s)) for s in range(1, 8))
    assert dsa_augment("none") is None


def test_config_validation_and_datm_window():
    with pytest.raises(ValueError, match="min_start_epoch"):
        TMConfig(min_start_epoch=5, max_start_epoch=5)
    with pytest.raises(ValueError, match="unknown grad"):
        TMConfig(grad="fast")
    with pytest.raises(ValueError, match="expansion_end_epoch"):
        TMConfig(current_max_start_epoch=3)
    with pytest.raises(ValueError, match="unknown DSA family"):
        TMConfig(dsa="colour")
    cfg = TMConfig(max_start_epoch=20, current_max_start_epoch=10, expansion_end_epoch=100)
    assert [cfg.start_window(it)[1] for it in (0, 50, 100, 1000)] == [10, 15, 20, 20]
    assert TMConfig(max_start_epoch=20).start_window(7) == (0, 20)


# ------------------------------------------------------------------------------------------
# the method on digits
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    return train_experts(digits, tmp_path_factory.mktemp("experts"), num_experts=2, epochs=3, batch_size=64,
                         model_kwargs=dict(width=32, norm="instance"), device="cpu", progress=False)


def test_registry_and_missing_experts_message(digits, tmp_path):
    assert "tm" in METHODS
    with pytest.raises(ValueError, match="decoct experts --dataset digits"):
        METHODS.get("tm")({"dataset": "digits"})
    with pytest.raises(ValueError, match="decoct experts --dataset digits"):
        distill_tm(digits, tmp_path / "r", None)
    assert not (tmp_path / "r").exists()


def test_resume_equals_uninterrupted(digits, experts, tmp_path):
    cfg = TMConfig(ipc=1, iterations=6, syn_steps=4, max_start_epoch=2, lr_img=100, batch_syn=5, soft_labels=True,
                   threshold=10.0)

    def go(path, **kw):
        run = Run.open(path, {"m": "tm"}, resume=True)
        return run_method(TrajectoryMatching(cfg, experts), run, digits, torch.device("cpu"), seed=0,
                          checkpoint_every=2, show_progress=False, **kw)

    full = go(tmp_path / "a")
    go(tmp_path / "b", stop_after=3)
    assert not Run(tmp_path / "b").done
    resumed = go(tmp_path / "b")
    assert torch.equal(full.images, resumed.images)
    assert torch.equal(full.soft_labels, resumed.soft_labels)
    assert full.meta["syn_lr"] == resumed.meta["syn_lr"] != 0.01
    assert full.meta["accepted_iterations"] == resumed.meta["accepted_iterations"] > 0


def test_digits_ipc1_beats_random_real(digits, experts, tmp_path):
    """End to end: 2 short experts, IPC 1, 40 iterations; same fast-eval seeds as random real."""
    from decoct.evaluation.protocols import evaluate

    dset = distill_tm(digits, tmp_path / "tm", experts, ipc=1, iterations=40, syn_steps=10, max_start_epoch=2,
                      lr_img=100, lr_lr=1e-5, lr_teacher=0.01, device="cpu", progress=False)
    assert len(dset) == 10 and dset.method == "tm" and Run(tmp_path / "tm").done
    losses = [e["loss"] for e in Run(tmp_path / "tm").read_log() if e["event"] == "step"]
    assert losses[-1] < losses[0]
    r = evaluate(tmp_path / "tm" / "artifact", "fast", runs=3, seed=0, dataset=digits, device="cpu", baseline="random",
                 progress=False, epochs=100, model_kwargs=dict(width=32, norm="instance"))
    # TM starts from the very images random real uses (same seed), so this is "TM improved them"
    assert r.mean > r.baseline.mean + 0.05, (r.mean, r.baseline.mean)


def test_palette_parameterisation_runs_and_stores_k_colours(digits, experts, tmp_path):
    """TM optimises AutoPalette's parameterisation through the same interface (K = 16: x16 images)."""
    dset = distill_tm(digits, tmp_path / "ap", experts, ipc=1, iterations=2, syn_steps=2, max_start_epoch=2,
                      lr_img=100, palette=16, palette_flags={"palette_init": "real", "palette_aux_images": 8},
                      device="cpu", progress=False)
    assert dset.is_palette and len(dset) == 160 and set(dset.palette_sizes) == {16}
    assert all(len(torch.unique(img)) <= 16 for img in dset.images)


def test_cli_experts_then_distill_with_resume(tmp_path, capsys):
    from decoct.cli import main

    exp, run = str(tmp_path / "exp"), str(tmp_path / "run")
    common = ["--device", "cpu", "--no-progress"]
    assert main(["experts", "--dataset", "digits", "--out", exp, "--num-experts", "1", "--epochs", "2",
                 "--width", "8", *common]) == 0
    tm = ["distill", "tm", "--dataset", "digits", "--out", run, "--iterations", "4", "--syn-steps", "2",
          "--max-start-epoch", "1", "--unrolled", *common]
    assert main(tm) == 2 and "decoct experts --dataset digits" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*tm, "--experts", exp, "--max-iterations", "2"]) == 0
    assert "--resume" in capsys.readouterr().out and not Run(tmp_path / "run").done
    assert main([*tm, "--experts", exp, "--resume"]) == 0
    assert Run(tmp_path / "run").done
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "grad: unrolled" in cfg and "max_iterations" not in cfg
    assert main([*tm, "--experts", exp, "--force", "--zca"]) == 2
    assert "trained without ZCA" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mtt-cifar10-ipc1", "mtt-cifar100-ipc50", "autopalette-cifar10-ipc10"])
def test_presets_resolve(name):
    from pathlib import Path

    from decoct.cli import build_parser
    from decoct.cli.common import _resolve

    path = Path(__file__).parent.parent / "configs" / "tm" / f"{name}.yaml"
    args = _resolve(build_parser(), ["distill", "tm", "--dataset", "cifar10", "--out", "x", "--config", str(path)])
    cfg = TMConfig.from_dict(vars(args))
    expected = {"mtt-cifar10-ipc1": (50, 2, 1e-7, 0, 0), "mtt-cifar100-ipc50": (80, 40, 1e-5, 125, 0),
                "autopalette-cifar10-ipc10": (35, 40, 1e-5, 0, 64)}[name]
    assert (cfg.syn_steps, cfg.max_start_epoch, cfg.lr_lr, cfg.batch_syn, cfg.palette) == expected
    assert cfg.zca is True


def test_soft_label_init_and_datm_threshold(digits, experts):
    from decoct.data import normalize

    cfg = TMConfig(ipc=1, iterations=3, syn_steps=2, max_start_epoch=2, lr_img=100, soft_labels=True,
                   threshold=1e-9)
    m = TrajectoryMatching(cfg, experts)
    m.init(digits, torch.device("cpu"))
    x0 = normalize(digits.train.images[m.init_indices], digits.info)
    final = experts.params(0, [experts.epochs])[0]
    assert torch.allclose(m.labels_soft, m.net(final, x0), atol=1e-5)
    before = (m.param().detach().clone(), m.labels_soft.detach().clone(), float(m.syn_lr.detach()))
    metrics = [m.step(it) for it in range(3)]
    assert all(mt["accepted"] == 0.0 and mt["loss"] > 1e-9 for mt in metrics)  # every update rejected
    assert torch.equal(m.param().detach(), before[0]) and torch.equal(m.labels_soft.detach(), before[1])
    assert float(m.syn_lr.detach()) == before[2] and m.accepted == 0


def test_autopalette_lr_decay_schedule(digits, experts):
    """AutoPalette's TM schedules: images x0.1 after iterations//3 accepted updates, palette after //2."""
    cfg = TMConfig(ipc=1, iterations=6, syn_steps=2, max_start_epoch=2, lr_img=100, palette=16,
                   palette_flags={"palette_init": "real", "palette_aux_images": 8})
    assert [cfg.lr_factors(a)["images"] for a in range(5)] == [1.0, 1.0, 0.1, 0.1, 0.1]
    assert [cfg.lr_factors(a)["palette"] for a in range(5)] == [1.0, 1.0, 1.0, 0.1, 0.1]
    assert TMConfig(ipc=1, iterations=6, palette=16, lr_decay=False).lr_factors(5) == {"images": 1.0, "palette": 1.0}
    assert TMConfig(ipc=1, iterations=6).lr_factors(5) == {"images": 1.0, "palette": 1.0}
    with pytest.raises(ValueError, match="lr_decay.*palette"):
        TMConfig(ipc=1, lr_decay=True)
    m = TrajectoryMatching(cfg, experts)
    m.init(digits, torch.device("cpu"))
    base_img, base_pal = m.opts["images"].param_groups[0]["lr"], m.opts["palette"].param_groups[0]["lr"]
    for it in range(4):
        m.step(it)
    assert m.accepted == 4  # threshold off: every update accepted
    # the 4th update ran with accepted = 3: images decayed (3 >= 2), palette decayed (3 >= 3)
    assert m.opts["images"].param_groups[0]["lr"] == pytest.approx(base_img * 0.1)
    assert m.opts["palette"].param_groups[0]["lr"] == pytest.approx(base_pal * 0.1)
    fresh = TrajectoryMatching(cfg, experts)
    fresh.init(digits, torch.device("cpu"))
    fresh.load_state_dict(m.state_dict())  # resume restores the decayed rates from the count
    assert fresh.opts["images"].param_groups[0]["lr"] == pytest.approx(base_img * 0.1)


def test_palette_warmup_through_tm(digits, experts, tmp_path):
    """TM hands --palette-warmup to run_method's warm_start; the metrics reach the artifact."""
    dset = distill_tm(digits, tmp_path / "ap", experts, ipc=1, iterations=1, syn_steps=2, max_start_epoch=2,
                      lr_img=100, palette=16, palette_flags={"palette_init": "real", "palette_aux_images": 8,
                                                             "palette_warmup": 2, "palette_warmup_batch": 8},
                      device="cpu", progress=False)
    assert "colors_used" in dset.meta["palette_warmup_end"]
    assert [e["event"] for e in Run(tmp_path / "ap").read_log()].count("warm_start") == 1


# ---------------------------------------------------------------------- divergence (issue 10, point 15)
def test_check_bounds_the_learned_step_size_and_learned_tensors(digits, experts):
    """syn_lr must stay finite, > 0 and <= SYN_LR_LIMIT x lr_teacher; images and soft labels finite."""
    from decoct.matching.tm import SYN_LR_LIMIT
    from decoct.runtime.health import DivergedError

    cfg = TMConfig(ipc=1, iterations=50, syn_steps=2, max_start_epoch=2, lr_img=100, soft_labels=True)
    m = TrajectoryMatching(cfg, experts)
    m.init(digits, torch.device("cpu"))
    m.check(0)
    healthy = [0.0058, 0.035, 0.5 * SYN_LR_LIMIT * cfg.lr_teacher]  # measured: digits 0.0058, CIFAR-10 0.026-0.035
    bad = {-0.01: "is -0.01; lower --lr-lr (now 1e-05) or --syn-steps (now 2)", 0.0: "is 0;",
           math.nan: "is nan", math.inf: "is inf", 2.2: "is 2.2, more than 100 x --lr-teacher 0.01; lower --lr-lr"}
    for v in healthy:
        with torch.no_grad():
            m.syn_lr.fill_(v)
        m.check(3)
    for v, text in bad.items():
        with torch.no_grad():
            m.syn_lr.fill_(v)
        with pytest.raises(DivergedError) as err:
            m.check(3)
        assert str(err.value).startswith("tm diverged at iteration 4: the learned step size (syn_lr) ")
        assert text in str(err.value) and "--force" in str(err.value)
    with torch.no_grad():
        m.syn_lr.fill_(0.01)
        m.labels_soft[0, 0] = math.nan
    with pytest.raises(DivergedError, match="the soft labels is not finite.*--lr-labels \\(now 2\\)"):
        m.check(3)
    with torch.no_grad():
        m.labels_soft.nan_to_num_(0.0)
        m.param.images.mul_(1e6)  # finite, but every pixel far outside [0, 1]
    m.check(3)  # the pixel range is looked at every 10 iterations (and at the last)
    far = r"iteration 10: the share of synthetic pixels far outside \[0, 1\] \(beyond \[-1, 2\]\) is 100.0%"
    with pytest.raises(DivergedError, match=far):
        m.check(9)


def test_a_run_whose_step_size_diverges_stops_without_a_set(digits, experts, tmp_path):
    """Issue 10: syn_lr went negative after one iteration and the run reported success. Now it stops
    at that iteration (a huge --lr-lr moves it out of bounds in one step, whichever way)."""
    from decoct.runtime.health import DivergedError

    with pytest.raises(DivergedError, match=r"^tm diverged at iteration 1: the learned step size \(syn_lr\) is "):
        distill_tm(digits, tmp_path / "r", experts, ipc=1, iterations=5, syn_steps=4, max_start_epoch=2,
                   lr_img=100, lr_lr=1e3, device="cpu", progress=False)
    run = Run(tmp_path / "r")
    assert not run.done and not run.artifact_dir.exists()
    assert run.read_log()[-1]["event"] == "diverged"


def test_a_nan_loss_stops_before_the_update(digits, experts, monkeypatch):
    import decoct.matching.tm as tm_mod
    from decoct.runtime.health import DivergedError

    real = tm_mod.match_gradients

    def nan_loss(*a, **kw):
        res = real(*a, **kw)
        res.loss = res.loss * math.nan
        return res

    monkeypatch.setattr(tm_mod, "match_gradients", nan_loss)
    m = TrajectoryMatching(TMConfig(ipc=1, iterations=5, syn_steps=2, max_start_epoch=2, lr_img=100), experts)
    m.init(digits, torch.device("cpu"))
    before = m.param.images.detach().clone()
    with pytest.raises(DivergedError, match=r"^tm diverged at iteration 2: loss is nan; lower --lr-img \(now 100\)"):
        m.step(1)
    assert torch.equal(m.param.images.detach(), before)  # the NaN never reached the images
