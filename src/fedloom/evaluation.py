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

NO_EXAMPLES = {"num_examples": 0, "loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}


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
            return dict(NO_EXAMPLES)
        return {
            "num_examples": n,
            "loss": float(self.losses.double().mean()),
            "accuracy": float((self.preds == self.labels).double().mean()),
            "macro_f1": macro_f1(self.labels, self.preds, num_classes),
        }


def client_summaries(preds: Predictions, test_idx: list[np.ndarray], num_classes: int) -> list[dict[str, float]]:
    """`preds.subset(idx).summary(num_classes)` for every client's test indices, in a few bincounts instead of a
    pass per client: a population of 100,000 clients is evaluated in the time of one.

    Clients' test splits are disjoint (every partition makes them so); if they are not, clients are done one by
    one.
    """
    n_clients = len(test_idx)
    sizes = np.fromiter((len(i) for i in test_idx), np.int64, count=n_clients)
    flat = np.concatenate(test_idx).astype(np.int64) if n_clients else np.zeros(0, np.int64)
    if len(np.unique(flat)) != len(flat):
        return [preds.subset(i).summary(num_classes) for i in test_idx]
    owner = torch.from_numpy(np.repeat(np.arange(n_clients, dtype=np.int64), sizes))
    at = torch.from_numpy(flat)
    y, p = preds.labels[at], preds.preds[at]
    right = (p == y).double()
    k = num_classes
    count = torch.bincount(owner, minlength=n_clients).double()
    loss = torch.bincount(owner, weights=preds.losses[at].double(), minlength=n_clients) / count
    acc = torch.bincount(owner, weights=right, minlength=n_clients) / count
    tp = torch.bincount(owner * k + y, weights=right, minlength=n_clients * k).view(n_clients, k)
    denom = (torch.bincount(owner * k + y, minlength=n_clients * k)
             + torch.bincount(owner * k + p, minlength=n_clients * k)).view(n_clients, k).double()
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    macro = f1.sum(1) / (denom > 0).sum(1)
    return [{"num_examples": int(n), "loss": lo, "accuracy": a, "macro_f1": f} if n else dict(NO_EXAMPLES)
            for n, lo, a, f in zip(sizes.tolist(), loss.tolist(), acc.tolist(), macro.tolist(), strict=True)]


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
