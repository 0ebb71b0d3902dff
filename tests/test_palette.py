"""AutoPalette: palette network, soft/hard quantisation, losses, budget rule, storage, param, entry points."""

import argparse
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from decoct.augment import ZCA
from decoct.data import DatasetInfo, normalize, to_uint8
from decoct.formats.artifact import DistilledSet
from decoct.matching.image_param import PixelParam
from decoct.matching.palette import (
    add_palette_args,
    effective_ipc,
    init_indices,
    init_options,
    make_param,
    palette_budget,
    palette_options,
)
from decoct.matching.palette.losses import (
    alignment_loss,
    balance_loss,
    confidence_loss,
    max_color_loss,
    sample_pixels,
)
from decoct.matching.palette.network import PaletteNet, hard_quantize, soft_quantize
from decoct.matching.palette.palette_param import PaletteParam, index_bits

RGB = DatasetInfo("tiny", ("a", "b"), 3, 4, 4, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


def _param(k=4, n=6, zca=None, seed=0, **kw):
    torch.manual_seed(seed)
    x = torch.randn(n, *RGB.image_shape)
    labels = torch.arange(n) % 2
    labels = labels.sort().values
    init = zca.transform(x) if zca is not None else x
    return PaletteParam(init, labels, zca, k, info=RGB, **kw)


def _fitted_zca():
    g = torch.Generator().manual_seed(1)
    return ZCA().fit(torch.randn(200, *RGB.image_shape, generator=g))


# ----------------------------------------------------------------------------- network


def test_network_shapes_probabilities_and_conv_equivalence():
    torch.manual_seed(0)
    net = PaletteNet(3, 8)
    x = torch.randn(2, 3, 5, 4)
    m = net.probs(x)
    assert m.shape == (2, 8, 5, 4)
    assert torch.allclose(m.sum(1), torch.ones(2, 5, 4), atol=1e-6)
    assert (m >= 0).all()
    # the channels-last matmuls are the two 1x1 convs of the spec (second without bias)
    assert net.conv2.bias is None and net.conv1.kernel_size == (1, 1)
    ref = torch.softmax(net.conv2(torch.relu(net.conv1(x))), dim=1)
    assert torch.allclose(m, ref, atol=1e-5)
    img, m2, pal = net(x)
    assert img.shape == x.shape and pal.shape == (2, 8, 3) and torch.equal(m, m2)
    himg, _, hpal = net(x, hard=True)
    for b in range(2):
        assert len(himg[b].flatten(1).T.unique(dim=0)) <= 8
    with pytest.raises(ValueError, match="colors"):
        PaletteNet(3, 1)
    with pytest.raises(ValueError, match="expected"):
        net.probs(torch.randn(1, 1, 2, 2))


def test_soft_and_hard_quantize_hand_worked():
    # one grey 2x2 image with pixels 0, 1, 2, 3 and K = 2 assignments
    px = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    m0 = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    m = torch.stack([m0, 1 - m0]).unsqueeze(0)
    img, pal = soft_quantize(px, m)
    # P_0 = (0*1 + 1*.5 + 2*0 + 3*.25) / 1.75 = 1.25/1.75; P_1 = (0 + .5 + 2 + 2.25) / 2.25 = 4.75/2.25
    p0, p1 = 1.25 / (1.75 + 1e-8), 4.75 / (2.25 + 1e-8)
    assert torch.allclose(pal.flatten(), torch.tensor([p0, p1]))
    assert torch.allclose(img[0, 0], m0 * p0 + (1 - m0) * p1)
    himg, idx, hpal = hard_quantize(px, m)
    # argmax: pixel 0 -> 0, pixel 1 -> tie 0.5/0.5 -> 0 (first), pixels 2, 3 -> 1
    assert idx.tolist() == [[[0, 0], [1, 1]]]
    assert torch.allclose(hpal.flatten(), torch.tensor([0.5, 2.5]))
    assert torch.allclose(himg[0, 0], torch.tensor([[0.5, 0.5], [2.5, 2.5]]))


# ----------------------------------------------------------------------------- losses

# m for 2 images of 2x2 pixels and K = 2 (colour-1 map = 1 - colour-0 map)
M0 = [torch.tensor([[0.9, 0.2], [0.6, 0.5]]), torch.tensor([[0.1, 0.3], [0.3, 0.3]])]
M = torch.stack([torch.stack([a, 1 - a]) for a in M0])


def test_max_color_loss_hand_worked():
    # image 0: max m_0 = .9, max m_1 = .8; image 1: .3 and .9 -> -(0.9 + 0.8 + 0.3 + 0.9) / 4
    assert math.isclose(float(max_color_loss(M)), -(0.9 + 0.8 + 0.3 + 0.9) / 4, rel_tol=1e-6)


def test_balance_loss_hand_worked_and_sign():
    # usage histograms: image 0 (0.55, 0.45); image 1 (0.25, 0.75); loss = mean of sum q ln q
    q = [(0.55, 0.45), (0.25, 0.75)]
    want = sum(a * math.log(a) + b * math.log(b) for a, b in q) / 2
    assert math.isclose(float(balance_loss(M)), want, rel_tol=1e-6)
    even = torch.full((1, 2, 2, 2), 0.5)
    collapsed = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]).unsqueeze(0)
    assert math.isclose(float(balance_loss(even)), -math.log(2), rel_tol=1e-6)  # the minimum
    assert abs(float(balance_loss(collapsed))) < 1e-6  # the maximum: 0


