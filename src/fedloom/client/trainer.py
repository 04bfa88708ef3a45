"""Local training on one client: mini-batch SGD over the client's index array.

Batches are gathered straight from the shared dataset tensors by index (no per-client copies, no
DataLoader worker processes), which keeps per-client overhead near zero next to the model's own compute.
"""

from __future__ import annotations

import math
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


def local_train(
    model: torch.nn.Module,
    dataset: Dataset,
    train_idx: np.ndarray,
    cfg: TrainConfig,
    lr: float,
    generator: torch.Generator,
    noise_std: float = 0.0,
) -> LocalResult:
    """Train `model` in place on `dataset.x_train[train_idx]`.

    `local_steps > 0` runs exactly that many steps (reshuffling each pass); otherwise `local_epochs`
    full passes. The optimizer (and its momentum) is fresh each round, as in FedAvg.
    """
    n = len(train_idx)
    if n == 0:
        return LocalResult(0, 0, float("nan"))
    idx = torch.as_tensor(train_idx, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    bs = cfg.batch_size
    batches_per_epoch = math.ceil(n / bs)
    total_steps = cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * batches_per_epoch
    loss_sum = torch.zeros((), dtype=torch.float64)
    step = 0
    while step < total_steps:
        perm = idx[torch.randperm(n, generator=generator)]
        for b in range(batches_per_epoch):
            if step >= total_steps:
                break
            sel = perm[b * bs : (b + 1) * bs]
            x = dataset.features(dataset.x_train[sel])
            if noise_std > 0:
                x = x + noise_std * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(x), dataset.y_train[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
    return LocalResult(n, step, float(loss_sum / max(step, 1)))
