"""The decoupled family on an ImageNet-shaped tree: squeeze --weights, the streamed statistics pass
(closed-form EMA, sharding, torchrun), streamed validation, recover from streamed real images."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from decoct.data import load_dataset
from decoct.data.fake_imagenet import make_tree
from decoct.decoupled.squeeze import (
    SqueezeConfig,
    _StatsCollector,
    collect_bn_stats,
    collect_bn_stats_stream,
    ema_plan,
    load_weights_file,
    squeeze,
)
from decoct.models import model_for
from decoct.train.trainer import evaluate_split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root, classes=6, per_class=5, val_per_class=2, size=(48, 40))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision resnet18 state dict with a 6-way head (random init: no download)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=6)
    p = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(net.state_dict(), p)
    return p


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECOCT_CACHE", str(tmp_path / "cache"))


def _data(tree, mode, **kw):
    return load_dataset("imagenet", root=tree, data_mode=mode, image_size=32, workers=0, **kw)


# ------------------------------------------------------------------------------------- EMA plan
def test_ema_plan_equals_the_sequential_update():
    """The closed form sum_b m (1-m)^after[b,c] v_b + (1-m)^updates init == the batch-by-batch EMA."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (37,), generator=g)
    values = torch.randn(10, 5, dtype=torch.float64, generator=g)  # one value per batch and class
    m, bs = 0.1, 4
    after, updates = ema_plan(labels, bs, 5)
    ema = torch.ones(5, dtype=torch.float64)
    closed = torch.zeros(5, dtype=torch.float64)
    for b in range(10):
        present = torch.zeros(5, dtype=torch.bool)
        present[labels[b * bs:(b + 1) * bs]] = True
        ema = torch.where(present, (1 - m) * ema + m * values[b], ema)
        closed += present * m * (1 - m) ** after[b].double() * values[b]
    closed += (1 - m) ** updates.double()
    assert torch.allclose(ema, closed, atol=1e-12)
    assert updates.tolist() == [sum(int(c in labels[b * bs:(b + 1) * bs].tolist()) for b in range(10))
                                for c in range(5)]


