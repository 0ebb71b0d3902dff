"""ImageBank: a saved set's images decoded per batch from its files (sets too large to hold).

Issue 12 (relabel and the soft protocol): synthetic sets above ``$DECOCT_MAX_SET_BYTES`` are read
per batch from their PNG files instead of one tensor. A bank must give exactly the pixels
``DistilledSet.load`` gives, check every file as load does, and train the same soft student.
"""

import hashlib
from pathlib import Path

import pytest
import torch

from decoct.data import DatasetInfo
from decoct.decoupled.relabel import relabel
from decoct.formats.artifact import DistilledSet
from decoct.formats.errors import ArtifactError
from decoct.formats.image_bank import DEFAULT_MAX_SET_BYTES, ImageBank, max_set_bytes, pixel_bytes
from decoct.formats.label_store import LabelStore, dataset_fingerprint
from decoct.models import model_for
from decoct.train import seeded_model
from decoct.train.soft_students import FKDConfig, fill_value, train_fkd

pytestmark = pytest.mark.usefixtures("one_thread")


def _info(channels: int) -> DatasetInfo:
    return DatasetInfo("tiny", ("a", "b", "c"), channels, 6, 5, (0.5,) * channels, (0.25,) * channels)


def _pixels(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _sets() -> dict[str, DistilledSet]:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4, (9, 6, 5), dtype=torch.uint8, generator=g)
    pal = torch.randint(0, 256, (9, 4, 3), dtype=torch.uint8, generator=g)
    return {
        "rgb": DistilledSet(_info(3), _pixels(9, 3), labels),
        "gray": DistilledSet(_info(1), _pixels(9, 1), labels),
        "palette": DistilledSet.from_palette(_info(3), idx, pal, labels),
        "float16": DistilledSet.from_float(_info(3), torch.randn(9, 3, 6, 5, generator=g), labels,
                                           float_storage=torch.float16),
    }


@pytest.mark.parametrize("kind", ["rgb", "gray", "palette", "float16"])
def test_bank_gives_exactly_the_loaded_pixels_and_fingerprint(tmp_path, kind):
    _sets()[kind].save(tmp_path / kind)
    loaded = DistilledSet.load(tmp_path / kind)
    bank = ImageBank.open(tmp_path / kind, workers=3)
    assert len(bank) == 9 and bank.shape == tuple(loaded.images.shape) and bank.nbytes == loaded.images.numel()
    assert torch.equal(bank.labels, loaded.labels) and bank.info == loaded.info
    for idx in ([4, 0, 8, 4], [2], []):
        assert torch.equal(bank.batch(torch.tensor(idx, dtype=torch.long)), loaded.images[idx])
    assert torch.equal(torch.cat(list(bank.chunks(4))), loaded.images)
    assert bank.fingerprint() == dataset_fingerprint(loaded) == dataset_fingerprint(bank)
    assert pixel_bytes(tmp_path / kind) == loaded.images.numel()
    with pytest.raises(IndexError, match=r"image index 9 outside \[0, 9\)"):
        bank.batch([1, 9])


def test_bank_checks_files_as_load_does(tmp_path):
    _sets()["rgb"].save(tmp_path / "a")
    png = tmp_path / "a" / "images" / "001_b" / "00001.png"
    bank = ImageBank.open(tmp_path / "a")
    bank.batch([4])
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))  # same size: only the hash tells
    with pytest.raises(ArtifactError, match=r"images/001_b/00001\.png: sha256 mismatch"):
        bank.batch([0, 4])
    with pytest.raises(ArtifactError, match=r"images/001_b/00001\.png: sha256 mismatch"):
        ImageBank.open(tmp_path / "a")  # refused up front, as DistilledSet.load refuses it
    png.write_bytes(bytes(data[:-5]))
    with pytest.raises(ArtifactError, match=r"images/001_b/00001\.png: size is"):
        ImageBank.open(tmp_path / "a", verify=False).batch([4])


def test_max_set_bytes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DECOCT_MAX_SET_BYTES", raising=False)
    assert max_set_bytes() == DEFAULT_MAX_SET_BYTES == 2 * 2**30
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "1e6")
    assert max_set_bytes() == 1_000_000
    for bad in ("lots", "-1"):
        monkeypatch.setenv("DECOCT_MAX_SET_BYTES", bad)
        with pytest.raises(ValueError, match=r"\$DECOCT_MAX_SET_BYTES must be"):
            max_set_bytes()


def _params_sha(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                   for t in model.state_dict().values())).hexdigest()


@pytest.fixture(scope="module")
def relabelled(digits, random_digits_set, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "a"
    random_digits_set(2).save(path)
    teacher = seeded_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), 0).eval()
    relabel(path, teacher, epochs=6, batch_size=8, seed=0, device="cpu")
    return path


def test_soft_students_from_a_bank_equal_the_in_memory_set(relabelled, monkeypatch):
    """Stored labels and an online teacher: a bank trains the student the uint8 tensor trains, and
    decodes only the images of each batch."""
    import decoct.formats.image_bank as ib

    dset = DistilledSet.load(relabelled)
    bank = ImageBank.open(relabelled, workers=2)
    fill = fill_value(dset.info)
    cfg = FKDConfig(epochs=6, lr=1e-2)
    a = seeded_model(lambda: model_for("mlp", dset.info), 1)
    train_fkd(a, dset.images, cfg, store=LabelStore.from_set(dset), fill=fill, seed=1, info=dset.info)
    decoded = []
    real = ib.decode_png
    monkeypatch.setattr(ib, "decode_png", lambda data, rel, *args: decoded.append(rel) or real(data, rel, *args))
    store = LabelStore.from_set(bank)  # the fingerprint streamed from the files
    decoded.clear()
    b = seeded_model(lambda: model_for("mlp", dset.info), 1)
    stats = train_fkd(b, bank, cfg, store=store, fill=fill, seed=1)
    assert _params_sha(a) == _params_sha(b)
    assert len(decoded) == 6 * 20 and stats["steps"] == 6 * 3  # each batch's images, decoded per batch
    teacher = seeded_model(lambda: model_for("mlp", dset.info, width=16), 2).eval()
    online = FKDConfig(epochs=2, lr=1e-2, batch_size=8)
    c = seeded_model(lambda: model_for("mlp", dset.info), 1)
    train_fkd(c, dset.images, online, teacher=teacher, view=store.view, fill=fill, seed=1, info=dset.info)
    d = seeded_model(lambda: model_for("mlp", dset.info), 1)
    train_fkd(d, bank, online, teacher=teacher, view=store.view, fill=fill, seed=1, info=dset.info)
    assert _params_sha(c) == _params_sha(d)


def test_soft_protocol_on_a_bank_equals_evaluate(relabelled, digits):
    from decoct.evaluation.protocols import _evaluate_soft, evaluate, protocol_config

    r = evaluate(relabelled, "soft", runs=1, seed=0, dataset=digits, device="cpu", model="mlp", lr=1e-2,
                 progress=False)
    bank = ImageBank.open(relabelled)
    cfg = protocol_config("soft", model="mlp", lr=1e-2)
    rb = _evaluate_soft(bank, bank.storage(), digits, cfg, runs=1, seed=0, device=torch.device("cpu"), baseline=None,
                        progress=False, chunk=None, state={}, on_progress=None, online_teacher=None,
                        path=Path(relabelled))
    assert rb.accuracies == r.accuracies and rb.num_images == 20 and rb.bytes_on_disk == r.bytes_on_disk