def test_confidence_loss_hand_worked():
    want = 0.0
    for a in M0:
        for p in a.flatten().tolist():
            want -= p * math.log(p) + (1 - p) * math.log(1 - p)
    assert math.isclose(float(confidence_loss(M)), want / 8, rel_tol=1e-5)


def _align_by_hand(m, target, pixels):
    """Plain-Python L_a for one image: Gram matrices over the sampled pixels, column-normalised."""
    k = len(m)
    f = [[m[c][p] for p in pixels] for c in range(k)]
    t = [[1.0 if target[p] == c else 0.0 for p in pixels] for c in range(k)]
    n = len(pixels)

    def gram(v):
        a = [[sum(v[c][i] * v[c][j] for c in range(k)) for j in range(n)] for i in range(n)]
        norms = [math.sqrt(sum(a[i][j] ** 2 for i in range(n))) for j in range(n)]
        return [[a[i][j] / norms[j] for j in range(n)] for i in range(n)]

    a, at = gram(f), gram(t)
    return sum((a[i][j] - at[i][j]) ** 2 for i in range(n) for j in range(n)) / n


def test_alignment_loss_hand_worked():
    flat = [[M[b, c].flatten().tolist() for c in range(2)] for b in range(2)]
    target = torch.tensor([[[0, 1], [0, 1]], [[1, 1], [0, 0]]])
    tflat = target.flatten(1).tolist()
    # all four pixels
    full = torch.arange(4).repeat(2, 1)
    want = sum(_align_by_hand(flat[b], tflat[b], [0, 1, 2, 3]) for b in range(2)) / 2
    assert math.isclose(float(alignment_loss(M, target, sample=full)), want, rel_tol=1e-5)
    # image 0, pixels 0 and 3 by hand: f0 = (.9, .1), f3 = (.5, .5); both targets differ
    # A = [[.82, .5], [.5, .5]] -> columns /(sqrt(.82^2+.25), sqrt(.5)); A' = I
    c0, c1 = math.sqrt(0.82**2 + 0.25), math.sqrt(0.5)
    a = [[0.82 / c0, 0.5 / c1], [0.5 / c0, 0.5 / c1]]
    want0 = ((a[0][0] - 1) ** 2 + a[1][0] ** 2 + a[0][1] ** 2 + (a[1][1] - 1) ** 2) / 2
    got0 = alignment_loss(M[:1], target[:1], sample=torch.tensor([[0, 3]]))
    assert math.isclose(float(got0), want0, rel_tol=1e-5)
    # a one-hot target map gives the same value as indices
    onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert torch.allclose(alignment_loss(M, onehot, sample=full), alignment_loss(M, target, sample=full))


