"""decoct plan (issue 14): byte budgets, the enumerated configurations, the byte estimates against real
artifacts, runs matched by their manifests, and a digits sweep that fits its budget and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decoct.cli import main
from decoct.plan import (
    Estimate,
    PlanConfig,
    PlanRow,
    calibrate,
    config_of_run,
    enumerate_configs,
    fp16_store_bytes,
    make_plan,
    parse_budget,
    plan_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("text,want", [
    ("200KB", 200_000), ("200kb", 200_000), ("200 kB", 200_000), ("1.5MB", 1_500_000), ("50000", 50_000),
    ("50000B", 50_000), ("64KiB", 65_536), ("1.5MiB", 1_572_864), ("2GB", 2_000_000_000), ("1GiB", 2**30),
    ("0.5KB", 500), (".5KB", 500), (123, 123),
])
def test_budget_parsing_decimal_and_binary_units(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("text", ["", "KB", "abc", "-5KB", "1.5", "0", "0KB", "10XB", "1.0005KB", "nan",
                                  "1e3", "1,000", "5 K B", True])
def test_bad_budgets_are_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--budget"):
        parse_budget(text)


def test_bad_budget_exits_2_with_one_line(capsys):
    assert main(["plan", "--dataset", "digits", "--family", "coreset", "--budget", "12XB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decoct plan: error: --budget must be a size")


# ------------------------------------------------------------------------------------------ configs
def test_enumerated_counts_follow_autopalettes_rule():
    cfgs = enumerate_configs("matching", ["dm", "autopalette-dm", "dm+mediancut"], [1, 2], [0, 16, 64], ["hard"],
                             [1], ["fp16"], None, max_per_class=100)
    got = {(c.method, c.colors, c.base_ipc): c.ipc for c in cfgs}
    assert got == {("dm", 0, 1): 1, ("dm", 0, 2): 2,
                   ("autopalette-dm", 16, 1): 16, ("autopalette-dm", 16, 2): 32,
                   ("autopalette-dm", 64, 1): 4, ("autopalette-dm", 64, 2): 8,
                   ("dm+mediancut", 16, 1): 16, ("dm+mediancut", 16, 2): 32,
                   ("dm+mediancut", 64, 1): 4, ("dm+mediancut", 64, 2): 8}
    # a count above the smallest class is left out
    assert {c.ipc for c in enumerate_configs("coreset", ["random"], [1, 2], [16], ["hard"], [1], ["fp16"], None,
                                             max_per_class=20)} == {16}
    soft = enumerate_configs("decoupled", ["lpld"], [1], [0, 16], ["soft"], [1, 10], ["fp16"], 5)
    assert sorted((c.colors, c.prune, c.label_epochs) for c in soft) == [(0, 1, 5), (0, 10, 5)]


@pytest.mark.parametrize("args,match", [
    (("coreset", ["dm"], ["hard"], [1], ["fp16"], None), "not a coreset method"),
    (("nope", ["dm"], ["hard"], [1], ["fp16"], None), "--family"),
    (("decoupled", ["lpld"], ["soft"], [1], ["fp16"], None), "--label-epochs"),
    (("decoupled", ["lpld"], ["soft"], [7], ["fp16"], 3), "--prune"),
    (("decoupled", ["lpld"], ["soft"], [1], ["int3"], 3), "--label-formats"),
    (("decoupled", ["lpld"], ["soft"], [1], ["top0-zero-fp16"], 3), "--label-formats"),
    (("decoupled", ["lpld"], ["soft"], [1], ["top5-soft-q8"], 3), "--label-formats"),
])
def test_bad_grids_are_refused(args, match):
    family, methods, labels, prunes, fmts, epochs = args
    with pytest.raises(ValueError, match=match):
        enumerate_configs(family, methods, [1], [0], labels, prunes, fmts, epochs)


def test_label_store_bytes_equal_a_real_store(digits, tmp_path):
    """The estimate serialises the store relabel writes: equal to the artifact's label bytes, exactly."""
    from safetensors.torch import load_file

    from decoct.decoupled.relabel import relabel
    from decoct.formats.artifact import DistilledSet
    from decoct.models import model_for
    from decoct.train.soft_students import soft_recipe_for

    g = torch.Generator().manual_seed(0)
    idx = torch.cat([digits.train.class_indices(c)[torch.randperm(20, generator=g)[:3]] for c in range(10)])
    teacher = model_for("mlp", digits.info, width=8).eval()
    view = soft_recipe_for(digits.info).view
    for prune, epochs in ((None, 3), (10, 20)):
        path = tmp_path / f"set-{prune}"
        DistilledSet(info=digits.info, images=digits.train.images[idx], labels=digits.train.labels[idx],
                     method="random").save(path)
        relabel(path, teacher, epochs=epochs, batch_size=8, seed=0, device="cpu", prune=prune)
        m = json.loads((path / "manifest.json").read_text())
        header = json.loads(bytes(load_file(str(path / "labels" / "fkd.safetensors"))["header"].tolist()))
        est = fp16_store_bytes(30, 10, digits.info.image_shape, epochs, 8, prune or 1, view, teacher=header["teacher"])
        assert est == m["storage"]["bytes_on_disk"]["labels"]
        cfg, _ = config_of_run(path, "coreset")
        assert (cfg.labels, cfg.prune, cfg.label_epochs, cfg.label_format) == ("soft", prune or 1, epochs, "fp16")


