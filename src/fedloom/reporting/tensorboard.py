"""TensorBoard event files of one run: written from the run store after the fact, or live while it trains.

The store is the record; `write_tensorboard` regenerates the whole view from it at any time, also for a run
that failed or was killed. With `eval.tensorboard = true` (or `fedloom run --tensorboard`) a
`LiveTensorBoard` also writes each round as it is recorded, so TensorBoard follows a run in progress; a
resumed run continues the same files (steps from the resumed round on replace the older ones).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from ..store import RunStore

# tag -> column of the `rounds` table
ROUND_SCALARS = {
    "test/accuracy": "test_accuracy", "test/loss": "test_loss", "test/macro_f1": "test_macro_f1",
    "train/loss": "train_loss", "comm/bytes_up": "bytes_up", "comm/bytes_down": "bytes_down",
    "clients/num": "num_clients", "time/seconds": "seconds",
}
# tag -> key of a round's `metrics` dict
METRIC_SCALARS = {
    "train/lr": "lr",
    "fed/accuracy": "fed_accuracy", "fed/accuracy_min": "fed_accuracy_min",
    "fed/accuracy_p10": "fed_accuracy_p10", "fed/accuracy_median": "fed_accuracy_median",
    "fed/accuracy_max": "fed_accuracy_max",
    "fed/loss": "fed_loss", "fed/macro_f1": "fed_macro_f1",
    # fairness of the global model over the clients (every client counts once; docs/algorithms.md, q-FFL)
    "fair/jain": "fair_jain", "fair/worst10": "fair_worst10", "fair/best10": "fair_best10", "fair/std": "fair_std",
    # personalized models (Ditto, Per-FedAvg, FedBN, fine-tuning): each client's own model on its own split
    "pers/accuracy": "pers_accuracy", "pers/accuracy_min": "pers_accuracy_min",
    "pers/accuracy_p10": "pers_accuracy_p10", "pers/accuracy_median": "pers_accuracy_median",
    "pers/accuracy_max": "pers_accuracy_max", "pers/loss": "pers_loss", "pers/macro_f1": "pers_macro_f1",
    "pers/clients": "pers_clients",
    "pers_fair/jain": "pers_fair_jain", "pers_fair/worst10": "pers_fair_worst10",
    "pers_fair/best10": "pers_fair_best10", "pers_fair/std": "pers_fair_std",
    "update/norm_mean": "update_norm_mean", "update/norm_max": "update_norm_max",
    "update/aggregate_norm": "aggregate_norm", "update/cosine_mean": "cosine_mean",
}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one round (a `rounds` row, or a callback's event): the numbers it has."""
    metrics = row.get("metrics") or {}
    values = {tag: row.get(col) for tag, col in ROUND_SCALARS.items()}
    values |= {tag: metrics.get(key) for tag, key in METRIC_SCALARS.items()}
    return {tag: v for tag, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _config_text(config: dict[str, Any]) -> str:
    return f"```\n{json.dumps(config, indent=2)}\n```"


def write_tensorboard(store: RunStore, run_id: str, log_dir: Path) -> Path:
    """Write every recorded scalar with global_step = round into `log_dir`; returns `log_dir`.

    Event files of an earlier export into the same directory are removed first: each export holds the
    whole run, and TensorBoard would otherwise draw every round twice. Values a round lacks (rounds not
    evaluated, metrics an older run did not record) are skipped.
    """
    rec = store.get_run(run_id)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text("run/config", _config_text(rec.config), global_step=0)
        for row in store.rounds(rec.run_id):
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, global_step=row["round"], walltime=row["finished_at"])
    finally:
        writer.close()
    return log_dir


class LiveTensorBoard:
    """Writes each round's scalars into `log_dir` as the run records it (flushed every round).

    Started at round `start` > 1 (a resume), it purges the steps from `start` on that an earlier attempt wrote,
    so TensorBoard shows each round once."""

    def __init__(self, log_dir: Path, start: int, config: dict[str, Any]):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start if start > 1 else None)
        if start <= 1:
            self.writer.add_text("run/config", _config_text(config), global_step=0)

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.time()
        for tag, value in scalars(event).items():
            self.writer.add_scalar(tag, value, global_step=event["round"], walltime=now)
        self.writer.flush()

    def then(self, callback: Callable[[dict[str, Any]], Any] | None) -> Callable[[dict[str, Any]], Any]:
        """A callback that writes the round, then calls `callback` and passes on what it returns (a stop)."""

        def both(event: dict[str, Any]) -> Any:
            self(event)
            return callback(event) if callback is not None else None

        return both

    def close(self) -> None:
        self.writer.close()
