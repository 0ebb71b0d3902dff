"""One GPU check of the ImageNet path: loader, recover, soft students, DM, multi-student engines; one JSON.

Why: a GPU is lent to a task by chance and for minutes (15 of device time, start-up included), so
what is worth knowing about decoct on a GPU is measured by one prepared command
(``benchmarks/gpu_check.sh``, under 8 minutes on one H200) that prints one JSON object:

* ``loader``: images/s of the streamed loader (CPU decode + the 'train' view in W DataLoader
  workers) against ``torchvision.io.decode_jpeg`` batched on the device (decode alone, and decode
  + the same view on the device), on an ImageNet-shaped tree of generated JPEGs;
* ``recover``: iterations/s of SRe2L, DWA and LPLD recover (their ImageNet presets' batching:
  SRe2L/DWA one image of each of up to 100 classes, LPLD one class's IPC images; DWA's K
  weight-adjustment steps in ``first_step_s``) with a ResNet-18 teacher at 224 px, made by
  ``squeeze --weights`` from a random-init torchvision state dict (nothing downloaded), and the
  extrapolated hours of an ImageNet-1K IPC-10 run at the presets' iterations;
* ``soft_student``: the time of one soft-protocol student epoch (LPLD's ImageNet recipe:
  ResNet-18, RandomResizedCrop + flip + CutMix, KL to an online teacher; the set's uint8 pixels
  on the device, normalised per batch);
* ``dm``: one DM iteration, decoct's against the plain per-class loop (benchmarks/bench_dm.py);
* ``multi_student``: R = 5 ConvNet-D3 students, each engine against ``sequential``
  (benchmarks/bench_multi_student.py's set-up).

DM and the multi-student engines run on random CIFAR-shaped data (speed does not depend on the
pixels; no dataset has to travel to the GPU machine). ``--cpu --tiny`` runs everything on the CPU
at tiny sizes in seconds (the test does). Every file goes to ``--work``; a section that fails is
recorded under ``errors`` and the others still run; sections past ``--budget-s`` are skipped.

    bash benchmarks/gpu_check.sh                 # on a GPU machine
    python benchmarks/gpu_check.py --cpu --tiny  # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # the bench_* modules imported below leave no __pycache__ in the repository
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SIZES: dict[str, dict[str, Any]] = {
    # one H200: tens of seconds a section
    "gpu": dict(classes=100, per_class=30, val_per_class=1, jpeg_size=None, image_size=224, batch_size=128,
                ipc=10, recover_warm=3, recover_iters=20, dwa_steps=None, soft_images=1000, dm_per_class=500,
                dm_ipc=10, dm_batch_real=256, dm_iters=5, ms_ipc=10, ms_epochs=20, ms_runs=2),
    # seconds on a CPU: every code path, tiny sizes
    "tiny": dict(classes=4, per_class=2, val_per_class=1, jpeg_size=(64, 48), image_size=112, batch_size=4,
                 ipc=2, recover_warm=1, recover_iters=2, dwa_steps=2, soft_images=8, dm_per_class=8,
                 dm_ipc=1, dm_batch_real=4, dm_iters=2, ms_ipc=1, ms_epochs=1, ms_runs=1),
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------
def section_loader(ctx: dict[str, Any]) -> dict[str, Any]:
    """Streamed loader (CPU decode, W workers) vs batched device decode, same files, same view."""
    import torch
    from torchvision.io import decode_jpeg

    from decoct.data.stream import StreamSplit, load_index
    from decoct.data.views import apply_view, view_generator

    s, dev, workers = ctx["s"], ctx["dev"], ctx["workers"]
    train, _ = load_index(ctx["tree"])
    n, bs, size = len(train), s["batch_size"], s["image_size"]
    split = StreamSplit(train, size, workers=workers)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        first, count, after = None, 0, 0
        for x, _, _ in split.loader("train", batch_size=bs, seed=0):
            count += len(x)
            x = x.to(dev, non_blocking=True)
            if first is None:
                first = time.perf_counter()
            else:
                after += len(x)
        sync(dev)
        end = time.perf_counter()
        runs.append(dict(img_s=count / (end - t0), steady_img_s=after / (end - first) if after and end > first else 0.0))
    cpu = max(runs, key=lambda r: r["img_s"])
    blobs = [torch.frombuffer(bytearray(train.path(i).read_bytes()), dtype=torch.uint8) for i in range(n)]
    decode_jpeg(blobs[:bs], device=dev)  # warm-up (CUDA decoder initialisation)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, n, bs):
        decode_jpeg(blobs[i:i + bs], device=dev)
    sync(dev)
    dec_s = time.perf_counter() - t0
    # file reading + device decode + the 'train' view on the device, as a device loader would do it
    t0 = time.perf_counter()
    for i in range(0, n, bs):
        raw = [torch.frombuffer(bytearray(train.path(j).read_bytes()), dtype=torch.uint8)
               for j in range(i, min(i + bs, n))]
        imgs = decode_jpeg(raw, device=dev)
        torch.stack([apply_view(im, "train", size, view_generator(0, i + k)) for k, im in enumerate(imgs)])
    sync(dev)
    view_s = time.perf_counter() - t0
    return dict(images=n, workers=workers, batch_size=bs, image_size=size, view="train",
                cpu_loader_img_s=round(cpu["img_s"], 2), cpu_loader_steady_img_s=round(cpu["steady_img_s"], 2),
                decode_device=str(dev), device_decode_img_s=round(n / dec_s, 2),
                device_decode_view_img_s=round(n / view_s, 2),
                ratio_device_decode_view_vs_cpu_loader=round((n / view_s) / cpu["img_s"], 3))


def make_teacher(ctx: dict[str, Any]) -> Path:
    """ResNet-18 teacher wrapped by ``squeeze --weights`` (random init) on the generated tree, in memory."""
    import torch
    import torchvision

    from decoct.decoupled.squeeze import squeeze

    s, work = ctx["s"], ctx["work"]
    weights = work / "resnet18-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=s["classes"]).state_dict(), weights)
    out = work / "teacher"
    t0 = time.perf_counter()
    squeeze("imagenet", "resnet18", out=out, weights=str(weights), data_root=str(ctx["tree"]),
            data_options=dict(data_mode="memory", workers=ctx["workers"], image_size=s["image_size"]),
            stats_batch_size=s["batch_size"], device=ctx["dev"], amp=ctx["amp"], channels_last=ctx["amp"],
            show_progress=False, force=True)
    ctx["teacher_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _timed_step(rec: Any, it: int, dev: Any) -> float:
    sync(dev)
    t0 = time.perf_counter()
    rec.step(it)
    sync(dev)
    return time.perf_counter() - t0


def section_recover(ctx: dict[str, Any]) -> dict[str, Any]:
    """Iterations/s of SRe2L, DWA and LPLD recover with their presets' batching."""
    from decoct.decoupled.recover import PRESETS, plan_batches, prepare

    s, dev = ctx["s"], ctx["dev"]
    teacher = ctx.get("teacher") or make_teacher(ctx)
    ctx["teacher"] = teacher
    out: dict[str, Any] = dict(teacher_seconds=ctx.get("teacher_seconds"), ipc=s["ipc"], amp=ctx["amp"],
                               channels_last=ctx["amp"], image_size=s["image_size"], classes=s["classes"])
    warm, iters = s["recover_warm"], s["recover_iters"]
    for method in ("sre2l", "dwa", "lpld"):
        extra = {} if s["dwa_steps"] is None or method != "dwa" else dict(dwa_steps=s["dwa_steps"])
        per_batch = warm + iters
        rec, data = prepare(method, teacher=str(teacher), ipc=s["ipc"], iterations=per_batch, amp=ctx["amp"],
                            channels_last=ctx["amp"], **extra)
        rec.init(data, dev)
        first = _timed_step(rec, 0, dev)
        for it in range(1, warm):
            rec.step(it)
        sync(dev)
        t0 = time.perf_counter()
        for it in range(warm, per_batch):
            rec.step(it)
        sync(dev)
        it_s = iters / (time.perf_counter() - t0)
        # a second batch's first step: the per-batch start (init, real images, DWA's K adjustment steps), warm
        start_s = max(0.0, _timed_step(rec, per_batch, dev) - 1 / it_s) if len(rec.mine) > 1 else None
        cfg = rec.config
        images = len(rec.mine[0].classes)
        # an ImageNet-1K IPC-10 run at this method's preset: batches x iterations at this rate
        pre = PRESETS[method]["imagenet"]
        batches = plan_batches(1000, 10, pre["batching"], pre["batch_size"])
        its_total = len(batches) * pre["iterations"]
        row = dict(it_s=round(it_s, 3), images_per_batch=images, image_iterations_per_s=round(it_s * images, 2),
                   first_step_s=round(first, 3), batch_start_s=None if start_s is None else round(start_s, 3),
                   batching=cfg.batching, dwa_steps=cfg.dwa_steps, imagenet_ipc10_batches=len(batches),
                   imagenet_ipc10_iterations=its_total)
        # the estimate needs this run's batch to be a full preset batch (and the real K of DWA)
        full = min(pre["batch_size"] or 10, 1000 if pre["batching"] == "ipc" else 10)
        if images == full and cfg.dwa_steps == pre["dwa_steps"] and start_s is not None:
            row["imagenet_ipc10_hours"] = round((its_total / it_s + len(batches) * start_s) / 3600, 2)
        out[method] = row
        del rec, data
    return out


