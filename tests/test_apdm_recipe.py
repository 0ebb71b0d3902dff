"""AutoPalette-DM as the paper's text describes it and as the authors' dm_quant.py runs it (issue 13,
point 2), and the median-cut baseline of palette sets at equal bytes (point 4); on digits."""

from __future__ import annotations

import json

import pytest
import torch

from decoct.cli import main
from decoct.coreset.select import random_baseline_indices
from decoct.data import normalize, to_uint8
from decoct.evaluation import protocols
from decoct.evaluation.protocols import evaluate, mediancut_baseline
from decoct.formats.artifact import DistilledSet
from decoct.formats.png import gather_palette
from decoct.matching.dm import DistributionMatching, DMConfig, distill_dm
from decoct.matching.experts import train_experts
from decoct.matching.palette.quantize import quantize
from decoct.models.flat_params import FlatParams

pytestmark = pytest.mark.usefixtures("one_thread")

PAL = {"palette_init": "real", "palette_aux_images": 4}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    return train_experts(digits, tmp_path_factory.mktemp("experts"), num_experts=1, epochs=1, batch_size=128,
                         model_kwargs=dict(width=16, norm="instance"), device="cpu", progress=False)


def _cfg(**kw) -> DMConfig:
    cfg = dict(ipc=1, iterations=2, batch_real=16, width=16, palette=64, palette_flags=PAL, seed=0)
    cfg.update(kw)
    return DMConfig(**cfg)


def _authors(experts, **kw) -> DMConfig:
    return _cfg(palette_recipe="authors-code", experts=str(experts.path), **kw)


def _expected_logits(experts, digits, idx) -> torch.Tensor:
    """Expert 0's final-epoch logits on the real images at ``idx``, computed here independently."""
    net = FlatParams(experts.build_model())
    final = experts.params(0, [experts.epochs])[0]
    with torch.no_grad():
        return net(final, normalize(digits.train.images[idx], digits.info))


def test_manifest_records_the_recipe(digits, experts, tmp_path) -> None:
    """Both recipes write what they are into the manifest; the default is the paper's text."""
    assert DMConfig().palette_recipe == "paper"
    distill_dm(digits, tmp_path / "p", config=_cfg(), device="cpu", progress=False)
    distill_dm(digits, tmp_path / "a", config=_authors(experts), device="cpu", progress=False)
    mp = json.loads((tmp_path / "p" / "artifact" / "manifest.json").read_text())
    ma = json.loads((tmp_path / "a" / "artifact" / "manifest.json").read_text())
    assert mp["meta"]["autopalette_dm"]["recipe"] == "paper" and mp["meta"]["labels"] == "hard"
    assert mp["image_storage"] == "png-palette" and "labels/soft.safetensors" not in mp["files"]
    rec = ma["meta"]["autopalette_dm"]
    assert rec["recipe"] == "authors-code" and rec["experts"] == str(experts.path)
    assert ma["meta"]["labels"] == "soft" and "independent" in ma["meta"]["augmentation"]
    # the un-quantised images are what is stored, and they are counted at their full-colour bytes
    assert ma["image_storage"] == "png-gray" and ma["meta"]["palette"]["colors"] == 64
    assert ma["num_images"] == mp["num_images"] == 40  # x4 at K = 64 either way
    assert ma["storage"]["raw_bytes"]["images"] == 40 * 64  # 8 bits per pixel, not 6-bit indices
    assert ma["storage"]["bytes_on_disk"]["labels"] > 0  # the expert's logits are paid for


def test_authors_labels_are_the_experts_logits_on_the_initial_images(digits, experts) -> None:
    """authors-code: labels = expert 0's final-epoch logits on the initial images, fixed through DM."""
    m = DistributionMatching(_authors(experts))
    m.init(digits, CPU)
    expected = _expected_logits(experts, digits, torch.tensor(m.init_source))
    assert m.soft_labels.shape == (40, 10)
    assert torch.allclose(m.soft_labels, expected, atol=1e-5)
    assert m.soft_labels.std(0).min() > 0  # per-image logits, not one row repeated
    before = m.soft_labels.clone()
    torch.manual_seed(0)
    m.step(0)
    m.step(1)
    dset = m.result()
    assert torch.equal(m.soft_labels, before) and torch.equal(dset.soft_labels, before)  # no gradient, fixed
    # the paper's recipe keeps hard labels
    p = DistributionMatching(_cfg())
    p.init(digits, CPU)
    assert p.soft_labels is None and p.result().soft_labels is None


