"""The interchange form DD-Ranking's ``compute_metrics`` takes: one safetensors file and a JSON.

``decoct export RUN --ddranking OUT`` writes, in the directory ``OUT``::

    ddranking.safetensors   images       float32 (N, C, H, W), normalised with the dataset's mean/std,
                                         class-major (all images of class 0, then class 1, ...)
                            hard_labels  int64 (N,), = repeat_interleave(arange(classes), ipc)
                            soft_labels  float32 (N, classes) logits, only for a set that carries them
                                         (DD-Ranking's soft_label_mode 'S'), row i for image i
                            zca_mean, zca_W  float32, only for a ZCA set (applied after normalising:
                                         x' = (x.reshape(N, D) - zca_mean) @ zca_W)
    ddranking.json          what the tensors are, ipc, image size, normalisation, learned lr (syn_lr),
                            and the compute_metrics call that fits them

DD-Ranking builds its hard labels from the order alone (``repeat_interleave(arange(C), ipc)``) and
applies no transform to a tensor dataset, so the images must be class-major, already normalised,
with the same number per class: a set with unequal classes is refused. The pixels are the ones
decoct evaluates (the saved uint8/palette pixels, normalised), never pickled: safetensors and JSON
only. An FKD label store (per-view labels) has no place in the form (mode S takes one logit row
per image): it is named in the JSON as not exported, with mode M (pass the teacher) as the way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from decoct.data.types import normalize
from decoct.formats.artifact import export_marker
from decoct.formats.errors import ArtifactError
from decoct.runtime.io import fsync_paths, replace_dir, tensors_to_bytes

DDRANKING_FORMAT = "decoct-ddranking-export"
DDRANKING_JSON = "ddranking.json"
DDRANKING_TENSORS = "ddranking.safetensors"

# What DD-Ranking normalises its own real data with (ddranking/utils/data.py at b8b0966, per
# ../shared/reference/rded-scores-labels.md §2.5): a set exported with other statistics is noted.
_DDRANKING_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DDRankingExportError(ValueError):
    """The set cannot be written in DD-Ranking's form, or the target cannot take it."""


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise DDRankingExportError(f"{out} is a symbolic link; export to a real directory path")
    if not out.exists():
        return
    if not out.is_dir():
        raise DDRankingExportError(f"{out} exists and is not a directory; choose another --ddranking path")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if export_marker(out, DDRANKING_JSON, DDRANKING_FORMAT) is None:
        raise DDRankingExportError(f"{out} is not empty and is not a decoct DD-Ranking export (no {DDRANKING_JSON}); "
                                   "refusing to replace it: choose a new or empty directory")
    if not overwrite:
        raise DDRankingExportError(f"{out} holds an earlier DD-Ranking export; pass --force to replace it")
    extra = set(entries) - {DDRANKING_JSON, DDRANKING_TENSORS}
    if extra:
        raise DDRankingExportError(f"{out} holds an earlier DD-Ranking export plus {sorted(extra)[0]}, which the "
                                   "export did not write; refusing to replace it (move that file out first)")


def ddranking_tensors(dset: Any) -> dict[str, torch.Tensor]:
    """The tensors of the interchange form (see the module docstring), class-major."""
    counts = dset.ipc
    if len(set(counts)) != 1:
        raise DDRankingExportError(f"the set has {counts} images per class; DD-Ranking builds its labels as "
                                   "repeat_interleave(arange(classes), ipc) and needs the same number in every class")
    order = torch.sort(dset.labels, stable=True).indices  # class-major, set order kept within a class
    out = {"images": normalize(dset.images[order], dset.info).contiguous(),
           "hard_labels": dset.labels[order].long().contiguous()}
    if dset.soft_labels is not None:
        out["soft_labels"] = dset.soft_labels[order].float().contiguous()
    if "zca" in dset.attachments:
        z = dset.attachments["zca"]
        if "mean" not in z or "W" not in z:
            raise ArtifactError("the set's ZCA attachment lacks 'mean' or 'W'")
        out["zca_mean"] = z["mean"].float().contiguous()
        out["zca_W"] = z["W"].float().contiguous()
    return out


