"""DD-Ranking's scores (HLR, IOR, LRS, ARS) computed from students trained by decoct's own protocols.

DD-Ranking (NUS-HPC-AI-Lab, ``ddranking`` 0.2.0) reads a distilled set through four numbers; users
now compare sets by them. Their definitions, with every accuracy a **fraction in [0, 1]**
(docs/scores.md; ``../shared/reference/rded-scores-labels.md`` §2)::

    HLR = acc(real, hard) - acc(syn, hard)              hard-label recovery (lower is better)
    IOR = acc(syn, its labels) - acc(random real, same IPC, same labels and recipe)
                                                         improvement over random (higher is better)
    LRS = squash(lambda * IOR - (1 - lambda) * HLR)      label-robust score, lambda = 0.5
    ARS = squash(lambda * (syn_aug - rdm_aug) + (1 - lambda) * (syn_noaug - rdm_noaug))
                                                         augmentation-robust score, lambda = 0.5
    squash(a) = (e^a - e^-1) / (e - e^-1)                maps a in [-1, 1] onto [0, 1]

Per evaluation round (student seed ``seed + r``; the random subset of round ``r`` is drawn with
the same seed) the four are computed from that round's accuracies, then reported as the mean and
the population standard deviation over rounds, as DD-Ranking does (its LRS is averaged per round,
not recomputed from the mean HLR and IOR).

**Scale.** DD-Ranking's code multiplies accuracies by 100 before they enter the exponent, so its
``a`` is in percentage points: then ``squash`` no longer maps onto [0, 1] (``a = -5`` points is
already within 0.003 of the floor ``-e^-1 / (e - e^-1) = -0.1565``, anything above 1 point exceeds
1, and its own doc says the score lies in [0, 1]). decoct computes with fractions; every result
also carries the value DD-Ranking's code would print (``*_percent_fed``), since the two differ
whenever ``a != 0``.

Where decoct departs from DD-Ranking's procedure, and why: every student is seeded (its rounds
use a time-based seed), no learning rate is searched on the test set (its hard-label and random
runs keep the best of five learning rates by test accuracy, and the best test accuracy over
epochs): each student reports its final-epoch accuracy under the protocol's fixed recipe, so
nothing is chosen by looking at the test set. The full-data accuracy ``acc(real, hard)`` is
trained once per (dataset and its data, model, protocol recipe, epochs, seeds, ZCA) and cached
in ``$DECOCT_CACHE/scores/`` (DD-Ranking hard-codes two numbers for it).

The pure functions (:func:`squash`, :func:`hlr`, :func:`ior`, :func:`lrs`, :func:`ars`,
:func:`aggregate`) take plain floats; :func:`ddranking_scores` trains the students.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LRS_LAMBDA = 0.5
"""DD-Ranking's ``lrs_lambda`` default (weight of IOR against HLR)."""
ARS_LAMBDA = 0.5
"""DD-Ranking's ``ars_lambda`` default (weight of the gain with augmentation against without)."""
PERCENT = 100.0
"""The factor DD-Ranking's ``accuracy()`` applies before its scores are computed."""
CACHE_FORMAT = "decoct-full-data-accuracy"
CACHE_VERSION = 1
SCORE_PROTOCOLS = ("classic", "fast")

_FLOOR = -math.exp(-1.0) / (math.e - math.exp(-1.0))


