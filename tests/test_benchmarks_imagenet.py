"""benchmarks/imagenet_scale.py and benchmarks/gpu_check.py: their measuring parts, and whole runs at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in benchmarks/
import imagenet_scale  # noqa: E402

sys.dont_write_bytecode = _bytecode


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", DECOCT_CACHE=str(tmp_path / "cache"))


def _bench_files() -> set[str]:
    return {str(p.relative_to(BENCH)) for p in BENCH.rglob("*") if "__pycache__" not in p.parts}


def test_run_stage_measures_the_process_and_its_children(tmp_path):
    # the stage allocates 300 MB in itself and 200 MB in a child it waits for: both must show
    code = ("import os, time\n"
            "a = bytearray(300 * 2**20); time.sleep(0.4)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    b = bytearray(200 * 2**20); time.sleep(0.4); os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    row = imagenet_scale.run_stage("alloc", [sys.executable, "-c", code], env=dict(os.environ), log=tmp_path / "a.log")
    assert row["rc"] == 0 and row["wall_s"] > 0.5
    assert 300 <= row["main_peak_rss_mb"] < 450
    assert row["child_processes"] == 1 and 200 <= row["worker_peak_rss_mb"] - 0 < 700
    assert row["max_process_rss_mb"] >= 300  # wait4: the largest process of the tree
    assert row["tree_peak_rss_sum_mb"] >= row["main_peak_rss_mb"]
    failed = imagenet_scale.run_stage("fail", [sys.executable, "-c", "raise SystemExit('broken stage')"],
                                      env=dict(os.environ), log=tmp_path / "f.log")
    assert failed["rc"] == 1 and "broken stage" in failed["error"]


def test_compare_stats_finds_any_difference(tmp_path):
    from safetensors.torch import save_file

    a = {"l.mean": torch.zeros(3), "l.class_var": torch.ones(2, 3), "l.class_count": torch.tensor([4, 5])}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(dict(a), str(tmp_path / "b.safetensors"))
    same = imagenet_scale.compare_stats(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert same["equal"] and same["max_abs_diff"] == 0.0
    b = dict(a, **{"l.class_var": torch.ones(2, 3).index_put_((torch.tensor([1]), torch.tensor([2])),
                                                             torch.tensor(1.5))})
    save_file(b, str(tmp_path / "b.safetensors"))
    diff = imagenet_scale.compare_stats(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not diff["equal"] and diff["max_abs_diff"] == pytest.approx(0.5)
    assert diff["worst_key"] == "l.class_var" and diff["max_abs_diff_by_stat"]["class_var"] == pytest.approx(0.5)
    save_file({"l.mean": torch.zeros(3)}, str(tmp_path / "c.safetensors"))
    assert imagenet_scale.compare_stats(tmp_path / "a.safetensors", tmp_path / "c.safetensors")["same_keys"] is False


def test_build_tree_in_parts_is_an_imagenet_tree_and_is_reused(tmp_path):
    from decoct.data.fake_imagenet import wnid
    from decoct.data.stream import load_index

    tree = tmp_path / "tree"
    got = imagenet_scale.build_tree(tree, 3, 5, 2, size=(16, 12), procs=2)
    assert got == {"reused": False, "seconds": got["seconds"], "files": 3 * 7}
    assert not (tree / ".parts").exists()
    assert sorted(p.name for p in (tree / "train" / wnid(1)).iterdir()) == [f"{wnid(1)}_{i}.JPEG" for i in range(5)]
    train, val = load_index(tree)
    assert len(train) == 15 and len(val) == 6 and train.classes == tuple(wnid(k) for k in range(3))
    assert imagenet_scale.build_tree(tree, 3, 5, 2, size=(16, 12), procs=2)["reused"] is True
    again = imagenet_scale.build_tree(tree, 3, 4, 2, size=(16, 12), procs=1)  # other parameters: rebuilt
    assert again["reused"] is False and len(load_index(tree)[0]) == 12


def _row(stage, main, workers, rc=0):
    return dict(stage=stage, rc=rc, main_peak_rss_mb=main, worker_peak_rss_mb=workers,
                max_process_rss_mb=max(main, workers))


def test_targets_judge_growth_absolute_rss_loader_ratio_and_torchrun():
    res = {"per_n": {"2": {"stages": [_row("index_cold", 500, 0), _row("squeeze", 900, 400), _row("validate", 800, 0)]},
                     "8": {"stages": [_row("index_cold", 520, 0), _row("squeeze", 1200, 410),
                                      _row("validate", 4200, 0, rc=1)]}},
           "rates": {"result": {"ratio_loader_vs_raw": 0.85}},
           "torchrun": {"compare": {"equal": True, "max_abs_diff": 0.0}}}
    t = imagenet_scale.targets(res)
    assert t["index_cold main_peak_rss_mb growth N=2->8 (MB, < 250)"] == {"value": 20, "met": True}
    assert t["squeeze main_peak_rss_mb growth N=2->8 (MB, < 250)"] == {"value": 300, "met": False}
    assert t["squeeze worker_peak_rss_mb growth N=2->8 (MB, < 250)"] == {"value": 10, "met": True}
    assert not any(k.startswith("validate") for k in t)  # a failed stage is not compared
    assert t["largest process RSS of any stage (MB, < 4096)"] == {"value": 4200, "met": False}
    assert t["loader / plain processes (>= 0.9)"] == {"value": 0.85, "met": False}
    assert t["torchrun 2 vs 1 process stats max abs diff (== 0)"] == {"value": 0.0, "met": True}
    res["per_n"]["8"]["stages"][1] = _row("squeeze", 1100, 410)
    res["rates"]["result"]["ratio_loader_vs_raw"] = 0.95
    t = imagenet_scale.targets(res)
    assert t["squeeze main_peak_rss_mb growth N=2->8 (MB, < 250)"]["met"] is True
    assert t["loader / plain processes (>= 0.9)"]["met"] is True


@pytest.mark.slow
def test_imagenet_scale_tiny_reports_every_stage(tmp_path):
    work = tmp_path / "work"
    before = _bench_files()
    # one N (each stage is a fresh process: ~10 of them); the growth between two Ns: test_targets_*
    proc = subprocess.run([sys.executable, str(BENCH / "imagenet_scale.py"), "--tiny", "--n", "1", "--workers", "1",
                           "--work", str(work)], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| N | train imgs | stage |" in proc.stdout and "ratio torchvision / PIL" in proc.stdout
    res = json.loads((work / "imagenet_scale.json").read_text())
    assert res["preset"] == "tiny" and "idle" in res["note"] and len(res["load_before"]) == 3
    assert set(res["per_n"]) == {"1"}
    for n, per in res["per_n"].items():
        stages = {r["stage"]: r for r in per["stages"]}
        assert list(stages) == ["index_cold", "index_warm", "squeeze (stats + val)", "validate"]
        for r in stages.values():
            assert r["rc"] == 0 and r["wall_s"] > 0 and r["main_peak_rss_mb"] > 0 and r["max_process_rss_mb"] > 0
        for name in ("index_cold", "index_warm"):
            assert stages[name]["result"]["train"] == 4 * int(n) and stages[name]["result"]["val"] == 4
        sq = stages["squeeze (stats + val)"]
        assert sq["result"]["streamed"] is True and sq["result"]["num_train_images"] == 4 * int(n)
        assert sq["child_processes"] >= 1 and sq["worker_peak_rss_mb"] > 0  # the DataLoader worker was seen
        val = stages["validate"]["result"]
        assert val["images"] == 4 and 0 <= val["accuracy"] <= 1
    r = res["rates"]["result"]
    for key in ("loader_img_s", "loader_steady_img_s", "raw_pool_img_s", "raw_pool_warm_img_s",
                "torchvision_decode_img_s", "pil_decode_img_s", "ratio_loader_vs_raw",
                "ratio_loader_steady_vs_raw_warm", "ratio_torchvision_vs_pil"):
        assert r[key] > 0, key
    tr = res["torchrun"]
    assert tr["rc"] == 0 and tr["compare"]["equal"] is True and tr["compare"]["max_abs_diff"] == 0.0
    assert tr["compare"]["tensors"] > 100  # every BN layer's seven statistics of ResNet-18
    assert tr["compare"]["val_accuracy_equal"] is True and 0 <= tr["compare"]["val_accuracy_2"] <= 1
    e2e = res["e2e"]
    assert [r["stage"].split()[1] for r in e2e] == ["squeeze", "distill", "relabel", "evaluate"]
    assert all(r["rc"] == 0 and r["wall_s"] > 0 and r["main_peak_rss_mb"] > 0 for r in e2e)
    assert "3 images" in e2e[1]["last_line"] and "pruned 10x" in e2e[2]["last_line"] and "soft" in e2e[3]["last_line"]
    assert "| end to end" in proc.stdout
    assert all(isinstance(t["met"], bool) for t in res["targets"].values())
    assert any("largest process" in k for k in res["targets"]) and any("loader" in k for k in res["targets"])
    assert _bench_files() == before  # everything went to the work dir


@pytest.mark.slow
def test_gpu_check_cpu_tiny_prints_one_json(tmp_path):
    work = tmp_path / "work"
    before = _bench_files()
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu", "--tiny"],
                          env=dict(_env(tmp_path), GPU_CHECK_WORK=str(work), OUT=str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["errors"] == {} and res["skipped"] == [] and res["device"] == "cpu" and res["tiny"] is True
    lo = res["loader"]
    for key in ("cpu_loader_img_s", "device_decode_img_s", "device_decode_view_img_s",
                "ratio_device_decode_view_vs_cpu_loader"):
        assert lo[key] > 0, key
    rec = res["recover"]
    for method, batching in (("sre2l", "ipc"), ("dwa", "ipc"), ("lpld", "class")):
        row = rec[method]
        assert row["batching"] == batching and row["it_s"] > 0 and row["image_iterations_per_s"] > 0
        assert row["first_step_s"] > 0 and row["batch_start_s"] is not None and row["imagenet_ipc10_iterations"] > 0
    assert rec["dwa"]["dwa_steps"] == 2 and rec["sre2l"]["dwa_steps"] == 0
    assert rec["lpld"]["images_per_batch"] == 2 and rec["sre2l"]["images_per_batch"] == 4
    soft = res["soft_student"]
    assert soft["epoch_s"] > 0 and soft["img_s"] > 0 and soft["steps"] == 1 and soft["recipe"] == "imagenet"
    dm = res["dm"]
    assert dm["reference_s_per_it"] > 0 and dm["decoct_s_per_it"] > 0 and dm["ratio_reference_vs_decoct"] > 0
    ms = res["multi_student"]
    assert ms["students"] == 5 and set(ms["engines"]) == {"sequential", "vmap", "grouped"}
    assert all(e["seconds"] > 0 and e["ratio_vs_sequential"] > 0 for e in ms["engines"].values())
    assert ms["engines"]["sequential"]["ratio_vs_sequential"] == 1.0
    assert list(work.iterdir()) == []  # tree, teacher, caches removed; the JSON went to $OUT
    assert _bench_files() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_without_cuda_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--work", str(tmp_path / "w")],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: error: CUDA is not available here; pass --cpu (with --tiny for a quick run)"]
