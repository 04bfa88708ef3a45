"""fedloom from Python: run, inspect, resume, report.

    .venv/bin/python examples/python_api.py
"""

import fedloom

config = {
    "name": "digits-api",
    "data": {"dataset": "digits", "num_clients": 8, "partition": "dirichlet", "alpha": 0.3},
    "model": {"name": "mlp"},
    "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "server": {"clients_per_round": 4},
    "run": {"rounds": 10, "seed": 0},
}

result = fedloom.run(config, callback=lambda ev: print(f"round {ev['round']}: acc {ev.get('test_accuracy')}"))
print(result.status, result.summary["final_accuracy"], result.report)

# Train the same run 5 rounds further: identical to having asked for 15 rounds at the start.
more = fedloom.resume(result.run_id, rounds=15)
print(more.summary["rounds_completed"], more.summary["final_accuracy"])