# ------------------------------------------------------------------------------------------ digits sweep
def _plan_argv(out: Path, budget: str) -> list[str]:
    return ["plan", "--dataset", "digits", "--family", "coreset", "--budget", budget, "--ipc", "1", "2", "4", "8",
            "--colors", "0", "64", "--sample", "8", "--out", str(out), "--sweep", "--eval-runs", "1",
            "--eval-epochs", "2", "--device", "cpu"]


@pytest.mark.slow
def test_plan_sweep_on_digits_fits_the_budget_and_resumes(tmp_path, capsys):
    """Every listed configuration, once built, fits the budget by the artifact's own accounting; a
    second call runs nothing; measured runs are ranked with their real bytes and the estimate's error."""
    out = tmp_path / "plan"
    budget = 14000  # digits PNGs: ~123 B per 8-bit image, ~310 B at K = 64 (its palette)
    assert main(_plan_argv(out, str(budget))) == 0
    text = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    rows = plan["rows"]
    assert rows and all(r["run"] is not None and r["accuracy"] is not None for r in rows), text
    for r in rows:
        m = json.loads((Path(r["run"]) / "artifact" / "manifest.json").read_text())
        assert m["storage"]["bytes_on_disk"]["total"] == r["actual_bytes"] <= budget
        assert r["estimate_error"] is not None and abs(r["estimate_error"]) < 0.25
    # per recipe the largest count that fits: 8/class in 8 bits (16 is not in the grid), 4/class at K = 64
    # (x4 of IPC 1; x4 of IPC 2 would not fit)
    assert sorted((r["config"]["method"], r["config"]["colors"], r["config"]["ipc"]) for r in rows) == [
        ("random", 0, 8), ("random", 64, 4)]
    assert "est. error" in text and "ran " in text
    assert (out / "report" / "report.md").exists() and (out / "report" / "bytes_breakdown.png").exists()
    report = (out / "report" / "report.md").read_text()
    assert "on frontier" in report and "| images | palettes | labels |" in report
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("DONE")}
    assert main(_plan_argv(out, str(budget))) == 0
    again = capsys.readouterr().out
    assert "sweep: ran 0 commands" in again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("DONE")} == stamps
    # a larger budget: the unmeasured 16/class 8-bit row is scaled by what the 8/class run stored
    bigger = make_plan("digits", "coreset", 10 * budget, ipcs=[8, 16], colors=[0], sample=8, runs=[out])
    ran = next(r for r in bigger.rows if r.run is not None and r.config.colors == 0)
    new = next(r for r in bigger.rows if r.run is None and r.config.colors == 0)
    factor = ran.actual_image_bytes / ran.estimate.images
    assert new.calibration == pytest.approx(factor) and new.config.ipc == 16
    assert new.estimate.images == pytest.approx(2 * factor * ran.estimate.images)
    # a budget one byte below that run: it no longer fits (by its own bytes), so 4/class is listed instead
    tight = make_plan("digits", "coreset", ran.actual_bytes - 1, ipcs=[4, 8], colors=[0], sample=8, runs=[out])
    over = next(r for r in tight.rows if r.run == ran.run)
    assert not over.fits and "| no (run over budget) |" in "\n".join(plan_table(tight))
    assert [r.config.ipc for r in tight.rows if r.run is None and r.config.colors == 0] == [4]


