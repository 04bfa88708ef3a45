"""What every engine provides: run a batch of client tasks, return each one's bytes or its failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..client.work import ClientRuntime, ClientTask


@dataclass
class ClientReply:
    """A client's update bytes, and the seconds its work took as the engine measured them.

    Timing stays out of the bytes so that the bytes, and so the measured communication, are deterministic.
    """

    payload: bytes
    seconds: float
    state: dict[str, torch.Tensor] | None = None  # the client's new private state, if its algorithm keeps one


@dataclass
class ClientFailure:
    client_id: int
    traceback: str


class Engine(Protocol):
    name: str

    def check(self, runtime: ClientRuntime) -> None:
        """Refuse, before the run is recorded, an experiment this engine cannot execute (ConfigError)."""
        ...

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]: ...

    def close(self) -> None: ...
