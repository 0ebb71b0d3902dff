"""decoct report's frontier (issue 14): the frontier rule on a hand-made table (ties, duplicates), the
points and groups it is taken over, the exact palette bytes of the breakdown, and the report itself."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch

from decoct.cli import main
from decoct.frontier import PLTE_OVERHEAD, bytes_breakdown, frontier_points, pareto_frontier

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ frontier
def test_frontier_on_a_hand_made_table_with_ties_and_duplicates():
    table = [  # (bytes, accuracy), on the frontier?
        ((10, 0.10), True),    # smallest
        ((50, 0.40), True),
        ((100, 0.50), True),   # duplicate pair: neither dominates the other
        ((100, 0.50), True),
        ((100, 0.40), False),  # same bytes, less accurate than (100, 0.50); also dominated by (50, 0.40)
        ((120, 0.40), False),  # same accuracy as (50, 0.40), more bytes
        ((200, 0.50), False),  # same accuracy as (100, 0.50), more bytes
        ((200, 0.70), True),
        ((300, 0.60), False),  # bigger and worse than (200, 0.70)
        ((300, 0.70), False),  # tie in accuracy with a smaller point
        ((400, 0.90), True),
    ]
    assert pareto_frontier([p for p, _ in table]) == [on for _, on in table]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(5, 0.3)]) == [True]


def test_frontier_agrees_with_the_definition_on_random_tables():
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(1, 6), rng.randint(0, 5) / 5) for _ in range(rng.randint(1, 12))]
        want = [not any(b2 <= b and a2 >= a and (b2 < b or a2 > a) for b2, a2 in pts) for b, a in pts]
        assert pareto_frontier(pts) == want, pts


@pytest.mark.parametrize("bad", [[(1, float("nan"))], [(float("inf"), 0.5)], [("x", 0.5)], [(1,)]])
def test_frontier_refuses_points_that_are_not_two_finite_numbers(bad):
    with pytest.raises(ValueError, match="frontier point 0"):
        pareto_frontier(bad)


def test_frontier_points_groups_by_protocol_and_keeps_baselines_as_points():
    rows = [
        dict(run="a", dataset="d", protocol="fast", model="m", bytes=100, mean=0.5, std=0.0,
             baseline_mean=0.6, baseline_std=0.0, baseline_bytes=100, baseline_kind="random", baseline_label="rr"),
        dict(run="b", dataset="d", protocol="fast", model="m", bytes=300, mean=0.55, std=0.0),
        dict(run="b", dataset="d", protocol="soft", model="m", bytes=300, mean=0.2, std=0.0),  # its own group
    ]
    pts = {(p["label"], p["protocol"]): p["frontier"] for p in frontier_points(rows)}
    # the baseline at the same bytes is more accurate: run a is off the frontier, its baseline on it
    assert pts[("a", "fast")] is False and pts[("rr (beside a)", "fast")] is True
    assert pts[("b", "fast")] is False  # bigger and less accurate than the baseline
    assert pts[("b", "soft")] is True   # alone in the soft group


def _png_chunks(data: bytes) -> dict[bytes, int]:
    pos, out = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out[data[pos + 4:pos + 8]] = 12 + length
        pos += 12 + length
    return out


@pytest.mark.parametrize("channels,k", [(1, 16), (3, 64), (3, 2)])
def test_palette_bytes_are_the_plte_chunk_of_every_palette_png(channels, k):
    from decoct.formats.png import encode_png

    idx = torch.randint(0, k, (8, 8), dtype=torch.uint8)
    pal = torch.randint(0, 256, (k, channels), dtype=torch.uint8)
    chunks = _png_chunks(encode_png(torch.zeros(channels, 8, 8, dtype=torch.uint8), idx, pal))
    assert chunks[b"PLTE"] == PLTE_OVERHEAD + 3 * k
    manifest = {"image_storage": "png-palette", "palette_sizes": [k, k, k],
                "storage": {"bytes_on_disk": {"images": 1000, "labels": 0}}}
    assert bytes_breakdown(manifest, 1500) == {"images": 1000 - 3 * chunks[b"PLTE"],
                                               "palettes": 3 * chunks[b"PLTE"], "labels": 500}


def _fake_eval(run: Path, protocol: str, mean: float, baseline: tuple[float, int] | None = None) -> None:
    """An eval-*.json as decoct evaluate writes it (the fields decoct report reads), without training."""
    m = json.loads((run / "artifact" / "manifest.json").read_text())
    total = m["storage"]["bytes_on_disk"]["total"]
    r = dict(protocol=protocol, model="convnet", accuracies=[mean, mean], mean=mean, std=0.0, bytes_on_disk=total,
             raw_bytes=m["storage"]["raw_bytes"]["total"], seconds=1.0, num_images=m["num_images"], engine="sequential",
             epochs=2, extra={}, partial=False, baseline=None)
    if baseline is not None:
        r["baseline"] = dict(protocol=protocol, model="convnet", accuracies=[baseline[0]] * 2, mean=baseline[0],
                             std=0.0, bytes_on_disk=baseline[1], raw_bytes=baseline[1], extra={"ipc": 1, "kind": "random"})
    (run / f"eval-{protocol}-convnet-e2{'-random' if baseline else ''}.json").write_text(json.dumps(r))


def test_report_marks_the_frontier_and_stacks_images_palettes_labels(tmp_path, capsys):
    a, q = tmp_path / "a", tmp_path / "q"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(a), "--no-progress"]) == 0
    assert main(["quantize", str(a), "--colors", "4", "--out", str(q), "--no-progress"]) == 0
    qm = json.loads((q / "artifact" / "manifest.json").read_text())
    _fake_eval(a, "fast", 0.60, baseline=(0.70, 10))  # the baseline: smaller and more accurate than a
    _fake_eval(q, "fast", 0.65)
    assert main(["report", str(a), str(q), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "bytes_breakdown.png").stat().st_size > 0
    lines = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| digits, fast, convnet |")}
    assert lines["a"].endswith("|  |") and lines["q"].endswith("|  |")  # both dominated by the 10-byte baseline
    base = [ln for label, ln in lines.items() if label.endswith("(beside a)")]
    assert len(base) == 1 and base[0].endswith("| yes |")
    palettes = 20 * (PLTE_OVERHEAD + 3 * 4)
    images = qm["storage"]["bytes_on_disk"]["images"] - palettes
    assert f"| q (fast) | {images:,} | {palettes:,} | 0 | {qm['storage']['bytes_on_disk']['total']:,} |" in md


def test_plot_series_are_methods_with_their_group_and_baselines():
    """One series per method (named with protocol and model once two groups are drawn), one per baseline
    kind; points keep their order."""
    from decoct.frontier import plot_series

    def pt(run, method, protocol, kind="set"):
        return dict(label=run, kind=kind, run=run, method=method, dataset="cifar10", protocol=protocol,
                    model="convnet" if protocol == "fast" else "resnet18", bytes=1, mean=0.5, std=0.0)

    one = [pt("a", "dm", "fast"), pt("b", "coreset-random", "fast"), pt("c", "dm", "fast"),
           pt("a-base", None, "fast", kind="random")]
    s = plot_series(one)
    assert list(s) == ["dm", "coreset-random", "baseline: random real"]
    assert [p["run"] for p in s["dm"]] == ["a", "c"]
    two = plot_series([*one, pt("d", "lpld", "soft")])
    assert list(two) == ["dm (fast, convnet)", "coreset-random (fast, convnet)", "baseline: random real",
                         "lpld (soft, resnet18)"]
