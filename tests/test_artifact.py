"""DistilledSet: exact save/load, storage accounting from real files, corruption detection."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import decoct.artifact as art
from decoct.artifact import ArtifactError, DistilledSet, verify
from decoct.data.types import DatasetInfo, normalize


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
    with pytest.raises(ArtifactError, match=f"{rel}: cannot be decoded"):
        DistilledSet.load(tmp_path / "p", verify=False)


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
    real_encode = art._encode_png

    def flaky_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(art, "_encode_png", flaky_encode)
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
    with pytest.raises(FileExistsError):
        ds.export_imagefolder(out)
    ds.export_imagefolder(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
