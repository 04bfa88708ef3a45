"""Remedies for client drift: each changes the local objective so local models stay near a common optimum.

- FedProx (Li et al. 2020): local loss + μ/2 ||w - w_global||².
- SCAFFOLD (Karimireddy et al. 2020, option II): local steps corrected by c - c_i, the server's and the
  client's control variates; c_i lives on the client across rounds, however rarely it is sampled.
- FedDyn (Acar et al. 2021): local loss - <g_k, w> + α/2 ||w - w_global||², with g_k the client's running
  linear term, and a server correction h so the fixed points of clients and server agree.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ServerConfig
from ..errors import ConfigError
from ..server.aggregators import example_weights
from .base import Algorithm, ClientContext, ClientOutput, State, param_mask


class FedProx(Algorithm):
    name = "fedprox"

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        mu = self.cfg.mu
        anchor = ctx.as_params(ctx.start.clone())

        def prox(params: list[torch.Tensor]) -> None:  # gradient of μ/2 ||w - w0||²
            for p, w0 in zip(params, anchor, strict=True):
                p.grad.add_(p - w0, alpha=mu)

        result = ctx.train_local(grad_hook=prox if mu > 0 else None)
        return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics)

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "mu": self.cfg.mu}


class Scaffold(Algorithm):
    """Updates carry [Δy, Δc]; the broadcast carries [x, c]. Both cost twice FedAvg's bytes, as in the paper."""

    name = "scaffold"
    extras = 1
    stateful = True

    def init_state(self, params: torch.Tensor) -> State:
        return {"c": torch.zeros_like(params)}

    def broadcast_extras(self, state: State) -> list[torch.Tensor]:
        return [state["c"]]

    def aggregate(self, updates: torch.Tensor, num_examples: list[int], metrics: list[dict[str, Any]],
                  state: State, lr: float) -> tuple[torch.Tensor, State]:
        d = updates.shape[1] // 2
        dy, dc = updates[:, :d], updates[:, d:]
        # x moves by the example-weighted mean (so zero control variates give FedAvg exactly);
        # c by |S|/N times the mean of the Δc_i, i.e. their sum over N.
        per_client = torch.full((len(num_examples),), 1.0 / self.num_clients)
        return (self.aggregator.combine(dy, example_weights(num_examples)),
                {"c": state["c"] + self.aggregator.combine(dc, per_client)})

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        c = ctx.extras[0]
        c_i = ctx.state.get("c", torch.zeros_like(c))
        correction = ctx.as_params(c - c_i)
        lr = ctx.lr

        # y <- y - lr (g + c - c_i), with the correction applied after the optimizer step rather than added to
        # the gradient: identical for plain SGD, and with momentum it is not amplified a second time by the
        # momentum buffer (c already estimates the momentum-scaled drift), as in NIID-Bench's implementation
        def correct(params: list[torch.Tensor]) -> None:
            for p, k in zip(params, correction, strict=True):
                p.sub_(k, alpha=lr)

        result = ctx.train_local(post_step=correct)
        y = ctx.vector()
        if result.steps == 0:  # no data, no local step: nothing was learnt about this client's drift, c_i stays
            return ClientOutput(torch.cat([ctx.delta(y), torch.zeros_like(c)]), result.num_examples, ctx.metrics,
                                dict(ctx.state))
        # option II: c_i+ = c_i - c + (x - y) / (K lr), on trainable entries only
        mask = param_mask(ctx.model, ctx.spec)
        c_new = torch.where(mask, c_i - c + (ctx.start - y) / (result.steps * ctx.lr), c_i)
        return ClientOutput(torch.cat([ctx.delta(y), c_new - c_i]), result.num_examples, ctx.metrics, {"c": c_new})


class FedDyn(Algorithm):
    """The server sets the model itself (mean of the participants' models - h/α), so the server optimizer must be
    the identity step x + Δ: any other server setting is refused rather than silently mixed into it."""

    name = "feddyn"
    stateful = True

    def __init__(self, cfg: ServerConfig, num_clients: int):
        super().__init__(cfg, num_clients)
        wrong = [f"{key} = {value!r}" for key, value, ok in (
            ("server.optimizer", cfg.optimizer, cfg.optimizer == "sgd"), ("server.lr", cfg.lr, cfg.lr == 1.0),
            ("server.momentum", cfg.momentum, cfg.momentum == 0.0)) if not ok]
        if wrong:
            raise ConfigError(f"feddyn sets the server model by its own rule, which holds only with the plain server "
                              f"step (server.optimizer = \"sgd\", server.lr = 1, server.momentum = 0); "
                              f"got {', '.join(wrong)}", "remove those server settings for feddyn")

    def init_state(self, params: torch.Tensor) -> State:
        return {"h": torch.zeros_like(params)}

    def aggregate(self, updates: torch.Tensor, num_examples: list[int], metrics: list[dict[str, Any]],
                  state: State, lr: float) -> tuple[torch.Tensor, State]:
        # h <- h - α/m Σ_{k in P} Δ_k ;  new x = mean_P(θ_k) - h/α  (uniform mean over participants, as published)
        alpha = self.cfg.dyn_alpha
        k = updates.shape[0]
        # buffers (BatchNorm statistics) keep h = 0, so they are averaged as in FedAvg: h would pile their changes up
        h = state["h"] - alpha * self.on_trainable(
            self.aggregator.combine(updates, torch.full((k,), 1.0 / self.num_clients)))
        return self.aggregator.combine(updates, torch.full((k,), 1.0 / k)) - h / alpha, {"h": h}

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        alpha = self.cfg.dyn_alpha
        g = ctx.state.get("g", torch.zeros_like(ctx.start))
        anchor, linear = ctx.as_params(ctx.start.clone()), ctx.as_params(g)

        def dyn(params: list[torch.Tensor]) -> None:  # ∇L - g + α (w - w0)
            for p, w0, gk in zip(params, anchor, linear, strict=True):
                p.grad.sub_(gk).add_(p - w0, alpha=alpha)

        result = ctx.train_local(grad_hook=dyn)
        delta = ctx.delta()
        g_new = g - alpha * delta * param_mask(ctx.model, ctx.spec)
        return ClientOutput(delta, result.num_examples, ctx.metrics, {"g": g_new})

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "dyn_alpha": self.cfg.dyn_alpha}
