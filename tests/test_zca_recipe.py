"""ZCA as MTT, DATM and AutoPalette fit it: kornia's ZCAWhitening(eps=0.1) on [0, 1] pixels (not on
mean/std-normalised images), pinned to kornia itself on real CIFAR-10 images; the stored forms; the
call sites (DM, experts) fitting that way."""

import kornia
import pytest
import torch

from decoct.augment import ZCA
from decoct.data import normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def _kornia(pixels: torch.Tensor) -> kornia.enhance.ZCAWhitening:
    """The references' call (MTT utils.py, AutoPalette utils_baseline.py)."""
    return kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(pixels)


def test_zca_is_kornias_on_real_cifar10_pixels(cifar10) -> None:
    """2,000 CIFAR-10 training images (centre 12 x 12, so the fits take a second): decoct's ZCA of the
    normalised images equals kornia's of the [0, 1] pixels; a fit on the normalised images does not."""
    info = cifar10.info
    u8 = cifar10.train.images[:2000, :, 10:22, 10:22]
    pixels = u8.float() / 255
    ref = _kornia(pixels)
    x = normalize(u8, info)
    z = ZCA().fit(x, input_mean=info.mean, input_std=info.std)
    y_ref = ref(pixels)
    torch.testing.assert_close(z.transform(x), y_ref, atol=1e-4, rtol=0)  # measured 4e-6
    torch.testing.assert_close(z.pixel_mean, ref.mean_vector.reshape(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.inverse(y_ref), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(z.inverse(y_ref), normalize(ref.inverse_transform(y_ref) * 255, info), atol=1e-4,
                               rtol=0)
    # eps acts on the pixel-scale spectrum: few directions whitened, and the old fit is far off
    lam = z.evals - 0.1
    whitened, old = int((lam > 0.1).sum()), ZCA().fit(x)
    assert 0 < whitened < int((old.evals - 0.1 > 0.1).sum()) / 2
    assert (old.transform(x) - y_ref).abs().max() > 0.5
    assert old.transform(x).std() > 1.5 * y_ref.std()


def test_pixel_fit_state_roundtrips_and_older_forms_still_load() -> None:
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (300, 3, 4, 4), generator=g, dtype=torch.uint8)
    u8[:, 1] = (u8[:, 0].int() * 3 // 4 + u8[:, 1].int() // 4).to(torch.uint8)  # correlated channels
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (u8.float() / 255 - mean_t) / std_t
    z = ZCA().fit(x, input_mean=mean, input_std=std)
    torch.testing.assert_close(z.transform(x), _kornia(u8.float() / 255)(u8.float() / 255), atol=1e-4, rtol=0)
    sd = z.state_dict()
    # no "mean": an older decoct refuses the file instead of whitening without the normalisation
    assert set(sd) == {"pixel_mean", "evecs", "evals", "shape", "input_mean", "input_std"}
    back = ZCA.from_state_dict(sd)
    assert back.fitted_on == "pixels" and torch.equal(back.transform(x), z.transform(x))
    assert torch.equal(back.inverse(x), z.inverse(x))
    # exported mean / W (decoct export) apply to normalised images: the folded normalisation
    torch.testing.assert_close((x.reshape(300, -1) - z.mean) @ z.W, z.transform(x).reshape(300, -1))
    # sets written before: the attachment holds the transform they were distilled with, unchanged
    old = ZCA().fit(x)
    old_sd = old.state_dict()
    assert set(old_sd) == {"mean", "evecs", "evals", "shape"}
    loaded = ZCA.from_state_dict(old_sd)
    assert loaded.fitted_on == "inputs" and torch.equal(loaded.transform(x), old.transform(x))
    legacy = ZCA.from_state_dict({"mean": old.mean, "W": old.W, "W_inv": old._inverse_matrix(),
                                  "shape": torch.tensor([3, 4, 4])})
    assert torch.equal(legacy.transform(x), old.transform(x))


def test_input_normalisation_is_checked() -> None:
    x = torch.randn(20, 3, 2, 2)
    with pytest.raises(ValueError, match="both input_mean and input_std"):
        ZCA().fit(x, input_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="per channel"):
        ZCA().fit(x, input_mean=(0.5,), input_std=(0.2,))
    with pytest.raises(ValueError, match="> 0"):
        ZCA().fit(x, input_mean=(0.5, 0.5, 0.5), input_std=(0.2, 0.0, 0.2))
    sd = ZCA().fit(x, input_mean=(0.5, 0.5, 0.5), input_std=(0.2, 0.2, 0.2)).state_dict()
    with pytest.raises(KeyError, match="input_std"):
        ZCA.from_state_dict({k: v for k, v in sd.items() if k != "input_std"})
    with pytest.raises(ValueError, match="per channel"):
        ZCA.from_state_dict({**sd, "input_std": torch.ones(2)})


def test_dm_fits_zca_on_pixels_and_its_attachment_reloads() -> None:
    from decoct.data import Dataset, DatasetInfo, ImageSplit
    from decoct.matching.dm import DistributionMatching, DMConfig

    g = torch.Generator().manual_seed(0)
    info = DatasetInfo("tiny", ("a", "b"), 3, 4, 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    labels = torch.arange(60) % 2
    images = torch.randint(0, 256, (60, 3, 4, 4), generator=g, dtype=torch.uint8)
    images[:, 2] = (images[:, 0] // 2 + 100 * labels.view(-1, 1, 1)).to(torch.uint8)
    data = Dataset(info, ImageSplit(images, labels), ImageSplit(images[:6], labels[:6]))
    m = DistributionMatching(DMConfig(ipc=1, iterations=1, batch_real=8, width=8, zca=True, seed=0))
    m.init(data, torch.device("cpu"))
    pixels = data.train.images.float() / 255
    x = normalize(data.train.images, data.info)
    torch.testing.assert_close(m.zca.transform(x), _kornia(pixels)(pixels), atol=1e-4, rtol=0)
    back = ZCA.from_state_dict(m.result().attachments["zca"])
    assert back.fitted_on == "pixels" and torch.equal(back.transform(x), m.zca.transform(x))


def test_experts_fit_zca_on_pixels_and_older_expert_zca_loads(digits, tmp_path) -> None:
    import json

    from decoct.formats.expert_set import load_experts
    from decoct.matching.experts import train_experts
    from decoct.runtime.io import atomic_save_tensors, sha256_file

    es = train_experts(digits, tmp_path / "e", num_experts=1, epochs=1, device="cpu", progress=False,
                       model_kwargs=dict(width=4, norm="instance"), zca=True)
    u8 = digits.train.images
    x = normalize(u8, digits.info)
    torch.testing.assert_close(es.zca.transform(x), _kornia(u8.float() / 255)(u8.float() / 255), atol=1e-4, rtol=0)
    assert load_experts(tmp_path / "e").zca.fitted_on == "pixels"
    # an expert set written before (ZCA fitted on normalised images) loads with its own transform
    old = ZCA().fit(x)
    zf = tmp_path / "e" / "zca.safetensors"
    atomic_save_tensors(zf, old.state_dict())
    mf = tmp_path / "e" / "manifest.json"
    m = json.loads(mf.read_text())
    m["zca_sha256"] = sha256_file(zf)
    mf.write_text(json.dumps(m))
    again = load_experts(tmp_path / "e")
    assert again.zca.fitted_on == "inputs" and torch.equal(again.zca.transform(x), old.transform(x))
