"""Server optimizers over the aggregated update, used as a pseudo-gradient (Reddi et al. 2021).

Same shape as optax: `init(params) -> state`, `step(params, update, state) -> (params, state)`, with the
state a dict of tensors so it checkpoints as-is. The aggregated update Δ is a descent direction, so the
pseudo-gradient is g = -Δ; SGD with lr 1 and no momentum gives x + Δ, which is exactly FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerSGD:
    lr: float = 1.0
    momentum: float = 0.0  # > 0 is FedAvgM (Hsu et al. 2019)

    def init(self, params: torch.Tensor) -> State:
        return {"momentum": torch.zeros_like(params)} if self.momentum > 0 else {}

    def step(self, params: torch.Tensor, update: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        g = -update
        if self.momentum > 0:
            m = self.momentum * state["momentum"] + g
            return params - self.lr * m, {"momentum": m}
        return params - self.lr * g, state


def build_server_optimizer(name: str, lr: float, momentum: float) -> ServerSGD:
    if name == "sgd":
        return ServerSGD(lr=lr, momentum=momentum)
    raise ValueError(f"unknown server optimizer '{name}'")
