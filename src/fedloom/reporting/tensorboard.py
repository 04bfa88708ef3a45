"""TensorBoard event files of one run, written from the run store after the fact.

Training never writes TensorBoard itself: the store is the record, and this view of it can be
regenerated at any time, also for a run that failed or was killed.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    "update/norm_mean": "update_norm_mean", "update/norm_max": "update_norm_max",
    "update/aggregate_norm": "aggregate_norm", "update/cosine_mean": "cosine_mean",
}


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
        writer.add_text("run/config", f"```\n{json.dumps(rec.config, indent=2)}\n```", global_step=0)
        for row in store.rounds(rec.run_id):
            values = {tag: row[col] for tag, col in ROUND_SCALARS.items()}
            values |= {tag: row["metrics"].get(key) for tag, key in METRIC_SCALARS.items()}
            for tag, value in values.items():
                if isinstance(value, int | float):
                    writer.add_scalar(tag, value, global_step=row["round"], walltime=row["finished_at"])
    finally:
        writer.close()
    return log_dir
