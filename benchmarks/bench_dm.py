"""Speed of one DM iteration (CIFAR-10, IPC 10, batch_real 256): FLOP floor, plain loop, decoct's variants.

One command prints one JSON (stdout, and ``--out``); progress goes to stderr. Run it on an IDLE
machine (the JSON records the load average before and after):

    python benchmarks/bench_dm.py                      # CIFAR-10 from $DECOCT_DATA, all cores, ~4-6 min
    python benchmarks/bench_dm.py --synthetic          # random uint8 tensors of CIFAR-10's shapes
    python benchmarks/bench_dm.py --quick --iters 1    # a few seconds: checks that it runs, no figure

What it measures:

(a) ``peak``: the machine's rates, best of ``--reps``: fp32 matmul (a square ``torch.mm``) and the
    conv rate of the ConvNet-D3 width-128 conv shapes at 32x32 (3->128 at 32x32, 128->128 at 16x16
    and 8x8, with bias, padding 1), per memory format and batch; FLOPs from
    ``torch.utils.flop_counter.FlopCounterMode``. ``conv_gflops`` is the rate of one forward
    through the three convs with each at its best measured (format, batch): FLOPs / sum of times.
(b) ``iteration``: the FLOPs of one DM iteration as decoct runs it (``FlopCounterMode`` over
    ``DistributionMatching.step``: the real images' no-grad forwards, the synthetic forward and
    backward, the class-mean matmuls), split by op, and its floor = FLOPs / rate, at the conv rate
    (the honest one: the iteration is ~99 % convolutions) and at the matmul rate.
(c) ``variants``: seconds per iteration, alternated round-robin (the order reversed every other
    round, so no variant always runs after the same one), best, median and every value, after
    ``--warmup`` untimed steps each (their seconds are recorded: the compiled variant compiles there).
    ``plain``: the reference loop as DM's ``main_DM.py`` writes it: a fresh ConvNet, then per class
    sample the real batch, one DSA draw shared by real and synthetic, embed real (no graph) and
    synthetic, add the squared mean-embedding distance; one backward, one SGD step; float32, NCHW,
    no batching across classes. ``decoct``: ``DistributionMatching`` with its defaults;
    ``decoct-<opts>``: the same with options: ``nchw`` / ``cl`` (channels_last off / on),
    ``compile`` (``torch.compile`` of the embedding: inductor fuses each instance norm with its ReLU
    and pooling, the only fused-norm route on a CPU: eager PyTorch has no fused GroupNorm+ReLU
    kernel), ``chunkN`` (real images per no-grad forward). A variant that fails to build or to warm
    up (e.g. no C++ compiler for inductor) is recorded with its error and left out of the timing.
(d) ``ratios``: each decoct variant's seconds over the floor (conv and matmul rate) and the plain
    loop's seconds over the variant's (best and median), against issue 13's targets (within 1.3x
    of the floor, at least 1.4x faster than the plain loop).
(e) ``forward_table`` (skip with ``--no-table``): no-grad real-forward throughput per chunk size
    and memory format, the quantity DM's real chunk trades.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from decoct.augment import DSA
from decoct.data import Dataset, DatasetInfo, ImageSplit, load_dataset, normalize
from decoct.matching.dm import DistributionMatching, DMConfig, dm_loss_reference
from decoct.models import depth_for_size, model_for
from decoct.runtime.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "out" / "dm_speed.json"
DEFAULT_VARIANTS = "plain,decoct,decoct-nchw,decoct-compile,decoct-chunk256,decoct-chunk16"
QUICK_VARIANTS = "plain,decoct,decoct-nchw"
TARGET_OVER_FLOOR = 1.3
TARGET_PLAIN_OVER_DECOCT = 1.4
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Any, reps: int, device: torch.device) -> float:
    """Best wall seconds of ``fn()`` over ``reps`` calls after one untimed call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:500]}"


# ------------------------------------------------------------------------------------------ data
def synthetic_cifar10(per_class: int, seed: int = 0) -> Dataset:
    """Random uint8 images with CIFAR-10's shapes, classes and normalisation (no download)."""
    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo("cifar10-synthetic", tuple(f"class{c}" for c in range(10)), 3, 32, 32, CIFAR10_MEAN,
                       CIFAR10_STD)
    labels = torch.arange(10).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    return Dataset(info, ImageSplit(images, labels), ImageSplit(images[:10], labels[:10]))


