"""relabel and the soft protocol at any size (issue 12): relabel holds about one epoch, reads a set above
``$DECOCT_MAX_SET_BYTES`` through an ImageBank, and writes exactly what the in-memory path wrote;
``evaluate --protocol soft`` chooses the bank by size; the hard protocols read no label file.
"""

import dataclasses
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch

from decoct.augment.recorded_views import ViewRecipe
from decoct.data import DatasetInfo, normalize
from decoct.decoupled.relabel import open_set, prune_labels, relabel, relabel_set, replay_logits
from decoct.formats.artifact import DistilledSet
from decoct.formats.errors import ArtifactError
from decoct.formats.image_bank import ImageBank
from decoct.formats.label_pruning import prune_store
from decoct.formats.label_store import EpochLabels, LabelStore, attach_store
from decoct.formats.tensor_files import TensorFile
from decoct.train import seeded_model
from decoct.train.soft_students import fill_value

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(info: DatasetInfo) -> torch.nn.Module:
    return seeded_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        info.channels * info.height * info.width, info.num_classes)), 0).eval()




def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _in_memory(path: Path, teacher, out: Path, **kw) -> Path:
    """What relabel wrote before it kept epochs in files: every epoch in memory, the set loaded whole."""
    dset = DistilledSet.load(path)
    store = relabel_set(dset, teacher, **kw)
    assert store.held_epochs() == sorted(store.epochs)
    return attach_store(dset, store).save(out)


# ---------------------------------------------------------------------- relabel: bytes held, bytes written
@pytest.mark.parametrize("view", [None, ViewRecipe(mix="cutmix")], ids=["recipe", "cutmix"])
def test_relabel_writes_what_the_in_memory_path_writes(digits, random_digits_set, tmp_path, monkeypatch, view):
    """Every file (label epochs, header, manifest, PNGs) byte for byte: the file-backed relabel, the same
    through an ImageBank (a set above the limit), a pruned relabel, and pruning a bank's store."""
    random_digits_set(2, config={"ipc": 2}).save(tmp_path / "a")
    teacher = _teacher(digits.info)
    kw = dict(epochs=6, batch_size=8, seed=2, device="cpu", view=view)
    want = _tree(_in_memory(tmp_path / "a", teacher, tmp_path / "want", **kw))
    assert sum(k.startswith("labels/fkd-e") for k in want) == 6
    got = relabel(tmp_path / "a", teacher, out=tmp_path / "files", **kw)
    assert _tree(got) == want and not (tmp_path / ".files.relabel").exists()
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "100")  # 20 images of 64 bytes: read per batch from the PNGs
    assert isinstance(open_set(tmp_path / "a"), ImageBank)
    assert _tree(relabel(tmp_path / "a", teacher, out=tmp_path / "bank", **kw)) == want
    # pruned: relabel --prune through the bank, and pruning the bank's full store, equal the in-memory cut
    monkeypatch.delenv("DECOCT_MAX_SET_BYTES")
    full = DistilledSet.load(tmp_path / "want")
    cut = _tree(attach_store(full, prune_store(LabelStore.from_set(full), 10)).save(tmp_path / "cut"))
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "100")
    assert _tree(relabel(tmp_path / "a", teacher, prune=10, out=tmp_path / "p-bank", **kw)) == cut
    assert _tree(prune_labels(tmp_path / "bank", 10, out=tmp_path / "p2-bank")) == cut
    # the stored logits are the teacher's of the whole set normalised at once (the old float32 copy)
    dset = DistilledSet.load(tmp_path / "p-bank")
    store = LabelStore.from_set(dset)
    for e, p in store.units():
        again, stored = replay_logits(teacher, normalize(dset.images, dset.info), store, e, p, fill_value(dset.info))
        assert torch.equal(again, stored)


