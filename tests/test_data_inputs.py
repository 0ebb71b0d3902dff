"""A user's own image folders: what counts as a class and an image, faithful decoding of every
image mode, the decoded cache seeing every file, and errors that name the file (issue 10)."""

import io
import os
import shlex
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from decoct.cli import main
from decoct.data import BadImageError, DataNotFoundError, ImageFolderError, load_dataset
from decoct.data.sources import data_roots, decode_image

pytestmark = pytest.mark.usefixtures("tmp_cache")


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _files(n_train=3, n_test=2, classes=("b_cls", "a_cls"), size=8, seed=0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for k in range(n):
                out[f"{split}/{c}/{k}.png"] = _png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return out


def _write_dir(root, files: dict[str, bytes | None]):
    """Files (None = an empty folder) under ``root``."""
    for name, data in files.items():
        p = root / name
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _write_tar(path, files: dict[str, bytes | None], prefix="toy/"):
    """A .tar.gz with a folder entry for every folder, as ``tar czf`` writes."""
    folders = {str(p) for name in files for p in PurePosixPath(prefix + name).parents if str(p) != "."}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for d in sorted(folders):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tar.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(prefix + name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            else:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture(params=["dir", "tar"])
def make(request, tmp_path):
    """Build a tree as a directory or as a .tar.gz archive; returns its root."""

    def build(files, name="toy"):
        if request.param == "dir":
            return _write_dir(tmp_path / name, files)
        return _write_tar(tmp_path / f"{name}.tar.gz", files, prefix=f"{name}/")

    build.kind = request.param
    return build


# --- what counts as a class and an image (point 10) -------------------------------------------

LITTER = {
    "train/.ipynb_checkpoints/0-checkpoint.jpg": _jpeg(np.zeros((8, 8, 3), np.uint8)),
    "test/.ipynb_checkpoints/0-checkpoint.jpg": _jpeg(np.zeros((8, 8, 3), np.uint8)),
    "train/a_cls/.DS_Store": b"\x00\x00\x00\x01Bud1",
    "train/a_cls/._0.png": b"\x00\x05\x16\x07AppleDouble",  # an AppleDouble file, not a PNG
    "train/b_cls/Thumbs.db": b"\xd0\xcf\x11\xe0",
    "test/b_cls/desktop.ini": b"[.ShellClassInfo]",
    "__MACOSX/train/a_cls/._0.png": b"\x00\x05\x16\x07",
    "train/.hidden_class/0.png": _png(np.zeros((8, 8, 3), np.uint8)),
    "README.txt": b"outside the split folders: part of no split",
}


def test_hidden_folders_and_os_litter_are_ignored(make, capsys):
    clean = load_dataset("imagefolder", root=make(_files(), name="clean"))
    messy = load_dataset("imagefolder", root=make({**_files(), **LITTER}, name="messy"))
    assert messy.info.classes == clean.info.classes == ("a_cls", "b_cls")
    for a, b in ((messy.train, clean.train), (messy.test, clean.test)):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    err = capsys.readouterr().err
    assert "messy" in err and ": 2 classes (a_cls, b_cls), 6 train / 4 test images" in err


@pytest.mark.parametrize("name,why", [
    ("train/a_cls/notes.txt", "is not an image (extension '.txt')"),
    ("train/a_cls/LICENSE", "is not an image (no extension)"),
    ("test/b_cls/sub/labels.csv", "is not an image (extension '.csv')"),
    ("train/stray.png", "is directly inside train/, not in a class folder"),
])
def test_a_file_that_is_not_an_image_is_named_or_skipped(make, name, why, capsys):
    root = make({**_files(), name: b"some bytes"})
    with pytest.raises(ImageFolderError) as e:
        load_dataset("imagefolder", root=root)
    msg = str(e.value)
    assert name in msg and why in msg and "skip_bad=True" in msg and "\n" not in msg
    ds = load_dataset("imagefolder", root=root, skip_bad=True)
    assert len(ds.train) == 6 and len(ds.test) == 4
    err = capsys.readouterr().err
    assert "skipped 1 bad file(s), first: " in err and name in err


def test_images_in_subfolders_belong_to_their_class(make):
    files = _files()
    files["train/a_cls/batch2/9.png"] = files.pop("train/a_cls/2.png")
    ds = load_dataset("imagefolder", root=make(files))
    assert ds.train.class_counts(2).tolist() == [3, 3]


@pytest.mark.parametrize("case", ["empty_train", "empty_test", "only_hidden", "train_only", "test_only"])
def test_class_folders_must_match_and_hold_images(make, case):
    files = _files()
    expect = {
        "empty_train": ("train/c_cls", "holds no images"),
        "empty_test": ("test/a_cls", "holds no images"),
        "only_hidden": ("train/c_cls", "holds no images"),
        "train_only": ("c_cls", "in train/ but not in test/"),
        "test_only": ("c_cls", "in test/ but not in train/"),
    }[case]
    if case == "empty_train":
        files["train/c_cls"] = None
        files["test/c_cls/0.png"] = files["test/a_cls/0.png"]
    elif case == "empty_test":
        for k in list(files):
            if k.startswith("test/a_cls/"):
                del files[k]
        files["test/a_cls"] = None
    elif case == "only_hidden":
        files["train/c_cls/.DS_Store"] = b"x"
        files["test/c_cls/0.png"] = files["test/a_cls/0.png"]
    elif case == "train_only":
        files["train/c_cls/0.png"] = files["train/a_cls/0.png"]
    else:
        files["test/c_cls/0.png"] = files["test/a_cls/0.png"]
    with pytest.raises(ImageFolderError) as e:
        load_dataset("imagefolder", root=make(files))
    assert expect[0] in str(e.value) and expect[1] in str(e.value)


@pytest.mark.parametrize("bad", ["new\nline", "tab\there", "bell\x07"])
def test_class_names_with_control_characters_are_refused(make, bad):
    files = _files()
    for split in ("train", "test"):
        files[f"{split}/{bad}/0.png"] = files[f"{split}/a_cls/0.png"]
    with pytest.raises(ImageFolderError) as e:
        load_dataset("imagefolder", root=make(files))
    assert repr(bad) in str(e.value) and "control character" in str(e.value)


def test_two_trees_or_none_are_errors(tmp_path):
    files = _files()
    both = {**{f"one/{k}": v for k, v in files.items()}, **{f"two/{k}": v for k, v in files.items()}}
    with pytest.raises(ImageFolderError, match="more than one image-folder tree.*one/, two/"):
        load_dataset("imagefolder", root=_write_dir(tmp_path / "both", both))
    with pytest.raises(DataNotFoundError, match="no 'train/' folder found .*val"):
        load_dataset("imagefolder", root=_write_dir(tmp_path / "val", {"val/a/0.png": files["test/a_cls/0.png"]}))


def test_train_and_test_must_have_one_image_size(make):
    files = _files()
    files.update({k: _png(np.zeros((12, 12, 3), np.uint8)) for k in files if k.startswith("test/")})
    with pytest.raises(ImageFolderError, match="different sizes.*8x8.*12x12"):
        load_dataset("imagefolder", root=make(files))


def _mixed(make):
    files = _files(size=12)
    rng = np.random.default_rng(1)
    files["train/a_cls/0.png"] = _png(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8))
    files["test/b_cls/1.png"] = _png(rng.integers(0, 256, (20, 14, 3), dtype=np.uint8))
    root = make(files)
    with pytest.raises(ImageFolderError) as e:
        load_dataset("imagefolder", root=root)
    msg = str(e.value)
    cmd = shlex.split(msg.split("`")[1])
    assert cmd[:3] == ["python", "-m", "decoct.data.resize"] and cmd[-2:] == ["--size", "10"]
    dst = shlex.split(msg.split("--data-root ")[1].split(" (in Python")[0])[0]
    return root, cmd, dst


def _same_as_image_size(root, dst):
    resized = load_dataset("imagefolder", root=dst)
    direct = load_dataset("imagefolder", root=root, image_size=10)
    assert resized.train.images.shape == (6, 3, 10, 10) and resized.info.classes == direct.info.classes
    assert torch.equal(resized.train.images, direct.train.images)
    assert torch.equal(resized.test.images, direct.test.images)
    assert torch.equal(resized.test.labels, direct.test.labels)


def test_mixed_sizes_suggestion_works(make, tmp_path, capsys, monkeypatch):
    from decoct.data.resize import main as resize_main

    root, cmd, dst = _mixed(make)
    monkeypatch.chdir(tmp_path)
    assert resize_main(cmd[3:]) == 0
    _same_as_image_size(root, dst)
    assert resize_main(cmd[3:]) == 2  # never writes into an existing folder with files
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    run = ["select", "random", "--dataset", "imagefolder", "--data-root", dst, "--ipc", "1", "--out",
           str(tmp_path / "run")]
    assert main(run) == 0


@pytest.mark.slow
def test_mixed_sizes_suggestion_runs_as_typed_in_a_shell(tmp_path):
    root, cmd, dst = _mixed(lambda files: _write_dir(tmp_path / "my photos", files))
    shell_cmd = "python" + " " + shlex.join(cmd[1:])  # exactly the words of the message
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(shell_cmd, shell=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"to {dst}" in done.stdout
    _same_as_image_size(root, dst)


# --- data roots (point 8) ----------------------------------------------------------------------

def test_explicit_data_root_is_the_only_root(tmp_path, monkeypatch):
    shared = _write_tar(tmp_path / "shared" / "cifar10.tar.gz", _files(), prefix="cifar10/")
    monkeypatch.setenv("DECOCT_DATA", str(shared.parent))
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("cifar10").train) == 6  # no root given: $DECOCT_DATA is searched
    assert len(load_dataset("cifar10", root=shared).train) == 6  # the archive itself
    with pytest.raises(DataNotFoundError, match="'/no/such/root' does not exist"):
        load_dataset("cifar10", root="/no/such/root")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as e:  # an existing root without it: no fallback either
        load_dataset("cifar10", root=tmp_path / "empty")
    assert "empty" in str(e.value) and "shared" not in str(e.value)
    assert data_roots(tmp_path / "empty") == [tmp_path / "empty"]
    assert data_roots()[0] == shared.parent


def test_unknown_loader_option_is_refused():
    with pytest.raises(ValueError, match="dataset 'digits' takes no option 'image_size'"):
        load_dataset("digits", image_size=16)


# --- decoding never yields silent wrong pixels (point 11) ----------------------------------------

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes, channels=3) -> np.ndarray:
    return decode_image(data, "x.img", channels=channels).transpose(1, 2, 0)