# ------------------------------------------------------------------------------------------ (a) peak rates
def matmul_gflops(device: torch.device, n: int, reps: int) -> dict[str, Any]:
    """fp32 ``torch.mm`` of two n x n matrices: 2 n^3 FLOPs, best of ``reps``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    s = _best_seconds(lambda: torch.mm(a, b), reps, device)
    return {"n": n, "flops": 2 * n**3, "best_s": s, "gflops": 2 * n**3 / s / 1e9}


def conv_layers(image_shape: tuple[int, int, int], width: int) -> list[dict[str, int]]:
    """The conv shapes of ConvNet-D{depth} (the papers' depth rule) for one image size."""
    c, h, w = image_shape
    out = []
    for _ in range(depth_for_size(h)):
        out.append({"in": c, "out": width, "h": h, "w": w, "flops_per_image": 2 * c * width * 9 * h * w})
        c, h, w = width, h // 2, w // 2
    return out


def conv_gflops(device: torch.device, layers: list[dict[str, int]], batches: list[int], reps: int) -> dict[str, Any]:
    """Forward conv rate per layer, memory format and batch (FlopCounterMode FLOPs, best of ``reps``).

    ``gflops``: one forward through all layers, each at its best (format, batch): sum of FLOPs over
    sum of times per image. ``layers[i].best_gflops``: layer i's best.
    """
    rows, per_layer = [], []
    for i, layer in enumerate(layers):
        best = None
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            for batch in batches:
                x = torch.randn(batch, layer["in"], layer["h"], layer["w"], device=device).contiguous(memory_format=fmt)
                wt = torch.randn(layer["out"], layer["in"], 3, 3, device=device).contiguous(memory_format=fmt)
                bias = torch.randn(layer["out"], device=device)

                def run(x=x, wt=wt, bias=bias) -> None:
                    with torch.no_grad():
                        F.conv2d(x, wt, bias, padding=1)

                flops = _flops(run)
                s = _best_seconds(run, reps, device)
                row = {"layer": i, "channels_last": cl, "batch": batch, "flops": flops, "best_s": s,
                       "gflops": flops / s / 1e9}
                rows.append(row)
                if best is None or row["gflops"] > best["gflops"]:
                    best = row
                log(f"  conv layer {i} ({layer['in']}->{layer['out']} @{layer['h']}x{layer['w']}) "
                    f"{'channels_last' if cl else 'NCHW'} batch {batch}: {row['gflops']:.1f} GFLOP/s")
        per_layer.append({**layer, "best_gflops": best["gflops"], "best_channels_last": best["channels_last"],
                          "best_batch": best["batch"]})
    total = sum(la["flops_per_image"] for la in per_layer)
    seconds = sum(la["flops_per_image"] / (la["best_gflops"] * 1e9) for la in per_layer)
    return {"gflops": total / seconds / 1e9, "layers": per_layer, "rows": rows}


# ------------------------------------------------------------------------------------------ (c) variants
class PlainLoop:
    """The reference: what ``main_DM.py`` does per iteration, written plainly (float32, NCHW, per class)."""

    name = "plain"

    def __init__(self, data: Dataset, syn: torch.Tensor, syn_labels: torch.Tensor, batch_real: int, width: int,
                 device: torch.device) -> None:
        self.data, self.device, self.batch_real, self.width = data, device, batch_real, width
        self.info = data.info
        self.syn = syn.detach().clone().to(device).requires_grad_(True)
        self.syn_labels = syn_labels.to(device)
        self.opt = torch.optim.SGD([self.syn], lr=1.0, momentum=0.5)
        self.dsa = DSA()
        self.by_class = [data.train.class_indices(c) for c in range(self.info.num_classes)]
        self.settings = {"channels_last": False, "amp": False, "compile": False, "real_chunk": None,
                         "batched_classes": False}

    def net(self) -> torch.nn.Module:
        net = model_for("convnet", self.info, width=self.width, norm="instance").to(self.device)
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


def parse_variant(name: str) -> dict[str, Any]:
    """``decoct[-nchw|-cl][-compile][-chunkN]`` -> DMConfig overrides; ValueError naming the token."""
    parts = name.split("-")
    if parts[0] != "decoct":
        raise ValueError(f"--variants: unknown variant {name!r}; use plain or decoct[-nchw|-cl][-compile][-chunkN]")
    over: dict[str, Any] = {}
    for tok in parts[1:]:
        if tok == "nchw":
            over["channels_last"] = False
        elif tok == "cl":
            over["channels_last"] = True
        elif tok == "compile":
            over["compile"] = True
        elif tok.startswith("chunk") and tok[5:].isdigit() and int(tok[5:]) > 0:
            over["real_chunk"] = int(tok[5:])
        else:
            raise ValueError(f"--variants: unknown option {tok!r} in {name!r}; known: nchw, cl, compile, chunkN")
    return over


class DecoctVariant:
    """decoct's DM with DMConfig overrides; ``step()`` runs one iteration."""

    def __init__(self, name: str, overrides: dict[str, Any], data: Dataset, args: argparse.Namespace,
                 device: torch.device) -> None:
        self.name = name
        self.dm = DistributionMatching(DMConfig(ipc=args.ipc, batch_real=args.batch_real, width=args.width,
                                                iterations=10**9, seed=args.seed, **overrides))
        self.dm.init(data, device)
        self.it = 0
        self.settings = {"channels_last": self.dm.channels_last, "amp": self.dm.amp,
                         "compile": bool(self.dm.cfg.compile), "real_chunk": self.dm.real_chunk,
                         "batched_classes": True}

    def step(self) -> float:
        out = self.dm.step(self.it)
        self.it += 1
        return out["loss"]


def time_variants(variants: list[Any], iters: int, device: torch.device) -> dict[str, list[float]]:
    """Round-robin, order reversed every other round: A B C, C B A, A B C, ..."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(iters):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            v.step()
            _sync(device)
            times[v.name].append(time.perf_counter() - t0)
            log(f"  round {r} {v.name:24s} {times[v.name][-1]:.3f} s")
    return times


# ------------------------------------------------------------------------------------------ (e) forward table
def forward_table(info: DatasetInfo, width: int, device: torch.device, chunks: list[int], images: int,
                  reps: int) -> list[dict[str, Any]]:
    """No-grad ConvNet embedding throughput per chunk size and memory format (best of ``reps``)."""
    rows = []
    net = model_for("convnet", info, width=width, norm="instance").to(device).requires_grad_(False)
    x = torch.randn(images, *info.image_shape, device=device)
    for cl in (False, True):
        m = net.to(memory_format=torch.channels_last) if cl else net
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        for chunk in chunks:
            def run(m=m, xx=xx, chunk=chunk) -> None:
                with torch.no_grad():
                    for s in range(0, images, chunk):
                        m.embed(xx[s:s + chunk])

            s = _best_seconds(run, reps, device)
            rows.append({"channels_last": cl, "chunk": chunk, "img_per_s": images / s})
            log(f"  forward {'channels_last' if cl else 'NCHW':13s} chunk {chunk:5d}: {images / s:8.1f} img/s")
    return rows


# ------------------------------------------------------------------------------------------ main
def _stats(v: list[float]) -> dict[str, Any]:
    return {"best_s": min(v), "median_s": statistics.median(v), "all_s": v}


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads (default: all cores, %(default)s here)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each peak-rate kernel (default 5; quick 2)")
    p.add_argument("--variants", default=None,
                   help=f"comma list: plain, decoct[-nchw|-cl][-compile][-chunkN] (default {DEFAULT_VARIANTS}; "
                        f"quick {QUICK_VARIANTS})")
    p.add_argument("--ipc", type=int, default=None, help="images per class (default 10; quick 1)")
    p.add_argument("--batch-real", type=int, default=None, help="real images per class (default 256; quick 8)")
    p.add_argument("--width", type=int, default=None, help="ConvNet width (default 128; quick 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="random uint8 tensors of CIFAR-10's shapes, not CIFAR-10")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (synthetic data, 32 images per class, IPC 1, batch_real 8, width 16, small "
                        "kernels, no table): checks that the script runs, its seconds mean nothing")
    p.add_argument("--no-table", action="store_true", help="skip the chunk-size forward table")
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON is written too (default %(default)s)")
    args = p.parse_args(argv)
    q = args.quick
    for k, full, quick in (("warmup", 2, 1), ("reps", 5, 2), ("ipc", 10, 1), ("batch_real", 256, 8),
                           ("width", 128, 16), ("variants", DEFAULT_VARIANTS, QUICK_VARIANTS)):
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    for k in ("threads", "iters", "reps", "ipc", "batch_real", "width"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if len(set(names)) != len(names) or not names:
        p.error(f"--variants must name distinct variants, got {args.variants!r}")
    try:
        args.variant_overrides = {n: None if n == "plain" else parse_variant(n) for n in names}
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    if args.quick:
        data = synthetic_cifar10(32, seed=args.seed)
    elif args.synthetic:
        data = synthetic_cifar10(5000, seed=args.seed)
    else:
        data = load_dataset("cifar10", root=os.environ.get("DECOCT_DATA"))
    info = data.info
    torch.manual_seed(args.seed)

    # (a) peak rates
    log(f"peak rates ({args.threads} threads)")
    mm = matmul_gflops(device, 256 if args.quick else 2048, args.reps)
    log(f"  matmul {mm['n']}: {mm['gflops']:.1f} GFLOP/s")
    layers = conv_layers(info.image_shape, args.width)
    conv = conv_gflops(device, layers, [4] if args.quick else [64, 256], args.reps)
    log(f"  conv (ConvNet-D{len(layers)} width {args.width}, each layer at its best): {conv['gflops']:.1f} GFLOP/s")

    # (c) variants: decoct's first, so the plain loop starts from the same initial images
    variants: list[Any] = []
    failed: dict[str, dict[str, Any]] = {}
    counter = DecoctVariant("decoct(flop count)", {}, data, args, device)
    for name, over in args.variant_overrides.items():
        try:
            if over is None:
                v: Any = PlainLoop(data, counter.dm.param.images, counter.dm.param.labels, args.batch_real,
                                   args.width, device)
            else:
                v = DecoctVariant(name, over, data, args, device)
            v.warmup_s = []
            for _ in range(args.warmup):
                _sync(device)
                t0 = time.perf_counter()
                v.step()
                _sync(device)
                v.warmup_s.append(time.perf_counter() - t0)
            log(f"  {name}: built, warm-up {[round(s, 2) for s in v.warmup_s]} s; {v.settings}")
            variants.append(v)
        except Exception as e:  # recorded, not fatal: e.g. inductor without a C++ compiler
            failed[name] = {"error": _error(e), "settings": over}
            log(f"  {name}: FAILED {_error(e)}")
    log(f"timing {args.iters} rounds of {[v.name for v in variants]}")
    times = time_variants(variants, args.iters, device)

    # (b) the FLOPs of one iteration, as decoct runs it (eager; the plain loop's for comparison)
    with FlopCounterMode(display=False) as fc:
        counter.step()
    flops = int(fc.get_total_flops())
    by_op = {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}
    plain_flops = None
    plain = next((v for v in variants if v.name == "plain"), None)
    if plain is not None:
        plain_flops = _flops(plain.step)
    conv_flops = sum(n for op, n in by_op.items() if "convolution" in op)
    floor_conv = flops / (conv["gflops"] * 1e9)
    floor_mm = flops / (mm["gflops"] * 1e9)
    real_images = sum(min(args.batch_real, len(i)) for i in (data.train.class_indices(c)
                                                             for c in range(info.num_classes)))
    syn_images = counter.dm.param.num_images

    # (d) ratios
    stats = {v.name: {**_stats(times[v.name]), "warmup_s": v.warmup_s, "settings": v.settings,
                      "img_per_s_median": (real_images + syn_images) / statistics.median(times[v.name])}
             for v in variants}
    ratios: dict[str, Any] = {}
    for name, st in stats.items():
        if name == "plain":
            continue
        r = {"over_floor_conv": {k: st[f"{k}_s"] / floor_conv for k in ("best", "median")},
             "over_floor_matmul": {k: st[f"{k}_s"] / floor_mm for k in ("best", "median")}}
        if "plain" in stats:
            r["plain_over_this"] = {k: stats["plain"][f"{k}_s"] / st[f"{k}_s"] for k in ("best", "median")}
        r["meets_floor_target"] = r["over_floor_conv"]["median"] <= TARGET_OVER_FLOOR
        if "plain_over_this" in r:
            r["meets_plain_target"] = r["plain_over_this"]["median"] >= TARGET_PLAIN_OVER_DECOCT
        ratios[name] = r
    fastest = min((n for n in stats if n != "plain"), key=lambda n: stats[n]["median_s"], default=None)

    # (e) forward table
    table = [] if (args.no_table or args.quick) else forward_table(
        info, args.width, device, [32, 64, 128, 256, 512] if device.type == "cpu" else [256, 512, 1024, 2048],
        512, 2)

    res = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                    "mkldnn": torch.backends.mkldnn.is_available(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
        "setting": {"dataset": info.name, "ipc": args.ipc, "batch_real": args.batch_real, "width": args.width,
                    "real_images_per_iteration": real_images, "synthetic_images": syn_images,
                    "quick": args.quick, "iters": args.iters, "warmup": args.warmup, "reps": args.reps},
        "peak": {"matmul": mm, "conv_gflops": conv["gflops"], "conv_layers": conv["layers"], "conv_rows": conv["rows"]},
        "iteration": {"flops": flops, "gflop": flops / 1e9, "by_op": by_op,
                      "conv_share": conv_flops / flops if flops else None, "plain_loop_flops": plain_flops,
                      "floor_s_conv": floor_conv, "floor_s_matmul": floor_mm,
                      "floor_rate": "conv_gflops: one forward through ConvNet-D3's three convs, each at its best "
                                    "measured (memory format, batch); the matmul floor is optimistic for convs"},
        "variants": stats,
        "failed_variants": failed,
        "ratios": ratios,
        "fastest_decoct_variant": fastest,
        "targets": {"over_floor_conv_max": TARGET_OVER_FLOOR, "plain_over_decoct_min": TARGET_PLAIN_OVER_DECOCT},
        "forward_table": table,
        "seconds_total": time.perf_counter() - t_start,
    }
    res = _round(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))
    log(f"wrote {args.out} ({res['seconds_total']:.0f} s)")
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
