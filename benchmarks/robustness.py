"""Attacks x defences: main-task accuracy, backdoor success and detection precision / recall per cell.

    .venv/bin/python benchmarks/robustness.py [--rounds 30] [--attacks sign-flip,alie] [--defences mean,bulyan]
                                              [--fractions 0.1,0.2] [--json FILE]

The task: Fashion-MNIST over 50 clients, Dirichlet(0.5) label skew, 20 clients a round, simple-cnn, E = 1,
B = 32, SGD lr 0.01 momentum 0.9, seed 0, a test every round. A cell is one `fedloom.run` of it with an
`[attack]` (a fraction of the 50 clients, drawn with the seed, attacking from round 1) and a defence (the
server's aggregator; `f` = the attackers expected in a round, fraction x 20). Detection runs in every cell;
`exclude` is the mean with `server.exclude_suspicion`. `clean_accuracy` is the run with neither attack nor
defence (plain FedAvg), run once first; `defence_clean_accuracy` the defence without an attack. Final
accuracy is the mean of the last 3 evaluated rounds; backdoor success is the last round's (the share of
stamped test images of other classes classified as the target); precision and recall pool every scored
(client, round). docs/robustness.md has the matrix and what it says.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedloom
from fedloom.config import load_config
from fedloom.server.detection import summarize
from fedloom.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "robustness.json"
CLIENTS, PER_ROUND = 50, 20
LAST = 3  # final accuracy: mean of the last LAST evaluated rounds

TASK: dict[str, Any] = {
    "name": "robustness",
    "data": {"dataset": "fashion-mnist", "num_clients": CLIENTS, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "simple-cnn"},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9},
    "server": {"algorithm": "fedavg", "clients_per_round": PER_ROUND, "detect": True},
    "eval": {"every": 1, "federated": False},
    "run": {"seed": 0},
}

# attack name -> the `[attack]` section without its fraction
ATTACKS: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},
    "sign-flip": {"kind": "sign-flip"},
    "gaussian": {"kind": "gaussian", "params": {"std": 0.1}},
    "scaling": {"kind": "scaling", "params": {"factor": 10.0}},
    "alie": {"kind": "alie"},
    "ipm": {"kind": "ipm", "params": {"epsilon": 0.5}},
    "label-flip": {"kind": "label-flip"},
    "backdoor": {"kind": "backdoor", "params": {"target": 2, "size": 4, "fraction": 0.5}},
    "free-rider": {"kind": "free-rider", "params": {"noise": 0.001}},
}


def defence(name: str, fraction: float) -> dict[str, Any]:
    """The `server` settings of a defence, sized for round(fraction x 20) attackers a round."""
    f = max(1, round(fraction * PER_ROUND))
    table: dict[str, dict[str, Any]] = {
        "mean": {},
        "exclude": {"exclude_suspicion": 0.6},
        "median": {"aggregator": "median"},
        "trimmed-mean": {"aggregator": "trimmed-mean", "aggregator_params": {"f": f}},
        "krum": {"aggregator": "krum", "aggregator_params": {"f": f}},
        "multi-krum": {"aggregator": "multi-krum", "aggregator_params": {"f": f}},
        "bulyan": {"aggregator": "bulyan", "aggregator_params": {"f": f}},
        "geometric-median": {"aggregator": "geometric-median"},
        "norm-bound": {"aggregator": "norm-bound", "aggregator_params": {"bound": 1.0}},
        "norm-bound-dp": {"aggregator": "norm-bound", "aggregator_params": {"bound": 1.0, "noise": 0.001}},
        "centered-clip": {"aggregator": "centered-clip", "aggregator_params": {"tau": 1.0, "iters": 3}},
        "fltrust": {"aggregator": "fltrust", "aggregator_params": {"root_size": 100}},
        "foolsgold": {"aggregator": "foolsgold"},
    }
    return table[name]


DEFENCES = ("mean", "exclude", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median",
            "norm-bound", "norm-bound-dp", "centered-clip", "fltrust", "foolsgold")


def run_cell(attack: str, dfn: str, fraction: float, rounds: int, runs_dir: Path, data_dir: str | None,
             engine: str) -> dict[str, Any]:
    raw = json.loads(json.dumps(TASK))
    raw["name"] = f"robustness-{attack}-{dfn}-{fraction:g}"
    raw["run"].update(rounds=rounds, engine=engine)
    raw["server"].update(defence(dfn, fraction))
    if attack != "none":
        raw["attack"] = {**ATTACKS[attack], "fraction": fraction}
    if data_dir:
        raw["data"]["data_dir"] = data_dir
    cfg = load_config(raw)
    t0 = time.perf_counter()
    res = fedloom.run(cfg, runs_dir=runs_dir, make_report=False)
    seconds = time.perf_counter() - t0
    store = RunStore(runs_dir / "fedloom.db")
    rows = store.rounds(res.run_id)
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    backdoor = [r["metrics"]["backdoor_success"] for r in rows if r["metrics"].get("backdoor_success") is not None]
    det = summarize(rows, store.client_rounds(res.run_id, "fit")) or {}
    return {
        "attack": attack, "defence": dfn, "attackers": fraction if attack != "none" else 0.0,
        "final_accuracy": statistics.fmean(accs[-LAST:]) if accs else None,
        "clean_accuracy": None, "defence_clean_accuracy": None,
        "backdoor_success": backdoor[-1] if backdoor else None,
        "precision": det.get("precision"), "recall": det.get("recall"),
        "status": res.status, "message": res.message, "rounds": len(rows), "seconds": seconds,
        "server": defence(dfn, fraction), "attack_section": raw.get("attack"), "run_id": res.run_id,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--attacks", default=",".join(a for a in ATTACKS if a != "none"),
                    help=f"comma-separated, from: {', '.join(ATTACKS)}")
    ap.add_argument("--defences", default=",".join(DEFENCES), help=f"comma-separated, from: {', '.join(DEFENCES)}")
    ap.add_argument("--fractions", default="0.1,0.2", help="shares of the 50 clients that attack")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--runs-dir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--no-defence-clean", action="store_true",
                    help="skip the defences' runs without an attack (defence_clean_accuracy is then null)")
    args = ap.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    bad = [a for a in attacks if a not in ATTACKS] + [d for d in defences if d not in DEFENCES]
    if bad:
        raise SystemExit(f"unknown attacks or defences {bad}; attacks: {', '.join(ATTACKS)}; "
                         f"defences: {', '.join(DEFENCES)}")
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="fedloom-robustness-"))

    def cell(attack: str, dfn: str, fraction: float) -> dict[str, Any]:
        rec = run_cell(attack, dfn, fraction, args.rounds, runs_dir, args.data_dir, args.engine)
        acc = rec["final_accuracy"]
        print(f"{attack:>11} {dfn:>16} {rec['attackers']:4.2f}: acc {acc if acc is None else f'{acc:.4f}'}  "
              f"backdoor {rec['backdoor_success']}  precision {rec['precision']}  recall {rec['recall']}  "
              f"{rec['seconds']:.0f}s {rec['status']}", flush=True)
        return rec

    clean = cell("none", "mean", 0.0)
    defence_clean = ({} if args.no_defence_clean
                     else {d: cell("none", d, max(fractions)) for d in defences if d != "mean"})
    records = [clean, *defence_clean.values()]
    for fraction in fractions:
        for attack in attacks:
            if attack == "none":
                continue
            for dfn in defences:
                records.append(cell(attack, dfn, fraction))
    for r in records:
        r["clean_accuracy"] = clean["final_accuracy"]
        own = clean if r["defence"] == "mean" else defence_clean.get(r["defence"])
        r["defence_clean_accuracy"] = own["final_accuracy"] if own else None
    out = {"task": "Fashion-MNIST, 50 clients Dir(0.5), 20 per round, simple-cnn, E=1, B=32, lr 0.01 momentum 0.9",
           "rounds": args.rounds, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                             f"torch {torch.__version__}",
           "command": f"benchmarks/robustness.py --rounds {args.rounds} --attacks {','.join(attacks)} "
                      f"--defences {','.join(defences)} --fractions {args.fractions}"
                      + (" --no-defence-clean" if args.no_defence_clean else ""),
           "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print("\n| attack | attackers | defence | final acc | vs clean | backdoor | precision | recall |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in records:
        acc, base = r["final_accuracy"], r["clean_accuracy"]
        gap = "" if acc is None or base is None else f"{100 * (acc - base):+.2f}"

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        def two(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        print(f"| {r['attack']} | {r['attackers']:.0%} | {r['defence']} | {pct(acc)} | {gap} | "
              f"{pct(r['backdoor_success'])} | {two(r['precision'])} | {two(r['recall'])} |")
    print(f"records: {args.json}")


if __name__ == "__main__":
    main()
