"""`auto`: pick the engine from the model, the clients per round and the machine.

The rule (measured on 2 cores; docs/engines.md has the figures behind it):

- `vectorized` when it can run the experiment (FedAvg/FedProx, no BatchNorm, dropout or feature noise),
  the model has no convolutions and a round trains at least 8 clients: stacking turns many small steps
  into a few large ones (T2, an MLP: the fastest engine by 2x); a convolution under vmap becomes a grouped
  convolution, slower than the clients one by one (T1: slower than the plain loop);
- else `parallel` when torch may use more than one core (`run.threads`, else the usable cores) and a
  round has at least two clients per core to spread (T1: the fastest engine);
- else `sequential`.
"""

from __future__ import annotations

from ..client.work import ClientRuntime, ClientTask
from ..config import ExperimentConfig
from ..models.layout import has_convolutions
from .base import ClientFailure, ClientReply, Engine, usable_cores
from .vectorized import unsupported

VECTORIZE_MIN_CLIENTS = 8  # clients per round from which stacking pays off


def choose(runtime: ClientRuntime, clients_per_round: int, cores: int) -> str:
    if (unsupported(runtime) is None and not has_convolutions(runtime.model)
            and clients_per_round >= VECTORIZE_MIN_CLIENTS):
        return "vectorized"
    if cores > 1 and clients_per_round >= 2 * cores:
        return "parallel"
    return "sequential"


class AutoEngine:
    name = "auto"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.chosen: Engine | None = None

    def check(self, runtime: ClientRuntime) -> None:
        if self.chosen is None:
            from . import build_engine

            self.chosen = build_engine(choose(runtime, self.cfg.clients_per_round(),
                                              self.cfg.run.threads or usable_cores()), self.cfg)
            self.name = f"auto:{self.chosen.name}"
        self.chosen.check(runtime)

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        self.check(runtime)
        assert self.chosen is not None
        return self.chosen.fit(runtime, tasks)

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()
