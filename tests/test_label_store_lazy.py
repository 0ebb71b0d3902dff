"""A loaded label store is read per epoch, never whole; soft students replay uint8 pixels per batch.

Issue 12 (relabel and the soft protocol): an ImageNet store is gigabytes, so loading an artifact
must not hold its epoch files, a store must hold at most two epochs at a time, and the student must
not need a float32 copy of the whole set. Every result must equal what the in-memory path gave.
"""

import dataclasses
import hashlib
import os

import pytest
import torch

from decoct.data import DatasetInfo, normalize
from decoct.decoupled.relabel import prune_labels, relabel
from decoct.formats.artifact import DistilledSet
from decoct.formats.errors import ArtifactError
from decoct.formats.label_pruning import epoch_plan, prune_store
from decoct.formats.label_store import LabelStore, LabelStoreError, attach_store, epoch_file
from decoct.formats.tensor_files import Deferred, TensorFile, TensorFiles, payload_bytes
from decoct.models import model_for
from decoct.train import seeded_model
from decoct.train.soft_students import (
    FKDConfig,
    fill_value,
    fit_soft_students,
    soft_recipe_for,
    train_fkd,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 20


def _teacher(info: DatasetInfo) -> torch.nn.Module:
    return seeded_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        info.channels * info.height * info.width, info.num_classes)), 0).eval()




@pytest.fixture(scope="module")
def art(digits, random_digits_set, tmp_path_factory):
    """Digits IPC 2 (20 images) with a 20-epoch store of batches of 8 (8, 8, 4 per epoch; Mixup)."""
    path = tmp_path_factory.mktemp("lazy") / "a"
    random_digits_set(2).save(path)
    relabel(path, _teacher(digits.info), epochs=EPOCHS, batch_size=8, seed=0, device="cpu")
    return path


def _store_bytes(store: LabelStore) -> int:
    """Bytes of the epoch tensors the store holds in memory right now."""
    held = store.epochs._held if hasattr(store.epochs, "_held") else store.epochs
    return sum(t.numel() * t.element_size() for ep in held.values() for t in ep.tensors().values())


def test_loading_holds_no_label_file_and_a_store_at_most_two_epochs(art):
    dset = DistilledSet.load(art)
    files = dset.label_files
    assert isinstance(files, TensorFiles) and len(files) == EPOCHS + 1
    assert all(isinstance(files.entry(n), TensorFile) for n in files)  # nothing read: on disk, checked on access
    store = LabelStore.from_set(dset)
    assert store.held_epochs() == []  # the header, file set and small tensors are checked; no epoch is held
    assert store.num_units == 3 * EPOCHS and store.complete_epochs() == list(range(EPOCHS))
    one = sum(t.numel() * t.element_size() for t in store.epochs[0].tensors().values())
    most = 0
    for e, p in store.units():
        store.batch_at(e, p)
        assert len(store.held_epochs()) <= 2
        most = max(most, _store_bytes(store))
    assert store.held_epochs() == [EPOCHS - 2, EPOCHS - 1]
    assert most <= 2 * one < store.payload_bytes() / 5  # two epochs of twenty, never more
    # plans and counts come from the layout read up front: no epoch is loaded for them
    fresh = LabelStore.from_set(dset)
    epoch_plan(fresh, EPOCHS, "order")
    epoch_plan(prune_store(fresh, 10), 30, "auto", torch.Generator().manual_seed(0))
    assert fresh.held_epochs() == [] and fresh.payload_bytes() == store.payload_bytes()


