"""The accuracy-vs-bytes frontier of a set of runs: which sets are worth shipping at their size.

Pure rules first (:func:`pareto_frontier` on ``(bytes, accuracy)`` rows, :func:`bytes_breakdown` of an
artifact's bytes on disk), then the two figures ``decoct report`` draws from them
(:func:`plot_accuracy_vs_bytes`, :func:`plot_bytes_breakdown`) and the markdown table
(:func:`frontier_table`).

Frontier rule (docs/plan.md): a point is *on the frontier* when no other point is at most as large
**and** at least as accurate, being strictly better in one of the two. So ties are resolved this way:

* two points with the same bytes: the more accurate one dominates the other;
* two points with the same accuracy: the smaller one dominates the other;
* exact duplicates (same bytes, same accuracy): neither dominates the other, both are on the
  frontier (they are interchangeable, and dropping one at random would hide a run).

Accuracy is the mean over the students of one evaluation (its std is shown, not used: a frontier
over noisy means is what a reader of the plot compares too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLTE_OVERHEAD = 12
"""Bytes of a PNG chunk around its data: length (4), type (4), CRC (4). A palette PNG's PLTE chunk is
``12 + 3 K`` bytes on disk (decoct writes every palette as RGB triples, grey ones with R = G = B)."""


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each ``(bytes, accuracy)`` point, whether it is on the Pareto frontier.

    A point is dominated when another point has ``bytes <= its bytes`` and ``accuracy >= its
    accuracy`` with at least one of the two strict; exact duplicates do not dominate each other, so
    both stay on the frontier (module docstring). Units are free (bytes, accuracy as a fraction or a
    percentage) as long as they are the same for every point. O(n log n).

    Raises ValueError for a point that is not two finite numbers.
    """
    pts: list[tuple[float, float]] = []
    for i, p in enumerate(points):
        try:
            b, a = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"frontier point {i} must be (bytes, accuracy), got {p!r}") from None
        if not (math.isfinite(b) and math.isfinite(a)):
            raise ValueError(f"frontier point {i} must be finite numbers, got {p!r}")
        pts.append((b, a))
    # sweep by bytes ascending; within equal bytes the most accurate first. A point is on the frontier
    # when it beats the best accuracy of every strictly smaller point, and is the best of its own
    # byte group (or ties it exactly).
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1]))
    on = [False] * len(pts)
    best_smaller = -math.inf  # best accuracy among points with strictly fewer bytes
    k = 0
    while k < len(order):
        b = pts[order[k]][0]
        group = []
        while k < len(order) and pts[order[k]][0] == b:
            group.append(order[k])
            k += 1
        top = pts[group[0]][1]
        for i in group:
            on[i] = pts[i][1] == top and top > best_smaller
        best_smaller = max(best_smaller, top)
    return on


def bytes_breakdown(manifest: dict[str, Any], counted_total: int | None = None) -> dict[str, int]:
    """Bytes on disk of one artifact split into ``images`` (pixels), ``palettes`` and ``labels``.

    ``palettes`` are the PLTE chunks of palette PNGs, ``12 + 3 K`` bytes per image (exact: decoct
    writes every palette as K RGB triples, :func:`decoct.formats.png.encode_png`); ``images`` is the
    rest of the PNG bytes (or ``images.safetensors``). ``labels`` is ``counted_total`` minus the image
    bytes when a total is given (an evaluation's ``bytes_on_disk``: the classic/fast protocols leave an
    FKD label store out, the soft protocol counts it), else the manifest's ``bytes_on_disk.labels``.
    The three sum to the total counted.
    """
    disk = (manifest.get("storage") or {}).get("bytes_on_disk") or {}
    image_bytes = int(disk.get("images", 0))
    sizes = manifest.get("palette_sizes") if manifest.get("image_storage") == "png-palette" else None
    palettes = sum(PLTE_OVERHEAD + 3 * int(k) for k in sizes) if sizes else 0
    labels = int(counted_total) - image_bytes if counted_total is not None else int(disk.get("labels", 0))
    return {"images": image_bytes - palettes, "palettes": palettes, "labels": labels}


