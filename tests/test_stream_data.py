"""The streamed ImageNet path (decoct.data.stream, decoct.data.views, the 'imagenet' dataset) and
MTT's named subsets, on small generated ImageNet-shaped trees (tiny JPEGs, a few classes)."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import decoct.data.stream as stream
from decoct.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    ImageFolderError,
    is_streamed,
    load_dataset,
)
from decoct.data.fake_imagenet import main as fake_main
from decoct.data.fake_imagenet import make_tree, wnid
from decoct.data.stream import (
    StreamSplit,
    build_index,
    decode_file,
    load_index,
    parse_classes,
    stream_loader,
)
from decoct.data.subsets import IMAGENET_1K_WNIDS, MTT_INDICES, SUBSETS
from decoct.data.views import apply_view, rrc_boxes, view_generator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 classes, 3 train + 2 val JPEGs each, 40 x 30: read only (tests that edit a tree make their own)."""
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root, classes=4, per_class=3, val_per_class=2, size=(40, 30))
    return root


@pytest.fixture
def own_tree(tmp_path):
    root = tmp_path / "imagenet"
    make_tree(root, classes=3, per_class=2, val_per_class=1, size=(40, 30))
    return root


def _jpeg(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _no_scan(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the index was rebuilt, not read from its cache")

    monkeypatch.setattr(stream, "_scan", fail)


# ---------------------------------------------------------------------------------------------
# the index and its cache


def test_index_lists_classes_and_files_in_order(tree, tmp_cache):
    idx = build_index(tree / "train")
    assert idx.classes == tuple(wnid(k) for k in range(4))
    assert len(idx) == 12 and idx.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert idx.path(4) == tree / "train" / wnid(1) / f"{wnid(1)}_1.JPEG"
    sub = idx.subset_classes([3, 1])
    assert sub.classes == (wnid(3), wnid(1)) and sub.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sub.path(0) == idx.path(9)


def test_index_cache_read_back_and_invalidated_by_a_change(own_tree, tmp_cache, monkeypatch):
    first = build_index(own_tree / "train")
    assert len(list(tmp_cache.glob("index-*.safetensors"))) == 1
    with monkeypatch.context() as m:  # the second load reads the cache: no listing of files
        _no_scan(m)
        again = build_index(own_tree / "train")
    assert again.classes == first.classes and torch.equal(again.labels, first.labels)
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]
    # adding a file to a class changes the key: listed again, and the new file is in the index
    shutil.copy(first.path(0), own_tree / "train" / wnid(1) / "zz_added.JPEG")
    with monkeypatch.context() as m:
        _no_scan(m)
        with pytest.raises(AssertionError, match="rebuilt"):
            build_index(own_tree / "train")
    grown = build_index(own_tree / "train")
    assert len(grown) == len(first) + 1 and grown.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert grown.path(4) == own_tree / "train" / wnid(1) / "zz_added.JPEG"
    # removing one does too
    (own_tree / "train" / wnid(2) / f"{wnid(2)}_0.JPEG").unlink()
    assert build_index(own_tree / "train").labels.tolist() == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "labels_out_of_range", "labels_unsorted"])
def test_damaged_index_cache_is_rebuilt(own_tree, tmp_cache, damage):
    from decoct.runtime.io import atomic_save_tensors, load_tensors

    first = build_index(own_tree / "train")
    (path,) = tmp_cache.glob("index-*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:  # a well-formed file whose labels do not describe the tree: never trusted
        t = load_tensors(path)
        t["labels"] = t["labels"].clone()
        t["labels"][-1] = 7 if damage == "labels_out_of_range" else 0
        atomic_save_tensors(path, t)
    again = build_index(own_tree / "train")
    assert torch.equal(again.labels, first.labels)
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]
    t = load_tensors(path)  # and rewritten whole
    assert torch.equal(t["labels"].long(), first.labels)


