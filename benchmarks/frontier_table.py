"""The frontier sweep's runs as one markdown table, each beside the best random-real set at no more bytes.

Usage: python benchmarks/frontier_table.py ROOT [--budgets 50KB 150KB 400KB]

ROOT is benchmarks/mini_frontier_c10.sh's OUT (runs two levels down, e.g. ROOT/matching-50KB/dm-ipc2). Every
run that has a finished evaluation is a row (the one with the most students, as ``decoct plan`` picks it): its configuration (as ``decoct plan`` names it), bytes on disk as its
protocol counts them, accuracy mean ± std over the students, and the smallest budget it fits. Beside it, the
baseline: the most accurate random-real run (coreset ``random``, any colour count or label store) of the same
protocol and student with at most its bytes, and the difference in points. Rows are grouped by protocol and
student (their accuracies are not comparable), bytes ascending.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decoct.plan import FAMILIES, config_of_run, eval_result, find_runs, parse_budget, protocol_for


def rows_of(root: Path) -> list[dict]:
    out = []
    for run in find_runs([root]):
        found = next((f for fam in FAMILIES if (f := config_of_run(run, fam)) is not None), None)
        if found is None:
            continue
        cfg, _ = found
        proto = protocol_for(cfg, "fast")
        r = eval_result(run, proto)  # the finished evaluation with the most students, as decoct plan ranks it
        if r is not None:
            out.append(dict(run=str(run.relative_to(root)), cfg=cfg, protocol=proto, model=r["model"],
                            bytes=int(r["bytes_on_disk"]), mean=100 * r["mean"], std=100 * r["std"],
                            students=len(r["accuracies"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--budgets", nargs="+", default=["50KB", "150KB", "400KB"])
    args = ap.parse_args()
    budgets = sorted(parse_budget(b) for b in args.budgets)
    rows = rows_of(args.root)
    print("| protocol, student | configuration | bytes on disk | fits | accuracy (%) | best random real at <= its "
          "bytes | its bytes | its accuracy (%) | difference (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["protocol"], r["model"], r["bytes"])):
        fits = next((f"{b // 1000} KB" for b in budgets if r["bytes"] <= b), "over")
        base = [b for b in rows if b["cfg"].method == "random" and (b["protocol"], b["model"]) ==
                (r["protocol"], r["model"]) and b["bytes"] <= r["bytes"]]
        best = max(base, key=lambda b: b["mean"], default=None)
        cells = ["–"] * 4
        if best is not None and best is not r:
            cells = [best["cfg"].describe(), f"{best['bytes']:,}", f"{best['mean']:.2f} ± {best['std']:.2f}",
                     f"{r['mean'] - best['mean']:+.2f}"]
        elif best is r:
            cells = ["(itself)", "", "", ""]
        print(f"| {r['protocol']}, {r['model']} | {r['cfg'].describe()} | {r['bytes']:,} | {fits} | "
              f"{r['mean']:.2f} ± {r['std']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
