"""Why does AutoPalette-DM's palette network collapse? Gradient norms of its first iterations.

Prints, per DM iteration (CIFAR-10, IPC 10, K = 64, x4 images, ZCA, real init), the task loss, the
norm of the palette network's gradient from the task loss and from the auxiliary losses
(L_m + L_b + 3 L_a), and the argmax colours in use. A fresh network gives nearly uniform soft
assignments, so the soft images start as flat per-image means, the DM loss is large and the
first task gradient dwarfs the auxiliary one. ``--input whitened`` feeds the network the whitened
image (the authors' code, decoct before c935a66); ``--warmup N`` runs ``--palette-warmup N`` first.

    python benchmarks/palette_dm_grad_probe.py --iterations 8
    python benchmarks/palette_dm_grad_probe.py --iterations 8 --warmup 300
    python benchmarks/palette_dm_grad_probe.py --iterations 8 --input whitened
"""

from __future__ import annotations

import argparse

import torch
from palette_warmup_check import WhitenedInput

from decoct.data import load_dataset
from decoct.matching.dm import DistributionMatching, DMConfig, dm_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--batch-real", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--input", choices=("pixel", "whitened"), default="pixel")
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = load_dataset("cifar10")
    dm = DistributionMatching(DMConfig(ipc=10, iterations=args.iterations, palette=64, zca=True,
                                       batch_real=args.batch_real, real_chunk=256, seed=0,
                                       palette_flags={"palette_init": "real", "palette_warmup": args.warmup}))
    dm.init(ds, torch.device("cpu"))
    p = dm.param
    if args.input == "whitened":
        p.net = WhitenedInput(p.net, dm.zca)
        dm.opts = p.optimizers(dm.lr_img)
    if args.warmup:
        print("warm-up end:", {k: round(v, 3) for k, v in dm.warm_start().items()})
    params = list(p.net.parameters())

    def norm() -> float:
        return sum(float(q.grad.pow(2).sum()) for q in params if q.grad is not None) ** 0.5

    for it in range(args.iterations):
        net = dm._new_net()
        seeds = torch.randint(0, 2**31 - 1, (dm.num_classes,)).tolist()
        idx, labels = dm.sample_real()
        real = dm.real_means(net, idx, labels, seeds)
        for opt in dm.opts.values():
            opt.zero_grad(set_to_none=True)
        loss = dm_loss(real, dm.syn_means(net, p(), seeds)) / dm.num_classes
        loss.backward()
        g_task, task_grads = norm(), [None if q.grad is None else q.grad.clone() for q in params]
        for q in params:
            q.grad = None
        aux, metrics = p.aux_loss(dm.gen)
        aux.backward()
        g_aux = norm()
        for q, g in zip(params, task_grads, strict=True):
            if g is not None:
                q.grad = g if q.grad is None else q.grad + g
        for opt in dm.opts.values():
            opt.step()
        print(f"{args.input} warm-up {args.warmup} it {it}: loss {float(loss):8.3f}  |g_task| {g_task:8.3f}  "
              f"|g_aux| {g_aux:6.3f}  colours {metrics['colors_used']:5.1f}  L_b {metrics['L_b']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
