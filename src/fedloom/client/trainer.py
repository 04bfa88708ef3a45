"""Local training on one client: mini-batch SGD over the client's index array.

Batches are gathered straight from the shared dataset tensors by index (no per-client copies, no
DataLoader worker processes), which keeps per-client overhead near zero next to the model's own compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.datasets import Dataset


@dataclass
class LocalResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the steps taken


def round_lr(cfg: TrainConfig, round_: int, total_rounds: int) -> float:
    """Client learning rate for a 1-based round under the configured schedule."""
    t = round_ - 1
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_decay ** (t // cfg.lr_step_rounds)
    if cfg.lr_schedule == "exponential":
        return cfg.lr * cfg.lr_decay**t
    if cfg.lr_schedule == "cosine":
        frac = t / max(1, total_rounds - 1)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    return cfg.lr


Hook = Callable[[list[torch.Tensor]], None]


def step_count(n: int, batch_size: int, epochs: int, steps: int) -> int:
    """Local steps a client of `n` samples takes: exactly `steps` if set, else `epochs` full passes."""
    return steps if steps > 0 else epochs * math.ceil(n / batch_size)


def batch_indices(train_idx: torch.Tensor, batch_size: int, total_steps: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The client's batches in training order: a fresh permutation per pass, the last batch of a pass short.

    Lazy, so a trainer that draws more from `generator` between batches (feature noise) draws in the same
    order as it always did; the vectorized engine lists it up front and gets the same batches.
    """
    n = len(train_idx)
    per_epoch = math.ceil(n / batch_size)
    step = 0
    while step < total_steps:
        perm = train_idx[torch.randperm(n, generator=generator)]
        for b in range(per_epoch):
            if step >= total_steps:
                return
            yield perm[b * batch_size : (b + 1) * batch_size]
            step += 1


def local_train(
    model: torch.nn.Module,
    dataset: Dataset,
    train_idx: np.ndarray,
    cfg: TrainConfig,
    lr: float,
    generator: torch.Generator,
    noise_std: float = 0.0,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    grad_hook: Hook | None = None,
    post_step: Hook | None = None,
) -> LocalResult:
    """Train `model` in place on `dataset.x_train[train_idx]`.

    `steps > 0` runs exactly that many steps (reshuffling each pass); otherwise `epochs` full passes
    (both default to the config's). The optimizer (and its momentum) is fresh each round, as in FedAvg.
    Algorithms change the local objective through two hooks over the parameter list: `grad_hook` edits
    the gradients before the step (FedProx, SCAFFOLD, FedDyn), `post_step` edits the weights after it
    (Ditto's proximal step).
    """
    n = len(train_idx)
    if n == 0:
        return LocalResult(0, 0, float("nan"))
    epochs = cfg.local_epochs if epochs is None else epochs
    steps = cfg.local_steps if steps is None else steps
    idx = torch.as_tensor(train_idx, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    step = 0
    for sel in batch_indices(idx, cfg.batch_size, step_count(n, cfg.batch_size, epochs, steps), generator):
        x = dataset.features(dataset.x_train[sel])
        if noise_std > 0:
            x = x + noise_std * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(model(x), dataset.y_train[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            with torch.no_grad():
                grad_hook(params)
        opt.step()
        if post_step is not None:
            with torch.no_grad():
                post_step(params)
        loss_sum += loss.detach()
        step += 1
    return LocalResult(n, step, float(loss_sum / max(step, 1)))