def test_storage_and_payload_are_measured_without_reading_label_files(art, monkeypatch):
    dset = DistilledSet.load(art)
    before = dset.storage()
    held = sum(t.numel() * t.element_size() for n in dset.label_files for t in dset.label_files[n].values())
    load, read_bytes = TensorFile.load, TensorFile.read_bytes

    def only_the_header(real):
        def guarded(self):
            assert "fkd-e" not in self.rel, f"{self.rel} was read whole"
            return real(self)
        return guarded

    monkeypatch.setattr(TensorFile, "load", only_the_header(load))
    monkeypatch.setattr(TensorFile, "read_bytes", only_the_header(read_bytes))
    again = DistilledSet.load(art)  # verification hashes (streamed) but reads no label file into memory
    assert again.storage() == before
    assert payload_bytes(again.label_files) == held
    store = LabelStore.from_set(again)  # the header file, and the epochs' small tensors (partial reads)
    assert store.payload_bytes() == held and store.held_epochs() == []
    epoch_plan(store, EPOCHS, "order")
    with pytest.raises(AssertionError, match="fkd-e00000.safetensors was read whole"):
        store.batch_at(0, 0)  # (the guard works)


def test_bytes_held_are_two_epochs_while_the_old_path_held_all(tmp_path, monkeypatch):
    """Counting the bytes of every tensor read from a label file that is still alive: iterating a
    loaded store holds about two epochs at any time; loading every label file (what DistilledSet.load
    did before) holds the whole store."""
    import weakref

    info = DatasetInfo("wide", tuple(f"c{i}" for i in range(500)), 1, 4, 4, (0.5,), (0.25,))
    n, epochs = 200, 8
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    DistilledSet(info, images, torch.arange(n) % 500).canonical().save(tmp_path / "w")
    relabel(tmp_path / "w", _teacher(info), epochs=epochs, batch_size=50, seed=0, device="cpu")
    live = [0]
    real_load = TensorFile.load

    def counted(self):
        out = real_load(self)
        for t in out.values():
            size = t.numel() * t.element_size()
            live[0] += size
            weakref.finalize(t, lambda size=size: live.__setitem__(0, live[0] - size))
        return out

    monkeypatch.setattr(TensorFile, "load", counted)
    loaded = DistilledSet.load(tmp_path / "w")
    store = LabelStore.from_set(loaded)
    one = n * (2 * 500 + 4 + 8 + 1 + 2) + 4 * 12 + 4  # one stored epoch (logits 200 KB), the store 8x that
    assert live[0] < 1000  # the header only
    peak = 0
    for e, p in store.units():
        batch = store.batch_at(e, p)
        peak = max(peak, live[0])
        del batch
    assert one <= peak <= 2 * one + 1000
    everything = {k: loaded.label_files[k] for k in loaded.label_files}  # what loading did before
    assert live[0] >= epochs * one
    del everything


