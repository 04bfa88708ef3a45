"""q-FFL, solved with q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning").

Clients with a higher loss get more weight: client k reports its loss F_k of the *global* model on its
training data and its usual update; with L = 1/lr (the paper's Lipschitz estimate) and Δw_k = L (w - w_k),

    w_new = w - Σ_k F_k^q Δw_k / Σ_k h_k,   h_k = q F_k^(q-1) ||Δw_k||² + L F_k^q.

q = 0 gives w + mean_k(w_k - w): FedAvg with uniform weights (the paper samples clients in proportion to
their data instead of weighting them). Larger q flattens the accuracy across clients. The norms are over
trainable parameters; buffers (BatchNorm statistics) take the uniform mean of the clients' values.
"""

from __future__ import annotations

from typing import Any

import torch

from ..evaluation import predict
from .base import Algorithm, ClientContext, ClientOutput, State


class QFFL(Algorithm):
    name = "qffl"

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        idx = torch.as_tensor(ctx.client.train_idx, dtype=torch.long)
        ds = ctx.dataset
        start = predict(ctx.model, ds, ds.x_train[idx], ds.y_train[idx])  # F_k of the global model
        ctx.metrics["start_loss"] = float(start.losses.double().mean())
        result = ctx.train_local()
        return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics)

    def aggregate(self, updates: torch.Tensor, num_examples: list[int], metrics: list[dict[str, Any]],
                  state: State, lr: float) -> tuple[torch.Tensor, State]:
        q, lip = self.cfg.q, 1.0 / lr
        u = updates.to(torch.float64)
        f = torch.tensor([max(m["start_loss"], 1e-10) for m in metrics], dtype=torch.float64)
        ut = self.on_trainable(u)  # the norm is the parameters': a BatchNorm step counter's change would dominate it
        dw_sq = (lip**2) * (ut * ut).sum(1)  # ||Δw_k||² with Δw_k = -L u_k
        h = q * f.pow(q - 1) * dw_sq + lip * f.pow(q)
        step = self.aggregator.combine(u, f.pow(q) * lip / h.sum())  # -Σ F^q Δw_k / Σ h, in update terms
        uniform = torch.full((len(metrics),), 1.0 / len(metrics), dtype=torch.float64)
        return self.average_buffers(step, u, uniform).to(updates.dtype), state  # buffers: averaged, as at q = 0

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "q": self.cfg.q}
