"""Your own algorithm in fedloom: FedAvg whose clients clip their update, registered as "clipped-fedavg".

    .venv/bin/python examples/custom_algorithm.py [--rounds 10] [--max-norm 1.0] [--no-report]
    .venv/bin/fedloom run examples/custom_algorithm.toml          # the same, from an experiment file
    .venv/bin/fedloom run quickstart --plugin examples/custom_algorithm.py --set server.algorithm=clipped-fedavg

Clipping each client's update to an L2 norm of at most `max_norm` bounds how far one client can move the
global model (the clipping step of DP-FedAvg, McMahan et al. 2018, and of norm-bounding defences). The
class overrides only the client half of `fedloom.algorithms.Algorithm` (FedAvg): the server half, the
aggregation and the server optimizer are FedAvg's. Importing this file registers it, so it also serves as a
plug-in (`plugins = ["custom_algorithm.py"]` in an experiment, or `--plugin`). docs/extending.md walks
through it.
"""

from __future__ import annotations

import argparse

import torch

import fedloom
from fedloom.algorithms import Algorithm, ClientContext, ClientOutput
from fedloom.errors import ConfigError


class ClippedFedAvg(Algorithm):
    """FedAvg; each client scales its update down to an L2 norm of at most `max_norm` before sending it."""

    defaults = {"max_norm": 1.0}  # server.algorithm_params this algorithm reads (others are refused)

    def __init__(self, cfg, num_clients: int):
        super().__init__(cfg, num_clients)
        max_norm = cfg.algorithm_params.get("max_norm", self.defaults["max_norm"])
        if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm > 0:
            raise ConfigError(f"server.algorithm_params.max_norm must be a number > 0, not {max_norm!r}")
        self.max_norm = float(max_norm)

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        result = ctx.train_local()  # plain local SGD; records loss and steps in ctx.metrics
        delta = ctx.delta()
        norm = float(torch.linalg.vector_norm(delta))
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        # numeric client metrics are stored per client and round (result.clients, "metrics")
        ctx.metrics.update(raw_norm=norm, clip_scale=scale)
        return ClientOutput(delta * scale, result.num_examples, ctx.metrics)

    def describe(self) -> dict:
        return {**super().describe(), "max_norm": self.max_norm}  # recorded in every round's metrics


fedloom.register_algorithm("clipped-fedavg", ClippedFedAvg)

CONFIG = {
    "name": "clipped-fedavg",
    "data": {"dataset": "digits", "num_clients": 8, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "server": {"algorithm": "clipped-fedavg", "algorithm_params": {"max_norm": 1.0}},
    "run": {"rounds": 10, "seed": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=CONFIG["run"]["rounds"])
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    args = parser.parse_args()
    result = fedloom.run(CONFIG, rounds=args.rounds, overrides={"server.algorithm_params": {"max_norm": args.max_norm}},
                         make_report=not args.no_report)
    scales = [c["metrics"]["clip_scale"] for c in result.clients if c["kind"] == "fit"]
    print(f"{result.run_id}: {result.status} after {result.summary['rounds_completed']} rounds, test accuracy "
          f"{result.summary['final_accuracy']:.3f}; {sum(s < 1 for s in scales)} of {len(scales)} updates clipped")


if __name__ == "__main__":
    main()
