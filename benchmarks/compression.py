"""Compression on T1: final accuracy against bytes up and down, for each codec setting.

    .venv/bin/python benchmarks/compression.py [--rounds 100] [--settings f32,topk1-q8-ef] [--json FILE]

T1 is `fedloom bench`'s: Fashion-MNIST, 100 clients Dir(0.5) seed 0, 10 per round, simple-cnn, E=1, B=32,
SGD lr 0.01 momentum 0.9, a test every round. Each setting is one `fedloom.run` of that experiment with its
`pipeline` section; final accuracy is the mean of the last 5 evaluated rounds. Bytes are the store's
(the exact lengths of the messages sent). Reductions are against the f32 run of the same length; run f32
(first in the default list) whenever you run others. Encode+decode cost is timed on the model's own vector
size, as one round's 10 client encodes plus the server's 10 decodes, against the f32 run's seconds per round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fedloom
from fedloom.api import prepare
from fedloom.bench import TASKS
from fedloom.config import load_config
from fedloom.pipeline.codecs import parse_codec
from fedloom.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "compression.json"

# name -> the experiment's `pipeline` section
SETTINGS: dict[str, dict] = {
    "f32": {},
    "f16": {"upload": ["f16"]},
    "q8": {"upload": ["q8"]},
    "q4": {"upload": ["q4"]},
    "q2-ef": {"upload": ["q2"], "error_feedback": True},
    "sign-ef": {"upload": ["sign"], "error_feedback": True},
    "randk10-q8": {"upload": ["randk:0.1", "q8"]},
    "topk10-q8-ef": {"upload": ["topk:0.1", "q8"], "error_feedback": True},
    "topk1-q8-ef": {"upload": ["topk:0.01", "q8"], "error_feedback": True},
    "topk1-q8-zstd-ef": {"upload": ["topk:0.01", "q8", "zstd"], "error_feedback": True},
    "topk0.1-q8-ef": {"upload": ["topk:0.001", "q8"], "error_feedback": True},
    "topk2-q4-zstd-ef": {"upload": ["topk:0.02", "q4", "zstd"], "error_feedback": True},
    "topk3-sign-zstd-ef": {"upload": ["topk:0.03", "sign", "zstd"], "error_feedback": True},
    "topk4-sign-zstd-ef": {"upload": ["topk:0.04", "sign", "zstd"], "error_feedback": True},
    "topk5-sign-zstd-ef": {"upload": ["topk:0.05", "sign", "zstd"], "error_feedback": True},
    "down-f16": {"download": ["f16"]},
    "down-bf16": {"download": ["bf16"]},
    "down-q8": {"download": ["q8"]},
    "down-q8-up-topk1-q8-ef": {"download": ["q8"], "upload": ["topk:0.01", "q8"], "error_feedback": True},
}
LAST = 5  # final accuracy: mean of the last LAST evaluated rounds


def run_setting(name: str, rounds: int, runs_dir: Path, data_dir: str | None) -> dict:
    over = {"run.rounds": rounds, "eval.every": 1, "name": f"compression-{name}"}
    if data_dir:
        over["data.data_dir"] = data_dir
    over.update({f"pipeline.{k}": v for k, v in SETTINGS[name].items()})
    cfg = load_config(TASKS["T1"].config, over)
    t0 = time.perf_counter()
    res = fedloom.run(cfg, runs_dir=runs_dir, make_report=False)
    seconds = time.perf_counter() - t0
    rows = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    return {
        "setting": name, "pipeline": SETTINGS[name], "rounds": len(rows), "status": res.status,
        "final_accuracy": statistics.fmean(accs[-LAST:]) if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "seconds": seconds, "seconds_per_round": statistics.median(r["seconds"] for r in rows),
        "run_id": res.run_id,
    }


def codec_seconds(spec: list[str], size: int, clients: int = 10, repeat: int = 5) -> float:
    """One round's encode (every client) plus decode (the server, every client) of a `size`-value update."""
    codec = parse_codec(spec)
    vecs = [torch.randn(size, generator=torch.Generator().manual_seed(i)) * 1e-3 for i in range(clients)]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i, v in enumerate(vecs):
            codec.decode(codec.encode(v, torch.Generator().manual_seed(i)), size)
        best = min(best, time.perf_counter() - t0)
    return best


