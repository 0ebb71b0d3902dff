"""Classic colour quantisers (median cut, octree, k-means) and ``decoct quantize``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from decoct.data import DatasetInfo, normalize
from decoct.formats.artifact import DistilledSet
from decoct.matching.palette.quantize import (
    QUANTIZERS,
    gather,
    quantize,
    quantize_command,
    quantize_float,
    quantize_set,
)


def _distinct(img: torch.Tensor) -> int:
    """Distinct colours of one (C, H, W) image."""
    return len(torch.unique(img.flatten(1).T, dim=0))


def _smooth_images(n: int, c: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images with many colours (gradients + noise), like real photos."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    base = ramp.view(1, 1, 1, -1) + ramp.view(1, 1, -1, 1) * 0.25
    x = base + torch.randint(0, 55, (n, c, size, size), generator=g)
    return x.clamp(0, 255).to(torch.uint8)


def _few_colour_images(n: int, c: int, colours: int, size: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pal = torch.randperm(256, generator=g)[: colours * c].view(colours, c).to(torch.uint8)
        idx = torch.randint(colours, (size, size), generator=g)
        idx.view(-1)[:colours] = torch.arange(colours)  # every colour used
        out.append(pal[idx].permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("c", [3, 1])
@pytest.mark.parametrize("k", [2, 5, 16])
def test_at_most_k_colours_and_padded_palette(method: str, c: int, k: int) -> None:
    x = _smooth_images(3, c)
    idx, pal = quantize(x, k, method)
    assert idx.dtype == torch.uint8 and idx.shape == (3, 12, 12)
    assert pal.dtype == torch.uint8 and pal.shape == (3, k, c)
    assert int(idx.max()) < k
    out = gather(idx, pal)
    for i in range(3):
        assert _distinct(out[i]) <= k
        assert _distinct(x[i]) > k  # the test images really needed reducing
        # every palette entry is a colour the image actually uses (unused entries repeat one)
        used = {tuple(v) for v in out[i].flatten(1).T.tolist()}
        assert {tuple(v) for v in pal[i].tolist()} <= used
    # a palette set builds (the artifact's own consistency check passes)
    info = DatasetInfo("t", tuple("ab"), c, 12, 12, (0.5,) * c, (0.25,) * c)
    DistilledSet.from_palette(info, idx, pal, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("c", [3, 1])
def test_image_with_few_colours_is_reproduced_exactly(method: str, c: int) -> None:
    x = _few_colour_images(4, c, colours=4)
    for k in (4, 7):
        idx, pal = quantize(x, k, method)
        assert torch.equal(gather(idx, pal), x), (method, k)


@pytest.mark.parametrize("method", ["mediancut", "octree"])
def test_gather_equals_pillow_output(method: str) -> None:
    x = _smooth_images(2, 3)
    idx, pal = quantize(x, 8, method)
    pil_method = Image.Quantize.MEDIANCUT if method == "mediancut" else Image.Quantize.FASTOCTREE
    for i in range(2):
        im = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        ref = np.asarray(im.quantize(colors=8, method=pil_method, dither=Image.Dither.NONE).convert("RGB"))
        assert np.array_equal(gather(idx, pal)[i].permute(1, 2, 0).numpy(), ref)


def test_greyscale_matches_pillow_l_mode() -> None:
    x = _smooth_images(1, 1)
    idx, pal = quantize(x, 4, "mediancut")
    ref = np.asarray(Image.fromarray(x[0, 0].numpy()).quantize(colors=4, dither=Image.Dither.NONE).convert("L"))
    assert np.array_equal(gather(idx, pal)[0, 0].numpy(), ref)


def test_kmeans_two_clusters_by_hand() -> None:
    """Two tight colour clusters: k-means must return their (rounded) means and split them."""
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    left = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    right = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)
    x[0, :, :, :2] = left
    x[0, :, :, 2:] = right
    x[0, :, 0, 0] = torch.tensor([12, 22, 32])  # one pixel off: left mean is (10.125, 20.125, 30.125)
    x[0, :, 3, 3] = torch.tensor([196, 96, 46])  # right mean is (199.5, 99.5, 49.5) -> rounds to 200/100/50
    idx, pal = quantize(x, 2, "kmeans", seed=3)
    side = idx[0]
    assert (side[:, :2] == side[0, 0]).all() and (side[:, 2:] == side[0, 3]).all()
    assert side[0, 0] != side[0, 3]
    assert pal[0, int(side[0, 0])].tolist() == [10, 20, 30]
    assert pal[0, int(side[0, 3])].tolist() == [200, 100, 50]


def test_kmeans_is_seeded_and_batched_consistently() -> None:
    x = _smooth_images(5, 3, seed=4)
    a = quantize(x, 6, "kmeans", seed=7)
    b = quantize(x, 6, "kmeans", seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # batched k-means is at least as good as median cut here (squared error per image, on average)
    err_k = (gather(*a).float() - x.float()).pow(2).mean()
    err_m = (gather(*quantize(x, 6, "mediancut")).float() - x.float()).pow(2).mean()
    assert err_k <= err_m * 1.05


def test_bad_inputs_raise_clear_errors() -> None:
    x = _smooth_images(1, 3)
    with pytest.raises(ValueError, match="2..256"):
        quantize(x, 1)
    with pytest.raises(ValueError, match="2..256"):
        quantize(x, 257)
    with pytest.raises(ValueError, match="unknown quantiser"):
        quantize(x, 4, "wu")
    with pytest.raises(ValueError, match="uint8"):
        quantize(x.float(), 4)


def test_quantize_float_and_set_roundtrip(tmp_path) -> None:
    info = DatasetInfo("t", tuple("ab"), 3, 12, 12, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = _smooth_images(2, 3)
    idx, pal = quantize_float(normalize(x, info), info, 8)
    assert torch.equal(gather(idx, pal), gather(*quantize(x, 8)))
    src = DistilledSet(info, x, torch.tensor([0, 1]), method="dm", soft_labels=torch.rand(2, 2))
    q = quantize_set(src, 8, "octree")
    assert q.method == "dm+octree8" and q.meta["quantizer"]["colors"] == 8
    assert torch.equal(q.soft_labels, src.soft_labels)
    q.save(tmp_path / "a")
    src.save(tmp_path / "b")
    back = DistilledSet.load(tmp_path / "a")
    assert back.is_palette and torch.equal(back.images, q.images)
    raw_q, raw_src = q.storage(tmp_path / "a")["raw_bytes"], src.storage(tmp_path / "b")["raw_bytes"]
    # 3 bits per pixel + 8 colours x 3 bytes, against 24 bits per pixel
    assert raw_q["images"] == 2 * 12 * 12 * 3 // 8 and raw_q["palettes"] == 2 * 8 * 3
    assert raw_q["total"] < raw_src["total"]


def test_quantize_command_real_and_artifact(tmp_path) -> None:
    s = quantize_command(dataset="digits", ipc=2, colors=4, method="mediancut", out=tmp_path / "q", device="cpu")
    assert s.num_images == 20
    dset = DistilledSet.load(tmp_path / "q" / "artifact")
    assert dset.is_palette and dset.palettes.shape[1] == 4 and dset.meta["quantizer"]["method"] == "mediancut"
    for i in range(len(dset)):
        assert _distinct(dset.images[i]) <= 4
    s2 = quantize_command(tmp_path / "q", colors=2, method="kmeans", out=tmp_path / "q2", device="cpu")
    assert s2.num_images == 20 and s2.bytes_on_disk > 0
    assert DistilledSet.load(tmp_path / "q2" / "artifact").method == "random+mediancut4+kmeans2"
    with pytest.raises(ValueError, match="either SRC"):
        quantize_command(tmp_path / "q", dataset="digits", ipc=2, colors=4, out=tmp_path / "q3")


def test_quantize_cli_single_and_grid(tmp_path, capsys) -> None:
    from decoct.cli import main

    assert main(["quantize", "--dataset", "digits", "--ipc", "1", "--colors", "4", "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    assert DistilledSet.load(tmp_path / "one" / "artifact").palettes.shape[1] == 4
    assert main(["quantize", str(tmp_path / "one"), "--colors", "2", "4", "--method", "mediancut", "octree",
                 "--out", str(tmp_path / "grid")]) == 0
    cells = sorted(p.name for p in (tmp_path / "grid").iterdir())
    assert cells == ["mediancut-k2", "mediancut-k4", "octree-k2", "octree-k4"]
    k2 = DistilledSet.load(tmp_path / "grid" / "octree-k2" / "artifact")
    assert k2.method == "random+mediancut4+octree2" and k2.palettes.shape[1] == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "10 images" in ln]
    assert len(lines) == 5  # one summary per run: the single one, then one per grid cell
    assert main(["quantize", "--colors", "4", "--out", str(tmp_path / "bad")]) == 2


def test_quantize_drops_label_files_it_cannot_use(tmp_path, capsys) -> None:
    """A label store labels the source pixels; the palette copy neither uses nor pays for it."""
    info = DatasetInfo("t", tuple("ab"), 3, 12, 12, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = _smooth_images(2, 3)
    store = {"fkd": {"header": torch.arange(40, dtype=torch.uint8)},
             "fkd-e00000": {"logits": torch.randn(64, 2).half()}}
    soft = torch.rand(2, 2)
    src = DistilledSet(info, x, torch.tensor([0, 1]), method="dm", soft_labels=soft, label_files=store,
                       meta={"syn_lr": 0.01})
    q = quantize_set(src, 4)
    assert q.label_files == {} and q.meta["quantizer"]["dropped_label_files"] == ["fkd", "fkd-e00000"]
    assert torch.equal(q.soft_labels, soft) and "kept" in q.meta["quantizer"]["soft_labels"]
    assert q.meta["syn_lr"] == 0.01
    src.save(tmp_path / "src")
    capsys.readouterr()
    quantize_command(tmp_path / "src", colors=4, out=tmp_path / "q", device="cpu")
    assert "dropped the source's label files (fkd, fkd-e00000)" in capsys.readouterr().out
    art = tmp_path / "q" / "artifact"
    labels = sorted(p.name for p in (art / "labels").iterdir())
    assert labels == ["soft.safetensors"]  # the store's files are gone, soft labels stay
    st = DistilledSet.load(art).storage(art)
    assert st["bytes_on_disk"]["labels"] == (art / "labels" / "soft.safetensors").stat().st_size


def test_colours_in_use_and_the_collapse_warning():
    """Hand-made: image 0 is one flat colour, image 1 has 3 colours (one repeated), image 2 has all 16
    pixels distinct; a 64-colour set averaging (1 + 3 + 16) / 3 = 6.67 < 8 colours is flagged, 16 colours
    at K = 16 are not."""
    from decoct.matching.palette.quantize import colours_in_use, palette_collapse_note

    x = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    x[0] = 7
    x[1, 0, 0, :2], x[1, 1, 1, 0] = 200, 50
    x[2] = torch.arange(16, dtype=torch.uint8).view(1, 4, 4) * torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
    assert colours_in_use(x).tolist() == [1, 3, 16]
    assert colours_in_use(x.float() / 255).tolist() == [1, 3, 16]  # [0, 1] floats round to the same 8-bit colours
    note = palette_collapse_note(x, 64, "use --palette-warmup")
    assert note == ("warning: the palette collapsed: the images use 6.7 of their 64 colours on average (under 8); "
                    "use --palette-warmup")
    assert palette_collapse_note(x[2:], 16, "x") is None and palette_collapse_note(x, 0, "x") is None
