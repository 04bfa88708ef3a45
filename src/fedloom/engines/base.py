"""What every engine provides: run a batch of client tasks, return each one's bytes or its failure."""

from __future__ import annotations

import time
import traceback
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


def run_task(runtime: ClientRuntime, task: ClientTask) -> ClientReply | ClientFailure:
    """One client task wherever it runs: its reply timed, or its failure with the client's own traceback."""
    t0 = time.perf_counter()
    try:
        result = runtime.run(task)
    except Exception:  # noqa: BLE001 - the round logic decides: fail the round or drop the client
        return ClientFailure(task.client_id, traceback.format_exc())
    return ClientReply(result.payload, time.perf_counter() - t0, result.state)
