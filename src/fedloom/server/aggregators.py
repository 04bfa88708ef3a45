"""The aggregation stage: how the server combines client updates, chosen independently of the algorithm.

An algorithm says *which* combination of the round's updates it needs, as non-negative weights: FedAvg
the example-weighted mean (weights n_k / n), SCAFFOLD's control variate the sum over the population
(weights 1/N), FedNova normalized weights, q-FFL fairness weights. The aggregator (`server.aggregator`)
decides *how* that combination is computed: `mean` computes exactly the weighted sum; robust aggregators,
DP noise and secure sums plug in here with the same call, `combine(updates, weights)`.

An aggregator that looks at individual updates says so (`sees_clients`), so that secure aggregation,
which hides them, can refuse it before a run starts.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..errors import ConfigError


def example_weights(num_examples: list[int] | torch.Tensor) -> torch.Tensor:
    """FedAvg's weights n_k / sum n_k (float64 for the division, so they sum to one to rounding)."""
    n = torch.as_tensor(num_examples, dtype=torch.float64)
    if n.numel() == 0 or n.sum() <= 0:
        raise ValueError("cannot aggregate: no examples in any update")
    return (n / n.sum()).to(torch.float32)


class Aggregator(Protocol):
    """Optional, for aggregators that need more than the stack (robust ones, server/robust.py): a `context`
    attribute the round logic sets before the algorithm aggregates (a `robust.RoundContext`: client ids, round,
    server-side state checkpointed with the run, FLTrust's server update), and `check(n, where)`, which refuses
    a number of updates below the rule's breakdown condition."""

    name: str
    sees_clients: bool  # needs each client's update in the clear

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[k] * updates[k] (or a robust / private estimate of it) for a (clients, d) stack."""
        ...


class MeanAggregator:
    """The weighted sum itself: FedAvg's aggregation, and every algorithm's before wave 2."""

    name = "mean"
    sees_clients = False  # a sum: computable from masked inputs

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weights.to(updates.dtype) @ updates


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * updates[k] for a (clients, d) stack (kept for callers outside the round)."""
    return MeanAggregator().combine(updates, weights)


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {"mean": MeanAggregator}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> None:
    """`factory()` builds the aggregator; a factory that takes parameters is called `factory(params)` with the
    `server.aggregator_params` dict and refuses bad ones with a ConfigError naming the key."""
    AGGREGATORS[name] = factory


def build_aggregator(name: str, params: dict[str, Any] | None = None) -> Aggregator:
    if name not in AGGREGATORS:
        close = difflib.get_close_matches(name, AGGREGATORS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"aggregators: {', '.join(AGGREGATORS)}"
        raise ConfigError(f"unknown aggregator '{name}' (server.aggregator)", hint)
    factory = AGGREGATORS[name]
    if inspect.signature(factory).parameters:
        return factory(dict(params or {}))
    if params:
        raise ConfigError(f"server.aggregator_params.{next(iter(params))}: aggregator '{name}' takes no parameters",
                          "remove server.aggregator_params, or choose a robust aggregator (docs/robustness.md)")
    return factory()


def _register_robust() -> None:
    from .robust import ROBUST

    for name, cls in ROBUST.items():
        AGGREGATORS.setdefault(name, cls)


_register_robust()