GRAY = np.array([[0, 1, 127, 128], [200, 254, 255, 37]], np.uint8)
RGB = np.stack([GRAY, 255 - GRAY, GRAY // 2], axis=2)
G16 = np.array([[0, 257, 65535, 1000], [32768, 128, 65000, 12850]], np.uint16)
G16_TO_8 = np.array([[0, 1, 255, 4], [128, 0, 253, 50]], np.uint8)  # round(v * 255 / 65535)


def _ppm16(a: np.ndarray) -> bytes:
    return f"P5\n{a.shape[1]} {a.shape[0]}\n65535\n".encode() + a.astype(">u2").tobytes()


def _png16_rgb(a: np.ndarray) -> bytes:
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _palette():
    p = Image.new("P", (4, 2))
    colours = [(0, 0, 0), (255, 0, 0), (0, 128, 255), (17, 34, 51)]
    p.putpalette([v for c in colours for v in c])
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    p.putdata(idx.flatten().tolist())
    return p, np.array(colours, np.uint8)[idx]


def _rgb3(g):
    return np.repeat(g[..., None], 3, axis=2)


def _exact_cases():
    bits = (GRAY > 127).astype(np.uint8) * 255
    pal, pal_rgb = _palette()
    opaque = np.full(GRAY.shape, 255, np.uint8)
    cmyk = np.stack([GRAY, 255 - GRAY, GRAY // 3, GRAY // 2], axis=2)
    c, m, y, k = (cmyk[..., i].astype(int) for i in range(4))
    cmyk_rgb = np.stack([np.round((255 - v) * (255 - k) / 255) for v in (c, m, y)], axis=2).astype(np.uint8)
    return {
        "1-png": (_save(Image.fromarray(GRAY > 127), "PNG"), _rgb3(bits)),
        "1-tiff": (_save(Image.fromarray(GRAY > 127), "TIFF"), _rgb3(bits)),
        "1-bmp": (_save(Image.fromarray(GRAY > 127), "BMP"), _rgb3(bits)),
        "L-png": (_png(GRAY), _rgb3(GRAY)),
        "L-pgm": (_save(Image.fromarray(GRAY), "PPM"), _rgb3(GRAY)),
        "LA-png-opaque": (_save(Image.fromarray(np.stack([GRAY, opaque], 2), "LA"), "PNG"), _rgb3(GRAY)),
        "P-png": (_save(pal, "PNG"), pal_rgb),
        "P-gif": (_save(pal, "GIF"), pal_rgb),
        "P-png-unused-transparent-index": (_save(_palette()[0].resize((4, 2)), "PNG", transparency=200), pal_rgb),
        "PA-tiff-opaque": (_save(pal.convert("PA"), "TIFF"), pal_rgb),
        "RGB-png": (_png(RGB), RGB),
        "RGB-ppm": (_save(Image.fromarray(RGB), "PPM"), RGB),
        "RGB-bmp": (_save(Image.fromarray(RGB), "BMP"), RGB),
        "RGB-tiff": (_save(Image.fromarray(RGB), "TIFF"), RGB),
        "RGB-webp-lossless": (_save(Image.fromarray(RGB), "WEBP", lossless=True), RGB),
        "RGBA-png-opaque": (_png(np.dstack([RGB, opaque])), RGB),
        "RGBX-tiff": (_save(Image.fromarray(RGB).convert("RGBX"), "TIFF"), RGB),
        "I;16-png": (_save(Image.fromarray(G16), "PNG"), _rgb3(G16_TO_8)),
        "I;16B-tiff": (_save(Image.frombytes("I;16B", (4, 2), G16.astype(">u2").tobytes()), "TIFF"),
                       _rgb3(G16_TO_8)),
        "I-pgm16": (_ppm16(G16), _rgb3(G16_TO_8)),
        "RGB16-png": (_png16_rgb(np.dstack([G16, G16, G16])), _rgb3((G16 >> 8).astype(np.uint8))),
        "CMYK-tiff": (_save(Image.fromarray(cmyk, "CMYK"), "TIFF"), cmyk_rgb),
    }


EXACT = _exact_cases()


@pytest.mark.parametrize("case", sorted(EXACT))
def test_convertible_modes_decode_exactly(case):
    data, expected = EXACT[case]
    got = _decode(data)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected), (got, expected)


def test_ycbcr_and_lossy_jpeg_modes_decode_to_their_formulas():
    ycc = np.stack([GRAY, np.full_like(GRAY, 90), np.full_like(GRAY, 180)], axis=2)
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=2).clip(0, 255)
    got = _decode(_save(Image.fromarray(ycc, "YCbCr"), "TIFF")).astype(float)
    assert np.abs(got - rgb).max() <= 1
    flat = np.full((16, 16, 4), (30, 200, 90, 10), np.uint8)  # a flat CMYK JPEG survives compression
    k = 10
    expect = [round((255 - v) * (255 - k) / 255) for v in (30, 200, 90)]
    got = _decode(_save(Image.fromarray(flat, "CMYK"), "JPEG", quality=100))
    assert np.abs(got.reshape(-1, 3).astype(int) - expect).max() <= 2
    gray = _decode(_save(Image.fromarray(np.full((16, 16), 77, np.uint8)), "JPEG", quality=100))
    assert gray.shape == (16, 16, 3) and np.abs(gray.astype(int) - 77).max() <= 1


def test_one_channel_decoding_is_exact_for_gray_and_luma_for_colour():
    assert np.array_equal(_decode(_save(Image.fromarray(G16), "PNG"), channels=1)[..., 0], G16_TO_8)
    r, g, b = (RGB[..., i].astype(int) for i in range(3))
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # ITU-R 601-2, as Pillow computes it
    assert np.array_equal(_decode(_png(RGB), channels=1)[..., 0], luma)


def _refused_cases():
    alpha = np.full(GRAY.shape, 255, np.uint8)
    alpha[0, 0] = 128
    pal, _ = _palette()
    return {
        "LA-translucent": (_save(Image.fromarray(np.stack([GRAY, alpha], 2), "LA"), "PNG"), "transparent"),
        "RGBA-translucent": (_png(np.dstack([RGB, alpha])), "1 transparent pixel"),
        "P-transparent-index-used": (_save(pal, "PNG", transparency=1), "2 transparent pixel"),
        "PA-tiff-translucent": (_save(Image.merge("PA", (pal, Image.fromarray(alpha))), "TIFF"), "transparent"),
        "L-colour-key": (_save(Image.fromarray(GRAY), "PNG", transparency=37), "transparent"),
        "RGB-colour-key": (_save(Image.fromarray(RGB), "PNG", transparency=tuple(int(v) for v in RGB[0, 0])),
                           "transparent"),
        "I;16-colour-key": (_save(Image.fromarray(G16), "PNG", transparency=1000), "transparent"),
        "I-tiff-32bit": (_save(Image.fromarray(G16.astype(np.int32) * 1000), "TIFF"), "32-bit integer"),
        "F-tiff": (_save(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF"), "floating-point"),
        "F-pfm": (_save(Image.fromarray(GRAY.astype(np.float32)), "PPM"), "floating-point"),
        "LAB-tiff": (_save(Image.new("LAB", (4, 2), (50, 0, 0)), "TIFF"), "mode LAB"),
        "truncated-jpeg": (_jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[:600],
                           "cannot be decoded: the file is damaged or cut short (OSError: "),
        "truncated-png": (_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[:3000],
                          "cannot be decoded"),
        "not-an-image": (b"GIF89a but not really", "is not an image Pillow can read"),
        "empty-file": (b"", "is not an image Pillow can read"),
    }


REFUSED = _refused_cases()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unfaithful_or_broken_files_are_errors_naming_them(case):
    data, why = REFUSED[case]
    with pytest.raises(BadImageError) as e:
        decode_image(data, "train/a/x.img")
    assert str(e.value).startswith("train/a/x.img ") and why in str(e.value)


def test_truncated_files_are_refused_even_when_pillow_is_told_to_accept_them(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="x.jpg cannot be decoded"):
        decode_image(REFUSED["truncated-jpeg"][0], "x.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_decompression_bombs_are_refused_from_the_header(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (11, 16):  # above the limit (Pillow only warns), and above twice it (Pillow raises)
        with pytest.raises(BadImageError, match="MAX_IMAGE_PIXELS|too many pixels"):
            decode_image(_png(np.zeros((side, side), np.uint8)), "x.png")
    assert _decode(_png(np.zeros((10, 10), np.uint8))).shape == (10, 10, 3)


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    got = _decode(_save(img, "PNG", exif=exif))
    assert np.array_equal(got, np.rot90(RGB, k=-1))


def test_cli_names_a_corrupt_image_inside_an_archive(tmp_path, capsys):
    files = _files()
    files["train/b_cls/1.png"] = files["train/b_cls/1.png"][:60]
    archive = _write_tar(tmp_path / "toy.tar.gz", files)
    code = main(["select", "random", "--dataset", "imagefolder", "--data-root", str(archive), "--ipc", "1",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"member 'toy/train/b_cls/1.png' of {archive}" in err and "cannot be decoded" in err


# --- the decoded cache sees every file (point 12) ----------------------------------------------

def test_cache_sees_added_replaced_and_deleted_images(tmp_path, tmp_cache):
    root = _write_dir(tmp_path / "toy", _files())
    first = load_dataset("imagefolder", root=root)
    assert len(first.train) == 6 and len(list(tmp_cache.glob("*.safetensors"))) == 1
    new = np.full((8, 8, 3), 7, np.uint8)
    (root / "train/a_cls/9.png").write_bytes(_png(new))  # add
    added = load_dataset("imagefolder", root=root)
    assert len(added.train) == 7 and torch.equal(added.train.images[3], torch.from_numpy(new).permute(2, 0, 1))

    target = root / "train/b_cls/0.png"  # replace: same size, new content, mtime kept as it was
    st = target.stat()
    data = bytearray(target.read_bytes())
    other = _png(np.full((8, 8, 3), 200, np.uint8))
    assert len(other) != len(data)
    target.write_bytes(other)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    replaced = load_dataset("imagefolder", root=root)
    assert int(replaced.train.images[4].float().mean()) == 200

    same_size = _png(np.full((8, 8, 3), 201, np.uint8))  # same byte count, new bytes and mtime
    assert len(same_size) == len(other)
    target.write_bytes(same_size)
    assert int(load_dataset("imagefolder", root=root).train.images[4].float().mean()) == 201

    (root / "train/a_cls/9.png").unlink()  # delete
    deleted = load_dataset("imagefolder", root=root)
    assert len(deleted.train) == 6 and deleted.train.class_counts(2).tolist() == [3, 3]
    assert len(list(tmp_cache.glob("*.safetensors"))) == 1  # older versions are removed
    legacy = tmp_cache / "imagefolder-0123456789abcdef.safetensors"  # the first format's name
    legacy.write_bytes(b"x")
    (root / "train/a_cls/9.png").write_bytes(_png(new))
    load_dataset("imagefolder", root=root)
    assert not legacy.exists() and len(list(tmp_cache.glob("*.safetensors"))) == 1
    (root / "train/a_cls/9.png").unlink()

    (root / "train/c_cls").mkdir()  # a new empty class folder is seen too (and refused)
    with pytest.raises(ImageFolderError, match="holds no images"):
        load_dataset("imagefolder", root=root)


def test_cache_sees_a_rewritten_archive(tmp_path):
    archive = _write_tar(tmp_path / "toy.tar.gz", _files(seed=0))
    a = load_dataset("imagefolder", root=archive)
    _write_tar(archive, _files(seed=1))
    b = load_dataset("imagefolder", root=archive)
    assert not torch.equal(a.train.images, b.train.images)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_layout"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, tmp_cache, damage):
    from decoct.runtime.io import atomic_save_tensors

    root = _write_dir(tmp_path / "toy", _files())
    good = load_dataset("imagefolder", root=root)
    (cache,) = tmp_cache.glob("*.safetensors")
    if damage == "garbage":
        cache.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    else:
        atomic_save_tensors(cache, {"train_images": torch.zeros(1, dtype=torch.uint8)})
    again = load_dataset("imagefolder", root=root)
    assert torch.equal(again.train.images, good.train.images) and again.info.classes == good.info.classes
    assert load_dataset("imagefolder", root=root).info == good.info  # the rebuilt file is read back
