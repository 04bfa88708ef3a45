"""The Python API: everything the CLI does, callable from Python.

    import fedloom
    result = fedloom.run("quickstart", rounds=5)
    print(result.summary["final_accuracy"], result.report)
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import ExperimentConfig, load_config
from .data.datasets import DATASETS, dataset_status, load_dataset
from .data.federated import FederatedData, federate
from .diagnosis import Diagnosis
from .diagnosis import diagnose as diagnose_run
from .engines import build_engine
from .engines.base import usable_cores
from .errors import ConfigError, FedloomError, RunError
from .models import build_model
from .rng import derive_seed
from .rounds import Callback, Federation
from .store import RunRecord, RunStore

RESUMABLE = ("running", "interrupted", "failed", "diverged")


@dataclass
class RunResult:
    run_id: str
    status: str
    message: str | None
    summary: dict[str, Any]
    output_dir: Path
    report: Path | None


def resolve_runs_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("FEDLOOM_RUNS_DIR") or "runs")


def open_store(path: str | os.PathLike | None = None) -> RunStore:
    return RunStore(resolve_runs_dir(path) / "fedloom.db")


def versions() -> dict[str, str]:
    return {"fedloom": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


def prepare(cfg: ExperimentConfig) -> tuple[FederatedData, Callable[[], torch.nn.Module]]:
    """Load and partition the data, and make the seeded model factory the run will use."""
    d = cfg.data
    dataset = load_dataset(d.dataset, data_dir=d.data_dir, seed=cfg.run.seed, download=d.download, **d.options)
    try:
        data = federate(
            dataset, d.num_clients, d.partition, seed=cfg.run.seed, alpha=d.alpha,
            classes_per_client=d.classes_per_client, beta=d.beta, noise_sigma=d.noise_sigma, min_size=d.min_size,
            client_test=d.client_test, holdout_fraction=d.holdout_fraction,
        )
    except ValueError as e:  # an impossible partition request: the message says which knob to turn
        raise ConfigError(f"cannot partition {d.dataset} as asked: {e}") from None
    init_seed = derive_seed(cfg.run.seed, "model-init")

    def model_factory() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
            torch.manual_seed(init_seed)
            return build_model(cfg.model.name, dataset.input_shape, dataset.num_classes)

    return data, model_factory


def run(
    config: str | os.PathLike | dict | ExperimentConfig,
    *,
    rounds: int | None = None,
    seed: int | None = None,
    engine: str | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    runs_dir: str | os.PathLike | None = None,
    callback: Callback | None = None,
    make_report: bool = True,
) -> RunResult:
    """Run a federated experiment from a TOML file, preset name, dict or config object."""
    extra = dict(overrides) if isinstance(overrides, dict) else {}
    cfg = load_config(config, overrides if not isinstance(overrides, dict) else None)
    for key, value in (("run.rounds", rounds), ("run.seed", seed), ("run.engine", engine)):
        if value is not None:
            extra[key] = value
    if extra:
        cfg = load_config(cfg, extra)
    store = open_store(runs_dir)
    _set_threads(cfg)
    data, model_factory = prepare(cfg)
    run_id = f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    out = Path(output_dir) if output_dir else store.path.parent / run_id
    fed = _federation(cfg, data, model_factory, store, run_id, out)  # may refuse: before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    counts = data.label_counts("train")
    clients = [(c.id, len(c.train_idx), len(c.test_idx), [int(v) for v in counts[c.id]]) for c in data.clients]
    store.create_run(run_id, cfg.name, cfg.model_dump(mode="json"), cfg.run.seed, versions(), str(out.resolve()),
                     cfg.run.rounds, clients)
    return _drive(fed, store, run_id, 1, 0.0, callback, make_report)


def resume(run_id: str, *, rounds: int | None = None, runs_dir: str | os.PathLike | None = None,
           callback: Callback | None = None, make_report: bool = True) -> RunResult:
    """Continue a run from its last checkpointed round (or extend a finished one with `rounds`)."""
    store = open_store(runs_dir)
    rec = store.get_run(run_id)
    cfg = load_config(rec.config, {"run.rounds": rounds} if rounds else None)
    if rec.status not in RESUMABLE and not (rounds and rounds > rec.rounds_completed):
        raise RunError(f"run {rec.run_id} is {rec.status} after {rec.rounds_completed} rounds; nothing to resume",
                       "pass --rounds N with N larger to train it further")
    last, ckpt = _last_good_checkpoint(store, rec)
    _set_threads(cfg)
    data, model_factory = prepare(cfg)
    fed = _federation(cfg, data, model_factory, store, rec.run_id, Path(rec.output_dir))
    store.truncate_after(rec.run_id, last)
    if ckpt:
        fed.load_checkpoint(ckpt)
    if rounds:
        store.set_rounds_planned(rec.run_id, cfg.run.rounds)
    store.set_status(rec.run_id, "running", None)
    return _drive(fed, store, rec.run_id, last + 1, rec.wall_seconds, callback, make_report)


def _last_good_checkpoint(store: RunStore, rec: RunRecord) -> tuple[int, str | None]:
    for r in reversed(store.rounds(rec.run_id)):
        if r["checkpoint"] and Path(r["checkpoint"]).is_file():
            return r["round"], r["checkpoint"]
    return 0, None  # no checkpoint yet: start over from the seeded initial model


def _drive(fed: Federation, store: RunStore, run_id: str, start: int, wall_before: float,
           callback: Callback | None, make_report: bool) -> RunResult:
    t0 = time.perf_counter()
    try:
        status, message = fed.train(start, wall_before, callback)
    except KeyboardInterrupt:
        done = store.get_run(run_id).rounds_completed
        store.set_status(run_id, "interrupted", f"stopped by the user after round {done}; "
                         f"continue with `fedloom resume {run_id}`")
        write_summary(store, run_id)
        raise
    except Exception as e:
        msg = e.message if isinstance(e, FedloomError) else f"{type(e).__name__}: {e}"
        store.set_status(run_id, "failed", msg)
        write_summary(store, run_id)
        raise
    finally:
        fed.engine.close()
    store.set_status(run_id, status, message, wall_seconds=wall_before + time.perf_counter() - t0)
    summary = write_summary(store, run_id)
    report_path = report(run_id, runs_dir=store.path.parent) if make_report else None
    out = Path(store.get_run(run_id).output_dir)
    return RunResult(run_id, status, message, summary, out, report_path)


def _federation(cfg: ExperimentConfig, data: FederatedData, model_factory: Callable[[], torch.nn.Module],
                store: RunStore, run_id: str, out: Path) -> Federation:
    """The run's Federation with its engine; if the engine refuses the experiment, the engine is closed (a local
    Ray it started does not stay up) and the refusal raised."""
    engine = build_engine(cfg.run.engine, cfg)
    try:
        return Federation(cfg, data, model_factory, engine, store, run_id, out)
    except BaseException:
        engine.close()
        raise


def _set_threads(cfg: ExperimentConfig) -> None:
    torch.set_num_threads(cfg.run.threads or usable_cores())


# ---- reading runs -----------------------------------------------------------------------------------

def summarize(store: RunStore, run_id: str) -> dict[str, Any]:
    rec = store.get_run(run_id)
    rows = store.rounds(rec.run_id)
    evals = [r for r in rows if r["test_accuracy"] is not None]
    best = max(evals, key=lambda r: r["test_accuracy"], default=None)
    last = evals[-1] if evals else None
    out_dir = Path(rec.output_dir)
    ckpts = [r["checkpoint"] for r in rows if r["checkpoint"]]
    return {
        "run_id": rec.run_id, "name": rec.name, "status": rec.status, "message": rec.message,
        "seed": rec.seed, "rounds_completed": rec.rounds_completed, "rounds_planned": rec.rounds_planned,
        "final_accuracy": last["test_accuracy"] if last else None,
        "final_loss": last["test_loss"] if last else None,
        "final_macro_f1": last["test_macro_f1"] if last else None,
        "best_accuracy": best["test_accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "final_fed_accuracy": last["metrics"].get("fed_accuracy") if last else None,
        "wall_seconds": rec.wall_seconds,
        "seconds_per_round": rec.wall_seconds / rec.rounds_completed if rec.rounds_completed else None,
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "checkpoint": ckpts[-1] if ckpts else None,
        "output_dir": str(out_dir), "store": str(store.path.resolve()),
    }


def write_summary(store: RunStore, run_id: str) -> dict[str, Any]:
    summary = summarize(store, run_id)
    path = Path(summary["output_dir"]) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return summary


def runs(runs_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[RunRecord]:
    return open_store(runs_dir).list_runs(limit)


def show(run_id: str, runs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    store = open_store(runs_dir)
    return {"summary": summarize(store, run_id), "config": store.get_run(run_id).config,
            "rounds": store.rounds(store.get_run(run_id).run_id)}


def report(run_id: str, *, runs_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
           tensorboard: bool = False) -> Path:
    """Write the HTML report (and TensorBoard event files on request); returns the report path."""
    from .reporting import write_report, write_tensorboard  # matplotlib only when a report is asked for

    store = open_store(runs_dir)
    rec = store.get_run(run_id)
    target = Path(out_dir) if out_dir else Path(rec.output_dir)
    path = write_report(store, rec.run_id, target)
    if tensorboard:
        write_tensorboard(store, rec.run_id, target / "tensorboard")
    return path


def diagnose(run_id: str, runs_dir: str | os.PathLike | None = None) -> Diagnosis:
    """Explain what went wrong in a run (drift, skew, divergence, unfairness...), with the numbers and remedies."""
    return diagnose_run(open_store(runs_dir), run_id)


def datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    out = []
    for name in DATASETS:
        where, note = dataset_status(name, data_dir)
        out.append({"name": name, "status": where, "note": note})
    return out
