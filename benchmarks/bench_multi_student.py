"""Speed of the multi-student engines: R ConvNet-D3 students trained on a random CIFAR-10 subset.

Why: evaluating a distilled set means training R students per setting; this measures which
engine of :func:`decoct.train.fit_students` does that fastest on a device, which is what
``engine='auto'`` encodes. Every engine trains the same students (same init, minibatch order
and DSA draws), so the test accuracies in the table must agree across engines too.

    python benchmarks/bench_multi_student.py --device cpu --ipc 1 10 --runs 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from decoct.data import load_dataset, normalize
from decoct.models import create_model
from decoct.runtime.io import atomic_write_json
from decoct.train import TrainConfig, evaluate_accuracy, fit_students, resolve_engine

OUT = Path(__file__).resolve().parent / "out" / "multi_student.json"
DEFAULT_EPOCHS = {1: 50, 10: 20}


def _load_dataset(retries: int, wait_s: float):
    """The loader is shared with other work in progress: retry a few times before giving up."""
    for attempt in range(retries + 1):
        try:
            return load_dataset("cifar10")
        except (ImportError, OSError) as e:  # pragma: no cover - depends on the environment
            if attempt == retries:
                raise
            print(f"load_dataset failed ({e}); retrying in {wait_s:.0f}s")
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def _augment(strategy: str):
    """DSA per-sample augmentation as a trainer ``augment(x, generator)``; None for 'none'."""
    if strategy == "none":
        return None
    from decoct.augment import DSA

    dsa = DSA(strategy=strategy)
    return lambda x, g: dsa(x, generator=g)


def _tune_malloc() -> None:
    """glibc only: keep freed memory in the heap instead of mmap/munmap per large tensor.

    On CPU every activation tensor above the mmap threshold is page-faulted in anew on each
    allocation; this trades resident memory for a large cut in system time.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**62)):
        raise RuntimeError("mallopt failed")


def _subset(labels: torch.Tensor, ipc: int, num_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        idx.append(pool[torch.randperm(len(pool), generator=g)[:ipc]])
    return torch.cat(idx)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--epochs", type=int, default=None, help="default: 50 at IPC 1, 20 at IPC 10")
    p.add_argument("--runs", type=int, default=2, help="timed repetitions (best is reported)")
    p.add_argument("--students", type=int, default=5)
    p.add_argument("--engines", nargs="+", default=["sequential", "vmap", "grouped"])
    p.add_argument("--channels-last", choices=["off", "on", "both"], default="both")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate", help="DSA strategy or 'none'")
    p.add_argument("--test-n", type=int, default=1000, help="test images for the accuracy check (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tune-malloc", action="store_true", help="glibc mallopt: no mmap/trim (CPU)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc:
        _tune_malloc()
    device = torch.device(args.device)
    ds = _load_dataset(retries=10, wait_s=30)
    info = ds.info
    augment = _augment(args.dsa)
    seeds = list(range(args.students))
    test_x = normalize(ds.test.images[: args.test_n], info)
    test_y = ds.test.labels[: args.test_n]
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]

    def factory() -> torch.nn.Module:
        return create_model("convnetd3", info.num_classes, info.channels, info.height, width=128, norm="instance")

    rows = []
    for ipc in args.ipc:
        idx = _subset(ds.train.labels, ipc, info.num_classes, seed=ipc)
        x = normalize(ds.train.images[idx], info)
        y = ds.train.labels[idx]
        epochs = args.epochs or DEFAULT_EPOCHS.get(ipc, 20)
        base_s = None
        for cl in layouts:
            cfg = TrainConfig(epochs=epochs, batch_size=256, amp=args.amp, channels_last=cl)
            for engine in args.engines:
                # one untimed epoch warms up kernels and allocators
                warm = TrainConfig(epochs=1, batch_size=256, amp=args.amp, channels_last=cl)
                fit_students(factory, x, y, warm, seeds=seeds, augment=augment, engine=engine, device=device)
                times = []
                for _ in range(args.runs):
                    _sync(device)
                    t0 = time.perf_counter()
                    models = fit_students(factory, x, y, cfg, seeds=seeds, augment=augment, engine=engine,
                                          device=device)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                secs = min(times)
                if engine == "sequential" and not cl:
                    base_s = secs
                acc = None
                if args.test_n:
                    acc = [evaluate_accuracy(m, test_x, test_y, 500, device) for m in models]
                rows.append(dict(
                    engine=engine, channels_last=cl, ipc=ipc, epochs=epochs, students=len(seeds),
                    seconds=secs, times=times, student_epochs_per_s=len(seeds) * epochs / secs,
                    accuracies=acc,
                ))
                print(f"  {engine:<10} cl={int(cl)} ipc={ipc:<3} {secs:7.2f}s", flush=True)
        for r in rows:
            if r["ipc"] == ipc and base_s:
                r["ratio_vs_sequential"] = base_s / r["seconds"]

    sample = factory()
    auto = resolve_engine("auto", sample, device)
    print(f"\ndevice={device} threads={torch.get_num_threads()} R={len(seeds)} dsa={args.dsa} auto->{auto}")
    print(f"{'engine':<11}{'ch_last':>8}{'IPC':>5}{'epochs':>7}{'seconds':>9}{'stud*ep/s':>11}{'vs seq':>8}  acc (test-n)")
    for r in rows:
        acc = "" if r["accuracies"] is None else " ".join(f"{a:.3f}" for a in r["accuracies"])
        print(f"{r['engine']:<11}{str(r['channels_last']):>8}{r['ipc']:>5}{r['epochs']:>7}{r['seconds']:>9.2f}"
              f"{r['student_epochs_per_s']:>11.2f}{r.get('ratio_vs_sequential', float('nan')):>7.2f}x  {acc}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), auto_engine=auto,
        dsa=args.dsa, amp=args.amp, tune_malloc=args.tune_malloc, rows=rows,
    )
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