def test_stats_match_a_brute_force_pass_with_sequential_ema():
    """collect_bn_stats' class EMA equals LPLD's batch-by-batch update computed by hand."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(48, 3))
    from decoct.data.types import DatasetInfo

    info = DatasetInfo("t", ("a", "b", "c"), 3, 4, 4, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (23,))
    st = collect_bn_stats(net, images, labels, info, batch_size=5, seed=3)
    from decoct.data import normalize
    from decoct.train.trainer import make_generators

    perm_gen, _ = make_generators(3, torch.device("cpu"))
    order = torch.randperm(23, generator=perm_gen)
    mean, var = torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
    for s in range(0, 23, 5):
        idx = order[s:s + 5]
        x = normalize(images[idx], info).double()
        for c in labels[idx].unique().tolist():
            xc = x[labels[idx] == c]
            mean[c] = 0.9 * mean[c] + 0.1 * xc.mean(dim=(0, 2, 3))
            var[c] = 0.9 * var[c] + 0.1 * xc.var(dim=(0, 2, 3), unbiased=False)
    name = st.layers[0]
    assert torch.allclose(st.stats[name]["class_mean"].double(), mean, atol=1e-5)
    assert torch.allclose(st.stats[name]["class_var"].double(), var, atol=1e-5)


# ------------------------------------------------------------------------------------- weights
def test_weights_file_loads_and_cuts_the_head_to_a_class_subset(tree, weights, cache, tmp_path):
    data = _data(tree, "stream", classes="2:5")
    assert data.subset_of == (2, 3, 4)
    full = torchvision.models.resnet18(num_classes=6)
    full.load_state_dict(torch.load(weights, weights_only=True))
    net = model_for("resnet18", data.info, stem="imagenet")
    load_weights_file(net, weights, SqueezeConfig("imagenet", "resnet18"), data.info, data.subset_of)
    x = torch.randn(2, 3, 32, 32)
    full.eval()
    net.eval()
    assert torch.allclose(net(x), full(x)[:, 2:5], atol=1e-5)
    st = tmp_path / "r18.safetensors"  # the same state dict as safetensors loads the same
    save_file(torch.load(weights, weights_only=True), str(st))
    net2 = model_for("resnet18", data.info, stem="imagenet")
    load_weights_file(net2, st, SqueezeConfig("imagenet", "resnet18"), data.info, data.subset_of)
    assert torch.equal(net2.eval()(x), net(x))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("pickle", "not a weights-only torch checkpoint"),
    ("not_state", "not a state dict"),
    ("wrong_arch", "do not fit the model"),
    ("garbage_st", "not a readable safetensors"),
])
def test_bad_weights_files_are_refused(tree, weights, cache, tmp_path, case, message):
    data = _data(tree, "stream")
    p = tmp_path / ("w.safetensors" if case == "garbage_st" else "w.pth")
    if case == "pickle":
        torch.save({"x": _Evil()}, p)
    elif case == "not_state":
        torch.save([torch.zeros(1)], p)
    elif case == "wrong_arch":
        torch.save(torchvision.models.resnet50(num_classes=6).state_dict(), p)
    elif case == "garbage_st":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    net = model_for("resnet18", data.info, stem="imagenet")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_weights_file(net, p, SqueezeConfig("imagenet", "resnet18"), data.info, None)


def test_weights_need_a_class_subset_or_the_same_classes(tree, weights, cache):
    data = _data(tree, "stream", classes="0:3")
    net = model_for("resnet18", data.info, stem="imagenet")
    with pytest.raises(ValueError, match="--classes"):
        load_weights_file(net, weights, SqueezeConfig("imagenet", "resnet18"), data.info, None)


# ------------------------------------------------------------------------------------- passes
def test_streamed_and_in_memory_statistics_agree_on_the_same_pixels(tree, weights, cache):
    """The val view decoded into memory and streamed per batch give the same statistics."""
    mem, stream = _data(tree, "memory"), _data(tree, "stream")
    net = model_for("resnet18", mem.info, stem="imagenet")
    load_weights_file(net, weights, SqueezeConfig("imagenet", "resnet18"), mem.info)
    a = collect_bn_stats(net, mem.train.images, mem.train.labels, mem.info, batch_size=7, seed=1)
    b = collect_bn_stats_stream(net, stream.train, stream.info, batch_size=7, augment="none", seed=1, workers=0)
    for layer in a.layers:
        for key, t in a.stats[layer].items():
            assert torch.allclose(t.double(), b.stats[layer][key].double(), atol=1e-5, rtol=1e-5), (layer, key)
    acc_mem = evaluate_split(net, mem.test, mem.info, 5)
    acc_stream = evaluate_split(net, stream.test, stream.info, 5, workers=2)
    assert acc_mem == acc_stream


def test_sharded_stats_sum_to_the_single_pass(tree, weights, cache, monkeypatch):
    """Two shards' collectors, summed as the all-reduce does, equal one pass (no process group needed)."""
    data = _data(tree, "stream")
    net = model_for("resnet18", data.info, stem="imagenet")
    load_weights_file(net, weights, SqueezeConfig("imagenet", "resnet18"), data.info)
    one = collect_bn_stats_stream(net, data.train, data.info, batch_size=4, augment="rrc_flip", seed=2, workers=0)
    from decoct.data import normalize
    from decoct.train.trainer import make_generators

    perm_gen, _ = make_generators(2, "cpu")
    order = torch.randperm(len(data.train), generator=perm_gen)
    after, updates = ema_plan(data.train.labels[order], 4, data.info.num_classes)
    parts = []
    for r in range(2):
        col = _StatsCollector(net, data.info.num_classes, 0.1, torch.device("cpu"), after, updates)
        for x, y, pos in data.train.loader("train", batch_size=4, order=order, batches=range(r, len(after), 2),
                                           seed=2, workers=0):
            col.labels, col.batch = y, int(pos[0]) // 4
            with torch.no_grad():
                net(normalize(x, data.info))
        col.labels = None
        col.remove()
        parts.append(col)
    for name, _ in parts[0].layers:  # the reduction of _StatsCollector.reduce, by hand
        a, b = parts[0].acc[name], parts[1].acc[name]
        for key in ("ema_mean", "ema_var", "rows"):
            a[key] = a[key] + b[key]
        n = a["n"] + b["n"]
        mean = (a["mean"] * a["n"][:, None] + b["mean"] * b["n"][:, None]) / n.clamp(min=1)[:, None]
        a["m2"] = (a["m2"] + a["n"][:, None] * (a["mean"] - mean).square()
                   + b["m2"] + b["n"][:, None] * (b["mean"] - mean).square())
        a["n"], a["mean"] = n, mean
    two = parts[0].result()
    for layer in one.layers:
        for key, t in one.stats[layer].items():
            assert torch.allclose(t.double(), two.stats[layer][key].double(), atol=1e-6, rtol=1e-6), (layer, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_squeeze_equals_one_process(tree, weights, tmp_path):
    """2 gloo ranks: the streamed validation and statistics pass give the teacher one process gives."""
    args = ["squeeze", "--dataset", "imagenet", "--data-root", str(tree), "--model", "resnet18", "--weights",
            str(weights), "--data-mode", "stream", "--workers", "0", "--stats-batch-size", "4", "--no-progress",
            "--device", "cpu", "--set", "model_kwargs=stem=imagenet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DECOCT_CACHE=str(tmp_path / "cache"))
    one = subprocess.run([sys.executable, "-m", "decoct.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "decoct.cli", *args, "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "bn_stats.safetensors"), load_file(tmp_path / "two" / "bn_stats.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=1e-6), k
    import json

    ma, mb = (json.loads((tmp_path / d / "teacher.json").read_text()) for d in ("one", "two"))
    assert ma["test_accuracy"] == mb["test_accuracy"] and mb["world_size"] == 2 and mb["streamed"]


def test_squeeze_streamed_refuses_training_and_records_the_pass(tree, weights, cache, tmp_path):
    with pytest.raises(ValueError, match="--weights"):
        squeeze("imagenet", "resnet18", out=tmp_path / "t", data_root=str(tree), device="cpu",
                data_options={"data_mode": "stream", "workers": 0}, show_progress=False)
    assert not (tmp_path / "t").exists()
    t = squeeze("imagenet", "resnet18", out=tmp_path / "t", data_root=str(tree), device="cpu", weights=str(weights),
                data_options={"data_mode": "stream", "workers": 0, "image_size": 32}, model_kwargs={"stem": "imagenet"},
                stats_batch_size=8, show_progress=False)
    assert t.meta["streamed"] and t.meta["stats_augment"] == "rrc_flip"
    assert t.meta["weights"] == str(Path(weights).resolve()) and len(t.meta["weights_sha256"]) == 64
    assert "epochs" not in t.meta["train"] and t.meta["train"]["stats_batch_size"] == 8  # never trained here
    assert t.meta["num_train_images"] == 30 and 0 <= t.meta["test_accuracy"] <= 1
    counts = t.stats.stats[t.stats.layers[0]]["class_count"]
    assert counts.tolist() == [5] * 6


@pytest.mark.slow
def test_every_decoupled_stage_runs_streamed_end_to_end(tree, weights, tmp_path, monkeypatch, capsys):
    """squeeze --weights -> distill lpld/dwa -> relabel --prune -> evaluate --protocol soft, all streamed."""
    from decoct.cli import main
    from decoct.formats.artifact import DistilledSet

    monkeypatch.setenv("DECOCT_CACHE", str(tmp_path / "cache"))
    t = tmp_path / "t"
    squeeze("imagenet", "resnet18", out=t, data_root=str(tree), device="cpu", weights=str(weights),
            data_options={"data_mode": "stream", "workers": 0, "image_size": 32, "classes": "0:6"},
            model_kwargs={"stem": "imagenet"}, stats_batch_size=8, show_progress=False)
    common = ["--no-progress", "--device", "cpu", "--workers", "0"]
    for method, extra in (("lpld", []), ("dwa", ["--dwa-steps", "1"])):
        assert main(["distill", method, "--teacher", str(t), "--ipc", "1", "--iterations", "2", "--out",
                     str(tmp_path / method), *extra, *common]) == 0
    dwa = DistilledSet.load(tmp_path / "dwa" / "artifact")
    assert dwa.images.shape == (6, 3, 32, 32) and dwa.meta.get("init", dwa.config.get("init")) == "real"
    assert main(["relabel", str(tmp_path / "lpld"), "--teacher", str(t), "--epochs", "20", "--batch-size", "3",
                 "--prune", "10", "--out", str(tmp_path / "p10"), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "p10"), "--protocol", "soft", "--runs", "1", "--epochs", "2",
                 *common]) == 0
    out = capsys.readouterr().out
    assert "soft" in out and "6 images" in out
    import json

    saved = json.loads(next((tmp_path / "p10").glob("eval-soft-*.json")).read_text())
    assert len(saved["accuracies"]) == 1 and 0 <= saved["accuracies"][0] <= 1
    # the classic protocol keeps the test split in memory: refused on a streamed dataset, by name
    assert main(["evaluate", str(tmp_path / "lpld"), "--protocol", "fast", "--runs", "1", "--epochs", "1",
                 *common]) == 2
    assert "--protocol soft" in capsys.readouterr().err


def test_streamed_stats_pass_resumes_from_its_checkpoint_bit_for_bit(tree, weights, cache, tmp_path):
    """An interrupted statistics pass (stop_after) continues from its checkpoint file and gives the
    statistics of an uninterrupted pass exactly; a file of another pass is refused naming the setting."""
    data = _data(tree, "stream")
    net = model_for("resnet18", data.info, stem="imagenet")
    load_weights_file(net, weights, SqueezeConfig("imagenet", "resnet18"), data.info)
    kw = dict(batch_size=4, augment="rrc_flip", seed=2, workers=0)
    one = collect_bn_stats_stream(net, data.train, data.info, **kw)
    ck = tmp_path / "stats-part0.pt"
    assert collect_bn_stats_stream(net, data.train, data.info, checkpoint=ck, checkpoint_every=2, stop_after=3,
                                   **kw) is None
    state = torch.load(ck, weights_only=True)
    assert state["done"] == 3
    zeroed = tmp_path / "zeroed.pt"  # the sums are read back: a checkpoint with them zeroed changes the result
    torch.save({**state, "acc": {n: {k: torch.zeros_like(t) for k, t in a.items()} for n, a in state["acc"].items()}},
               zeroed)
    other = collect_bn_stats_stream(net, data.train, data.info, checkpoint=zeroed, **kw)
    assert not torch.equal(other.stats[one.layers[0]]["mean"], one.stats[one.layers[0]]["mean"])
    with pytest.raises(ValueError, match="batch_size 4 \\(now 5\\)"):
        collect_bn_stats_stream(net, data.train, data.info, checkpoint=ck, **{**kw, "batch_size": 5})
    resumed = collect_bn_stats_stream(net, data.train, data.info, checkpoint=ck, checkpoint_every=2, **kw)
    for layer in one.layers:
        for key, t in one.stats[layer].items():
            assert torch.equal(t, resumed.stats[layer][key]), (layer, key)
