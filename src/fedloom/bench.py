"""Engine benchmark: each engine against a hand-written PyTorch loop doing exactly the same FedAvg work.

    fedloom bench --tasks T1,T2 --json benchmarks/results/engines.json
    fedloom bench --tasks '' --scale          # only the population scale check

Why a plain loop: "s/round" alone says nothing about what the framework costs. The plain loop below is
what a researcher writes by hand (deep-copy the global model per client, fresh SGD, shuffle with the
client's generator, example-weighted average of the clients' changes, test every round), drawing the same
clients and the same per-client shuffles as fedloom, so it trains the same model: its final accuracy is
printed next to the sequential engine's, and every engine's final weights are compared with it.

Seconds per round are the median timed round: this kind of machine (2 vCPUs) has slow spells in which a
2-thread kernel takes twice as long, and `--repeat N` interleaves N measurements of everything so that
they fall on all the contenders alike.

Each measurement (the plain loop, and every engine) runs in a fresh process (`python -m fedloom.bench
--one`), so its peak RSS is its own and not the sum of everything before it; engines with worker
processes (parallel, ray) add their largest reaped child (`RUSAGE_CHILDREN`): an upper bound, since a
forked worker's peak counts the pages it shares with its parent. Rounds 1..warmup are not timed
(imports, allocator, thread pools).
Timed rounds of an engine are the intervals between fedloom's per-round callbacks, so they include
what a round costs in fedloom beyond training and evaluation: checkpoint, run-store transaction.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__, api
from .config import ExperimentConfig, load_config
from .data.federated import FederatedData
from .engines import ENGINES
from .engines.base import usable_cores
from .errors import ConfigError, DatasetError, FedloomError
from .params import load_tensors
from .rng import numpy_rng, torch_rng

DEFAULT_ENGINES = ("sequential", "parallel", "vectorized", "ray")
DEFAULT_POPULATIONS = (1_000, 100_000)
WORKER_ENGINES = ("parallel", "ray")  # their peak RSS adds the largest worker's
RSS_TARGET = 1.2  # peak RSS at the largest population / at the smallest


@dataclass(frozen=True)
class BenchTask:
    """A named experiment to time; `config` is a full fedloom config dict (rounds and engine are set per run).

    `eval_every`: centralized test every this many rounds; None: only after the last round.
    """

    key: str
    label: str
    config: dict[str, Any] = field(hash=False)
    eval_every: int | None = 1


def _config(dataset: str, clients: int, partition: dict[str, Any], model: str, batch: int, lr: float,
            momentum: float, per_round: int) -> dict[str, Any]:
    return {
        "data": {"dataset": dataset, "num_clients": clients, **partition},
        "model": {"name": model},
        "train": {"local_epochs": 1, "batch_size": batch, "lr": lr, "momentum": momentum},
        "server": {"algorithm": "fedavg", "clients_per_round": per_round},
        "eval": {"every": 1, "federated": False},  # centralized test every round; no per-client pass
        "run": {"seed": 0},
    }


_T2 = _config("fashion-mnist", 10_000, {"partition": "iid", "min_size": 1}, "mlp", 10, 0.01, 0.0, 100)
TASKS: dict[str, BenchTask] = {t.key: t for t in (
    BenchTask("T1", "Fashion-MNIST, 100 clients Dir(0.5), 10/round, simple-cnn, E=1 B=32 SGD 0.01 m0.9, test every "
              "round", _config("fashion-mnist", 100, {"partition": "dirichlet", "alpha": 0.5}, "simple-cnn", 32, 0.01,
                               0.9, 10)),
    # cross-device: the T2 names no per-round evaluation (T1 does), so T2 tests after the last round only
    # and times client work; T2e adds T1's test every round, a fixed cost the same in the plain loop and fedloom
    BenchTask("T2", "Fashion-MNIST, 10,000 IID clients (6 samples), 100/round, mlp, E=1 B=10 SGD 0.01, test after "
              "the last round", _T2, eval_every=None),
    BenchTask("T2e", "T2 with a test every round", _T2),
    # a seconds-long smoke task (bundled data): what the tests and a quick check use
    BenchTask("tiny", "digits, 20 clients Dir(0.5), 5/round, mlp, E=1 B=16 SGD 0.05 m0.9",
              _config("digits", 20, {"partition": "dirichlet", "alpha": 0.5, "min_size": 5}, "mlp", 16, 0.05, 0.9,
                      5)),
)}


# ---- the plain loop -------------------------------------------------------------------------------------

def _plain_supported(cfg: ExperimentConfig) -> None:
    t, s = cfg.train, cfg.server
    why = ("server.algorithm is not fedavg" if s.algorithm != "fedavg" else
           "the server optimizer is not plain averaging" if (s.optimizer, s.lr, s.momentum) != ("sgd", 1.0, 0.0) else
           "train.local_steps is set" if t.local_steps else
           "local work varies per client" if t.local_epochs_max or t.straggler_fraction else
           "train.lr_schedule is not constant" if t.lr_schedule != "constant" else
           "the partition adds feature noise" if cfg.data.partition == "feature-noise" else None)
    if why:
        raise ConfigError(f"the plain PyTorch loop covers FedAvg with fixed local epochs only: {why}")


def plain_fedavg(cfg: ExperimentConfig, data: FederatedData, model_factory: Callable[[], torch.nn.Module],
                 warmup: int) -> dict[str, Any]:
    """FedAvg as written by hand in PyTorch; same clients, shuffles and averaging weights as fedloom.

    The average is taken over the clients' changes (global + sum_k n_k/n (w_k - global)), which is the same
    model as averaging the clients' weights but rounds like fedloom does: the comparison is then exact
    (bit-identical on T1 with the sequential engine), whereas weight averaging drifts by rounding that a
    max-pooling CNN amplifies over rounds (T1: |dw| ~1e-3 and a few test images after 6 rounds).
    """
    ds, t, seed = data.dataset, cfg.train, cfg.run.seed
    n, k = data.num_clients, cfg.clients_per_round()
    model = model_factory()
    stamps, samples, acc = [time.perf_counter()], [], float("nan")
    for r in range(1, cfg.run.rounds + 1):
        chosen = range(n) if k >= n else sorted(int(c) for c in numpy_rng(seed, "select", r).choice(n, k,
                                                                                                      replace=False))
        states, weights = [], []
        for c in chosen:
            idx = torch.as_tensor(data.clients[c].train_idx, dtype=torch.long)
            if len(idx) == 0:
                continue
            local = copy.deepcopy(model)
            local.train()
            opt = torch.optim.SGD(local.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            g = torch_rng(seed, "train", r, c)
            for _ in range(t.local_epochs):
                perm = idx[torch.randperm(len(idx), generator=g)]
                for s in range(0, len(perm), t.batch_size):
                    b = perm[s : s + t.batch_size]
                    loss = F.cross_entropy(local(ds.features(ds.x_train[b])), ds.y_train[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append(local.state_dict())
            weights.append(len(idx))
        total = sum(weights)
        glob = model.state_dict()
        model.load_state_dict({name: g + sum(w / total * (st[name] - g) for st, w in zip(states, weights, strict=True))
                               for name, g in glob.items()})
        if r % cfg.eval.every == 0 or r == cfg.run.rounds:  # when fedloom evaluates
            model.eval()
            with torch.no_grad():
                bs = cfg.eval.batch_size
                correct = sum(int((model(ds.features(ds.x_test[s : s + bs])).argmax(1) == ds.y_test[s : s + bs]).sum())
                              for s in range(0, len(ds.y_test), bs))
            acc = correct / len(ds.y_test)
        stamps.append(time.perf_counter())
        samples.append(total * t.local_epochs)
    return _timing(stamps, samples, warmup) | {
        "final_accuracy": acc, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _timing(stamps: list[float], samples: list[int], warmup: int) -> dict[str, Any]:
    """s/round and samples/s over the rounds after `warmup` (stamps[i]: end of round i, stamps[0]: start)."""
    per = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:]
    secs = sum(per)
    return {"round_seconds": per, "seconds_per_round": secs / len(per) if per else None,
            "median_seconds_per_round": statistics.median(per) if per else None,
            "samples_per_second": sum(samples[warmup:]) / secs if secs > 0 else None,
            "timed_rounds": len(per)}


# ---- one measurement ------------------------------------------------------------------------------------

def measure_engine(cfg: ExperimentConfig, warmup: int) -> dict[str, Any]:
    """Run `cfg` through `fedloom.run` and time its rounds after `warmup` from the per-round callbacks."""
    if warmup < 1:
        raise ConfigError("the warm-up must be at least one round: the first round's end starts the clock")
    stamps: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-") as tmp:
        res = api.run(cfg, runs_dir=tmp, make_report=False, callback=lambda ev: stamps.append(time.perf_counter()))
        store = api.open_store(tmp)
        try:
            rows = store.rounds(res.run_id)
            fits = store.client_rounds(res.run_id, "fit")
        finally:
            store.close()
        ckpt = res.summary.get("checkpoint")
        params = ({k[len("model/"):]: v for k, v in load_tensors(ckpt).items() if k.startswith("model/")}
                  if ckpt else None)
    samples = [0] * len(rows)
    for f in fits:
        samples[f["round"] - 1] += f["num_examples"] * cfg.train.local_epochs
    # stamps[0] is the end of round 1 (the first warm-up round), so interval j is round j + 2
    out = _timing(stamps, samples[1:], warmup - 1)
    return out | {"final_accuracy": res.summary["final_accuracy"], "status": res.status, "message": res.message,
                  "seconds_to_first_round_end": stamps[0] - t0 if stamps else None,  # setup + warm-up round
                  "engine_used": rows[-1]["metrics"].get("engine") if rows else None, "params": params}


def _peak_rss_mb() -> tuple[float | None, float | None]:
    try:
        import resource
    except ImportError:  # not Unix
        return None, None
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / unit)


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement from a JSON-able spec: kind 'plain' or 'engine'; params saved to spec['params_out']."""
    cfg = load_config(spec["config"])
    if spec["kind"] == "plain":
        _plain_supported(cfg)
        torch.set_num_threads(cfg.run.threads or usable_cores())
        data, factory = api.prepare(cfg)
        out = plain_fedavg(cfg, data, factory, spec["warmup"])
    else:
        out = measure_engine(cfg, spec["warmup"])
    params = out.pop("params")
    if spec.get("params_out") and params is not None:
        torch.save(params, spec["params_out"])
    me, children = _peak_rss_mb()
    # Children count only for engines that work in worker processes: any fork (even platform's `uname`) reports
    # the forking process's size as that child's peak, which would double an in-process engine's figure.
    workers = str(out.get("engine_used") or "").split(":")[-1] in WORKER_ENGINES
    return out | {"peak_rss_self_mb": me, "peak_rss_children_mb": children,
                  "peak_rss_mb": None if me is None else me + ((children or 0.0) if workers else 0.0)}