def test_alignment_loss_zero_on_match_and_blind_to_index_order():
    target = torch.tensor([[[0, 1], [2, 2]]])
    exact = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    full = torch.arange(4).unsqueeze(0)
    assert float(alignment_loss(exact, target, sample=full)) < 1e-10
    relabelled = torch.tensor([[[2, 0], [1, 1]]])  # same grouping, other indices
    assert float(alignment_loss(exact, relabelled, sample=full)) < 1e-10
    merged = torch.tensor([[[0, 0], [2, 2]]])  # a different grouping costs something
    assert float(alignment_loss(exact, merged, sample=full)) > 0.1


def test_sample_pixels_count_distinct_and_seeded():
    s = sample_pixels(3, 1024, 0.3, torch.Generator().manual_seed(0))
    assert s.shape == (3, 307)  # floor(0.3 * 1024), the code's 307 for 32x32
    assert all(len(row.unique()) == 307 for row in s) and int(s.max()) < 1024
    assert not torch.equal(s[0], s[1])  # a fresh draw per image
    assert torch.equal(s, sample_pixels(3, 1024, 0.3, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="sample ratio"):
        sample_pixels(1, 4, 0.0)
    with pytest.raises(ValueError, match="keeps no pixel"):
        sample_pixels(1, 2, 0.2)


# ----------------------------------------------------------------------------- budget rule


@pytest.mark.parametrize("k, factor", [(256, 1), (128, 2), (64, 4), (33, 4), (32, 8), (16, 16), (8, 32),
                                       (4, 64), (2, 128)])
def test_effective_ipc_table(k, factor):
    assert effective_ipc(10, k) == 10 * factor
    assert effective_ipc(3, 0) == 3
    assert index_bits(k) == 8 - int(math.log2(factor))


def test_effective_ipc_rejects_bad_k():
    for bad in (1, 257, -4):
        with pytest.raises(ValueError, match="2..256"):
            effective_ipc(1, bad)
    with pytest.raises(ValueError, match="ipc"):
        effective_ipc(0, 64)


def test_palette_budget_true_bits_cifar_k64():
    b = palette_budget(10, 64, (3, 32, 32))
    assert b["paper_ipc"] == 40 and b["paper_factor"] == 4
    assert b["budget_bits"] == 10 * 24576
    assert b["index_bits_per_image"] == 6144 and b["palette_bits_per_image"] == 1536
    assert b["true_ipc_index_only"] == 40  # the paper's accounting: palettes free
    assert b["true_ipc"] == 32  # 245760 // 7680: palettes charged
    assert math.isclose(b["paper_over_budget"], 1.25)
    # K = 16: the code's x16 is far beyond the 6 images the index bits allow
    b16 = palette_budget(1, 16, (3, 32, 32))
    assert b16["paper_ipc"] == 16 and b16["true_ipc_index_only"] == 6
    assert palette_budget(5, 0, (3, 32, 32))["paper_ipc"] == 5


# ----------------------------------------------------------------------------- parameterisation


def test_zca_bucket_depends_on_pixel_colour_only():
    """With ZCA the network sees the de-whitened image: equal colours share a bucket whatever
    their neighbourhood (whitened values of equal colours differ with the surrounding contrast)."""
    zca = _fitted_zca()
    torch.manual_seed(3)
    x = torch.randn(2, *RGB.image_shape)
    x[1] = x[0]
    x[1, :, 2:, :] = torch.randn(3, 2, 4)  # same top half, different bottom half
    p = PaletteParam(zca.transform(x), torch.tensor([0, 1]), zca, 4, info=RGB)
    w = zca.transform(x)
    assert not torch.allclose(w[0, :, :2], w[1, :, :2], atol=1e-3)  # whitening mixes the halves
    ind, _ = p.hard()
    assert torch.equal(ind[0, :2], ind[1, :2])
    with torch.no_grad():
        assert torch.equal(ind, p.net.probs(zca.inverse(p.images)).argmax(1))


@pytest.mark.parametrize("use_zca", [False, True])
def test_stored_images_k_colours_and_load_reproduces_hard_image(tmp_path, use_zca):
    zca = _fitted_zca() if use_zca else None
    p = _param(k=4, zca=zca)
    # the training-time hard image, computed independently of to_set: the network in hard mode
    with torch.no_grad():
        pix = zca.inverse(p.images) if zca is not None else p.images
        hard_img, _, _ = p.net(pix, pixels=pix, hard=True)  # the net sees pixel space (ZCA undone)
    expected = to_uint8(hard_img, RGB)
    dset = p.to_set(RGB, method="dm", meta={"ipc": 1})
    assert dset.is_palette and dset.palettes.shape == (6, 4, 3)
    assert dset.meta["palette"]["budget"] == palette_budget(1, 4, RGB.image_shape)
    for img in dset.images:
        assert len(img.flatten(1).T.unique(dim=0)) <= 4
    dset.save(tmp_path / "a")
    loaded = DistilledSet.load(tmp_path / "a")
    assert torch.equal(loaded.images, expected)
    assert loaded.is_palette and loaded.palettes.shape[1] == 4
    assert ("zca" in loaded.attachments) == use_zca
    assert loaded.meta["palette"]["colors"] == 4
    # what evaluation feeds a network (normalise, re-whiten) is what param.quantized() gives
    seen = normalize(loaded.images, RGB)
    if use_zca:
        seen = ZCA.from_state_dict(loaded.attachments["zca"]).transform(seen)
    assert torch.allclose(p.quantized(), seen, atol=1e-5)


def test_soft_forward_in_zca_space_is_whitened_pixel_space_palette():
    zca = _fitted_zca()
    p = _param(k=3, zca=zca)
    y = p()
    pix = zca.inverse(p.images)
    soft, _ = soft_quantize(pix, p.net.probs(pix))
    assert torch.allclose(y, zca.transform(soft), atol=1e-5)
    assert torch.allclose(p(torch.tensor([4, 1])), y[[4, 1]], atol=1e-6)


def test_gradient_routing_task_and_aux():
    p = _param(k=4)
    p().pow(2).mean().backward()
    assert p.images.grad is not None and p.images.grad.abs().sum() > 0
    assert p.net.conv1.weight.grad.abs().sum() > 0 and p.net.conv2.weight.grad.abs().sum() > 0
    q = _param(k=4)
    aux, metrics = q.aux_loss(torch.Generator().manual_seed(0))
    aux.backward()
    assert q.images.grad is None  # auxiliary losses never reach the pixels
    assert q.net.conv1.weight.grad.abs().sum() > 0
    assert set(metrics) == {"L_m", "L_b", "L_a", "colors_used"}
    total = q.alpha * metrics["L_m"] + q.beta * metrics["L_b"] + q.gamma * metrics["L_a"]
    assert math.isclose(float(aux.detach()), total, rel_tol=1e-5)
    assert 1 <= metrics["colors_used"] <= 4


def test_aux_loss_weights_subset_and_determinism():
    p = _param(k=4, alpha=2.0, beta=0.5, gamma=0.0, conf=1.5, aux_images=3)
    a1, m1 = p.aux_loss(torch.Generator().manual_seed(3))
    a2, m2 = p.aux_loss(torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and m1 == m2
    assert "L_a" not in m1 and "L_conf" in m1
    assert math.isclose(float(a1.detach()), 2.0 * m1["L_m"] + 0.5 * m1["L_b"] + 1.5 * m1["L_conf"], rel_tol=1e-5)


def test_optimizers_and_state_dict_roundtrip():
    p = _param(k=4, lr_palette=0.07)
    opts = p.optimizers(lr_img=2.0, momentum=0.5)
    assert set(opts) == {"images", "palette"}
    pg = opts["palette"].param_groups[0]
    assert (pg["lr"], pg["momentum"], pg["weight_decay"]) == (0.07, 0.5, 5e-4)
    assert opts["images"].param_groups[0]["lr"] == 2.0
    assert p.optimizers(lr_img=1.0, lr_palette=0.01)["palette"].param_groups[0]["lr"] == 0.01
    q = _param(k=4, seed=5)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q(), p())


def test_param_validation():
    x, lab = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="info"):
        PaletteParam(x, lab, None, 4)
    with pytest.raises(ValueError, match="2..256"):
        PaletteParam(x, lab, None, 300, info=RGB)
    with pytest.raises(ValueError, match="init must be"):
        PaletteParam(torch.randn(2, 3, 5, 5), lab, None, 4, info=RGB)
    with pytest.raises(ValueError, match="quantizer"):
        PaletteParam(x, lab, None, 4, info=RGB, quantizer="nope")
    with pytest.raises(ValueError, match="gamma"):
        PaletteParam(x, lab, None, 4, info=RGB, gamma=-1)
    with pytest.raises(ValueError, match="unknown palette option"):
        make_param(x, lab, None, 4, info=RGB, lr_pallete=0.1)