def add_codec_cost(records: list[dict], size: int, round_seconds: float) -> None:
    for r in records:
        up = r["pipeline"].get("upload", ["f32"])
        r["codec_seconds_per_round"] = codec_seconds(up, size) if up != ["f32"] else 0.0
        r["codec_share_of_round"] = r["codec_seconds_per_round"] / round_seconds
        r["f32_seconds_per_round"] = round_seconds


def retime(path: Path, data_dir: str | None, rounds: int = 6) -> None:
    out = json.loads(path.read_text())
    base = run_setting("f32", rounds, Path(tempfile.mkdtemp(prefix="fedloom-retime-")), data_dir)
    add_codec_cost(out["records"], out["model_values"], base["seconds_per_round"])
    out["timing"] = (f"codec cost re-measured on an idle machine against the median round of a {rounds}-round f32 "
                     f"run ({base['seconds_per_round']:.3f} s)")
    path.write_text(json.dumps(out, indent=2))
    for r in out["records"]:
        share = 100 * r["codec_share_of_round"]
        print(f"{r['setting']:>24}: {r['codec_seconds_per_round']:.4f} s/round ({share:.1f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from: {', '.join(SETTINGS)}")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--runs-dir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--retime", action="store_true", help="only re-measure the codec cost of the records in --json "
                    "against a short f32 run (on an idle machine), keeping their accuracy and bytes")
    args = ap.parse_args()
    if args.retime:
        return retime(args.json, args.data_dir)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="fedloom-compression-"))
    records = []
    for name in names:
        rec = run_setting(name, args.rounds, runs_dir, args.data_dir)
        records.append(rec)
        print(f"{name:>24}: acc {rec['final_accuracy']:.4f}  up {rec['bytes_up'] / 1e6:9.3f} MB  "
              f"down {rec['bytes_down'] / 1e6:9.3f} MB  {rec['seconds']:.0f}s", flush=True)
    base = next((r for r in records if r["setting"] == "f32"), None)
    cfg = load_config(TASKS["T1"].config, {"data.data_dir": args.data_dir} if args.data_dir else None)
    _, model_factory = prepare(cfg)
    size = sum(t.numel() for t in model_factory().state_dict().values())
    for r in records:
        r["up_reduction"] = base["bytes_up"] / r["bytes_up"] if base else None
        r["down_reduction"] = base["bytes_down"] / r["bytes_down"] if base else None
        r["accuracy_drop"] = base["final_accuracy"] - r["final_accuracy"] if base else None
    add_codec_cost(records, size, base["seconds_per_round"] if base else float("nan"))
    out = {"task": TASKS["T1"].label, "rounds": args.rounds, "model_values": size,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "command": f"benchmarks/compression.py --rounds {args.rounds}", "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print("\n| setting | final acc | Δ vs f32 | MB up | up × | MB down | down × | codec s/round (share) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        drop = "" if r["accuracy_drop"] is None else f"{-100 * r['accuracy_drop']:+.2f}"
        print(f"| {r['setting']} | {100 * r['final_accuracy']:.2f}% | {drop} | "
              f"{r['bytes_up'] / 1e6:.2f} | {r['up_reduction'] or 0:.1f} | {r['bytes_down'] / 1e6:.2f} | "
              f"{r['down_reduction'] or 0:.1f} | {r['codec_seconds_per_round']:.4f} "
              f"({100 * (r['codec_share_of_round'] or 0):.1f}%) |")
    print(f"records: {args.json}")


if __name__ == "__main__":
    main()
