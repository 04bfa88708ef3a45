"""The reference engine: clients one after another, in this process."""

from __future__ import annotations

import time
import traceback

from ..client.work import ClientRuntime, ClientTask
from .base import ClientFailure, ClientReply


class SequentialEngine:
    name = "sequential"

    def check(self, runtime: ClientRuntime) -> None:
        pass

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        out: list[ClientReply | ClientFailure] = []
        for task in tasks:
            t0 = time.perf_counter()
            try:
                result = runtime.run(task)
                out.append(ClientReply(result.payload, time.perf_counter() - t0, result.state))
            except Exception:  # noqa: BLE001 - the round logic decides: fail the round or drop the client
                out.append(ClientFailure(task.client_id, traceback.format_exc()))
        return out

    def close(self) -> None:
        pass
