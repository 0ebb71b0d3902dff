"""DistilledSet: exact save/load, storage accounting from real files, corruption detection."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import decoct.formats.artifact as art
import decoct.formats.png as png_mod
from decoct.data.types import DatasetInfo, normalize
from decoct.formats.artifact import DistilledSet, verify
from decoct.formats.errors import ArtifactError


def make_info(
    channels: int = 3, size: int = 8, classes: tuple[str, ...] = ("cat", "dog", "red car")
) -> DatasetInfo:
    return DatasetInfo(
        name="toy",
        classes=classes,
        channels=channels,
        height=size,
        width=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def rgb_set(
    n_per_class: tuple[int, ...] = (2, 1, 2), channels: int = 3, seed: int = 0, **kw
) -> DistilledSet:
    info = make_info(channels)
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(n_per_class)), torch.tensor(n_per_class))
    images = torch.randint(0, 256, (len(labels), channels, 8, 8), generator=g, dtype=torch.uint8)
    return DistilledSet(
        info, images, labels, method="test", config={"ipc": 2}, meta={"seed": seed}, **kw
    )


def palette_set(k: int = 4, channels: int = 3, size: int = 8, seed: int = 0) -> DistilledSet:
    info = make_info(channels, size)
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 1, 2])
    idx = torch.randint(0, k, (4, size, size), generator=g).to(torch.uint8)
    pal = torch.randint(0, 256, (4, k, channels), generator=g, dtype=torch.uint8)
    return DistilledSet.from_palette(info, idx, pal, labels, method="palette-test")


def files_under(root: Path) -> dict[str, int]:
    """Relative path -> size, walking the directory independently of the manifest."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = os.path.getsize(p)
    return out


def png_layout(path: Path) -> tuple[int, int]:
    """(IHDR bit depth, PLTE entries) parsed straight from the PNG bytes."""
    data = path.read_bytes()
    depth = data[8 + 8 + 8]  # signature, chunk length+type, width+height
    pos, plte = 8, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"PLTE":
            plte = length // 3
        pos += 12 + length
    return depth, plte


# ---------------------------------------------------------------------- round trips
def test_rgb_roundtrip_is_exact(tmp_path: Path) -> None:
    ds = rgb_set()
    ds.save(tmp_path / "a")
    back = DistilledSet.load(tmp_path / "a")
    assert torch.equal(back.images, ds.images)
    assert torch.equal(back.labels, ds.labels) and back.labels.dtype == torch.int64
    assert back.info == ds.info and back.method == "test"
    assert back.config == {"ipc": 2} and back.meta == {"seed": 0}
    assert back.ipc == [2, 1, 2] and len(back) == 5
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["format"] == "decoct-distilled-set" and m["version"] == 1
    assert m["image_storage"] == "png-rgb" and m["labels"]["hard"] == [0, 0, 1, 2, 2]
    assert m["counts_per_class"] == [2, 1, 2] and m["num_images"] == 5
    assert (tmp_path / "a" / "images" / "002_red_car" / "00001.png").is_file()
    with Image.open(tmp_path / "a" / "images" / "000_cat" / "00000.png") as im:
        assert im.mode == "RGB"


def test_save_stores_canonical_order(tmp_path: Path) -> None:
    ds = rgb_set()
    perm = torch.tensor([3, 0, 2, 4, 1])  # labels 2,0,1,2,0; within a class still in order
    shuffled = DistilledSet(ds.info, ds.images[perm], ds.labels[perm], method="test")
    assert not shuffled.is_canonical
    shuffled.save(tmp_path / "a")
    back = DistilledSet.load(tmp_path / "a")
    assert torch.equal(back.images, shuffled.canonical().images)
    assert torch.equal(back.images, ds.images)  # stable sort restores the original order here


def test_soft_labels_roundtrip_within_fp16(tmp_path: Path) -> None:
    soft = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) * 3
    ds = rgb_set(soft_labels=soft)
    ds.save(tmp_path / "a")
    back = DistilledSet.load(tmp_path / "a")
    assert back.soft_labels is not None and back.soft_labels.dtype == torch.float32
    assert torch.equal(back.soft_labels, soft.half().float())
    assert torch.allclose(back.soft_labels, soft, rtol=1e-3, atol=1e-3)


