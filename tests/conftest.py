import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a shared CPU (no OpenMP spinning).

    Module-scoped, and requested with ``pytestmark = pytest.mark.usefixtures("one_thread")``, so
    the module's own fixtures (teachers, experts) are built on one thread as well; the previous
    count is restored when the module ends.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits():
    from decoct.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def train_digits_teacher(digits, one_thread):
    """``train(epochs)`` -> the digits MLP teacher (width 32, seed 0, lr 0.05 cosine, batch 64), in eval
    mode, on one thread: the label-store and soft-protocol tests' shared teacher recipe."""
    from decoct.data import normalize
    from decoct.models import model_for
    from decoct.train import TrainConfig, seeded_model, train_model

    def train(epochs: int):
        x = normalize(digits.train.images, digits.info)
        model = seeded_model(lambda: model_for("mlp", digits.info, width=32), 0)
        train_model(model, x, digits.train.labels,
                    TrainConfig(epochs=epochs, lr=0.05, batch_size=64, schedule="cosine"))
        return model.eval()

    return train


@pytest.fixture(scope="session")
def square_info():
    """``make(size)`` -> a 10-class RGB :class:`DatasetInfo` of ``size`` x ``size`` images (mean 0.5, std
    0.25): what the soft recipes choose by (image size)."""
    from decoct.data.types import DatasetInfo

    def make(size: int) -> DatasetInfo:
        return DatasetInfo("x", tuple(str(i) for i in range(10)), 3, size, size, (0.5,) * 3, (0.25,) * 3)

    return make


@pytest.fixture(scope="session")
def random_digits_set(digits):
    """``make(ipc, seed=0, config=None)`` -> a random-real :class:`DistilledSet` of digits: ``ipc`` train
    images per class, drawn per class by ``randperm`` from one generator seeded ``seed`` (classes in
    order), method ``random``; the label-store tests' shared small set."""
    from decoct.formats.artifact import DistilledSet

    def make(ipc: int, seed: int = 0, config: dict | None = None) -> DistilledSet:
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([digits.train.class_indices(c)[torch.randperm(len(digits.train.class_indices(c)),
                                                                       generator=g)[:ipc]] for c in range(10)])
        kw = {} if config is None else {"config": config}
        return DistilledSet(digits.info, digits.train.images[idx], digits.train.labels[idx], method="random", **kw)

    return make


@pytest.fixture(scope="session")
def cifar10():
    from decoct.data import DataNotFoundError, load_dataset

    try:
        return load_dataset("cifar10")
    except DataNotFoundError as e:  # only where ../shared/datasets is absent (never in CI)
        pytest.skip(str(e))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DECOCT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
