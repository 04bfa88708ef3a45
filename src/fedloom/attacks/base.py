"""What an attack is: a behaviour of some clients, from some round on.

An attack acts at two places of the one client path (`ClientRuntime.fit`): `poison` may replace the client's
dataset by a poisoned view before local training (data poisoning), and `on_update` may change the trained
update and the example count it claims before the client pipeline (model poisoning). Honest clients, and
attackers before `start_round`, are untouched. Attacks are picklable: engines ship them with the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..server.robust import Param, parse_params

if TYPE_CHECKING:
    from ..algorithms import ClientContext
    from ..client.work import ClientTask


@dataclass(frozen=True)
class Setting:
    """What an attack may need to know about the federation it attacks."""

    seed: int = 0
    num_classes: int = 10
    clients_per_round: int = 10
    server_lr: float = 1.0


class Attack:
    kind = "none"
    PARAMS: dict[str, Param] = {}
    colluding = False  # needs the colluders' honest statistics of the round (ALIE, IPM)
    poisons_data = False  # changes the local training data (not just the update)

    def __init__(self, clients: Iterable[int], start_round: int = 1, params: dict[str, Any] | None = None,
                 setting: Setting | None = None):
        self.clients = frozenset(int(c) for c in clients)
        self.start_round = start_round
        self.params = parse_params(self.kind, dict(params or {}), self.PARAMS, prefix="attack.params",
                                   owner="attack")
        self.setting = setting or Setting()

    def acts(self, round_: int, client_id: int) -> bool:
        return round_ >= self.start_round and client_id in self.clients

    def poison(self, ctx: ClientContext) -> None:
        """Data poisoning: replace `ctx.dataset` by a poisoned view of it (before local training)."""

    def on_update(self, task: ClientTask, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        """Model poisoning: the update (and example count) to send instead of the honest one."""
        return update, num_examples

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "attackers": sorted(self.clients), "start_round": self.start_round,
                **{k: v for k, v in self.params.items() if v is not None}}
