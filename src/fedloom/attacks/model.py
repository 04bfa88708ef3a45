"""Model poisoning: what an attacker sends instead of its honest update, after local training.

The colluding attacks (ALIE, IPM) need the statistics of benign updates. fedloom simulates the standard
threat model of both papers: the attackers know their own benign updates. In a round, the acting attackers
first train honestly (a first pass through the engine, `with_collusion`), share the mean and standard
deviation of those honest updates, and each then sends the update crafted from them.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import torch

from ..rng import torch_rng
from ..server.robust import Param
from .base import Attack

if TYPE_CHECKING:
    from ..client.work import ClientTask


class SignFlip(Attack):
    """Sends -scale times its honest update."""

    kind = "sign-flip"
    PARAMS = {"scale": Param(1.0, float, 0.0, text="factor on the flipped update")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        return update * -self.params["scale"], num_examples


class GaussianNoise(Attack):
    """Sends Gaussian noise of std `std` in place of its update (Blanchard et al. 2017's Gaussian attacker)."""

    kind = "gaussian"
    PARAMS = {"std": Param(1.0, float, 0.0, text="std of every coordinate")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        g = torch_rng(task.seed, "attack", task.round, task.client_id)
        return self.params["std"] * torch.randn(update.shape, generator=g, dtype=update.dtype), num_examples


class Scaling(Attack):
    """Sends its honest update times `factor`: model replacement (Bagdasaryan et al. 2020) with the default
    factor, clients per round / server lr, which makes this client's model the next global model under FedAvg."""

    kind = "scaling"
    PARAMS = {"factor": Param(None, float, 0.0, optional=True,
                              text="factor on the update (None: clients per round / server.lr)")}

    @property
    def factor(self) -> float:
        f = self.params["factor"]
        return self.setting.clients_per_round / self.setting.server_lr if f is None else f

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        return update * self.factor, num_examples


def alie_z(n: int, m: int) -> float:
    """Baruch et al. 2019's z_max for n clients of which m collude: s = floor(n/2 + 1) - m supporters needed,
    z = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - m
    q = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(q)


class ALIE(Attack):
    """A Little Is Enough (Baruch et al. 2019): every colluder sends mean - z * std of the colluders' honest
    updates, coordinate-wise: close enough to the benign updates to pass robust aggregators, consistently
    biased. z defaults to the paper's z_max for the round's clients and colluders."""

    kind = "alie"
    colluding = True
    PARAMS = {"z": Param(None, float, 0.0, optional=True, text="deviations from the mean (None: the paper's z_max)")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        stats = getattr(task, "collusion", None)
        if stats is None:  # the honest pass: nothing shared yet
            return update, num_examples
        z = self.params["z"]
        if z is None:
            z = alie_z(self.setting.clients_per_round, int(stats["count"]))
        return (stats["mean"] - z * stats["std"]).to(update.dtype), num_examples


class IPM(Attack):
    """Inner Product Manipulation (Xie et al. 2020): every colluder sends -epsilon times the mean of the
    colluders' honest updates, so the aggregate's inner product with the true gradient turns negative."""

    kind = "ipm"
    colluding = True
    PARAMS = {"epsilon": Param(0.5, float, 0.0, text="factor on the negated mean")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        stats = getattr(task, "collusion", None)
        if stats is None:
            return update, num_examples
        return (-self.params["epsilon"] * stats["mean"]).to(update.dtype), num_examples


class FreeRider(Attack):
    """Takes the model and contributes nothing (Fraboni et al. 2021): sends back the model it received (a zero
    update), or, with `noise` > 0, disguises that with Gaussian noise of that std."""

    kind = "free-rider"
    PARAMS = {"noise": Param(0.0, float, 0.0, text="std of the disguising noise (0: the stale model itself)")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        if self.params["noise"] == 0:
            return torch.zeros_like(update), num_examples
        g = torch_rng(task.seed, "attack", task.round, task.client_id)
        return self.params["noise"] * torch.randn(update.shape, generator=g, dtype=update.dtype), num_examples


class Inflate(Attack):
    """Sends its honest update but claims `factor` times its example count, to weigh more in the mean."""

    kind = "inflate"
    PARAMS = {"factor": Param(10.0, float, 1.0, text="factor on the claimed example count")}

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        return update, int(round(num_examples * self.params["factor"]))


def collusion_stats(vectors: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Mean and standard deviation (n - 1 in the denominator; 0 for one colluder) of the colluders' honest
    updates, coordinate-wise."""
    if not vectors:
        return None
    stack = torch.stack([v.to(torch.float64) for v in vectors])
    std = stack.std(0, correction=1) if len(vectors) > 1 else torch.zeros(stack.shape[1], dtype=torch.float64)
    return {"mean": stack.mean(0).float(), "std": std.float(), "count": torch.tensor(len(vectors))}


def describe_setting(attack: Attack) -> dict[str, Any]:
    if isinstance(attack, Scaling):
        return {"factor": attack.factor}
    return {}
