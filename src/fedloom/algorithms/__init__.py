"""Federated algorithms as bundles: client behaviour + aggregation + server optimizer.

Each is selected by `server.algorithm` and plugs into the one round implementation in `rounds.py`
through the five methods of `base.Algorithm`. See docs/algorithms.md for papers and parameters.
"""

from __future__ import annotations

from ..config import ServerConfig
from ..errors import ConfigError
from .base import Algorithm, ClientContext, ClientOutput, State
from .drift import FedDyn, FedProx, Scaffold
from .fednova import FedNova
from .personal import Ditto, FedBN, PerFedAvg
from .qffl import QFFL

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Algorithm, FedProx, Scaffold, FedNova, FedDyn, QFFL, Ditto, PerFedAvg, FedBN)
}


def build_algorithm(cfg: ServerConfig, num_clients: int) -> Algorithm:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm '{cfg.algorithm}'", f"algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[cfg.algorithm](cfg, num_clients)


__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "ClientOutput", "State", "build_algorithm"]
