import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from decoct.data import DataNotFoundError, ImageSplit, load_dataset, normalize, to_uint8
from decoct.data.sources import data_roots


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(tmp_path, sizes=(8, 8)):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("b_cls", "a_cls"):
            for k in range(n):
                files[f"toy/{split}/{cls}/{k}.png"] = rng.integers(0, 256, (*sizes, 3), dtype=np.uint8)
    return files


def test_digits_offline_default(digits):
    assert digits.info.image_shape == (1, 8, 8)
    assert len(digits.train) == 1437 and len(digits.test) == 360
    assert digits.train.images.dtype == torch.uint8 and digits.train.images.max() == 255
    assert (digits.test.class_counts(10) >= 35).all()
    again = load_dataset("digits")
    assert torch.equal(again.test.images, digits.test.images)  # the split is fixed


def test_imagefolder_archive_and_directory_agree(tmp_path, tmp_cache):
    files = _make_tree(tmp_path)
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, arr in files.items():
            data = _png(arr)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            path = tmp_path / "dir" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    a = load_dataset("imagefolder", root=archive)
    d = load_dataset("imagefolder", root=tmp_path / "dir" / "toy")
    assert a.info.classes == ("a_cls", "b_cls")
    assert a.train.images.shape == (6, 3, 8, 8) and a.test.images.shape == (4, 3, 8, 8)
    assert torch.equal(a.train.images, d.train.images) and torch.equal(a.train.labels, d.train.labels)
    expected = torch.from_numpy(files["toy/train/a_cls/0.png"]).permute(2, 0, 1)
    assert torch.equal(a.train.images[0], expected)
    # second load comes from the decoded cache and is identical
    assert list(tmp_cache.glob("*.safetensors"))
    b = load_dataset("imagefolder", root=archive)
    assert torch.equal(a.train.images, b.train.images)


def test_imagefolder_mixed_sizes_needs_image_size(tmp_path, tmp_cache):
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for i, size in enumerate((8, 12)):
            p = root / split / "c" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_png(np.zeros((size, size, 3), np.uint8)))
    with pytest.raises(ValueError, match="different sizes.*python -m decoct.data.resize .* --size 8"):
        load_dataset("imagefolder", root=root)
    ds = load_dataset("imagefolder", root=root, image_size=8)
    assert ds.train.images.shape == (2, 3, 8, 8)


def test_missing_data_names_paths_and_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECOCT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar100")
    msg = str(e.value)
    assert "nowhere" in msg and "--data-root" in msg and "--download" in msg and "\n" not in msg


def test_unknown_dataset():
    with pytest.raises(KeyError, match="unknown dataset 'imagenot'.*cifar10"):
        load_dataset("imagenot")


def test_data_roots_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DECOCT_DATA", str(tmp_path))
    assert data_roots()[0] == tmp_path  # no explicit root: $DECOCT_DATA first, then the defaults
    assert len(data_roots()) > 1
    (tmp_path / "explicit").mkdir()
    assert data_roots(tmp_path / "explicit") == [tmp_path / "explicit"]  # an explicit root alone
    with pytest.raises(DataNotFoundError, match="'explicit' does not exist"):
        data_roots("explicit")


def test_split_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ImageSplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_normalize_roundtrip(digits):
    x = normalize(digits.train.images[:16], digits.info)
    assert abs(float(normalize(digits.train.images, digits.info).mean())) < 1e-3
    assert torch.equal(to_uint8(x, digits.info), digits.train.images[:16])


@pytest.mark.slow
def test_cifar10_from_shared_archive(cifar10):
    assert cifar10.info.classes[0] == "airplane" and cifar10.info.classes[-1] == "truck"
    assert cifar10.train.images.shape == (50000, 3, 32, 32)
    assert torch.equal(cifar10.train.class_counts(10), torch.full((10,), 5000))
    assert torch.equal(cifar10.test.class_counts(10), torch.full((10,), 1000))
    mean = cifar10.train.images[::10].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(cifar10.info.mean), atol=0.02)


def test_data_notes_print_once_under_torchrun(monkeypatch, capsys):
    """The "what the tree held" line goes to stderr from rank 0 only ($RANK, set by torchrun); a plain
    run (no $RANK) prints it."""
    from decoct.data.sources import note

    monkeypatch.delenv("RANK", raising=False)
    note("cifar10: 10 classes")
    monkeypatch.setenv("RANK", "1")
    note("rank 1 line")
    monkeypatch.setenv("RANK", "0")
    note("rank 0 line")
    err = capsys.readouterr().err
    assert "cifar10: 10 classes" in err and "rank 0 line" in err and "rank 1 line" not in err
