"""Expert trajectories: training recipe, on-disk format (safetensors + manifest), resume, checks."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from decoct.data import normalize
from decoct.formats.expert_set import ExpertMismatchError, load_experts
from decoct.matching import experts as experts_mod
from decoct.matching.experts import train_experts
from decoct.models import model_for
from decoct.models.flat_params import FlatParams
from decoct.train import seeded_model
from decoct.train.trainer import make_generators

TINY = dict(width=8, norm="instance")


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(digits, out, n=2, epochs=2, **kw):
    kw.setdefault("model_kwargs", TINY)
    kw.setdefault("batch_size", 256)
    return train_experts(digits, out, num_experts=n, epochs=epochs, device="cpu", progress=False, **kw)


def test_flat_params_roundtrip_and_functional_forward():
    torch.manual_seed(0)
    model = model_for("convnet", _info(), width=4)
    net = FlatParams(model)
    flat = net.flatten()
    assert flat.numel() == sum(p.numel() for p in model.parameters()) == net.num_params
    for (name, p), (n2, t) in zip(model.named_parameters(), net.unflatten(flat).items(), strict=True):
        assert name == n2 and torch.equal(p, t)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(net(flat, x), model(x))
    # gradients reach the flat vector
    flat = flat.clone().requires_grad_(True)
    net(flat, x).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vector of"):
        net.unflatten(flat[:-1])


def _info():
    from decoct.data import DatasetInfo

    return DatasetInfo("toy", tuple("0123456789"), 1, 8, 8, (0.5,), (0.5,))


def test_train_writes_manifest_and_safetensors(digits, tmp_path):
    es = _train(digits, tmp_path / "e", n=2, epochs=2)
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["format"] == "decoct-experts" and m["settings"]["lr"] == 0.01
    assert m["settings"]["momentum"] == 0.0 and m["settings"]["weight_decay"] == 0.0
    assert m["settings"]["zca"] is False and m["zca_file"] is None  # digits: no ZCA by default
    assert [e["index"] for e in m["experts"]] == [0, 1]
    assert all(len(e["test_accuracy"]) == 3 and len(e["train_loss"]) == 2 for e in m["experts"])
    # files are plain safetensors (no pickle): the header is a little-endian length + JSON
    raw = (tmp_path / "e" / "expert_0000.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["trajectory"]["shape"] == [3, es.num_params] and header["trajectory"]["dtype"] == "F32"
    assert es.verify() == []
    # row 0 is the seeded initialisation, rows differ after training
    info = digits.info
    init = FlatParams(seeded_model(lambda: model_for("convnet", info, **TINY), 1)).flatten()
    traj = es.trajectory(1)
    assert torch.equal(traj[0], init)
    assert not torch.equal(traj[1], traj[0]) and not torch.equal(traj[2], traj[1])
    # reading two rows from the memory-mapped file equals the preloaded rows
    lazy = load_experts(tmp_path / "e", preload=False)
    assert lazy._cache == {} and torch.equal(lazy.params(1, [0, 2]), traj[[0, 2]])
    assert torch.equal(es.params(1, [2, 0]), traj[[2, 0]])
    with pytest.raises(IndexError):
        es.params(0, [3])


def test_one_epoch_is_plain_sgd_on_minibatches(digits, tmp_path):
    """Hand replay of the recipe: SGD lr 0.01, momentum 0, wd 0, CE, the run's minibatch order."""
    es = _train(digits, tmp_path / "e", n=1, epochs=1, augment="none", batch_size=512)
    info = digits.info
    model = seeded_model(lambda: model_for("convnet", info, **TINY), 0)
    x, y = normalize(digits.train.images, info), digits.train.labels
    perm = torch.randperm(len(x), generator=make_generators(0, "cpu")[0])
    for start in range(0, len(x), 512):
        idx = perm[start:start + 512]
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    assert torch.allclose(es.trajectory(0)[1], FlatParams(model).flatten(), atol=1e-6)


