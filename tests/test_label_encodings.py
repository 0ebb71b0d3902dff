"""Label bytes as a knob (issue 14 point 3): top-k and per-row quantised label stores.

Each test fails on the code before encodings existed: the codec, the size formula and the store's
reading of encoded epochs are new, and the soft protocol must read an encoded store transparently.
"""

import json
import math

import pytest
import torch

from decoct.decoupled.relabel import (
    encode_labels,
    label_encoding,
    prune_labels,
    relabel,
    relabel_set,
)
from decoct.formats.artifact import DistilledSet
from decoct.formats.errors import ArtifactError
from decoct.formats.label_codec import (
    DROPPED_LOGIT,
    LabelEncoding,
    dequantize_rows,
    pack4,
    quantize_rows,
    unpack4,
)
from decoct.formats.label_pruning import label_store_bytes, payload_model, prune_store
from decoct.formats.label_store import LabelStore, LabelStoreError, encode_store
from decoct.formats.tensor_files import safetensors_size
from decoct.runtime.io import tensors_to_bytes
from decoct.train.soft_students import kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- the codec, by hand
def test_quantisation_hand_computed_8_and_4_bits():
    # 4 bits: range 3.75 = 15 x 0.25, so qzero = -2, qscale = 0.25 and the codes are exact
    x = torch.tensor([[-2.0, -1.0, 0.5, 1.75]])
    codes, scale, zero = quantize_rows(x, 4)
    assert codes.tolist() == [[0, 4, 10, 15]] and scale.item() == 0.25 and zero.item() == -2.0
    assert scale.dtype == zero.dtype == torch.float16
    assert pack4(codes).tolist() == [[0 | 4 << 4, 10 | 15 << 4]] == [[64, 250]]
    assert torch.equal(unpack4(pack4(codes), 4), codes)
    assert pack4(torch.tensor([[1, 2, 3]])).tolist() == [[33, 3]]  # an odd row ends with a zero nibble
    assert unpack4(torch.tensor([[33, 3]], dtype=torch.uint8), 3).tolist() == [[1, 2, 3]]
    assert torch.equal(dequantize_rows(codes, scale, zero), x)
    # 8 bits: range 255 x 2^-6
    y = torch.tensor([[0.0, 255 / 64, 1.0, 2.0]])
    codes, scale, zero = quantize_rows(y, 8)
    assert codes.tolist() == [[0, 255, 64, 128]] and scale.item() == 2 ** -6 and zero.item() == 0.0
    # off the grid: 0.3 is 0.3 / (1/64) = 19.2 steps -> code 19, decoded 19/64, within half a step
    codes, scale, _ = quantize_rows(torch.tensor([[0.0, 0.3, 255 / 64]]), 8)
    assert codes.tolist() == [[0, 19, 255]] and abs(19 / 64 - 0.3) <= scale.item() / 2
    # a constant row decodes exactly
    c, s, z = quantize_rows(torch.full((1, 5), 1.5), 4)
    assert torch.equal(dequantize_rows(c, s, z), torch.full((1, 5), 1.5))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_is_within_half_a_step_of_the_fp16_values(bits):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 13, generator=g) * torch.rand(200, 1, generator=g) * 40 - 5).half().float()
    x[0] = 7.0  # constant row
    codes, scale, zero = quantize_rows(x, bits)
    levels = (1 << bits) - 1
    assert int(codes.max()) <= levels
    assert bool((zero.float() <= x.min(1).values).all())  # the grid starts at or below the minimum...
    top = zero.float() + levels * scale.float()
    assert bool((top >= x.max(1).values - 1e-5 * x.abs().max(1).values).all())  # ...and covers the maximum
    err = (dequantize_rows(codes, scale, zero) - x).abs()
    assert bool((err <= scale.float()[:, None] / 2 + 1e-6 * (1 + x.abs())).all())


def _brute_topk(z, k):
    """Indices of the k largest entries of a 1-D list (distinct values), largest first."""
    return sorted(range(len(z)), key=lambda i: -z[i])[:k]


