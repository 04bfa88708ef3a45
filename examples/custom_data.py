"""Your own data in fedloom: five hospitals' tabular records, one client each, from numpy arrays.

    .venv/bin/python examples/custom_data.py [--rounds 20] [--no-report]

The arrays here are generated (each site sees a shifted patient population and its own share of
positives); replace `hospitals` with code that reads yours. Registering the loader under a name makes
`data.dataset = "hospitals"` work in any experiment of this process; importing this file registers it, so
it also serves as a plug-in module for experiments run elsewhere.
"""

from __future__ import annotations

import argparse

import numpy as np

import fedloom
from fedloom.data import Dataset, from_client_arrays


def hospitals(data_dir: str | None = None, seed: int = 0, sites: int = 5, features: int = 12) -> Dataset:
    """`sites` clients; site k's records are shifted by k/2 on every feature and its positive rate differs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    clients, tests = [], []
    for k in range(sites):
        n = 120 + 40 * k
        x = rng.normal(loc=0.5 * k, size=(n, features)).astype(np.float32)
        y = (x @ w + rng.normal(scale=0.5, size=n) > 0.5 * k * w.sum()).astype(np.int64)
        cut = int(0.8 * n)
        clients.append((x[:cut], y[:cut]))
        tests.append((x[cut:], y[cut:]))
    return from_client_arrays(clients, test=tests, name="hospitals", class_names=["negative", "positive"],
                              standardize=True, source=f"generated: {sites} sites, seed {seed}")


fedloom.register_dataset("hospitals", hospitals)

CONFIG = {
    "name": "hospitals",
    "data": {"dataset": "hospitals", "num_clients": 5, "partition": "natural", "options": {"sites": 5}},
    "model": {"name": "logreg"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"rounds": 20, "seed": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=CONFIG["run"]["rounds"])
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    args = parser.parse_args()
    result = fedloom.run(CONFIG, rounds=args.rounds, make_report=not args.no_report)
    s = result.summary
    print(f"{result.run_id}: {result.status} after {s['rounds_completed']} rounds, "
          f"test accuracy {s['final_accuracy']:.3f}, on the clients' own test data {s['final_fed_accuracy']:.3f}")


if __name__ == "__main__":
    main()