def _group(row: dict[str, Any]) -> tuple[str, str, str]:
    return (str(row.get("dataset")), str(row.get("protocol")), str(row.get("model")))


def frontier_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point ``decoct report`` plots: each evaluated set, and each set's baseline as its own point.

    Rows are :func:`decoct.report.collect`'s. A point has ``label``, ``kind`` (``set`` or the
    baseline's kind), ``dataset``/``protocol``/``model`` (its comparison group), ``bytes``, ``mean``,
    ``std`` and ``frontier``: whether it is on the frontier of its group (same dataset, protocol and
    student model: accuracies of other protocols are not comparable). Baselines compete too: a random
    real subset is a set one could ship. Identical baseline points (the same subset evaluated beside
    two runs), and a set evaluated twice alike (files with and without a baseline), are kept once.
    """
    pts: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in rows:
        key = (*_group(r), "set", r["run"], int(r["bytes"]), float(r["mean"]), float(r["std"]))
        if key not in seen:  # one evaluation stored twice (with and without a baseline) is one point
            seen.add(key)
            pts.append(dict(label=r["run"], kind="set", run=r["run"], method=r.get("method", "?"),
                            dataset=r.get("dataset"),
                            protocol=r.get("protocol"), model=r.get("model"), bytes=int(r["bytes"]),
                            mean=float(r["mean"]), std=float(r["std"])))
        if "baseline_mean" in r:
            kind = r.get("baseline_kind", "random")
            key = (*_group(r), kind, int(r["baseline_bytes"]), float(r["baseline_mean"]), float(r["baseline_std"]))
            if key in seen:
                continue
            seen.add(key)
            pts.append(dict(label=f"{r.get('baseline_label', kind)} (beside {r['run']})", kind=kind, run=r["run"],
                            dataset=r.get("dataset"), protocol=r.get("protocol"), model=r.get("model"),
                            bytes=int(r["baseline_bytes"]), mean=float(r["baseline_mean"]),
                            std=float(r["baseline_std"])))
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, p in enumerate(pts):
        groups.setdefault(_group(p), []).append(i)
    for members in groups.values():
        on = pareto_frontier([(pts[i]["bytes"], pts[i]["mean"]) for i in members])
        for i, f in zip(members, on, strict=True):
            pts[i]["frontier"] = f
    return pts


def run_breakdowns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One stacked-bar entry per evaluated set: ``label`` and :func:`bytes_breakdown` of its counted bytes."""
    out, seen = [], set()
    for r in rows:
        if (r["path"], r["protocol"], int(r["bytes"])) in seen:
            continue
        seen.add((r["path"], r["protocol"], int(r["bytes"])))
        path = Path(r["path"])
        mpath = path / "artifact" / "manifest.json" if (path / "artifact").exists() else path / "manifest.json"
        manifest = json.loads(mpath.read_text())
        out.append(dict(label=f"{r['run']} ({r['protocol']})", **bytes_breakdown(manifest, int(r["bytes"]))))
    return out


def frontier_table(points: list[dict[str, Any]], breakdowns: list[dict[str, Any]] | None = None) -> list[str]:
    """Markdown lines: every plotted point by group, bytes ascending, frontier points marked."""
    lines = ["| group (dataset, protocol, model) | point | bytes on disk | accuracy (%) | on frontier |",
             "|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (_group(p), p["bytes"], -p["mean"])):
        lines.append(f"| {', '.join(_group(p))} | {p['label']} | {p['bytes']:,} | {100 * p['mean']:.2f} ± "
                     f"{100 * p['std']:.2f} | {'yes' if p['frontier'] else ''} |")
    if breakdowns:
        lines += ["", "| run | images | palettes | labels | total |", "|---|---|---|---|---|"]
        for b in breakdowns:
            total = b["images"] + b["palettes"] + b["labels"]
            lines.append(f"| {b['label']} | {b['images']:,} | {b['palettes']:,} | {b['labels']:,} | {total:,} |")
    return lines


def _bytes_axis(ax: Any, values: list[int]) -> None:
    """A log byte axis when the points span a decade or more, else a linear one; whole bytes with
    thousands separators either way (matplotlib's log labels overlap on a narrow span)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(values, default=1), max(values, default=1)
    if lo > 0 and hi / lo >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1-2-5 labels: one decade has 3
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))


MAX_LABELLED = 12
"""With more sets than this, the plot names only the frontier's (the legend gives every point's method)."""


def plot_series(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The plot's series, in first-seen order: one per method as the manifest names it (with the
    protocol and model when the points span more than one comparison group) and one per baseline kind."""
    many = len({_group(p) for p in points}) > 1
    series: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p["kind"] != "set":
            name = f"baseline: {p['kind']} real"
        else:
            name = str(p.get("method", "sets")) + (f" ({p['protocol']}, {p['model']})" if many else "")
        series.setdefault(name, []).append(p)
    return series


