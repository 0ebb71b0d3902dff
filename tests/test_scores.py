"""DD-Ranking's scores (HLR, IOR, LRS, ARS) from decoct's engine, and the DD-Ranking export.

The formulas are checked against numbers worked out by hand; the orchestration against a recording
trainer (which students train on what, with which labels and recipe); the full-data cache by
a trainer that fails; the command line end to end on digits with one-epoch students.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from decoct.cli import main
from decoct.coreset.select import random_baseline_indices
from decoct.data import normalize
from decoct.evaluation import protocols, scores
from decoct.evaluation.scores import (
    aggregate,
    ars,
    ddranking_scores,
    full_data_accuracy,
    hlr,
    ior,
    lrs,
    squash,
)
from decoct.formats.artifact import DistilledSet
from decoct.formats.ddranking import DDRankingExportError, export_ddranking
from decoct.train.trainer import seeded_model

pytestmark = pytest.mark.usefixtures("one_thread")

E = math.e
DEN = E - 1 / E  # e - e^-1 = 2.3504023872876028


# ---------------------------------------------------------------------- formulas, by hand
def test_squash_endpoints_and_centre():
    assert squash(1.0) == pytest.approx(1.0, abs=1e-12)
    assert squash(-1.0) == pytest.approx(0.0, abs=1e-12)
    assert squash(0.0) == pytest.approx(1 / (E + 1), abs=1e-12)  # (1 - e^-1)/(e - e^-1) = 1/(e + 1) = 0.26894
    assert squash(0.0) == pytest.approx(0.268941, abs=1e-6)
    # below -1 it tends to the floor -e^-1/(e - e^-1) = -0.15651, above 1 it leaves [0, 1]
    assert squash(-50.0) == pytest.approx(-0.156518, abs=1e-6)
    assert squash(2.0) > 1.0
    assert squash(1000.0) == math.inf


def test_hlr_ior_lrs_by_hand():
    # real 0.90, syn hard 0.50, syn with its labels 0.60, random real 0.40
    h, i = hlr(0.90, 0.50), ior(0.60, 0.40)
    assert h == pytest.approx(0.40) and i == pytest.approx(0.20)
    # a = 0.5 * 0.2 - 0.5 * 0.4 = -0.1: (e^-0.1 - e^-1) / (e - e^-1) = (0.904837 - 0.367879) / 2.350402
    assert lrs(h, i) == pytest.approx(0.228453, abs=1e-6)
    # DD-Ranking's code feeds percent: a = -10 points, (e^-10 - e^-1) / (e - e^-1) = -0.156499, below its own [0, 1]
    assert lrs(h, i, scale=100) == pytest.approx(-0.156499, abs=1e-6)
    # lambda weights IOR against HLR
    assert lrs(h, i, lam=1.0) == pytest.approx((math.exp(0.2) - 1 / E) / DEN)
    assert lrs(h, i, lam=0.0) == pytest.approx((math.exp(-0.4) - 1 / E) / DEN)


def test_lrs_endpoints():
    # a = 0.5 IOR - 0.5 HLR reaches 1 only at IOR = 1, HLR = -1 (LRS 1), and -1 at IOR = -1, HLR = 1 (LRS 0)
    assert lrs(hlr(0.0, 1.0), ior(1.0, 0.0)) == pytest.approx(1.0, abs=1e-12)
    assert lrs(hlr(1.0, 0.0), ior(0.0, 1.0)) == pytest.approx(0.0, abs=1e-12)
    # a = 0 (HLR = IOR): both scales agree, at 1/(e+1); any other a differs between them
    assert lrs(0.3, 0.3) == pytest.approx(lrs(0.3, 0.3, scale=100)) == pytest.approx(1 / (E + 1))
    assert lrs(0.3, 0.31) != pytest.approx(lrs(0.3, 0.31, scale=100), abs=1e-3)


def test_ars_by_hand_and_endpoints():
    # gains 0.6 - 0.4 = 0.2 with augmentation, 0.5 - 0.45 = 0.05 without: b = 0.125
    assert ars(0.6, 0.4, 0.5, 0.45) == pytest.approx((math.exp(0.125) - 1 / E) / DEN, abs=1e-12)
    assert ars(0.6, 0.4, 0.5, 0.45) == pytest.approx(0.325591, abs=1e-6)
    assert ars(0.6, 0.4, 0.5, 0.45, scale=100) == pytest.approx((math.exp(12.5) - 1 / E) / DEN, rel=1e-12)
    assert ars(0.6, 0.4, 0.5, 0.45, scale=100) > 1e5  # percent-fed: far outside [0, 1]
    assert ars(1.0, 0.0, 1.0, 0.0) == pytest.approx(1.0) and ars(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert ars(0.6, 0.4, 0.5, 0.45, lam=1.0) == pytest.approx((math.exp(0.2) - 1 / E) / DEN)


@pytest.mark.parametrize("call", [lambda: hlr(90.0, 50.0), lambda: ior(0.6, 40.0), lambda: lrs(40.0, 20.0),
                                  lambda: ars(60, 40, 50, 45), lambda: lrs(0.1, 0.1, lam=2.0)])
def test_percentages_are_refused(call):
    with pytest.raises(ValueError, match=r"fraction|\[0, 1\]|\[-1, 1\]"):
        call()


def test_aggregate_scores_each_round_then_averages():
    agg = aggregate([0.9, 0.8], [0.5, 0.6], [0.6, 0.7], [0.4, 0.7], [0.5, 0.6], [0.45, 0.6])
    assert agg["hlr"]["rounds"] == pytest.approx([0.4, 0.2]) and agg["ior"]["rounds"] == pytest.approx([0.2, 0.0])
    assert agg["hlr"]["mean"] == pytest.approx(0.3) and agg["hlr"]["std"] == pytest.approx(0.1)  # ddof=0
    r0, r1 = squash(-0.1), squash(-0.1)
    assert agg["lrs"]["rounds"] == pytest.approx([r0, r1])
    # LRS of the mean HLR/IOR (0.3, 0.1) would be squash(-0.1) too here; a case where the order matters:
    agg2 = aggregate([0.9, 0.9], [0.9, 0.1], [0.9, 0.9], [0.9, 0.1])
    per_round = (squash(0.0) + squash(0.5 * 0.8 - 0.5 * 0.8)) / 2
    assert agg2["lrs"]["mean"] == pytest.approx(per_round)
    agg3 = aggregate([0.9, 0.9], [0.1, 0.9], [0.9, 0.9], [0.9, 0.1])
    assert agg3["lrs"]["mean"] == pytest.approx((squash(-0.4) + squash(0.4)) / 2)
    assert agg3["lrs"]["mean"] != pytest.approx(squash(0.0))  # not squash of the mean a
    assert agg["ars"]["rounds"] == pytest.approx([ars(0.6, 0.4, 0.5, 0.45), ars(0.7, 0.7, 0.6, 0.6)])
    assert agg["lrs_percent_fed"]["rounds"] == pytest.approx([squash(-10.0), squash(-10.0)])
    assert "ars" not in aggregate([0.9], [0.5], [0.6], [0.4])
    with pytest.raises(ValueError, match="one value per round"):
        aggregate([0.9, 0.8], [0.5], [0.6], [0.4])
    with pytest.raises(ValueError, match="both"):
        aggregate([0.9], [0.5], [0.6], [0.4], [0.5], None)


# ---------------------------------------------------------------------- the full-data accuracy cache
class Recorder:
    """Stands in for protocols.train_and_test: records each call, returns fixed accuracies."""

    def __init__(self, acc: float = 0.5) -> None:
        self.calls: list[dict] = []
        self.acc = acc

    def __call__(self, images, labels, dataset, zca, cfg, runs, seed, device, engine, progress, *a, **k):
        self.calls.append(dict(images=images, labels=labels, cfg=dict(cfg), runs=runs, seed=seed))
        return [self.acc + 0.01 * r for r in range(runs)], "sequential"


def _fail(*a, **k):
    raise AssertionError("the full-data students were trained again instead of read from the cache")


def test_full_data_accuracy_is_cached_and_keyed(digits, tmp_cache, monkeypatch):
    rec = Recorder(0.9)
    monkeypatch.setattr(protocols, "train_and_test", rec)
    cfg = protocols.protocol_config("fast", epochs=2)
    first = full_data_accuracy(digits, "fast", cfg, runs=2, seed=0, device=torch.device("cpu"))
    assert not first["cached"] and first["accuracies"] == [0.9, 0.91] and len(rec.calls) == 1
    assert rec.calls[0]["images"] is digits.train.images and rec.calls[0]["labels"] is digits.train.labels
    saved = json.loads(open(first["cache"]).read())
    assert saved["key"]["seeds"] == [0, 1] and saved["key"]["model"] == "convnet" and saved["accuracies"] == [0.9, 0.91]
    assert str(tmp_cache) in first["cache"]

    monkeypatch.setattr(protocols, "train_and_test", _fail)  # a second call must not train
    again = full_data_accuracy(digits, "fast", cfg, runs=2, seed=0, device=torch.device("cpu"))
    assert again["cached"] and again["accuracies"] == [0.9, 0.91] and again["cache"] == first["cache"]

    monkeypatch.setattr(protocols, "train_and_test", rec)  # anything in the key changed: trained again
    variants = [("fast", protocols.protocol_config("fast", epochs=2, model="mlp"), 2, 0),
                ("fast", protocols.protocol_config("fast", epochs=3), 2, 0),
                ("fast", protocols.protocol_config("fast", epochs=2, lr=0.02), 2, 0),
                ("classic", protocols.protocol_config("classic", epochs=2), 2, 0),
                ("fast", cfg, 3, 0), ("fast", cfg, 2, 1)]
    paths = {first["cache"]}
    for i, (proto, c, runs, seed) in enumerate(variants):
        r = full_data_accuracy(digits, proto, c, runs=runs, seed=seed, device=torch.device("cpu"))
        assert not r["cached"] and len(rec.calls) == 2 + i, (proto, c, runs, seed)
        paths.add(r["cache"])
    assert len(paths) == 1 + len(variants)
    # other data under the same name (a changed copy of the dataset) is another key
    other = type(digits)(digits.info, digits.train.subset(torch.arange(100)), digits.test)
    assert not full_data_accuracy(other, "fast", cfg, runs=2, seed=0, device=torch.device("cpu"))["cached"]


def test_a_damaged_cache_entry_is_trained_again(digits, tmp_cache, monkeypatch):
    rec = Recorder(0.8)
    monkeypatch.setattr(protocols, "train_and_test", rec)
    cfg = protocols.protocol_config("fast", epochs=1)
    path = full_data_accuracy(digits, "fast", cfg, runs=1, seed=0, device=torch.device("cpu"))["cache"]
    open(path, "w").write("{ not json")
    with pytest.warns(UserWarning, match="unreadable cached full-data accuracy"):
        r = full_data_accuracy(digits, "fast", cfg, runs=1, seed=0, device=torch.device("cpu"))
    assert not r["cached"] and len(rec.calls) == 2
    d = json.loads(open(path).read())
    d["accuracies"] = [80.0]  # a percentage where a fraction belongs
    open(path, "w").write(json.dumps(d))
    with pytest.warns(UserWarning, match="does not match"):
        assert not full_data_accuracy(digits, "fast", cfg, runs=1, seed=0, device=torch.device("cpu"))["cached"]


# ---------------------------------------------------------------------- which students train on what
def _subset_set(digits, ipc: int, seed: int = 5, **kw) -> DistilledSet:
    idx = random_baseline_indices(digits, ipc, seed)
    return DistilledSet(digits.info, digits.train.images[idx], digits.train.labels[idx], method="random", **kw)


def _teacher(info) -> torch.nn.Module:
    return seeded_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        info.channels * info.height * info.width, info.num_classes)), 0).eval()


def test_hard_label_set_students(digits, tmp_path, tmp_cache, monkeypatch):
    path = _subset_set(digits, 2).save(tmp_path / "s")
    rec = Recorder(0.5)
    monkeypatch.setattr(protocols, "train_and_test", rec)
    res = ddranking_scores(path, "fast", runs=2, seed=3, dataset=digits, device="cpu", progress=False, epochs=2)
    cfgs = [c["cfg"] for c in rec.calls]
    # set (its labels = hard: syn_hard reuses those students), set without augmentation, full data, then
    # per round: random real, random real without augmentation
    assert [c["augment"] for c in cfgs] == ["dsa", "none", "dsa", "dsa", "none", "dsa", "none"]
    assert rec.calls[2]["images"] is digits.train.images
    for r in range(2):
        call = rec.calls[3 + 2 * r]
        idx = random_baseline_indices(digits, 2, 3 + r)  # a fresh subset per round, seeded by the round
        assert torch.equal(call["images"], digits.train.images[idx]) and torch.equal(call["labels"],
                                                                                    digits.train.labels[idx])
        assert call["seed"] == 3 + r and call["runs"] == 1
    acc = res["accuracies"]
    assert acc["syn_hard"]["rounds"] == acc["syn_labels"]["rounds"] == [0.5, 0.51]
    assert acc["random_labels"]["rounds"] == [0.5, 0.5]
    assert res["scores"]["ior"]["rounds"] == pytest.approx([0.0, 0.01])
    assert res["scores"]["hlr"]["rounds"] == pytest.approx([0.0, 0.0])
    assert res["labels"] == "hard" and res["ipc"] == 2 and res["seeds"] == [3, 4]
    assert res["set"]["accuracies"] == [0.5, 0.51] and res["set"]["epochs"] == 2


def test_soft_label_set_random_real_gets_teacher_logits(digits, tmp_path, tmp_cache, monkeypatch):
    base = _subset_set(digits, 1)
    logits = torch.randn(len(base), 10, generator=torch.Generator().manual_seed(0))
    path = _subset_set(digits, 1, soft_labels=logits, meta={"syn_lr": 0.003}).save(tmp_path / "soft")
    teacher = _teacher(digits.info)
    rec = Recorder(0.4)
    monkeypatch.setattr(protocols, "train_and_test", rec)
    with pytest.raises(ValueError, match="--teacher"):
        ddranking_scores(path, "fast", runs=1, dataset=digits, device="cpu", epochs=1)
    res = ddranking_scores(path, "fast", runs=1, seed=0, dataset=digits, device="cpu", progress=False, epochs=1,
                           teacher=teacher)
    syn_soft, syn_hard, syn_noaug, full, rdm, rdm_noaug = rec.calls
    stored = logits.half().float()  # soft labels are stored as float16
    assert torch.equal(syn_soft["labels"].float(), stored) and syn_soft["cfg"]["lr"] == 0.003  # the set's recipe
    assert syn_hard["labels"].dtype == torch.long and syn_hard["cfg"]["lr"] == 0.003
    assert full["cfg"]["lr"] == 0.01 and rdm["cfg"]["lr"] == 0.01  # the protocol's recipe
    idx = random_baseline_indices(digits, 1, 0)
    with torch.no_grad():
        want = teacher(normalize(digits.train.images[idx], digits.info))
    assert torch.allclose(rdm["labels"], want) and torch.allclose(rdm_noaug["labels"], want)
    assert res["labels"].startswith("soft")
    with pytest.raises(ValueError, match="hard labels only"):
        ddranking_scores(_subset_set(digits, 1).save(tmp_path / "h"), "fast", dataset=digits, device="cpu",
                         teacher=teacher)


def test_scores_refuse_what_they_cannot_score(digits, tmp_path):
    path = _subset_set(digits, 1).save(tmp_path / "s")
    with pytest.raises(ValueError, match="soft protocol"):
        ddranking_scores(path, "soft", dataset=digits, device="cpu")
    uneven = DistilledSet(digits.info, digits.train.images[:30], digits.train.labels[:30]).save(tmp_path / "u")
    with pytest.raises(ValueError, match="same number of images in every class"):
        ddranking_scores(uneven, "fast", dataset=digits, device="cpu")


# ---------------------------------------------------------------------- command line, end to end
@pytest.mark.slow
def test_cli_scores_end_to_end(tmp_path, tmp_cache, capsys, monkeypatch):
    run = tmp_path / "r"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(run), "--no-progress"]) == 0
    argv = ["evaluate", str(run), "--protocol", "fast", "--epochs", "1", "--runs", "2", "--scores", "ddranking",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("acc(real, hard)", "HLR", "IOR", "LRS", "ARS", "percent-fed", "trained, cached in"):
        assert name in out
    saved = json.loads((run / "eval-fast-convnet-e1-ddranking.json").read_text())
    dd = saved["ddranking"]
    real = dd["accuracies"]["real_hard"]["rounds"]
    syn = dd["accuracies"]["syn_hard"]["rounds"]
    assert dd["scores"]["hlr"]["rounds"] == pytest.approx([a - b for a, b in zip(real, syn, strict=True)])
    assert dd["scores"]["lrs"]["mean"] == pytest.approx(sum(lrs(h, i) for h, i in zip(
        dd["scores"]["hlr"]["rounds"], dd["scores"]["ior"]["rounds"], strict=True)) / 2)
    assert saved["accuracies"] == dd["accuracies"]["syn_labels"]["rounds"] and saved["protocol"] == "fast"
    assert all(0.0 <= a <= 1.0 for a in real) and len(real) == 2

    # scored again (--force): the full-data students come from the cache, the others train again
    real_train = protocols.train_and_test

    def no_full_data(images, *a, **k):
        assert len(images) < 100, "the full-data students were trained again"
        return real_train(images, *a, **k)

    monkeypatch.setattr(protocols, "train_and_test", no_full_data)
    assert main(argv + ["--force"]) == 0
    assert "read from cache" in capsys.readouterr().out
    assert main(argv) == 0  # no --force: the stored result is reused
    assert "already scored" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "soft"], "soft protocol"),
    (["--baseline", "random"], "drop --baseline"),
    (["--resume"], "drop --resume"),
    (["--amp", "--device", "cpu"], "CUDA only"),
])
def test_cli_scores_bad_input_is_one_line(tmp_path, capsys, digits, extra, message):
    path = _subset_set(digits, 1).save(tmp_path / "s")
    assert main(["evaluate", str(path), "--scores", "ddranking", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decoct evaluate: error:") and message in err[0]


# ---------------------------------------------------------------------- the DD-Ranking export
def test_export_is_class_major_and_normalised(digits, tmp_path):
    # a set built out of class order (7, 3, 0, ...): the export must be class-major
    idx = random_baseline_indices(digits, 3, 1)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    images, labels = digits.train.images[idx][perm], digits.train.labels[idx][perm]
    logits = torch.randn(len(idx), 10, generator=torch.Generator().manual_seed(1)).half().float()  # as stored
    dset = DistilledSet(digits.info, images, labels, soft_labels=logits, meta={"syn_lr": 0.0123})
    assert not dset.is_canonical
    out = export_ddranking(dset, tmp_path / "dd")
    t = load_file(str(out / "ddranking.safetensors"))
    desc = json.loads((out / "ddranking.json").read_text())
    assert t["hard_labels"].tolist() == torch.arange(10).repeat_interleave(3).tolist()
    order = torch.sort(labels, stable=True).indices
    mean, std = digits.info.mean[0], digits.info.std[0]
    manual = (images[order].double() / 255.0 - mean) / std  # one channel: x = (pixel / 255 - mean) / std
    assert t["images"].dtype == torch.float32 and t["images"].shape == (30, 1, 8, 8)
    assert torch.allclose(t["images"].double(), manual, atol=1e-6)
    assert torch.allclose(t["soft_labels"], logits[order].float())
    assert desc["ipc"] == 3 and desc["num_classes"] == 10 and desc["im_size"] == [8, 8]
    assert desc["learned_lr"] == pytest.approx(0.0123) and "syn_lr=0.0123" in desc["usage"][-1]
    assert desc["tensors"]["images"] == {"shape": [30, 1, 8, 8], "dtype": "float32"}
    assert set(t) == {"images", "hard_labels", "soft_labels"}
    # a loaded set is exported the same way as the set in memory it came from
    loaded = DistilledSet.load(dset.save(tmp_path / "a"))
    t2 = load_file(str(export_ddranking(loaded, tmp_path / "dd2") / "ddranking.safetensors"))
    assert torch.equal(t2["images"], t["images"]) and torch.equal(t2["soft_labels"], t["soft_labels"])


def test_export_rgb_uses_each_channels_statistics(tmp_path):
    from decoct.data import DatasetInfo

    info = DatasetInfo("cifar10", tuple(str(i) for i in range(2)), 3, 4, 4, (0.4914, 0.4822, 0.4465),
                       (0.2023, 0.1994, 0.2010))
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = load_file(str(export_ddranking(DistilledSet(info, images, torch.tensor([1, 0, 1, 0])), tmp_path / "o")
                      / "ddranking.safetensors"))
    for c in range(3):
        want = (images[[1, 3, 0, 2], c].double() / 255 - info.mean[c]) / info.std[c]
        assert torch.allclose(t["images"][:, c].double(), want, atol=1e-6)
    desc = json.loads((tmp_path / "o" / "ddranking.json").read_text())
    assert desc["notes"] == []  # decoct's CIFAR-10 statistics are DD-Ranking's


def test_export_refusals(digits, tmp_path):
    uneven = DistilledSet(digits.info, digits.train.images[:30], digits.train.labels[:30])
    with pytest.raises(DDRankingExportError, match="same number in every class"):
        export_ddranking(uneven, tmp_path / "u")
    dset = _subset_set(digits, 1)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(DDRankingExportError, match="not a decoct DD-Ranking export"):
        export_ddranking(dset, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"
    export_ddranking(dset, tmp_path / "dd")
    with pytest.raises(DDRankingExportError, match="--force"):
        export_ddranking(dset, tmp_path / "dd")
    export_ddranking(dset, tmp_path / "dd", overwrite=True)
    (tmp_path / "dd" / "extra.bin").write_bytes(b"x")
    with pytest.raises(DDRankingExportError, match="extra.bin"):
        export_ddranking(dset, tmp_path / "dd", overwrite=True)


def test_cli_export_ddranking(digits, tmp_path, capsys):
    path = _subset_set(digits, 2).save(tmp_path / "s")
    assert main(["export", str(path), "--ddranking", str(tmp_path / "dd")]) == 0
    assert "class-major" in capsys.readouterr().out
    assert load_file(str(tmp_path / "dd" / "ddranking.safetensors"))["images"].shape == (20, 1, 8, 8)
    for argv, message in ((["export", str(path)], "give one output"),
                          (["export", str(path), "--ddranking", str(tmp_path / "x"), "--imagefolder",
                            str(tmp_path / "y")], "give one output"),
                          (["export", str(path), "--ddranking", str(tmp_path / "dd")], "--force")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_module_exports_are_documented():
    assert scores.squash.__doc__ and "e^a" in scores.squash.__doc__
    for name in scores.__all__:
        assert hasattr(scores, name)