def test_unmeasured_image_estimates_are_scaled_by_the_runs_of_their_method_and_k():
    """Hand-computed: two lpld runs stored 130 + 250 B of images where real images gave 100 + 200 B, so the
    factor is 380/300; it scales the unmeasured lpld full-colour row (images and sd, not labels), which no
    longer fits, and leaves measured rows, other methods and other K alone."""
    def row(method, colors, ipc, images, sd=0.0, labels=0, actual=None):
        r = PlanRow(PlanConfig("decoupled", method, ipc, ipc, colors), Estimate(images, sd, labels), True)
        if actual is not None:
            r.run, r.actual_image_bytes, r.actual_bytes = f"runs/{method}-{ipc}", actual, actual + labels
        return r

    ran = [row("lpld", 0, 1, 100.0, actual=130), row("lpld", 0, 2, 200.0, actual=250)]
    new = row("lpld", 0, 3, 300.0, sd=10.0, labels=50)
    other_k, other_method = row("lpld", 64, 4, 300.0), row("sre2l", 0, 3, 300.0)
    notes = calibrate([*ran, new, other_k, other_method], budget=450)
    f = 380 / 300
    assert new.calibration == pytest.approx(f)
    assert (new.estimate.images, new.estimate.images_sd, new.estimate.labels) == (
        pytest.approx(300 * f), pytest.approx(10 * f), 50)
    assert not new.fits  # 380 + 50 + 2 x 12.67 = 455.3 > 450; before scaling 300 + 50 + 20 = 370 fitted
    assert [r.estimate.images for r in ran] == [100.0, 200.0] and all(r.calibration is None for r in ran)
    assert other_k.calibration is None and other_method.calibration is None and other_k.estimate.images == 300.0
    assert notes == ["lpld at full colour: image estimates of unmeasured configurations scaled x1.267, the "
                     "image bytes its 2 run(s) store over their real-image estimate"]


def test_plan_lists_without_sweeping_and_marks_unmeasured(tmp_path, capsys):
    assert main(["plan", "--dataset", "digits", "--family", "matching", "--budget", "30KB", "--ipc", "1", "2",
                 "--colors", "0", "16", "--sample", "4"]) == 0
    text = capsys.readouterr().out
    assert "unmeasured" in text and "| autopalette-dm, 16/class, K=16 (x16 of IPC 1), hard labels |" in text
    assert "| dm+mediancut, 16/class, K=16 (x16 of IPC 1), hard labels |" in text
    assert "| dm, 2/class, full colour, hard labels |" in text and "32/class" not in text  # 32 x 10 x 166 B > 30 KB


def test_palettes_larger_than_an_image_are_left_out_with_a_note():
    """8x8 digits have 64 pixels: K = 256 stores the K = 64 image with a bigger palette, so it is not listed."""
    from decoct.plan import make_plan, plan_table

    plan = make_plan("digits", "matching", 20_000, ipcs=[1, 2, 4], colors=[0, 256, 64], sample=4)
    assert plan.rows and {r.config.colors for r in plan.rows} <= {0, 64}
    assert any(r.config.colors == 64 for r in plan.rows)
    assert "note: left out K=256: more colours than the 64 pixels of one 8x8 image" in plan_table(plan)


