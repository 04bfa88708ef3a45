"""The reference engine: clients one after another, in this process."""

from __future__ import annotations

import traceback

from ..client.work import ClientRuntime, ClientTask
from .base import ClientFailure


class SequentialEngine:
    name = "sequential"

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[bytes | ClientFailure]:
        out: list[bytes | ClientFailure] = []
        for task in tasks:
            try:
                out.append(runtime.fit(task))
            except Exception:  # noqa: BLE001 - the round logic decides: fail the round or drop the client
                out.append(ClientFailure(task.client_id, traceback.format_exc()))
        return out

    def close(self) -> None:
        pass