def test_load_index_takes_val_or_test(own_tree, tmp_cache):
    train, val = load_index(own_tree)
    assert train.classes == val.classes and val.root == own_tree / "val" and len(val) == 3
    (own_tree / "val").rename(own_tree / "test")  # torchvision-style trees may call it test/
    _, test = load_index(own_tree)
    assert test.root == own_tree / "test" and torch.equal(test.labels, val.labels)


def _flat_val(root):
    for f in (root / "val").rglob("*.JPEG"):
        f.rename(root / "val" / f.name)
    for d in (root / "val").iterdir():
        if d.is_dir():
            d.rmdir()


def _text_file(root):
    (root / "train" / wnid(1) / "notes.txt").write_text("not an image")


def _empty_class(root):
    for f in (root / "train" / wnid(2)).iterdir():
        f.unlink()


def _class_mismatch(root):
    shutil.copytree(root / "train" / wnid(0), root / "train" / "n09999999")


def _no_val(root):
    shutil.rmtree(root / "val")


def _stray_file(root):
    shutil.copy(root / "train" / wnid(0) / f"{wnid(0)}_0.JPEG", root / "train" / "loose.JPEG")


def _nested_folder(root):
    (root / "train" / wnid(0) / "more").mkdir()


@pytest.mark.parametrize("breakage, message", [
    (_flat_val, r"val holds files \(.*JPEG.*\) but no class folders.* sorted into <wnid>/ folders"),
    (_text_file, rf"train/{wnid(1)}/notes.txt: not an image file name"),
    (_empty_class, rf"train/{wnid(2)}: class folder holds no image"),
    (_class_mismatch, r"train and val hold different classes \(only in train: \['n09999999'\]"),
    (_no_val, r"has no val/ or test/ folder; expected .*/val/<class>/<image>"),
    (_stray_file, r"train holds a file outside any class folder: loose.JPEG"),
    (_nested_folder, rf"train/{wnid(0)}: more is not a file"),
])
def test_layout_errors_name_the_fault(own_tree, tmp_cache, breakage, message):
    breakage(own_tree)
    with pytest.raises(ImageFolderError, match=message) as e:
        load_dataset("imagenet", root=own_tree, data_mode="stream")
    assert isinstance(e.value, ValueError)  # the CLI's one-line error, exit 2


