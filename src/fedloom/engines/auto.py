"""`auto`: pick the engine from the model, the clients per round and the machine.

The rule (measured on 2 cores; docs/engines.md has the table behind it):

- `vectorized` when it can run the experiment (FedAvg/FedProx, no BatchNorm, no feature noise) and a
  round trains many small clients: stacking turns many tiny steps into a few large ones, and per-client
  overhead is what dominates there;
- else `parallel` when the machine has more than one core and a round has at least two clients per core
  to spread;
- else `sequential`.
"""

from __future__ import annotations

from ..client.work import ClientRuntime, ClientTask
from ..config import RunConfig
from .base import ClientFailure, ClientReply, Engine
from .parallel import ParallelEngine, usable_cores
from .sequential import SequentialEngine
from .vectorized import VectorizedEngine, unsupported

VECTORIZE_MIN_CLIENTS = 8  # clients per round from which stacking pays off
VECTORIZE_MAX_SAMPLES = 2000  # mean samples per selected client up to which clients count as small


def choose(runtime: ClientRuntime, clients_per_round: int, cores: int) -> str:
    data = runtime.data
    mean_samples = sum(len(c.train_idx) for c in data.clients) / max(data.num_clients, 1)
    if (unsupported(runtime) is None and clients_per_round >= VECTORIZE_MIN_CLIENTS
            and mean_samples <= VECTORIZE_MAX_SAMPLES):
        return "vectorized"
    if cores > 1 and clients_per_round >= 2 * cores:
        return "parallel"
    return "sequential"


class AutoEngine:
    name = "auto"

    def __init__(self, run: RunConfig, clients_per_round: int):
        self.run = run
        self.clients_per_round = clients_per_round
        self.chosen: Engine | None = None

    def check(self, runtime: ClientRuntime) -> None:
        if self.chosen is None:
            pick = choose(runtime, self.clients_per_round, usable_cores())
            self.chosen = (VectorizedEngine() if pick == "vectorized" else
                           ParallelEngine(self.run.workers) if pick == "parallel" else SequentialEngine())
            self.name = f"auto:{self.chosen.name}"
        self.chosen.check(runtime)

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        self.check(runtime)
        assert self.chosen is not None
        return self.chosen.fit(runtime, tasks)

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()
