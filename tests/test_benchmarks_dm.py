"""benchmarks/bench_dm.py: its FLOP accounting, its variant names, and a whole run at its tiny size."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in benchmarks/
import bench_dm  # noqa: E402

sys.dont_write_bytecode = _bytecode

pytestmark = pytest.mark.usefixtures("one_thread")


def test_conv_layers_are_convnet_d3s_and_their_flops_are_the_counters():
    layers = bench_dm.conv_layers((3, 32, 32), 128)
    assert [(la["in"], la["out"], la["h"]) for la in layers] == [(3, 128, 32), (128, 128, 16), (128, 128, 8)]
    # 2 x C_in x C_out x 3 x 3 x H x W per image: 7.1 + 75.5 + 18.9 = 101.5 MFLOP per forward
    assert [la["flops_per_image"] for la in layers] == [7_077_888, 75_497_472, 18_874_368]
    small = bench_dm.conv_layers((3, 8, 8), 4)
    for la in small:
        x, w = torch.randn(2, la["in"], la["h"], la["w"]), torch.randn(la["out"], la["in"], 3, 3)
        assert bench_dm._flops(lambda x=x, w=w: F.conv2d(x, w, padding=1)) == 2 * la["flops_per_image"]


def test_variant_names_parse_and_bad_ones_exit_2(capsys):
    assert bench_dm.parse_variant("decoct") == {}
    assert bench_dm.parse_variant("decoct-nchw-compile-chunk64") == {"channels_last": False, "compile": True,
                                                                     "real_chunk": 64}
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        bench_dm.parse_variant("decoct-fast")
    with pytest.raises(SystemExit) as e:
        bench_dm.parse_args(["--variants", "plain,decoct-chunk0"])
    assert e.value.code == 2 and "unknown option 'chunk0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_dm.parse_args(["--variants", "plain,plain"])


def test_quick_run_end_to_end(tmp_path, capsys):
    """--quick: synthetic data, width 16, IPC 1, batch_real 8: every part runs and the JSON is consistent."""
    out = tmp_path / "dm.json"
    threads = torch.get_num_threads()
    try:
        res = bench_dm.main(["--quick", "--iters", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == res
    assert set(res["variants"]) == {"plain", "decoct", "decoct-nchw"} and not res["failed_variants"]
    assert all(v["all_s"] == [v["best_s"]] == [v["median_s"]] for v in res["variants"].values())
    assert res["variants"]["decoct-nchw"]["settings"]["channels_last"] is False
    assert res["variants"]["decoct"]["settings"]["channels_last"] is True
    it = res["iteration"]
    # conv FLOPs of one iteration: forward of 80 real + 10 synthetic images, input-gradient of the 10 synthetic
    per_image = sum(la["flops_per_image"] for la in bench_dm.conv_layers((3, 32, 32), 16))
    assert it["by_op"]["aten.convolution"] == 90 * per_image
    assert it["by_op"]["aten.convolution_backward"] == 10 * per_image
    assert it["flops"] >= 100 * per_image and it["plain_loop_flops"] >= 100 * per_image
    assert it["floor_s_conv"] == pytest.approx(it["flops"] / (res["peak"]["conv_gflops"] * 1e9), rel=1e-3)
    assert it["floor_s_matmul"] == pytest.approx(it["flops"] / (res["peak"]["matmul"]["gflops"] * 1e9), rel=1e-3)
    r = res["ratios"]["decoct"]
    assert r["over_floor_conv"]["median"] == pytest.approx(
        res["variants"]["decoct"]["median_s"] / it["floor_s_conv"], rel=1e-3)
    assert r["plain_over_this"]["best"] == pytest.approx(
        res["variants"]["plain"]["best_s"] / res["variants"]["decoct"]["best_s"], rel=1e-3)
    assert res["machine"]["threads"] == 1 and res["setting"]["quick"] is True