def test_topk_zero_and_spread_equal_brute_force_decoding():
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.5], [-0.25, 1.5, 4.0, 0.0, 1.0]])  # fp16-exact, distinct
    C, k = 5, 2
    # zero fill (LPQLD MR-k): softmax over the k kept logits at the training temperature, 0 elsewhere
    zero = LabelEncoding(topk=k, fill="zero")
    t = zero.encode(z)
    assert t["topk_ids"].dtype == torch.int16 and t["topk_values"].dtype == torch.float16
    for r in range(2):
        assert t["topk_ids"][r].tolist() == _brute_topk(z[r].tolist(), k)
    dec = zero.decode(t, C)
    for T in (1.0, 4.0, 30.0):
        for r in range(2):
            keep = _brute_topk(z[r].tolist(), k)
            den = sum(math.exp(z[r, j].item() / T) for j in keep)
            want = [math.exp(z[r, i].item() / T) / den if i in keep else 0.0 for i in range(C)]
            got = torch.softmax(dec[r] / T, dim=0).tolist()
            assert got == pytest.approx(want, abs=1e-6)
            assert all(got[i] == 0.0 for i in range(C) if i not in keep)  # exactly zero, not tiny
        # the unchanged soft loss computes KL against that target (no NaN from the dropped classes)
        s = torch.tensor([[0.3, -0.2, 0.1, 0.9, 0.0], [1.0, 0.5, -0.5, 0.2, 0.1]])
        brute = 0.0
        for r in range(2):
            keep = _brute_topk(z[r].tolist(), k)
            den = sum(math.exp(z[r, j].item() / T) for j in keep)
            logq = torch.log_softmax(s[r] / T, dim=0)
            for i in keep:
                p = math.exp(z[r, i].item() / T) / den
                brute += p * (math.log(p) - logq[i].item())
        assert kd_loss(s, dec, T, False).item() == pytest.approx(brute / 2, rel=1e-5, abs=1e-7)
    assert bool(dec[0, 1] == DROPPED_LOGIT)
    # spread fill (FKD marginal smoothing) at T_s: top-k probabilities kept, the rest spread evenly
    Ts = 4.0
    spread = LabelEncoding(topk=k, fill="spread", temperature=Ts)
    t = spread.encode(z)
    dec = spread.decode(t, C)
    for r in range(2):
        full = [math.exp(v / Ts) for v in z[r].tolist()]
        full = [v / sum(full) for v in full]
        keep = _brute_topk(z[r].tolist(), k)
        kept = t["topk_values"][r].float().tolist()  # stored as fp16 probabilities
        assert kept == pytest.approx([full[i] for i in keep], rel=1e-3)
        rest = (1 - sum(kept)) / (C - k)
        want = [kept[keep.index(i)] if i in keep else rest for i in range(C)]
        assert sum(want) == pytest.approx(1.0)
        assert torch.softmax(dec[r] / Ts, dim=0).tolist() == pytest.approx(want, abs=1e-6)
        # at another training temperature T the vector is re-tempered: p^(Ts/T), renormalised
        T = 8.0
        tempered = [w ** (Ts / T) for w in want]
        tempered = [w / sum(tempered) for w in tempered]
        assert torch.softmax(dec[r] / T, dim=0).tolist() == pytest.approx(tempered, abs=1e-6)


def test_topk_with_bits_keeps_the_ids_and_quantises_the_kept_values():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 10, generator=g) * 6).half()
    for bits in (8, 4):
        enc = LabelEncoding(topk=3, fill="zero", bits=bits)
        t = enc.encode(z)
        assert set(t) == {"topk_ids", "codes", "qscale", "qzero"}
        assert t["codes"].shape == (64, 3 if bits == 8 else 2)
        ids = t["topk_ids"].long()
        assert torch.equal(ids, torch.topk(z.float(), 3, dim=1).indices)
        dec = enc.decode(t, 10)
        kept = dec.gather(1, ids)
        assert bool(((kept - z.float().gather(1, ids)).abs() <= t["qscale"].float()[:, None] / 2 + 1e-5).all())
        mask = torch.ones(64, 10, dtype=torch.bool).scatter_(1, ids, False)
        assert bool((dec[mask] == DROPPED_LOGIT).all())


def test_row_bytes_and_names_follow_the_table():
    C = 1000
    cases = {(None, 16): (2 * C, "fp16"), (None, 8): (C + 4, "q8"), (None, 4): (C // 2 + 4, "q4"),
             (5, 16): (20, "top5-zero-fp16"), (5, 8): (19, "top5-zero-q8"), (5, 4): (10 + 3 + 4, "top5-zero-q4")}
    for (k, bits), (want, name) in cases.items():
        enc = LabelEncoding(topk=k, bits=bits)
        assert enc.row_bytes(C) == want and enc.name == name
        specs = enc.specs(7, C)
        assert sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for d, s in specs.values()) == 7 * want
        assert sum(v.numel() * v.element_size() for v in enc.encode(torch.randn(7, C)).values()) == 7 * want
    assert LabelEncoding(topk=2, fill="spread", bits=4, temperature=30).name == "top2-spread-q4"
    assert LabelEncoding(bits=4).row_bytes(11) == 6 + 4  # ceil(11/2) packed bytes + scale + zero point


