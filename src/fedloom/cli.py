"""The `fedloom` command: parse, call the Python API, print. Nothing here that Python users can't reach."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import api
from .errors import ClientError, FedloomError, RunInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedloom: federated learning, simulated or deployed.")
out = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"debug": False, "runs_dir": None}

RunsDir = Annotated[Path | None, typer.Option("--runs-dir", envvar="FEDLOOM_RUNS_DIR",
                                              help="where the run store and run folders live [default: ./runs]")]
PluginOpt = Annotated[list[str] | None, typer.Option("--plugin", help="a module or .py file to load first (it "
                                                     "registers algorithms, models, datasets...); repeatable")]
TensorBoardOpt = Annotated[bool, typer.Option("--tensorboard", help="write TensorBoard event files while the run "
                                              "trains (<run folder>/tensorboard)")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


class _Progress:
    """Rich progress bar over rounds, with one line per evaluated round."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=err, disable=quiet)
        self.task = None

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.bar.add_task("rounds", total=ev["rounds"], completed=ev["round"] - 1, info="")
        m = ev.get("metrics", {})
        info = f"acc {_pct(ev.get('test_accuracy'))}" if ev.get("test_accuracy") is not None else ""
        self.bar.update(self.task, completed=ev["round"], info=info)
        if not self.quiet and ev.get("test_accuracy") is not None:
            fed = f"  clients p10 {_pct(m.get('fed_accuracy_p10'))} min {_pct(m.get('fed_accuracy_min'))}" \
                if m.get("fed_accuracy_p10") is not None else ""
            self.bar.console.print(  # one line however narrow the terminal: logs stay greppable
                f"round {ev['round']:>4}/{ev['rounds']}  acc {_pct(ev['test_accuracy'])}  loss {ev['test_loss']:.4f}"
                f"  train-loss {ev['train_loss']:.4f}{fed}{_personal(m)}  up {_fmt_bytes(ev['bytes_up'])}"
                f"  {ev['seconds']:.1f}s", soft_wrap=True, highlight=False)

    def reset(self) -> None:
        """A new bar for the next run (a sweep runs several)."""
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = None


def _personal(m: dict[str, Any], lead: str = "  ") -> str:
    """Personalized accuracy (each client's own model on its own split): mean and 10th percentile over clients."""
    if m.get("pers_accuracy") is None:
        return ""
    return f"{lead}personalized {_pct(m['pers_accuracy'])} p10 {_pct(m.get('pers_accuracy_p10'))}"


def _final_personal(s: dict[str, Any]) -> str:
    if s.get("final_pers_accuracy") is None:
        return ""
    return f"personalized {_pct(s['final_pers_accuracy'])} (p10 {_pct(s.get('final_pers_accuracy_p10'))}), "


def _finish(result: api.RunResult, as_json: bool, quiet: bool) -> None:
    s = result.summary
    if as_json:
        out.print_json(json.dumps(s | {"report": str(result.report) if result.report else None}))
    else:
        if result.message:
            err.print(f"[yellow]stopped:[/] {result.message}", highlight=False, soft_wrap=True)
        if not quiet:
            out.print(f"run {s['run_id']} {s['status']}: {s['rounds_completed']} rounds, "
                      f"final accuracy {_pct(s['final_accuracy'])}, best {_pct(s['best_accuracy'])} "
                      f"(round {s['best_round']}), {_final_personal(s)}{s['wall_seconds']:.1f}s, "
                      f"up {_fmt_bytes(s['bytes_up'])}, down {_fmt_bytes(s['bytes_down'])}")
            out.print(f"summary: {Path(s['output_dir']) / 'summary.json'}", soft_wrap=True, highlight=False)
        if result.report:
            out.print(f"report: {result.report}", soft_wrap=True, highlight=False)
    if result.status == "diverged":
        raise typer.Exit(3)