def ddranking_description(dset: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``ddranking.json``: what each tensor is and the ``compute_metrics`` call they fit."""
    info = dset.info
    ipc = dset.ipc[0]
    soft = "soft_labels" in tensors
    notes = []
    known = next((v for k, v in _DDRANKING_STATS.items() if info.name == k or info.name.startswith(k)), None)
    if known is not None and (tuple(round(v, 4) for v in info.mean), tuple(round(v, 4) for v in info.std)) != known:
        notes.append(f"DD-Ranking normalises its real {info.name} data with mean {known[0]}, std {known[1]}; these "
                     f"images use decoct's mean {tuple(info.mean)}, std {tuple(info.std)}: renormalise them first")
    if "zca_W" in tensors:
        notes.append("the set was distilled for ZCA-whitened inputs: whiten 'images' (and DD-Ranking's real data) "
                     "with zca_mean/zca_W after normalising, x' = (x.reshape(N, -1) - zca_mean) @ zca_W; "
                     "DD-Ranking's own use_zca fits its own whitening, which is not this one")
    if any(k.startswith("fkd") for k in dset.label_files):
        notes.append("not exported: the set's FKD label store (teacher logits of recorded crops, one row per view, "
                     "not per image); use DD-Ranking's soft_label_mode 'M' with the teacher instead")
    call = ("compute_metrics(image_tensor=images, soft_labels=soft_labels" if soft else
            "compute_metrics(image_tensor=images")
    call += f", syn_lr={float(dset.meta['syn_lr']):.6g})" if "syn_lr" in dset.meta else ")"
    return {
        "format": DDRANKING_FORMAT,
        "version": 1,
        "source": {"method": dset.method, "dataset": info.name, "image_storage": dset.image_storage},
        "dataset": info.to_dict(),
        "num_classes": info.num_classes,
        "ipc": ipc,
        "im_size": [info.height, info.width],
        "order": "class-major: rows c*ipc .. (c+1)*ipc-1 are class c (decoct's class order)",
        "normalize": {"mean": list(info.mean), "std": list(info.std),
                      "formula": "x[c] = (pixel[c] / 255 - mean[c]) / std[c]"},
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                    for k, t in tensors.items()},
        "soft_label_mode": "S (soft_labels are logits: DD-Ranking applies softmax(x / T))" if soft else
        "hard labels only: DD-Ranking's hard-label metrics, or its mode M with your teacher",
        "learned_lr": float(dset.meta["syn_lr"]) if "syn_lr" in dset.meta else None,
        "usage": ["from safetensors.torch import load_file",
                  f"t = load_file('{DDRANKING_TENSORS}')",
                  "images = t['images']" + ("; soft_labels = t['soft_labels']" if soft else ""),
                  call],
        "notes": notes,
    }


def export_ddranking(dset: Any, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``ddranking.safetensors`` + ``ddranking.json`` into ``out_dir`` (new, empty, or an earlier
    DD-Ranking export replaced with ``overwrite``), via a temporary directory so the export
    appears whole or not at all. Raises :class:`DDRankingExportError` for a set or target that
    cannot take it."""
    out = Path(out_dir)
    _check_target(out, overwrite)
    tensors = ddranking_tensors(dset)
    desc = ddranking_description(dset, tensors)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise DDRankingExportError(f"cannot export to {out}: cannot write in {parent} ({e.strerror or e}); "
                                   "choose a directory you can write to") from e
    try:
        (tmp / DDRANKING_TENSORS).write_bytes(tensors_to_bytes(tensors, {"format": DDRANKING_FORMAT}))
        (tmp / DDRANKING_JSON).write_text(json.dumps(desc, indent=2, allow_nan=False) + "\n", "utf-8")
        fsync_paths([tmp / DDRANKING_TENSORS, tmp / DDRANKING_JSON, tmp])
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DDRankingExportError(f"cannot export to {out}: {e.strerror or e} ({e.filename or out})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["DDRANKING_FORMAT", "DDRANKING_JSON", "DDRANKING_TENSORS", "DDRankingExportError", "ddranking_description",
           "ddranking_tensors", "export_ddranking"]
