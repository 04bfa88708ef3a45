"""FedNova (Wang et al. 2020): normalized averaging, so clients that take more local steps do not pull
the global model towards their own optimum.

Client i reports its update Δ_i and a_i, the l1 norm of its local "step weights": τ_i for plain SGD, and
for SGD with momentum ρ, a_i = (τ_i - ρ(1 - ρ^τ_i)/(1 - ρ)) / (1 - ρ) (as in NIID-Bench's FedNova). The
server moves by τ_eff Σ p_i Δ_i / a_i with τ_eff = Σ p_i a_i and p_i = n_i / n. With equal a_i this is
exactly FedAvg's Σ p_i Δ_i. Buffers (BatchNorm statistics) are averaged as in FedAvg.
"""

from __future__ import annotations

from typing import Any

import torch

from ..server.aggregators import example_weights
from .base import Algorithm, ClientContext, ClientOutput, State


def step_weight_norm(steps: int, momentum: float) -> float:
    if steps <= 0:
        return 0.0
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(Algorithm):
    name = "fednova"

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        result = ctx.train_local()
        ctx.metrics["nova_a"] = step_weight_norm(result.steps, ctx.train.momentum)
        return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics)

    def aggregate(self, updates: torch.Tensor, num_examples: list[int], metrics: list[dict[str, Any]],
                  state: State, lr: float) -> tuple[torch.Tensor, State]:
        p = example_weights(num_examples).to(torch.float64)
        a = torch.tensor([m["nova_a"] for m in metrics], dtype=torch.float64)
        tau_eff = float((p * a).sum())
        coef = (tau_eff * p / a).to(updates.dtype)
        # buffers (BatchNorm statistics) are not step sums to normalize: their coefficients need not sum to 1, and
        # would move a running variance past zero; they take FedAvg's mean
        return self.average_buffers(self.aggregator.combine(updates, coef), updates, p), state