def test_bad_encodings_are_one_clear_error():
    with pytest.raises(ValueError, match="--label-bits must be 8 or 4"):
        LabelEncoding(bits=3)
    with pytest.raises(ValueError, match="--label-fill .* needs --label-topk"):
        LabelEncoding(fill="zero")
    with pytest.raises(ValueError, match="--label-fill must be one of zero, spread"):
        LabelEncoding(topk=2, fill="blur")
    with pytest.raises(ValueError, match="--label-topk must be an integer >= 1"):
        LabelEncoding(topk=0)
    with pytest.raises(ValueError, match=r"--label-topk 10 must be below the number of classes \(10\)"):
        LabelEncoding(topk=10).check_classes(10)
    with pytest.raises(ValueError, match="positive temperature"):
        LabelEncoding(topk=2, fill="spread")
    with pytest.raises(ValueError, match="'top5-blur-q3' is not known to this decoct"):
        LabelEncoding.from_dict({"name": "top5-blur-q3", "topk": 5, "fill": "blur", "bits": 3})
    with pytest.raises(ValueError, match="'q2' is not known"):
        LabelEncoding.check_name("q2")


def test_safetensors_size_equals_the_written_bytes():
    cases = [
        {"epoch": (torch.int32, (1,)), "units": (torch.int32, (3,)), "sizes": (torch.int32, (3,)),
         "index": (torch.int32, (20,)), "crop": (torch.int16, (20, 4)), "flip": (torch.bool, (20,)),
         "logits": (torch.float16, (20, 10)), "perm": (torch.int16, (20,)), "lam": (torch.float32, (3,))},
        {"epoch": (torch.int32, (1,)), "topk_ids": (torch.int16, (1280, 5)), "codes": (torch.uint8, (1280, 3)),
         "qscale": (torch.float16, (1280,)), "qzero": (torch.float16, (1280,)), "box": (torch.int16, (10, 4))},
        {"header": (torch.uint8, (1013,))},
    ]
    for specs in cases:
        data = tensors_to_bytes({k: torch.zeros(s, dtype=d) for k, (d, s) in specs.items()})
        assert safetensors_size(specs) == len(data)


# ---------------------------------------------------------------------- stores on digits
@pytest.fixture(scope="module")
def teacher(train_digits_teacher):
    return train_digits_teacher(epochs=4)


@pytest.fixture(scope="module")
def art(digits, teacher, random_digits_set, tmp_path_factory):
    """Digits random real IPC 2 (20 images), a plain 20-epoch store of batches of 8 (8, 8, 4; Mixup)."""
    path = tmp_path_factory.mktemp("enc") / "a"
    random_digits_set(2).save(path)
    relabel(path, teacher, epochs=20, batch_size=8, seed=0, device="cpu")
    return path


ENCODINGS = [dict(bits=8), dict(bits=4), dict(topk=3, fill="zero"), dict(topk=3, fill="spread"),
             dict(topk=2, fill="zero", bits=4), dict(topk=5, fill="spread", bits=8)]


def _label_sizes(path):
    files = sorted((path / "labels").glob("*.safetensors"))
    head = (path / "labels" / "fkd.safetensors").stat().st_size
    return sum(f.stat().st_size for f in files), head


