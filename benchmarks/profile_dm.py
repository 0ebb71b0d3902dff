"""Where one DM iteration's CPU time goes: torch.profiler over ``DistributionMatching.step``.

Explains the gap between a DM iteration and its convolution-FLOP floor (``bench_dm.py``): it prints the
ops by self CPU time, and the share of convolutions against everything else (with ``--compile``, the
inductor kernels that fuse each instance norm with its ReLU and pooling show as ``CompiledFxGraph``).

    DECOCT_DATA=... python benchmarks/profile_dm.py --compile --real-chunk 32

Shares are meaningful under light load; seconds only on an idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from decoct.data import load_dataset
from decoct.matching.dm import DistributionMatching, DMConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the embedding (DM --compile)")
    p.add_argument("--real-chunk", type=int, default=0, help="real images per no-grad forward (0 = DM's rule)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rows", type=int, default=20, help="ops listed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("cifar10")
    dm = DistributionMatching(DMConfig(ipc=10, batch_real=256, width=128, iterations=10**9, seed=0,
                                       compile=args.compile, real_chunk=args.real_chunk))
    dm.init(data, torch.device("cpu"))
    for i in range(args.warmup):
        dm.step(i)
    t0 = time.perf_counter()
    dm.step(args.warmup)
    print(f"one step unprofiled: {time.perf_counter() - t0:.2f} s (threads {torch.get_num_threads()}, "
          f"chunk {dm.real_chunk}, compile {args.compile})")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dm.step(args.warmup + 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    fused = sum(e.self_cpu_time_total for e in events if "CompiledFxGraph" in e.key)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(f"self CPU: convolutions {100 * conv / total:.1f} %, compiled (fused norm/ReLU/pool) kernels "
          f"{100 * fused / total:.1f} %, everything else {100 * (total - conv - fused) / total:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