def test_authors_dsa_draws_real_and_synthetic_independently(digits, experts) -> None:
    """dm_quant.py draws DSA separately for real and synthetic; the paper (DM) shares one draw per class."""
    seen: dict[str, list[int]] = {}
    for name, cfg in (("paper", _cfg()), ("authors", _authors(experts))):
        m = DistributionMatching(cfg)
        m.init(digits, CPU)
        calls: list[int] = []

        def record(x, seed, calls=calls):
            calls.append(int(seed))
            return x

        m.dsa = record
        torch.manual_seed(0)
        m.step(0)
        assert len(calls) == 20  # 10 classes of real, then 10 of synthetic
        seen[name] = calls
    assert seen["paper"][:10] == seen["paper"][10:]
    assert all(a != b for a, b in zip(seen["authors"][:10], seen["authors"][10:], strict=True))


def test_evaluate_trains_on_what_the_recipe_stores(digits, experts, tmp_path, monkeypatch) -> None:
    """authors-code: the un-quantised images with the expert's soft labels; paper: the K-colour images, hard."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake_train_and_test(images, labels, dataset, zca, cfg, runs, *a, **k):
        got["set"] = (images.clone(), labels.clone())
        return [0.5] * runs, "sequential"

    monkeypatch.setattr(protocols, "train_and_test", fake_train_and_test)
    for name, cfg in (("authors", _authors(experts)), ("paper", _cfg())):
        m = DistributionMatching(cfg)
        m.init(digits, CPU)
        torch.manual_seed(0)
        m.step(0)
        m.result().save(tmp_path / name)
        r = evaluate(tmp_path / name, "fast", runs=1, dataset=digits, device="cpu", progress=False)
        images, targets = got["set"]
        quantised = gather_palette(*m.param.stored())
        if name == "authors":
            assert torch.equal(images, to_uint8(m.param.images.detach(), digits.info))  # un-quantised pixels
            assert not torch.equal(images, quantised)
            assert targets.is_floating_point()
            assert torch.allclose(targets, m.soft_labels, atol=2e-2, rtol=1e-3)  # float16 in the artifact
            assert r.extra["autopalette_dm"] == "authors-code" and r.extra["labels"] == "soft"
            assert r.extra["images"] == "un-quantised full colour"
        else:
            assert torch.equal(images, quantised) and torch.equal(targets, m.param.labels)
            assert r.extra["autopalette_dm"] == "paper" and r.extra["images"] == "palette (quantised)"
    # a record that contradicts the files is refused, not silently evaluated
    bad = DistilledSet.load(tmp_path / "paper")
    bad.meta["autopalette_dm"]["recipe"] = "authors-code"
    bad.save(tmp_path / "bad")
    with pytest.raises(ValueError, match="records the AutoPalette-DM recipe 'authors-code'"):
        evaluate(tmp_path / "bad", "fast", runs=1, dataset=digits, device="cpu", progress=False)


@pytest.mark.parametrize("extra, needle", [
    (["--palette", "64", "--palette-recipe", "authors-code"], "needs --experts DIR"),
    (["--palette-recipe", "authors-code", "--experts", "EXP"], "needs --palette K"),
    (["--palette", "64", "--experts", "EXP"], "--experts is used only by --palette-recipe authors-code"),
    (["--palette", "64", "--palette-init", "real", "--palette-recipe", "authors-code", "--experts", "EXP", "--zca"],
     "ZCA"),
])
def test_bad_recipe_combinations_exit_2_with_one_line(experts, tmp_path, capsys, extra, needle) -> None:
    args = ["distill", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1", "--width", "16",
            "--out", str(tmp_path / "r"), "--no-progress",
            *[str(experts.path) if a == "EXP" else a for a in extra]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_mediancut_baseline_is_random_real_quantised_to_k(digits, experts, tmp_path) -> None:
    """Same image count per class, the set's K, median cut, hard labels; equal raw bytes to a paper set."""
    dset = distill_dm(digits, tmp_path / "p", config=_cfg(), device="cpu", progress=False)
    base = mediancut_baseline(dset, digits, seed=3)
    idx = random_baseline_indices(digits, 4, 3)
    ind, pal = quantize(digits.train.images[idx], 64, "mediancut")
    assert base.ipc == [4] * 10 and base.palettes.shape[1] == 64
    assert torch.equal(base.images, gather_palette(ind, pal)) and torch.equal(base.labels, digits.train.labels[idx])
    assert base.soft_labels is None
    # the authors-code set stores full-colour images but records K: its baseline is the same
    auth = distill_dm(digits, tmp_path / "a", config=_authors(experts), device="cpu", progress=False)
    assert torch.equal(mediancut_baseline(auth, digits, seed=3).images, base.images)
    # a set without a palette has no K to match
    plain = DistilledSet(digits.info, digits.train.images[idx], digits.train.labels[idx])
    with pytest.raises(ValueError, match="use --baseline random"):
        mediancut_baseline(plain, digits, seed=0)


