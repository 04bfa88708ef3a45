"""NIID-Bench on Fashion-MNIST with fedloom: does fedloom reproduce the published non-IID accuracies?

    .venv/bin/python benchmarks/niid_bench.py                          # everything, published protocol
    .venv/bin/python benchmarks/niid_bench.py --partitions dir0.5 --algorithms fedavg
    .venv/bin/python benchmarks/niid_bench.py --rounds 2 --epochs 1    # smoke run: marked not comparable

Protocol of Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study" (ICDE
2022): 10 clients, all of them every round, 50 rounds, 10 local epochs, batch 64, SGD lr 0.01 momentum
0.9 weight decay 1e-5, NIID-Bench's simple-cnn; the metric is the best centralized test accuracy over the
rounds. Every finished cell (partition x algorithm x mu x seed) is appended at once to a JSON-lines
cache, so a Ctrl-C loses at most the cell in progress, and a rerun skips what is cached with the same
protocol (a cell interrupted with Ctrl-C is resumed from its last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import fedloom
from fedloom.config import load_config
from fedloom.errors import FedloomError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "niid_bench.jsonl"
DEFAULT_RUNS = ROOT / "benchmarks" / "results" / "runs"
DEFAULT_DOC = ROOT / "docs" / "niid_bench.md"
BEGIN, END = "<!-- niid-bench:begin -->", "<!-- niid-bench:end -->"
DASH = "—"


@dataclass(frozen=True)
class Partition:
    key: str
    label: str
    overrides: dict[str, Any]


PARTITIONS: dict[str, Partition] = {p.key: p for p in (
    Partition("iid", "IID", {"data.partition": "iid"}),
    Partition("dir0.5", "Dir(0.5)", {"data.partition": "dirichlet", "data.alpha": 0.5}),
    Partition("c1", "#C=1", {"data.partition": "shards", "data.classes_per_client": 1}),
    Partition("c2", "#C=2", {"data.partition": "shards", "data.classes_per_client": 2}),
    Partition("c3", "#C=3", {"data.partition": "shards", "data.classes_per_client": 3}),
    Partition("quantity", "Quantity Dir(0.5)", {"data.partition": "quantity", "data.beta": 0.5}),
    Partition("noise", "Noise σ=0.1", {"data.partition": "feature-noise", "data.noise_sigma": 0.1}),
)}
ALGORITHMS: dict[str, str] = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "fednova": "FedNova"}

# Best test accuracy (%) on Fashion-MNIST from a reproduction of NIID-Bench under the protocol above.
REFERENCE_SOURCE = "a published reproduction of NIID-Bench (Li et al. 2022) on Fashion-MNIST, same protocol"
REFERENCE: dict[tuple[str, str], float] = {
    (part, alg): acc
    for part, row in {"iid": (89.2, 89.4, 89.3, 89.4), "dir0.5": (88.1, 88.2, 88.4, 88.2),
                      "c2": (78.1, 78.1, 33.8, 71.7), "c3": (82.4, 83.0, 80.3, 82.0)}.items()
    for alg, acc in zip(ALGORITHMS, row, strict=True)
}


@dataclass(frozen=True)
class Protocol:
    """Everything shared by the cells; a cell is comparable with the reference only under `PUBLISHED`."""

    dataset: str = "fashion-mnist"
    model: str = "simple-cnn"
    clients: int = 10
    rounds: int = 50
    epochs: int = 10
    batch: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    fraction: float = 1.0

    @property
    def comparable(self) -> bool:
        return self == PUBLISHED

    def differences(self) -> list[str]:
        pub = asdict(PUBLISHED)
        return [f"{k} {v} (published {pub[k]})" for k, v in asdict(self).items() if v != pub[k]]


PUBLISHED = Protocol()


@dataclass(frozen=True)
class Cell:
    partition: str
    algorithm: str
    seed: int = 0
    mu: float | None = None  # FedProx only

    @property
    def name(self) -> str:
        mu = f" mu={self.mu:g}" if self.mu is not None else ""
        return f"{self.partition} / {self.algorithm}{mu} / seed {self.seed}"


@dataclass
class Outcome:
    """What one invocation did, for the exit code and the closing summary."""

    ran: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    interrupted: Cell | None = None


# ---- configs ----------------------------------------------------------------------------------------

THREADS = 0  # torch threads per cell (0: all cores); --threads 1 lets two cells share 2 cores without contention


def base_config(protocol: Protocol) -> dict[str, Any]:
    """The experiment every cell starts from; tests replace it to make cells tiny (a hook, on purpose)."""
    return {
        "name": "niid-bench",
        "data": {"dataset": protocol.dataset, "num_clients": protocol.clients},
        "model": {"name": protocol.model},
        "train": {"local_epochs": protocol.epochs, "batch_size": protocol.batch, "lr": protocol.lr,
                  "momentum": protocol.momentum, "weight_decay": protocol.weight_decay},
        "server": {"fraction": protocol.fraction},
        # centralized accuracy is the metric; per-client evaluation would only cost time
        "eval": {"every": 1, "federated": False},
        # NIID-Bench trains every round; a rising loss (SCAFFOLD on #C=k) must not end a cell early
        "run": {"rounds": protocol.rounds, "stop_on_divergence": False, "threads": THREADS},
    }


def cell_overrides(cell: Cell) -> dict[str, Any]:
    over = {**PARTITIONS[cell.partition].overrides, "server.algorithm": cell.algorithm, "run.seed": cell.seed,
            "name": f"niid-{cell.partition}-{cell.algorithm}" + (f"-mu{cell.mu:g}" if cell.mu is not None else "")}
    if cell.mu is not None:
        over["server.mu"] = cell.mu
    return over


def cell_config(cell: Cell, protocol: Protocol) -> fedloom.ExperimentConfig:
    return load_config(base_config(protocol), cell_overrides(cell))


def preflight(cells: Iterable[Cell], protocol: Protocol) -> list[str]:
    """Validate every cell's config and algorithm before training anything, so that an algorithm fedloom
    lacks is reported in a second rather than after hours of other cells."""
    problems: dict[str, str] = {}  # first problem per algorithm: one line each, not one per cell
    for cell in cells:
        if cell.algorithm in problems:
            continue
        try:
            cell_config(cell, protocol)
        except FedloomError as e:
            problems[cell.algorithm] = f"bad config for {cell.name}: " + e.message + (f" ({e.hint})" if e.hint else "")
            continue
    return list(problems.values())


# ---- cache ------------------------------------------------------------------------------------------

def record_key(rec: dict[str, Any]) -> tuple:
    return (rec["partition"], rec["algorithm"], rec.get("mu"), rec["seed"],
            json.dumps(rec["protocol"], sort_keys=True))


def cell_key(cell: Cell, protocol: Protocol) -> tuple:
    return (cell.partition, cell.algorithm, cell.mu, cell.seed, json.dumps(asdict(protocol), sort_keys=True))


def load_cache(path: Path) -> dict[tuple, dict[str, Any]]:
    """Cached cells by key; the latest line wins (a `--force` rerun), a torn last line is ignored."""
    out: dict[tuple, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[record_key(rec)] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path}:{n} is not a result record; ignored", file=sys.stderr)
    return out


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """One line per cell, flushed and fsynced, so a finished cell survives anything that follows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END) or f.read(1) != b"\n")  # a kill mid-line earlier
        f.write((("\n" if torn else "") + json.dumps(rec, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# ---- running ----------------------------------------------------------------------------------------

def _interrupted_run(cfg: fedloom.ExperimentConfig, runs_dir: Path) -> str | None:
    """A run of exactly this config stopped by Ctrl-C, to resume rather than start over."""
    if not (runs_dir / "fedloom.db").is_file():
        return None
    want = cfg.model_dump(mode="json")
    for rec in fedloom.runs(runs_dir):
        if rec.status == "interrupted" and rec.config == want and rec.rounds_completed > 0:
            return rec.run_id
    return None


def run_cell(cell: Cell, protocol: Protocol, runs_dir: Path) -> dict[str, Any]:
    """Train one cell (or finish an interrupted one) and return its cache record."""
    cfg = cell_config(cell, protocol)
    t0 = time.perf_counter()
    resumed = _interrupted_run(cfg, runs_dir)
    if resumed:
        res = fedloom.resume(resumed, runs_dir=runs_dir, make_report=False)
    else:
        res = fedloom.run(cfg, runs_dir=runs_dir, make_report=False)
    total = time.perf_counter() - t0
    s = res.summary
    if s.get("best_accuracy") is None:
        raise RuntimeError(f"run {res.run_id} ended {res.status} with no evaluated round: {res.message}")
    return {
        "partition": cell.partition, "algorithm": cell.algorithm, "mu": cell.mu, "seed": cell.seed,
        "protocol": asdict(protocol), "comparable": protocol.comparable,
        "best_accuracy": s["best_accuracy"], "final_accuracy": s["final_accuracy"], "best_round": s["best_round"],
        "rounds_completed": s["rounds_completed"], "status": res.status, "message": res.message,
        "wall_seconds": s["wall_seconds"], "total_seconds": total, "resumed_run": bool(resumed),
        "run_id": res.run_id, "fedloom": fedloom.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
    }


def select_cells(partitions: Sequence[str], algorithms: Sequence[str], seeds: Sequence[int],
                 mus: Sequence[float]) -> list[Cell]:
    return [Cell(p, a, s, mu if a == "fedprox" else None)
            for p in partitions for a in algorithms for s in seeds for mu in (mus if a == "fedprox" else [None])]


def run_cells(cells: Sequence[Cell], protocol: Protocol, results: Path, runs_dir: Path,
              force: bool = False) -> Outcome:
    """Run the cells not yet cached, appending each as it finishes; Ctrl-C stops after saving what is done."""
    out = Outcome()
    cache = load_cache(results)
    todo = [c for c in cells if force or cell_key(c, protocol) not in cache]
    out.skipped = len(cells) - len(todo)
    if out.skipped:
        log(f"{out.skipped} of {len(cells)} cells already in {results}; skipped (--force reruns them)")
    for i, cell in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {cell.name} ...")
        try:
            rec = run_cell(cell, protocol, runs_dir)
        except KeyboardInterrupt:
            out.interrupted = cell
            return out
        except Exception as e:  # one broken cell must not cost the others
            msg = e.message + (f" ({e.hint})" if e.hint else "") if isinstance(e, FedloomError) \
                else f"{type(e).__name__}: {e}"
            out.failed.append((cell, msg))
            log(f"[{i}/{len(todo)}] {cell.name}: FAILED: {msg}")
            continue
        append_record(results, rec)
        out.ran.append(rec)
        note = "" if rec["status"] == "completed" else f", {rec['status']}: {rec['message']}"
        log(f"[{i}/{len(todo)}] {cell.name}: best {pct(rec['best_accuracy'])} (round {rec['best_round']}), "
            f"final {pct(rec['final_accuracy'])}, {duration(rec['wall_seconds'])}{note}")
    return out


# ---- tables -----------------------------------------------------------------------------------------

def pct(acc: float | None) -> str:
    return DASH if acc is None else f"{100 * acc:.1f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_cell(ours: float | None, ref: float | None) -> str:
    """`ours (ref, diff)` in percent; the diff is taken between the numbers shown, so they add up."""
    if ours is None:
        return f"{DASH} ({ref:.1f})" if ref is not None else DASH
    shown = round(ours, 1)
    if ref is None:
        return f"{shown:.1f} ({DASH})"
    diff = round(shown - ref, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{shown:.1f} ({ref:.1f}, {diff:+.1f})"


@dataclass
class Agg:
    """One table cell: the records of a (partition, algorithm) over seeds, and for FedProx the best mu."""

    accuracy: float  # percent, mean over seeds
    std: float | None
    seeds: int
    wall_seconds: float  # mean per run
    mu: float | None
    flags: str  # "†" if some run did not complete all rounds


def aggregate(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Agg]:
    groups: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["partition"], rec["algorithm"], rec.get("mu")), []).append(rec)
    out: dict[tuple[str, str], Agg] = {}
    for (part, alg, mu), recs in groups.items():
        accs = [100 * r["best_accuracy"] for r in recs]
        agg = Agg(statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else None, len(accs),
                  statistics.fmean(r["wall_seconds"] for r in recs), mu,
                  "" if all(r.get("status", "completed") == "completed" for r in recs) else "†")
        best = out.get((part, alg))
        if best is None or agg.accuracy > best.accuracy:  # FedProx: report the best mu, as NIID-Bench does
            out[(part, alg)] = agg
    return out


def table(records: Sequence[dict[str, Any]], partitions: Sequence[str] | None = None,
          algorithms: Sequence[str] | None = None) -> str:
    """Markdown table: rows = partitions, per algorithm `ours (ref, diff)` and the wall time of a cell."""
    aggs = aggregate(records)
    parts = list(partitions or [p for p in PARTITIONS if any(k[0] == p for k in aggs)])
    algs = list(algorithms or [a for a in ALGORITHMS if any(k[1] == a for k in aggs)])
    head = "| partition | " + " | ".join(f"{ALGORITHMS[a]} | time" for a in algs) + " |"
    rule = "|---|" + "---:|---:|" * len(algs)
    rows = [head, rule]
    for p in parts:
        cells = []
        for a in algs:
            agg = aggs.get((p, a))
            text = format_cell(agg.accuracy if agg else None, REFERENCE.get((p, a)))
            if agg:
                text += agg.flags
                if agg.std is not None:
                    text += f" ±{agg.std:.1f} n={agg.seeds}"
                if agg.mu is not None:
                    text += f" μ={agg.mu:g}"
            cells += [text, duration(agg.wall_seconds) if agg else DASH]
        rows.append(f"| {PARTITIONS[p].label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


LEGEND = (f"Each cell: our best test accuracy % (reference, ours − reference); {DASH} where not run or no "
          "reference. time: wall time of a cell's training loop (mean over seeds). "
          "± std and n over seeds when more than one; μ: the FedProx μ with the best accuracy; "
          "† a run stopped before its last round.")


def doc_block(records: Sequence[dict[str, Any]], include_other: bool) -> str:
    """The generated part of docs/niid_bench.md: the comparable table, machines, and (if asked) the rest."""
    full = [r for r in records if r.get("comparable")]
    lines = [BEGIN, "", f"Reference: {REFERENCE_SOURCE}.", ""]
    if full:
        lines += [table(full, list(PARTITIONS), list(ALGORITHMS)), "", LEGEND, ""]
        for m in sorted({json.dumps(r["machine"], sort_keys=True) for r in full}):
            mm = json.loads(m)
            lines.append(f"Machine: {mm['cpu']}, {mm['cpus_usable']} of {mm['cpu_count']} CPUs usable, "
                         f"{mm['torch_threads']} torch threads, torch {mm['torch']}, Python {mm['python']}.")
        dates = sorted(r["date"][:10] for r in full)
        versions = ", ".join(sorted({r["fedloom"] for r in full}))
        lines += ["", f"{len(full)} run{'s' * (len(full) != 1)}, {dates[0]} to {dates[-1]}, fedloom {versions}.", ""]
    else:
        lines += ["No cell has been run with the published protocol yet.", ""]
    other = [r for r in records if not r.get("comparable")]
    if include_other and other:
        lines += ["### Not comparable: protocol differs from the published one", "",
                  "| partition | algorithm | seed | protocol | best % | final % | time |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for r in other:
            diffs = "; ".join(Protocol(**r["protocol"]).differences())
            alg = ALGORITHMS[r["algorithm"]] + (f" μ={r['mu']:g}" if r.get("mu") is not None else "")
            lines.append(f"| {PARTITIONS[r['partition']].label} | {alg} | {r['seed']} | {diffs} | "
                         f"{pct(r['best_accuracy'])} | {pct(r['final_accuracy'])} | {duration(r['wall_seconds'])} |")
        lines.append("")
    return "\n".join([*lines, END])


DOC_STUB = f"# NIID-Bench on Fashion-MNIST\n\nWritten by `benchmarks/niid_bench.py`.\n\n{BEGIN}\n{END}\n"


def replace_block(text: str, block: str) -> str:
    """Swap what lies between the markers (markers included) for `block`, keeping everything around it."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text[:start] + block + text[end + len(END):]


def write_doc(path: Path, records: Sequence[dict[str, Any]], include_other: bool) -> None:
    """Rewrite the block in place, atomically: a reader (or a crash) never sees half a file."""
    text = path.read_text() if path.is_file() else DOC_STUB
    new = replace_block(text, doc_block(records, include_other))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- CLI --------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _choices(valid: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in {', '.join(valid)}")
        return list(dict.fromkeys(items))
    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=_choices(list(PARTITIONS)), default=list(PARTITIONS),
                    help=f"comma-separated subset of {','.join(PARTITIONS)} (default all)")
    ap.add_argument("--algorithms", type=_choices(list(ALGORITHMS)), default=list(ALGORITHMS),
                    help=f"comma-separated subset of {','.join(ALGORITHMS)} (default all)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default 0)")
    ap.add_argument("--mu", type=float, nargs="+", default=[0.01],
                    help="FedProx mu, one or more; the table reports the best (default 0.01)")
    ap.add_argument("--rounds", type=int, default=PUBLISHED.rounds, help="smoke runs only; not comparable")
    ap.add_argument("--epochs", type=int, default=PUBLISHED.epochs, help="smoke runs only; not comparable")
    ap.add_argument("--clients", type=int, default=PUBLISHED.clients, help="smoke runs only; not comparable")
    ap.add_argument("--dataset", default=PUBLISHED.dataset, help="tests / smoke runs only (e.g. digits)")
    ap.add_argument("--model", default=PUBLISHED.model, help="tests / smoke runs only (e.g. mlp)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON-lines cache of finished cells")
    ap.add_argument("--force", action="store_true", help="rerun cells that are already cached")
    ap.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS, help="fedloom run store for the cells")
    ap.add_argument("--doc", type=Path, default=None,
                    help=f"write the table into this page (default: {DEFAULT_DOC.relative_to(ROOT)}, after a "
                         "run with the published protocol; given explicitly, the other cells are listed too)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch the docs page")
    ap.add_argument("--json", action="store_true", help="print the selected cells' records as JSON")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per cell (default: all cores)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    global THREADS
    args = parser().parse_args(argv)
    THREADS = args.threads
    protocol = replace(PUBLISHED, rounds=args.rounds, epochs=args.epochs, clients=args.clients,
                       dataset=args.dataset, model=args.model)
    cells = select_cells(args.partitions, args.algorithms, args.seed, args.mu)
    if not protocol.comparable:
        log("NOT COMPARABLE with the published numbers: " + "; ".join(protocol.differences()))
    problems = preflight(cells, protocol)
    if problems:
        for p in problems:
            log(f"error: {p}")
        if any("not available" in p for p in problems):
            log("hint: leave the unavailable algorithms out, e.g. --algorithms fedavg")
        return 2

    outcome = run_cells(cells, protocol, args.results, args.runs_dir, args.force)

    cache = load_cache(args.results)
    wanted = {cell_key(c, protocol) for c in cells}
    selected = [cache[k] for k in cache if k in wanted]
    if args.json:
        print(json.dumps(selected, indent=2))
    else:
        title = "published protocol" if protocol.comparable else \
            "NOT COMPARABLE (protocol differs: " + "; ".join(protocol.differences()) + ")"
        print(f"\nNIID-Bench, Fashion-MNIST, best test accuracy %: {title}\n")
        print(table(selected, args.partitions, args.algorithms))
        print("\n" + LEGEND)

    if not args.no_doc:
        if args.doc is not None:
            write_doc(args.doc, list(cache.values()), include_other=True)
            log(f"wrote {args.doc}")
        elif protocol.comparable and any(r.get("comparable") for r in cache.values()):  # smoke runs: never
            write_doc(DEFAULT_DOC, list(cache.values()), include_other=False)
            log(f"wrote {DEFAULT_DOC}")

    if outcome.interrupted:
        log(f"\ninterrupted during {outcome.interrupted.name}; {len(outcome.ran)} cells finished this time are in "
            f"{args.results}. Run the same command again to go on (cached cells are skipped, the interrupted "
            "one resumes from its last finished round).")
        return 130
    for cell, msg in outcome.failed:
        log(f"failed: {cell.name}: {msg}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
