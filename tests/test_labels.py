"""FKD label store: relabel, exact replay, storage, pruning (LPLD), soft evaluation, CLI."""

import json
from fractions import Fraction

import pytest
import torch

from decoct.data import normalize
from decoct.decoupled.relabel import relabel, relabel_set, replay_logits
from decoct.formats.artifact import DistilledSet
from decoct.formats.label_pruning import (
    PRUNE_FACTORS,
    epoch_plan,
    kept_units,
    payload_model,
    prune_store,
)
from decoct.formats.label_store import LabelStore, LabelStoreError, attach_store
from decoct.models import model_for
from decoct.train import seeded_model
from decoct.train.soft_students import fill_value

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(train_digits_teacher):
    return train_digits_teacher(epochs=4)




@pytest.fixture(scope="module")
def art(digits, teacher, random_digits_set, tmp_path_factory):
    """Random-real IPC 2 (20 images) with a 3-epoch store of batches of 8 (8, 8, 4 per epoch)."""
    path = tmp_path_factory.mktemp("art") / "a"
    random_digits_set(2, 0, config={"ipc": 2, "seed": 0}).save(path)
    relabel(path, teacher, epochs=3, batch_size=8, seed=0, device="cpu")
    return path


def test_relabel_replay_reproduces_stored_logits_bitwise(art, teacher, digits):
    dset = DistilledSet.load(art)
    store = LabelStore.from_set(dset)
    x = normalize(dset.images, dset.info)
    fill = fill_value(dset.info)
    n = 0
    for e, p in store.units():
        again, stored = replay_logits(teacher, x, store, e, p, fill)
        assert stored.dtype == torch.float16 and torch.equal(again, stored)
        n += 1
    assert n == 9


def test_store_layout_and_header(art):
    dset = DistilledSet.load(art)
    store = LabelStore.from_set(dset)
    h = store.header
    assert (h["epochs"], h["batch"], h["units_per_epoch"], h["full_units_per_epoch"], h["tail"]) == (3, 8, 3, 2, 4)
    assert h["version"] == 1 and h["prune"] is None and h["view"]["mix"] == "mixup"
    assert sorted(dset.label_files) == ["fkd", "fkd-e00000", "fkd-e00001", "fkd-e00002"]
    orders = []
    for ep in store.epochs.values():
        assert ep.sizes.tolist() == [8, 8, 4] and ep.units.tolist() == [0, 1, 2]
        assert sorted(ep.index.tolist()) == list(range(20))  # each epoch is a permutation of the set
        orders.append(ep.index.tolist())
        assert ep.logits.shape == (20, 10) and ep.lam.shape == (3,) and ep.box is None
    assert orders[0] != orders[1]
    # batch of 19 out of 20 images: a 1-image tail cannot train a BN student and is not stored
    small = relabel_set(DistilledSet.load(art), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                        epochs=1, batch_size=19, device="cpu")
    assert small.header["units_per_epoch"] == 1 and small.epochs[0].sizes.tolist() == [19]


def test_label_bytes_equal_file_sizes(art):
    dset = DistilledSet.load(art)
    st = dset.storage(art)
    files = list((art / "labels").glob("*.safetensors"))
    assert len(files) == 4
    assert st["bytes_on_disk"]["labels"] == sum(f.stat().st_size for f in files)
    imgs = sum(f.stat().st_size for f in (art / "images").rglob("*.png"))
    assert st["bytes_on_disk"]["images"] == imgs and st["bytes_on_disk"]["total"] == imgs + st["bytes_on_disk"]["labels"]
    store = LabelStore.from_set(dset)
    # payload: per image and epoch 2C (fp16 logits) + 8 (int16 box) + 1 (flip) + 4 (index) + 2 (mix partner),
    # per batch 4 (size) + 4 (batch number) + 4 (lambda), per epoch 4 (epoch id), plus the JSON header
    header = dset.label_files["fkd"]["header"].numel()
    assert store.payload_bytes() == 3 * (20 * (20 + 8 + 1 + 4 + 2) + 3 * 12 + 4) + header
    assert payload_model(20, 10, 3, 8, "mixup")["bytes"] + header == store.payload_bytes()


def test_store_from_another_artifact_is_rejected(art, digits, random_digits_set, tmp_path):
    other = random_digits_set(2, 1, config={"ipc": 2, "seed": 1})
    mine = DistilledSet.load(art)
    forged = DistilledSet(other.info, other.images, other.labels, label_files=mine.label_files)
    forged.save(tmp_path / "b")
    loaded = DistilledSet.load(tmp_path / "b")  # the artifact itself is intact...
    with pytest.raises(LabelStoreError, match="does not belong to this distilled set"):
        LabelStore.from_set(loaded)  # ...but its label store is someone else's
    from decoct.evaluation.protocols import evaluate

    with pytest.raises(LabelStoreError, match="does not belong"):
        evaluate(tmp_path / "b", "soft", runs=1, dataset=digits, device="cpu", model="mlp", progress=False)
    with pytest.raises(LabelStoreError, match="does not belong"):
        attach_store(other, LabelStore.from_set(mine))


