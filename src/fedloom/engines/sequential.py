"""The reference engine: clients one after another, in this process."""

from __future__ import annotations

from ..client.work import ClientRuntime, ClientTask
from .base import ClientFailure, ClientReply, run_task


class SequentialEngine:
    name = "sequential"

    def check(self, runtime: ClientRuntime) -> None:
        pass

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        return [run_task(runtime, task) for task in tasks]

    def close(self) -> None:
        pass