@pytest.mark.parametrize("opts", ENCODINGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_encoded_store_round_trips_with_exact_bytes(art, digits, tmp_path, opts):
    enc = label_encoding(digits.info, opts.get("topk"), opts.get("fill"), opts.get("bits"))
    out = encode_labels(art, enc, out=tmp_path / "e")
    dset = DistilledSet.load(out)
    store = LabelStore.from_set(dset)
    assert store.encoding == enc and store.header["version"] == 2 and store.header["encoding"]["name"] == enc.name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"]["store"] == {"format": "decoct-fkd-labels", "version": 2, "encoding": enc.name}
    # bytes: the artifact counts exactly the files; the formula predicts the epoch files exactly
    st = dset.storage(out)
    total, head = _label_sizes(out)
    assert st["bytes_on_disk"]["labels"] == total
    est = label_store_bytes(20, 10, 20, 8, topk=enc.topk, bits=enc.bits, mix="mixup", image_shape=(1, 8, 8),
                            view=store.view)
    assert est["epoch_files"] == total - head
    assert abs(est["header_file"] - head) <= 200  # the teacher description differs (a module, no path)
    header_tensor = dset.label_files["fkd"]["header"].numel()
    assert store.payload_bytes() == est["payload"] + header_tensor
    assert est["payload"] == payload_model(20, 10, 20, 8, "mixup", topk=enc.topk, bits=enc.bits)["bytes"]
    assert est["label_values"] == 20 * 20 * enc.row_bytes(10)
    # values: each replayed batch against the plain store's fp16 logits
    plain = LabelStore.from_set(DistilledSet.load(art))
    rows = LabelStore.from_set(DistilledSet.load(out))  # never holds an epoch: read_batch reads rows
    for e, p in plain.units():
        idx, rec, logits = plain.batch_at(e, p)
        idx2, rec2, got = store.batch_at(e, p)
        assert torch.equal(idx, idx2) and torch.equal(rec.crop, rec2.crop) and torch.equal(rec.perm, rec2.perm)
        assert torch.equal(got, rows.read_batch(e, p)[2])  # a row read equals the epoch read
        z = logits.float()
        assert got.dtype == torch.float32 and got.shape == z.shape
        if enc.topk is None:
            step = quantize_rows(z, enc.bits)[1].float()[:, None]
            assert bool(((got - z).abs() <= step / 2 + 1e-5).all())
        elif enc.fill == "zero":
            ids = torch.topk(z, enc.topk, dim=1).indices
            step = quantize_rows(z.gather(1, ids), enc.bits)[1].float()[:, None] / 2 if enc.bits < 16 else 0.0
            assert bool(((got.gather(1, ids) - z.gather(1, ids)).abs() <= step + 1e-5).all())
            assert int((got == DROPPED_LOGIT).sum()) == z.shape[0] * (10 - enc.topk)
        else:  # spread: the decoded target at T_s keeps the top-k probabilities and spreads the rest
            Ts = enc.temperature
            p = torch.softmax(z / Ts, dim=1)
            q = torch.softmax(got / Ts, dim=1)
            ids = torch.topk(z, enc.topk, dim=1).indices
            tol = 0.6 / 255 if enc.bits == 8 else 1e-3
            assert bool(((q.gather(1, ids) - p.gather(1, ids)).abs() <= tol).all())
            rest = torch.ones(z.shape, dtype=torch.bool).scatter_(1, ids, False)
            tail = q[rest].view(z.shape[0], -1)
            assert bool((tail.max(1).values - tail.min(1).values <= 1e-6).all())  # spread evenly
    # fewer stored bytes than the fp16 store (on disk too, once an epoch file holds enough views to pay for
    # the extra tensor headers: here 20 views per file, so only the payload is compared)
    assert store.payload_bytes() < plain.payload_bytes()


def test_encoding_commutes_with_pruning_and_equals_relabelling_straight(art, digits, teacher, tmp_path):
    enc = label_encoding(digits.info, 3, "zero", 4)
    a = encode_labels(art, enc, prune=10, out=tmp_path / "a")  # prune, then encode
    b = encode_labels(prune_labels(art, 10, out=tmp_path / "p"), enc, out=tmp_path / "b")  # pruned store encoded
    direct = relabel(art, teacher, epochs=20, batch_size=8, seed=0, device="cpu", prune=10, encoding=enc,
                     out=tmp_path / "d")
    files = sorted(f.name for f in (a / "labels").iterdir())
    assert files == ["fkd-e00000.safetensors", "fkd-e00001.safetensors", "fkd.safetensors"]  # 4 of 40 full batches
    for f in files:
        data = (a / "labels" / f).read_bytes()
        assert data == (b / "labels" / f).read_bytes() == (direct / "labels" / f).read_bytes()
    store = LabelStore.from_set(DistilledSet.load(a))
    full = LabelStore.from_set(DistilledSet.load(art))
    assert store.prune_factor == 10 and store.units() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e, p in store.units():  # the kept batches are the full store's first four, images and views alike
        i1, r1, _ = store.batch_at(e, p)
        i2, r2, _ = full.batch_at(e, p)
        assert torch.equal(i1, i2) and torch.equal(r1.crop, r2.crop) and torch.equal(r1.lam, r2.lam)
    # in memory too: encode(prune(store)) == prune(encode(store))
    mem = relabel_set(DistilledSet.load(art), teacher, epochs=20, batch_size=8, seed=0, device="cpu")
    x = encode_store(prune_store(mem, 10), enc).label_files()
    y = prune_store(encode_store(mem, enc), 10).label_files()
    assert x.keys() == y.keys() and all(torch.equal(x[n][k], y[n][k]) for n in x for k in x[n])


@pytest.mark.slow
def test_soft_protocol_trains_from_a_quantised_topk_store(art, digits, teacher, tmp_path):
    from decoct.evaluation.protocols import evaluate

    path = relabel(art, teacher, epochs=30, batch_size=8, seed=0, device="cpu", out=tmp_path / "s30",
                   encoding=label_encoding(digits.info, 3, "zero", 8))
    r = evaluate(path, "soft", runs=1, dataset=digits, device="cpu", model="mlp", lr=1e-2, progress=False)
    assert r.extra["label_format"] == "top3-zero-q8" and r.extra["label_source"] == "store"
    assert r.mean > 0.3  # chance is 0.1
    st = DistilledSet.load(path).storage(path)
    assert r.extra["label_bytes"] == st["bytes_on_disk"]["labels"]


def test_unknown_or_mismatched_formats_are_refused_naming_them(art, tmp_path):
    enc = LabelEncoding(bits=8)
    out = encode_labels(art, enc, out=tmp_path / "q8")
    # encoding an encoded store again is refused (its fp16 logits are gone)
    with pytest.raises(LabelStoreError, match="already encoded as q8"):
        encode_labels(out, LabelEncoding(topk=2), out=tmp_path / "again")
    files = dict(DistilledSet.load(out).label_files)
    head = json.loads(bytes(files["fkd"]["header"].numpy().tobytes()))

    def forged(h):
        return dict(files, fkd={"header": torch.tensor(list(json.dumps(h).encode()), dtype=torch.uint8)})

    with pytest.raises(LabelStoreError, match="label store format 'q3' is not known to this decoct"):
        LabelStore.from_label_files(forged(dict(head, encoding=dict(head["encoding"], name="q3", bits=3))))
    with pytest.raises(LabelStoreError, match="label store format 'q8-zstd' is not known"):
        LabelStore.from_label_files(forged(dict(head, encoding=dict(head["encoding"], name="q8-zstd"))))
    # an encoded store whose header claims version 1 (plain) is refused, not misread as fp16 logits
    with pytest.raises(LabelStoreError, match="version 1 header names an encoding"):
        LabelStore.from_label_files(forged(dict(head, version=1)))
    # a manifest naming a format this version does not know: the artifact is refused at load, one line
    m = json.loads((out / "manifest.json").read_text())
    m["labels"]["store"]["encoding"] = "top5-zero-q3"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="'top5-zero-q3' is not known to this decoct") as e:
        DistilledSet.load(out)
    assert "\n" not in str(e.value)