@contextmanager
def _interruptible(otherwise: str) -> Iterator[None]:
    """Ctrl-C: one line saying where the run stopped and how to continue it (`otherwise`, when it came before
    or after the rounds), and exit status 130."""
    try:
        yield
    except RunInterrupted as e:
        err.print(f"interrupted after round {e.rounds_completed}; continue with `fedloom resume {e.run_id}`",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err.print(f"interrupted; {otherwise}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="experiment TOML file or preset name (e.g. quickstart)")],
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    seed: Annotated[int | None, typer.Option(help="root random seed")] = None,
    engine: Annotated[str | None, typer.Option(help="execution engine")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="folder for this run's files")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key: key=value")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="skip the HTML report")] = False,
    plugin: PluginOpt = None,
    tensorboard: TensorBoardOpt = False,
    runs_dir: RunsDir = None,
) -> None:
    """Run a federated experiment."""
    with _interruptible("`fedloom runs` lists what was recorded"), _Progress(quiet or as_json) as progress:
        result = api.run(config, rounds=rounds, seed=seed, engine=engine, output_dir=output_dir,
                         overrides=set_ or [], runs_dir=runs_dir, callback=progress, make_report=not no_report,
                         plugins=plugin, tensorboard=tensorboard or None)
    _finish(result, as_json, quiet)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
    rounds: Annotated[int | None, typer.Option(help="train to this many rounds in total")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="retrain from round 1, replacing the "
                                               "recorded rounds (when the checkpoints are gone)")] = False,
    plugin: PluginOpt = None,
    tensorboard: TensorBoardOpt = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="skip the HTML report")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Continue a run that was killed or stopped, from its last checkpointed round."""
    with _interruptible(f"`fedloom show {run_id}` shows what was recorded"), _Progress(quiet or as_json) as progress:
        result = api.resume(run_id, rounds=rounds, runs_dir=runs_dir, callback=progress, from_scratch=from_scratch,
                            plugins=plugin, tensorboard=tensorboard or None, make_report=not no_report)
    _finish(result, as_json, quiet)


@app.command("runs")
def list_runs(limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 20,
              status: Annotated[str | None, typer.Option(help="only runs with this status (completed, "
                                                         "running, interrupted, failed, diverged, stopped)")] = None,
              algorithm: Annotated[str | None, typer.Option(help="only runs of this algorithm")] = None,
              dataset: Annotated[str | None, typer.Option(help="only runs on this dataset")] = None,
              sweep: Annotated[str | None, typer.Option(help="only the runs of this sweep (id or prefix)")] = None,
              name: Annotated[str | None, typer.Option(help="only runs whose experiment name contains this")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="print the runs as JSON")] = False,
              runs_dir: RunsDir = None) -> None:
    """List recorded runs, newest first."""
    filters = {"status": status, "algorithm": algorithm, "dataset": dataset, "sweep": sweep, "name": name}
    records = api.runs(runs_dir, limit, **filters)
    store = api.open_store(runs_dir, readonly=True)
    summaries = [api.summarize(store, rec.run_id) for rec in records]
    if as_json:
        out.print_json(json.dumps([_run_json(rec, s) for rec, s in zip(records, summaries, strict=True)]))
        return
    if not records:
        given = ", ".join(f"--{k} {v}" for k, v in filters.items() if v is not None)
        out.print(f"no runs match {given} in {store.path.parent}" if given else
                  f"no runs yet in {store.path.parent}; start one with: fedloom run quickstart", highlight=False)
        return
    rows = [[rec.run_id, rec.status, rec.algorithm, _pct(s["final_accuracy"]), rec.dataset, rec.partition,
             f"{rec.rounds_completed}/{rec.rounds_planned}", _pct(s["best_accuracy"]),
             f"{datetime.fromtimestamp(rec.created_at):%Y-%m-%d %H:%M}", f"{rec.wall_seconds:.0f}s"]
            for rec, s in zip(records, summaries, strict=True)]
    # the columns a narrow terminal leaves out go last: the id is never cut, then what tells runs apart
    _print_whole_ids(["run id", "status", "algorithm", "final acc", "dataset", "partition", "rounds", "best acc",
                      "created", "wall"], rows)


def _run_json(rec: Any, s: dict[str, Any]) -> dict[str, Any]:
    keys = ("final_accuracy", "best_accuracy", "final_pers_accuracy", "final_pers_accuracy_p10", "bytes_up",
            "bytes_down")
    return {"run_id": rec.run_id, "name": rec.name, "status": rec.status, "message": rec.message,
            "algorithm": rec.algorithm, "dataset": rec.dataset, "partition": rec.partition, "seed": rec.seed,
            "sweep_id": rec.sweep_id, "rounds_completed": rec.rounds_completed,
            "rounds_planned": rec.rounds_planned, **{k: s[k] for k in keys},
            "created_at": datetime.fromtimestamp(rec.created_at).isoformat(timespec="seconds"),
            "wall_seconds": rec.wall_seconds, "output_dir": rec.output_dir}


def _print_whole_ids(header: list[str], rows: list[list[str]]) -> None:
    """A table whose first column (the run id users copy) is never cut: the columns that do not fit the
    terminal are left out, last first; if the ids alone are wider, one run per line, id first. A header's
    words may go on separate lines ("final acc" takes the width of "final")."""
    titles = [h.replace(" ", "\n") if i else h for i, h in enumerate(header)]
    widths = [max(len(line) for r in [titles, *rows] for line in r[i].splitlines()) for i in range(len(header))]
    keep = 1
    while keep < len(header) and sum(w + 3 for w in widths[: keep + 1]) + 1 <= out.width:
        keep += 1
    if widths[0] + 4 > out.width:
        for r in rows:
            details = "  ".join(f"{h} {v}" for h, v in zip(header[1:], r[1:], strict=True))
            out.print(r[0], details, sep="\n  ", highlight=False, soft_wrap=True)
        return
    table = Table(*titles[:keep])
    table.columns[0].no_wrap = True
    for r in rows:
        table.add_row(*r[:keep])
    out.print(table)
    if keep < len(header):
        err.print(f"(a wider terminal also shows: {', '.join(header[keep:])})", highlight=False)


@app.command()
def show(run_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, runs_dir: RunsDir = None) -> None:
    """Show one run: its summary, config and per-round metrics."""
    info = api.show(run_id, runs_dir=runs_dir)
    if as_json:
        out.print_json(json.dumps(info))
        return
    s = info["summary"]
    for k, v in s.items():
        out.print(f"[bold]{k}[/]: {v}")
    pers = any(r["metrics"].get("pers_accuracy") is not None for r in info["rounds"])  # personalized models
    table = Table("round", "test acc", "test loss", "macro-F1", "train loss", "clients p10",
                  *(("pers acc", "pers p10") if pers else ()), "flagged", "up", "down", "s")
    for r in info["rounds"]:
        m = r["metrics"]
        table.add_row(str(r["round"]), _pct(r["test_accuracy"]),
                      "-" if r["test_loss"] is None else f"{r['test_loss']:.4f}",
                      "-" if r["test_macro_f1"] is None else f"{r['test_macro_f1']:.4f}",
                      "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
                      _pct(m.get("fed_accuracy_p10")),
                      *((_pct(m.get("pers_accuracy")), _pct(m.get("pers_accuracy_p10"))) if pers else ()),
                      _flagged(m), _fmt_bytes(r["bytes_up"]),
                      _fmt_bytes(r["bytes_down"]), f"{r['seconds']:.1f}")
    out.print(table)


def _flagged(m: dict) -> str:
    """Clients flagged by detection in a round, and how many updates were left out (NaN/Inf, suspicion)."""
    flagged, left_out = m.get("flagged"), m.get("excluded_clients") or {}
    if flagged is None and not left_out:
        return "-"
    return str(len(flagged or [])) + (f" ({len(left_out)} out)" if left_out else "")


@app.command()
def report(
    run_id: str,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="also write TensorBoard event files")] = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Write a self-contained HTML report (PNG plots embedded) for a run."""
    path = api.report(run_id, runs_dir=runs_dir, out_dir=output_dir, tensorboard=tensorboard)
    out.print(f"report: {path}", soft_wrap=True, highlight=False)
    if tensorboard:
        tb = path.parent / "tensorboard"
        out.print(f"tensorboard: {tb}  (view with: tensorboard --logdir {tb})")


