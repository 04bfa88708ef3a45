"""The `fedloom` command: parse, call the Python API, print. Nothing here that Python users can't reach."""

from __future__ import annotations

import json
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import api
from .errors import ClientError, FedloomError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedloom: federated learning, simulated or deployed.")
out = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"debug": False, "runs_dir": None}

RunsDir = Annotated[Path | None, typer.Option("--runs-dir", envvar="FEDLOOM_RUNS_DIR",
                                              help="where the run store and run folders live [default: ./runs]")]


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
            self.bar.console.print(
                f"round {ev['round']:>4}/{ev['rounds']}  acc {_pct(ev['test_accuracy'])}  loss {ev['test_loss']:.4f}"
                f"  train-loss {ev['train_loss']:.4f}{fed}  up {_fmt_bytes(ev['bytes_up'])}"
                f"  {ev['seconds']:.1f}s")


def _finish(result: api.RunResult, as_json: bool, quiet: bool) -> None:
    s = result.summary
    if as_json:
        out.print_json(json.dumps(s | {"report": str(result.report) if result.report else None}))
    else:
        if result.message:
            err.print(f"[yellow]stopped:[/] {result.message}")
        if not quiet:
            out.print(f"run {s['run_id']} {s['status']}: {s['rounds_completed']} rounds, "
                      f"final accuracy {_pct(s['final_accuracy'])}, best {_pct(s['best_accuracy'])} "
                      f"(round {s['best_round']}), {s['wall_seconds']:.1f}s, up {_fmt_bytes(s['bytes_up'])}, "
                      f"down {_fmt_bytes(s['bytes_down'])}")
            out.print(f"summary: {Path(s['output_dir']) / 'summary.json'}")
        if result.report:
            out.print(f"report: {result.report}")
    if result.status == "diverged":
        raise typer.Exit(3)


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
    runs_dir: RunsDir = None,
) -> None:
    """Run a federated experiment."""
    with _Progress(quiet or as_json) as progress:
        result = api.run(config, rounds=rounds, seed=seed, engine=engine, output_dir=output_dir,
                         overrides=set_ or [], runs_dir=runs_dir, callback=progress, make_report=not no_report)
    _finish(result, as_json, quiet)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
    rounds: Annotated[int | None, typer.Option(help="train to this many rounds in total")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Continue a run that was killed or stopped, from its last completed round."""
    with _Progress(quiet or as_json) as progress:
        result = api.resume(run_id, rounds=rounds, runs_dir=runs_dir, callback=progress)
    _finish(result, as_json, quiet)


@app.command("runs")
def list_runs(limit: Annotated[int, typer.Option(help="show at most this many")] = 20,
              runs_dir: RunsDir = None) -> None:
    """List recorded runs, newest first."""
    store = api.open_store(runs_dir)
    records = store.list_runs(limit)
    if not records:
        out.print(f"no runs yet in {store.path.parent}; start one with: fedloom run quickstart")
        return
    table = Table("run id", "status", "rounds", "final acc", "best acc", "wall", "created")
    for rec in records:
        s = api.summarize(store, rec.run_id)
        table.add_row(rec.run_id, rec.status, f"{rec.rounds_completed}/{rec.rounds_planned}",
                      _pct(s["final_accuracy"]), _pct(s["best_accuracy"]), f"{rec.wall_seconds:.0f}s",
                      f"{datetime.fromtimestamp(rec.created_at):%Y-%m-%d %H:%M}")
    out.print(table)


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
    table = Table("round", "test acc", "test loss", "macro-F1", "train loss", "clients p10", "up", "down", "s")
    for r in info["rounds"]:
        m = r["metrics"]
        table.add_row(str(r["round"]), _pct(r["test_accuracy"]),
                      "-" if r["test_loss"] is None else f"{r['test_loss']:.4f}",
                      "-" if r["test_macro_f1"] is None else f"{r['test_macro_f1']:.4f}",
                      "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
                      _pct(m.get("fed_accuracy_p10")), _fmt_bytes(r["bytes_up"]), _fmt_bytes(r["bytes_down"]),
                      f"{r['seconds']:.1f}")
    out.print(table)


@app.command()
def report(
    run_id: str,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="also write TensorBoard event files")] = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Write a self-contained HTML report (PNG plots embedded) for a run."""
    path = api.report(run_id, runs_dir=runs_dir, out_dir=output_dir, tensorboard=tensorboard)
    out.print(f"report: {path}")
    if tensorboard:
        tb = path.parent / "tensorboard"
        out.print(f"tensorboard: {tb}  (view with: tensorboard --logdir {tb})")


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
        out.print(f"records: {json_path}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except FedloomError as e:
        if _state["debug"]:
            traceback.print_exc()
        elif isinstance(e, ClientError):
            err.print(e.traceback_text, highlight=False, markup=False)
        line = e.message + (f" ({e.hint})" if e.hint else "")
        err.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if _state["debug"]:
            traceback.print_exc()
        else:
            err.print(f"[red]error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
