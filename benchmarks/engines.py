"""Engines vs a hand-written PyTorch loop on T1 and T2, plus the population scale check.

    .venv/bin/python benchmarks/engines.py [--rounds 10] [--repeat 3] [--no-scale] [--json FILE]

A thin wrapper over `fedloom.bench.run_bench` (the same as `fedloom bench --tasks T1,T2 --scale --json ...`),
so the committed results come from the code users run. Run it on an otherwise idle machine: every
measurement is a fresh process timed against the plain loop, and a busy machine skews both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedloom.bench import run_bench

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "engines.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="T1,T2,T2e")
    ap.add_argument("--engines", default=None, help="default: sequential, parallel, vectorized, ray if installed")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (medians pooled)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--no-scale", action="store_true", help="skip the 1,000 vs 100,000 clients check")
    ap.add_argument("--data-dir")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    run_bench(args.tasks, args.engines, args.rounds, args.json, scale=not args.no_scale, data_dir=args.data_dir,
              threads=args.threads, repeat=args.repeat)


if __name__ == "__main__":
    main()
