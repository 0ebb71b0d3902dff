"""RDED: crops as torchvision cuts them, the selection rule, the stitching layout, seeding, the
streamed path, bad input, and end to end on digits against random real images."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoct.cli import main
from decoct.data import Dataset, DatasetInfo, ImageSplit
from decoct.decoupled.rded import (
    PRESETS,
    RDED,
    TRIES,
    RDEDConfig,
    candidate_indices,
    crop_draws,
    crop_losses,
    resized_crops,
    select_patches,
    square_boxes,
    stitch,
)
from decoct.formats.artifact import DistilledSet
from decoct.formats.teacher import Teacher
from decoct.methods.base import METHODS, run_method
from decoct.runtime.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers: a fixed random teacher, a small dataset, and RDED written out with loops and torchvision
def _info(k: int = 3, c: int = 3, size: int = 12) -> DatasetInfo:
    return DatasetInfo("toy", tuple(f"c{i}" for i in range(k)), c, size, size, (0.5,) * c, (0.25,) * c)


def _net(info: DatasetInfo, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(info.channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, info.num_classes)).eval()


def _toy(info: DatasetInfo, per_class: int = 9, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    n = per_class * info.num_classes
    images = torch.randint(0, 256, (n, *info.image_shape), generator=g, dtype=torch.uint8)
    labels = torch.arange(info.num_classes).repeat_interleave(per_class)
    return Dataset(info, ImageSplit(images, labels), ImageSplit(images[:2], labels[:2]))


def _rded(info: DatasetInfo, model: nn.Module, **options) -> RDED:
    teacher = Teacher(model, info, {"model": "toy"}, None, None)
    return RDED(RDEDConfig(teacher="toy", **options), teacher=teacher)


def _run(method: RDED, data: Dataset) -> DistilledSet:
    method.init(data, torch.device("cpu"))
    for it in range(method.iterations):
        method.step(it)
    return method.result()


def _box_by_hand(u: torch.Tensor, h: int, w: int, smin: float) -> tuple[int, int, int]:
    """torchvision's RandomResizedCrop.get_params with ratio (1, 1), one try at a time."""
    for t in range(TRIES):
        side = int(round(math.sqrt(h * w * (smin + float(u[t, 0]) * (1 - smin)))))
        if 0 < side <= h and 0 < side <= w:
            return int(float(u[t, 1]) * (h - side + 1)), int(float(u[t, 2]) * (w - side + 1)), side
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s


