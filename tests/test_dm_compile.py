"""DM's ``compile`` option: one compiled net that takes each iteration's fresh draw, the same RNG use
and the same loss and gradients as the eager path (up to float32 rounding), one clear line on failure."""

from __future__ import annotations

import pytest
import torch

from decoct.cli import build_parser
from decoct.data import Dataset, DatasetInfo, ImageSplit
from decoct.matching.dm import DistributionMatching, DMConfig, dm_loss, dm_loss_reference

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _data(n_per_class: tuple[int, ...] = (20, 14, 17), size: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(0)
    info = DatasetInfo("tiny", tuple(f"c{i}" for i in range(len(n_per_class))), 3, size, size, (0.5, 0.4, 0.3),
                       (0.2, 0.25, 0.3))
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    return Dataset(info, ImageSplit(images, labels), ImageSplit(images[:6], labels[:6]))


def _dm(compile_: bool, **kw) -> DistributionMatching:
    cfg = dict(ipc=2, iterations=4, batch_real=9, width=8, real_chunk=7, seed=3, compile=compile_)
    cfg.update(kw)
    m = DistributionMatching(DMConfig(**cfg))
    m.init(_data(), CPU)
    return m


def test_compiled_net_takes_each_fresh_draw_with_the_eager_rng_use():
    """No compilation happens here (torch.compile is lazy): the weights and the RNG stream only."""
    eager, comp = _dm(False), _dm(True)
    assert comp._net is not None and eager._net is None
    for it in range(2):
        torch.manual_seed(10 + it)
        a = eager._new_net()
        after_a = torch.randn(3)
        torch.manual_seed(10 + it)
        b = comp._new_net()
        after_b = torch.randn(3)
        assert b is comp._net  # one net, compiled once, not rebuilt per iteration
        assert torch.equal(after_a, after_b)  # the same RNG use as eager (resume stays exact)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(p.requires_grad for p in b.parameters())
    # building the compiled net at init did not shift the seeded stream: same initial images
    assert torch.equal(eager.param.images, comp.param.images)


def test_compiler_failure_is_one_line_naming_the_flag():
    m = _dm(True)
    inductor_error = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})

    def broken(x):
        raise inductor_error("C++ compile error\nlong log line 2\nline 3")

    m._compiled = broken
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"^--compile: torch.compile of the embedding failed on cpu "
                                           r"\(InductorError: C\+\+ compile error\); run without --compile$"):
        m.step(0)

    def user_bug(x):  # not a compiler error: passes through unchanged
        raise KeyError("something else")

    m._compiled = user_bug
    with pytest.raises(KeyError, match="something else"):
        m.step(0)


def test_cli_flag_reaches_the_config():
    p = build_parser()
    base = ["distill", "dm", "--dataset", "digits", "--out", "x"]
    assert p.parse_args(base).compile is False
    args = p.parse_args([*base, "--compile"])
    assert args.compile is True
    assert DMConfig.from_dict(vars(args)).compile is True


@pytest.mark.slow
def test_compiled_loss_and_gradient_equal_the_eager_per_class_loop():
    """Inductor (fused norm, ReLU, pooling): the batched, compiled loss and image gradient equal the plain
    per-class eager loop's up to float32 rounding; two compiled steps equal two eager steps."""
    m = _dm(True, real_chunk=0)  # all 27 real images in one forward: two graphs to compile, not three
    torch.manual_seed(5)
    net = m._new_net()
    seeds = [11, 22, 33]
    idx, labels = m.sample_real()
    try:
        loss = dm_loss(m.real_means(net, idx, labels, seeds), m.syn_means(net, m.param(), seeds))
    except RuntimeError as e:
        if str(e).startswith("--compile:"):
            pytest.skip(f"torch.compile does not work here: {e}")
        raise
    assert m._compiled is not None
    (g,) = torch.autograd.grad(loss, m.param.images)
    real = [m._real_batch(idx[labels == c]) for c in range(3)]
    syn = [m.param()[m.syn_index[c]] for c in range(3)]
    ref = dm_loss_reference(net.embed, real, syn, seeds, lambda z, s: m.dsa(z, seed=s))  # eager, same weights
    (g_ref,) = torch.autograd.grad(ref, m.param.images)
    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6)

    eager = _dm(False, real_chunk=0)
    start = eager.param.images.detach().clone()
    assert torch.equal(start, m.param.images)
    for model in (eager, m):  # the same seed: the same nets, real batches and DSA draws
        torch.manual_seed(7)
        for it in range(2):
            model.step(it)
    assert not torch.equal(eager.param.images, start)  # the steps moved the images
    torch.testing.assert_close(m.param.images, eager.param.images, rtol=1e-4, atol=1e-5)