def test_missing_root_names_paths(tmp_path, tmp_cache):
    from decoct.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=r"data root '.*nowhere' does not exist; pass --data-root"):
        load_dataset("imagenet", root=tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=r"data root '.*nowhere' does not exist"):
        load_dataset("imagewoof", root=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# choosing classes


def test_parse_classes():
    names = ("a", "b", "c", "d")
    assert parse_classes(None, names) is None
    assert parse_classes("0:2", names) == [0, 1]
    assert parse_classes("1:", names) == [1, 2, 3]
    assert parse_classes(":", names) == [0, 1, 2, 3]
    assert parse_classes(":4", names) == [0, 1, 2, 3]
    assert parse_classes("d,b", names) == [3, 1]  # names keep the order given
    assert parse_classes(["c", "a"], names) == [2, 0]
    assert parse_classes(("a",), names) == [0]


@pytest.mark.parametrize("spec, message", [
    ("2:1", r"classes '2:1': need 0 <= START < STOP <= 4"),
    ("1:1", r"need 0 <= START < STOP"),
    ("0:5", r"need 0 <= START < STOP <= 4"),
    ("-1:2", r"need 0 <= START"),
    ("a:b", r"expected START:STOP class indices, e.g. 0:10"),
    ("1:2:3", r"expected START:STOP"),
    ("a,zz", r"classes: \['zz'\] are not class folders"),
    ("", r"classes: \[''\] are not class folders"),
    ("a,a", r"a class is named twice"),
    (["b", "b"], r"a class is named twice"),
])
def test_parse_classes_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(spec, ("a", "b", "c", "d"))


def test_imagenet_classes_option_keeps_a_subset(tree, tmp_cache):
    data = load_dataset("imagenet", root=tree, data_mode="stream", classes="1:3", image_size=16, workers=0)
    assert data.info.classes == (wnid(1), wnid(2)) and len(data.train) == 6 and len(data.test) == 4
    assert data.subset_of == (1, 2)
    data = load_dataset("imagenet", root=tree, data_mode="stream", classes=[wnid(3), wnid(0)], image_size=16)
    assert data.info.classes == (wnid(3), wnid(0)) and data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# views


def _noise(h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def test_train_view_is_a_function_of_seed_and_position():
    img = _noise(30, 40)
    a = apply_view(img, "train", 16, view_generator(3, 5))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, apply_view(img, "train", 16, view_generator(3, 5)))
    others = [apply_view(img, "train", 16, view_generator(3, p)) for p in range(6)]
    assert all(not torch.equal(a, o) for o in others[:5])  # positions 0-4 differ from 5
    assert torch.equal(a, others[5])
    assert not torch.equal(a, apply_view(img, "train", 16, view_generator(4, 5)))  # and seeds
    with pytest.raises(ValueError, match="needs a generator"):
        apply_view(img, "train", 16)
    with pytest.raises(ValueError, match="unknown view 'crop'; known: train, val, resize"):
        apply_view(img, "crop", 16)


@pytest.mark.parametrize("h, w", [(30, 40), (375, 500), (1, 200), (200, 1), (7, 7)])
def test_rrc_boxes_lie_inside_the_image_with_torchvision_bounds(h, w):
    boxes = rrc_boxes(500, h, w, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    if (h, w) == (375, 500):  # a photo: every box is drawn (no fallback), area 8-100%, ratio 3/4-4/3
        area = (bh * bw).double() / (h * w)
        assert area.min() >= 0.07 and area.max() <= 1.0 and area.max() > 0.8 and area.min() < 0.15
        ratio = bw.double() / bh
        assert ratio.min() > 0.7 and ratio.max() < 1.4
    if (h, w) == (1, 200):  # no candidate fits: torchvision's fallback, the centre crop at ratio 4/3
        assert boxes.unique(dim=0).tolist() == [[0, 99, 1, 1]]


@pytest.mark.parametrize("h, w", [(375, 500), (500, 375), (256, 300), (100, 80)])
def test_val_view_equals_torchvision_resize_centercrop(tmp_path, h, w):
    from torchvision.transforms import v2

    rng = np.random.default_rng(1)
    path = tmp_path / "photo.JPEG"
    path.write_bytes(_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90))
    img = decode_file(path)
    assert img.shape == (3, h, w)
    ref = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(img)
    out = apply_view(img, "val", 224)
    assert out.shape == (3, 224, 224) and torch.equal(out, ref)
    ref = v2.Resize((64, 64), antialias=True)(img)
    assert torch.equal(apply_view(img, "resize", 64), ref)


# ---------------------------------------------------------------------------------------------
# the loader


def _pass(loader):
    xs, ys, ps = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(ps)


def test_loader_pixels_do_not_depend_on_workers_or_ranks(tree, tmp_cache):
    idx = build_index(tree / "train")
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=5, order=order, seed=7)
    x0, y0, p0 = _pass(stream_loader(idx, "train", 16, workers=0, **kw))
    assert x0.shape == (12, 3, 16, 16) and p0.tolist() == list(range(12))
    assert torch.equal(y0, idx.labels[order])
    x2, y2, p2 = _pass(stream_loader(idx, "train", 16, workers=2, **kw))
    assert torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(p0, p2)
    n = 3  # batches 0, 1, 2 (the last one short); rank 0 reads 0 and 2, rank 1 reads 1
    shards = [_pass(stream_loader(idx, "train", 16, workers=0, batches=range(r, n, 2), **kw)) for r in (0, 1)]
    x, y, p = (torch.cat([s[i] for s in shards]) for i in range(3))
    back = torch.argsort(p)
    assert p[back].tolist() == list(range(12))
    assert torch.equal(x[back], x0) and torch.equal(y[back], y0)
    # a different seed is a different pass
    assert not torch.equal(_pass(stream_loader(idx, "train", 16, batch_size=5, order=order, seed=8))[0], x0)


