"""ImageNet-1K shapes on this CPU: memory and time of the streaming path, per stage, for N images per class.

Why: the streamed data path (:mod:`decoct.data.stream`) must keep every stage's memory independent
of the split's size (ImageNet-1K decoded at 224 px is ~193 GB) and its loader must decode nearly as
fast as the same number of plain processes. This builds ImageNet-shaped trees
(:func:`decoct.data.fake_imagenet.make_tree`: 1,000 ``n########`` classes, JPEGs of ImageNet's size
mix around 500 x 375) with N = 2 and N = 8 train images per class and measures, each stage in its
own process (so peak RSS and wall time are the stage's alone):

* index build, cold (an empty ``$DECOCT_CACHE``) and warm (the cached index);
* the class-statistics pass: ``decoct squeeze --weights FILE`` (a random-init torchvision ResNet-18
  state dict saved with ``torch.save``; nothing downloaded), streamed, which also validates once
  (its ``stats_seconds`` / ``val_seconds`` come from teacher.json);
* validation over the val split (:func:`decoct.train.trainer.evaluate_split`, streamed);

then, in one process each: the loader's decode+transform rate (``StreamSplit.loader``, W workers,
the 'train' view, one whole pass from the workers' start) against W fresh plain
``multiprocessing`` processes doing ``decode_file`` + ``apply_view`` on the same files, also from
their start (alternated, best of each; both again warm, as a second figure), torchvision.io
against PIL decoding in one process, and a 2-process torchrun statistics pass compared with a
1-process one (both one thread per process, so they run the same kernels). Last, the tiny
end-to-end run (``--e2e-classes``, on the smallest tree): squeeze, ``distill lpld`` (IPC 1),
``relabel --prune 10``, ``evaluate --protocol soft``, each its own stage.

Peak RSS per stage: the stage process's own high-water mark (VmHWM, sampled from /proc every
0.1 s), the largest of its DataLoader workers' (same), the peak of the whole process tree's summed
RSS and PSS (sampled), and ``wait4``'s ``ru_maxrss`` (exact: the largest single process of the tree).

**Timings mean something only on an otherwise idle machine**: the JSON records the load average
before and after. The OS page cache is warm for every stage (the trees were just written, or
read by an earlier stage); "cold" index means decoct's index cache only.

    python benchmarks/imagenet_scale.py                     # 1,000 classes, N = 2 and 8 (idle machine)
    python benchmarks/imagenet_scale.py --quick             # 20 classes, N = 2 and 3 (seconds to a minute)

Writes ``<work>/imagenet_scale.json`` (``--work``, default /tmp/decoct-imagenet-bench) and prints a
markdown table. Trees, weights and teachers are kept in the work directory and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
DEFAULT_WORK = Path("/tmp/decoct-imagenet-bench")
MB = 2**20

PRESETS: dict[str, dict[str, Any]] = {
    # the issue's benchmark: ImageNet-1K's classes, N = 2 and 8, JPEGs of ImageNet's size mix
    "full": dict(classes=1000, n=[2, 8], val_per_class=2, jpeg_size=None, image_size=224, rate_images=4000,
                 batch_size=64, decode_images=400),
    # a check that every stage runs and reports (tens of seconds on 2 cores)
    "quick": dict(classes=20, n=[2, 3], val_per_class=2, jpeg_size=None, image_size=224, rate_images=60,
                  batch_size=16, decode_images=40),
    # the test's size: small JPEGs, small views (seconds)
    "tiny": dict(classes=4, n=[1, 2], val_per_class=1, jpeg_size=(64, 48), image_size=224, rate_images=12,
                 batch_size=2, decode_images=12),
}


def decoct_cli() -> list[str]:
    """The decoct command through this interpreter (works where the ``decoct`` script is not installed)."""
    return [sys.executable, "-m", "decoct.cli"]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment plus ``src/`` on PYTHONPATH (an uninstalled checkout) and ``extra``."""
    env = dict(os.environ)
    src = str(HERE.parent.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# trees


def _make_part(args: tuple) -> int:
    from decoct.data.fake_imagenet import make_tree

    dst, classes, per_class, val_per_class, seed, size = args
    return make_tree(dst, classes, per_class, val_per_class, seed, size)


def build_tree(dst: Path, classes: int, per_class: int, val_per_class: int, *, seed: int = 0,
               size: tuple[int, int] | None = None, procs: int = 1) -> dict[str, Any]:
    """An ImageNet-shaped tree at ``dst`` (reused when ``dst/tree.json`` records the same parameters).

    ``procs`` > 1 splits each class's images over that many processes, each writing a
    :func:`~decoct.data.fake_imagenet.make_tree` part with its own seed, then moves the parts'
    files into one tree (``<wnid>_<i>.JPEG``, i counted over the parts). Returns what was done.
    """
    from decoct.runtime.io import atomic_write_json

    params = dict(classes=classes, per_class=per_class, val_per_class=val_per_class, seed=seed,
                  size=list(size) if size else None)
    marker = dst / "tree.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                return dict(reused=True, seconds=0.0, files=classes * (per_class + val_per_class))
        except (OSError, ValueError):
            pass
    if dst.exists():
        shutil.rmtree(dst)
    t0 = time.perf_counter()
    procs = max(1, min(procs, per_class))
    if procs == 1:
        files = _make_part((str(dst), classes, per_class, val_per_class, seed, size))
    else:
        import multiprocessing as mp

        from decoct.data.fake_imagenet import wnid

        share = [per_class // procs + (1 if j < per_class % procs else 0) for j in range(procs)]
        vshare = [val_per_class // procs + (1 if j < val_per_class % procs else 0) for j in range(procs)]
        parts = [dst / ".parts" / str(j) for j in range(procs)]
        jobs = [(str(parts[j]), classes, share[j], max(1, vshare[j]), seed * 1000 + j, size) for j in range(procs)]
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_make_part, jobs)
        files = 0
        for split, counts in (("train", share), ("val", vshare)):
            for k in range(classes):
                folder = dst / split / wnid(k)
                folder.mkdir(parents=True, exist_ok=True)
                i = 0
                for j, cnt in enumerate(counts):
                    for m in range(cnt):
                        os.replace(parts[j] / split / wnid(k) / f"{wnid(k)}_{m}.JPEG", folder / f"{wnid(k)}_{i}.JPEG")
                        i += 1
                        files += 1
        shutil.rmtree(dst / ".parts")
    atomic_write_json(marker, {"params": params})
    return dict(reused=False, seconds=round(time.perf_counter() - t0, 2), files=files)


def make_weights(path: Path, classes: int) -> Path:
    """A random-init torchvision ResNet-18 state dict (``classes`` outputs) saved with ``torch.save``."""
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# measuring one stage's process tree


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (/proc/<pid>/task/*/children, else a scan of every /proc/*/stat)."""
    try:
        out: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        return out
    except OSError:
        pass
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the process tree under ``root`` every ``interval`` s: per-process VmHWM, summed RSS/PSS."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.hwm: dict[int, int] = {}
        self.peak_sum_rss = self.peak_sum_pss = 0
        self.samples = 0
        self._halt = threading.Event()

    def _tree(self) -> list[int]:
        out, todo = [], [self.root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += _children(p)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            rss = pss = 0
            for p in self._tree():
                st = _status_kb(p)
                if not st:
                    continue
                self.hwm[p] = max(self.hwm.get(p, 0), st.get("VmHWM", 0))
                rss += st.get("VmRSS", 0)
                pss += _pss_kb(p)
            self.peak_sum_rss = max(self.peak_sum_rss, rss)
            self.peak_sum_pss = max(self.peak_sum_pss, pss)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_stage(name: str, cmd: list[str], *, env: dict[str, str], log: Path, result: Path | None = None,
              timeout: float = 7200) -> dict[str, Any]:
    """Run ``cmd`` as its own process; its wall time, exit code, peak memory and (if any) ``result`` JSON."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if result is not None and result.exists():
        result.unlink()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    workers = {p: v for p, v in sampler.hwm.items() if p != proc.pid}
    row: dict[str, Any] = dict(
        stage=name, rc=proc.returncode, wall_s=round(wall, 3),
        max_process_rss_mb=round(usage.ru_maxrss / 1024, 1),  # wait4: the largest process of the tree, exact
        main_peak_rss_mb=round(sampler.hwm.get(proc.pid, 0) / 1024, 1),
        worker_peak_rss_mb=round(max(workers.values(), default=0) / 1024, 1),
        child_processes=len(workers),
        tree_peak_rss_sum_mb=round(sampler.peak_sum_rss / 1024, 1),
        tree_peak_pss_sum_mb=round(sampler.peak_sum_pss / 1024, 1),
        samples=sampler.samples, log=str(log),
    )
    lines = log.read_text(errors="replace").strip().splitlines()
    row["last_line"] = lines[-1][-300:] if lines else ""
    if proc.returncode != 0:
        row["error"] = " | ".join(lines[-5:])[-800:]
    elif result is not None:
        row["result"] = json.loads(result.read_text())
    return row


# ---------------------------------------------------------------------------------------------
# stage bodies (run in their own process: ``imagenet_scale.py _stage NAME ...``)


def _emit(path: str, obj: dict[str, Any]) -> None:
    from decoct.runtime.io import atomic_write_json

    atomic_write_json(Path(path), obj)


def stage_index(a: argparse.Namespace) -> None:
    from decoct.data.stream import load_index

    t0 = time.perf_counter()
    train, val = load_index(Path(a.root))
    _emit(a.result, dict(train=len(train), val=len(val), classes=len(train.classes),
                         seconds=round(time.perf_counter() - t0, 3)))


def stage_validate(a: argparse.Namespace) -> None:
    import torch

    from decoct.data import load_dataset
    from decoct.formats.teacher import load_teacher
    from decoct.train.trainer import evaluate_split

    model, _, _ = load_teacher(a.teacher, "cpu")
    data = load_dataset("imagenet", root=a.root, data_mode="stream", workers=a.workers, image_size=a.image_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        acc = evaluate_split(model, data.test, data.info, a.batch_size, "cpu", workers=a.workers)
    _emit(a.result, dict(images=len(data.test), accuracy=acc, seconds=round(time.perf_counter() - t0, 3)))


_POOL_STATE: dict[str, Any] = {}


def _pool_init(size: int) -> None:
    import torch
    from torchvision.transforms.v2 import functional  # noqa: F401  (imported before timing, as a warm worker)

    torch.set_num_threads(1)
    _POOL_STATE["size"] = size


def _pool_noop(_: int) -> int:
    return os.getpid()


def _pool_decode_view(item: tuple[int, str]) -> int:
    from decoct.data.stream import decode_file
    from decoct.data.views import apply_view, view_generator

    pos, path = item
    img = decode_file(Path(path))
    out = apply_view(img, "train", _POOL_STATE["size"], view_generator(0, pos))
    return int(out.shape[-1])


def stage_rates(a: argparse.Namespace) -> None:
    """Loader vs plain processes (decode + 'train' view), and torchvision.io vs PIL decoding."""
    import io
    import multiprocessing as mp

    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from decoct.data.stream import StreamSplit, load_index

    torch.set_num_threads(1)
    train, _ = load_index(Path(a.root))
    n = min(a.images, len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    split = StreamSplit(train, a.image_size, workers=a.workers)
    paths = [str(train.path(int(i))) for i in order]

    def loader_pass() -> dict[str, Any]:
        t0 = time.perf_counter()
        first, count, after_first = None, 0, 0
        for x, _, _ in split.loader("train", batch_size=a.batch_size, order=order, seed=0):
            count += len(x)
            if first is None:
                first = time.perf_counter()
            else:
                after_first += len(x)
        end = time.perf_counter()
        # images after the first batch over the time since it came (None for a one-batch pass); it
        # over-states the rate by up to W - 1 batches finishing with the first: read it on long passes only
        steady = after_first / (end - first) if first is not None and end > first and after_first else None
        return dict(img_s=count / (end - t0), steady_img_s=steady, first_batch_s=(first or end) - t0)

    chunk = max(1, n // (a.workers * 8))
    items = list(enumerate(paths))
    loader_runs, raw_cold, raw_warm = [], [], []
    for _ in range(a.reps):
        # W fresh plain processes from their start (fork, imports) to the last image: what the loader's
        # W workers do in one pass; then the same processes again, warm
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(a.workers, initializer=_pool_init, initargs=(a.image_size,)) as pool:
            pool.map(_pool_decode_view, items, chunksize=chunk)
            raw_cold.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            pool.map(_pool_decode_view, items, chunksize=chunk)
            raw_warm.append(n / (time.perf_counter() - t0))
        loader_runs.append(loader_pass())
    loader = max(r["img_s"] for r in loader_runs)
    steadies = [r["steady_img_s"] for r in loader_runs if r["steady_img_s"]]
    steady = max(steadies) if steadies else None
    # decoding alone, one process, bytes already in memory
    blobs = [Path(p).read_bytes() for p in paths[: a.decode_images]]
    tv_t = pil_t = float("inf")
    for rnd in range(a.reps + 1):  # round 0 warms both decoders up (lazy imports, plugins) and is dropped
        t0 = time.perf_counter()
        for b in blobs:
            decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
        tv_dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                arr = np.asarray(im.convert("RGB"))
            torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        pil_dt = time.perf_counter() - t0
        if rnd:
            tv_t, pil_t = min(tv_t, tv_dt), min(pil_t, pil_dt)
    _emit(a.result, dict(
        images=n, workers=a.workers, batch_size=a.batch_size, view="train", image_size=a.image_size, reps=a.reps,
        loader_img_s=round(loader, 2), raw_pool_img_s=round(max(raw_cold), 2),
        ratio_loader_vs_raw=round(loader / max(raw_cold), 3),
        loader_steady_img_s=None if steady is None else round(steady, 2), raw_pool_warm_img_s=round(max(raw_warm), 2),
        ratio_loader_steady_vs_raw_warm=None if steady is None else round(steady / max(raw_warm), 3),
        loader_first_batch_s=round(min(r["first_batch_s"] for r in loader_runs), 3),
        loader_runs=loader_runs, raw_pool_runs=[round(r, 2) for r in raw_cold],
        raw_pool_warm_runs=[round(r, 2) for r in raw_warm],
        decode_images=len(blobs), torchvision_decode_img_s=round(len(blobs) / tv_t, 2),
        pil_decode_img_s=round(len(blobs) / pil_t, 2), ratio_torchvision_vs_pil=round(pil_t / tv_t, 3),
    ))


STAGES = {"index": stage_index, "validate": stage_validate, "rates": stage_rates}


def stage_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="imagenet_scale.py _stage")
    p.add_argument("name", choices=sorted(STAGES))
    p.add_argument("--root", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--teacher")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--decode-images", type=int, default=200)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(argv)
    STAGES[a.name](a)
    return 0


# ---------------------------------------------------------------------------------------------
# the benchmark


def squeeze_cmd(tree: Path, weights: Path, out: Path, a: argparse.Namespace, workers: int) -> list[str]:
    """``decoct squeeze --weights`` on the streamed tree (no training: one validation and one statistics pass)."""
    return [*decoct_cli(), "squeeze", "--dataset", "imagenet", "--data-root", str(tree), "--model", "resnet18",
            "--weights", str(weights), "--out", str(out), "--data-mode", "stream", "--workers", str(workers),
            "--stats-batch-size", str(a.batch_size), "--device", "cpu", "--no-progress", "--force"]


def end_to_end(work: Path, tag: str, tree: Path, weights: Path, a: argparse.Namespace,
               workers: int) -> list[dict[str, Any]]:
    """The issue's tiny end-to-end run, each command its own stage: squeeze (a class range), lpld
    (IPC 1, a few iterations), relabel --prune 10, evaluate --protocol soft (streamed test split)."""
    cli, d = decoct_cli(), work / f"e2e-{tag}"
    common = ["--device", "cpu", "--no-progress"]
    teacher, run = d / "teacher", d / "lpld"
    steps = [
        (f"e2e squeeze --classes {a.e2e_classes}", [*cli, "squeeze", "--dataset", "imagenet", "--data-root", str(tree),
                                                    "--model", "resnet18", "--weights", str(weights), "--out",
                                                    str(teacher), "--data-mode", "stream", "--workers", str(workers),
                                                    "--classes", a.e2e_classes, "--force", *common]),
        ("e2e distill lpld --ipc 1", [*cli, "distill", "lpld", "--teacher", str(teacher), "--ipc", "1", "--iterations",
                                      "2", "--out", str(run), "--workers", str(workers), "--force", *common]),
        ("e2e relabel --prune 10", [*cli, "relabel", str(run), "--teacher", str(teacher), "--epochs", "10",
                                    "--prune", "10", *common]),
        ("e2e evaluate --protocol soft", [*cli, "evaluate", str(run), "--protocol", "soft", "--runs", "1", "--epochs",
                                          "2", "--workers", str(workers), *common]),
    ]
    if d.exists():
        shutil.rmtree(d)
    env = child_env(DECOCT_CACHE=str(work / f"cache-{tag}-e2e"))
    rows = []
    for i, (name, cmd) in enumerate(steps):
        rows.append(run_stage(name, cmd, env=env, log=work / "logs" / f"{tag}-e2e-{i}.log"))
        print(f"{name:<32} rc={rows[-1]['rc']} {rows[-1]['wall_s']:8.2f}s  {rows[-1]['last_line'][:120]}", flush=True)
        if rows[-1]["rc"]:
            break
    return rows


def compare_stats(one: Path, two: Path) -> dict[str, Any]:
    """Max absolute difference of every tensor of two ``bn_stats.safetensors`` files."""
    from safetensors.torch import load_file

    a, b = load_file(str(one)), load_file(str(two))
    if set(a) != set(b):
        return dict(equal=False, same_keys=False, max_abs_diff=None)
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
    worst = max(diffs, key=diffs.get)
    by_stat: dict[str, float] = {}
    for k, d in diffs.items():
        stat = k.rsplit(".", 1)[-1]
        by_stat[stat] = max(by_stat.get(stat, 0.0), d)
    return dict(equal=all(torch_equal(a[k], b[k]) for k in a), same_keys=True, max_abs_diff=diffs[worst],
                worst_key=worst, max_abs_diff_by_stat=by_stat, tensors=len(a))


def torch_equal(x: Any, y: Any) -> bool:
    import torch

    return bool(torch.equal(x, y))


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    lines = [f"ImageNet-shaped trees, {res['classes']} classes, workers {res['workers']}, "
             f"{res['cpu_count']} CPUs, load average before {res['load_before']} after {res['load_after']}",
             "", "| N | train imgs | stage | wall s | main peak RSS MB | worker peak RSS MB | tree RSS sum MB "
             "| tree PSS sum MB | rc |", "|---|---|---|---|---|---|---|---|---|"]
    for n, per in res["per_n"].items():
        for row in per["stages"]:
            lines.append(f"| {n} | {per['train_images']:,} | {row['stage']} | {fmt(row['wall_s'], 2)} | "
                         f"{fmt(row['main_peak_rss_mb'])} | {fmt(row['worker_peak_rss_mb'])} | "
                         f"{fmt(row['tree_peak_rss_sum_mb'])} | {fmt(row['tree_peak_pss_sum_mb'])} | {row['rc']} |")
    r = res.get("rates", {}).get("result")
    if r:
        w = r["workers"]
        lines += ["", f"| rate (images/s, {r['images']:,} images, 'train' view at {r['image_size']} px) | value |",
                  "|---|---|",
                  f"| loader, {w} workers, whole pass from the workers' start | {fmt(r['loader_img_s'])} |",
                  f"| {w} plain processes, decode + view, from their start | {fmt(r['raw_pool_img_s'])} |",
                  f"| ratio loader / plain processes | {fmt(r['ratio_loader_vs_raw'], 3)} |",
                  f"| loader after its first batch / the plain processes warm | {fmt(r['loader_steady_img_s'])} / "
                  f"{fmt(r['raw_pool_warm_img_s'])} = {fmt(r['ratio_loader_steady_vs_raw_warm'], 3)} |",
                  f"| torchvision.io decode, 1 process | {fmt(r['torchvision_decode_img_s'])} |",
                  f"| PIL decode, 1 process | {fmt(r['pil_decode_img_s'])} |",
                  f"| ratio torchvision / PIL | {fmt(r['ratio_torchvision_vs_pil'], 3)} |"]
    tr = res.get("torchrun")
    if tr:
        c = tr.get("compare", {})
        lines += ["", f"torchrun 2 processes vs 1 (N={tr['n']}): rc {tr['rc']}, stats equal: {c.get('equal')}, "
                      f"max abs diff {c.get('max_abs_diff')} ({c.get('worst_key')}); validation accuracy "
                      f"{c.get('val_accuracy_2')} vs {c.get('val_accuracy_1')}, equal: {c.get('val_accuracy_equal')}; "
                      f"wall {fmt(tr['wall_s'], 2)} s"]
    if res.get("e2e"):
        lines += ["", "| end to end (smallest N, class range) | wall s | main peak RSS MB | worker peak RSS MB | rc |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['stage']} | {fmt(r['wall_s'], 2)} | {fmt(r['main_peak_rss_mb'])} | "
                  f"{fmt(r['worker_peak_rss_mb'])} | {r['rc']} |" for r in res["e2e"]]
    t = res.get("targets")
    if t:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for k, v in t.items():
            lines.append(f"| {k} | {fmt(v['value'], 3)} | {v['met']} |")
    lines += ["", res["note"]]
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: RSS growth from the smallest to the largest N, absolute RSS, loader ratio."""
    out: dict[str, Any] = {}
    ns = sorted(res["per_n"], key=int)
    if len(ns) >= 2:
        lo = {r["stage"]: r for r in res["per_n"][ns[0]]["stages"]}
        for b_row in res["per_n"][ns[-1]]["stages"]:
            a_row = lo.get(b_row["stage"])
            if a_row is None or a_row["rc"] or b_row["rc"]:
                continue
            for key in ("main_peak_rss_mb", "worker_peak_rss_mb"):
                growth = b_row[key] - a_row[key]
                out[f"{b_row['stage']} {key} growth N={ns[0]}->{ns[-1]} (MB, < 250)"] = dict(
                    value=round(growth, 1), met=growth < 250)
    worst = max((row["max_process_rss_mb"] for per in res["per_n"].values() for row in per["stages"]), default=0)
    out["largest process RSS of any stage (MB, < 4096)"] = dict(value=worst, met=worst < 4096)
    r = res.get("rates", {}).get("result")
    if r and r.get("ratio_loader_vs_raw") is not None:
        out["loader / plain processes (>= 0.9)"] = dict(value=r["ratio_loader_vs_raw"],
                                                         met=r["ratio_loader_vs_raw"] >= 0.9)
    tr = res.get("torchrun", {}).get("compare")
    if tr:
        out["torchrun 2 vs 1 process stats max abs diff (== 0)"] = dict(value=tr["max_abs_diff"], met=tr["equal"])
        if "val_accuracy_equal" in tr:
            out["torchrun 2 vs 1 process validation accuracy (equal)"] = dict(value=tr["val_accuracy_2"],
                                                                              met=tr["val_accuracy_equal"])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stage"]:
        return stage_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="20 classes, N = 2 and 3 (checks that everything runs)")
    size.add_argument("--tiny", action="store_true", help="4 classes, N = 1 and 2, 64x48 JPEGs (tests)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="trees, weights, teachers, logs and the JSON")
    p.add_argument("--n", type=int, nargs="+", default=None, help="train images per class (default 2 8)")
    p.add_argument("--classes", type=int, default=None, help="class folders (default 1000)")
    p.add_argument("--val-per-class", type=int, default=None, help="val images per class (default 2)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader / plain processes (default: the CPUs)")
    p.add_argument("--rate-images", type=int, default=None, help="images of the loader-rate comparison")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions of the rate comparison (best kept)")
    p.add_argument("--gen-procs", type=int, default=None, help="processes writing the trees (default: the CPUs)")
    p.add_argument("--skip", nargs="*", default=[], choices=["squeeze", "validate", "rates", "torchrun", "e2e"],
                   help="stages to leave out")
    p.add_argument("--e2e-classes", default="0:3", metavar="A:B", help="class range of the end-to-end run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default <work>/imagenet_scale.json)")
    a = p.parse_args(argv)
    preset = dict(PRESETS["quick" if a.quick else "tiny" if a.tiny else "full"])
    for key in ("n", "classes", "val_per_class", "rate_images"):
        if getattr(a, key) is not None:
            preset[key] = getattr(a, key)
    a.batch_size, a.image_size = preset["batch_size"], preset["image_size"]
    workers = a.workers or cpu_count()
    gen_procs = a.gen_procs or cpu_count()
    work = a.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    tag = "quick" if a.quick else "tiny" if a.tiny else "full"
    res: dict[str, Any] = dict(
        preset=tag, classes=preset["classes"], n=preset["n"], val_per_class=preset["val_per_class"],
        jpeg_size=preset["jpeg_size"] or "ImageNet mix (decoct.data.fake_imagenet.SIZES)", image_size=a.image_size,
        workers=workers, batch_size=a.batch_size, cpu_count=cpu_count(), machine=platform.machine(),
        python=platform.python_version(), load_before=[round(x, 2) for x in os.getloadavg()],
        note=("Timings are meaningful only on an otherwise idle machine (see load_before/load_after). The OS page "
              "cache is warm for every stage; 'index_cold' means an empty decoct index cache."),
        per_n={},
    )
    import torch

    res["torch"] = torch.__version__
    weights = make_weights(work / f"resnet18-random-{preset['classes']}.pth", preset["classes"])
    res["weights"] = str(weights)
    teachers: dict[int, Path] = {}
    for n in preset["n"]:
        tree = work / f"tree-{tag}-c{preset['classes']}-n{n}-v{preset['val_per_class']}"
        built = build_tree(tree, preset["classes"], n, preset["val_per_class"], size=preset["jpeg_size"],
                           procs=gen_procs)
        cache = work / f"cache-{tag}-n{n}"
        if cache.exists():
            shutil.rmtree(cache)
        env = child_env(DECOCT_CACHE=str(cache))
        logs = work / "logs" / f"{tag}-n{n}"
        stage = [sys.executable, str(HERE), "_stage"]
        rows = []
        for name in ("index_cold", "index_warm"):
            rows.append(run_stage(name, [*stage, "index", "--root", str(tree), "--result", str(logs / f"{name}.json")],
                                  env=env, log=logs / f"{name}.log", result=logs / f"{name}.json"))
        teacher = work / f"teacher-{tag}-n{n}"
        if "squeeze" not in a.skip:
            row = run_stage("squeeze (stats + val)", squeeze_cmd(tree, weights, teacher, a, workers), env=env,
                            log=logs / "squeeze.log")
            if row["rc"] == 0:
                meta = json.loads((teacher / "teacher.json").read_text())
                row["result"] = {k: meta.get(k) for k in ("stats_seconds", "val_seconds", "test_accuracy",
                                                          "num_train_images", "streamed")}
                teachers[n] = teacher
            rows.append(row)
        if "validate" not in a.skip and n in teachers:
            rows.append(run_stage("validate", [*stage, "validate", "--root", str(tree), "--teacher", str(teacher),
                                               "--workers", str(workers), "--batch-size", str(a.batch_size),
                                               "--image-size", str(a.image_size),
                                               "--result", str(logs / "validate.json")],
                                  env=env, log=logs / "validate.log", result=logs / "validate.json"))
        res["per_n"][str(n)] = dict(tree=str(tree), tree_build=built, train_images=preset["classes"] * n,
                                    val_images=preset["classes"] * preset["val_per_class"], stages=rows)
        for row in rows:
            print(f"N={n} {row['stage']:<22} rc={row['rc']} {row['wall_s']:8.2f}s main {row['main_peak_rss_mb']:8.1f} MB "
                  f"workers {row['worker_peak_rss_mb']:8.1f} MB", flush=True)
    big = max(preset["n"])
    tree = Path(res["per_n"][str(big)]["tree"])
    env = child_env(DECOCT_CACHE=str(work / f"cache-{tag}-n{big}"))
    if "rates" not in a.skip:
        logs = work / "logs" / f"{tag}-rates"
        res["rates"] = run_stage("rates", [sys.executable, str(HERE), "_stage", "rates", "--root", str(tree),
                                           "--workers", str(workers), "--batch-size", str(a.batch_size),
                                           "--image-size", str(a.image_size), "--images", str(preset["rate_images"]),
                                           "--decode-images", str(preset["decode_images"]), "--reps", str(a.reps),
                                           "--result", str(logs / "rates.json")],
                                 env=env, log=logs / "rates.log", result=logs / "rates.json")
    small = min(preset["n"])
    if "torchrun" not in a.skip and small in teachers:
        # both sides with one thread per process: the same conv kernels, so any difference is the sharding's
        # (the timed teacher is that reference already when this benchmark runs with OMP_NUM_THREADS=1)
        tree = Path(res["per_n"][str(small)]["tree"])
        env1 = child_env(DECOCT_CACHE=str(work / f"cache-{tag}-n{small}"), OMP_NUM_THREADS="1")
        if os.environ.get("OMP_NUM_THREADS") == "1":
            ref, ref_row = teachers[small], dict(stage="squeeze 1 process, 1 thread (the timed one)", rc=0)
        else:
            ref = work / f"teacher-{tag}-n{small}-1proc-1thread"
            ref_row = run_stage("squeeze 1 process, 1 thread", squeeze_cmd(tree, weights, ref, a, max(1, workers // 2)),
                                env=env1, log=work / "logs" / f"{tag}-squeeze-1thread.log")
        out = work / f"teacher-{tag}-n{small}-torchrun2"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "decoct.cli", *squeeze_cmd(tree, weights, out, a, max(1, workers // 2))[3:]]
        row = run_stage("torchrun squeeze x2", cmd, env=env1, log=work / "logs" / f"{tag}-torchrun.log")
        row["n"] = small
        row["reference"] = ref_row
        if row["rc"] == 0 and ref_row["rc"] == 0:
            row["compare"] = compare_stats(ref / "bn_stats.safetensors", out / "bn_stats.safetensors")
            accs = [json.loads((d / "teacher.json").read_text()).get("test_accuracy") for d in (ref, out)]
            row["compare"].update(val_accuracy_1=accs[0], val_accuracy_2=accs[1], val_accuracy_equal=accs[0] == accs[1])
            row["compare_vs_timed_teacher"] = compare_stats(teachers[small] / "bn_stats.safetensors",
                                                            out / "bn_stats.safetensors")
        res["torchrun"] = row
    if "e2e" not in a.skip:
        res["e2e"] = end_to_end(work, tag, Path(res["per_n"][str(small)]["tree"]), weights, a, workers)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = targets(res)
    from decoct.runtime.io import atomic_write_json

    path = a.out or work / "imagenet_scale.json"
    atomic_write_json(path, res)
    print(markdown(res))
    print(f"\nwrote {path}")
    failed = [r["stage"] for per in res["per_n"].values() for r in per["stages"] if r["rc"]]
    failed += [k for k in ("rates", "torchrun") if k in res and res[k]["rc"]]
    failed += [r["stage"] for r in res.get("e2e", []) if r["rc"]]
    if failed:
        print(f"stages that failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
