"""`fedloom compare`: several runs side by side, from the run store alone.

One record per run (accuracy, bytes each way, their reduction against the first run, wall time) and one
self-contained HTML page with accuracy per round and per MB uploaded, every run overlaid. The first run
is the baseline: `fedloom compare F32_RUN Q8_RUN TOPK_RUN` reads as "how much smaller, how much worse".
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import RunRecord, RunStore
from .html import _STYLE, _e, _seconds, _time, figure_html, fmt_pct, pipeline_used
from .plots import compare_accuracy_mb, compare_accuracy_round, png_bytes

FINAL_WINDOW = 5  # final accuracy = mean test accuracy of the last (up to) this many evaluated rounds

# Table headers; a line break where a terminal may wrap (the page shows a space): 11 columns fit 120 characters.
COLUMNS = ("run id", "algorithm", "up\ncodec", "down\ncodec", f"final acc\n(last {FINAL_WINDOW})", "best\nacc",
           "MB\nup", "MB\ndown", "up ×", "down ×", "wall\ns")
TEXT_COLUMNS = 4  # run id, algorithm and the codecs; numbers after them (right-aligned on the page)
LEGEND = (f"final acc: mean test accuracy of the last (up to) {FINAL_WINDOW} evaluated rounds; up × and down ×: "
          "reduction factor vs the first run (its bytes / this run's); MB = 10^6 bytes; +EF: error feedback; "
          "+delta: the broadcast is a delta against the model the client holds")

Run = tuple[RunRecord, list[dict[str, Any]]]


def compare_runs(store: RunStore, run_ids: list[str], out: Path | None = None
                 ) -> tuple[list[dict[str, Any]], Path, str | None]:
    """(one record per run, the HTML page written, a warning or None). `out` defaults to
    `<runs dir>/compare-<first run id>-<number of runs>.html`."""
    runs = load_runs(store, run_ids)
    records = comparison_records(runs)
    warning = dataset_warning(records)
    path = Path(out) if out is not None else store.path.parent / f"compare-{records[0]['run_id']}-{len(runs)}.html"
    write_comparison(runs, records, path, warning, store.path)
    return records, path, warning


def load_runs(store: RunStore, run_ids: list[str]) -> list[Run]:
    """The runs in the order given, each id resolved (a unique prefix is enough); unknown ids raise RunError."""
    if len(run_ids) < 2:
        raise ConfigError(f"compare needs at least 2 runs, got {len(run_ids)}",
                          "pass two or more run ids: fedloom compare RUN RUN ...")
    recs = [store.get_run(r) for r in run_ids]
    seen: dict[str, str] = {}
    for given, rec in zip(run_ids, recs, strict=True):
        if rec.run_id in seen:
            raise ConfigError(f"run {rec.run_id} is given twice ('{seen[rec.run_id]}' and '{given}')",
                              "name each run once")
        seen[rec.run_id] = given
    return [(rec, store.rounds(rec.run_id)) for rec in recs]


def comparison_records(runs: list[Run]) -> list[dict[str, Any]]:
    """One flat, JSON-ready record per run; reductions are the first run's bytes over this run's."""
    records = [run_record(rec, rounds) for rec, rounds in runs]
    base = records[0]
    for r in records:
        r["up_reduction"] = _ratio(base["bytes_up"], r["bytes_up"])
        r["down_reduction"] = _ratio(base["bytes_down"], r["bytes_down"])
    return records


def run_record(rec: RunRecord, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison's numbers for one run (reductions are filled in against the first run afterwards)."""
    evaluated = [(r["round"], float(r["test_accuracy"])) for r in rounds if r["test_accuracy"] is not None]
    last = [acc for _, acc in evaluated[-FINAL_WINDOW:]]
    best = max(evaluated, key=lambda e: e[1], default=(None, None))  # the earliest round of the best accuracy
    bytes_up, bytes_down = sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds)
    return {
        "run_id": rec.run_id, "name": rec.name, "status": rec.status,
        "dataset": _section(rec.config, "data").get("dataset"),
        "algorithm": _section(rec.config, "server").get("algorithm", "fedavg"),
        **_codecs(rec.config, rounds),
        "rounds_completed": rec.rounds_completed, "evaluated_rounds": len(evaluated),
        "final_accuracy": sum(last) / len(last) if last else None, "final_window": len(last),
        "best_accuracy": best[1], "best_round": best[0],
        "bytes_up": bytes_up, "bytes_down": bytes_down, "mb_up": bytes_up / 1e6, "mb_down": bytes_down / 1e6,
        "wall_seconds": rec.wall_seconds,
    }


def dataset_warning(records: list[dict[str, Any]]) -> str | None:
    """One line when the runs trained on different datasets: allowed, but their accuracies do not compare."""
    by_dataset: dict[str, list[str]] = {}
    for r in records:
        by_dataset.setdefault(str(r["dataset"]), []).append(r["run_id"])
    if len(by_dataset) < 2:
        return None
    groups = "; ".join(f"{d}: {', '.join(ids)}" for d, ids in by_dataset.items())
    return f"the runs use different datasets ({groups}): their accuracies are not comparable"


