"""Distribution matching: the loss by hand, batching equals the per-class loop, resume, end to end."""

from __future__ import annotations

import pytest
import torch

from decoct.data import Dataset, DatasetInfo, ImageSplit
from decoct.formats.artifact import DistilledSet
from decoct.matching.dm import (
    DistributionMatching,
    DMConfig,
    class_means,
    distill_dm,
    dm_loss,
    dm_loss_reference,
    resolve_speed_flags,
)
from decoct.methods.base import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_dataset(n_per_class: tuple[int, ...] = (30, 20, 25), size: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    k = len(n_per_class)
    info = DatasetInfo("tiny", tuple(f"c{i}" for i in range(k)), 3, size, size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=g)]  # classes interleaved, as in real data
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    images[:, 0] = (images[:, 0] // 2 + 60 * labels.view(-1, 1, 1)).to(torch.uint8)  # classes differ
    return Dataset(info, ImageSplit(images, labels), ImageSplit(images[:6], labels[:6]))


def test_dm_loss_by_hand_with_identity_embedding() -> None:
    """Identity embedding on 2-d "images": means and squared distances computed by hand."""
    real = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0]])]
    syn = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 3.0]])]
    # class 0: mean real (2, 3), mean syn (0, 0) -> 4 + 9 = 13; class 1: (0, 1) vs (1, 2) -> 1 + 1 = 2
    ref = dm_loss_reference(lambda x: x, real, syn)
    assert ref.item() == 15.0
    lab_r = torch.tensor([0, 0, 1])
    lab_s = torch.tensor([0, 1, 1])
    batched = dm_loss(class_means(torch.cat(real), lab_r, 2), class_means(torch.cat(syn), lab_s, 2))
    assert batched.item() == 15.0


def test_dm_gradient_reaches_the_images_by_hand() -> None:
    """Linear embedding f(x) = W x: dL/dx_j = -2 W^T (f(mean real) - f(mean syn)) / n_c."""
    w = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]])
    real = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1)
    syn = torch.tensor([[0.0, 1.0], [2.0, 1.0]], requires_grad=True)  # mean (1, 1)
    loss = dm_loss(class_means(real @ w.T, torch.zeros(2, dtype=torch.long), 1),
                   class_means(syn @ w.T, torch.zeros(2, dtype=torch.long), 1))
    diff = w @ torch.tensor([2.0, 1.0]) - w @ torch.tensor([1.0, 1.0])  # (1, 0, 3)
    assert loss.item() == pytest.approx(float(diff.pow(2).sum()))  # 10
    loss.backward()
    expected = (-2 * w.T @ diff / 2).expand(2, 2)
    assert torch.allclose(syn.grad, expected)


def test_class_means_handles_uneven_and_missing_classes() -> None:
    emb = torch.tensor([[1.0], [3.0], [10.0]])
    out = class_means(emb, torch.tensor([2, 2, 0]), 4)
    assert out.flatten().tolist() == [10.0, 0.0, 2.0, 0.0]


def _method(**kw) -> DistributionMatching:
    cfg = dict(ipc=2, iterations=4, batch_real=12, width=16, real_chunk=7, seed=3)
    cfg.update(kw)
    return DistributionMatching(DMConfig(**cfg))


def test_sample_real_draws_per_class_without_replacement() -> None:
    data = _tiny_dataset()
    m = _method(batch_real=22)
    m.init(data, torch.device("cpu"))
    torch.manual_seed(0)
    idx, labels = m.sample_real()
    counts = torch.bincount(labels, minlength=3).tolist()
    assert counts == [22, 20, 22]  # class 1 has only 20 images: all of them
    assert torch.equal(data.train.labels[idx], labels)
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(labels, labels.sort().values)  # grouped class by class


