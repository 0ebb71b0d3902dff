"""Speed of one DM iteration (CIFAR-10, IPC 10, batch_real 256): plain loop vs decoct's DM.

(a) the plain reference loop of the original DM: per-class Python loop, float32, NCHW, a fresh
    frozen ConvNet-D3 per iteration, one real forward of 256 and one synthetic forward per class,
    one shared DSA draw per class, summed loss, one backward, SGD step;
(b) :class:`decoct.matching.dm.DistributionMatching` with its per-device defaults (channels_last,
    measured real chunk, all classes' synthetic images in one forward, bf16 on CUDA only).

Both run in the same process, interleaved (a, b, a, b, ...) so that load on a shared machine hits
both alike; the median time per iteration is reported with images/s, the ratio, and the FLOP
floor: the iteration's FLOPs (counted with ``torch.utils.flop_counter``) at the machine's fp32
matmul rate (a large ``torch.mm``). Also prints the real-forward throughput per chunk size and
memory format, which is what DM's chunk autotuning picks from. Writes benchmarks/out/dm_speed.json.

    nice -n 10 python benchmarks/bench_dm.py --iters 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from decoct.augment import DSA
from decoct.data import load_dataset, normalize
from decoct.matching.dm import DistributionMatching, DMConfig, dm_loss_reference
from decoct.models import model_for
from decoct.runtime.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "out" / "dm_speed.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The reference: what ``main_DM.py`` does per iteration, written plainly."""

    def __init__(self, data, syn: torch.Tensor, syn_labels: torch.Tensor, batch_real: int,
                 device: torch.device) -> None:
        self.data, self.device, self.batch_real = data, device, batch_real
        self.info = data.info
        self.syn = syn.detach().clone().to(device).requires_grad_(True)
        self.syn_labels = syn_labels
        self.opt = torch.optim.SGD([self.syn], lr=1.0, momentum=0.5)
        self.dsa = DSA()
        self.by_class = [data.train.class_indices(c) for c in range(self.info.num_classes)]

    def net(self) -> torch.nn.Module:
        net = model_for("convnet", self.info, width=128, norm="instance").to(self.device)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        return net

    def step(self) -> float:
        net = self.net()
        seeds = torch.randint(0, 2**31 - 1, (self.info.num_classes,)).tolist()
        real, syn = [], []
        for c, idx in enumerate(self.by_class):
            pick = idx[torch.randperm(len(idx))[: self.batch_real]]
            real.append(normalize(self.data.train.images[pick], self.info, self.device))
            syn.append(self.syn[self.syn_labels == c])
        loss = dm_loss_reference(net.embed, real, syn, seeds, lambda x, s: self.dsa(x, seed=s))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_table(info, device: torch.device, chunks: list[int], images: int = 512) -> list[dict]:
    """No-grad ConvNet-D3 embedding throughput per chunk size and memory format."""
    rows = []
    net = model_for("convnet", info, width=128, norm="instance").to(device).requires_grad_(False)
    x = torch.randn(images, *info.image_shape, device=device)
    for cl in (False, True):
        m = net.to(memory_format=torch.channels_last) if cl else net
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        for chunk in chunks:
            def run(m=m, xx=xx, chunk=chunk) -> None:
                with torch.no_grad():
                    for s in range(0, images, chunk):
                        m.embed(xx[s:s + chunk])
            run()
            _sync(device)
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            rows.append({"channels_last": cl, "chunk": chunk, "img_per_s": round(images / best, 1)})
            print(f"  forward {'channels_last' if cl else 'NCHW         '} chunk {chunk:5d}: "
                  f"{images / best:8.1f} img/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--iters", type=int, default=4, help="timed iterations of each (after one warm-up each)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-table", action="store_true", help="skip the chunk-size forward table")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset("cifar10")
    info = data.info
    torch.manual_seed(0)

    ours = DistributionMatching(DMConfig(ipc=args.ipc, batch_real=args.batch_real, iterations=10**6))
    ours.init(data, device)
    ref = PlainLoop(data, ours.param.images, ours.param.labels.cpu(), args.batch_real, device)
    real_per_it = sum(min(args.batch_real, len(i)) for i in ref.by_class)
    images_per_it = real_per_it + ours.param.num_images

    # warm-up (also DM's chunk autotuning, at its first step)
    t0 = time.perf_counter()
    ours.step(0)
    first_step = time.perf_counter() - t0
    ref.step()
    print(f"DM picked real_chunk={ours.real_chunk} (first step incl. tuning {first_step:.1f}s); "
          f"amp={ours.amp} channels_last={ours.channels_last}", flush=True)

    times: dict[str, list[float]] = {"reference": [], "decoct": []}
    for i in range(args.iters):
        for name, fn in (("reference", ref.step), ("decoct", lambda i=i: ours.step(i + 1))):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            print(f"  iter {i} {name:9s} {times[name][-1]:.3f}s", flush=True)

    flops = FlopCounterMode(display=False)
    with flops:
        ref.step()
    total_flops = flops.get_total_flops()
    rate = matmul_gflops(device)
    floor_s = total_flops / (rate * 1e9)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["reference"] / med["decoct"]
    table = [] if args.no_table else forward_table(info, device, [64, 128, 256, 512] if device.type == "cpu"
                                                   else [256, 512, 1024, 2048])
    res = {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "ipc": args.ipc, "batch_real": args.batch_real, "images_per_iteration": images_per_it,
        "iters": args.iters, "seconds": times, "median_s": med, "ratio": round(ratio, 3),
        "img_per_s": {k: round(images_per_it / v, 1) for k, v in med.items()},
        "flops_per_iteration": total_flops, "matmul_gflops": round(rate, 1), "flop_floor_s": round(floor_s, 3),
        "fraction_of_floor": {k: round(floor_s / v, 3) for k, v in med.items()},
        "real_chunk": ours.real_chunk, "amp": ours.amp, "channels_last": ours.channels_last,
        "forward_table": table,
    }
    print(f"reference (per-class loop, fp32, NCHW): {med['reference']:.3f} s/iter, "
          f"{images_per_it / med['reference']:.0f} img/s")
    print(f"decoct DM:                              {med['decoct']:.3f} s/iter, "
          f"{images_per_it / med['decoct']:.0f} img/s")
    print(f"ratio: {ratio:.2f}x   FLOPs/iter {total_flops / 1e9:.1f} GFLOP; matmul {rate:.1f} GFLOP/s -> "
          f"floor {floor_s:.2f} s/iter (decoct at {100 * floor_s / med['decoct']:.0f}% of the floor)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