def test_palette_roundtrip_and_png_mode(tmp_path: Path) -> None:
    ds = palette_set(k=4)
    ds.save(tmp_path / "p")
    back = DistilledSet.load(tmp_path / "p")
    assert torch.equal(back.palette_indices, ds.palette_indices)
    assert torch.equal(back.palettes, ds.palettes)
    assert torch.equal(back.images, ds.images)
    png = tmp_path / "p" / "images" / "000_cat" / "00000.png"
    with Image.open(png) as im:
        assert im.mode == "P"
        assert len(im.getpalette()) // 3 <= 4
        assert len(im.getcolors()) <= 4
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["image_storage"] == "png-palette" and m["palette_sizes"] == [4, 4, 4, 4]


@pytest.mark.parametrize(("k", "depth"), [(2, 1), (3, 2), (4, 2), (16, 4), (17, 8)])
def test_palette_png_uses_smallest_bit_depth(tmp_path: Path, k: int, depth: int) -> None:
    palette_set(k=k).save(tmp_path / "p")
    for png in (tmp_path / "p" / "images").rglob("*.png"):
        assert png_layout(png) == (depth, k)


def test_grayscale_roundtrip(tmp_path: Path) -> None:
    ds = rgb_set(channels=1)
    ds.save(tmp_path / "g")
    back = DistilledSet.load(tmp_path / "g")
    assert torch.equal(back.images, ds.images)
    with Image.open(next((tmp_path / "g" / "images").rglob("*.png"))) as im:
        assert im.mode == "L"
    pal = palette_set(k=2, channels=1)
    pal.save(tmp_path / "gp")
    back = DistilledSet.load(tmp_path / "gp")
    assert torch.equal(back.palettes, pal.palettes) and torch.equal(back.images, pal.images)


def test_float_storage_and_attachments_roundtrip(tmp_path: Path) -> None:
    info = make_info()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ds = DistilledSet.from_float(
        info,
        x,
        torch.tensor([0, 1, 2]),
        float_storage=torch.float16,
        method="tm",
        attachments={"zca": {"mean": torch.zeros(192), "transform": torch.eye(4)}},
        label_files={"fkd": {"logits": torch.ones(3, 2, 3)}},
    )
    ds.save(tmp_path / "f")
    back = DistilledSet.load(tmp_path / "f")
    assert back.image_storage == "safetensors-float16"
    assert torch.equal(back.float_images, x.half())
    assert torch.equal(back.images, ds.images)
    assert torch.equal(back.to_float(), x.half().float())
    assert torch.equal(back.attachments["zca"]["transform"], torch.eye(4))
    assert torch.equal(back.label_files["fkd"]["logits"], torch.ones(3, 2, 3))
    st = back.storage()
    assert st["raw_bytes"]["images"] == 3 * 3 * 8 * 8 * 2
    assert st["raw_bytes"]["labels"] == math.ceil((3 * 2 + 18 * 32) / 8)  # hard 2 bits + fkd fp32
    assert st["raw_bytes"]["extra"] == (192 + 16) * 4


def test_from_float_quantises_like_to_uint8() -> None:
    info = make_info()
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    ds = DistilledSet.from_float(info, normalize(images, info), torch.tensor([0, 1, 2]))
    assert torch.equal(ds.images, images) and ds.float_images is None
    assert torch.allclose(ds.to_float(), normalize(images, info))


# ---------------------------------------------------------------------- storage accounting
def test_bytes_on_disk_match_files(tmp_path: Path) -> None:
    ds = rgb_set(
        soft_labels=torch.rand(5, 3),
        attachments={"zca": {"m": torch.ones(7)}},
        label_files={"fkd": {"logits": torch.ones(5, 3)}},
    )
    ds.save(tmp_path / "a")
    sizes = files_under(tmp_path / "a")
    images = sum(v for k, v in sizes.items() if k.startswith("images/"))
    labels = sum(v for k, v in sizes.items() if k.startswith("labels/"))
    extra = sum(v for k, v in sizes.items() if k.startswith("extra/"))
    assert images + labels + extra + sizes["manifest.json"] == sum(sizes.values())
    expected = {"images": images, "labels": labels, "extra": extra, "total": images + labels}
    assert ds.storage()["bytes_on_disk"] == expected
    assert ds.storage(tmp_path / "a")["bytes_on_disk"] == expected
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["storage"]["bytes_on_disk"] == expected
    assert set(m["files"]) == set(sizes) - {"manifest.json"}
    assert all(m["files"][k]["bytes"] == v for k, v in sizes.items() if k != "manifest.json")


def test_raw_bytes_rgb_hand_computed(tmp_path: Path) -> None:
    ds = rgb_set(n_per_class=(2, 1, 1))
    ds.save(tmp_path / "a")
    raw = ds.storage()["raw_bytes"]
    assert raw["images"] == 4 * 3 * 8 * 8 == 768
    assert raw["palettes"] == 0
    assert raw["labels"] == 1  # 4 labels x ceil(log2 3) = 2 bits = 8 bits
    assert raw["total"] == 769
    assert ds.storage()["bits_per_pixel"]["raw"] == 24.0


