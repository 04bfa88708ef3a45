import os

import pytest
import torch

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