@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_classes_equal_the_per_class_loop(channels_last: bool) -> None:
    """All classes' synthetic images in one forward, real images in chunks that straddle classes
    (chunk 7): the loss and the image gradient equal the plain per-class loop's, up to float32
    rounding (the loss is bitwise equal in NCHW; conv kernels round differently per batch size)."""
    data = _tiny_dataset()
    m = _method(channels_last=channels_last)
    m.init(data, torch.device("cpu"))
    torch.manual_seed(5)
    net = m._new_net()
    seeds = [11, 22, 33]
    idx, labels = m.sample_real()
    x = m.param()
    batched = dm_loss(m.real_means(net, idx, labels, seeds), m.syn_means(net, x, seeds))
    (g_batched,) = torch.autograd.grad(batched, m.param.images)

    real = [m._real_batch(idx[labels == c]) for c in range(3)]
    syn = [m.param()[m.syn_index[c]] for c in range(3)]
    ref = dm_loss_reference(net.embed, real, syn, seeds, lambda z, s: m.dsa(z, seed=s))
    (g_ref,) = torch.autograd.grad(ref, m.param.images)
    assert batched.item() > 0
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_batched, g_ref, rtol=1e-4, atol=1e-7)


def test_dsa_is_shared_between_real_and_synthetic() -> None:
    """Siamese: a synthetic set equal to the real batch gives loss 0 under augmentation."""
    data = _tiny_dataset()
    m = _method()
    m.init(data, torch.device("cpu"))
    torch.manual_seed(1)
    net = m._new_net()
    idx, labels = m.sample_real()
    real_means = m.real_means(net, idx, labels, [5, 6, 7])
    # evaluate syn_means on the real batch itself (same images per class, same seeds)
    m.syn_order = torch.arange(len(labels))
    m.syn_counts = torch.bincount(labels, minlength=3).tolist()
    m.syn_sorted_labels = labels
    syn_means = m.syn_means(net, m._real_batch(idx), [5, 6, 7])
    assert dm_loss(real_means, syn_means).item() < 1e-8
    other = m.syn_means(net, m._real_batch(idx), [8, 9, 10])
    assert dm_loss(real_means, other).item() > 1e-4


def test_step_lowers_the_loss_on_a_fixed_net_and_counts() -> None:
    data = _tiny_dataset()
    m = _method(lr_img=1.0)
    m.init(data, torch.device("cpu"))
    before = m.param.images.detach().clone()
    torch.manual_seed(0)
    metrics = m.step(0)
    assert metrics["loss"] > 0 and not torch.equal(before, m.param.images)
    dset = m.result()
    assert dset.method == "dm" and dset.ipc == [2, 2, 2]
    assert dset.meta["labels"] == "hard" and "siamese" in dset.meta["augmentation"]


def test_resume_equals_uninterrupted(tmp_path) -> None:
    data = _tiny_dataset()
    kw = dict(ipc=2, iterations=6, batch_real=10, width=16, real_chunk=0, seed=4)
    full = distill_dm(data, tmp_path / "a", device="cpu", progress=False, checkpoint_every=2, **kw)
    part = distill_dm(data, tmp_path / "b", device="cpu", progress=False, checkpoint_every=2, stop_after=3, **kw)
    assert not (tmp_path / "b" / "artifact").exists() and len(part) == 6
    resumed = distill_dm(data, tmp_path / "b", device="cpu", progress=False, checkpoint_every=2, resume=True, **kw)
    assert torch.equal(full.images, resumed.images)
    assert torch.equal(DistilledSet.load(tmp_path / "b" / "artifact").images, full.images)