@pytest.mark.slow
def test_cli_evaluate_mediancut_baseline_and_report(digits, tmp_path, capsys) -> None:
    """decoct evaluate RUN --baseline mediancut: stored beside the set's result, shown by decoct report."""
    run = tmp_path / "p"
    distill_dm(digits, run, config=_cfg(), device="cpu", progress=False)
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "2", "--runs", "1", "--baseline",
                 "mediancut", "--no-progress"]) == 0
    assert "mediancut64 ipc4" in capsys.readouterr().out
    ev = json.loads((run / "eval-fast-convnet-e2-mediancut.json").read_text())
    b = ev["baseline"]
    assert b["extra"]["kind"] == "mediancut" and b["extra"]["colors"] == 64 and b["num_images"] == 40
    assert b["raw_bytes"] == ev["raw_bytes"]  # same count, same K: the same index and palette bits
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "random real x4/class median-cut to 64 colours" in md and f"{b['bytes_on_disk']:,}" in md
    assert "AutoPalette, paper" in md
    # refused where it has no meaning: a set without a palette; the soft protocol
    sel = tmp_path / "sel"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(sel), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(sel), "--protocol", "fast", "--epochs", "1", "--runs", "1", "--baseline",
                 "mediancut", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "use --baseline random" in err and "\n" not in err
    assert main(["evaluate", str(run), "--protocol", "soft", "--baseline", "mediancut", "--no-progress"]) == 2
    assert "classic/fast" in capsys.readouterr().err


@pytest.mark.slow
def test_baseline_evaluation_reads_back_the_sets_finished_students(digits, tmp_path) -> None:
    """--baseline after a plain evaluation with the same protocol and seeds trains only the baseline."""
    run = tmp_path / "p"
    distill_dm(digits, run, config=_cfg(), device="cpu", progress=False)
    args = ["evaluate", str(run), "--protocol", "fast", "--epochs", "1", "--runs", "1", "--no-progress"]
    assert main(args) == 0
    plain = run / "eval-fast-convnet-e1.json"
    d = json.loads(plain.read_text())
    d["accuracies"] = [0.123]  # a marker no student would produce: it must come back unchanged
    plain.write_text(json.dumps(d))
    assert main([*args, "--baseline", "mediancut"]) == 0
    ev = json.loads((run / "eval-fast-convnet-e1-mediancut.json").read_text())
    assert ev["accuracies"] == [0.123] and ev["extra"]["set_accuracies_from"] == plain.name
    assert len(ev["baseline"]["accuracies"]) == 1 and ev["baseline"]["accuracies"][0] != 0.123
    # another seed is another evaluation: the set's students are trained
    assert main([*args, "--seed", "1", "--baseline", "mediancut", "--force"]) == 0
    ev = json.loads((run / "eval-fast-convnet-e1-mediancut.json").read_text())
    assert ev["accuracies"] != [0.123] and "set_accuracies_from" not in ev["extra"]
