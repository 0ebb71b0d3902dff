"""Memory and time of one TM iteration vs ``syn_steps``: unrolled (MTT) vs exact adjoint vs TESLA.

Each (mode, syn_steps) cell runs in a fresh subprocess so the process's peak RSS belongs to that
cell alone: the cell builds its tensors, records its RSS, runs three iterations (a warm-up, then
the faster of two timed ones, which is robust to other load on a shared CPU) and reports ``peak RSS - RSS before`` plus the peak bytes autograd held for backward
(:class:`decoct.matching.tm.SavedTensorMeter`, device independent). On CUDA the cells also report
``torch.cuda.max_memory_allocated``. Results: ``benchmarks/out/tm_memory.json``.

    nice -n 10 python benchmarks/bench_tm_memory.py                 # CPU, ConvNet-D3 width 32, 32x32
    python benchmarks/bench_tm_memory.py --device cuda --width 128  # the paper's student on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {"unrolled": ("unrolled", 1), "exact": ("exact", 1), "exact-sqrt": ("exact", 0), "tesla": ("tesla", 1)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, steps: int, width: int, images: int, size: int, device: str, threads: int) -> dict:
    import torch

    from decoct.matching.tm import SavedTensorMeter, dsa_augment, make_plan, match_gradients
    from decoct.models.convnet import ConvNet
    from decoct.models.flat_params import FlatParams

    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    net = FlatParams(ConvNet(10, 3, size, depth=3, width=width).to(dev))
    theta0 = net.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    x = torch.randn(images, 3, size, size, device=dev)
    y = torch.arange(images, device=dev) % 10
    grad_mode, every = MODES[mode]
    aug = dsa_augment()
    times = []
    rss0 = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    meter = SavedTensorMeter()
    for it in range(3):
        plan = make_plan(images, steps, images, torch.Generator().manual_seed(it))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with meter:
            r = match_gradients(net, theta0, target, x, y, 0.01, plan, augment=aug, mode=grad_mode,
                                snapshot_every=every)
            float(r.loss)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = min(times[1:])
    out = dict(mode=mode, syn_steps=steps, seconds_per_iteration=round(best, 4),
               seconds_per_step=round(best / steps, 4), peak_rss_delta_mb=round(max(0, peak_rss - rss0) / 2**20, 1),
               saved_tensors_peak_mb=round(meter.peak_bytes / 2**20, 2), saved_tensors_peak_count=meter.peak,
               num_params=net.num_params)
    if dev.type == "cuda":
        out["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="5,10,20,40", help="comma-separated syn_steps values")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--width", type=int, default=32, help="ConvNet-D3 width (the paper uses 128)")
    ap.add_argument("--images", type=int, default=10, help="synthetic images = batch_syn (CIFAR-10 IPC 1: 10)")
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "tm_memory.json"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child[0], int(args.child[1]), args.width, args.images, args.size, args.device, args.threads)
        print(json.dumps(res))
        return
    rows = []
    t0 = time.perf_counter()
    for mode in args.modes.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            cmd = [sys.executable, __file__, "--child", mode, str(steps), "--width", str(args.width), "--images",
                   str(args.images), "--size", str(args.size), "--device", args.device, "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rows.append(res)
            print(f"{mode:>10} steps {steps:3d}: {res['seconds_per_iteration']:7.3f} s/it  "
                  f"peak RSS +{res['peak_rss_delta_mb']:7.1f} MB  autograd-saved peak {res['saved_tensors_peak_mb']:7.2f} MB"
                  + (f"  cuda +{res['cuda_peak_mb']} MB" if "cuda_peak_mb" in res else ""), flush=True)
    import torch

    report = dict(benchmark="tm_memory", command=" ".join([Path(sys.executable).name, *sys.argv]),
                  machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                               torch=torch.__version__),
                  setting=dict(model=f"ConvNet-D3 width {args.width}", images=args.images, batch_syn=args.images,
                               image=f"3x{args.size}x{args.size}", dsa=True, device=args.device,
                               threads=args.threads),
                  seconds=round(time.perf_counter() - t0, 1), rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