def test_damaged_or_foreign_headers_are_clear_errors(art):
    files = dict(DistilledSet.load(art).label_files)
    head = json.loads(bytes(files["fkd"]["header"].numpy().tobytes()))
    head["version"] = 99
    bad = dict(files, fkd={"header": torch.tensor(list(json.dumps(head).encode()), dtype=torch.uint8)})
    with pytest.raises(LabelStoreError, match="version 99 is not supported"):
        LabelStore.from_label_files(bad)
    missing = {k: v for k, v in files.items() if k != "fkd-e00001"}
    with pytest.raises(LabelStoreError, match="header lists epochs"):
        LabelStore.from_label_files(missing)
    ep = dict(files["fkd-e00000"], logits=files["fkd-e00000"]["logits"][:, :5])
    with pytest.raises(LabelStoreError, match="logits must be float16"):
        LabelStore.from_label_files(dict(files, **{"fkd-e00000": ep}))


def test_prune_ratio_mapping_is_exact():
    assert PRUNE_FACTORS[10] == Fraction(9, 10) and PRUNE_FACTORS[20] == Fraction(19, 20)
    assert PRUNE_FACTORS[30] == Fraction(97, 100) and PRUNE_FACTORS[40] == Fraction(39, 40)
    assert PRUNE_FACTORS[100] == Fraction(99, 100)
    # ImageNet-1K IPC10 at batch 128: 78 full batches x 300 epochs, 40x keeps 7.5 epochs = 585 batches
    assert kept_units(300 * 78, 40) == 585
    assert kept_units(100, 10) == 10 and int(100 * (1 - 0.9)) == 9  # float arithmetic would keep 9
    assert kept_units(100 * 156, 40) == 390  # Tiny IPC50 at batch 64: 2.5 of 100 epochs
    with pytest.raises(ValueError, match="unknown pruning factor 7"):
        kept_units(100, 7)


@pytest.fixture(scope="module")
def full50(art, teacher):
    """An unpruned 50-epoch store (2 full batches + a tail per epoch = 100 full batches)."""
    return relabel_set(DistilledSet.load(art), teacher, epochs=50, batch_size=8, seed=3, device="cpu")


@pytest.mark.parametrize("factor", [10, 20, 30, 40, 100])
def test_pruning_keeps_exactly_the_fraction_it_claims(full50, factor):
    pruned = prune_store(full50, factor)
    want = int(Fraction(100) * (1 - PRUNE_FACTORS[factor]))
    assert pruned.num_units == want == pruned.header["prune"]["kept_units"]
    assert pruned.header["prune"]["total_units"] == 100 and pruned.prune_factor == factor
    assert all(int(s) == 8 for ep in pruned.epochs.values() for s in ep.sizes)  # full batches only
    # the prefix, in global order: (0,0), (0,1), (1,0), (1,1), ...
    assert pruned.units() == [(g // 2, g % 2) for g in range(want)]
    for e, ep in pruned.epochs.items():
        full = full50.epochs[e]
        n = int(ep.sizes.sum())
        assert torch.equal(ep.logits, full.logits[:n]) and torch.equal(ep.index, full.index[:n])
    assert pruned.payload_bytes() < full50.payload_bytes() * 1.5 / factor + 2000
    header = pruned.label_files()["fkd"]["header"].numel()
    model = payload_model(20, 10, 50, 8, "mixup", prune=factor)
    assert model["batches"] == want and pruned.payload_bytes() == model["bytes"] + header


def test_pruned_relabel_equals_pruned_full_store(art, teacher, full50):
    direct = relabel_set(DistilledSet.load(art), teacher, epochs=50, batch_size=8, seed=3, device="cpu", prune=40)
    via = prune_store(full50, 40)
    assert direct.header == via.header
    a, b = direct.label_files(), via.label_files()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])


