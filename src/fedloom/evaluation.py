"""Centralized and federated evaluation of the global model.

Every client's local test split of a `matched` partition is a subset of the official test split, and
the global model is the same for every client, so one pass over the test split gives the centralized
metrics and, by slicing per-sample results, every client's metrics without evaluating anything twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import Dataset
from .metrics import macro_f1


@dataclass
class Predictions:
    losses: torch.Tensor  # per-sample cross-entropy
    preds: torch.Tensor
    labels: torch.Tensor

    def subset(self, idx: np.ndarray | torch.Tensor) -> Predictions:
        i = torch.as_tensor(idx, dtype=torch.long)
        return Predictions(self.losses[i], self.preds[i], self.labels[i])

    def summary(self, num_classes: int) -> dict[str, float]:
        n = int(self.labels.numel())
        if n == 0:
            return {"num_examples": 0, "loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
        return {
            "num_examples": n,
            "loss": float(self.losses.double().mean()),
            "accuracy": float((self.preds == self.labels).double().mean()),
            "macro_f1": macro_f1(self.labels, self.preds, num_classes),
        }


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, x: torch.Tensor, y: torch.Tensor,
            batch_size: int = 1024) -> Predictions:
    model.eval()
    losses, preds = [], []
    for s in range(0, len(y), batch_size):
        logits = model(dataset.features(x[s : s + batch_size]))
        losses.append(F.cross_entropy(logits, y[s : s + batch_size], reduction="none"))
        preds.append(logits.argmax(1))
    if not losses:
        empty = torch.zeros(0)
        return Predictions(empty, empty.long(), empty.long())
    return Predictions(torch.cat(losses), torch.cat(preds), y.clone())