def section_soft(ctx: dict[str, Any]) -> dict[str, Any]:
    """One soft-protocol student epoch (LPLD's ImageNet recipe, online teacher)."""
    import torch

    from decoct.formats.teacher import load_teacher_full
    from decoct.models import model_for
    from decoct.train.soft_students import RECIPES, FKDConfig, fill_value, train_fkd

    s, dev = ctx["s"], ctx["dev"]
    teacher_dir = ctx.get("teacher") or make_teacher(ctx)
    ctx["teacher"] = teacher_dir
    t = load_teacher_full(teacher_dir, dev, with_stats=False)
    info = t.info
    recipe = RECIPES["imagenet"]
    g = torch.Generator().manual_seed(0)
    n = s["soft_images"]
    images = torch.randint(0, 256, (n, *info.image_shape), dtype=torch.uint8, generator=g)  # a set's pixels
    cfg = FKDConfig.from_recipe(recipe, epochs=1, amp=ctx["amp"], channels_last=ctx["amp"])
    fill = fill_value(info, dev)

    def epoch(x: torch.Tensor) -> tuple[float, dict[str, Any]]:
        student = model_for(recipe.model, info)
        sync(dev)
        t0 = time.perf_counter()
        res = train_fkd(student, x, cfg, teacher=t.model, view=recipe.view, fill=fill, seed=0, device=dev, info=info)
        sync(dev)
        return time.perf_counter() - t0, res

    epoch(images[: min(n, 2 * (cfg.batch_size or 128))])  # warm-up: kernels, allocator
    secs, res = epoch(images)
    img_s = n / secs
    return dict(images=n, batch_size=cfg.batch_size, epoch_s=round(secs, 3), img_s=round(img_s, 2),
                steps=res["steps"], label_source=res["label_source"], recipe=recipe.name, amp=ctx["amp"],
                imagenet_ipc10_epoch_s=round(10_000 / img_s, 1),
                imagenet_ipc10_300_epochs_hours=round(300 * 10_000 / img_s / 3600, 2))