def test_ratio_that_leaves_no_batch_errors_before_any_work(art):
    class Exploding(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run")

    # 3 epochs x 2 full batches = 6; 10x keeps floor(0.6) = 0
    with pytest.raises(LabelStoreError, match=r"keeps floor\(6 x 1/10\) = 0 of 6"):
        relabel(art, Exploding(), epochs=3, batch_size=8, device="cpu", prune=10, out=art.parent / "never")
    assert not (art.parent / "never").exists()
    with pytest.raises(LabelStoreError, match="= 0 of 6"):
        prune_store(LabelStore.from_set(DistilledSet.load(art)), 10)


def test_epoch_plans(full50):
    g = torch.Generator().manual_seed(0)
    order = epoch_plan(full50, 4, "auto", g)
    assert order == [[(e, 0), (e, 1), (e, 2)] for e in range(4)]
    pruned = prune_store(full50, 10)  # 10 full batches in epochs 0-4
    plan = epoch_plan(pruned, 30, "auto", g)
    assert len(plan) == 30 and all(len(ep) == 2 for ep in plan)  # B full batches per epoch
    drawn = [u for ep in plan for u in ep]
    pool = set(pruned.units())
    assert set(drawn) <= pool and len(set(drawn)) > 5  # with replacement, from the whole pool
    whole = epoch_plan(pruned, 6, "epoch", g)
    assert all(ep in ([(e, 0), (e, 1)] for e in range(5)) for ep in whole)
    with pytest.raises(LabelStoreError, match="order replay of 6 epochs"):
        epoch_plan(pruned, 6, "order", g)
    with pytest.raises(LabelStoreError, match="order replay of 51 epochs"):
        epoch_plan(full50, 51, "order", g)


def test_relabel_resumes_finished_epochs(art, teacher, tmp_path):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    dset = DistilledSet.load(art)
    first = relabel_set(dset, Counting(), epochs=4, batch_size=8, seed=1, device="cpu", work_dir=tmp_path / "w")
    assert len(list((tmp_path / "w").glob("e*.safetensors"))) == 4
    (tmp_path / "w" / "e00002.safetensors").unlink()  # "interrupted" before epoch 2 was written
    calls.clear()
    again = relabel_set(dset, Counting(), epochs=4, batch_size=8, seed=1, device="cpu", work_dir=tmp_path / "w")
    assert calls == [2, 8, 8, 4]  # the dry-run check, then only epoch 2's three batches
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(first.epochs.values(), again.epochs.values(), strict=True))
    # other settings never reuse those epochs
    calls.clear()
    relabel_set(dset, Counting(), epochs=4, batch_size=8, seed=2, device="cpu", work_dir=tmp_path / "w")
    assert len(calls) == 1 + 12


def test_existing_store_noop_force_and_bad_teachers(art, teacher, digits):
    before = (art / "labels" / "fkd.safetensors").stat().st_mtime_ns
    relabel(art, teacher, epochs=3, batch_size=8, seed=0, device="cpu")  # same settings: nothing to do
    assert (art / "labels" / "fkd.safetensors").stat().st_mtime_ns == before
    with pytest.raises(LabelStoreError, match="already holds a label store made with other settings"):
        relabel(art, teacher, epochs=4, batch_size=8, seed=0, device="cpu")
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(LabelStoreError, match="this set has 10 classes"):
        relabel(art, wrong, epochs=3, batch_size=8, device="cpu", out=art.parent / "never2")


def test_soft_evaluation_end_to_end(art, teacher, digits, tmp_path):
    """Random-real IPC 2 + a 30-epoch store: a soft-label MLP student beats chance by far."""
    from decoct.decoupled.relabel import prune_labels
    from decoct.evaluation.protocols import evaluate

    path = relabel(art, teacher, epochs=30, batch_size=8, seed=0, device="cpu", out=tmp_path / "s30")
    r = evaluate(path, "soft", runs=2, dataset=digits, device="cpu", model="mlp", lr=1e-2, progress=False)
    assert r.protocol == "soft" and r.epochs == 30 and len(r.accuracies) == 2
    assert r.mean > 0.4  # chance is 0.1
    st = DistilledSet.load(path).storage(path)
    assert r.bytes_on_disk == st["bytes_on_disk"]["total"] and r.extra["label_bytes"] == st["bytes_on_disk"]["labels"]
    assert r.extra["label_source"] == "store" and not r.extra["unlimited_labels"]
    assert r.extra["granularity"] == "order" and r.extra["temperature"] == 30.0

    pruned = prune_labels(path, 10, out=tmp_path / "s30-10x")
    p = evaluate(pruned, "soft", runs=1, dataset=digits, device="cpu", model="mlp", lr=1e-2, progress=False)
    assert p.extra["prune_factor"] == 10 and p.extra["granularity"] == "batch_to_epoch"
    assert p.extra["label_bytes"] < 0.25 * r.extra["label_bytes"] and p.mean > 0.2

    o = evaluate(art, "soft", runs=1, dataset=digits, device="cpu", model="mlp", lr=1e-2, epochs=30, batch_size=8,
                 online_teacher=teacher, progress=False)
    assert o.protocol == "soft-online" and o.extra["unlimited_labels"] and o.mean > 0.4
    with pytest.raises(ValueError, match="batch 8"):
        evaluate(path, "soft", runs=1, dataset=digits, device="cpu", model="mlp", batch_size=16, progress=False)


