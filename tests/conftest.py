"""Shared fixtures: small synthetic data that a model can learn in seconds, and a tiny trained run folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist.fit.data import FashionMNIST


def make_synthetic(n_train: int = 1200, n_test: int = 300, seed: int = 0) -> FashionMNIST:
    """Ten learnable classes: class k is a bright rectangle of a class-specific size, jittered, with noise."""
    rng = np.random.default_rng(seed)

    def images(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        x = rng.integers(0, 20, size=(n, 28, 28)).astype(np.int32)
        for i, k in enumerate(labels):
            h, w = 6 + 2 * (k % 5), 8 + 8 * (k // 5)
            top = 14 - h // 2 + rng.integers(-2, 3)
            left = 14 - w // 2 + rng.integers(-2, 3)
            x[i, top:top + h, left:left + w] += rng.integers(150, 236)
        return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))

    tr_x, tr_y = images(n_train)
    te_x, te_y = images(n_test)
    return FashionMNIST(tr_x, tr_y, te_x, te_y, source="synthetic", checksums={})


@pytest.fixture(autouse=True, scope="session")
def procedural_cache(tmp_path_factory):
    """The procedural non-garments kept on disk go to a folder of the test session, not the user's cache."""
    from fmnist.fit.trust import outliers

    before = outliers.CACHE
    outliers.CACHE = tmp_path_factory.mktemp("procedural-cache")
    yield outliers.CACHE
    outliers.CACHE = before


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests run on one thread (a shared 2-core machine: contending threads make small ops far slower).

    Session scope, so module fixtures that train or fit something run on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_data() -> FashionMNIST:
    return make_synthetic()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_data):
    """The fast preset's model (s2d-24) trained for 4 epochs on the synthetic data (seconds on one thread)."""
    from fmnist.fit.train import resolve_config, train

    out = tmp_path_factory.mktemp("runs") / "fast"
    cfg = resolve_config("fast", model="s2d-24", time_budget=0, epochs=4, lr=0.05, batch_size=64, val_size=200,
                         threads=1, seed=0)
    train(cfg, out=out, data=synthetic_data, quiet=True)
    return out


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory, synthetic_data):
    """The synthetic data written as the four IDX files, for commands that load data themselves (--no-verify)."""
    from fmnist.fit.data import write_idx

    d = tmp_path_factory.mktemp("idx")
    write_idx(d / "train-images-idx3-ubyte", synthetic_data.train_images)
    write_idx(d / "train-labels-idx1-ubyte", synthetic_data.train_labels)
    write_idx(d / "t10k-images-idx3-ubyte", synthetic_data.test_images)
    write_idx(d / "t10k-labels-idx1-ubyte", synthetic_data.test_labels)
    return d
