"""Quickstart speed and accuracy: fedloom vs a plain PyTorch loop doing exactly the same FedAvg work.

    .venv/bin/python benchmarks/quickstart.py [--rounds 20] [--json out.json]

Both use the same data, partition, initial model and hyper-parameters (the quickstart preset); the plain
loop is what a researcher would write by hand: deep-copy the global model per client, SGD over the
client's shuffled indices, example-weighted average, evaluate on the test split every round.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import fedloom
from fedloom.api import prepare
from fedloom.config import load_config


def plain_fedavg(rounds: int) -> tuple[float, float]:
    cfg = load_config("quickstart", {"run.rounds": rounds})
    data, model_factory = prepare(cfg)
    ds = data.dataset
    model = model_factory()
    t0 = time.perf_counter()
    acc = 0.0
    for _ in range(rounds):
        states, weights = [], []
        for c in data.clients:
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
            idx = torch.as_tensor(c.train_idx)
            perm = idx[torch.randperm(len(idx))]
            local.train()
            for s in range(0, len(perm), cfg.train.batch_size):
                b = perm[s : s + cfg.train.batch_size]
                loss = F.cross_entropy(local(ds.features(ds.x_train[b])), ds.y_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            states.append(local.state_dict())
            weights.append(len(idx))
        total = sum(weights)
        model.load_state_dict({k: sum(w / total * s[k] for s, w in zip(states, weights, strict=True))
                               for k in states[0]})
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(ds.features(ds.x_test[s : s + 1024])).argmax(1) == ds.y_test[s : s + 1024]).sum())
                          for s in range(0, len(ds.y_test), 1024))
        acc = correct / len(ds.y_test)
    return time.perf_counter() - t0, acc


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
    plain_s, plain_acc = plain_fedavg(args.rounds)
    out = {"rounds": args.rounds, "threads": torch.get_num_threads(), "fedloom": fed,
           "plain": {"wall_seconds": plain_s, "final_accuracy": plain_acc},
           "ratio_to_plain": fed["wall_seconds"] / plain_s}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