def test_cli_relabel_prune_and_soft_evaluate(digits, tmp_path, capsys):
    from decoct.cli import main
    from decoct.decoupled.squeeze import squeeze

    squeeze(digits, model="convnet_bn", model_kwargs=dict(width=8), out=tmp_path / "teacher", epochs=1,
            show_progress=False, device="cpu")
    run = tmp_path / "run"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["relabel", str(run), "--teacher", str(tmp_path / "teacher"), "--epochs", "5", "--batch-size", "8",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "label store: 5 epochs x batch 8" in capsys.readouterr().out
    assert main(["relabel", str(run), "--prune", "40", "--out", str(tmp_path / "r40"), "--no-progress"]) == 2
    assert "keeps floor(10 x 1/40) = 0 of 10" in capsys.readouterr().err
    assert not (tmp_path / "r40").exists()  # refused before any work: no run directory left behind
    assert main(["relabel", str(run), "--prune", "10", "--out", str(tmp_path / "r10"), "--no-progress"]) == 0
    assert "pruned 10x: 1 stored batches" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "r10"), "--protocol", "soft", "--model", "mlp", "--epochs", "2",
                 "--runs", "1", "--device", "cpu", "--no-progress"]) == 0
    ev = json.loads((tmp_path / "r10" / "eval-soft-mlp-e2.json").read_text())
    assert ev["extra"]["prune_factor"] == 10 and ev["protocol"] == "soft"
    assert main(["evaluate", str(run), "--protocol", "soft", "--teacher", str(tmp_path / "teacher"), "--model",
                 "mlp", "--epochs", "1", "--runs", "1", "--device", "cpu", "--no-progress"]) == 0
    assert (run / "eval-soft-online-mlp-e1.json").exists()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--protocol", "classic", "--teacher", str(tmp_path / "teacher"),
                 "--no-progress"]) == 2
    assert "online teacher applies to the soft protocol only" in capsys.readouterr().err


_WORKER = '''
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from decoct.formats.artifact import DistilledSet
from decoct.decoupled.relabel import relabel
from decoct.formats.label_store import LabelStore
from decoct.models import model_for
from decoct.train.soft_students import FKDConfig, fill_value, train_fkd
from decoct.train import seeded_model
tmp = Path(sys.argv[1])
info = DistilledSet.load(tmp / "a").info
teacher = model_for("mlp", info, width=32)
teacher.load_state_dict(torch.load(tmp / "teacher.pt"))
calls = []
teacher.register_forward_hook(lambda *a: calls.append(1))
out = relabel(tmp / "a", teacher, epochs=5, batch_size=8, seed=4, device="cpu", out=tmp / "ddp")
rank = torch.distributed.get_rank()
assert len(calls) == 1 + (9 if rank == 0 else 6), len(calls)  # dry run + epochs 0,2,4 / 1,3 of 3 batches
dset = DistilledSet.load(out)
student = seeded_model(lambda: model_for("mlp", info, width=16), 0)
stats = train_fkd(student, dset.to_float(), FKDConfig(epochs=3, lr=1e-2), store=LabelStore.from_set(dset),
                  fill=fill_value(info))
assert stats["ranks"] == 2
if rank == 0:
    torch.save(student.state_dict(), tmp / "student.pt")
'''


@pytest.mark.slow
def test_torchrun_relabel_and_ddp_student_match_one_process(art, teacher, tmp_path):
    """2 gloo processes: the sharded relabel is bit-identical, the DDP student matches 1 process."""
    import shutil
    import subprocess
    import sys

    from decoct.train.soft_students import FKDConfig, train_fkd

    shutil.copytree(art, tmp_path / "a")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "worker.py").write_text(_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = relabel(tmp_path / "a", teacher, epochs=5, batch_size=8, seed=4, device="cpu", out=tmp_path / "one")
    a, b = DistilledSet.load(single), DistilledSet.load(tmp_path / "ddp")
    assert a.label_files.keys() == b.label_files.keys() and len(a.label_files) == 6
    for name, tensors in a.label_files.items():
        assert all(torch.equal(t, b.label_files[name][k]) for k, t in tensors.items())
    assert not (tmp_path / ".ddp.relabel").exists()
    student = seeded_model(lambda: model_for("mlp", a.info, width=16), 0)
    train_fkd(student, a.to_float(), FKDConfig(epochs=3, lr=1e-2), store=LabelStore.from_set(a),
              fill=fill_value(a.info))
    ddp = torch.load(tmp_path / "student.pt")
    for k, v in student.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k
