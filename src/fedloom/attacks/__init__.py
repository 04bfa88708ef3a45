"""Simulated attacks: some clients poison their data or their updates (docs/robustness.md).

The `[attack]` section names the kind, which clients (a list, or a fraction of the population drawn with the
run's seed), the first round they attack, and the kind's parameters. The attack travels with the client
runtime to whatever engine runs the clients and acts in `ClientRuntime.fit`; the run records which clients
attacked in each round, so detection can be scored against the truth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..rng import numpy_rng
from .base import Attack, Setting
from .data import Backdoor, LabelFlip, backdoor_success, stamp
from .model import (
    ALIE,
    IPM,
    FreeRider,
    GaussianNoise,
    Inflate,
    Scaling,
    SignFlip,
    alie_z,
    collusion_stats,
)

if TYPE_CHECKING:
    from ..client.work import ClientTask
    from ..config import ExperimentConfig

ATTACKS: dict[str, type[Attack]] = {
    cls.kind: cls for cls in (LabelFlip, Backdoor, SignFlip, GaussianNoise, Scaling, ALIE, IPM, FreeRider, Inflate)
}

__all__ = ["ATTACKS", "Attack", "Backdoor", "Setting", "alie_z", "attacker_ids", "backdoor_success",
           "build_attack", "check_params", "collusion_stats", "stamp", "with_collusion"]


def check_params(kind: str, params: dict[str, Any]) -> None:
    """Refuse parameters the kind does not take, or bad values (ConfigError naming `attack.params.<key>`)."""
    if kind != "none":  # the class count is checked against the dataset when the run builds the attack
        ATTACKS[kind](clients=(), params=params, setting=Setting(num_classes=2**31))
    elif params:
        from ..errors import ConfigError

        raise ConfigError(f"attack.params.{next(iter(params))} is set but attack.kind is 'none'",
                          f"set attack.kind ({', '.join(ATTACKS)}) or remove attack.params")


def attacker_ids(clients: Sequence[int] | None, fraction: float, num_clients: int, seed: int) -> list[int]:
    """The attacking clients: the list given, or round(fraction * N) of them drawn with the run's seed."""
    if clients is not None:
        return sorted(set(int(c) for c in clients))
    m = round(fraction * num_clients)
    return sorted(int(c) for c in numpy_rng(seed, "attackers").permutation(num_clients)[:m])


def build_attack(cfg: ExperimentConfig, num_classes: int) -> Attack | None:
    a = cfg.attack
    if a.kind == "none":
        return None
    setting = Setting(seed=cfg.run.seed, num_classes=num_classes, clients_per_round=cfg.clients_per_round(),
                      server_lr=cfg.server.lr)
    ids = attacker_ids(a.clients, a.fraction, cfg.data.num_clients, cfg.run.seed)
    return ATTACKS[a.kind](ids, a.start_round, a.params, setting)


Fit = Callable[[list["ClientTask"]], list[Any]]


def with_collusion(attack: Attack | None, tasks: list[ClientTask], fit: Fit) -> list[ClientTask]:
    """For colluding attacks: the round's acting attackers train honestly first (`fit`, the engine), and their
    tasks then carry the mean and std of those honest updates (`ClientTask.collusion`), from which each crafts
    what it sends. Other attacks and rounds without acting attackers: the tasks as they are."""
    if attack is None or not attack.colluding:
        return tasks
    acting = [t for t in tasks if attack.acts(t.round, t.client_id)]
    if not acting:
        return tasks
    vectors = []
    for reply in fit(acting):
        msg = getattr(reply, "message", None)
        if msg is not None and msg.num_examples > 0:
            vectors.append(msg.vector.clone())
    stats = collusion_stats(vectors)
    if stats is None:
        return tasks
    return [dataclasses.replace(t, collusion=stats) if attack.acts(t.round, t.client_id) else t for t in tasks]