def _cifar_shaped(per_class: int, seed: int = 0) -> Any:
    import torch

    from decoct.data import Dataset, DatasetInfo, ImageSplit

    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo("random-cifar-shaped", tuple(str(c) for c in range(10)), 3, 32, 32,
                       (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    y = torch.arange(10).repeat_interleave(per_class)
    train = ImageSplit(torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g), y)
    test = ImageSplit(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    return Dataset(info, train, test)


def section_dm(ctx: dict[str, Any]) -> dict[str, Any]:
    """One DM iteration: decoct's DistributionMatching vs the plain per-class loop (bench_dm.PlainLoop)."""
    import torch
    from bench_dm import PlainLoop

    from decoct.matching.dm import DistributionMatching, DMConfig

    s, dev = ctx["s"], ctx["dev"]
    data = _cifar_shaped(s["dm_per_class"])
    torch.manual_seed(0)
    ours = DistributionMatching(DMConfig(ipc=s["dm_ipc"], batch_real=s["dm_batch_real"], iterations=10**6))
    ours.init(data, dev)
    ref = PlainLoop(data, ours.param.images, ours.param.labels.cpu(), s["dm_batch_real"], ours.cfg.width, dev)
    ours.step(0)
    ref.step()
    times: dict[str, list[float]] = {"reference": [], "decoct": []}
    for i in range(s["dm_iters"]):
        for name, fn in (("reference", ref.step), ("decoct", lambda i=i: ours.step(i + 1))):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(ipc=s["dm_ipc"], batch_real=s["dm_batch_real"], iters=s["dm_iters"],
                reference_s_per_it=round(med["reference"], 4), decoct_s_per_it=round(med["decoct"], 4),
                ratio_reference_vs_decoct=round(med["reference"] / med["decoct"], 3), real_chunk=ours.real_chunk,
                amp=ours.amp, channels_last=ours.channels_last)


def section_multi(ctx: dict[str, Any]) -> dict[str, Any]:
    """R = 5 ConvNet-D3 students per engine against sequential (bench_multi_student's set-up)."""
    from bench_multi_student import _augment, _subset

    from decoct.data import normalize
    from decoct.models import create_model
    from decoct.train import TrainConfig, fit_students, resolve_engine

    s, dev = ctx["s"], ctx["dev"]
    data = _cifar_shaped(max(s["ms_ipc"], 2))
    info = data.info
    idx = _subset(data.train.labels, s["ms_ipc"], info.num_classes, seed=0)
    x, y = normalize(data.train.images[idx], info), data.train.labels[idx]
    augment = _augment("color_crop_cutout_flip_scale_rotate")
    seeds = list(range(5))

    def factory():
        return create_model("convnetd3", info.num_classes, info.channels, info.height, width=128, norm="instance")

    engines: dict[str, Any] = {}
    for engine in ("sequential", "vmap", "grouped"):
        warm = TrainConfig(epochs=1, batch_size=256)
        fit_students(factory, x, y, warm, seeds=seeds, augment=augment, engine=engine, device=dev)
        cfg = TrainConfig(epochs=s["ms_epochs"], batch_size=256)
        best = float("inf")
        for _ in range(s["ms_runs"]):
            sync(dev)
            t0 = time.perf_counter()
            fit_students(factory, x, y, cfg, seeds=seeds, augment=augment, engine=engine, device=dev)
            sync(dev)
            best = min(best, time.perf_counter() - t0)
        engines[engine] = dict(seconds=round(best, 3), student_epochs_per_s=round(len(seeds) * s["ms_epochs"] / best, 2))
    seq = engines["sequential"]["seconds"]
    for row in engines.values():
        row["ratio_vs_sequential"] = round(seq / row["seconds"], 3)
    fastest = min(engines, key=lambda e: engines[e]["seconds"])
    return dict(students=len(seeds), ipc=s["ms_ipc"], epochs=s["ms_epochs"], engines=engines,
                auto_engine=resolve_engine("auto", factory(), dev), fastest=fastest,
                ratio_best_vs_sequential=engines[fastest]["ratio_vs_sequential"])


SECTIONS = {"loader": section_loader, "recover": section_recover, "soft_student": section_soft, "dm": section_dm,
            "multi_student": section_multi}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA; refused without it)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; with --cpu this is the test's run)")
    p.add_argument("--work", type=Path, default=Path("/tmp/decoct-gpu-check"), help="every file written goes here")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (default <work>/gpu_check.json)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the CPUs, at most 16)")
    p.add_argument("--budget-s", type=float, default=420.0, help="sections starting after this many seconds are skipped")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=None, help="run only these sections")
    p.add_argument("--keep", action="store_true", help="keep the generated tree and teacher in --work")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available here; pass --cpu (with --tiny for a quick run)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.cpu else "cuda")
    s = SIZES["tiny" if a.tiny else "gpu"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = a.workers or min(16, cpus)
    if a.tiny:
        workers = a.workers or 1
    work = a.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DECOCT_CACHE"] = str(work / "cache")  # the decoded/index caches stay in the work dir too
    res: dict[str, Any] = dict(
        device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        or platform.machine(), torch=torch.__version__, cpus=cpus, workers=workers, tiny=a.tiny, sizes=s,
        load_before=[round(v, 2) for v in os.getloadavg()], errors={}, skipped=[], seconds={})
    from imagenet_scale import build_tree

    tree = work / "tree"
    t0 = time.perf_counter()
    res["tree"] = build_tree(tree, s["classes"], s["per_class"], s["val_per_class"], size=s["jpeg_size"],
                             procs=min(cpus, s["per_class"]))
    res["seconds"]["tree"] = round(time.perf_counter() - t0, 2)
    ctx = dict(s=s, dev=dev, workers=workers, tree=tree, work=work, amp=dev.type == "cuda")
    from decoct.runtime.io import atomic_write_json

    out = a.out or work / "gpu_check.json"
    for name, fn in SECTIONS.items():
        if a.only and name not in a.only:
            continue
        if time.perf_counter() - t_start > a.budget_s:
            res["skipped"].append(name)
            log(f"{name}: skipped (past --budget-s {a.budget_s:.0f})")
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            res[name] = fn(ctx)
        except Exception as e:  # one broken section must not cost the others' numbers on a lent GPU
            res["errors"][name] = f"{type(e).__name__}: {e}"[:1000]
            log(f"{name} failed:\n{traceback.format_exc()}")
        res["seconds"][name] = round(time.perf_counter() - t0, 2)
        atomic_write_json(out, res)  # what is done so far survives a hard stop (gpu_check.sh's timeout)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda":
        res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    res["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    if not a.keep:
        for sub in ("tree", "teacher", "cache", "resnet18-random.pth"):
            target = work / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    atomic_write_json(out, res)
    print(json.dumps(res, separators=(",", ":"), default=lambda v: v if not isinstance(v, float) or math.isfinite(v)
                     else None))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
