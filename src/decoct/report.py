"""Image grids, accuracy-vs-bytes plots and the markdown report of a set of runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from decoct.runtime.filecheck import read_json_object
from decoct.runtime.io import atomic_write_text
from decoct.runtime.runs import run_kind


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, max_per_class: int = 10) -> Path:
    """One row per class (up to ``max_per_class`` images), uint8 (N,C,H,W) in, PNG out."""
    import torchvision.utils as vutils
    from PIL import Image

    rows = []
    classes = sorted(set(labels.tolist()))
    width = min(max_per_class, max(int((labels == c).sum()) for c in classes))
    for c in classes:
        x = images[labels == c][:width]
        if len(x) < width:
            x = torch.cat([x, torch.zeros(width - len(x), *x.shape[1:], dtype=x.dtype)])
        rows.append(x)
    grid = vutils.make_grid(torch.cat(rows).float() / 255, nrow=width, padding=1, pad_value=1.0)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    scale = max(1, 64 // images.shape[-1])  # make 8x8 digits visible
    img = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def collect(paths: list[str | Path]) -> list[dict]:
    """One row per (run, evaluation) with method, IPC, accuracy and bytes.

    A decoct run without a set yet (unfinished, or stopped by an error) is skipped with a note on
    stderr, so ``decoct report runs/*`` works beside a failed attempt; any other path without a
    manifest is an error.
    """
    rows = []
    for p in map(Path, paths):
        manifest_path = p / "artifact" / "manifest.json" if (p / "artifact").exists() else p / "manifest.json"
        if not manifest_path.exists():
            if run_kind(p) in ("run", "legacy"):
                state = "unfinished" if not (p / "DONE").exists() else "finished but without a set"
                print(f"report: skipping {p}: a decoct run with no set yet ({state})", file=sys.stderr)
                continue
            raise FileNotFoundError(f"{p}: no artifact manifest found (is it a decoct run directory?)")
        m = read_json_object(manifest_path)  # an object, or one error naming the file
        counts = m.get("counts_per_class", [])
        if not isinstance(m.get("dataset"), dict) or not isinstance(counts, list):
            raise ValueError(f"{manifest_path}: not a decoct distilled-set manifest (no dataset / counts_per_class); "
                             f"check it with: decoct info {p}")
        for ev in sorted(p.glob("eval-*.json")):
            r = json.loads(ev.read_text())
            if r.get("partial"):
                continue
            row = dict(run=p.name, path=str(p), method=m.get("method", "?"), dataset=m["dataset"]["name"],
                       ipc=round(sum(counts) / max(1, len(counts)), 2), protocol=r["protocol"], model=r["model"],
                       epochs=r.get("epochs"), runs=len(r["accuracies"]), mean=r["mean"], std=r["std"],
                       bytes=r["bytes_on_disk"], raw_bytes=r["raw_bytes"], seconds=r.get("seconds"))
            b = r.get("baseline")
            if b:
                bx = b.get("extra") or {}
                kind = bx.get("kind", "random")  # files written before the kind was recorded: random real
                label = (f"random real x{bx.get('ipc')}/class median-cut to {bx.get('colors')} colours"
                         if kind == "mediancut" else f"random real IPC {bx.get('ipc')}, equal storage")
                row.update(baseline_mean=b["mean"], baseline_std=b["std"], baseline_bytes=b["bytes_on_disk"],
                           baseline_raw_bytes=b.get("raw_bytes"), baseline_kind=kind, baseline_label=label)
            recipe = (r.get("extra") or {}).get("autopalette_dm")
            if recipe:
                row["method"] = f"{row['method']} (AutoPalette, {recipe})"
            rows.append(row)
    return rows


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """``report.md`` (table, frontier table, bytes breakdown) + ``accuracy_vs_bytes.png`` (sets, their
    baselines as their own series, the frontier marked) + ``bytes_breakdown.png`` (images, palettes and
    labels stacked per run) + copies of the runs' grids in ``out`` (:mod:`decoct.frontier`)."""
    from decoct.frontier import (
        frontier_points,
        frontier_table,
        plot_accuracy_vs_bytes,
        plot_bytes_breakdown,
        run_breakdowns,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(paths)
    if not rows:
        raise ValueError("no evaluated runs found (run `decoct evaluate RUN` first)")
    lines = ["| run | method | dataset | IPC | protocol | model | accuracy (%) | bytes on disk | raw bytes | "
             "baseline (same protocol and seeds) | baseline accuracy (%) | baseline bytes on disk | "
             "baseline raw bytes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "baseline_mean" in r:
            raw = r.get("baseline_raw_bytes")
            base = (f"{r['baseline_label']} | {100 * r['baseline_mean']:.2f} ± {100 * r['baseline_std']:.2f} | "
                    f"{r['baseline_bytes']:,} | {f'{raw:,}' if isinstance(raw, int) else '–'}")
        else:
            base = "– | – | – | –"
        lines.append(f"| {r['run']} | {r['method']} | {r['dataset']} | {r['ipc']:g} | {r['protocol']} "
                     f"({r['epochs']} ep, {r['runs']} runs) | {r['model']} | {100 * r['mean']:.2f} ± "
                     f"{100 * r['std']:.2f} | {r['bytes']:,} | {r['raw_bytes']:,} | {base} |")
    points = frontier_points(rows)  # sets and their baselines; the frontier per dataset/protocol/model
    breakdowns = run_breakdowns(rows)
    plot_accuracy_vs_bytes(points, out / "accuracy_vs_bytes.png")
    plot_bytes_breakdown(breakdowns, out / "bytes_breakdown.png")
    lines += ["", "## Accuracy against bytes, and the frontier", "",
              "On the frontier: no other point of the same dataset, protocol and student is both no larger and "
              "no less accurate (and better in one); exact duplicates are both on it (docs/plan.md).", "",
              *frontier_table(points, breakdowns), "",
              "![accuracy vs bytes](accuracy_vs_bytes.png)", "", "![bytes breakdown](bytes_breakdown.png)", ""]
    for p in map(Path, paths):
        if (p / "grid.png").exists():
            target = out / f"grid-{p.name}.png"
            target.write_bytes((p / "grid.png").read_bytes())
            lines.append(f"### {p.name}\n\n![{p.name}]({target.name})\n")
    md = out / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md