# ---------------------------------------------------------------------- the formulas
def _fraction(value: float, what: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be an accuracy as a fraction in [0, 1], got {value!r} (a percentage? "
                         "divide by 100)")
    return v


def _difference(value: float, what: str) -> float:
    v = float(value)
    if not -1.0 <= v <= 1.0:
        raise ValueError(f"{what} must be a difference of two fractions, in [-1, 1], got {value!r} (percentage "
                         "points? divide by 100)")
    return v


def _lam(lam: float, what: str) -> float:
    v = float(lam)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {lam!r}")
    return v


def squash(a: float) -> float:
    """``(e^a - e^-1) / (e - e^-1)``: DD-Ranking's map from a score in [-1, 1] to [0, 1].

    ``a = 1 -> 1``, ``a = -1 -> 0``, ``a = 0 -> 0.2689``; monotone, so ranks are kept. Outside
    [-1, 1] (percent-fed input) it leaves [0, 1]: it tends to -0.1565 below and grows as ``e^a``
    above (``a > 709`` overflows a float; returned as ``inf``).
    """
    a = float(a)
    if a > 709.0:
        return math.inf
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def hlr(acc_real_hard: float, acc_syn_hard: float) -> float:
    """Hard-label recovery ``HLR = acc(real, hard) - acc(syn, hard)``, a fraction in [-1, 1].

    How far the set's images alone (hard labels) are from the full training set; lower is better.
    """
    return _fraction(acc_real_hard, "acc(real, hard)") - _fraction(acc_syn_hard, "acc(syn, hard)")


def ior(acc_syn_labels: float, acc_random_labels: float) -> float:
    """Improvement over random ``IOR = acc(syn, its labels) - acc(random real, same IPC, same labels
    and recipe)``, a fraction in [-1, 1]; higher is better (what the images add over real ones)."""
    return _fraction(acc_syn_labels, "acc(syn, its labels)") - _fraction(acc_random_labels, "acc(random real)")


def lrs(hlr_value: float, ior_value: float, lam: float = LRS_LAMBDA, *, scale: float = 1.0) -> float:
    """Label-robust score ``LRS = squash(scale * (lam * IOR - (1 - lam) * HLR))``.

    HLR and IOR are fractions; ``scale=1`` is the documented [0, 1] score, ``scale=100``
    (:data:`PERCENT`) what DD-Ranking's code computes (its accuracies are percentages).
    """
    h, i, lam = _difference(hlr_value, "HLR"), _difference(ior_value, "IOR"), _lam(lam, "lrs lambda")
    return squash(scale * (lam * i - (1.0 - lam) * h))


def ars(syn_aug: float, rdm_aug: float, syn_noaug: float, rdm_noaug: float, lam: float = ARS_LAMBDA, *,
        scale: float = 1.0) -> float:
    """Augmentation-robust score ``ARS = squash(scale * (lam * (syn_aug - rdm_aug) + (1 - lam) *
    (syn_noaug - rdm_noaug)))``: the set's gain over random real of the same IPC (same labels),
    trained with and without the protocol's augmentation; accuracies are fractions and
    ``scale=100`` gives DD-Ranking's code's value."""
    lam = _lam(lam, "ars lambda")
    gain_aug = _fraction(syn_aug, "acc(syn, aug)") - _fraction(rdm_aug, "acc(random, aug)")
    gain_noaug = _fraction(syn_noaug, "acc(syn, no aug)") - _fraction(rdm_noaug, "acc(random, no aug)")
    return squash(scale * (lam * gain_aug + (1.0 - lam) * gain_noaug))


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population std (``ddof=0``, as ``np.std`` in DD-Ranking)."""
    m = sum(values) / len(values)
    return {"mean": m, "std": math.sqrt(sum((v - m) ** 2 for v in values) / len(values))}


def aggregate(real_hard: Sequence[float], syn_hard: Sequence[float], syn_labels: Sequence[float],
              rdm_labels: Sequence[float], syn_noaug: Sequence[float] | None = None,
              rdm_noaug: Sequence[float] | None = None, *, lrs_lambda: float = LRS_LAMBDA,
              ars_lambda: float = ARS_LAMBDA) -> dict[str, Any]:
    """Scores from per-round accuracies (fractions; element ``r`` of every list is round ``r``).

    Returns, for ``hlr``, ``ior``, ``lrs``, ``lrs_percent_fed`` (and ``ars``, ``ars_percent_fed``
    when the no-augmentation accuracies are given): ``{"rounds": [...], "mean": m, "std": s}``,
    scores computed per round and then averaged (DD-Ranking's order), std with ``ddof=0``.
    """
    lists = [real_hard, syn_hard, syn_labels, rdm_labels] + ([syn_noaug, rdm_noaug] if syn_noaug is not None else [])
    if (syn_noaug is None) != (rdm_noaug is None):
        raise ValueError("ARS needs both syn_noaug and rdm_noaug (or neither)")
    n = len(real_hard)
    if n == 0 or any(len(v) != n for v in lists):  # type: ignore[arg-type]
        raise ValueError(f"every accuracy list needs one value per round; got lengths {[len(v) for v in lists]}")  # type: ignore[arg-type]
    h = [hlr(real_hard[r], syn_hard[r]) for r in range(n)]
    i = [ior(syn_labels[r], rdm_labels[r]) for r in range(n)]
    out: dict[str, Any] = {}

    def put(name: str, values: list[float]) -> None:
        out[name] = {"rounds": values, **_mean_std(values)}

    put("hlr", h)
    put("ior", i)
    put("lrs", [lrs(h[r], i[r], lrs_lambda) for r in range(n)])
    put("lrs_percent_fed", [lrs(h[r], i[r], lrs_lambda, scale=PERCENT) for r in range(n)])
    if syn_noaug is not None and rdm_noaug is not None:
        a = [ars(syn_labels[r], rdm_labels[r], syn_noaug[r], rdm_noaug[r], ars_lambda) for r in range(n)]
        ap = [ars(syn_labels[r], rdm_labels[r], syn_noaug[r], rdm_noaug[r], ars_lambda, scale=PERCENT)
              for r in range(n)]
        put("ars", a)
        put("ars_percent_fed", ap)
    out["lambda"] = {"lrs": lrs_lambda, "ars": ars_lambda}
    return out


# ---------------------------------------------------------------------- the full-data accuracy, cached
def _sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def full_data_key(dataset: Any, protocol: str, cfg: dict[str, Any], runs: int, seed: int,
                  zca_state: dict[str, torch.Tensor] | None = None, amp: bool = False) -> dict[str, Any]:
    """What ``acc(real, hard)`` depends on: the data itself (a hash of the train and test pixels and
    labels, so a changed copy of a dataset is a new key), the protocol and its whole recipe (model,
    epochs, lr, augmentation, ...), the student seeds, the ZCA whitening applied and the precision
    (float32, or bf16 autocast with ``amp``)."""
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "dataset": dataset.info.name,
        "data_sha256": _sha(dataset.train.images, dataset.train.labels, dataset.test.images, dataset.test.labels),
        "protocol": protocol, "model": cfg["model"], "epochs": cfg["epochs"],
        "recipe": _jsonable(cfg),
        "seeds": list(range(seed, seed + runs)),
        "zca_sha256": _sha(*(zca_state[k] for k in sorted(zca_state))) if zca_state else None,
        "amp": bool(amp),
    }


def cache_path(key: dict[str, Any]) -> Path:
    """``$DECOCT_CACHE/scores/full-<dataset>-<model>-<protocol>-e<epochs>-<hash>.json``."""
    from decoct.data.sources import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{key['dataset']}-{key['model']}")
    return cache_dir() / "scores" / f"full-{safe}-{key['protocol']}-e{key['epochs']}-{digest}.json"


def _read_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        accs = d["accuracies"]
        ok = (d.get("key") == key and isinstance(accs, list) and len(accs) == len(key["seeds"])
              and all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in accs))
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: unreadable cached full-data accuracy ({e}); training it again", stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"{path}: cached full-data accuracy does not match its key; training it again", stacklevel=3)
        return None
    return d


def full_data_accuracy(dataset: Any, protocol: str, cfg: dict[str, Any], *, runs: int, seed: int,
                       device: torch.device, engine: str = "auto", zca: Any = None, progress: bool = False,
                       use_cache: bool = True, amp: bool = False) -> dict[str, Any]:
    """``acc(real, hard)``: students trained on the whole training split with hard labels under
    ``cfg`` (seeds ``seed .. seed+runs-1``), final-epoch test accuracy. Read from the cache when
    the same key was trained before, else trained and written there atomically.

    Returns ``{"accuracies", "engine", "seconds", "cache": path, "cached": bool}``.
    """
    from decoct.evaluation import protocols
    from decoct.runtime.io import atomic_write_json

    zca_state = zca.state_dict() if zca is not None else None
    key = full_data_key(dataset, protocol, cfg, runs, seed, zca_state, amp)
    path = cache_path(key)
    if use_cache:
        hit = _read_cached(path, key)
        if hit is not None:
            return {"accuracies": [float(a) for a in hit["accuracies"]], "engine": hit.get("engine"),
                    "seconds": hit.get("seconds"), "cache": str(path), "cached": True}
    t0 = time.perf_counter()
    accs, used = protocols.train_and_test(dataset.train.images, dataset.train.labels, dataset, zca, cfg, runs, seed,
                                       device, engine, progress, amp=amp)
    seconds = round(time.perf_counter() - t0, 3)
    entry = {"key": key, "accuracies": [float(a) for a in accs], "engine": used, "seconds": seconds,
             "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, entry)
    return {"accuracies": entry["accuracies"], "engine": used, "seconds": seconds, "cache": str(path),
            "cached": False}


# ---------------------------------------------------------------------- training the students
def uniform_ipc(counts: Sequence[int], what: str) -> int:
    """The set's images per class, which must be the same for every class (DD-Ranking's random
    baseline, and its implicit labels ``repeat_interleave(arange(C), ipc)``, assume so)."""
    if len(set(counts)) != 1 or counts[0] < 1:
        raise ValueError(f"{what} has {list(counts)} images per class; DD-Ranking's scores and interchange form "
                         "need the same number of images in every class")
    return int(counts[0])


def _teacher_logits(model: torch.nn.Module, images: torch.Tensor, info: Any, device: torch.device) -> torch.Tensor:
    """Logits of the teacher (in eval mode) on un-augmented images (DD-Ranking's mode S labels for
    random real)."""
    from decoct.data import normalize

    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            out.append(model(normalize(images[start:start + 256], info, device)).float().cpu())
    return torch.cat(out)


def ddranking_scores(artifact: str | Path, protocol: str = "classic", *, runs: int = 5, seed: int = 0,
                     dataset: Any = None, data_root: str | None = None, download: bool = False,
                     device: str = "auto", engine: str = "auto", progress: bool = True, teacher: Any = None,
                     augmentation: bool = True, use_cache: bool = True, data_options: dict[str, Any] | None = None,
                     amp: bool = False, **overrides: Any) -> dict[str, Any]:
    """Train every student DD-Ranking's scores need, under a ``classic``/``fast`` protocol, and score.

    Students (``runs`` rounds, round ``r`` seeded ``seed + r``):

    - ``syn_labels``: the set with its own labels (soft logits when it carries them) and its own
      recipe (its learned lr), exactly as :func:`decoct.evaluation.protocols.evaluate` trains it;
    - ``syn_hard``: the set with its hard labels, same recipe (the same students when the set's
      labels are hard);
    - ``real_hard``: the whole training split, hard labels, the protocol's recipe (cached:
      :func:`full_data_accuracy`);
    - ``random``: ``ipc`` random real images per class, a fresh subset per round
      (:func:`decoct.coreset.select.random_baseline_indices` with the round's seed), labelled as
      the set is (hard; or the ``teacher``'s logits on the un-augmented images when the set carries
      soft labels, DD-Ranking's mode S), the protocol's recipe;
    - with ``augmentation`` (for ARS), ``syn_labels`` and ``random`` again with the protocol's
      augmentation off.

    Returns ``{"set": the set's result (an :class:`~decoct.evaluation.protocols.EvalResult` as a dict,
    its ``syn_labels`` students), "scores": aggregate(...), "accuracies": {...}, ...}`` (docs/scores.md).
    """
    from decoct.augment import ZCA
    from decoct.coreset.select import random_baseline_indices
    from decoct.data import is_streamed
    from decoct.evaluation import protocols
    from decoct.formats.artifact import DistilledSet
    from decoct.runtime.distributed import resolve_device

    if protocol not in SCORE_PROTOCOLS:
        raise ValueError(f"DD-Ranking scores are computed under the {' or '.join(SCORE_PROTOCOLS)} protocol, not "
                         f"{protocol!r}: the soft protocol's students have no hard-label or no-augmentation "
                         "variant to score against (use --protocol classic or fast)")
    cfg = protocols.protocol_config(protocol, **overrides)
    if cfg["augment"] == "none" and augmentation:
        raise ValueError("ARS compares training with and without augmentation, and this recipe has none "
                         "(augment='none'): keep the protocol's augmentation, or skip ARS (augmentation=False)")
    dev = resolve_device(device)
    amp = protocols.student_precision(amp, dev)[0]  # --amp off CUDA fails here, before anything loads
    path = Path(artifact)
    dset = DistilledSet.load(path)
    ipc = uniform_ipc(dset.ipc, f"the set {path}")
    soft = dset.soft_labels is not None
    if soft and teacher is None:
        raise ValueError(f"the set {path} carries soft labels (logits): IOR compares it with random real images "
                         "labelled the same way, which needs a teacher to label them (pass --teacher DIR)")
    if not soft and teacher is not None:
        raise ValueError(f"the set {path} has hard labels only, so random real images get hard labels too; "
                         "--teacher is for sets that carry soft labels (drop it)")
    dataset = protocols.dataset_for_set(dset, path, dataset, data_root=data_root, download=download,
                                        data_options=data_options)
    if is_streamed(dataset):
        raise ValueError(f"the {protocol!r} protocol trains and tests in memory, and the full-data accuracy trains "
                         "on the whole training split: this dataset is streamed from disk (use --data-mode memory "
                         "if it fits)")
    zca = ZCA.from_state_dict(dset.attachments["zca"]) if "zca" in dset.attachments else None
    set_cfg = dict(cfg)
    recipe_note = "the protocol's recipe"
    if "syn_lr" in dset.meta and overrides.get("lr") is None:
        set_cfg["lr"] = float(dset.meta["syn_lr"])
        recipe_note = f"the protocol's recipe with the set's learned lr {set_cfg['lr']:.4g}"
    noaug = {"augment": "none"}
    tmodel = None
    if soft:  # loaded and checked once, before any student trains
        from decoct.data import normalize
        from decoct.decoupled.relabel import check_teacher_output, resolve_teacher

        tmodel, _ = resolve_teacher(teacher, dataset.info, dev)
        check_teacher_output(tmodel, normalize(dset.images[:2], dataset.info, dev), dataset.info.num_classes)

    def train(images: torch.Tensor, targets: torch.Tensor, c: dict[str, Any], n: int, s: int) -> tuple[list[float],
                                                                                                        str]:
        return protocols.train_and_test(images, targets, dataset, zca, c, n, s, dev, engine, progress, amp=amp)

    t0 = time.perf_counter()
    targets = dset.soft_labels if soft else dset.labels
    syn_labels, used = train(dset.images, targets, set_cfg, runs, seed)
    syn_hard = train(dset.images, dset.labels, set_cfg, runs, seed)[0] if soft else list(syn_labels)
    syn_noaug = train(dset.images, targets, {**set_cfg, **noaug}, runs, seed)[0] if augmentation else None
    real = full_data_accuracy(dataset, protocol, cfg, runs=runs, seed=seed, device=dev, engine=engine, zca=zca,
                              progress=progress, use_cache=use_cache, amp=amp)
    rdm: list[float] = []
    rdm_noaug: list[float] = []
    for r in range(runs):
        idx = random_baseline_indices(dataset, ipc, seed + r)
        images = dataset.train.images[idx]
        rt = _teacher_logits(tmodel, images, dataset.info, dev) if tmodel is not None else dataset.train.labels[idx]
        rdm += train(images, rt, cfg, 1, seed + r)[0]
        if augmentation:
            rdm_noaug += train(images, rt, {**cfg, **noaug}, 1, seed + r)[0]
    scores = aggregate(real["accuracies"], syn_hard, syn_labels, rdm, syn_noaug,
                       rdm_noaug if augmentation else None)
    accuracies: dict[str, Any] = {"real_hard": real["accuracies"], "syn_hard": syn_hard, "syn_labels": syn_labels,
                                  "random_labels": rdm}
    if augmentation:
        accuracies.update(syn_labels_noaug=syn_noaug, random_labels_noaug=rdm_noaug)
    disk_bytes, raw_bytes = protocols.hard_protocol_storage(dset, path, dset.storage(path))
    extra: dict[str, Any] = {"labels": "soft" if soft else "hard", "amp": amp}
    if set_cfg["lr"] != cfg["lr"]:
        extra["lr"] = f"learned syn_lr {set_cfg['lr']:.4g}"
    the_set = protocols.EvalResult(protocol, cfg["model"], list(syn_labels), disk_bytes, raw_bytes,
                                   time.perf_counter() - t0, len(dset), used, cfg["epochs"], extra=extra)
    return {
        "set": the_set.to_dict(),
        "scores": scores,
        "accuracies": {k: {"rounds": v, **_mean_std(v)} for k, v in accuracies.items()},
        "protocol": protocol, "model": cfg["model"], "epochs": cfg["epochs"], "runs": runs,
        "seeds": list(range(seed, seed + runs)), "ipc": ipc, "engine": used, "amp": amp,
        "labels": "soft (the set's logits; random real: the teacher's logits on un-augmented images)" if soft
        else "hard",
        "set_recipe": recipe_note,
        "augmentation": cfg["augment"] if augmentation else None,
        "full_data": {"cache": real["cache"], "cached": real["cached"], "engine": real["engine"],
                      "seconds": real["seconds"]},
        "accuracy_scale": "fractions in [0, 1]; *_percent_fed = DD-Ranking's code (accuracies x 100 in the exponent)",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def format_scores(res: dict[str, Any]) -> list[str]:
    """The lines ``decoct evaluate --scores ddranking`` prints: each accuracy in %, each score with
    DD-Ranking's percent-fed value beside it (they differ whenever the exponent is not 0)."""
    acc, s = res["accuracies"], res["scores"]

    def pct(d: dict[str, Any]) -> str:
        return f"{100 * d['mean']:6.2f} ± {100 * d['std']:5.2f} %"

    def score(name: str) -> str:
        d, p = s[name], s[f"{name}_percent_fed"]
        same = all(math.isclose(a, b, abs_tol=5e-5) for a, b in zip(d["rounds"], p["rounds"], strict=True))
        tail = "(DD-Ranking's code gives the same)" if same else \
            f"(DD-Ranking's code, percent-fed: {p['mean']:.4f} ± {p['std']:.4f})"
        return f"  {name.upper()}  {d['mean']:.4f} ± {d['std']:.4f}   {tail}"

    full = res["full_data"]
    where = f"read from cache {full['cache']}" if full["cached"] else f"trained, cached in {full['cache']}"
    def row(label: str, key: str, note: str = "") -> str:
        return f"  {label:<30} {pct(acc[key])}" + (f"  ({note})" if note else "")

    lines = [f"DD-Ranking scores ({res['protocol']} protocol, {res['model']}, {res['epochs']} epochs, "
             f"{res['runs']} round{'s' if res['runs'] != 1 else ''}, seeds {res['seeds'][0]}-{res['seeds'][-1]}; "
             f"labels: {res['labels']}; scores from accuracies as fractions):",
             row("acc(real, hard)", "real_hard", f"whole training split; {where}"),
             row("acc(syn, hard)", "syn_hard"),
             row("acc(syn, its labels)", "syn_labels"),
             row(f"acc(random real, ipc {res['ipc']})", "random_labels",
                 "a fresh subset per round, same labels and recipe")]
    if "syn_labels_noaug" in acc:
        lines += [row("acc(syn, its labels, no aug)", "syn_labels_noaug"),
                  row("acc(random real, no aug)", "random_labels_noaug")]
    lines += [f"  HLR  {s['hlr']['mean']:+.4f} ± {s['hlr']['std']:.4f}   (acc(real, hard) - acc(syn, hard); lower is "
              "better)",
              f"  IOR  {s['ior']['mean']:+.4f} ± {s['ior']['std']:.4f}   (acc(syn, its labels) - acc(random real); "
              "higher is better)",
              score("lrs")]
    if "ars" in s:
        lines.append(score("ars"))
    return lines


__all__ = ["ARS_LAMBDA", "LRS_LAMBDA", "PERCENT", "SCORE_PROTOCOLS", "aggregate", "ars", "ddranking_scores",
           "format_scores", "full_data_accuracy", "hlr", "ior", "lrs", "squash", "uniform_ipc"]