def _reference(images: list[torch.Tensor], labels: torch.Tensor, model: nn.Module, info: DatasetInfo,
               cfg: RDEDConfig) -> torch.Tensor:
    """RDED with loops: torchvision crops one by one, CE by hand, sort, cell-by-cell canvases."""
    from torchvision.transforms.v2 import functional as TF

    size, f = info.height, cfg.factor
    s = size // f
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    out = []
    for c in range(info.num_classes):
        idx = candidate_indices(labels, c, cfg.candidates, cfg.seed)
        draws = crop_draws(cfg.seed, c, len(idx), cfg.crops)
        best = []
        for k, i in enumerate(idx.tolist()):
            img = images[i].float() / 255
            scored = []
            for j in range(cfg.crops):
                top, left, side = _box_by_hand(draws[k, j], img.shape[1], img.shape[2], cfg.crop_scale_min)
                crop = TF.resized_crop(img, top, left, side, side, [s, s], antialias=True)
                canvas = torch.zeros(info.channels, size, size)
                lo = (size - s) // 2
                canvas[:, lo:lo + s, lo:lo + s] = (crop - mean) / std
                with torch.no_grad():
                    logp = torch.log_softmax(model(canvas[None])[0], 0)
                scored.append((-float(logp[c]), j, crop))
            loss, _, crop = min(scored, key=lambda t: (t[0], t[1]))
            best.append((loss, k, crop))
        best.sort(key=lambda t: (t[0], t[1]))
        patches = [crop for _, _, crop in best[:cfg.ipc * f * f]]
        for i in range(cfg.ipc):
            canvas = torch.zeros(info.channels, size, size)
            for cell in range(f * f):
                r, q = divmod(cell, f)
                canvas[:, r * s:(r + 1) * s, q * s:(q + 1) * s] = patches[cell * cfg.ipc + i]
            out.append((canvas * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# crops
@pytest.mark.parametrize("h,w,size", [(12, 12, 12), (12, 12, 6), (20, 15, 6), (7, 9, 9)])
def test_resized_crops_match_torchvision_antialiased(h, w, size):
    """Both enlarging and shrinking crops equal torchvision's resized_crop(antialias=True)."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(h * w + size)
    x = torch.rand(2, 3, h, w, generator=g)
    boxes = square_boxes(torch.rand(2, 4, TRIES, 3, generator=g, dtype=torch.float64), h, w)
    out = resized_crops(x, boxes, size)
    assert out.shape == (2, 4, 3, size, size)
    for b in range(2):
        for m in range(4):
            top, left, bh, bw = boxes[b, m].tolist()
            assert bh == bw and 0 <= top <= h - bh and 0 <= left <= w - bw
            ref = TF.resized_crop(x[b], top, left, bh, bw, [size, size], antialias=True)
            assert torch.allclose(out[b, m], ref, atol=2e-5), (b, m, (out[b, m] - ref).abs().max())


def test_square_boxes_follow_torchvision_rule():
    u = torch.rand(50, TRIES, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes = square_boxes(u, 30, 17, (0.3, 1.0))
    for b in range(50):
        top, left, side = _box_by_hand(u[b], 30, 17, 0.3)
        assert boxes[b].tolist() == [top, left, side, side]
    # no try fits (a 4 x 40 image, areas of at least 40 % need sides > 4): the centred square of the shorter side
    fb = square_boxes(torch.full((1, TRIES, 3), 0.5, dtype=torch.float64), 4, 40, (0.4, 1.0))
    assert fb.tolist() == [[0, 18, 4, 4]]


# ---------------------------------------------------------------------------------------------
# scoring and selection
def test_crop_loss_is_cross_entropy_of_the_padded_crop():
    info = _info(k=4, size=8)
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.stack([x.mean((1, 2, 3)) * (i + 1) for i in range(4)], 1)

    crops = torch.rand(2, 3, 3, 4, 4)
    loss = crop_losses(Probe(), crops, 2, info, 8)
    x = seen[0]
    assert x.shape == (6, 3, 8, 8)
    inner = (crops.reshape(6, 3, 4, 4) - 0.5) / 0.25
    assert torch.allclose(x[:, :, 2:6, 2:6], inner)  # centred, normalised
    x[:, :, 2:6, 2:6] = 0
    assert x.abs().max() == 0  # zero (the mean colour) everywhere else
    logits = torch.stack([inner.sum((1, 2, 3)) / 192 * (i + 1) for i in range(4)], 1)
    assert torch.allclose(loss.flatten(), -torch.log_softmax(logits, 1)[:, 2], atol=1e-5)


def test_selection_keeps_each_images_best_crop_and_the_lowest_images():
    losses = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 4.0], [2.0, 2.0, 0.1], [5.0, 5.0, 5.0], [0.5, 0.5, 9.0]])
    best, order = select_patches(losses, 3)
    assert best.tolist() == [1, 0, 2, 0, 0]  # ties: the first crop
    assert order.tolist() == [2, 1, 4]  # best losses 1, .5, .1, 5, .5: ties keep the earlier image
    with pytest.raises(ValueError, match="cannot keep 6 patches from 5 images"):
        select_patches(losses, 6)


def test_kept_images_are_the_most_confident_per_class():
    """A hand-checked teacher: class 0 prefers bright images, class 1 dark ones. Each candidate is one
    flat grey, so each of its crops is that grey and its loss is known; the kept images must be
    the brightest of class 0 and the darkest of class 1, in order of loss."""
    info = _info(k=2, c=1, size=6)

    class Bright(nn.Module):
        def forward(self, x):
            s = x.mean((1, 2, 3))
            return torch.stack([s, -s], 1)

    greys = [10, 200, 60, 250, 120, 30, 90, 220, 5, 160, 40, 130]
    images = torch.tensor(greys, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 6, 6).contiguous()
    labels = torch.tensor([0] * 6 + [1] * 6)
    data = Dataset(info, ImageSplit(images, labels), ImageSplit(images[:2], labels[:2]))
    dset = _run(_rded(info, Bright().eval(), ipc=3, candidates=6, crops=2, factor=1), data)
    kept = dset.images[:, 0, 0, 0].tolist()
    assert (dset.images == dset.images[:, :, :1, :1]).all()  # flat crops of flat images
    assert kept[:3] == [250, 200, 120] and kept[3:] == [5, 40, 90]
    # the loss of each kept patch is below that of every dropped candidate of its class
    loss = dset.meta["teacher_loss"]
    assert loss["kept"] < loss["best_crop"] and loss["best_crop"] == pytest.approx(loss["all_crops"], abs=1e-4)


@pytest.mark.parametrize("factor,size", [(1, 12), (2, 12), (2, 11)])
def test_whole_method_equals_loops_over_torchvision_crops(factor, size):
    """The vectorised run equals RDED written with loops (torchvision crop per crop, CE by hand,
    sort, canvases cell by cell), per class; the chunking of candidates changes nothing."""
    info = _info(k=3, size=size)
    data = _toy(info, per_class=9)
    model = _net(info)
    cfg = dict(ipc=2, candidates=8, crops=3, factor=factor, seed=4)
    dset = _run(_rded(info, model, **cfg, batch_size=3), data)
    assert dset.images.shape == (6, 3, size, size) and dset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    if size % factor == 0:
        ref = _reference(list(data.train.images), data.train.labels, model, info, RDEDConfig("toy", **cfg))
        assert (dset.images.int() - ref.int()).abs().max() <= 1
        assert (dset.images == ref).float().mean() > 0.99
    again = _run(_rded(info, model, **cfg, batch_size=100), data)
    assert torch.equal(again.images, dset.images)


# ---------------------------------------------------------------------------------------------
# stitching
def test_stitch_layout_factor_two():
    """Cell k (row-major) of image i holds patch k * ipc + i, each patch at size // 2."""
    ipc = 3
    patches = torch.arange(4 * ipc, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 4, 4)
    out = stitch(patches, ipc, 2, 8)
    assert out.shape == (ipc, 2, 8, 8)
    for i in range(ipc):
        cells = [out[i, :, :4, :4], out[i, :, :4, 4:], out[i, :, 4:, :4], out[i, :, 4:, 4:]]
        for k, cell in enumerate(cells):
            assert (cell == k * ipc + i).all(), (i, k)
    # image 0 holds the four best patches (ranks 0, 3, 6, 9), the top-left cell the very best
    assert out[0, 0, ::4, ::4].flatten().tolist() == [0, 3, 6, 9]


def test_stitch_odd_size_enlarges_the_first_row_and_column_by_nearest():
    p = torch.arange(4 * 16, dtype=torch.float32).view(4, 1, 4, 4)
    out = stitch(p, 1, 2, 9)
    assert torch.equal(out[0, :, :5, :5], F.interpolate(p[0:1], size=(5, 5), mode="nearest")[0])
    assert torch.equal(out[0, :, :5, 5:], F.interpolate(p[1:2], size=(5, 4), mode="nearest")[0])
    assert torch.equal(out[0, :, 5:, :5], F.interpolate(p[2:3], size=(4, 5), mode="nearest")[0])
    assert torch.equal(out[0, :, 5:, 5:], p[3])
    with pytest.raises(ValueError, match="needs ipc x factor"):
        stitch(p[:3], 1, 2, 9)


# ---------------------------------------------------------------------------------------------
# seeds, resume, the streamed path
def test_seeded_same_seed_same_set_other_seed_other_set():
    info = _info()
    data = _toy(info, per_class=20)
    model = _net(info)
    a = _run(_rded(info, model, ipc=2, candidates=10, crops=3, factor=2, seed=0), data)
    b = _run(_rded(info, model, ipc=2, candidates=10, crops=3, factor=2, seed=0), data)
    c = _run(_rded(info, model, ipc=2, candidates=10, crops=3, factor=2, seed=1), data)
    assert torch.equal(a.images, b.images) and a.meta == b.meta
    assert not torch.equal(a.images, c.images)
    # the candidates are a seeded draw of the class's images, distinct, all of them when fewer
    idx = candidate_indices(data.train.labels, 1, 10, 0)
    assert len(set(idx.tolist())) == 10 and (data.train.labels[idx] == 1).all()
    assert sorted(candidate_indices(data.train.labels, 1, 99, 0).tolist()) == list(range(20, 40))


def test_resume_equals_uninterrupted(tmp_path):
    info = _info(k=4)
    data = _toy(info)
    model = _net(info)
    full = run_method(_rded(info, model, ipc=1, candidates=6, crops=2), Run.open(tmp_path / "a", {}), data,
                      torch.device("cpu"), show_progress=False)
    run = Run.open(tmp_path / "b", {})
    run_method(_rded(info, model, ipc=1, candidates=6, crops=2), run, data, torch.device("cpu"),
               show_progress=False, stop_after=2, checkpoint_every=1)
    assert not run.done
    resumed = run_method(_rded(info, model, ipc=1, candidates=6, crops=2), Run.open(tmp_path / "b", {}, resume=True),
                         data, torch.device("cpu"), show_progress=False)
    assert torch.equal(full.images, resumed.images)
    assert DistilledSet.load(tmp_path / "b" / "artifact").meta["complete"]


def _png_tree(root: Path, info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor) -> None:
    from PIL import Image

    for n, (x, y) in enumerate(zip(images, labels, strict=True)):
        d = root / info.classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{n:04d}.png")


def test_streamed_split_gives_the_in_memory_set_and_crops_native_files(tmp_path, tmp_cache):
    """Files of the set's size: the streamed path selects what the in-memory path selects. Files of
    other sizes: cropped at native resolution, equal to the loops over torchvision."""
    from decoct.data.stream import StreamSplit, build_index

    info = _info(k=3, size=12)
    data = _toy(info, per_class=6)
    _png_tree(tmp_path / "same", info, data.train.images, data.train.labels)
    index = build_index(tmp_path / "same")
    assert index.labels.tolist() == data.train.labels.tolist()
    streamed = Dataset(info, StreamSplit(index, 12), data.test)
    model = _net(info)
    cfg = dict(ipc=1, candidates=5, crops=3, factor=2, seed=2)
    mem = _run(_rded(info, model, **cfg, batch_size=2), data)
    st = _run(_rded(info, model, **cfg, batch_size=2), streamed)
    assert (mem.images.int() - st.images.int()).abs().max() <= 1
    assert st.meta["crop_source"] == "files at native resolution"

    g = torch.Generator().manual_seed(5)
    natives = [torch.randint(0, 256, (3, 12 + 3 * (i % 4), 20 - 2 * (i % 3)), generator=g, dtype=torch.uint8)
               for i in range(18)]
    for n, (x, y) in enumerate(zip(natives, data.train.labels, strict=True)):
        from PIL import Image

        d = tmp_path / "native" / info.classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{n:04d}.png")
    nat = Dataset(info, StreamSplit(build_index(tmp_path / "native"), 12), data.test)
    got = _run(_rded(info, model, **cfg), nat)
    ref = _reference(natives, data.train.labels, model, info, RDEDConfig("toy", **cfg))
    assert (got.images.int() - ref.int()).abs().max() <= 1

    # a candidate file that does not decode: one line naming it
    bad = tmp_path / "native" / info.classes[0] / "0000.png"
    bad.write_bytes(b"not an image")
    from decoct.data.sources import BadImageError

    with pytest.raises(BadImageError, match="0000.png"):
        _run(_rded(info, model, **{**cfg, "candidates": 6}), nat)


# ---------------------------------------------------------------------------------------------
# options and bad input
def test_presets_and_config_files():
    import yaml

    from decoct.cli import build_parser
    from decoct.cli.common import _resolve

    assert PRESETS["small"] == PRESETS["tiny"] == dict(candidates=300, crops=5, factor=1)
    assert PRESETS["imagenet"] == dict(candidates=300, crops=5, factor=2)
    for info, factor in ((_info(size=32), 1), (_info(size=64), 1), (_info(size=128), 2), (_info(size=224), 2)):
        assert RDEDConfig("t", ipc=10).resolved(info).factor == factor
    parser = build_parser()
    fam = {"cifar": "small", "tiny": "tiny", "imagenet": "imagenet"}
    for name, f in fam.items():
        path = ROOT / "configs" / "decoupled" / f"rded-{name}.yaml"
        args = _resolve(parser, ["distill", "rded", "--teacher", "t", "--ipc", "1", "--out", "x", "--config", str(path)])
        for key, value in PRESETS[f].items():
            assert getattr(args, key) == value, (name, key)
        assert set(yaml.safe_load(path.read_text())) <= set(vars(args))


@pytest.mark.parametrize("options,message", [
    (dict(ipc=4, candidates=10, factor=2), r"ipc 4 x factor 2\^2 = 16 patches per class need at least 16 candidates"),
    (dict(ipc=1, crops=0), r"--crops must be an integer >= 1, got 0"),
    (dict(ipc=1, factor=13), r"--factor 13 is larger than the 12-pixel images"),
    (dict(ipc=1, crop_scale_min=0.0), r"--crop-scale-min must be in \(0, 1\]"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        _rded(_info(), _net(_info()), **options)


def test_classes_too_small_and_amp_on_cpu_fail_in_init():
    info = _info()
    with pytest.raises(ValueError, match=r"class 0 \('c0'\) has 9 training images; ipc 3 x factor 2\^2 needs 12"):
        _rded(info, _net(info), ipc=3, candidates=20, factor=2).init(_toy(info), torch.device("cpu"))
    with pytest.raises(ValueError, match="amp .* CUDA only"):
        _rded(info, _net(info), ipc=1, amp=True).init(_toy(info), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rded: unknown option\(s\) \['rho'\]"):
        METHODS.get("rded")({"teacher": "t", "ipc": 1, "rho": 0.1})


# ---------------------------------------------------------------------------------------------
# end to end on digits
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    from decoct.decoupled.squeeze import squeeze

    out = tmp_path_factory.mktemp("rded") / "teacher"
    squeeze(digits, "convnet_bn", out=out, epochs=4, model_kwargs=dict(width=16), device="cpu", show_progress=False)
    return out


def test_cli_bad_input_is_one_line_exit_2(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["--ipc", "400"], "need at least 400 candidates, got --candidates 300"),
        (["--ipc", "200"], "training images; ipc 200 x factor 1^2 needs 200"),
        (["--ipc", "1", "--crops", "0"], "--crops must be an integer >= 1"),
        (["--ipc", "1", "--factor", "9"], "--factor 9 is larger than the 8-pixel images"),
        (["--ipc", "1", "--amp", "--device", "cpu"], "CUDA only"),
    ]
    for extra, text in cases:
        assert main(["distill", "rded", "--teacher", str(teacher), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert text in err and err.startswith("decoct distill rded: error:") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    meta = json.loads((bad / "teacher.json").read_text())
    meta["dataset"]["classes"] = [f"d{i}" for i in range(10)]
    (bad / "teacher.json").write_text(json.dumps(meta))
    assert main(["distill", "rded", "--teacher", str(tmp_path / "none"), "--ipc", "1", "--out", str(out),
                 "--no-progress"]) == 2
    assert "teacher.json" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_digits_selection_and_students(teacher, digits, tmp_path, capsys):
    """CLI: rded IPC 2 on digits, students trained against the live teacher beside random real
    images with the same online labels. On 8 x 8 digits with a 4-epoch teacher RDED does not beat
    random real reliably (measured: 3 of 6 seeds; docs/methods/rded.md), so what is asserted is the
    selection's own claim -- the kept crops are far more confident than random crops of the same
    images -- and that both students learn far above chance; then the stored-label protocol."""
    from decoct.decoupled.relabel import relabel
    from decoct.evaluation.protocols import evaluate

    out = tmp_path / "rded"
    argv = ["distill", "rded", "--teacher", str(teacher), "--ipc", "2", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    assert "rded: 20 images (2 per class, factor 1)" in capsys.readouterr().out
    assert DistilledSet.verify(out / "artifact") == []
    dset = DistilledSet.load(out / "artifact")
    assert dset.method == "rded" and dset.ipc == [2] * 10 and dset.soft_labels is None
    assert dset.meta["factor"] == 1 and dset.config["candidates"] == 300 and dset.config["crops"] == 5
    loss = dset.meta["teacher_loss"]
    assert loss["kept"] < 0.5 * loss["best_crop"] and loss["best_crop"] < 0.6 * loss["all_crops"]
    assert main(argv) == 0  # a finished run is a no-op
    assert torch.equal(DistilledSet.load(out / "artifact").images, dset.images)

    r = evaluate(out / "artifact", "soft", runs=1, dataset=digits, device="cpu", model="mlp", lr=1e-2, epochs=30, batch_size=8,
                 online_teacher=teacher, baseline="random", progress=False)
    assert r.protocol == "soft-online" and r.baseline.extra["ipc"] == 2
    assert r.bytes_on_disk < 1.5 * r.baseline.bytes_on_disk  # equal image count, no label bytes
    assert r.mean > 0.4 and r.baseline.mean > 0.4  # chance is 0.1

    stored = relabel(out / "artifact", teacher, epochs=15, batch_size=8, seed=0, device="cpu", out=tmp_path / "relabelled")
    s = evaluate(stored, "soft", runs=1, dataset=digits, device="cpu", model="mlp", lr=1e-2, progress=False)
    assert s.protocol == "soft" and s.extra["label_bytes"] > 0 and s.mean > 0.3
