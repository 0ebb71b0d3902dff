"""Squeeze: BN-input statistics (global, per class, LPLD's EMA), teacher directory, resume, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoct.data import Dataset, DatasetInfo, ImageSplit, normalize
from decoct.decoupled.squeeze import collect_bn_stats, crop_resize, rrc_boxes, squeeze
from decoct.formats.teacher import (
    TeacherError,
    check_teacher_dataset,
    load_bn_stats,
    load_teacher,
    load_teacher_full,
)
from decoct.runtime.io import sha256_file
from decoct.train.trainer import make_generators

pytestmark = pytest.mark.usefixtures("one_thread")


INFO = DatasetInfo("toy", ("a", "b", "c"), 2, 6, 6, (0.5, 0.4), (0.25, 0.3))


class Tiny(nn.Module):
    """Two BN2d layers and one BN1d, so statistics over (N, H, W) and over N are both exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(27, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.bn3(self.fc1(x.flatten(1)))))


def _model() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    for bn in (m.bn1, m.bn2, m.bn3):  # non-trivial running buffers
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return m.eval()


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every BN layer for ``x`` (brute force, via hooks)."""
    got: dict[str, torch.Tensor] = {}
    hs = [m.register_forward_hook(lambda mod, inp, out, n=n: got.__setitem__(n, inp[0].detach()))
          for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return got


def _data(n: int = 23, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 2, 6, 6), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 0, 1] * 4)[:n]
    return images, labels


def test_per_class_and_global_stats_equal_direct_computation():
    model = _model()
    images, labels = _data()
    st = collect_bn_stats(model, images, labels, INFO, batch_size=5, augment="none", seed=3)
    assert st.layers == ["bn1", "bn2", "bn3"]
    feats = _inputs(model, normalize(images, INFO))
    for name in st.layers:
        x = feats[name].double()
        dims = [0] + list(range(2, x.dim()))
        s = st.stats[name]
        torch.testing.assert_close(s["mean"].double(), x.mean(dims), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s["var"].double(), x.var(dims, unbiased=False), rtol=1e-5, atol=1e-5)
        for c in range(3):  # class by class
            xc = x[labels == c]
            torch.testing.assert_close(s["class_mean_exact"][c].double(), xc.mean(dims), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s["class_var_exact"][c].double(), xc.var(dims, unbiased=False),
                                       rtol=1e-5, atol=1e-5)
        assert s["class_count"].tolist() == torch.bincount(labels, minlength=3).tolist()


def test_class_ema_follows_lpld_rule_batch_by_batch():
    """LPLD: for every batch and every class present, stat <- 0.9 stat + 0.1 (biased batch-class moment)."""
    model = _model()
    images, labels = _data()
    labels = labels.clone()
    labels[labels == 2] = 0  # class 2 never appears: its statistics must stay at the init 0 / 1
    st = collect_bn_stats(model, images, labels, INFO, batch_size=4, augment="none", seed=5)
    order = torch.randperm(len(labels), generator=make_generators(5, "cpu")[0])
    feats = _inputs(model, normalize(images, INFO))
    for name in st.layers:
        c_dim = feats[name].shape[1]
        mean, var = torch.zeros(3, c_dim, dtype=torch.float64), torch.ones(3, c_dim, dtype=torch.float64)
        for start in range(0, len(order), 4):
            idx = order[start:start + 4]
            for c in range(3):
                xc = feats[name][idx][labels[idx] == c].double()
                if len(xc) == 0:
                    continue
                dims = [0] + list(range(2, xc.dim()))
                mean[c] = 0.9 * mean[c] + 0.1 * xc.mean(dims)
                var[c] = 0.9 * var[c] + 0.1 * xc.var(dims, unbiased=False)
        torch.testing.assert_close(st.stats[name]["class_mean"].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.stats[name]["class_var"].double(), var, rtol=1e-5, atol=1e-5)
        assert torch.equal(st.stats[name]["class_mean"][2], torch.zeros(c_dim))
        assert torch.equal(st.stats[name]["class_var"][2], torch.ones(c_dim))


def test_stats_pass_leaves_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _data()
    collect_bn_stats(model, images, labels, INFO, batch_size=8, augment="crop_flip")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_crop_resize_matches_interpolate_and_boxes_fit():
    x = torch.randn(3, 2, 8, 8)
    boxes = torch.tensor([[2, 3, 4, 4], [0, 0, 8, 8], [1, 2, 5, 3]])
    y = crop_resize(x, boxes, (8, 8))
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    b = rrc_boxes(500, 8, 8, torch.Generator().manual_seed(0))
    assert (b[:, 2] >= 1).all() and (b[:, 3] >= 1).all()
    assert (b[:, 0] + b[:, 2] <= 8).all() and (b[:, 1] + b[:, 3] <= 8).all() and (b >= 0).all()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("sq") / "t"
    squeeze(digits, "convnet_bn", out=out, epochs=2, model_kwargs=dict(width=8), device="cpu",
            show_progress=False)
    return out


def test_teacher_directory_roundtrip(teacher_dir, digits):
    model, info, meta = load_teacher(teacher_dir)
    assert not model.training and info == digits.info
    assert meta["format"] == "decoct-teacher" and meta["version"] == 1 and meta["model"] == "convnet_bn"
    assert meta["model_kwargs"] == {"width": 8} and 0.3 < meta["test_accuracy"] <= 1
    assert {p.name for p in teacher_dir.iterdir()} >= {"model.safetensors", "bn_stats.safetensors", "teacher.json"}
    st = load_bn_stats(teacher_dir)
    st.check_model(model)
    assert st.stats["features.1"]["class_mean"].shape == (10, 8)
    assert int(st.stats["features.1"]["class_count"].sum()) == len(digits.train)
    # statistics recorded with the model in eval mode: running buffers are the trained ones
    m2 = load_teacher(teacher_dir, with_stats=True)[2]["bn_stats"]
    assert m2.layers == st.layers


def test_squeeze_resume_equals_uninterrupted(tmp_path, digits):
    kw = dict(epochs=3, model_kwargs=dict(width=8), device="cpu", show_progress=False, seed=4)
    full = squeeze(digits, "convnet_bn", out=tmp_path / "a", **kw)
    part = squeeze(digits, "convnet_bn", out=tmp_path / "b", stop_after=1, **kw)
    assert part.meta.get("unfinished") and (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(RuntimeError, match="--resume"):
        squeeze(digits, "convnet_bn", out=tmp_path / "b", **kw)
    resumed = squeeze(digits, "convnet_bn", out=tmp_path / "b", resume=True, **kw)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for n in full.stats.layers:
        for k, v in full.stats.stats[n].items():
            assert torch.equal(v, resumed.stats.stats[n][k]), (n, k)
    # a finished directory is reused (no retraining)
    again = squeeze(digits, "convnet_bn", out=tmp_path / "b", **kw)
    assert torch.equal(again.model.state_dict()["classifier.weight"], b["classifier.weight"])


def test_corrupted_or_mismatched_teacher_is_refused(teacher_dir, tmp_path, digits):
    import shutil

    t = tmp_path / "t"
    shutil.copytree(teacher_dir, t)
    data = bytearray((t / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (t / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TeacherError, match="sha256"):
        load_teacher(t)
    # BN statistics of another architecture (a depth-1 ConvNet), with hashes made consistent
    other = squeeze(digits, "convnet_bn", out=tmp_path / "o", epochs=1, model_kwargs=dict(width=8, depth=1),
                    device="cpu", show_progress=False)
    shutil.copytree(teacher_dir, tmp_path / "m")
    m = tmp_path / "m"
    shutil.copy(other.path / "bn_stats.safetensors", m / "bn_stats.safetensors")
    meta = json.loads((m / "teacher.json").read_text())
    meta["files"]["bn_stats.safetensors"] = sha256_file(m / "bn_stats.safetensors")
    (m / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="another"):
        load_teacher_full(m)
    with pytest.raises(TeacherError, match="no teacher.json"):
        load_teacher(tmp_path / "nothing")


def test_dataset_mismatch_and_bad_options(teacher_dir, tmp_path, digits):
    _, info, _ = load_teacher(teacher_dir)
    other = DatasetInfo("other", tuple(str(i) for i in range(9)), 1, 8, 8, (0.5,), (0.5,))
    with pytest.raises(TeacherError, match="classes"):
        check_teacher_dataset(info, other)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        squeeze(digits, "nope", out=tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="no BatchNorm"):
        squeeze(digits, "convnet", out=tmp_path / "y", device="cpu", epochs=1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_pretrained_torchvision_only_from_cache(tmp_path, monkeypatch):
    """Never downloads: a missing cache file is a clear error; a cached one is loaded as is."""
    import torchvision

    from decoct.decoupled.squeeze import _torchvision_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "home" / "hub"))  # restored afterwards
    info = DatasetInfo("in1k", tuple(f"c{i}" for i in range(1000)), 3, 32, 32, (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225))
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    split = ImageSplit(imgs, torch.tensor([0, 1, 2, 3, 4, 999]))
    data = Dataset(info, split, ImageSplit(imgs[:0], torch.zeros(0, dtype=torch.long)))
    kw = dict(out=tmp_path / "t", pretrained="torchvision", model_kwargs=dict(stem="imagenet"), device="cpu",
              show_progress=False)
    with pytest.raises(FileNotFoundError, match="never"):
        squeeze(data, "resnet18", **kw)
    assert not (tmp_path / "t").exists()
    path, _ = _torchvision_weights("resnet18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), path)
    t = squeeze(data, "resnet18", force=True, **kw)
    assert torch.equal(t.model.net.fc.weight, ref.fc.weight)
    assert len(t.stats.layers) == 20 and t.meta["pretrained"] == "torchvision"


# ---------------------------------------------------------------------- issue 10: verified on every load
def _teacher_copy(teacher_dir, dst):
    import shutil

    shutil.copytree(teacher_dir, dst)
    return dst


def _edit_meta(t, fn):
    meta = json.loads((t / "teacher.json").read_text())
    fn(meta)
    (t / "teacher.json").write_text(json.dumps(meta))


def test_teacher_without_hashes_is_refused(teacher_dir, tmp_path):
    for name, edit in (("nofiles", lambda m: m.pop("files")),
                       ("nomodel", lambda m: m["files"].pop("model.safetensors")),
                       ("nostats", lambda m: m["files"].pop("bn_stats.safetensors")),
                       ("badhash", lambda m: m["files"].__setitem__("model.safetensors", "abc"))):
        t = _teacher_copy(teacher_dir, tmp_path / name)
        _edit_meta(t, edit)
        with pytest.raises(TeacherError, match="no sha256 recorded"):
            load_teacher(t)
        with pytest.raises(TeacherError, match="no sha256 recorded"):
            load_teacher_full(t, with_stats=False)


def test_teacher_files_that_are_not_safetensors_are_named(teacher_dir, tmp_path):
    import io
    import os
    import pickle

    model = (teacher_dir / "model.safetensors").read_bytes()
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    for i, payload in enumerate((os.urandom(400), pickle.dumps({"a": 1}), buf.getvalue(), model[: len(model) // 2],
                                 b"")):
        for fname in ("model.safetensors", "bn_stats.safetensors"):
            t = _teacher_copy(teacher_dir, tmp_path / f"{i}-{fname}")
            (t / fname).write_bytes(payload)
            _edit_meta(t, lambda m, f=fname, t=t: m["files"].__setitem__(f, sha256_file(t / f)))
            with pytest.raises(TeacherError, match=f"{fname}: not a valid safetensors file"):
                load_teacher_full(t)


def test_teacher_links_and_forged_sizes_are_refused(teacher_dir, tmp_path):
    t = _teacher_copy(teacher_dir, tmp_path / "link")
    (tmp_path / "m.safetensors").write_bytes((t / "model.safetensors").read_bytes())
    (t / "model.safetensors").unlink()
    (t / "model.safetensors").symlink_to(tmp_path / "m.safetensors")
    with pytest.raises(TeacherError, match="symbolic link"):
        load_teacher(t)
    # options read from teacher.json that would build a far larger model: refused by shape, before allocating
    t = _teacher_copy(teacher_dir, tmp_path / "wide")
    _edit_meta(t, lambda m: m.__setitem__("model_kwargs", {"width": 100_000}))
    with pytest.raises(TeacherError, match="does not fit model convnet_bn"):
        load_teacher(t)
    for text in ("[]", "3", '"x"'):
        t = tmp_path / f"json{len(text)}"
        if not t.exists():
            _teacher_copy(teacher_dir, t)
        (t / "teacher.json").write_text(text)
        with pytest.raises(TeacherError, match="teacher.json: holds a JSON"):
            load_teacher(t)


def test_teacher_cli_error_is_one_line(teacher_dir, tmp_path, capsys):
    from decoct.cli import main

    t = _teacher_copy(teacher_dir, tmp_path / "t")
    _edit_meta(t, lambda m: m.pop("files"))
    capsys.readouterr()
    rc = main(["distill", "sre2l", "--teacher", str(t), "--dataset", "digits", "--ipc", "1", "--out",
               str(tmp_path / "run"), "--iterations", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no sha256 recorded" in err and "Traceback" not in err