def table_cells(record: dict[str, Any]) -> list[str]:
    """One row of the comparison table as text, in `COLUMNS` order (the CLI and the page show the same)."""
    upload = record["upload_codec"] + (" +EF" if record["error_feedback"] else "")
    download = record["download_codec"] + (" +delta" if record["download_delta"] else "")
    return [
        record["run_id"], str(record["algorithm"]), upload, download,
        fmt_pct(record["final_accuracy"]), fmt_pct(record["best_accuracy"]), _mb(record["mb_up"]),
        _mb(record["mb_down"]), _factor(record["up_reduction"]), _factor(record["down_reduction"]),
        f"{record['wall_seconds']:.1f}",
    ]


# ---- the page ---------------------------------------------------------------------------------------

def write_comparison(runs: list[Run], records: list[dict[str, Any]], path: Path, warning: str | None,
                     store_path: Path) -> Path:
    """The self-contained HTML page: the table, the runs' details and the two overlaid plots."""
    labelled = [(_label(r), rounds) for r, (_, rounds) in zip(records, runs, strict=True)]
    head = "".join(f"<th>{_e(c.replace(chr(10), ' '))}</th>" for c in COLUMNS)
    rows = "\n".join("<tr>" + "".join(_cell(v, i >= TEXT_COLUMNS) for i, v in enumerate(table_cells(r))) + "</tr>"
                     for r in records)
    body = "\n".join([
        f"<h1>Comparison of {len(records)} runs</h1>",
        f'<p class="sub">baseline of the reduction factors: <code>{_e(records[0]["run_id"])}</code></p>',
        f'<p class="message">warning: {_e(warning)}</p>' if warning else "",
        f"<table>\n<tr>{head}</tr>\n{rows}\n</table>",
        f'<p class="note">{_e(LEGEND)}.</p>',
        "<h2>Runs</h2>", _details_table(records),
        figure_html(png_bytes(compare_accuracy_round(labelled)), "Accuracy per round",
                    "Centralized test accuracy of each run's global model at every evaluated round."),
        figure_html(png_bytes(compare_accuracy_mb(labelled)), "Accuracy against MB uploaded",
                    "The same accuracies against the megabytes all clients had uploaded by then: the further "
                    "left a curve reaches an accuracy, the less upload it took."),
        "<h2>Records</h2>",
        f"<details><summary>as JSON</summary><pre>{_e(json.dumps(records, indent=2))}</pre></details>",
        f'<p class="note">Generated {_e(_time(datetime.now().timestamp()))} from {_e(str(store_path))}.</p>',
    ])
    page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>fedloom comparison of {len(records)} runs</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)  # a browser reloading never sees half a page
    return path


def _cell(text: str, numeric: bool) -> str:
    return f'<td class="num">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>"


def _details_table(records: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("run id", "name", "status", "dataset", "rounds", "evaluated",
                                             "best round", "client transforms", "wall time"))
    rows = []
    for r in records:
        cells = (r["run_id"], r["name"], r["status"], str(r["dataset"]), str(r["rounds_completed"]),
                 str(r["evaluated_rounds"]), "–" if r["best_round"] is None else str(r["best_round"]),
                 " -> ".join(r["client_transforms"]) or "–", _seconds(r["wall_seconds"]))
        rows.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in cells) + "</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


# ---- helpers ----------------------------------------------------------------------------------------

def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    part = config.get(name)
    return part if isinstance(part, dict) else {}


def _chain(value: Any) -> str | None:
    """A codec chain as the config holds it (a list or 'a+b' text) as one 'a+b' string."""
    if isinstance(value, list | tuple):
        return "+".join(map(str, value)) or None
    return str(value) if value else None


def _codecs(config: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What the messages went through: the round metrics when rounds were recorded (they say what ran),
    else the config (a run that has not finished a round yet); f32 and nothing else when neither says."""
    if rounds:
        used = pipeline_used(rounds)
    else:
        pipe = _section(config, "pipeline")
        used = {"upload_codec": _chain(pipe.get("upload")), "download_codec": _chain(pipe.get("download")),
                "download_delta": pipe.get("download_delta"), "error_feedback": pipe.get("error_feedback"),
                "client_transforms": pipe.get("client")}
    return {"upload_codec": str(used.get("upload_codec") or "f32"),
            "download_codec": str(used.get("download_codec") or "f32"),
            "download_delta": bool(used.get("download_delta")), "error_feedback": bool(used.get("error_feedback")),
            "client_transforms": [str(t) for t in used.get("client_transforms") or []]}


def _ratio(base: int, this: int) -> float | None:
    return base / this if this else None


def _mb(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def _factor(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}x" if x >= 10 else f"{x:.2f}x"


def _label(record: dict[str, Any]) -> str:
    """Legend text: the run id, and its codecs when not the plain float32 path."""
    parts = [] if record["upload_codec"] == "f32" and not record["error_feedback"] else [
        "up " + record["upload_codec"] + (" +EF" if record["error_feedback"] else "")]
    if record["download_codec"] != "f32" or record["download_delta"]:
        parts.append("down " + record["download_codec"] + (" +delta" if record["download_delta"] else ""))
    return record["run_id"] + (f" ({', '.join(parts)})" if parts else "")
