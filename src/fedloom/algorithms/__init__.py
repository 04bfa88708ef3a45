"""Federated algorithms as bundles: client behaviour + aggregator + server optimizer.

FedAvg (McMahan et al. 2017) is the base bundle: plain local SGD, example-weighted mean of the client
updates, and a server SGD step on the pseudo-gradient (lr 1.0, no momentum reproduces FedAvg exactly;
momentum > 0 is FedAvgM). Later algorithms change one of the three parts and keep the round logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ServerConfig
from ..server.aggregators import example_weights, weighted_mean
from ..server.optimizers import ServerSGD, build_server_optimizer


@dataclass
class FedAvg:
    server_optimizer: ServerSGD
    name: str = "fedavg"

    def aggregate(self, updates: torch.Tensor, num_examples: list[int]) -> torch.Tensor:
        return weighted_mean(updates, example_weights(num_examples))


def build_algorithm(cfg: ServerConfig) -> FedAvg:
    if cfg.algorithm == "fedavg":
        return FedAvg(build_server_optimizer(cfg.optimizer, cfg.lr, cfg.momentum))
    raise ValueError(f"unknown algorithm '{cfg.algorithm}'")
