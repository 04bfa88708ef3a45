"""What every engine provides: run a batch of client tasks, return each one's bytes or its failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..client.work import ClientRuntime, ClientTask


@dataclass
class ClientFailure:
    client_id: int
    traceback: str


class Engine(Protocol):
    name: str

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[bytes | ClientFailure]: ...

    def close(self) -> None: ...