def _worker(spec_path: str, out_path: str) -> None:
    """`python -m fedloom.bench --one SPEC OUT`: one measurement in a fresh process; errors come back as data."""
    platform.platform()  # cached now, while small: its `uname` child would otherwise report our peak as its own
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = _measure(spec)
    except FedloomError as e:
        result = {"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint}}
    except Exception as e:  # noqa: BLE001 - reported in the table, the other engines still run
        result = {"error": {"type": "crash", "message": f"{type(e).__name__}: {e}", "hint": None,
                            "traceback": traceback.format_exc()}}
    tmp = Path(out_path + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)


def _in_subprocess(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    n = len(list(workdir.glob("spec-*.json")))
    spec_path, out_path = workdir / f"spec-{n}.json", workdir / f"out-{n}.json"
    spec_path.write_text(json.dumps(spec))
    src = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "fedloom.bench", "--one", str(spec_path), str(out_path)],
                          capture_output=True, text=True, env=env)
    if out_path.is_file():
        return json.loads(out_path.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": {"type": "crash", "hint": None,
                      "message": f"measurement process exited with code {proc.returncode}: {tail[0]}"}}


def _in_process(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return _measure(spec)
    except (DatasetError, ConfigError) as e:
        return {"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint}}


# ---- the benchmark --------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "torch_threads": threads or usable_cores(),
            "torch_version": torch.__version__, "platform": platform.platform(), "python": platform.python_version(),
            "fedloom_version": __version__,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _names(value: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def _resolve_tasks(tasks: str | Sequence[str | BenchTask]) -> list[BenchTask]:
    out = []
    for t in [tasks] if isinstance(tasks, BenchTask) else _names(tasks, []) if isinstance(tasks, str) else tasks:
        if isinstance(t, BenchTask):
            out.append(t)
            continue
        if t not in TASKS:
            close = difflib.get_close_matches(t, TASKS, n=1)
            raise ConfigError(f"unknown benchmark task '{t}'",
                              f"did you mean '{close[0]}'?" if close else f"tasks: {', '.join(TASKS)}")
        out.append(TASKS[t])
    return out


def _resolve_engines(engines: str | Sequence[str] | None) -> list[str]:
    names = _names(engines, DEFAULT_ENGINES)
    for e in names:
        if e not in ENGINES:
            close = difflib.get_close_matches(e, ENGINES, n=1)
            raise ConfigError(f"unknown engine '{e}'",
                              f"did you mean '{close[0]}'?" if close else f"engines: {', '.join(ENGINES)}")
    if not names:
        raise ConfigError("no engine to benchmark", f"engines: {', '.join(ENGINES)}")
    return list(dict.fromkeys(names))


def _task_config(task: BenchTask, rounds: int, engine: str, threads: int, data_dir: str | None) -> ExperimentConfig:
    over: dict[str, Any] = {"run.rounds": rounds, "run.engine": engine, "run.threads": threads,
                            "eval.every": task.eval_every or rounds, "name": f"bench-{task.key}"}
    if data_dir:
        over["data.data_dir"] = str(data_dir)
    return load_config(task.config, over)


class _Runner:
    """Runs measurements (isolated or not), turns their errors into statuses or one clear exception."""

    def __init__(self, isolate: bool, workdir: Path, say: Callable[[str], None]):
        self.isolate, self.workdir, self.say = isolate, workdir, say

    def __call__(self, spec: dict[str, Any], what: str) -> tuple[dict[str, Any], str, str | None]:
        self.say(f"{what} ...")
        res = _in_subprocess(spec, self.workdir) if self.isolate else _in_process(spec)
        err = res.get("error")
        if err is None:
            if res.get("status") not in (None, "completed"):
                return res, "failed", res.get("message")
            self.say(f"{what}: {_fmt(res.get('seconds_per_round'), '.3f')} s/round, "
                     f"accuracy {_fmt(res.get('final_accuracy'), '.4f')}")
            return res, "ok", None
        line = err["message"] + (f" ({err['hint']})" if err.get("hint") else "")
        if spec.get("engine") == "ray":
            return res, "unavailable", line
        if err["type"] == "DatasetError" or (err["type"] == "ConfigError" and spec["kind"] == "plain"):
            raise (DatasetError if err["type"] == "DatasetError" else ConfigError)(err["message"], err.get("hint"))
        self.say(f"{what}: failed: {line}")
        return res, "failed", line


def _max_diff(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> float | None:
    if not a or not b or set(a) != set(b):
        return None
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _load_params(path: Path) -> dict[str, torch.Tensor] | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


def run_bench(
    tasks: str | Sequence[str | BenchTask] = ("T1", "T2"),
    engines: str | Sequence[str] | None = None,
    rounds: int = 5,
    json_path: str | os.PathLike | None = None,
    *,
    warmup: int = 1,
    scale: bool = False,
    scale_engine: str | None = None,
    populations: Sequence[int] = DEFAULT_POPULATIONS,
    scale_rounds: int = 2,
    scale_task: BenchTask | None = None,
    data_dir: str | os.PathLike | None = None,
    threads: int = 0,
    repeat: int = 1,
    isolate: bool = True,
    console: Any = None,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Time every engine and the plain loop on each task; optionally the population scale check.

    Returns the records (also written to `json_path`): one per task x engine, one `plain` per task, one per
    scale population. `isolate=False` measures in this process (fast, for tests; peak RSS is then cumulative).
    `repeat`: measure the plain loop and every engine this many times, interleaved (plain, engines, plain,
    engines, ...), so that a slow spell of the machine falls on all of them; seconds per round are then the
    median over every timed round of every repetition, and `ratio_range` the lowest and highest ratio of
    one repetition's medians.
    """
    from rich.console import Console

    task_list = _resolve_tasks(tasks)
    engine_list = _resolve_engines(engines)
    if scale_engine is not None:
        _resolve_engines([scale_engine])
    if rounds < 1 or warmup < 1 or scale_rounds < 1 or repeat < 1:
        raise ConfigError("rounds, warmup, repeat and scale rounds must be >= 1 (the warm-up round is not timed)")
    if scale and (len(populations) < 1 or min(populations) < 1):
        raise ConfigError("scale populations must be >= 1 client")
    data_dir_s = str(data_dir) if data_dir else None
    configs = {t.key: _task_config(t, rounds + warmup, "sequential", threads, data_dir_s) for t in task_list}
    con = console or Console()
    err = Console(stderr=True, quiet=quiet)
    machine = machine_info(threads)
    records: list[dict[str, Any]] = []

    def save() -> None:
        if json_path:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=2))

    with tempfile.TemporaryDirectory(prefix="fedloom-bench-") as tmp:
        workdir = Path(tmp)
        run = _Runner(isolate, workdir, lambda s: err.print(f"[dim]bench[/] {s}", highlight=False))
        for task in task_list:
            cfg = configs[task.key]
            common = {"task": task.key, "task_label": task.label, "rounds": rounds, "warmup_rounds": warmup,
                      "repeats": repeat, "clients": cfg.data.num_clients,
                      "clients_per_round": cfg.clients_per_round(), "model": cfg.model.name, "rss_isolated": isolate,
                      **machine}
            runs: dict[str, list[tuple[dict[str, Any], str, str | None, float | None]]] = {}
            for rep in range(repeat):
                tag = f" (repetition {rep + 1}/{repeat})" if repeat > 1 else ""
                plain_params = workdir / f"{task.key}-plain.pt"
                plain_spec = {"kind": "plain", "config": cfg.model_dump(mode="json"), "warmup": warmup,
                              "params_out": str(plain_params)}
                plain, status, why = run(plain_spec, f"{task.key} plain loop{tag}")
                plain_ref = _load_params(plain_params)
                runs.setdefault("plain", []).append((plain, status, why, 0.0 if plain_ref else None))
                for engine in engine_list:
                    if engine == "ray" and importlib.util.find_spec("ray") is None:
                        runs.setdefault(engine, []).append(({}, "unavailable",
                                                            "ray is not installed (pip install 'fedloom[ray]')", None))
                        continue
                    out = workdir / f"{task.key}-{engine}.pt"
                    ecfg = load_config(cfg, {"run.engine": engine})
                    res, status, why = run({"kind": "engine", "engine": engine,
                                            "config": ecfg.model_dump(mode="json"), "warmup": warmup,
                                            "params_out": str(out)}, f"{task.key} {engine}{tag}")
                    diff = _max_diff(plain_ref, _load_params(out)) if status == "ok" else None
                    runs.setdefault(engine, []).append((res, status, why, diff))
            task_records = _merge_repeats(common, runs)
            records.extend(task_records)
            save()
            _print_task(con, task, task_records)
        if scale:
            best = scale_engine or _best_engine(records, "T2") or "vectorized"
            records.extend(_scale(run, scale_task or TASKS["T2"], best, populations, scale_rounds, warmup, threads,
                                  data_dir_s, machine, isolate))
            save()
            _print_scale(con, [r for r in records if r["task"] == "scale"])
    return records


def _merge_repeats(common: dict[str, Any], runs: dict[str, list[tuple[dict[str, Any], str, str | None,
                                                                       float | None]]]) -> list[dict[str, Any]]:
    """One record per engine from its repetitions: every timed round pooled, medians compared with plain's."""
    merged: dict[str, tuple[dict[str, Any], str, str | None, float | None]] = {}
    for engine, reps in runs.items():
        bad = next(((r, st, why) for r, st, why, _ in reps if st != "ok"), None)
        if bad is not None:
            merged[engine] = (bad[0], bad[1], bad[2], None)
            continue
        rounds = [x for r, *_ in reps for x in r["round_seconds"]]
        res = dict(reps[-1][0])
        samples = sum(r["samples_per_second"] * sum(r["round_seconds"]) for r, *_ in reps)
        res.update(round_seconds=rounds, median_seconds_per_round=statistics.median(rounds),
                   mean_seconds_per_round=statistics.fmean(rounds), samples_per_second=samples / sum(rounds),
                   peak_rss_mb=_max_or_none(r.get("peak_rss_mb") for r, *_ in reps),
                   peak_rss_self_mb=_max_or_none(r.get("peak_rss_self_mb") for r, *_ in reps),
                   peak_rss_children_mb=_max_or_none(r.get("peak_rss_children_mb") for r, *_ in reps),
                   rep_medians=[r["median_seconds_per_round"] for r, *_ in reps])
        res["seconds_per_round"] = res["median_seconds_per_round"]
        merged[engine] = (res, "ok", None, _max_or_none(d for *_, d in reps))
    plain = merged["plain"][0]
    plain_sec, plain_acc = plain.get("seconds_per_round"), plain.get("final_accuracy")
    out = []
    for engine, (res, status, why, diff) in merged.items():
        rec = _record(common, engine, res, status, why, plain_sec, plain_acc, diff)
        pm, em = plain.get("rep_medians"), res.get("rep_medians")
        ratios = [e / p for e, p in zip(em, pm, strict=True) if e and p] if pm and em else []
        rec["ratio_range"] = [min(ratios), max(ratios)] if ratios else None
        rec["mean_seconds_per_round"] = res.get("mean_seconds_per_round")
        out.append(rec)
    return out


def _max_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _record(common: dict[str, Any], engine: str, res: dict[str, Any], status: str, why: str | None,
            plain_sec: float | None, plain_acc: float | None, diff: float | None) -> dict[str, Any]:
    sec = res.get("seconds_per_round")
    return {**common, "engine": engine, "engine_used": res.get("engine_used", engine), "status": status,
            "error": why, "seconds_per_round": sec, "median_seconds_per_round": res.get("median_seconds_per_round"),
            "plain_seconds_per_round": plain_sec,
            "ratio_to_plain": sec / plain_sec if sec and plain_sec else None,
            "samples_per_second": res.get("samples_per_second"), "round_seconds": res.get("round_seconds"),
            "peak_rss_mb": res.get("peak_rss_mb"), "peak_rss_self_mb": res.get("peak_rss_self_mb"),
            "peak_rss_children_mb": res.get("peak_rss_children_mb"), "final_accuracy": res.get("final_accuracy"),
            "seconds_to_first_round_end": res.get("seconds_to_first_round_end"),
            "plain_final_accuracy": plain_acc, "max_param_diff_vs_plain": diff}


def _best_engine(records: list[dict[str, Any]], task: str) -> str | None:
    ok = [r for r in records if r["task"] == task and r["engine"] != "plain" and r["status"] == "ok"
          and r["seconds_per_round"]]
    return min(ok, key=lambda r: r["seconds_per_round"])["engine"] if ok else None


def _scale(run: _Runner, base: BenchTask, engine: str, populations: Sequence[int], rounds: int, warmup: int,
           threads: int, data_dir: str | None, machine: dict[str, Any], isolate: bool) -> list[dict[str, Any]]:
    """T2-style training at several populations on one engine: does per-round cost or memory grow with it?"""
    out: list[dict[str, Any]] = []
    for pop in sorted(populations):
        cfg = load_config(_task_config(base, rounds + warmup, engine, threads, data_dir),
                          {"data.num_clients": pop, "data.partition": "iid", "data.min_size": 0})
        res, status, why = run({"kind": "engine", "engine": engine, "config": cfg.model_dump(mode="json"),
                                "warmup": warmup}, f"scale {pop:,} clients {engine}")
        out.append({"task": "scale", "task_label": f"{base.key}-style at {pop:,} clients", "population": pop,
                    "rounds": rounds, "warmup_rounds": warmup, "clients": pop,
                    "clients_per_round": cfg.clients_per_round(), "model": cfg.model.name, "rss_isolated": isolate,
                    **machine, **_record({}, engine, res, status, why, None, None, None)})
    first = out[0]["peak_rss_mb"] if out else None
    for r in out:
        r["rss_ratio_to_smallest"] = r["peak_rss_mb"] / first if first and r["peak_rss_mb"] else None
    return out


# ---- printing -------------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_task(con: Any, task: BenchTask, recs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=f"{task.key}: {task.label}", title_justify="left")
    table.add_column("engine", no_wrap=True)
    for head in ("s/round", "plain s/round", "× plain", "samples/s", "peak RSS MB", "accuracy", "max |Δw|"):
        table.add_column(head, justify="right")
    for r in recs:
        name = r["engine"] if r["engine_used"] in (None, r["engine"]) else f"{r['engine']} ({r['engine_used']})"
        if r["status"] != "ok":
            table.add_row(name, f"[yellow]{r['status']}[/]", _fmt(r["plain_seconds_per_round"], ".3f"), "", "", "",
                          "", r["error"] or "")
            continue
        ratio = _fmt(r["ratio_to_plain"], ".2f")
        if r.get("repeats", 1) > 1 and r.get("ratio_range") and r["engine"] != "plain":
            ratio += " ({:.2f}-{:.2f})".format(*r["ratio_range"])
        table.add_row(name, _fmt(r["seconds_per_round"], ".3f"), _fmt(r["plain_seconds_per_round"], ".3f"),
                      ratio, _fmt(r["samples_per_second"], ",.0f"),
                      _fmt(r["peak_rss_mb"], ",.0f"), _fmt(r["final_accuracy"], ".4f"),
                      _fmt(r["max_param_diff_vs_plain"], ".0e"))
    con.print(table)
    seq = next((r for r in recs if r["engine"] == "sequential" and r["status"] == "ok"), None)
    plain = recs[0]
    if seq is not None and plain["status"] == "ok":
        same = seq["final_accuracy"] == plain["final_accuracy"]
        con.print(f"final accuracy: plain loop {plain['final_accuracy']:.4f}, sequential engine "
                  f"{seq['final_accuracy']:.4f} ({'same' if same else '[yellow]different[/]'})", highlight=False)
    m = recs[0]
    reps = f" x {m['repeats']} interleaved repetitions" if m.get("repeats", 1) > 1 else ""
    con.print(f"[dim]{m['usable_cores']} cores, {m['torch_threads']} torch threads, torch {m['torch_version']}, "
              f"{m['rounds']} timed rounds after {m['warmup_rounds']} warm-up{reps}; s/round is the median round; "
              f"load average at start "
              f"{_fmt(m['load_average_1m'], '.2f')}[/]", highlight=False)


def _print_scale(con: Any, recs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="scale check: peak RSS and s/round by population", title_justify="left")
    for head in ("clients", "engine", "s/round", "samples/s", "setup + round 1 s", "peak RSS MB", "RSS × smallest"):
        table.add_column(head, justify="left" if head == "engine" else "right", no_wrap=head == "engine")
    for r in recs:
        if r["status"] != "ok":
            table.add_row(f"{r['population']:,}", r["engine"], f"[yellow]{r['status']}[/]", "", "", "",
                          r["error"] or "")
            continue
        table.add_row(f"{r['population']:,}", r["engine"], _fmt(r["seconds_per_round"], ".3f"),
                      _fmt(r["samples_per_second"], ",.0f"), _fmt(r["seconds_to_first_round_end"], ".1f"),
                      _fmt(r["peak_rss_mb"], ",.0f"), _fmt(r["rss_ratio_to_smallest"], ".2f"))
    con.print(table)
    ratio = recs[-1].get("rss_ratio_to_smallest") if recs else None
    if ratio is not None:
        verdict = "within" if ratio <= RSS_TARGET else "[yellow]above[/]"
        con.print(f"peak RSS {recs[-1]['population']:,} / {recs[0]['population']:,} clients: {ratio:.2f}x "
                  f"({verdict} the {RSS_TARGET}x target)", highlight=False)


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedloom.bench", description="one isolated benchmark measurement "
                                 "(the `fedloom bench` command runs the whole benchmark)")
    ap.add_argument("--one", nargs=2, metavar=("SPEC", "OUT"), required=True)
    args = ap.parse_args(argv)
    _worker(*args.one)


if __name__ == "__main__":
    _main()