@app.command()
def compare(
    run_ids: Annotated[list[str], typer.Argument(help="two or more run ids (unique prefixes are enough); the "
                                                 "first is the baseline of the reduction factors")],
    output: Annotated[Path | None, typer.Option("--output", help="the HTML page (default: <runs dir>/compare-"
                                                "<first run id>-<number of runs>.html)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the records as JSON")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Compare runs: accuracy, MB up and down and their reduction vs the first run, wall time; and an HTML page."""
    from .reporting.compare import COLUMNS, LEGEND, table_cells

    result = api.compare(run_ids, runs_dir=runs_dir, out=output)
    if result.warning:
        err.print(f"[yellow]warning:[/] {result.warning}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps(result.records))
        return
    table = Table(*COLUMNS)
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal folds numbers onto two lines rather than cutting them
    for record in result.records:
        table.add_row(*table_cells(record))
    out.print(table)
    out.print(LEGEND, highlight=False)
    out.print(f"page: {result.html}", soft_wrap=True, highlight=False)  # a path to copy: never broken


@app.command()
def sweep(
    experiment: Annotated[str, typer.Argument(help="experiment TOML file or preset name")],
    seeds: Annotated[str | None, typer.Option(help="seeds: 0-4, or 0,2,7 [default: the experiment's run.seed]")
                     ] = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", help="KEY=V1,V2,...: a config key and its values; "
                                                   "repeatable, the settings are the cross product")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds of every run")] = None,
    engine: Annotated[str | None, typer.Option(help="execution engine")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key: key=value")] = None,
    plugin: PluginOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary rows as JSON")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Run an experiment over a grid of settings x seeds: mean ± std of final accuracy per setting, and a plot.

    Resumable: the same command again skips finished runs and resumes interrupted ones."""
    from .sweep import LEGEND, format_mean_std
    from .sweep import sweep as run_sweep

    progress = _Progress(quiet or as_json)

    def on_run(ev: dict[str, Any]) -> None:
        progress.reset()
        if not (quiet or as_json):
            what = {"run": "starting", "resume": f"resuming {ev['run_id']} ({ev['status']})",
                    "keep": f"recorded: {ev['run_id']} ({ev['status']})"}[ev["action"]]
            err.print(f"[{ev['index']}/{ev['total']}] {ev['label']}, seed {ev['seed']}: {what}", highlight=False,
                      soft_wrap=True)

    with _interruptible("run the same `fedloom sweep` command again to continue"), progress:
        try:
            result = run_sweep(experiment, seeds=seeds, grid=grid or [], overrides=set_ or [], rounds=rounds,
                               engine=engine, runs_dir=runs_dir, plugins=plugin, callback=progress, on_run=on_run)
        except RunInterrupted as e:
            err.print(f"interrupted in round {e.rounds_completed + 1} of run {e.run_id}; run the same `fedloom sweep` "
                      "command again to continue the sweep", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    for run_id, why in result.failures.items():
        err.print(f"[red]failed:[/] {run_id}: {why}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps({"sweep_id": result.sweep_id, "rows": result.rows, "html": str(result.html),
                                   "png": str(result.png), "failures": result.failures}))
    else:
        table = Table("setting", "n", "final acc (mean ± std)", "not counted")
        for r in result.rows:
            left = [f"{status}: {rid}" for rid, status in r["not_counted"].items()]
            left += [f"seed {s} not run" for s in r["missing_seeds"]]
            table.add_row(r["setting_label"], str(r["n"]),
                          format_mean_std(r["final_accuracy_mean"], r["final_accuracy_std"]), "\n".join(left) or "-")
        out.print(table)
        out.print(LEGEND, highlight=False)
        out.print(f"sweep: {result.sweep_id} (its runs: fedloom runs --sweep {result.sweep_id})", highlight=False)
        out.print(f"page: {result.html}\nplot: {result.png}", highlight=False)
    if result.failures:
        raise typer.Exit(1)


@app.command()
def diagnose(run_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, runs_dir: RunsDir = None) -> None:
    """Explain what went wrong in a run, with the numbers behind each finding and what to try."""
    diagnosis = api.diagnose(run_id, runs_dir=runs_dir)
    if as_json:
        out.print_json(json.dumps(diagnosis.to_dict()))
        return
    out.print(diagnosis)


@app.command()
def datasets(data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None) -> None:
    """List datasets, where each was found, or what to do to get it."""
    table = Table("dataset", "status", "where / what to do")
    for d in api.datasets(data_dir):
        table.add_row(d["name"], d["status"], d["note"])
    out.print(table)


@app.command()
def bench(
    tasks: Annotated[str, typer.Option(help="comma-separated: T1 (Fashion-MNIST, 100 clients, simple-cnn), T2 "
                                       "(10,000 clients, mlp), T2e (T2, test every round), tiny (seconds, "
                                       "bundled data); '' for none")] = "T1,T2",
    engines: Annotated[str | None, typer.Option(help="comma-separated engines (default: sequential, parallel, "
                                                "vectorized, ray if installed)")] = None,
    rounds: Annotated[int, typer.Option(help="timed rounds per measurement")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed warm-up rounds before them")] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the records to this JSON file")] = None,
    scale: Annotated[bool, typer.Option("--scale", help="also time T2-style training at 1,000 and 100,000 "
                                        "clients on the fastest T2 engine (peak RSS ratio)")] = False,
    scale_engine: Annotated[str | None, typer.Option(help="engine for --scale (default: fastest on T2, "
                                                     "else vectorized)")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="where the datasets are")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0 = all cores)")] = 0,
    repeat: Annotated[int, typer.Option(help="interleaved repetitions of every measurement (medians pooled)")] = 1,
) -> None:
    """Time each engine against a hand-written PyTorch loop doing the same FedAvg rounds (each in a fresh process)."""
    from .bench import run_bench  # torch-heavy benchmark code only when asked for

    run_bench(tasks, engines, rounds, json_path, warmup=warmup, scale=scale, scale_engine=scale_engine,
              data_dir=data_dir, threads=threads, repeat=repeat, console=out)
    if json_path:
        out.print(f"records: {json_path}", soft_wrap=True, highlight=False)


def main() -> None:
    """Typer handles usage errors (exit 2, naming the option), `typer.Exit` and Ctrl-C outside a run (130);
    fedloom's own errors become one line with their exit code, anything else one line with exit 1."""
    global out, err
    out, err = Console(), Console(stderr=True)  # sized by the terminal (or $COLUMNS) of this invocation
    try:
        app()
    except FedloomError as e:
        if _state["debug"]:
            traceback.print_exc()
        elif isinstance(e, ClientError):
            err.print(e.traceback_text, highlight=False, markup=False)
        line = e.message + (f" ({e.hint})" if e.hint else "")
        err.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # anything unexpected
        if _state["debug"]:
            traceback.print_exc()
        else:
            err.print(f"[red]error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
