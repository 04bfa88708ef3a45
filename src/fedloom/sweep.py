"""`fedloom sweep`: one experiment over a grid of settings and several seeds, with mean ± std per setting.

    fedloom sweep study.toml --seeds 0-4 --grid server.algorithm=fedavg,fedprox,scaffold

runs the cross product of the grid's values, each with every seed, as ordinary runs tagged with one sweep
id. The id is derived from what the sweep is (the experiment as validated, the grid, the seeds), so running
the same command again finds the same sweep: completed runs are skipped, interrupted or failed ones resumed
from their last checkpoint, missing ones started. At the end (also after a partial sweep) the summary is
computed from the run store alone: per setting, the mean ± std (sample std, n - 1) of the final test
accuracy over its completed runs, and the accuracy per round, mean with a ± std band; printed, and written
as `<runs dir>/<sweep id>/sweep.html` (the table and the plot), `sweep.png` and `sweep.json`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import api
from .config import ExperimentConfig, _split_override, load_config
from .errors import ConfigError, FedloomError, RunError
from .plugins import load_plugins
from .store import RunRecord, RunStore

DONE = ("completed", "diverged", "stopped")  # outcomes a re-run of the sweep keeps; the others are resumed
COUNTED = ("completed",)  # runs whose final accuracy enters a setting's mean ± std
LEGEND = ("final acc: test accuracy of the last evaluated round, mean ± sample std (n - 1) over the setting's "
          "completed runs; n: completed runs; not counted: runs that diverged, stopped, failed or have not finished")


# ---- parsing the command line ----------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' and '0-2,9' too. Order kept, repeats refused."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        lo, dash, hi = part.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if dash else [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds '{text}': '{part}' is not a seed or a range of seeds",
                              "e.g. --seeds 0-4 or --seeds 0,1,7") from None
        if dash and int(hi) < int(lo):
            raise ConfigError(f"--seeds '{text}': the range '{part}' is empty", f"write it as {hi}-{lo}")
        seeds.extend(span)
    return _seeds(seeds)


def _seeds(seeds: Any) -> list[int]:
    if not isinstance(seeds, list | tuple | range) or not seeds:
        raise ConfigError(f"seeds must be a non-empty list of integers, not {seeds!r}", "e.g. seeds=[0, 1, 2]")
    out = []
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"seeds: {s!r} is not a seed (an integer >= 0)")
        if s in out:
            raise ConfigError(f"seeds: {s} is given twice", "name each seed once")
        out.append(s)
    return out


def parse_grid(items: list[str] | None) -> dict[str, list[Any]]:
    """['server.algorithm=fedavg,fedprox', 'train.lr=0.01,0.1'] -> {key: [values]}; each value is read as a
    TOML value (0.1 a number, true a boolean), else as a string, as `--set` reads it."""
    grid: dict[str, list[Any]] = {}
    for item in items or []:
        key, sep, values = str(item).partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid '{item}' is not key=value1,value2,...",
                              "e.g. --grid server.algorithm=fedavg,fedprox,scaffold")
        key = key.strip()
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice", "list all its values in one --grid key=v1,v2")
        grid[key] = [_split_override(f"{key}={v.strip()}")[1] for v in values.split(",")]
    return _grid(grid)


def _grid(grid: Any) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid must be a dict of config key -> list of values, not {type(grid).__name__}",
                          "e.g. grid={'server.algorithm': ['fedavg', 'fedprox']}")
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise ConfigError(f"grid key {key!r} is not a dotted config key", "e.g. 'server.algorithm'")
        if key == "run.seed":
            raise ConfigError("the grid cannot vary run.seed", "give the seeds with --seeds (seeds=[...])")
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"grid {key}: needs a non-empty list of values, not {values!r}")
        shown = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(shown)) < len(shown):
            raise ConfigError(f"grid {key}: a value is given twice ({', '.join(shown)})", "name each value once")
        out[key] = list(values)
    return out


# ---- what a sweep is ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One run of the sweep: a setting (grid key -> value) and a seed, with its validated config."""

    setting: tuple[tuple[str, Any], ...]
    seed: int
    config: ExperimentConfig = field(compare=False)

    @property
    def label(self) -> str:
        return setting_label(self.setting)

    def key(self) -> str:
        return _point_key(self.config.model_dump(mode="json"), [k for k, _ in self.setting], self.seed)