@pytest.mark.slow
def test_relabel_holds_about_one_epoch_not_all(tmp_path):
    """Live bytes of stored epochs while relabelling 2 or 6 epochs: about one epoch (the one being made),
    where the old relabel held them all until the store was written; and the Python bytes of the copy
    into the artifact (one epoch file at a time) do not grow with the number of epochs."""
    info = DatasetInfo("wide", tuple(f"c{i}" for i in range(1000)), 1, 4, 4, (0.5,), (0.25,))
    n = 40
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    DistilledSet(info, images, torch.arange(n)).canonical().save(tmp_path / "w")
    one = n * (2 * 1000 + 2 * 4 + 1 + 4 + 2) + 2 * 12 + 4  # logits, crop, flip, index, perm; per-batch tensors
    live, peak = [0], [0]
    real_init = EpochLabels.__post_init__

    def counted(self):
        real_init(self)
        size = sum(t.numel() * t.element_size() for t in self.tensors().values() if not t.is_meta)
        live[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(self, lambda: live.__setitem__(0, live[0] - size))

    def run(epochs: int, **kw) -> tuple[int, int]:
        live[0] = peak[0] = 0
        tracemalloc.start()
        relabel(tmp_path / "w", _teacher(info), epochs=epochs, batch_size=20, seed=0, device="cpu",
                out=tmp_path / f"out{epochs}", view=ViewRecipe(mix="mixup"), **kw)
        py_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak[0], py_peak

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EpochLabels, "__post_init__", counted)
        run(1)  # imports and first-use caches out of the way
        held2, py2 = run(2)
        held6, py6 = run(6)
        assert one * 0.9 <= held2 <= 1.2 * one and one * 0.9 <= held6 <= 1.2 * one, (held2, held6, one)
        assert py6 - py2 < one / 2, (py2, py6)
        # the in-memory API keeps its store (it must outlive its work directory): every epoch
        live[0] = peak[0] = 0
        kept = relabel_set(DistilledSet.load(tmp_path / "w"), _teacher(info), epochs=6, batch_size=20,
                           device="cpu", view=ViewRecipe(mix="mixup"), work_dir=tmp_path / "wd")
        assert peak[0] >= 6 * one * 0.9 and kept.held_epochs() == list(range(6))
    store = LabelStore.from_set(DistilledSet.load(tmp_path / "out6"))
    assert store.num_units == 2 * 6 and 6 * one < store.payload_bytes() < 6 * one + 1000  # + the header


def test_relabel_remakes_damaged_or_misplaced_work_files(digits, random_digits_set, tmp_path):
    random_digits_set(2, config={"ipc": 2}).save(tmp_path / "a")
    teacher = _teacher(digits.info)
    kw = dict(epochs=4, batch_size=8, seed=1, device="cpu")
    want = _tree(_in_memory(tmp_path / "a", teacher, tmp_path / "want", **kw))
    work = tmp_path / ".out.relabel"
    relabel_set(DistilledSet.load(tmp_path / "a"), teacher, work_dir=work, **kw)  # a killed relabel's leftovers
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    (work / "e00001.safetensors").write_bytes((work / "e00001.safetensors").read_bytes()[:-7])  # truncated
    (work / "e00002.safetensors").write_bytes((work / "e00003.safetensors").read_bytes())  # another epoch's
    (work / "e00000.safetensors").write_bytes(b"not safetensors")
    relabel(tmp_path / "a", teacher, out=tmp_path / "out", **kw)
    assert len(calls) == 1 + 3 * 3  # the dry run, then epochs 0, 1, 2 again (3 batches each); epoch 3 reused
    assert _tree(tmp_path / "out") == want and not work.exists()


def test_relabel_refuses_a_bad_size_limit_naming_the_variable(digits, random_digits_set, tmp_path, monkeypatch):
    random_digits_set(2, config={"ipc": 2}).save(tmp_path / "a")
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "2GB")
    with pytest.raises(ValueError, match=r"\$DECOCT_MAX_SET_BYTES must be a number of bytes, got '2GB'"):
        relabel(tmp_path / "a", _teacher(digits.info), epochs=2, batch_size=8, device="cpu")
    assert not (tmp_path / "a" / "labels").exists()