def test_interrupted_training_continues_and_equals_uninterrupted(digits, tmp_path, monkeypatch):
    full = _train(digits, tmp_path / "full", n=3, epochs=1)
    real = experts_mod._train_expert
    calls = {"n": 0}

    def crash_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed half-way through expert 1
        return real(*a, **kw)

    monkeypatch.setattr(experts_mod, "_train_expert", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _train(digits, tmp_path / "cut", n=3, epochs=1)
    monkeypatch.setattr(experts_mod, "_train_expert", real)
    partial = load_experts(tmp_path / "cut")
    assert len(partial) == 1 and not (tmp_path / "cut" / "expert_0001.safetensors").exists()
    sha0 = partial.experts[0]["sha256"]
    resumed = _train(digits, tmp_path / "cut", n=3, epochs=1)
    assert len(resumed) == 3 and resumed.experts[0]["sha256"] == sha0
    for k in range(3):
        assert torch.equal(resumed.trajectory(k), full.trajectory(k))
    # asking for more experts extends the set; other settings are refused
    assert len(_train(digits, tmp_path / "cut", n=4, epochs=1)) == 4
    with pytest.raises(ExpertMismatchError, match="epochs: 1 -> 2"):
        _train(digits, tmp_path / "cut", n=4, epochs=2)
    assert len(_train(digits, tmp_path / "cut", n=1, epochs=2, force=True)) == 1


def test_zca_state_saved_and_checks_name_every_mismatch(digits, tmp_path):
    es = _train(digits, tmp_path / "z", n=1, epochs=1, zca=True)
    assert (tmp_path / "z" / "zca.safetensors").exists() and es.zca is not None
    x = normalize(digits.train.images[:5], digits.info)
    again = load_experts(tmp_path / "z")
    assert torch.allclose(again.zca.transform(x), es.zca.transform(x))
    es.check(digits.info, zca=True, min_epochs=1)
    with pytest.raises(ExpertMismatchError) as err:
        es.check(digits.info, zca=False, min_epochs=5, model="mlp")
    msg = str(err.value)
    assert "ZCA" in msg and "at least 5" in msg and "model" in msg and "decoct experts --dataset digits" in msg
    other = type(digits.info)("other", digits.info.classes, 1, 8, 8, digits.info.mean, digits.info.std)
    with pytest.raises(ExpertMismatchError, match="dataset: experts 'digits', run 'other'"):
        es.check(other)


def test_bad_inputs_fail_up_front(digits, tmp_path):
    with pytest.raises(ValueError, match="num_experts"):
        _train(digits, tmp_path / "a", n=0)
    with pytest.raises(ValueError, match="unknown DSA family"):
        _train(digits, tmp_path / "b", augment="colour")
    with pytest.raises(FileNotFoundError, match="decoct experts"):
        load_experts(tmp_path / "nothing")


# ---------------------------------------------------------------------- issue 10: verified on every load
@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("ex") / "e"
    _train(digits, out, n=2, epochs=1)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _payload_rehashed(root, payload):
    """Replace expert 0's file with ``payload`` and record its hash, as a forger would."""
    from decoct.runtime.io import sha256_file

    (root / "expert_0000.safetensors").write_bytes(payload)
    _edit(root, lambda m: m["experts"][0].__setitem__("sha256", sha256_file(root / "expert_0000.safetensors")))


def test_expert_files_are_verified_on_every_load(expert_dir, tmp_path):
    import pickle

    from decoct.formats.expert_set import ExpertFileError

    assert len(load_experts(expert_dir)) == 2
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((expert_dir / "expert_0001.safetensors").read_bytes())

    # a byte changed inside the data (same size): the checksum check that was never called
    e = _copy(expert_dir, tmp_path / "hash")
    data = bytearray((e / "expert_0000.safetensors").read_bytes())
    data[-3] ^= 0x55
    (e / "expert_0000.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExpertFileError, match="expert_0000.safetensors does not match its sha256"):
        load_experts(e)

    # paths outside the directory: parent, absolute; and a symbolic link
    for name, bad in (("dotdot", "../x.safetensors"), ("abs", str(outside))):
        e = _copy(expert_dir, tmp_path / name)
        _edit(e, lambda m, bad=bad: m["experts"][1].__setitem__("file", bad))
        with pytest.raises(ExpertFileError, match="unsafe file path"):
            load_experts(e)
    e = _copy(expert_dir, tmp_path / "link")
    (e / "expert_0001.safetensors").unlink()
    (e / "expert_0001.safetensors").symlink_to(outside)
    with pytest.raises(ExpertFileError, match="symbolic link"):
        load_experts(e)

    # not safetensors (hash made consistent): random bytes, a pickle, a truncated file
    good = (expert_dir / "expert_0000.safetensors").read_bytes()
    for name, payload in (("rand", os.urandom(500)), ("pickle", pickle.dumps({"trajectory": [0.0] * 10})),
                          ("trunc", good[: len(good) // 2])):
        e = _copy(expert_dir, tmp_path / name)
        _payload_rehashed(e, payload)
        with pytest.raises(ExpertFileError, match="expert_0000.safetensors: not a valid safetensors file"):
            load_experts(e)

    # a valid safetensors file whose shape is not what the manifest says: refused before reading
    e = _copy(expert_dir, tmp_path / "shape")
    _edit(e, lambda m: m["settings"].__setitem__("epochs", 7))
    with pytest.raises(ExpertFileError, match=r"needs trajectory F32 \(8, "):
        load_experts(e)

    # no hash recorded, and manifests that are not objects
    e = _copy(expert_dir, tmp_path / "nohash")
    _edit(e, lambda m: m["experts"][0].pop("sha256"))
    with pytest.raises(ExpertFileError, match="a sha256 is required"):
        load_experts(e)
    for text in ("[]", "3", '"x"'):
        e = tmp_path / f"m{len(text)}"
        if not e.exists():
            _copy(expert_dir, e)
        (e / "manifest.json").write_text(text)
        with pytest.raises(ExpertFileError, match="manifest.json: holds a JSON"):
            load_experts(e)


def test_expert_zca_file_is_confined_and_hashed(digits, tmp_path):
    from decoct.formats.expert_set import ExpertFileError

    z = tmp_path / "z"
    _train(digits, z, n=1, epochs=1, zca=True)
    m = json.loads((z / "manifest.json").read_text())
    assert len(m["zca_sha256"]) == 64
    e = _copy(z, tmp_path / "zhash")
    zf = e / "zca.safetensors"
    data = bytearray(zf.read_bytes())
    data[-5] ^= 0x11
    zf.write_bytes(bytes(data))
    with pytest.raises(ExpertFileError, match="zca.safetensors does not match its sha256"):
        load_experts(e)
    e = _copy(z, tmp_path / "zpath")
    _edit(e, lambda m: m.__setitem__("zca_file", "../z/zca.safetensors"))
    with pytest.raises(ExpertFileError, match="unsafe file path"):
        load_experts(e)
    e = _copy(z, tmp_path / "zjunk")
    (e / "zca.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(ExpertFileError, match="zca.safetensors: not a valid safetensors file"):
        load_experts(e)


def test_expert_cli_errors_are_one_line(expert_dir, tmp_path, capsys):
    from decoct.cli import main

    e = _copy(expert_dir, tmp_path / "e")
    _edit(e, lambda m: m["experts"][0].__setitem__("file", "../../etc/passwd"))
    capsys.readouterr()
    rc = main(["distill", "tm", "--dataset", "digits", "--ipc", "1", "--experts", str(e), "--out",
               str(tmp_path / "run"), "--iterations", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "unsafe file path '../../etc/passwd'" in err and "Traceback" not in err