def test_raw_bytes_palette_hand_computed(tmp_path: Path) -> None:
    ds = palette_set(k=4)
    ds.save(tmp_path / "p")
    st = ds.storage()
    assert st["raw_bytes"]["images"] == 4 * 8 * 8 * 2 // 8 == 64  # 2 bits per pixel
    assert st["raw_bytes"]["palettes"] == 4 * 4 * 3 == 48
    assert st["raw_bytes"]["total"] == 64 + 48 + 1
    assert st["bits_per_pixel"]["raw"] == (4 * 64 * 2 + 48 * 8) / (4 * 64)


def test_storage_requires_save_or_path() -> None:
    with pytest.raises(ValueError, match="pass a path"):
        rgb_set().storage()


def test_four_colour_palette_png_smaller_than_rgb(tmp_path: Path) -> None:
    ds = palette_set(k=4, size=16)
    ds.save(tmp_path / "p")
    DistilledSet(ds.info, ds.images, ds.labels).save(tmp_path / "r")
    pal = DistilledSet.load(tmp_path / "p").storage()["bytes_on_disk"]["images"]
    rgb = DistilledSet.load(tmp_path / "r").storage()["bytes_on_disk"]["images"]
    assert pal < rgb
    p0 = tmp_path / "p" / "images" / "000_cat" / "00000.png"
    r0 = tmp_path / "r" / "images" / "000_cat" / "00000.png"
    assert p0.stat().st_size < r0.stat().st_size


# ---------------------------------------------------------------------- verification
def test_verify_intact_is_empty(tmp_path: Path) -> None:
    rgb_set(soft_labels=torch.rand(5, 3)).save(tmp_path / "a")
    assert verify(tmp_path / "a") == []
    assert DistilledSet.verify(tmp_path / "a") == []


def test_verify_detects_changed_byte(tmp_path: Path) -> None:
    rgb_set().save(tmp_path / "a")
    rel = "images/001_dog/00000.png"
    png = tmp_path / "a" / rel
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF
    png.write_bytes(bytes(data))
    problems = verify(tmp_path / "a")
    assert len(problems) == 1 and rel in problems[0] and "sha256 mismatch" in problems[0]
    with pytest.raises(ArtifactError, match="00000.png: sha256 mismatch"):
        DistilledSet.load(tmp_path / "a")


def test_verify_detects_deleted_file(tmp_path: Path) -> None:
    rgb_set(soft_labels=torch.rand(5, 3)).save(tmp_path / "a")
    (tmp_path / "a" / "labels" / "soft.safetensors").unlink()
    problems = verify(tmp_path / "a")
    assert problems and "labels/soft.safetensors: missing" in problems[0]
    with pytest.raises(ArtifactError, match="soft.safetensors"):
        DistilledSet.load(tmp_path / "a")
    with pytest.raises(ArtifactError, match="soft.safetensors"):
        DistilledSet.load(tmp_path / "a", verify=False)


def test_truncated_png_is_named(tmp_path: Path) -> None:
    palette_set().save(tmp_path / "p")
    rel = "images/002_red_car/00000.png"
    png = tmp_path / "p" / rel
    png.write_bytes(png.read_bytes()[:40])
    assert any(rel in p for p in verify(tmp_path / "p"))
    with pytest.raises(ArtifactError, match=rel):
        DistilledSet.load(tmp_path / "p")
    # without hashing, the size is still checked before the file is read
    with pytest.raises(ArtifactError, match=f"{rel}: size is 40 bytes"):
        DistilledSet.load(tmp_path / "p", verify=False)
    # same size, damaged after the header: Pillow's error, named
    palette_set().save(tmp_path / "q")
    png = tmp_path / "q" / rel
    data = bytearray(png.read_bytes())
    data[-20:-12] = b"\0" * 8
    png.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{rel}: cannot be decoded"):
        DistilledSet.load(tmp_path / "q", verify=False)


def test_verify_reports_unlisted_and_non_artifacts(tmp_path: Path) -> None:
    rgb_set().save(tmp_path / "a")
    (tmp_path / "a" / "images" / "stray.txt").write_text("x")
    assert any("stray.txt: not listed" in p for p in verify(tmp_path / "a"))
    assert "not a directory" in verify(tmp_path / "nothing")[0]
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in verify(tmp_path / "empty")[0]