@pytest.mark.slow
def test_cli_relabel_and_prune_of_a_set_above_the_limit(digits, tmp_path, monkeypatch, capsys):
    """`decoct relabel` (and --prune) on a set above $DECOCT_MAX_SET_BYTES writes the run the default path
    writes, and reports the same; a bad value of the variable is one line and exit code 2."""
    import shutil

    from decoct.cli import main
    from decoct.decoupled.squeeze import squeeze

    squeeze(digits, model="convnet_bn", model_kwargs=dict(width=8), out=tmp_path / "teacher", epochs=1,
            show_progress=False, device="cpu")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    shutil.copytree(tmp_path / "run", tmp_path / "big")
    cmd = ["--teacher", str(tmp_path / "teacher"), "--epochs", "6", "--batch-size", "8", "--device", "cpu",
           "--no-progress"]
    capsys.readouterr()
    assert main(["relabel", str(tmp_path / "run"), *cmd]) == 0
    said = capsys.readouterr().out.replace(str(tmp_path / "run"), "RUN")
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "1000")  # 20 images of 64 bytes: read per batch
    assert main(["relabel", str(tmp_path / "big"), *cmd]) == 0
    assert capsys.readouterr().out.replace(str(tmp_path / "big"), "RUN") == said
    assert _tree(tmp_path / "big" / "artifact") == _tree(tmp_path / "run" / "artifact")
    assert main(["relabel", str(tmp_path / "big"), "--prune", "10", "--out", str(tmp_path / "big10"),
                 "--no-progress"]) == 0
    monkeypatch.delenv("DECOCT_MAX_SET_BYTES")
    assert main(["relabel", str(tmp_path / "run"), "--prune", "10", "--out", str(tmp_path / "run10"),
                 "--no-progress"]) == 0
    assert _tree(tmp_path / "big10" / "artifact") == _tree(tmp_path / "run10" / "artifact")
    capsys.readouterr()
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "lots")
    assert main(["relabel", str(tmp_path / "run"), *cmd, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("decoct relabel: error: $DECOCT_MAX_SET_BYTES must be a number of bytes, got 'lots'")


# ---------------------------------------------------------------------- ImageBank storage = load's
def _kinds(random_digits_set) -> dict[str, DistilledSet]:
    from decoct.augment import ZCA

    base = random_digits_set(2, config={"ipc": 2})
    x = base.to_float()
    g = torch.Generator().manual_seed(3)
    zca = ZCA()
    zca.fit(x)
    return {
        "gray": base,
        "soft-labels": dataclasses.replace(base, soft_labels=torch.softmax(torch.randn(20, 10, generator=g), 1)),
        "zca": dataclasses.replace(base, attachments={"zca": zca.state_dict()}),
        "palette": DistilledSet.from_palette(base.info, torch.randint(0, 4, (20, 8, 8), dtype=torch.uint8,
                                                                      generator=g),
                                             torch.randint(0, 256, (20, 4, 1), dtype=torch.uint8, generator=g),
                                             base.labels),
        "float16": DistilledSet.from_float(base.info, x, base.labels, float_storage=torch.float16),
        "label-file": dataclasses.replace(base, label_files={"extra_logits": {"x": torch.randn(20, 7)}}),
    }


def test_bank_storage_equals_load_and_forged_claims_are_refused(digits, random_digits_set, tmp_path):
    import json

    for kind, dset in _kinds(random_digits_set).items():
        dset.save(tmp_path / kind)
        assert ImageBank.open(tmp_path / kind).storage() == DistilledSet.load(tmp_path / kind).storage(
            tmp_path / kind), kind
    relabel(tmp_path / "gray", _teacher(digits.info), epochs=3, batch_size=8, device="cpu")
    assert ImageBank.open(tmp_path / "gray").storage() == DistilledSet.load(tmp_path / "gray").storage()
    m = json.loads((tmp_path / "gray" / "manifest.json").read_text())
    m["storage"]["raw_bytes"]["labels"] -= 1000  # a manifest edited to claim cheaper labels
    (tmp_path / "gray" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"storage\.raw_bytes\.labels claims .* the manifest was edited"):
        DistilledSet.load(tmp_path / "gray")
    with pytest.raises(ArtifactError, match=r"storage\.raw_bytes\.labels claims .* the manifest was edited"):
        ImageBank.open(tmp_path / "gray")


# ---------------------------------------------------------------------- evaluate --protocol soft by size
@pytest.fixture(scope="module")
def relabelled(digits, random_digits_set, tmp_path_factory):
    path = tmp_path_factory.mktemp("soft") / "a"
    random_digits_set(2, config={"ipc": 2}).save(path)
    relabel(path, _teacher(digits.info), epochs=6, batch_size=8, seed=0, device="cpu")
    return path


def test_soft_evaluate_reads_a_set_above_the_limit_from_its_files(relabelled, digits, monkeypatch):
    from decoct.evaluation.protocols import evaluate

    kw = dict(runs=2, seed=0, dataset=digits, device="cpu", model="mlp", lr=1e-2, progress=False)
    mem = evaluate(relabelled, "soft", **kw)
    online = evaluate(relabelled, "soft", online_teacher=_teacher(digits.info), epochs=2, batch_size=8, **kw)
    assert mem.extra["images_source"] == online.extra["images_source"] == "memory"
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", str(20 * 64 - 1))  # one byte below the set's pixels

    def no_load(*a, **k):
        raise AssertionError("DistilledSet.load decodes the whole set")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DistilledSet, "load", no_load)
        bank = evaluate(relabelled, "soft", **kw)
        bank_online = evaluate(relabelled, "soft", online_teacher=_teacher(digits.info), epochs=2, batch_size=8, **kw)
    assert bank.extra["images_source"] == bank_online.extra["images_source"] == "bank"
    assert bank.accuracies == mem.accuracies and bank_online.accuracies == online.accuracies
    assert (bank.bytes_on_disk, bank.raw_bytes, bank.extra["label_bytes"], bank.extra["label_payload_bytes"]) == (
        mem.bytes_on_disk, mem.raw_bytes, mem.extra["label_bytes"], mem.extra["label_payload_bytes"])
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", str(20 * 64))  # at the limit: loaded as before
    assert evaluate(relabelled, "soft", **kw).extra["images_source"] == "memory"


def test_soft_evaluate_from_a_bank_refuses_zca_and_bad_limits(digits, random_digits_set, tmp_path, monkeypatch):
    from decoct.evaluation.protocols import evaluate

    _kinds(random_digits_set)["zca"].save(tmp_path / "z")
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "1")
    with pytest.raises(ValueError, match="the soft protocol does not support ZCA-whitened sets"):
        evaluate(tmp_path / "z", "soft", runs=1, dataset=digits, device="cpu", model="mlp",
                 online_teacher=_teacher(digits.info), progress=False)
    monkeypatch.setenv("DECOCT_MAX_SET_BYTES", "-5")
    with pytest.raises(ValueError, match=r"\$DECOCT_MAX_SET_BYTES must be >= 0, got '-5'"):
        evaluate(tmp_path / "z", "soft", runs=1, dataset=digits, device="cpu", model="mlp", progress=False)