def setting_label(setting: tuple[tuple[str, Any], ...] | list[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in setting) or "(the experiment as it is)"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _point_key(config: dict[str, Any], keys: list[str], seed: int) -> str:
    """What identifies a run's place in the sweep: its values at the grid's keys (as stored) and its seed."""
    return json.dumps([[_dotted(config, k) for k in keys], seed], sort_keys=True)


def plan(base: ExperimentConfig, grid: dict[str, list[Any]], seeds: list[int]) -> list[Point]:
    """Every (setting, seed), validated now: a bad value fails the sweep before any run starts."""
    points = []
    for values in itertools.product(*grid.values()):
        setting = tuple(zip(grid, values, strict=True))
        for seed in seeds:
            try:
                cfg = load_config(base, {**dict(setting), "run.seed": seed})
            except ConfigError as e:
                raise ConfigError(f"sweep setting {setting_label(setting)}: {e.message}", e.hint) from None
            points.append(Point(setting, seed, cfg))
    return points


def sweep_id_of(base: ExperimentConfig, grid: dict[str, list[Any]], seeds: list[int]) -> str:
    spec = json.dumps({"config": base.model_dump(mode="json"), "grid": grid, "seeds": seeds}, sort_keys=True)
    return f"{api.slug(base.name)[:40]}-sweep-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


# ---- running it ----------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """The sweep's id, one summary row per setting (JSON-ready), its runs, what this call did to each
    ('ran', 'resumed', 'kept'), the runs that failed in this call, and the files written."""

    sweep_id: str
    rows: list[dict[str, Any]]
    run_ids: list[str]
    actions: dict[str, str]
    failures: dict[str, str]
    html: Path
    png: Path
    json: Path


def sweep(
    experiment: str | os.PathLike | dict | ExperimentConfig,
    *,
    seeds: list[int] | str | None = None,
    grid: dict[str, list[Any]] | list[str] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    rounds: int | None = None,
    engine: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    plugins: list[str] | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    make_report: bool = False,
) -> SweepResult:
    """Run (or continue) the sweep: every setting of `grid` ({key: [values]}, or 'key=v1,v2' strings) with
    every seed (a list, or '0-4'; default the experiment's run.seed). `callback` is every run's per-round
    callback; `on_run(event)` is told before each run what happens to it (event: index, total, setting, seed,
    action = 'run' | 'resume' | 'keep', run_id). A run that fails is recorded and the sweep goes on; the
    failures are in the result (Ctrl-C stops the sweep: run the same sweep again to continue it)."""
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else seeds
    grid = parse_grid(grid) if isinstance(grid, list) else _grid(grid)
    loaded = load_plugins(plugins)
    base = load_config(experiment, overrides)
    extra: dict[str, Any] = {k: v for k, v in (("run.rounds", rounds), ("run.engine", engine)) if v is not None}
    if loaded:
        extra["plugins"] = [*base.plugins, *(p for p in loaded if p not in base.plugins)]
    if extra:
        base = load_config(base, extra)
    seeds = _seeds(seeds if seeds is not None else [base.run.seed])
    points = plan(base, grid, seeds)
    sweep_id = sweep_id_of(base, grid, seeds)
    store = api.open_store(runs_dir)
    try:
        store.create_sweep(sweep_id, base.name, {"config": base.model_dump(mode="json"), "grid": grid,
                                                 "seeds": seeds})
        actions, failures = _run_points(store, sweep_id, points, list(grid), runs_dir, callback, on_run,
                                        make_report)
        return summarize_sweep(store, sweep_id, actions, failures)
    finally:
        store.close()


def _run_points(store: RunStore, sweep_id: str, points: list[Point], keys: list[str], runs_dir: Any,
                callback: Any, on_run: Any, make_report: bool) -> tuple[dict[str, str], dict[str, str]]:
    existing = _existing(store.sweep_runs(sweep_id), keys)
    actions: dict[str, str] = {}
    failures: dict[str, str] = {}
    for i, point in enumerate(points, 1):
        rec = existing.get(point.key())
        action = "run" if rec is None else "keep" if rec.status in DONE else "resume"
        if on_run is not None:
            on_run({"index": i, "total": len(points), "setting": dict(point.setting), "label": point.label,
                    "seed": point.seed, "action": action, "run_id": rec.run_id if rec else None,
                    "status": rec.status if rec else None})
        if rec is not None and action == "keep":
            actions[rec.run_id] = "kept"
            continue
        try:
            if rec is None:
                result = api.run(point.config, runs_dir=runs_dir, callback=callback, make_report=make_report,
                                 sweep_id=sweep_id)
            else:
                result = api.resume(rec.run_id, runs_dir=runs_dir, callback=callback, make_report=make_report)
        except ConfigError:
            raise  # the experiment itself is wrong: every other run would fail the same way
        except Exception as e:  # this run failed (it is recorded so, with why); the others may not
            run_id = rec.run_id if rec else _newest_id(store, sweep_id, point, keys)
            why = e.message if isinstance(e, FedloomError) else f"{type(e).__name__}: {e}"
            failures[run_id or f"{point.label}, seed {point.seed}"] = why
            continue
        actions[result.run_id] = "ran" if rec is None else "resumed"
    return actions, failures


def _existing(records: list[RunRecord], keys: list[str]) -> dict[str, RunRecord]:
    """The sweep's recorded run of each point: a finished one if there is one, else the newest."""
    out: dict[str, RunRecord] = {}
    for rec in records:  # oldest first
        key = _point_key(rec.config, keys, rec.seed)
        if key not in out or out[key].status not in DONE:
            out[key] = rec
    return out


def _newest_id(store: RunStore, sweep_id: str, point: Point, keys: list[str]) -> str | None:
    recs = _existing(store.sweep_runs(sweep_id), keys)
    rec = recs.get(point.key())
    return rec.run_id if rec else None


# ---- the summary ---------------------------------------------------------------------------------------------

def summarize_sweep(store: RunStore, sweep_id: str, actions: dict[str, str] | None = None,
                    failures: dict[str, str] | None = None, out_dir: Path | None = None) -> SweepResult:
    """The table and the plot of a sweep, from the store alone (also for a sweep still partly to run)."""
    info = store.get_sweep(sweep_id)
    sweep_id = info["sweep_id"]
    grid, seeds = info["spec"]["grid"], info["spec"]["seeds"]
    records = _existing(store.sweep_runs(sweep_id), list(grid))
    rows, curves = [], []
    for values in itertools.product(*grid.values()):
        setting = list(zip(grid, values, strict=True))
        runs = sorted((r for r in records.values()
                       if r.seed in seeds and all(_same(_dotted(r.config, k), v) for k, v in setting)),
                      key=lambda r: seeds.index(r.seed))
        row, curve = _setting_row(store, setting, seeds, runs)
        rows.append(row)
        curves.append((row["setting_label"], curve))
    folder = out_dir or store.path.parent / sweep_id
    html, png, path_json = _write(folder, sweep_id, info, rows, curves)
    return SweepResult(sweep_id, rows, [r.run_id for r in records.values()], actions or {}, failures or {},
                       html, png, path_json)


def _same(stored: Any, given: Any) -> bool:
    """A grid value against the value stored in a run's config (validated: 1 may be stored as 1.0)."""
    if isinstance(stored, int | float) and isinstance(given, int | float) and not isinstance(given, bool):
        return float(stored) == float(given)
    return json.dumps(stored, sort_keys=True) == json.dumps(given, sort_keys=True)


def _setting_row(store: RunStore, setting: list[tuple[str, Any]], seeds: list[int], runs: list[RunRecord]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    counted = [r for r in runs if r.status in COUNTED]
    finals, per_round = [], {}
    for rec in counted:
        accs = [(r["round"], r["test_accuracy"]) for r in store.rounds(rec.run_id) if r["test_accuracy"] is not None]
        if accs:
            finals.append(accs[-1][1])
        for rnd, acc in accs:
            per_round.setdefault(rnd, []).append(acc)
    mean, std = mean_std(finals)
    row = {
        "setting": dict(setting), "setting_label": setting_label(setting), "n": len(finals),
        "final_accuracy_mean": mean, "final_accuracy_std": std, "final_accuracies": finals,
        "runs": {str(r.seed): r.run_id for r in runs},
        "not_counted": {r.run_id: r.status for r in runs if r.status not in COUNTED},
        "missing_seeds": [s for s in seeds if s not in {r.seed for r in runs}],
    }
    rounds = sorted(per_round)
    stats = [mean_std(per_round[r]) for r in rounds]
    curve = {"rounds": rounds, "mean": [m for m, _ in stats], "std": [s or 0.0 for _, s in stats],
             "n": [len(per_round[r]) for r in rounds]}
    return row, curve


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None for fewer than two values, both None for none."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


# ---- files ----------------------------------------------------------------------------------------------------

def _write(folder: Path, sweep_id: str, info: dict[str, Any], rows: list[dict[str, Any]],
           curves: list[tuple[str, dict[str, Any]]]) -> tuple[Path, Path, Path]:
    from .reporting.html import _STYLE, _e, figure_html
    from .reporting.plots import png_bytes

    try:
        folder.mkdir(parents=True, exist_ok=True)
        png = png_bytes(sweep_figure(curves))
        (folder / "sweep.png").write_bytes(png)
        (folder / "sweep.json").write_text(json.dumps({"sweep_id": sweep_id, "name": info["name"],
                                                       "grid": info["spec"]["grid"], "seeds": info["spec"]["seeds"],
                                                       "rows": rows, "curves": dict(curves)}, indent=2))
        body = "".join(
            f"<tr><td>{_e(r['setting_label'])}</td><td class=num>{r['n']}</td>"
            f"<td class=num>{_e(format_mean_std(r['final_accuracy_mean'], r['final_accuracy_std']))}</td>"
            f"<td>{_e(_not_counted(r))}</td><td>{_e(', '.join(r['runs'].values()))}</td></tr>" for r in rows)
        page = (f"<!doctype html><html><head><meta charset=utf-8><title>{_e(sweep_id)}</title>{_STYLE}</head><body>"
                f"<h1>Sweep {_e(sweep_id)}</h1><p>{_e(info['name'])}: seeds {_e(str(info['spec']['seeds']))}</p>"
                "<table><tr><th>setting</th><th>n</th><th>final acc (mean ± std)</th><th>not counted</th>"
                f"<th>runs</th></tr>{body}</table><p>{_e(LEGEND)}</p>"
                + figure_html(png, "test accuracy per round", "mean over the setting's completed runs, "
                              "with a band of ± one sample standard deviation")
                + "</body></html>")
        (folder / "sweep.html").write_text(page)
    except OSError as e:
        raise RunError(f"cannot write the sweep's files in {folder}: {e.strerror or e}",
                       "pass --runs-dir with a folder you can write") from None
    return folder / "sweep.html", folder / "sweep.png", folder / "sweep.json"


def _not_counted(row: dict[str, Any]) -> str:
    parts = [f"{status}: {rid}" for rid, status in row["not_counted"].items()]
    if row["missing_seeds"]:
        parts.append(f"not run: seed {', '.join(map(str, row['missing_seeds']))}")
    return "; ".join(parts) or "-"


def sweep_figure(curves: list[tuple[str, dict[str, Any]]]) -> Any:
    """Accuracy per round, one line per setting (the mean) with a ± std band."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for label, c in curves:
        if not c["rounds"]:
            continue
        mean = [100 * m for m in c["mean"]]
        std = [100 * s for s in c["std"]]
        (line,) = ax.plot(c["rounds"], mean, marker="o", ms=3, label=f"{label} (n={max(c['n'])})")
        ax.fill_between(c["rounds"], [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.2)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("test accuracy per round: mean ± std over seeds")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no completed run yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return fig


def load_sweep(sweep_id: str, runs_dir: str | os.PathLike | None = None) -> SweepResult:
    """The table and plot of a recorded sweep (a unique prefix of its id is enough), written again."""
    store = api.open_store(runs_dir, readonly=True)
    try:
        return summarize_sweep(store, sweep_id)
    finally:
        store.close()
