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