# ---------------------------------------------------------------------- classic/fast read no label file
def test_hard_protocol_storage_reads_no_label_file(relabelled, digits, monkeypatch):
    from decoct.evaluation.protocols import evaluate, hard_protocol_storage

    dset = DistilledSet.load(relabelled)
    storage = dset.storage(relabelled)
    held = {k: dset.label_files[k] for k in dset.label_files}  # the old count: every tensor of every file
    bits = sum(t.numel() * t.element_size() * 8 for ts in held.values() for t in ts.values())
    raw = storage["raw_bytes"]
    import json
    import math

    files = json.loads((relabelled / "manifest.json").read_text())["files"]
    store_bytes = sum(e["bytes"] for rel, e in files.items() if rel.startswith("labels/"))
    want = (storage["bytes_on_disk"]["total"] - store_bytes,
            math.ceil(raw["images"] + raw["palettes"] + max(0, raw["labels"] - bits / 8)))
    assert want[1] == math.ceil(20 * 64 + 20 * 4 / 8)  # pixels and hard labels: the store is not counted

    def never(self, *a):
        raise AssertionError(f"{self.rel} was read")

    for name in ("load", "read_bytes", "read"):
        monkeypatch.setattr(TensorFile, name, never)
    assert hard_protocol_storage(dset, relabelled, storage) == want
    r = evaluate(relabelled, "fast", runs=1, dataset=digits, device="cpu", model="mlp", epochs=1, progress=False)
    assert (r.bytes_on_disk, r.raw_bytes) == want
