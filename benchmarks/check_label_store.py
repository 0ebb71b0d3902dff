"""Check a set's FKD label store against its teacher: replay stored views, recompute the teacher's logits.

For a few stored epochs (default: the first two and the last), every stored batch's view record is applied
to the set's images exactly as the soft protocol replays it, the teacher labels the result, and the script
reports the largest |recomputed - stored| logit (fp16 rounding: ~1e-2 at logits ~10), how often the stored
argmax is the image's class, the mean entropy of the stored soft labels at the recipe's temperature, and the
teacher's accuracy on the plain set images. A store that does not belong to its images or teacher shows up as
a large difference. Used for issue 13's tinyimagenet10 RDED cell (benchmarks/RESULTS.md, session 9).

Usage: python benchmarks/check_label_store.py RUN TEACHER [--epochs 0 1 -1]
"""

from __future__ import annotations

import argparse

import torch

from decoct.augment.recorded_views import apply_views
from decoct.data.types import normalize
from decoct.formats.artifact import DistilledSet
from decoct.formats.label_store import LabelStore
from decoct.formats.teacher import load_teacher
from decoct.runtime.runs import resolve_artifact
from decoct.train.soft_students import fill_value, soft_recipe_for


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("teacher")
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 1, -1], help="stored epochs to replay (-1: last)")
    args = ap.parse_args(argv)
    model, info, _ = load_teacher(args.teacher)
    dset = DistilledSet.load(resolve_artifact(args.run))
    store = LabelStore.from_set(dset)
    x = normalize(dset.images, info)
    hard = dset.labels
    T = soft_recipe_for(info).temperature
    held = store.complete_epochs()
    diffs, agree, ent, n = [], 0.0, 0.0, 0
    with torch.no_grad():
        plain_acc = float((model(x).argmax(1) == hard).float().mean())
        for e in sorted({held[i] for i in args.epochs}):
            for pos in range(store.epoch_len(e)):
                idx, rec, logits = store.batch_at(e, pos)
                out = model(apply_views(x[idx], rec, fill_value(info)))
                stored = logits.float()
                diffs.append(float((out - stored).abs().max()))
                agree += float((stored.argmax(1) == hard[idx]).float().sum())
                p = torch.softmax(stored / T, 1)
                ent += float(-(p * p.clamp_min(1e-12).log()).sum(1).sum())
                n += len(idx)
    res = {"max_abs_diff": max(diffs), "argmax_is_class": agree / n, "entropy_at_T": ent / n,
           "teacher_acc_plain_images": plain_acc, "views": n}
    for k, v in res.items():
        print(f"{k:26s} {v:.4f}" if isinstance(v, float) else f"{k:26s} {v}")
    return res


if __name__ == "__main__":
    main()