# ----------------------------------------------------------------------------- entry points


def test_make_param_dispatch_and_flags():
    x, lab = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    assert isinstance(make_param(x, lab, None, 0, info=RGB, alpha=5.0), PixelParam)
    p = argparse.ArgumentParser()
    add_palette_args(p)
    ns = p.parse_args(["--palette", "16", "--palette-gamma", "10", "--lr-palette", "0.01",
                       "--palette-init-epochs", "50"])
    opts = palette_options(ns, info=RGB)
    assert opts["gamma"] == 10.0 and opts["lr_palette"] == 0.01 and opts["info"] is RGB
    param = make_param(x, lab, None, ns.palette, **opts)
    assert isinstance(param, PaletteParam) and param.colors == 16 and param.gamma == 10.0
    io = init_options(ns)
    assert io["method"] == "graphcut" and io["epochs"] == 50
    assert init_options({"palette": 0}) == {"method": "real"}
    assert init_options({"palette": 8, "palette_init": "real", "palette_init_epochs": 3}) == {"method": "real"}


def test_init_indices_real_and_errors(digits):
    idx = init_indices(digits, 3, 0, "real", seed=1)
    assert len(idx) == 30
    assert torch.equal(digits.train.labels[idx], torch.arange(10).repeat_interleave(3))
    with pytest.raises(ValueError, match="unknown init"):
        init_indices(digits, 1, 4, "kmeans")
    with pytest.raises(ValueError, match="no options"):
        init_indices(digits, 1, 4, "real", epochs=3)


