"""The Python API: everything the CLI does, callable from Python.

    import fedloom
    result = fedloom.run("quickstart", rounds=5)
    print(result.summary["final_accuracy"], result.report)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import secrets
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
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
from .errors import ConfigError, FedloomError, RunError, RunInterrupted
from .models import build_model
from .plugins import load_plugins, ship_by_value
from .rng import derive_seed
from .rounds import Callback, Federation
from .store import RunRecord, RunStore

RESUMABLE = ("running", "interrupted", "failed", "diverged")
NAME_MAX = 64  # characters of the experiment name kept in a run id (the run folder's name)
# what load_dataset raises for a dataset name or `data.options` the loader does not take: configuration, not data
@dataclass
class RunResult:
    """A run's outcome (`fedloom.run`, `resume`, `load`): status, summary, files; and its recorded metrics,
    read from the run store when first asked for: `rounds` (one dict per round, `metrics` holding the rest),
    `clients` (one dict per client, round and kind: fit / eval / personal) and `to_pandas()`."""

    run_id: str
    status: str
    message: str | None
    summary: dict[str, Any]
    output_dir: Path
    report: Path | None

    @cached_property
    def rounds(self) -> list[dict[str, Any]]:
        with self._store() as store:
            return store.rounds(self.run_id)

    @cached_property
    def clients(self) -> list[dict[str, Any]]:
        with self._store() as store:
            return store.client_rounds(self.run_id)

    def to_pandas(self) -> tuple[Any, Any]:
        """(rounds, clients) as pandas DataFrames, each `metrics` dict spread into columns (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("RunResult.to_pandas() needs pandas, which is not installed: pip install pandas "
                              "(result.rounds and result.clients hold the same data as lists of dicts)") from None
        return pd.DataFrame(_flat(self.rounds)), pd.DataFrame(_flat(self.clients))

    @contextmanager
    def _store(self) -> Iterator[RunStore]:
        store = RunStore(self.summary["store"], readonly=True)
        try:
            yield store
        finally:
            store.close()


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its `metrics` spread into columns (`metrics.<key>` where a key is also a column)."""
    out = []
    for row in rows:
        flat = {k: v for k, v in row.items() if k != "metrics"}
        for k, v in (row.get("metrics") or {}).items():
            flat[f"metrics.{k}" if k in row else k] = v
        out.append(flat)
    return out


def resolve_runs_dir(path: str | os.PathLike | None = None) -> Path:
    _expect("runs_dir", path, (str, os.PathLike, type(None)), "a folder path")
    return Path(path or os.environ.get("FEDLOOM_RUNS_DIR") or "runs")


def open_store(path: str | os.PathLike | None = None, *, readonly: bool = False) -> RunStore:
    """The run store under `path`; commands that only read open it `readonly` (works on a read-only folder)."""
    return RunStore(resolve_runs_dir(path) / "fedloom.db", readonly=readonly)


def _expect(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    """Refuse a Python API argument of the wrong type with a ConfigError naming it (a bool is no number)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{name} must be {what}, not {type(value).__name__} {value!r}")


def slug(name: str) -> str:
    """A safe folder name for an experiment name, whatever the user wrote: ASCII letters, digits, '.', '_' and
    '-' only, no leading dot or dash (so never '..' or a hidden folder), at most NAME_MAX characters."""
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_).lstrip(".-")[:NAME_MAX].rstrip(".-")
    return safe or "run"