def test_manifest_path_traversal_is_refused(tmp_path: Path) -> None:
    rgb_set().save(tmp_path / "a")
    mpath = tmp_path / "a" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["../outside.txt"] = {"sha256": "0", "bytes": 1, "component": "extra"}
    mpath.write_text(json.dumps(m))
    assert any("unsafe file path" in p for p in verify(tmp_path / "a"))


# ---------------------------------------------------------------------- atomic saving
def test_failed_save_leaves_existing_artifact_untouched(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a"
    old = rgb_set(seed=0)
    old.save(target)
    before = files_under(target)
    manifest_before = (target / "manifest.json").read_bytes()
    calls = {"n": 0}
    real_encode = art.encode_png

    def flaky_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(art, "encode_png", flaky_encode)
    with pytest.raises(OSError, match="disk full"):
        rgb_set(seed=1).save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dir left behind
    assert files_under(target) == before
    assert (target / "manifest.json").read_bytes() == manifest_before
    assert torch.equal(DistilledSet.load(target).images, old.images)


def test_overwrite_rules(tmp_path: Path) -> None:
    target = tmp_path / "a"
    rgb_set(seed=0).save(target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rgb_set(seed=1).save(target)
    new = rgb_set(seed=1)
    new.save(target, overwrite=True)
    assert torch.equal(DistilledSet.load(target).images, new.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a decoct artifact"):
        rgb_set().save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"

    (tmp_path / "empty").mkdir()
    rgb_set().save(tmp_path / "empty")  # an empty directory holds nothing to lose
    assert verify(tmp_path / "empty") == []


# ---------------------------------------------------------------------- invalid construction
def test_invalid_construction_raises() -> None:
    info = make_info()
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        DistilledSet(info, images, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        DistilledSet(info, images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        DistilledSet(info, images, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="needs"):
        DistilledSet(info, torch.zeros(3, 3, 8, 9, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="uint8"):
        DistilledSet(info, images.float(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="soft_labels"):
        DistilledSet(info, images, torch.tensor([0, 1, 2]), soft_labels=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="JSON"):
        DistilledSet(info, images, torch.tensor([0, 1, 2]), meta={"t": object()})
    with pytest.raises(ValueError, match="reserved"):
        DistilledSet(
            info, images, torch.tensor([0, 1, 2]), label_files={"soft": {"x": torch.ones(1)}}
        )


def test_invalid_palette_raises() -> None:
    ds = palette_set(k=4)
    info, labels = ds.info, ds.labels
    wrong = ds.images.clone()
    wrong[1, 0, 0, 0] ^= 1
    with pytest.raises(
        ValueError, match=r"images must equal palettes\[n\]\[palette_indices\[n\]\]"
    ):
        DistilledSet(info, wrong, labels, palette_indices=ds.palette_indices, palettes=ds.palettes)
    bad_idx = ds.palette_indices.clone()
    bad_idx[0, 0, 0] = 4
    with pytest.raises(ValueError, match="K=4"):
        DistilledSet.from_palette(info, bad_idx, ds.palettes, labels)
    with pytest.raises(ValueError, match="together"):
        DistilledSet(info, ds.images, labels, palettes=ds.palettes)
    big = torch.zeros(4, 257, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="1..256"):
        DistilledSet.from_palette(info, ds.palette_indices, big, labels)


def test_float_images_must_match_images() -> None:
    info = make_info()
    x = torch.zeros(3, 3, 8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="quantisation"):
        DistilledSet(
            info,
            torch.zeros(3, 3, 8, 8, dtype=torch.uint8),
            torch.tensor([0, 1, 2]),
            float_images=x,
        )


# ---------------------------------------------------------------------- export
def test_export_imagefolder_readable_by_torchvision(tmp_path: Path) -> None:
    ds = palette_set(k=4)
    out = ds.export_imagefolder(tmp_path / "folder")
    folder = ImageFolder(str(out))
    assert len(folder.classes) == 3 and len(folder) == 4
    assert sorted(folder.classes) == ["cat", "dog", "red car"]
    img, label = folder[0]
    assert img.mode == "RGB" and folder.classes[label] == "cat"
    with Image.open(out / "cat" / "00000.png") as im:
        assert im.mode == "RGB"
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), ds.images[0])
    with pytest.raises(art.ExportError, match="earlier decoct export"):
        ds.export_imagefolder(out)
    ds.export_imagefolder(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# ---------------------------------------------------------------------- issue 10: nothing trusted unchecked
def _edit_manifest(root: Path, fn) -> None:
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    fn(m)
    mpath.write_text(json.dumps(m))


def _rehash(root: Path, rel: str) -> None:
    """Make the manifest agree with a file edited on purpose (what a careful forger does)."""
    data = (root / rel).read_bytes()

    def fix(m: dict) -> None:
        m["files"][rel]["bytes"] = len(data)
        m["files"][rel]["sha256"] = art.sha256_bytes(data)
        disk = m["storage"]["bytes_on_disk"]
        disk.update({c: sum(e["bytes"] for e in m["files"].values() if e["component"] == c)
                     for c in ("images", "labels", "extra")})
        disk["total"] = disk["images"] + disk["labels"]

    _edit_manifest(root, fix)


def _no_decode(monkeypatch) -> None:
    """Fail the test if anything is decoded or sized by the manifest's numbers."""

    def boom(*a, **k):
        raise AssertionError("decoded / allocated before the manifest's numbers were checked")

    monkeypatch.setattr(png_mod.Image, "open", boom)
    monkeypatch.setattr(art.torch, "repeat_interleave", boom)


@pytest.mark.parametrize(
    "edit, message",
    [
        # 5 KB manifest, 3e9 images claimed: the old code allocated for them in repeat_interleave
        (lambda m: m.update(counts_per_class=[1_000_000_000] * 3, num_images=3_000_000_000),
         "labels.hard must list one class per image"),
        (lambda m: m.update(counts_per_class=[3e8, 0, 0], num_images=300_000_000), "list of integers"),
        (lambda m: m.update(counts_per_class=[-1, 3, 3]), "list of integers"),
        # counts consistent with labels.hard, but the PNGs they need are not listed
        (lambda m: m.update(counts_per_class=[1000, 0, 0], num_images=1000, labels={"hard": [0] * 1000}),
         "only 5 image files are listed"),
        (lambda m: m["dataset"].update(height=13000, width=13000), "1..2048 pixels"),
        (lambda m: m["dataset"].update(channels=10**9), "channels"),
        (lambda m: m["dataset"].update(classes="abc"), "dataset.classes"),
        (lambda m: m.update(image_storage="png-palette", palette_sizes=[4] * 10**4), "one palette size per image"),
        (lambda m: m.update(image_storage="png-palette", palette_sizes=[300] * 5), "palette_sizes"),
        (lambda m: m["files"]["images/000_cat/00000.png"].update(bytes=-5), "non-negative"),
        (lambda m: m["files"]["images/000_cat/00000.png"].update(sha256="00"), "sha256"),
    ],
)
def test_numbers_in_the_manifest_are_checked_before_they_size_anything(tmp_path, monkeypatch, edit, message):
    rgb_set().save(tmp_path / "a")
    _edit_manifest(tmp_path / "a", edit)
    _no_decode(monkeypatch)
    problems = verify(tmp_path / "a")
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(ArtifactError, match=message.replace(".", r"\.")):
        DistilledSet.load(tmp_path / "a", verify=False)


def test_count_bomb_costs_no_memory(tmp_path):
    import tracemalloc

    rgb_set().save(tmp_path / "a")
    _edit_manifest(tmp_path / "a", lambda m: m.update(counts_per_class=[100_000_000] * 3, num_images=300_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError):
            DistilledSet.load(tmp_path / "a")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20  # the old code asked for 300M int64 (2.4 GB) here


def _forge_ihdr(root: Path, rel: str, **fields: int) -> None:
    """Rewrite a PNG's IHDR (width/height/depth/colour) with a valid CRC, then rehash it."""
    import zlib

    p = root / rel
    data = bytearray(p.read_bytes())
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    w, h = fields.get("width", w), fields.get("height", h)
    depth, colour = fields.get("depth", depth), fields.get("colour", colour)
    data[16:26] = struct.pack(">IIBB", w, h, depth, colour)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    p.write_bytes(bytes(data))
    _rehash(root, rel)


def _never_decode(monkeypatch, path: Path) -> None:
    """Pillow may open every PNG except the one at ``path``."""
    real, bad = png_mod.Image.open, path.read_bytes()

    def guarded(fp, *a, **k):
        if fp.getvalue() == bad:
            pytest.fail(f"{path.name} was decoded before its header was checked")
        return real(fp, *a, **k)

    monkeypatch.setattr(png_mod.Image, "open", guarded)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(width=13000, height=13000), "PNG header says 13000x13000"),
        (dict(width=8, height=9), "PNG header says 8x9"),
        (dict(colour=6), "colour type 6"),  # RGBA in an RGB set
        (dict(depth=16), "bit depth 16"),
    ],
)
def test_png_header_is_checked_before_decoding(tmp_path, monkeypatch, fields, message):
    rgb_set().save(tmp_path / "a")
    rel = "images/001_dog/00000.png"
    _forge_ihdr(tmp_path / "a", rel, **fields)
    _never_decode(monkeypatch, tmp_path / "a" / rel)
    problems = verify(tmp_path / "a")
    assert len(problems) == 1 and problems[0].startswith(f"{rel}: ") and message in problems[0]
    with pytest.raises(ArtifactError, match=message):
        DistilledSet.load(tmp_path / "a")


def test_real_large_png_is_refused_by_its_header(tmp_path, monkeypatch):
    """A genuinely large image (tiny when compressed) in a small set: refused without decoding."""
    rgb_set().save(tmp_path / "a")
    rel = "images/000_cat/00001.png"
    Image.new("RGB", (3000, 2000)).save(tmp_path / "a" / rel, optimize=True)
    assert (tmp_path / "a" / rel).stat().st_size < 50_000
    _rehash(tmp_path / "a", rel)
    _never_decode(monkeypatch, tmp_path / "a" / rel)
    with pytest.raises(ArtifactError, match=f"{rel}: PNG header says 3000x2000"):
        DistilledSet.load(tmp_path / "a")


def test_pillow_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    rgb_set().save(tmp_path / "a")
    # 8x8 = 64 pixels is over this limit (warning) but under twice it (Pillow's own error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ArtifactError, match="cannot be decoded as a PNG"):
        DistilledSet.load(tmp_path / "a")


def test_storage_claims_are_measured_not_trusted(tmp_path, capsys):
    from decoct.api import info
    from decoct.cli import main

    rgb_set(soft_labels=torch.rand(5, 3)).save(tmp_path / "a")
    measured = sum(files_under(tmp_path / "a").values()) - (tmp_path / "a" / "manifest.json").stat().st_size
    report = info(tmp_path / "a")
    assert report["problems"] == [] and report["storage"]["bytes_on_disk"]["total"] == measured
    for section, key, value in [("bytes_on_disk", "total", 10), ("bytes_on_disk", "images", 1),
                                ("raw_bytes", "total", 1), ("bits_per_pixel", "on_disk", 0.5)]:
        _edit_manifest(tmp_path / "a", lambda m, s=section, k=key, v=value: m["storage"][s].__setitem__(k, v))
        problems = verify(tmp_path / "a")
        assert len(problems) == 1 and f"storage.{section}.{key} claims {value}" in problems[0]
        with pytest.raises(ArtifactError, match=f"storage.{section}.{key}"):
            DistilledSet.load(tmp_path / "a")
        capsys.readouterr()
        assert main(["info", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert "failed its integrity check" in err and f"storage.{section}.{key}" in err
        rgb_set(soft_labels=torch.rand(5, 3)).save(tmp_path / "a", overwrite=True)  # restore


def _corruptions():
    """(name, corrupt(root)) covering every kind of damage ``decoct info`` must report."""
    import pickle

    def flip(root):
        p = root / "images/001_dog/00000.png"
        d = bytearray(p.read_bytes())
        d[len(d) // 2] ^= 0xFF
        p.write_bytes(bytes(d))

    def link_file(root):
        p = root / "images/001_dog/00000.png"
        real = root.parent / "elsewhere.png"
        real.write_bytes(p.read_bytes())
        p.unlink()
        p.symlink_to(real)

    def link_dir(root):
        d = root / "images/001_dog"
        d.rename(root.parent / "dogs")
        d.symlink_to(root.parent / "dogs")

    def link_manifest(root):
        m = root / "manifest.json"
        m.rename(root.parent / "m.json")
        m.symlink_to(root.parent / "m.json")

    def soft_not_safetensors(payload):
        def f(root):
            (root / "labels/soft.safetensors").write_bytes(payload)
            _rehash(root, "labels/soft.safetensors")
        return f

    def soft_wrong_shape(root):
        (root / "labels/soft.safetensors").write_bytes(art.tensors_to_bytes({"soft_labels": torch.rand(4, 3).half()}))
        _rehash(root, "labels/soft.safetensors")

    return [
        ("intact", lambda root: None),
        ("changed byte", flip),
        ("deleted file", lambda root: (root / "images/000_cat/00000.png").unlink()),
        ("unlisted file", lambda root: (root / "images/000_cat/notes.txt").write_text("x")),
        ("symlinked file", link_file),
        ("symlinked class dir", link_dir),
        ("symlinked manifest", link_manifest),
        ("manifest []", lambda root: (root / "manifest.json").write_text("[]")),
        ("manifest 3", lambda root: (root / "manifest.json").write_text("3")),
        ('manifest "x"', lambda root: (root / "manifest.json").write_text('"x"')),
        ("manifest not JSON", lambda root: (root / "manifest.json").write_text("{")),
        ("bytes_on_disk edited", lambda root: _edit_manifest(root, lambda m: m["storage"]["bytes_on_disk"]
                                                             .__setitem__("total", 10))),
        ("count bomb", lambda root: _edit_manifest(root, lambda m: m.update(counts_per_class=[10**9] * 3,
                                                                             num_images=3 * 10**9))),
        ("big PNG header", lambda root: _forge_ihdr(root, "images/000_cat/00000.png", width=13000, height=13000)),
        ("soft labels random bytes", soft_not_safetensors(os.urandom(300))),
        ("soft labels pickle", soft_not_safetensors(pickle.dumps({"soft_labels": [1.0] * 15}))),
        ("soft labels wrong shape", soft_wrong_shape),
        ("unsafe path", lambda root: _edit_manifest(root, lambda m: m["files"].__setitem__(
            "../x", {"sha256": "0" * 64, "bytes": 1, "component": "extra"}))),
    ]


@pytest.mark.parametrize("name, corrupt", _corruptions(), ids=[n for n, _ in _corruptions()])
def test_info_reports_a_problem_exactly_when_load_raises(tmp_path, capsys, name, corrupt):
    from decoct.cli import main

    root = tmp_path / "run" / "a"
    root.parent.mkdir()
    rgb_set(soft_labels=torch.rand(5, 3)).save(root)
    corrupt(root)
    problems = verify(root)
    try:
        DistilledSet.load(root)
        raised = None
    except ArtifactError as e:
        raised = str(e)
    assert bool(problems) == (raised is not None) == (name != "intact"), (problems, raised)
    capsys.readouterr()
    rc = main(["info", str(root)])
    out, err = capsys.readouterr()
    assert rc == (0 if name == "intact" else 2)
    if problems:
        assert "Traceback" not in err and problems[0] in err
        assert problems[0].split(":")[0] in raised  # load names the same file
    else:
        assert json.loads(out)["intact"] is True and err == ""


def test_manifest_that_is_not_an_object_is_one_clear_line(tmp_path, capsys):
    from decoct.cli import main

    rgb_set().save(tmp_path / "a")
    for text, kind in (("[]", "list"), ("3", "int"), ('"x"', "str"), ("null", "NoneType")):
        (tmp_path / "a" / "manifest.json").write_text(text)
        with pytest.raises(ArtifactError, match=f"manifest.json: holds a JSON {kind}, not an object"):
            DistilledSet.load(tmp_path / "a")
        for argv in (["info", str(tmp_path / "a")], ["export", str(tmp_path / "a"), "--imagefolder",
                                                     str(tmp_path / "e")],
                     ["report", str(tmp_path / "a"), "--out", str(tmp_path / "rep")]):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"{tmp_path / 'a' / 'manifest.json'}: holds a JSON {kind}" in err and "Traceback" not in err


def _zca_soft_lr_set() -> tuple[DistilledSet, Any]:
    from decoct.augment import ZCA

    info = make_info(3, 8, classes=("zebra", "ant", "moth"))  # ImageFolder sorts these differently
    g = torch.Generator().manual_seed(3)
    zca = ZCA().fit(torch.randn(40, 3, 8, 8, generator=g))
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    soft = torch.randn(6, 3, generator=g)
    ds = DistilledSet(info, images, labels, soft_labels=soft, method="tm", meta={"syn_lr": 0.0123},
                      attachments={"zca": zca.state_dict()})
    return ds, zca


def test_export_carries_zca_learned_lr_and_soft_labels(tmp_path, capsys):
    from safetensors.torch import load_file

    from decoct.cli import main

    ds, zca = _zca_soft_lr_set()
    ds.save(tmp_path / "a")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), "--imagefolder", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ZCA whitening: apply zca.safetensors" in printed and "learned lr 0.0123" in printed
    assert "soft labels in labels.safetensors" in printed and "class indices" in printed
    out = tmp_path / "out"
    m = json.loads((out / "decoct-export.json").read_text())
    assert m["format"] == "decoct-imagefolder-export" and m["learned_lr"] == 0.0123
    assert m["side_files"] == ["decoct-export.json", "labels.safetensors", "zca.safetensors"]
    assert [c["folder"] for c in m["classes"]] == ["zebra", "ant", "moth"]
    assert m["imagefolder_index"] == {"ant": 0, "moth": 1, "zebra": 2}
    assert m["normalize"]["mean"] == [0.5] * 3 and m["normalize"]["std"] == [0.25] * 3
    assert m["hard_labels"] == [0, 0, 1, 2, 2, 2] and m["files"][2] == "ant/00000.png"
    assert m["apply"] == ds.export_notes() and m["label_store"] is None
    # a consumer applying the side files gets exactly what decoct trains on
    soft = load_file(out / "labels.safetensors")["soft_labels"]
    assert torch.allclose(soft, ds.soft_labels.half().float())
    z = load_file(out / "zca.safetensors")
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(out / f))).permute(2, 0, 1) for f in m["files"]])
    mean = torch.tensor(m["normalize"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m["normalize"]["std"]).view(1, 3, 1, 1)
    x = (pixels.float() / 255 - mean) / std
    x = ((x.reshape(6, -1) - z["mean"]) @ z["W"]).reshape(6, 3, 8, 8)
    want = zca.transform(normalize(ds.images, ds.info))
    assert torch.allclose(x, want, atol=1e-4)


def test_export_of_a_plain_set_and_the_label_store_note(tmp_path):
    ds = rgb_set(label_files={"fkd": {"header": torch.zeros(3, dtype=torch.uint8)}})
    out = ds.export_imagefolder(tmp_path / "out")
    m = json.loads((out / "decoct-export.json").read_text())
    assert m["side_files"] == ["decoct-export.json"] and m["zca"] is None and m["soft_labels"] is None
    assert m["learned_lr"] is None and m["label_store"]["exported"] is False
    assert any("not exported: the FKD label store" in n for n in ds.export_notes())
    assert sorted(p.name for p in out.iterdir()) == ["cat", "decoct-export.json", "dog", "red car"]


def test_export_targets(tmp_path, capsys, monkeypatch):
    from decoct.cli import main

    rgb_set().save(tmp_path / "a")
    a, out = str(tmp_path / "a"), tmp_path / "out"

    def run(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(["export", a, "--imagefolder", str(out), *extra])
        return rc, capsys.readouterr().err

    # a foreign non-empty directory: never replaced, even with --force
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for flags in ((), ("--force",), ("--overwrite",)):
        rc, err = run(*flags)
        assert rc == 2 and "is not empty and is not a decoct export" in err and err.count("\n") == 1
    assert (out / "thesis.tex").read_text() == "precious"
    (out / "thesis.tex").unlink()
    # empty directory: fine; again: refused without --force; --force / --overwrite replace it
    assert run() == (0, "")
    rc, err = run()
    assert rc == 2 and "holds an earlier decoct export; pass --force" in err
    assert run("--force")[0] == 0 and run("--overwrite")[0] == 0
    # an earlier export plus a file the export did not write: refused even with --force
    (out / "cat" / "mine.txt").write_text("mine")
    rc, err = run("--force")
    assert rc == 2 and "cat/mine.txt" in err and (out / "cat" / "mine.txt").exists()
    # a file in the way, and a location that cannot be written
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main(["export", a, "--imagefolder", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(art.tempfile, "mkdtemp", denied)
    capsys.readouterr()
    assert main(["export", a, "--imagefolder", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in {tmp_path} (Permission denied)" in err and err.count("\n") == 1


def test_export_into_read_only_directory(tmp_path):
    rgb_set().save(tmp_path / "a")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:
            (ro / "probe").write_text("x")
            pytest.skip("permission bits are not enforced here (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        with pytest.raises(art.ExportError, match=f"cannot write in {ro}"):
            DistilledSet.load(tmp_path / "a").export_imagefolder(ro / "out")
        with pytest.raises(art.ExportError, match="not writable"):
            DistilledSet.load(tmp_path / "a").export_imagefolder(ro)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("key, value", [("epochs", 10**12), ("batch", 0), ("num_images", "5"), ("seed", -1),
                                        ("units_per_epoch", True), ("stored_epochs", {"99": 1})])
def test_label_store_header_numbers_are_checked(key, value):
    """Numbers in an FKD label store's header size a training run: checked as the store loads."""
    from decoct.formats.label_store import HEADER_FILE, LabelStore, LabelStoreError, _encode_header

    header = {"format": "decoct-fkd-labels", "version": 1, "fingerprint": "0" * 64, "num_images": 5,
              "num_classes": 3, "epochs": 2, "batch": 5, "units_per_epoch": 1, "full_units_per_epoch": 1,
              "view": {"crop": "rrc"}, "seed": 0, "stored_epochs": {}}
    assert LabelStore.from_label_files({HEADER_FILE: {"header": _encode_header(header)}}) is not None
    header[key] = value
    with pytest.raises(LabelStoreError, match=f"header {key}|stored_epochs"):
        LabelStore.from_label_files({HEADER_FILE: {"header": _encode_header(header)}})