# ----------------------------------------------------------------------------- DM-style smoke


def test_dm_style_steps_on_digits_change_images_and_net(digits):
    from decoct.models import model_for

    info = digits.info
    k = 4
    n = 2  # per class (not enlarged: a smoke test)
    idx = init_indices(digits, n, k, "real", seed=0)
    torch.manual_seed(0)
    param = make_param(normalize(digits.train.images[idx], info), digits.train.labels[idx], None, k,
                       info=info, aux_images=8)
    opts = param.optimizers(lr_img=1.0)
    before_img = param.images.detach().clone()
    before_net = param.net.conv1.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    real = normalize(digits.train.images[:100], info)
    real_y = digits.train.labels[:100]
    for _ in range(2):
        net = model_for("convnet", info, width=16)
        for q in net.parameters():
            q.requires_grad_(False)
        syn = param()
        loss = sum(((net.embed(real[real_y == c]).mean(0) - net.embed(syn[param.labels == c]).mean(0)) ** 2).sum()
                   for c in range(info.num_classes))
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        aux, metrics = param.aux_loss(g)
        aux.backward()
        for o in opts.values():
            o.step()
    assert (param.images.detach() - before_img).abs().max() > 1e-4
    assert (param.net.conv1.weight.detach() - before_net).abs().max() > 1e-6
    dset = param.to_set(info, method="dm")
    assert dset.is_palette and len(dset) == 20
    assert all(len(im.unique()) <= k for im in dset.images)