def versions() -> dict[str, str]:
    return {"fedloom": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


def prepare(cfg: ExperimentConfig) -> tuple[FederatedData, Callable[[], torch.nn.Module]]:
    """Load and partition the data, and make the seeded model factory the run will use."""
    from .models.zoo import MODELS, check_model

    d = cfg.data
    # a name or option the config got wrong is a ConfigError (exit 2); a missing or damaged file a DatasetError
    dataset = load_dataset(d.dataset, data_dir=d.data_dir, seed=cfg.run.seed, download=d.download, path=d.path,
                           **d.options)
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

    if MODELS[cfg.model.name].registered:  # the user's model: one line now if it cannot take this data
        check_model(cfg.model.name, model_factory(), dataset.features(dataset.x_train[:2]), dataset.num_classes)
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
    plugins: list[str] | None = None,
    tensorboard: bool | None = None,
    sweep_id: str | None = None,
) -> RunResult:
    """Run a federated experiment from a TOML file, preset name, dict or config object.

    The run id (and default folder) is the experiment name made safe for a folder name (`slug`), the time and
    a random suffix. Ctrl-C raises `RunInterrupted` (a KeyboardInterrupt) once the run is marked interrupted.
    `plugins` (module names or .py paths, relative to the current folder) are loaded before the experiment is
    validated and recorded with it, so a resume loads them again; `tensorboard` sets `eval.tensorboard`;
    `sweep_id` is set by `fedloom.sweep`. A `callback` gets one dict per round (docs/guide.md, "Callbacks")
    and may stop the run by returning `fedloom.STOP` or raising `fedloom.StopRun(reason)`."""
    _expect("output_dir", output_dir, (str, os.PathLike, type(None)), "a folder path")
    _expect("tensorboard", tensorboard, (bool, type(None)), "True, False or None")
    _expect("sweep_id", sweep_id, (str, type(None)), "a sweep id (str)")
    _check_callback(callback, make_report)
    loaded = load_plugins(plugins)  # before the experiment is validated: it may name what they register
    extra = dict(overrides) if isinstance(overrides, dict) else {}
    cfg = load_config(config, overrides if not isinstance(overrides, dict) else None)
    if loaded:
        extra["plugins"] = [*cfg.plugins, *(p for p in loaded if p not in cfg.plugins)]
    for key, value in (("run.rounds", rounds), ("run.seed", seed), ("run.engine", engine),
                       ("eval.tensorboard", tensorboard)):
        if value is not None:
            extra[key] = value
    if extra:
        cfg = load_config(cfg, extra)
    store = open_store(runs_dir)
    _set_threads(cfg)
    data, model_factory = prepare(cfg)
    run_id = f"{slug(cfg.name)}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    out = Path(output_dir) if output_dir else store.path.parent / run_id
    if (out / "config.json").exists() or (out / "checkpoints").exists():  # never mix two runs' files
        raise ConfigError(f"output folder {out} already holds a run (config.json or checkpoints/ in it)",
                          "choose a new or empty folder; continue that run with `fedloom resume RUN_ID`")
    fed = _federation(cfg, data, model_factory, store, run_id, out)  # may refuse: before anything is written
    try:
        with run_lock(out, run_id):
            _write_file(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
            counts = data.label_counts("train")
            clients = [(c.id, len(c.train_idx), len(c.test_idx), [int(v) for v in counts[c.id]])
                       for c in data.clients]
            store.create_run(run_id, cfg.name, cfg.model_dump(mode="json"), cfg.run.seed, versions(),
                             str(out.resolve()), cfg.run.rounds, clients, sweep_id=sweep_id)
            return _drive(fed, store, run_id, 1, 0.0, callback, make_report)
    finally:
        fed.engine.close()  # closed by _drive already, unless something failed before it


def resume(run_id: str, *, rounds: int | None = None, runs_dir: str | os.PathLike | None = None,
           callback: Callback | None = None, make_report: bool = True, from_scratch: bool = False,
           plugins: list[str] | None = None, tensorboard: bool | None = None) -> RunResult:
    """Continue a run from its last checkpointed round (or extend a finished one with `rounds`).

    A run whose newest checkpoint file is gone is refused rather than retrained over its recorded rounds;
    `from_scratch=True` says to retrain it from round 1, replacing them. While a run or resume trains, the run
    is locked: a second resume of it is refused. The plug-ins its config names are loaded again; `plugins`
    adds others (for this process only)."""
    _expect("run_id", run_id, (str,), "a run id (str)")
    _expect("rounds", rounds, (int, type(None)), "a number of rounds (int)")
    _expect("from_scratch", from_scratch, (bool,), "True or False")
    _expect("tensorboard", tensorboard, (bool, type(None)), "True, False or None")
    _check_callback(callback, make_report)
    load_plugins(plugins)
    again = {"run.rounds": rounds, "eval.tensorboard": tensorboard}
    store = open_store(runs_dir)
    rec = store.get_run(run_id)
    _check_resumable(rec, rounds, from_scratch)
    _resume_point(store, rec, from_scratch)  # a missing checkpoint is refused before anything else happens
    with run_lock(Path(rec.output_dir), rec.run_id):
        rec = store.get_run(rec.run_id)  # as it is now that no one else trains it
        _check_resumable(rec, rounds, from_scratch)
        cfg = load_config(rec.config, {k: v for k, v in again.items() if v is not None} or None)
        last, ckpt = _resume_point(store, rec, from_scratch)
        _set_threads(cfg)
        data, model_factory = prepare(cfg)
        fed = _federation(cfg, data, model_factory, store, rec.run_id, Path(rec.output_dir))
        try:
            if from_scratch:
                for old in (Path(rec.output_dir) / "checkpoints").glob("round-*"):
                    old.unlink(missing_ok=True)
            store.truncate_after(rec.run_id, last)
            if ckpt:
                fed.load_checkpoint(ckpt)
            if rounds is not None:
                store.set_rounds_planned(rec.run_id, cfg.run.rounds)
            store.set_status(rec.run_id, "running", None)
            return _drive(fed, store, rec.run_id, last + 1, 0.0 if from_scratch else rec.wall_seconds, callback,
                          make_report)
        finally:
            fed.engine.close()  # closed by _drive already, unless something failed before it


def _check_resumable(rec: RunRecord, rounds: int | None, from_scratch: bool) -> None:
    if from_scratch:
        return
    if rounds is not None and rounds < rec.rounds_completed:
        raise RunError(f"run {rec.run_id} has {rec.rounds_completed} rounds recorded; --rounds {rounds} would end "
                       "it before them", f"pass --rounds {rec.rounds_completed} or more")
    if rec.status not in RESUMABLE and not (rounds and rounds > rec.rounds_completed):
        raise RunError(f"run {rec.run_id} is {rec.status} after {rec.rounds_completed} rounds; nothing to resume",
                       "pass --rounds N with N larger to train it further")


def _resume_point(store: RunStore, rec: RunRecord, from_scratch: bool) -> tuple[int, str | None]:
    """(round, checkpoint) to continue from: the newest recorded checkpoint. Rounds recorded after it (with
    `checkpoint_every` > 1) are trained again, from the same seeds, to the same results; with no checkpoint
    recorded yet the run starts over from the seeded initial model. A recorded checkpoint whose file is gone
    is refused: retraining from round 1 would silently replace the history the store holds."""
    rows = [r for r in store.rounds(rec.run_id) if r["checkpoint"]]
    if from_scratch or not rows:
        return 0, None
    last = rows[-1]
    if Path(last["checkpoint"]).is_file():
        return last["round"], last["checkpoint"]
    raise RunError(
        f"run {rec.run_id} cannot resume: the checkpoint of round {last['round']}, {last['checkpoint']}, is missing, "
        f"and without it the {rec.rounds_completed} recorded rounds would be trained again from round 1",
        f"put the file back; or `fedloom resume {rec.run_id} --from-scratch` to retrain from round 1, replacing them; "
        "or start a new run with `fedloom run`")


@contextmanager
def run_lock(folder: Path, run_id: str) -> Iterator[None]:
    """Hold `<run folder>/.lock` (flock) while a run trains, so a second `run`/`resume` of it is refused. The
    kernel drops the lock when the process ends, however it ends."""
    path = folder / ".lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot lock run {run_id}: {path}: {e.strerror}",
                       "the run folder must be writable to train; pass --runs-dir with a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"cannot lock run {run_id}: {path}: {e.strerror}") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise RunError(f"run {run_id} is being trained by another process"
                           + (f" (pid {holder})" if holder.isdigit() else ""),
                           "wait for it to finish, or stop it (Ctrl-C) and resume again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _drive(fed: Federation, store: RunStore, run_id: str, start: int, wall_before: float,
           callback: Callback | None, make_report: bool) -> RunResult:
    t0 = time.perf_counter()
    live = None
    if fed.cfg.eval.tensorboard:  # written as the rounds are recorded, next to the run's other files
        from .reporting.tensorboard import LiveTensorBoard

        live = LiveTensorBoard(fed.out_dir / "tensorboard", start, store.get_run(run_id).config)
        callback = live.then(callback)
    try:
        status, message = fed.train(start, wall_before, callback)
        if status == "stopped":
            message = f"{message}; train it further with `fedloom resume {run_id} --rounds N`"
    except KeyboardInterrupt:
        done = store.get_run(run_id).rounds_completed
        _record_stop(store, run_id, "interrupted", f"stopped by the user after round {done}; "
                     f"continue with `fedloom resume {run_id}`")
        raise RunInterrupted(run_id, done) from None
    except OSError as e:  # a checkpoint or file that could not be written: say which, and how to go on
        err = _write_error(e, f"free some space or fix the folder, then `fedloom resume {run_id}`")
        _record_stop(store, run_id, "failed", err.message)
        raise err from None
    except Exception as e:
        msg = e.message if isinstance(e, FedloomError) else f"{type(e).__name__}: {e}"
        _record_stop(store, run_id, "failed", msg)
        raise
    finally:
        fed.engine.close()
        fed.close()
        if live is not None:
            live.close()
    store.set_status(run_id, status, message, wall_seconds=wall_before + time.perf_counter() - t0)
    summary = write_summary(store, run_id)
    report_path = report(run_id, runs_dir=store.path.parent) if make_report else None
    out = Path(store.get_run(run_id).output_dir)
    return RunResult(run_id, status, message, summary, out, report_path)