def test_registry_config_and_errors() -> None:
    assert isinstance(METHODS.get("dm")({"ipc": 1, "iterations": 3, "dataset": "digits"}), DistributionMatching)
    assert DMConfig(ipc=10).resolved_lr_img == 1.0
    assert DMConfig(ipc=50, palette=64).resolved_lr_img == 10.0
    assert DMConfig(ipc=50).resolved_lr_img == 1.0
    with pytest.raises(ValueError, match="init"):
        DMConfig(init="kmeans")
    with pytest.raises(ValueError, match="batch_real"):
        DMConfig(batch_real=0)
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_speed_flags(torch.device("cpu"), True, None)
    assert resolve_speed_flags(torch.device("cpu"), None, None) == (False, True)
    assert resolve_speed_flags(torch.device("cuda"), None, False) == (True, False)
    with pytest.raises(ValueError, match="batch norm"):
        _method(norm="batch").init(_tiny_dataset(), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown DM option"):
        distill_dm("digits", "/nonexistent", ipc=1, batch_size=3)


def test_noise_init_and_zca() -> None:
    data = _tiny_dataset()
    m = _method(init="noise", zca=True, iterations=1)
    m.init(data, torch.device("cpu"))
    assert m.zca is not None and m.init_source is None
    torch.manual_seed(0)
    assert m.step(0)["loss"] > 0
    dset = m.result()
    assert "zca" in dset.attachments and dset.meta["zca"]


def test_palette_parameterisation_steps_both_optimizers() -> None:
    """DM drives AutoPalette through the ImageParam interface: aux loss + palette net updated."""
    data = _tiny_dataset(n_per_class=(40, 40, 40))
    m = _method(ipc=1, palette=64, palette_flags={"palette_init": "real", "palette_aux_images": 4}, batch_real=8)
    m.init(data, torch.device("cpu"))
    assert m.param.num_images == 3 * 4  # x4 images per class at 64 colours (the paper's budget rule)
    assert set(m.opts) >= {"images", "palette"}
    net_before = [p.detach().clone() for p in m.param.net.parameters()]
    torch.manual_seed(0)
    metrics = m.step(0)
    assert metrics["loss"] > 0 and len(metrics) > 1  # aux-loss metrics reported
    assert any(not torch.equal(a, b) for a, b in zip(net_before, m.param.net.parameters(), strict=True))
    dset = m.result()
    assert dset.is_palette and dset.palettes.shape[1] == 64


def test_palette_warmup_runs_before_distillation() -> None:
    """--palette-warmup trains the palette network on real batches before step 0 (pixels untouched)."""
    data = _tiny_dataset(n_per_class=(40, 40, 40))
    flags = {"palette_init": "real", "palette_aux_images": 4, "palette_warmup": 3, "palette_warmup_batch": 8}
    cold = _method(ipc=1, palette=64, palette_flags={**flags, "palette_warmup": 0}, batch_real=8)
    warm = _method(ipc=1, palette=64, palette_flags=flags, batch_real=8)
    torch.manual_seed(0)
    cold.init(data, torch.device("cpu"))
    cold.warm_start()
    torch.manual_seed(0)
    warm.init(data, torch.device("cpu"))
    assert warm.warmup_metrics == {}  # init builds; the warm-up is run_method's warm_start, fresh runs only
    warm.warm_start()
    assert cold.warmup_metrics == {} and "colors_used" in warm.warmup_metrics
    assert warm.result().meta["palette_warmup_end"] == warm.warmup_metrics
    assert torch.equal(cold.param.images, warm.param.images)
    assert any(not torch.equal(a, b) for a, b in zip(cold.param.net.parameters(), warm.param.net.parameters(),
                                                     strict=True))


def test_dm_beats_random_real_on_digits(digits, tmp_path) -> None:
    """A short DM run on digits (IPC 1) beats random real images of the same IPC, same eval seeds."""
    from decoct.evaluation.protocols import evaluate

    dset = distill_dm(digits, tmp_path / "dm", ipc=1, iterations=30, batch_real=64, width=32, device="cpu",
                      progress=False)
    r = evaluate(dset, "fast", runs=3, seed=0, dataset=digits, device="cpu", baseline="random", epochs=60,
                 progress=False, model_kwargs=dict(width=32, norm="instance"))
    assert r.baseline is not None and r.baseline.extra["ipc"] == 1
    assert r.mean > r.baseline.mean + 0.05, (r.accuracies, r.baseline.accuracies)


def test_cli_distill_dm_interrupted_then_resumed(tmp_path) -> None:
    """`decoct distill dm ... --max-iterations` then `--resume` equals one uninterrupted command."""
    from decoct.cli import main

    base = ["distill", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "5", "--batch-real", "16",
            "--width", "16", "--checkpoint-every", "2", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    assert main(base + ["--out", str(tmp_path / "cut"), "--max-iterations", "3"]) == 0
    assert not (tmp_path / "cut" / "artifact").exists()
    assert main(base + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = DistilledSet.load(tmp_path / "full" / "artifact")
    b = DistilledSet.load(tmp_path / "cut" / "artifact")
    assert torch.equal(a.images, b.images) and a.method == "dm"
    assert main(["distill", "dm", "--ipc", "1", "--out", str(tmp_path / "x")]) == 2  # no --dataset


# ---------------------------------------------------------------------- divergence (issue 10, point 15)
def _strict_log(path) -> list[dict]:
    import json

    def refuse(token: str):
        raise ValueError(f"log.jsonl holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in (path / "log.jsonl").read_text().splitlines()]


def test_extreme_lr_img_stops_the_run_before_any_set_is_written(tmp_path) -> None:
    """Issue 10: DM with an extreme --lr-img logged "loss": NaN and wrote a finished, all-black set."""
    from decoct.runtime.health import DivergedError

    data = _tiny_dataset()
    with pytest.raises(DivergedError) as err:
        distill_dm(data, tmp_path / "r", device="cpu", progress=False, ipc=2, iterations=30, batch_real=10, width=16,
                   lr_img=1e12)
    msg = str(err.value)
    assert msg.startswith("dm diverged at iteration ") and "lower --lr-img (now 1e+12)" in msg and "--force" in msg
    assert not (tmp_path / "r" / "DONE").exists() and not (tmp_path / "r" / "artifact").exists()
    events = _strict_log(tmp_path / "r")
    assert events[-1]["event"] == "diverged" and events[-1]["message"] == msg


def test_a_nan_loss_stops_at_its_iteration(tmp_path, monkeypatch) -> None:
    import decoct.matching.dm as dm_mod
    from decoct.runtime.health import DivergedError

    calls = []

    def nan_from_third(real, syn):
        calls.append(1)
        loss = dm_loss(real, syn)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(dm_mod, "dm_loss", nan_from_third)
    with pytest.raises(DivergedError, match=r"^dm diverged at iteration 3: loss is nan; lower --lr-img \(now 1\)"):
        distill_dm(_tiny_dataset(), tmp_path / "r", device="cpu", progress=False, ipc=2, iterations=10,
                   batch_real=10, width=16, checkpoint_every=2)
    assert not (tmp_path / "r" / "DONE").exists() and not (tmp_path / "r" / "artifact").exists()
    assert (tmp_path / "r" / "checkpoint.pt").exists()  # iteration 2's, kept
    steps = [e for e in _strict_log(tmp_path / "r") if e["event"] == "step"]
    assert steps[-1]["iteration"] == 3 and steps[-1]["loss"] == "nan"


def test_non_finite_images_or_palette_stop_the_run() -> None:
    """check() after each step: a NaN in any learned tensor (pixels, palette net) is caught at once."""
    from decoct.runtime.health import DivergedError

    data = _tiny_dataset(n_per_class=(40, 40, 40))
    for kw in ({}, {"ipc": 1, "palette": 64, "palette_flags": {"palette_init": "real", "palette_aux_images": 4}}):
        m = _method(**kw)
        m.init(data, torch.device("cpu"))
        m.check(0)  # healthy
        name, p = list(m.param.named_parameters())[-1]
        with torch.no_grad():
            p.view(-1)[0] = float("inf")
        with pytest.raises(DivergedError, match=f"dm diverged at iteration 5: synthetic {name} is not finite"):
            m.check(4)


@pytest.mark.slow
def test_cli_extreme_lr_img_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    from decoct.cli import main

    out = tmp_path / "dmnan"
    rc = main(["distill", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "20", "--batch-real", "16",
               "--width", "16", "--lr-img", "1e12", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("decoct distill") and ": error: dm diverged at iteration " in err[0]
    assert "--lr-img (now 1e+12)" in err[0]
    assert not (out / "DONE").exists() and not (out / "artifact").exists()