def test_config_of_run_reads_what_the_commands_write(tmp_path):
    run = tmp_path / "sel"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["quantize", str(run), "--colors", "4", "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    cfg, _ = config_of_run(run, "coreset")
    assert cfg == PlanConfig("coreset", "random", 2, 2)
    cfg, _ = config_of_run(tmp_path / "q", "coreset")
    assert (cfg.method, cfg.ipc, cfg.colors, cfg.labels) == ("random", 2, 4, "hard")
    assert config_of_run(run, "matching") is None  # another family's run is not matched


@pytest.mark.parametrize("name,topk,fill,bits", [("q8", None, None, 8), ("top3-zero-q4", 3, "zero", 4),
                                                 ("top2-spread-fp16", 2, "spread", None)])
def test_encoded_label_formats_are_sized_and_recognised(digits, tmp_path, name, topk, fill, bits):
    """Compressed stores (relabel --label-topk/--label-fill/--label-bits) are in the planner's search space:
    sized by the store's byte model within a few bytes of the real store, and read back from its header."""
    relabel_mod = pytest.importorskip("decoct.decoupled.relabel")
    if not hasattr(relabel_mod, "label_encoding"):
        pytest.skip("this decoct has no label encodings")
    from decoct.formats.artifact import DistilledSet
    from decoct.models import model_for
    from decoct.plan import label_format
    from decoct.train.soft_students import soft_recipe_for

    g = torch.Generator().manual_seed(0)
    idx = torch.cat([digits.train.class_indices(c)[torch.randperm(20, generator=g)[:3]] for c in range(10)])
    path = tmp_path / "set"
    DistilledSet(info=digits.info, images=digits.train.images[idx], labels=digits.train.labels[idx],
                 method="random").save(path)
    enc = relabel_mod.label_encoding(digits.info, topk, fill, bits)
    relabel_mod.relabel(path, model_for("mlp", digits.info, width=8).eval(), epochs=4, batch_size=8, seed=0,
                        device="cpu", prune=None, encoding=enc)
    real = json.loads((path / "manifest.json").read_text())["storage"]["bytes_on_disk"]["labels"]
    fmt = label_format(name)
    est = fmt.store_bytes(30, 10, digits.info.image_shape, 4, 8, 1, soft_recipe_for(digits.info).view)
    assert abs(est - real) <= 100, (est, real)  # exact but for the teacher described in the JSON header
    assert "--label-bits" in fmt.relabel_flags or bits is None
    cfg, _ = config_of_run(path, "coreset")
    assert (cfg.labels, cfg.label_format, cfg.label_epochs) == ("soft", name, 4)


def test_sweep_steps_are_valid_decoct_commands(tmp_path):
    """Every step the sweep would run, for every family and label format, parses as the normal command
    (flags and values checked as typed), builds its sources first and ends in the configuration's run."""
    from decoct.cli import build_parser
    from decoct.cli.common import _resolve
    from decoct.plan import SweepOptions, build_steps, eval_step

    o = SweepOptions(out=tmp_path / "o", dataset="digits", iterations=5, eval_runs=1, eval_epochs=2,
                     baseline="random", teacher=str(tmp_path / "t"), label_batch=8, device="cpu", eval_model="mlp",
                     palette_warmup=7)
    cfgs = enumerate_configs("coreset", ["random", "herding"], [1], [0, 16], ["hard", "soft"], [1, 10],
                             ["fp16", "top2-spread-q4"], 3)
    cfgs += enumerate_configs("matching", ["dm", "dm+mediancut", "autopalette-dm"], [1, 2], [0, 64], ["hard"], [1],
                              ["fp16"], None)
    cfgs += enumerate_configs("decoupled", ["lpld", "rded"], [2], [0], ["soft"], [1, 20], ["q8"], 4)
    seen = set()
    parser = build_parser()
    for cfg in cfgs:
        steps = build_steps(cfg, o)
        assert steps[-1][0] == o.out / cfg.slug() and cfg.slug() not in seen
        seen.add(cfg.slug())
        for path, argv in [*steps, (None, eval_step(cfg, o))]:
            args = _resolve(parser, argv)
            if path is not None:
                assert Path(args.out) == path
            else:
                assert args.model == "mlp"
        cmds = [a[0] if a[0] != "distill" else f"distill {a[1]}" for _, a in steps]
        if cfg.labels == "soft":
            assert cmds[-1] == "relabel" and ("--prune" in steps[-1][1]) == (cfg.prune > 1)
        if cfg.method == "autopalette-dm":
            argv = steps[0][1]
            assert argv[argv.index("--ipc") + 1] == str(cfg.base_ipc) and argv[argv.index("--palette") + 1] == "64"
            assert argv[argv.index("--palette-warmup") + 1] == "7"  # without it DM's palette collapses
        else:
            assert all("--palette-warmup" not in a for _, a in steps)
        if cfg.colors and cfg.method != "autopalette-dm":
            assert cmds[-1 if cfg.labels == "hard" else -2] == "quantize"
    with pytest.raises(ValueError, match="--teacher"):
        build_steps(cfgs[-1], SweepOptions(out=tmp_path / "o", dataset="digits"))


def test_a_store_that_cannot_exist_is_left_out_with_a_note():
    """A pruning factor that keeps no batch of a short store is noted and left out, not the whole plan's error."""
    from decoct.plan import make_plan, plan_table

    plan = make_plan("digits", "decoupled", 60_000, ipcs=[2], colors=[0], prunes=[1, 10], label_epochs=2, sample=4)
    assert [(r.config.prune, r.config.labels) for r in plan.rows] == [(1, "soft")]
    assert any("left out lpld, 2/class" in n and "pruning 10x" in n for n in plan.notes)
    assert any(line.startswith("note: left out") for line in plan_table(plan))


def test_plan_takes_its_keys_from_a_config_file_and_set(tmp_path, capsys):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("dataset: digits\nfamily: coreset\nbudget: 3000\nipc: [1, 2]\npalette: [0]\nsample: 4\n")
    assert main(["plan", "--config", str(cfg)]) == 0
    assert "budget 3,000 B" in capsys.readouterr().out
    assert main(["plan", "--config", str(cfg), "--set", "budget=2KiB", "--palette", "0"]) == 0
    out = capsys.readouterr().out
    assert "budget 2,048 B" in out and "random, 1/class, full colour" in out and "2/class" not in out
    assert main(["plan", "--config", str(cfg), "--set", "sample=1"]) == 2
    assert "sample" in capsys.readouterr().err


def test_eval_result_takes_the_named_student_only(tmp_path):
    """With a model named (plan --eval-model), only that student's evaluations count; without, the one with
    the most students; unfinished and online-teacher files never."""
    from decoct.plan import eval_result

    def write(name, mean, n, partial=False):
        (tmp_path / name).write_text(json.dumps(dict(mean=mean, std=0.0, accuracies=[mean] * n, partial=partial)))

    write("eval-soft-resnet18-eauto.json", 0.30, 3)
    write("eval-soft-convnet_bn-eauto.json", 0.40, 2)
    write("eval-soft-convnet_bn-e50.json", 0.45, 5, partial=True)
    write("eval-soft-online-convnet_bn-eauto.json", 0.50, 9)
    assert eval_result(tmp_path, "soft")["mean"] == 0.30
    assert eval_result(tmp_path, "soft", "convnet_bn")["mean"] == 0.40
    assert eval_result(tmp_path, "soft", "resnet50") is None


def test_the_sweeps_default_palette_warmup_is_two_epochs_at_batch_64():
    from decoct.plan import default_palette_warmup

    assert default_palette_warmup(50_000) == 1563  # the AutoPalette-DM presets' value
    assert default_palette_warmup(1_797) == 57 and default_palette_warmup(64) == 2