def test_corrupted_epoch_files_are_refused_when_read_naming_the_file(art, tmp_path):
    import shutil

    # (a) changed after a verified load: refused when the epoch is read, naming the file
    shutil.copytree(art, tmp_path / "a")
    dset = DistilledSet.load(tmp_path / "a")
    store = LabelStore.from_set(dset)
    target = tmp_path / "a" / "labels" / f"{epoch_file(7)}.safetensors"
    st = os.stat(target)
    with open(target, "r+b") as f:  # same size, same inode: only the data differ
        f.seek(st.st_size - 3)
        f.write(b"\x7f\x7f\x7f")
    with pytest.raises(ArtifactError, match=r"labels/fkd-e00007\.safetensors: changed on disk after the artifact"):
        store.batch_at(7, 0)
    with pytest.raises(ArtifactError, match=r"fkd-e00007\.safetensors: changed on disk"):
        store.read_batch(7, 1)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old time: the hash is checked again
    with pytest.raises(ArtifactError, match=r"labels/fkd-e00007\.safetensors: sha256 mismatch"):
        store.batch_at(7, 0)
    assert store.batch_at(6, 0)[0].numel() == 8  # other epochs still read
    with pytest.raises(ArtifactError, match=r"fkd-e00007\.safetensors: sha256 mismatch"):
        DistilledSet.load(tmp_path / "a")  # and a fresh verified load refuses it up front
    # (b) without verification, a structurally broken epoch (image index out of range) is refused
    # by the store's checks, when the store is opened and when the epoch is read
    shutil.copytree(art, tmp_path / "b")
    target = tmp_path / "b" / "labels" / f"{epoch_file(3)}.safetensors"
    loose = DistilledSet.load(tmp_path / "b", verify=False)
    store = LabelStore.from_set(loose)
    tf = loose.label_files.entry(epoch_file(3))
    st = os.stat(target)
    with open(target, "r+b") as f:
        f.seek(tf.offsets["index"])
        f.write((10_000).to_bytes(4, "little"))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(LabelStoreError, match=r"labels/fkd-e00003\.safetensors: image index outside \[0, 20\)"):
        store.batch_at(3, 0)
    with pytest.raises(LabelStoreError, match=r"fkd-e00003\.safetensors: image index outside"):
        store.read_batch(3, 0)
    with pytest.raises(LabelStoreError, match=r"labels/fkd-e00003\.safetensors: image index outside"):
        LabelStore.from_set(DistilledSet.load(tmp_path / "b", verify=False))
    # (c) a file removed after loading
    (tmp_path / "b" / "labels" / f"{epoch_file(4)}.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"labels/fkd-e00004\.safetensors: missing"):
        store.batch_at(4, 0)


def test_read_batch_equals_batch_at_bit_for_bit(art):
    store = LabelStore.from_set(DistilledSet.load(art))
    eager = LabelStore.from_label_files({k: v for k, v in DistilledSet.load(art).label_files.items()})
    assert eager.held_epochs() == list(range(EPOCHS))  # a plain dict: everything in memory, as before
    for e, p in [(0, 0), (5, 2), (19, 1), (11, 0)]:
        a, b = store.read_batch(e, p), eager.batch_at(e, p)
        assert store.held_epochs() == []  # rows only: no epoch loaded
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        for f in ("crop", "flip", "perm", "lam"):
            assert torch.equal(getattr(a[1], f), getattr(b[1], f))
        assert a[1].box is None and b[1].box is None


def _params_sha(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                   for t in model.state_dict().values())).hexdigest()


@pytest.mark.parametrize("factor", [1, 10])
def test_uint8_replay_from_a_lazy_store_equals_the_in_memory_float_path(art, digits, tmp_path, factor):
    """The old path (whole set normalised to float32, store held in memory) and the new one (uint8
    pixels normalised per batch, store read per epoch / per batch) train the same student."""
    path = art if factor == 1 else prune_labels(art, factor, out=tmp_path / "p")
    dset = DistilledSet.load(path)
    lazy = LabelStore.from_set(dset)
    eager = LabelStore.from_label_files(dict(dset.label_files.items()))
    cfg = FKDConfig(epochs=EPOCHS, lr=1e-2)
    fill = fill_value(dset.info)
    old = seeded_model(lambda: model_for("mlp", dset.info), 3)
    train_fkd(old, normalize(dset.images, dset.info), cfg, store=eager, fill=fill, seed=3)
    new = seeded_model(lambda: model_for("mlp", dset.info), 3)
    reads = {"whole": 0, "rows": 0}
    real_load, real_read = TensorFile.load, TensorFile.read

    def load(self):
        reads["whole"] += 1
        return real_load(self)

    def read(self, parts):
        reads["rows"] += 1
        return real_read(self, parts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TensorFile, "load", load)
        mp.setattr(TensorFile, "read", read)
        stats = train_fkd(new, dset.images, cfg, store=lazy, fill=fill, seed=3, info=dset.info)
    assert _params_sha(new) == _params_sha(old)
    assert stats["stored_batches_used"] > 0 and len(lazy.held_epochs()) <= 2
    if factor == 1:  # order replay: each stored epoch read whole, once
        assert reads == {"whole": EPOCHS, "rows": 0}
    else:  # pool replay: single batches' rows (an epoch is read whole only when a draw is that epoch in order)
        assert reads["rows"] > 0 and reads["whole"] < EPOCHS / 2