def test_cli_label_options_and_bad_combinations(art, digits, tmp_path, capsys):
    from decoct.cli import main

    def err(args):
        capsys.readouterr()
        assert main(args + ["--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    src = str(art)
    assert "--label-topk 10 must be below the number of classes (10)" in err(
        ["relabel", src, "--label-topk", "10", "--out", str(tmp_path / "x1")])
    # outside 4..8 the config range refuses it up front; inside, the codec refuses what is not 8 or 4
    assert "--label-bits must be an integer in 4..8 (8 or 4), got 3" in err(
        ["relabel", src, "--label-bits", "3", "--out", str(tmp_path / "x2")])
    assert "--label-bits must be an integer in 4..8 (8 or 4), got 16" in err(
        ["relabel", src, "--label-bits", "16", "--out", str(tmp_path / "x3")])
    assert "--label-bits must be 8 or 4" in err(["relabel", src, "--label-bits", "5", "--out", str(tmp_path / "x5")])
    assert "--label-fill must be one of zero, spread" in err(
        ["relabel", src, "--label-topk", "2", "--label-fill", "blur", "--out", str(tmp_path / "x4")])
    assert "needs --label-topk" in err(["relabel", src, "--label-fill", "spread", "--out", str(tmp_path / "x5")])
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 6))  # refused before any run directory stays
    hard = tmp_path / "hard"
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(hard), "--no-progress"]) == 0
    assert "hard labels only" in err(["relabel", str(hard), "--label-topk", "2", "--out", str(tmp_path / "x6")])
    capsys.readouterr()
    assert main(["relabel", src, "--label-topk", "2", "--label-fill", "spread", "--label-bits", "4", "--prune", "10",
                 "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pruned 10x, labels top2-spread-q4: 4 stored batches" in out
    store = LabelStore.from_set(DistilledSet.load(tmp_path / "ok" / "artifact"))
    assert store.encoding.temperature == 30.0  # digits uses the cifar recipe: T = 30