def _record_stop(store: RunStore, run_id: str, status: str, message: str) -> None:
    """Record why a run stopped, as far as the store and disk allow: a full disk must not hide the first error."""
    with suppress(FedloomError):
        store.set_status(run_id, status, message)
        write_summary(store, run_id)


def _check_callback(callback: Any, make_report: Any) -> None:
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback must be a function taking one dict per round, not {type(callback).__name__}")
    _expect("make_report", make_report, (bool,), "True or False")


def _write_error(e: OSError, hint: str) -> RunError:
    """One line for a failed write, naming the file; the temporary file it was writing is removed."""
    name = e.filename or "a file"
    if isinstance(name, str) and name.endswith(".tmp"):
        with suppress(OSError):
            os.unlink(name)
        name = name.removesuffix(".tmp")
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    return RunError(f"cannot write {name}: {why}", hint)


def _write_file(path: Path, text: str) -> None:
    """Write through a temporary file and a rename (a reader never sees half a file); on failure the temporary
    file is removed and the error names the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        raise _write_error(e if e.filename else OSError(e.errno, e.strerror, str(path)),
                           "free some space, or pass --output-dir / --runs-dir with a writable folder") from None


def _federation(cfg: ExperimentConfig, data: FederatedData, model_factory: Callable[[], torch.nn.Module],
                store: RunStore, run_id: str, out: Path) -> Federation:
    """The run's Federation with its engine; if the engine refuses the experiment, the engine is closed (a local
    Ray it started does not stay up) and the refusal raised."""
    engine = build_engine(cfg.run.engine, cfg)
    ship_by_value()  # plug-ins loaded from files, to Ray's workers
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
    best_ckpt = store.best_checkpoint(rec.run_id)
    return {
        "run_id": rec.run_id, "name": rec.name, "status": rec.status, "message": rec.message,
        "algorithm": rec.algorithm, "dataset": rec.dataset, "partition": rec.partition, "sweep_id": rec.sweep_id,
        "seed": rec.seed, "rounds_completed": rec.rounds_completed, "rounds_planned": rec.rounds_planned,
        "final_accuracy": last["test_accuracy"] if last else None,
        "final_loss": last["test_loss"] if last else None,
        "final_macro_f1": last["test_macro_f1"] if last else None,
        "best_accuracy": best["test_accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "final_fed_accuracy": last["metrics"].get("fed_accuracy") if last else None,
        # personalized models on their clients' own splits: mean, and the 10th percentile over clients
        "final_pers_accuracy": last["metrics"].get("pers_accuracy") if last else None,
        "final_pers_accuracy_p10": last["metrics"].get("pers_accuracy_p10") if last else None,
        "wall_seconds": rec.wall_seconds,
        "seconds_per_round": rec.wall_seconds / rec.rounds_completed if rec.rounds_completed else None,
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "checkpoint": ckpts[-1] if ckpts else None,
        "best_checkpoint": best_ckpt if best_ckpt and Path(best_ckpt).is_file() else None,
        "output_dir": str(out_dir), "store": str(store.path.resolve()),
    }


def write_summary(store: RunStore, run_id: str) -> dict[str, Any]:
    summary = summarize(store, run_id)
    _write_file(Path(summary["output_dir"]) / "summary.json", json.dumps(summary, indent=2))
    return summary


def runs(runs_dir: str | os.PathLike | None = None, limit: int | None = None, *, status: str | None = None,
         algorithm: str | None = None, dataset: str | None = None, sweep: str | None = None,
         name: str | None = None) -> list[RunRecord]:
    """Recorded runs, newest first: those matching every filter given (status, algorithm and dataset exactly,
    `sweep` an id or its prefix, `name` a substring of the experiment name), at most `limit` of them. Each
    record has `.algorithm`, `.dataset`, `.partition` and `.sweep_id`; `fedloom.load(rec.run_id)` its metrics."""
    _expect("limit", limit, (int, type(None)), "a number of runs (int)")
    for key, value in (("status", status), ("algorithm", algorithm), ("dataset", dataset), ("sweep", sweep),
                       ("name", name)):
        _expect(key, value, (str, type(None)), "a string")
    store = open_store(runs_dir, readonly=True)
    try:
        records = store.list_runs(None if any((status, algorithm, dataset, sweep, name)) else limit)
    finally:
        store.close()
    keep = [r for r in records
            if (status is None or r.status == status) and (algorithm is None or r.algorithm == algorithm)
            and (dataset is None or r.dataset == dataset) and (name is None or name in r.name)
            and (sweep is None or (r.sweep_id or "").startswith(sweep))]
    return keep[:limit] if limit else keep


def load(run_id: str, runs_dir: str | os.PathLike | None = None) -> RunResult:
    """A past run as a `RunResult` (a unique prefix of its id is enough): status, summary, files, and its
    `rounds`, `clients` and `to_pandas()`, as `fedloom.run` returns them."""
    _expect("run_id", run_id, (str,), "a run id (str)")
    store = open_store(runs_dir, readonly=True)
    try:
        rec = store.get_run(run_id)
        summary = summarize(store, rec.run_id)
    finally:
        store.close()
    out = Path(rec.output_dir)
    report_path = out / "report.html"
    return RunResult(rec.run_id, rec.status, rec.message, summary, out,
                     report_path if report_path.is_file() else None)


def show(run_id: str, runs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    _expect("run_id", run_id, (str,), "a run id (str)")
    store = open_store(runs_dir, readonly=True)
    rec = store.get_run(run_id)
    return {"summary": summarize(store, rec.run_id), "config": rec.config, "rounds": store.rounds(rec.run_id)}


def report(run_id: str, *, runs_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
           tensorboard: bool = False) -> Path:
    """Write the HTML report (and TensorBoard event files on request); returns the report path. Reads the store
    read-only; a folder it cannot write is named, with the way out (`out_dir`)."""
    from .reporting import write_report, write_tensorboard  # matplotlib only when a report is asked for

    _expect("run_id", run_id, (str,), "a run id (str)")
    _expect("out_dir", out_dir, (str, os.PathLike, type(None)), "a folder path")
    _expect("tensorboard", tensorboard, (bool,), "True or False")
    store = open_store(runs_dir, readonly=True)
    rec = store.get_run(run_id)
    target = Path(out_dir) if out_dir else Path(rec.output_dir)
    try:
        path = write_report(store, rec.run_id, target)
        if tensorboard:
            write_tensorboard(store, rec.run_id, target / "tensorboard")
    except OSError as e:
        if not e.filename:
            e = OSError(e.errno, e.strerror, str(target))
        raise _write_error(e, "pass --output-dir (out_dir=) with a folder you can write") from None
    return path


@dataclass
class Comparison:
    """`compare`: one record per run (the table's numbers, JSON-ready), the HTML page, and a one-line warning
    when the runs are not comparable as they stand (different datasets)."""

    records: list[dict[str, Any]]
    html: Path
    warning: str | None = None


def compare(run_ids: list[str], *, runs_dir: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None) -> Comparison:
    """Compare 2+ runs against the first: accuracy (final = mean of the last 5 evaluated rounds), bytes up and
    down and their reduction factor, wall time; and an HTML page with the runs' accuracy curves overlaid."""
    from .reporting.compare import compare_runs  # matplotlib only when a comparison is asked for

    _expect("run_ids", run_ids, (list, tuple), "a list of run ids (str)")
    for run_id in run_ids:
        _expect("run_ids", run_id, (str,), "a list of run ids (str)")
    _expect("out", out, (str, os.PathLike, type(None)), "a file path")
    store = open_store(runs_dir, readonly=True)
    try:
        records, html, warning = compare_runs(store, list(run_ids), Path(out) if out else None)
    except OSError as e:
        raise _write_error(e, "pass --output (out=) with a file in a folder you can write") from None
    finally:
        store.close()
    return Comparison(records, html, warning)


def diagnose(run_id: str, runs_dir: str | os.PathLike | None = None) -> Diagnosis:
    """Explain what went wrong in a run (drift, skew, divergence, unfairness...), with the numbers and remedies."""
    _expect("run_id", run_id, (str,), "a run id (str)")
    return diagnose_run(open_store(runs_dir, readonly=True), run_id)


def datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    out = []
    for name in DATASETS:
        where, note = dataset_status(name, data_dir)
        out.append({"name": name, "status": where, "note": note})
    return out