def test_aux_losses_alone_spread_colours():
    """Fig. 2 of the paper: the palette losses keep buckets alive; 20 steps raise colours used."""
    p = _param(k=8, n=8, gamma=0.0, aux_images=8)
    opt = p.optimizers(lr_img=0.0, lr_palette=0.5)["palette"]
    g = torch.Generator().manual_seed(0)
    first_loss, first = p.aux_loss(g)
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        aux, m = p.aux_loss(g)
        aux.backward()
        opt.step()
    assert float(aux.detach()) < float(first_loss.detach()) - 0.2
    assert m["L_m"] < first["L_m"] - 0.2  # every colour's best pixel got more confident
    assert m["colors_used"] >= first["colors_used"] + 2  # 4.1 -> 7.6 of 8 here


def test_palette_budget_factor_matches_brute_force_rule():
    for k in range(2, 257):
        bits = next(b for b in itertools.count() if 2**b >= k)
        assert effective_ipc(1, k) == 2 ** (8 - bits)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("ds, ipc", [("cifar10", 1), ("cifar10", 10), ("cifar10", 50), ("cifar100", 1),
                                     ("cifar100", 10), ("cifar100", 50)])
def test_dm_presets_resolve_to_table9(ds, ipc):
    from pathlib import Path

    from decoct.cli import build_parser
    from decoct.cli.common import _resolve
    from decoct.matching.dm import DMConfig

    path = Path(__file__).parent.parent / "configs" / "autopalette" / f"dm-{ds}-ipc{ipc}.yaml"
    args = _resolve(build_parser(), ["distill", "dm", "--dataset", ds, "--out", "x", "--config", str(path)])
    cfg = DMConfig.from_dict(vars(args))
    assert (cfg.ipc, cfg.palette, cfg.zca) == (ipc, 64, True)
    assert cfg.resolved_lr_img == (10.0 if ipc == 50 else 1.0)  # Table 9
    assert (args.lr_palette, args.palette_alpha, args.palette_beta, args.palette_gamma) == (0.05, 1.0, 1.0, 3.0)
    assert (args.palette_init, args.palette_init_epochs, args.palette_aux_images) == ("graphcut", 50, 64)
    assert init_options(vars(args))["method"] == "graphcut"
    # the code's 2-epoch warm-up (not the paper's): without it DM's first step collapses the network
    assert (args.palette_warmup, args.palette_warmup_batch) == (1563, 64)


def test_warmup_trains_only_the_network_and_lowers_the_aux_loss():
    """The code's --use_warmup: aux losses on real batches, network only, loss goes down."""
    from decoct.matching.palette import warmup_palette

    p = _param(k=4, n=6, aux_images=16, lr_palette=0.5)
    real = torch.randn(64, *RGB.image_shape, generator=torch.Generator().manual_seed(5))
    images0 = p.images.detach().clone()
    net0 = [t.detach().clone() for t in p.net.parameters()]
    before = float(p._aux_on(real[:16], torch.Generator().manual_seed(9))[0].detach())
    seen = []
    m = warmup_palette(p, {"palette_warmup": 30, "palette_warmup_batch": 16}, len(real),
                       lambda i: (seen.append(i.clone()), real[i])[1], seed=0)
    after = float(p._aux_on(real[:16], torch.Generator().manual_seed(9))[0].detach())
    assert len(seen) == 30 and all(len(i) == 16 and int(i.max()) < 64 for i in seen)
    assert torch.equal(p.images.detach(), images0)  # pixels untouched
    assert any(not torch.equal(a, b.detach()) for a, b in zip(net0, p.net.parameters(), strict=True))
    assert after < before and "colors_used" in m
    assert warmup_palette(p, {"palette_warmup": 0}, 64, lambda i: real[i], seed=0) == {}
    with pytest.raises(ValueError, match="needs --palette"):
        warmup_palette(make_param(real[:2], torch.tensor([0, 1]), None, 0), {"palette_warmup": 3}, 64,
                       lambda i: real[i], seed=0)
