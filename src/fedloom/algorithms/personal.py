"""Personalization: each client ends up with its own model, evaluated on its own test split.

- Ditto (Li et al. 2021): besides the global update, each client keeps a personal model v_k trained on
  F_k(v) + λ/2 ||v - w||². We take the λ term as an exact proximal step after each SGD step,
  v <- (v + lr λ w) / (1 + lr λ), which is stable for any λ (λ -> ∞ gives v = w, the global model).
- Per-FedAvg (Fallah et al. 2020): trains the global model for one step of local adaptation. Each step
  takes three batches: w' = w - α ∇f(w; D1), then w <- w - β (I - α ∇²f(w; D3)) ∇f(w'; D2), the
  Hessian-vector product exact by double backpropagation ("hf"), or dropped ("fo", first order).
  Personalization is one α-step on one local batch.
- FedBN (Li et al. 2021): BatchNorm layers (weights and running statistics) never leave the client;
  everything else is averaged, other normalizations (GroupNorm, LayerNorm) included, as in the paper. Use a
  model with BatchNorm, e.g. `simple-cnn-bn`.

Personalized metrics come only from clients that have a model of their own (`has_personal_model`): a Ditto or
FedBN client that has never trained would be the global model under another name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..client.trainer import batch_indices, step_count
from ..errors import ConfigError
from ..params import ParamSpec
from .base import Algorithm, ClientContext, ClientOutput, State


class Ditto(Algorithm):
    name = "ditto"
    stateful = True

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        w = ctx.start.clone()
        result = ctx.train_local()
        delta, metrics = ctx.delta(), dict(ctx.metrics)
        if result.steps == 0:  # no data: no personal model to make, and the one it may have stays as it was
            return ClientOutput(delta, result.num_examples, metrics, dict(ctx.state))
        # the personal model: same amount of local work, pulled towards this round's global model
        ctx.load(ctx.state.get("personal", w))
        k = ctx.lr * self.cfg.ditto_lambda
        keep = 1.0 / (1.0 + k) if math.isfinite(k) else 0.0
        anchor = ctx.as_params(w)

        def prox(params: list[torch.Tensor]) -> None:
            for p, w0 in zip(params, anchor, strict=True):
                p.mul_(keep).add_(w0, alpha=1.0 - keep)

        personal = ctx.train_local(post_step=prox)
        metrics["personal_loss"] = personal.loss
        return ClientOutput(delta, result.num_examples, metrics, {"personal": ctx.vector()})

    def personalize(self, ctx: ClientContext) -> torch.Tensor | None:
        return ctx.state.get("personal")

    def has_personal_model(self, state: State) -> bool:
        return "personal" in state

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "ditto_lambda": self.cfg.ditto_lambda}


def _batch_loss(ctx: ClientContext, sel: torch.Tensor) -> torch.Tensor:
    ds = ctx.dataset
    x = ds.features(ds.x_train[sel])
    if ctx.client.noise_std > 0:
        x = x + ctx.client.noise_std * torch.randn(x.shape, generator=ctx.generator)
    return F.cross_entropy(ctx.model(x), ds.y_train[sel])


def _batches(ctx: ClientContext, count: int) -> Iterator[torch.Tensor]:
    return batch_indices(torch.as_tensor(ctx.client.train_idx, dtype=torch.long), ctx.train.batch_size, count,
                         ctx.generator)


class PerFedAvg(Algorithm):
    name = "perfedavg"

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        n = len(ctx.client.train_idx)
        if n == 0:
            return ClientOutput(ctx.delta(), 0, {"loss": float("nan"), "steps": 0})
        alpha, hf = self.cfg.perfedavg_alpha, self.cfg.perfedavg_variant == "hf"
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=ctx.lr, momentum=ctx.train.momentum, weight_decay=ctx.train.weight_decay)
        total = step_count(n, ctx.train.batch_size, ctx.epochs, ctx.steps)
        batches = _batches(ctx, (3 if hf else 2) * total)  # 2 or 3 batches per step
        ctx.model.train()
        loss_sum = 0.0
        for _ in range(total):
            saved = [p.detach().clone() for p in params]
            g1 = torch.autograd.grad(_batch_loss(ctx, next(batches)), params)
            with torch.no_grad():
                for p, g in zip(params, g1, strict=True):
                    p.sub_(g, alpha=alpha)
            outer = _batch_loss(ctx, next(batches))
            g2 = torch.autograd.grad(outer, params)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            if hf:  # (I - α H(w; D3)) g2, H g2 by double backprop at the original weights
                grads = torch.autograd.grad(_batch_loss(ctx, next(batches)), params, create_graph=True)
                hv = torch.autograd.grad(grads, params, grad_outputs=g2)
                g2 = tuple(g - alpha * h for g, h in zip(g2, hv, strict=True))
            for p, g in zip(params, g2, strict=True):
                p.grad = g.detach()
            opt.step()
            loss_sum += float(outer.detach())
        ctx.metrics.update(loss=loss_sum / total, steps=total)
        return ClientOutput(ctx.delta(), n, ctx.metrics)

    def personalize(self, ctx: ClientContext) -> torch.Tensor | None:
        if len(ctx.client.train_idx) == 0:
            return None
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        ctx.model.train()
        grads = torch.autograd.grad(_batch_loss(ctx, next(_batches(ctx, 1))), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(g, alpha=self.cfg.perfedavg_alpha)
        return ctx.vector()

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "perfedavg_alpha": self.cfg.perfedavg_alpha,
                "perfedavg_variant": self.cfg.perfedavg_variant}


_ALL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_LOCAL = (nn.modules.batchnorm._BatchNorm,)  # FedBN keeps BatchNorm (1d/2d/3d, SyncBatchNorm) home, as the paper


class FedBN(Algorithm):
    name = "fedbn"
    stateful = True

    def shared_mask(self, model: torch.nn.Module, spec: ParamSpec) -> torch.Tensor | None:
        kinds = _LOCAL if self.cfg.fedbn_norms == "batch" else _ALL_NORMS
        local = [f"{name}." for name, m in model.named_modules() if isinstance(m, kinds)]
        if not local:
            if self.cfg.fedbn_norms == "batch":
                raise ConfigError("fedbn keeps BatchNorm layers local, but this model has none (other normalization "
                                  "layers, GroupNorm and LayerNorm, are shared as in the FedBN paper)",
                                  'use a model with BatchNorm, e.g. model.name = "simple-cnn-bn", or '
                                  'server.fedbn_norms = "all" to keep every normalization layer local')
            raise ConfigError("fedbn keeps normalization layers local, but this model has none",
                              'use a model with BatchNorm, e.g. model.name = "simple-cnn-bn"')
        mask = torch.ones(spec.size, dtype=torch.bool)
        for e in spec.entries:
            if e.name.startswith(tuple(local)):
                mask[e.offset : e.offset + e.numel] = False
        return self.bind(model, spec, mask)

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        result = ctx.train_local()
        if result.steps == 0:  # no data: its BatchNorm layers were never fitted to anything, keep what it had
            return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics, dict(ctx.state))
        return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics, {"local": ctx.vector()})

    def personalize(self, ctx: ClientContext) -> torch.Tensor | None:
        return ctx.start  # the shared layers from the server, this client's own BatchNorm layers

    def has_personal_model(self, state: State) -> bool:
        return "local" in state


__all__ = ["Ditto", "FedBN", "PerFedAvg", "State"]
