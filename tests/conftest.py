import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits():
    from decoct.data import load_dataset

    return load_dataset("digits")


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
