"""Centralized and federated evaluation of the global model.

Every client's local test split of a `matched` partition is a subset of the official test split, and
the global model is the same for every client, so one pass over the test split gives the centralized
metrics and, by slicing per-sample results, every client's metrics without evaluating anything twice.

A client's macro-F1 averages over the classes present in its own test split (`macro_f1(present_only=True)`):
a client holding 2 classes is scored on those 2, not on every class the model happens to predict for it.
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

    def summary(self, num_classes: int, *, present_only: bool = False) -> dict[str, float]:
        """Loss, accuracy and macro-F1; `present_only=True` for a client's own split (see `metrics.macro_f1`)."""
        n = int(self.labels.numel())
        if n == 0:
            return dict(NO_EXAMPLES)
        return {
            "num_examples": n,
            "loss": float(self.losses.double().mean()),
            "accuracy": float((self.preds == self.labels).double().mean()),
            "macro_f1": macro_f1(self.labels, self.preds, num_classes, present_only=present_only),
        }


def client_summaries(preds: Predictions, test_idx: list[np.ndarray], num_classes: int) -> list[dict[str, float]]:
    """`preds.subset(idx).summary(num_classes, present_only=True)` for every client's test indices, in a few
    bincounts instead of a pass per client: a population of 100,000 clients is evaluated in the time of one.
    Splits may overlap (each client counts its own copy of a shared sample)."""
    n_clients = len(test_idx)
    sizes = np.fromiter((len(i) for i in test_idx), np.int64, count=n_clients)
    if sizes.sum() == 0:
        return [dict(NO_EXAMPLES) for _ in range(n_clients)]
    owner = torch.from_numpy(np.repeat(np.arange(n_clients, dtype=np.int64), sizes))
    at = torch.from_numpy(np.concatenate(test_idx).astype(np.int64))
    y, p = preds.labels[at].long(), preds.preds[at].long()
    right = (p == y).double()
    count = torch.bincount(owner, minlength=n_clients).double()
    loss = torch.bincount(owner, weights=preds.losses[at].double(), minlength=n_clients) / count
    acc = torch.bincount(owner, weights=right, minlength=n_clients) / count
    macro = _present_class_macro_f1(owner, y, p, right, n_clients, num_classes)
    return [{"num_examples": int(n), "loss": lo, "accuracy": a, "macro_f1": f} if n else dict(NO_EXAMPLES)
            for n, lo, a, f in zip(sizes.tolist(), loss.tolist(), acc.tolist(), macro.tolist(), strict=True)]


def _present_class_macro_f1(owner: torch.Tensor, y: torch.Tensor, p: torch.Tensor, right: torch.Tensor,
                            n_clients: int, k: int) -> torch.Tensor:
    """Per client, mean F1 over the classes in its labels. Works on the (client, class) pairs that occur, not
    a clients x classes table, so memory and time follow the number of test samples whatever the classes."""
    pairs, inv, support = torch.unique(owner * k + y, return_inverse=True, return_counts=True)  # sorted
    tp = torch.bincount(inv, weights=right, minlength=len(pairs))
    said = owner * k + p  # (client, predicted class): counts toward a pair's precision only if the pair occurs
    pos = torch.searchsorted(pairs, said).clamp(max=len(pairs) - 1)
    predicted = torch.bincount(pos[pairs[pos] == said], minlength=len(pairs))
    f1 = 2 * tp / (support + predicted).double()
    who = pairs // k
    return torch.bincount(who, weights=f1, minlength=n_clients) / torch.bincount(who, minlength=n_clients)


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
