import os

import numpy as np
import pytest
import torch

from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData

# Two xdist workers share two cores: one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("FEDLOOM_NO_DOWNLOAD_WARN", "1")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("FEDLOOM_RUNS_DIR", str(d))
    return d


def small_config(**over) -> dict:
    """A fast real run: scikit-learn's digits over 4 Dirichlet clients, the 2NN, FedAvg."""
    cfg = {
        "name": "tiny",
        "data": {"dataset": "digits", "num_clients": 4, "partition": "dirichlet", "alpha": 1.0, "min_size": 10},
        "model": {"name": "mlp"},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.5},
        "server": {"fraction": 1.0},
        "eval": {"every": 1},
        "run": {"rounds": 3, "seed": 0, "threads": 1},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        cfg.setdefault(section, {})[field] = value
    return cfg


def toy_data(sizes=(30, 30, 30), f=5, c=3, seed=0, shared_test: bool = False) -> FederatedData:
    """A separable toy task split into consecutive client slices; each client tests on its own 10 samples of
    the test split, or all on the same first 10 (`shared_test`)."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = Dataset("toy", x, y, x[:30].clone(), y[:30].clone(), num_classes=c)
    bounds = np.cumsum((0, *sizes))
    clients = [ClientData(i, np.arange(bounds[i], bounds[i + 1]),
                          np.arange(0, 10) if shared_test else np.arange(i * 10, i * 10 + 10))
               for i in range(len(sizes))]
    return FederatedData(ds, clients, "toy")