def plot_accuracy_vs_bytes(points: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (%) against bytes on disk (log axis over a decade or more): one series per method
    (:func:`plot_series`; marker shape per comparison group), each baseline kind as its own series, and per
    group the frontier as a dashed step line through its points, each ringed (one colour per group). Sets
    are named beside their points, only the frontier's when there are more than :data:`MAX_LABELLED`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    shapes = dict(zip(sorted({_group(p) for p in points}), "o^Dvs", strict=False))
    sets = [p for p in points if p["kind"] == "set"]
    for name, pts in plot_series(points).items():
        base = pts[0]["kind"] != "set"
        ax.errorbar([p["bytes"] for p in pts], [100 * p["mean"] for p in pts], yerr=[100 * p["std"] for p in pts],
                    fmt="x" if base else shapes.get(_group(pts[0]), "o"), capsize=3, label=name,
                    alpha=0.7 if base else 0.9)
        for p in pts if not base else []:
            if len(sets) <= MAX_LABELLED or p.get("frontier"):
                ax.annotate(p["label"], (p["bytes"], 100 * p["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for p in points:
        if p.get("frontier"):
            groups.setdefault(_group(p), []).append(p)
    datasets = {g[0] for g in groups}
    for i, (g, pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda p: p["bytes"])
        colour, style = ("k", "--") if i % 2 == 0 else ("0.45", ":")  # grey tones: the methods have the colours
        name = ", ".join(g if len(datasets) > 1 else g[1:])
        ax.step([p["bytes"] for p in pts], [100 * p["mean"] for p in pts], where="post", color=colour,
                linestyle=style, linewidth=1, label="frontier" + (f" ({name})" if len(groups) > 1 else ""))
        ax.scatter([p["bytes"] for p in pts], [100 * p["mean"] for p in pts], s=140, facecolors="none",
                   edgecolors=colour, linewidths=1.2)
    _bytes_axis(ax, [p["bytes"] for p in points])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_xlabel("bytes on disk (images + palettes + labels counted by the protocol)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many series cover points
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write (PNG at 120 dpi) and close a figure; the written path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bytes_breakdown(breakdowns: list[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal stacked bars, one per evaluated run: images, palettes, labels (bytes on disk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(breakdowns) + 1.5))
    y = list(range(len(breakdowns)))
    left = [0] * len(breakdowns)
    for part, colour in (("images", "tab:blue"), ("palettes", "tab:orange"), ("labels", "tab:green")):
        vals = [b[part] for b in breakdowns]
        ax.barh(y, vals, left=left, color=colour, label=part)
        left = [a + v for a, v in zip(left, vals, strict=True)]
    ax.set_yticks(y)
    ax.set_yticklabels([b["label"] for b in breakdowns], fontsize=7)
    ax.invert_yaxis()
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
    ax.set_xlabel("bytes on disk")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


__all__ = ["MAX_LABELLED", "PLTE_OVERHEAD", "bytes_breakdown", "frontier_points", "frontier_table", "pareto_frontier",
           "plot_accuracy_vs_bytes", "plot_bytes_breakdown", "plot_series", "run_breakdowns"]