def test_loader_refuses_bad_arguments(tree, tmp_cache):
    idx = build_index(tree / "train")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        stream_loader(idx, "val", 16, batch_size=0)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        stream_loader(idx, "val", 16, batch_size=4, workers=-1)
    with pytest.raises(ValueError, match="unknown view 'test'"):
        stream_loader(idx, "test", 16, batch_size=4)
    for batches in ([0, 3], [-1], [1.0]):  # 12 images in batches of 4: 0..2
        with pytest.raises(ValueError, match=r"batches: .* is not a batch number of this pass \(0..2\)"):
            stream_loader(idx, "val", 16, batch_size=4, batches=batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_in_a_pass_is_one_line_naming_it(own_tree, tmp_cache, workers):
    bad = own_tree / "train" / wnid(1) / f"{wnid(1)}_1.JPEG"
    bad.write_bytes(b"garbage" * 8)
    idx = build_index(own_tree / "train")
    with pytest.raises(BadImageError) as e:
        _pass(stream_loader(idx, "val", 16, batch_size=2, workers=workers))
    assert str(e.value) == f"{bad}: not an image torchvision or Pillow can read (unknown or damaged format)"
    with pytest.raises(BadImageError) as e:  # the memory mode's decoding pass too
        load_dataset("imagenet", root=own_tree, data_mode="memory", image_size=16, workers=workers)
    assert str(e.value) == f"{bad}: not an image torchvision or Pillow can read (unknown or damaged format)"
    gone = own_tree / "train" / wnid(2) / f"{wnid(2)}_0.JPEG"
    bad.unlink()
    gone.unlink()  # removed after the index was built
    with pytest.raises(BadImageError) as e:
        _pass(stream_loader(idx, "val", 16, batch_size=2, workers=workers, batches=[2]))
    assert str(e.value) == f"{gone}: cannot be read (No such file or directory)"


def test_memory_mode_equals_the_streamed_val_view(tree, tmp_cache):
    mem = load_dataset("imagenet", root=tree, data_mode="memory", image_size=24, workers=0)
    st = load_dataset("imagenet", root=tree, data_mode="stream", image_size=24, workers=0)
    assert not is_streamed(mem) and is_streamed(st)
    assert mem.info == st.info and mem.info.mean == IMAGENET_MEAN and mem.info.std == IMAGENET_STD
    for m, s in ((mem.train, st.train), (mem.test, st.test)):
        x, y, _ = _pass(s.loader("val", batch_size=4))
        assert m.images.dtype == torch.uint8 and m.images.shape == (len(s), 3, 24, 24)
        assert torch.equal(m.images, x) and torch.equal(m.labels, y)
    # and the same decoded image through the view by hand
    img = decode_file(tree / "val" / wnid(2) / f"{wnid(2)}_1.JPEG")
    assert torch.equal(mem.test.images[5], apply_view(img, "val", 24))
    # StreamSplit.load (real init) decodes the same pixels
    assert torch.equal(st.test.load([5], view="val")[0], mem.test.images[5])
    again = load_dataset("imagenet", root=tree, data_mode="memory", image_size=24, workers=0)  # from the cache
    assert torch.equal(again.train.images, mem.train.images)


def test_memory_cache_sees_an_image_replaced_in_place(own_tree, tmp_cache):
    first = load_dataset("imagenet", root=own_tree, data_mode="memory", image_size=16, workers=0)
    path = own_tree / "train" / wnid(1) / f"{wnid(1)}_0.JPEG"
    path.write_bytes(_jpeg(np.zeros((30, 40, 3), dtype=np.uint8)))  # same name, same folder: folder mtime kept
    again = load_dataset("imagenet", root=own_tree, data_mode="memory", image_size=16, workers=0)
    assert again.train.images[2].max() <= 2 and first.train.images[2].max() > 50
    assert torch.equal(again.train.images[3:], first.train.images[3:])


def test_data_mode_auto_follows_the_memory_limit(tree, tmp_cache, monkeypatch):
    monkeypatch.setenv("DECOCT_MEMORY_LIMIT", "1000")  # 20 images x 3 x 16 x 16 = 15,360 bytes
    assert is_streamed(load_dataset("imagenet", root=tree, image_size=16, workers=0))
    monkeypatch.setenv("DECOCT_MEMORY_LIMIT", "15360")
    assert not is_streamed(load_dataset("imagenet", root=tree, image_size=16, workers=0))
    monkeypatch.setenv("DECOCT_MEMORY_LIMIT", "15359")
    assert is_streamed(load_dataset("imagenet", root=tree, image_size=16, workers=0))
    monkeypatch.delenv("DECOCT_MEMORY_LIMIT")
    assert not is_streamed(load_dataset("imagenet", root=tree, image_size=16, workers=0))  # 4 GiB default
    for bad in ("lots", "-1"):
        monkeypatch.setenv("DECOCT_MEMORY_LIMIT", bad)
        with pytest.raises(ValueError, match=r"\$DECOCT_MEMORY_LIMIT must be"):
            load_dataset("imagenet", root=tree, image_size=16)


@pytest.mark.parametrize("options, message", [
    (dict(download=True), r"dataset 'imagenet' cannot be downloaded .* --data-root DIR"),
    (dict(data_mode="disk"), r"data_mode must be one of auto, memory, stream, got 'disk'"),
    (dict(image_size=4), r"image_size must be an integer in \[8, 1024\], got 4"),
    (dict(image_size=2048), r"image_size must be an integer in \[8, 1024\], got 2048"),
    (dict(image_size="224"), r"image_size must be an integer in \[8, 1024\], got '224'"),
    (dict(image_size=True), r"image_size must be an integer"),
    (dict(workers=-1), r"workers must be a non-negative integer, got -1"),
    (dict(workers=1.5), r"workers must be a non-negative integer, got 1.5"),
    (dict(view="train"), r"view must be one of val, resize, got 'train'"),
    (dict(view="resize", data_mode="stream"), r"view 'resize' .* data_mode 'memory'"),
    (dict(colour="rgb"), r"dataset 'imagenet' takes no option 'colour'"),
])
def test_imagenet_refuses_bad_options(tree, tmp_cache, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("imagenet", root=tree, **options)


def test_streamed_split_has_no_images_tensor(tree, tmp_cache):
    data = load_dataset("imagenet", root=tree, data_mode="stream", image_size=16, workers=0)
    with pytest.raises(ValueError, match=r"is streamed from disk.*data_mode='memory' \(--data-mode memory\)"):
        data.train.images  # noqa: B018
    assert isinstance(data.train, StreamSplit)
    assert data.train.class_counts(4).tolist() == [3, 3, 3, 3]
    assert data.test.class_indices(1).tolist() == [2, 3]
    assert data.train.load([]).shape == (0, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# decoding


def test_decode_file_names_a_damaged_file(tmp_path):
    good = _jpeg(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for name, data in (("garbage.JPEG", b"not an image at all" * 4), ("empty.JPEG", b""),
                       ("cut.JPEG", good[: len(good) // 2]), ("cut_late.JPEG", good[:-20])):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImageError, match=rf"{path}: (not an image|cannot be decoded)"):
            decode_file(path)


def test_decode_file_gives_three_channel_uint8_for_every_mode(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)

    def pil_rgb(path):
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)

    cases = {"cmyk.JPEG": _jpeg(rgb, "CMYK"), "grey.JPEG": _jpeg(rgb, "L"), "rgb.JPEG": _jpeg(rgb)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        t = decode_file(tmp_path / name)
        assert t.shape == (3, 30, 40) and t.dtype == torch.uint8, name
        assert torch.equal(t, pil_rgb(tmp_path / name)), name  # what the references' PIL loader reads
    grey = decode_file(tmp_path / "grey.JPEG")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    for name, fmt in (("x.bmp", "BMP"), ("x.tiff", "TIFF"), ("x.png", "PNG"), ("x.webp", "WEBP")):
        Image.fromarray(rgb).save(tmp_path / name, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert torch.equal(decode_file(tmp_path / name), torch.from_numpy(rgb).permute(2, 0, 1)), name


def test_decode_file_animated_gif_and_16_bit_png(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    t = decode_file(tmp_path / "anim.gif")
    assert t.shape == (3, 30, 40) and t.dtype == torch.uint8  # the first frame
    assert torch.equal(t, torch.from_numpy(np.array(frames[0].convert("RGB"))).permute(2, 0, 1))
    deep = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    t = decode_file(tmp_path / "deep.png")
    want = torch.from_numpy(((deep.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert t.shape == (3, 30, 40) and t.dtype == torch.uint8 and torch.equal(t[0], want)


# ---------------------------------------------------------------------------------------------
# the fake tree generator


def test_make_tree_layout_and_explicit_names(tmp_path):
    n = make_tree(tmp_path / "a", classes=2, per_class=2, val_per_class=1, size=(20, 10))
    assert n == 6
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == [wnid(0), wnid(1)]
    with Image.open(tmp_path / "a" / "val" / wnid(1) / f"{wnid(1)}_0.JPEG") as im:
        assert im.size == (20, 10) and im.format == "JPEG"
    names = ["n02099601", "n01440764"]
    assert make_tree(tmp_path / "b", classes=names, per_class=1, val_per_class=1, size=(20, 10)) == 4
    assert sorted(p.name for p in (tmp_path / "b" / "val").iterdir()) == sorted(names)
    for bad, message in ((["a", "a"], "given twice"), (["../x"], "cannot be a class folder name"),
                         ([".hidden"], "cannot be a class folder name"), ([], "at least 1"),
                         ("n01440764", "got the string"), (0, "at least 1")):
        with pytest.raises(ValueError, match=message):
            make_tree(tmp_path / "c", classes=bad, size=(8, 8))
    with pytest.raises(ValueError, match="size must be"):
        make_tree(tmp_path / "c", classes=1, size=(0, 8))


def test_make_tree_command_line(tmp_path, capsys):
    assert fake_main([str(tmp_path / "t"), "--subset", "imagemeow", "--per-class", "1", "--val-per-class", "1",
                      "--size", "16", "12"]) == 0
    assert "wrote 20 JPEGs" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "t" / "train").iterdir()) == sorted(SUBSETS["imagemeow"])
    for argv, message in ((["--subset", "imagecat"], "known subsets are imagenette"),
                          (["--subset", "imagemeow", "--classes", "3"], "not both"),
                          (["--classes", "0"], "at least 1")):
        with pytest.raises(SystemExit) as e:
            fake_main([str(tmp_path / "u"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# MTT's subsets


def test_imagenet_1k_wnid_list():
    assert len(IMAGENET_1K_WNIDS) == 1000 and len(set(IMAGENET_1K_WNIDS)) == 1000
    assert list(IMAGENET_1K_WNIDS) == sorted(IMAGENET_1K_WNIDS)
    assert IMAGENET_1K_WNIDS[0] == "n01440764" and IMAGENET_1K_WNIDS[-1] == "n15075141"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in IMAGENET_1K_WNIDS)


MTT_NAMES = {  # MTT's utils.py comments, in torchvision's spelling of ImageNet-1K's class names
    "imagenette": ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                   "garbage truck", "gas pump", "golf ball", "parachute"],
    "imagewoof": ["Australian terrier", "Border terrier", "Samoyed", "beagle", "Shih-Tzu", "English foxhound",
                  "Rhodesian ridgeback", "dingo", "golden retriever", "Old English sheepdog"],
    "imagefruit": ["pineapple", "banana", "strawberry", "orange", "lemon", "pomegranate", "fig", "bell pepper",
                   "cucumber", "Granny Smith"],
    "imagemeow": ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lion", "tiger", "jaguar",
                  "snow leopard", "lynx"],
    "imagesquawk": ["peacock", "flamingo", "macaw", "pelican", "king penguin", "bald eagle", "toucan", "ostrich",
                    "black swan", "sulphur-crested cockatoo"],
    "imageyellow": ["bee", "yellow lady's slipper", "banana", "lemon", "corn", "school bus", "honeycomb", "lion",
                    "black and gold garden spider", "goldfinch"],
}


@pytest.mark.parametrize("name", sorted(MTT_NAMES))
def test_subset_wnids_are_mtts_indices(name):
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # in the code: no download
    assert [categories[i] for i in MTT_INDICES[name]] == MTT_NAMES[name]
    assert SUBSETS[name] == tuple(IMAGENET_1K_WNIDS[i] for i in MTT_INDICES[name])
    assert len(set(SUBSETS[name])) == 10


@pytest.fixture(scope="module")
def woof_tree(tmp_path_factory):
    """ImageWoof's 10 wnids plus two other ImageNet classes, 2 train + 1 val JPEG each."""
    root = tmp_path_factory.mktemp("woof")
    make_tree(root, classes=sorted([*SUBSETS["imagewoof"], "n01440764", "n15075141"]), per_class=2,
              val_per_class=1, size=(40, 30))
    return root


def test_subset_loads_its_ten_classes_in_mtts_order_at_128(woof_tree, tmp_cache):
    from torchvision.transforms import v2

    data = load_dataset("imagewoof", root=woof_tree, workers=0)
    assert not is_streamed(data)
    assert data.info.name == "imagewoof" and data.info.classes == SUBSETS["imagewoof"]
    assert data.info.image_shape == (3, 128, 128)
    assert data.info.mean == IMAGENET_MEAN and data.info.std == IMAGENET_STD
    assert data.train.images.shape == (20, 3, 128, 128) and data.test.images.shape == (10, 3, 128, 128)
    assert data.train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    tree_classes = sorted([*SUBSETS["imagewoof"], "n01440764", "n15075141"])
    assert data.subset_of == tuple(tree_classes.index(w) for w in SUBSETS["imagewoof"])
    assert data.source["registry"] == "imagewoof"
    # MTT's view: Resize((128, 128)) (both sides: the aspect ratio is not kept), then a no-op CenterCrop(128)
    w = SUBSETS["imagewoof"][3]  # beagle: label 3
    img = decode_file(woof_tree / "val" / w / f"{w}_0.JPEG")
    mtt = v2.Compose([v2.Resize((128, 128), antialias=True), v2.CenterCrop(128)])(img)
    assert torch.equal(data.test.images[3], mtt) and int(data.test.labels[3]) == 3
    # not the evaluation preset's shorter-side resize + centre crop (which crops the 40 x 30 image's sides)
    assert not torch.equal(data.test.images[3], apply_view(img, "val", 128))


def test_subset_refuses_a_tree_without_its_wnids(tmp_path, tmp_cache, woof_tree):
    root = tmp_path / "partial"
    shutil.copytree(woof_tree, root)
    for split in ("train", "val"):
        shutil.rmtree(root / split / SUBSETS["imagewoof"][4])
        shutil.rmtree(root / split / SUBSETS["imagewoof"][7])
    with pytest.raises(ImageFolderError, match=rf"dataset 'imagewoof' needs 10 ImageNet-1K class folders; "
                                               rf"{root}/train lacks 2: n02086240 \(Shih-Tzu\), n02115641"):
        load_dataset("imagewoof", root=root)
    with pytest.raises(ImageFolderError, match=r"lacks 9: n02102040 \(English springer\)"):  # tench is there
        load_dataset("imagenette", root=woof_tree)


@pytest.mark.parametrize("options, message", [
    (dict(download=True), r"dataset 'imagewoof' cannot be downloaded"),
    (dict(image_size=64), r"dataset 'imagewoof' takes no option 'image_size'"),
    (dict(workers=-2), r"workers must be a non-negative integer"),
])
def test_subset_refuses_bad_options(woof_tree, tmp_cache, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("imagewoof", root=woof_tree, **options)
