"""Server-side aggregation of client update vectors."""

from __future__ import annotations

import torch


def example_weights(num_examples: list[int] | torch.Tensor) -> torch.Tensor:
    """FedAvg's weights n_k / sum n_k (float64 for the division, so they sum to one to rounding)."""
    n = torch.as_tensor(num_examples, dtype=torch.float64)
    if n.numel() == 0 or n.sum() <= 0:
        raise ValueError("cannot aggregate: no examples in any update")
    return (n / n.sum()).to(torch.float32)


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * updates[k] for a (clients, d) stack."""
    return weights.to(updates.dtype) @ updates
