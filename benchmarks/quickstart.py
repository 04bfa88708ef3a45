"""Quickstart speed and accuracy: fedloom vs a plain PyTorch loop doing exactly the same FedAvg work.

    .venv/bin/python benchmarks/quickstart.py [--rounds 20] [--json out.json]

Both use the same data, partition, initial model, hyper-parameters (the quickstart preset) and shuffles;
the plain loop is `fedloom.bench.plain_fedavg`, what a researcher would write by hand: deep-copy the
global model per client, SGD over the client's shuffled indices, example-weighted average, evaluate on the
test split every round.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import fedloom
from fedloom.api import prepare
from fedloom.bench import plain_fedavg
from fedloom.config import load_config


def plain(rounds: int) -> tuple[float, float]:
    """(wall seconds, final accuracy) of the hand-written loop in `fedloom.bench`, all rounds timed."""
    cfg = load_config("quickstart", {"run.rounds": rounds})
    data, model_factory = prepare(cfg)
    res = plain_fedavg(cfg, data, model_factory, warmup=0)
    return sum(res["round_seconds"]), res["final_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = fedloom.run("quickstart", rounds=args.rounds, runs_dir=tmp, make_report=False)
        fed_total = time.perf_counter() - t0
        fed = {"wall_seconds": res.summary["wall_seconds"], "total_seconds_incl_data": fed_total,
               "final_accuracy": res.summary["final_accuracy"], "best_accuracy": res.summary["best_accuracy"]}
    plain_s, plain_acc = plain(args.rounds)
    out = {"rounds": args.rounds, "threads": torch.get_num_threads(), "fedloom": fed,
           "plain": {"wall_seconds": plain_s, "final_accuracy": plain_acc},
           "ratio_to_plain": fed["wall_seconds"] / plain_s}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