def test_relabel_then_soft_evaluation_equals_the_old_code_path(art, digits):
    """evaluate --protocol soft (uint8 per batch, lazy store) gives the accuracies the old
    _evaluate_soft gave: whole set normalised to float32, store loaded into memory."""
    from decoct.evaluation.protocols import evaluate
    from decoct.train.trainer import evaluate_accuracy  # noqa: F401  (what fit_soft_students reports)

    r = evaluate(art, "soft", runs=2, seed=0, dataset=digits, device="cpu", model="mlp", lr=1e-2, epochs=8,
                 progress=False)
    dset = DistilledSet.load(art)
    store = LabelStore.from_label_files(dict(dset.label_files.items()))
    store.check_for(dset)
    info = dset.info
    fcfg = FKDConfig.from_recipe(soft_recipe_for(info), epochs=8, batch_size=store.batch, amp=False,
                                 channels_last=False, lr=1e-2, granularity="auto")
    want = fit_soft_students(lambda: model_for("mlp", info), normalize(dset.images, info),
                             normalize(digits.test.images, info), digits.test.labels, fcfg, seeds=[0, 1],
                             store=store, fill=fill_value(info))
    assert r.accuracies == want and len(want) == 2


def test_writing_a_loaded_store_copies_its_files_and_keeps_the_set_lazy(art, tmp_path):
    dset = DistilledSet.load(art)
    dset.save(tmp_path / "copy")
    for f in sorted((art / "labels").glob("*.safetensors")):
        assert (tmp_path / "copy" / "labels" / f.name).read_bytes() == f.read_bytes()
    # attach_store, canonical and dataclasses.replace keep the files on disk
    store = LabelStore.from_set(dset)
    again = attach_store(dset, store)
    assert isinstance(again.label_files, TensorFiles)
    assert all(isinstance(again.label_files.entry(epoch_file(e)), TensorFile) for e in range(EPOCHS))
    assert isinstance(dataclasses.replace(dset).label_files, TensorFiles)
    assert isinstance(dset.canonical().label_files, TensorFiles)
    # a pruned store cut from a loaded one is cut epoch by epoch when written
    pruned = prune_store(store, 10)
    files = pruned.label_files()
    assert isinstance(files, TensorFiles) and pruned.held_epochs() == []
    assert any(isinstance(files.entry(n), Deferred) for n in files)
    out = attach_store(dset, pruned)
    out.save(tmp_path / "pruned")
    assert pruned.held_epochs() == [] or len(pruned.held_epochs()) <= 2
    back = LabelStore.from_set(DistilledSet.load(tmp_path / "pruned"))
    assert back.prune_factor == 10 and back.num_units == pruned.num_units == 4
    for e, p in back.units():
        a, b = back.batch_at(e, p), store.batch_at(e, p)
        assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])


def test_set_built_in_memory_keeps_working(art):
    loaded = DistilledSet.load(art)
    plain = {k: loaded.label_files[k] for k in loaded.label_files}
    dset = DistilledSet(loaded.info, loaded.images, loaded.labels, label_files=plain)
    assert isinstance(dset.label_files, dict)
    store = LabelStore.from_set(dset)
    assert store.held_epochs() == list(range(EPOCHS)) and store.payload_bytes() == LabelStore.from_set(
        loaded).payload_bytes()
    assert isinstance(attach_store(dset, store).label_files, dict)


def test_train_fkd_refuses_images_it_cannot_normalise(art):
    dset = DistilledSet.load(art)
    store = LabelStore.from_set(dset)
    student = model_for("mlp", dset.info)
    cfg = FKDConfig(epochs=1)
    with pytest.raises(ValueError, match="uint8 images need info="):
        train_fkd(student, dset.images, cfg, store=store)
    with pytest.raises(ValueError, match="got torch.int64"):
        train_fkd(student, dset.images.long(), cfg, store=store, info=dset.info)
    with pytest.raises(ValueError, match=r"needs \(1, 8, 8\)"):
        train_fkd(student, dset.images[:, :, :4], cfg, store=store, info=dset.info)
