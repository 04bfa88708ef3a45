"""Server optimizers over the aggregated update, used as a pseudo-gradient (Reddi et al. 2021).

Same shape as optax: `init(params) -> state`, `step(params, update, state) -> (params, state)`, with the
state a dict of tensors so it checkpoints as-is. The aggregated update Δ is a descent direction, so the
pseudo-gradient is g = -Δ; SGD with lr 1 and no momentum gives x + Δ, which is exactly FedAvg.
Momentum is FedAvgM; the adaptive ones are FedAdagrad / FedAdam / FedYogi. They step trainable parameters
only (`masked_step`): buffers such as BatchNorm running statistics are not gradients' targets and take their
aggregated value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ServerConfig

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


@dataclass(frozen=True)
class ServerAdaptive:
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2), on the aggregated update Δ:

        m = β1 m + (1 - β1) Δ
        v = v + Δ²                              (adagrad)
        v = β2 v + (1 - β2) Δ²                  (adam)
        v = v - (1 - β2) Δ² sign(v - Δ²)        (yogi)
        x = x + lr m / (√v + τ)

    No bias correction, as in the paper; v starts at τ² (the paper asks v_-1 >= τ²), m at zero.
    """

    kind: str  # "adagrad" | "adam" | "yogi"
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def init(self, params: torch.Tensor) -> State:
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.tau**2)}

    def step(self, params: torch.Tensor, update: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        d2 = update * update
        m = self.beta1 * state["m"] + (1 - self.beta1) * update
        v = state["v"]
        if self.kind == "adagrad":
            v = v + d2
        elif self.kind == "adam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:
            v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        return params + self.lr * m / (v.sqrt() + self.tau), {"m": m, "v": v}


ServerOptimizer = ServerSGD | ServerAdaptive


def masked_step(opt: ServerOptimizer, params: torch.Tensor, update: torch.Tensor, state: State,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, State]:
    """`opt.step` where `mask` is True (None: everywhere); elsewhere params + update, the optimizer state there
    left as it was. The state stays full size, so checkpoints keep one layout whatever the model's buffers."""
    new, new_state = opt.step(params, update, state)
    if mask is None:
        return new, new_state
    return (torch.where(mask, new, params + update),
            {k: torch.where(mask, v, state[k]) for k, v in new_state.items()})


def build_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    if cfg.optimizer == "sgd":
        return ServerSGD(lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer in ("adagrad", "adam", "yogi"):
        return ServerAdaptive(cfg.optimizer, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    raise ValueError(f"unknown server optimizer '{cfg.optimizer}'")
