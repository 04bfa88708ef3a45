"""A self-contained HTML report of one run, built from the run store.

One file with the plots embedded as data URIs and no external CSS, JS or fonts: it can be mailed,
attached to a ticket or opened offline years later and still show everything. Every string that came
from a run (names, messages, config values) is escaped, so a config cannot inject markup.
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..diagnosis import SEVERITIES, Diagnosis, accuracy_by_round, diagnose, fairness_series
from ..store import RunRecord, RunStore
from .plots import make_plots

MAX_CLIENT_ROWS = 500  # beyond this the per-client table is cut; the plots summarise the whole population

_PLOTS = (
    ("accuracy_loss", "Accuracy and loss",
     "Centralized test accuracy and loss of the global model per evaluated round; the dashed accuracy line "
     "is the example-weighted mean over the clients' own test splits."),
    ("accuracy_mb", "Accuracy against data uploaded",
     "Left: centralized test accuracy at each evaluated round against the megabytes (10^6 bytes) all clients "
     "had uploaded by then; a compressed run reaches the same accuracy further left. Right: cumulative "
     "megabytes up (clients to server) and down (server to clients) per round."),
    ("client_spread", "Accuracy across clients",
     "Federated evaluation: the global model's accuracy on each client's test split. Bands show min-max and "
     "p10-median per round; the right panel shows every client in the last evaluated round."),
    ("fairness", "Fairness across clients",
     "The global model's accuracy on each client's test split with every client counting once: the mean, the "
     "worst and best 10% of clients, and Jain's index (right axis; 1 when all clients score alike)."),
    ("personalization", "Personalization",
     "Each client's accuracy with the global model and with its personalized model (left, last round that "
     "recorded both), and the example-weighted mean and worst-10% accuracy of each over rounds (right)."),
    ("label_heatmap", "Label distribution",
     "Training examples per client and class: how non-IID the partition is."),
    ("update_norms", "Client updates",
     "L2 norm of each client's update and the mean cosine similarity of the updates to their aggregate. "
     "Growing norms or falling cosine indicate client drift."),
)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kv th { width: 14rem; }
.status { display: inline-block; padding: 0.1rem 0.5rem; border-radius: 0.3rem; font-weight: 600; color: #fff;
          background: #888; }
.status.completed { background: #2e7d32; } .status.running { background: #1565c0; }
.status.failed, .status.diverged { background: #c62828; } .status.interrupted { background: #ef6c00; }
.message { background: #fff8e1; border-left: 4px solid #ef6c00; padding: 0.5rem 0.8rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.note { color: #666; font-size: 0.9rem; }
.finding { border-left: 4px solid #888; background: #fafafa; padding: 0.4rem 0.8rem; margin: 0.5rem 0; }
.finding.problem { border-color: #c62828; } .finding.warning { border-color: #ef6c00; }
.finding.info { border-color: #1565c0; }
.finding ul { margin: 0.3rem 0; } .finding details { font-size: 0.85rem; }
"""


def write_report(store: RunStore, run_id: str, out_dir: Path | None = None) -> Path:
    """Write `report.html` and its PNGs into `out_dir` (default: the run's output dir); returns the page."""
    rec = store.get_run(run_id)
    out = Path(out_dir) if out_dir is not None else Path(rec.output_dir)
    plots = make_plots(store, rec.run_id, out)
    rounds = store.rounds(rec.run_id)
    body = "\n".join([
        _header(rec),
        "<h2>Setup</h2>", _kv_table(_setup(rec)),
        "<h2>Summary</h2>", _kv_table(_summary(rec, rounds)),
        _diagnosis_section(store, rec.run_id),
        *_figures(plots, store, rec.run_id, rounds),
        _clients_section(store, rec.run_id),
        _robustness_section(store, rec.run_id, rounds),
        "<h2>Versions</h2>", _kv_table([(k, str(v)) for k, v in sorted(rec.versions.items())]),
        "<h2>Configuration</h2>",
        "<details><summary>full configuration</summary>"
        f"<pre>{_e(json.dumps(rec.config, indent=2))}</pre></details>",
        f'<p class="note">Generated {_e(_time(datetime.now().timestamp()))} from {_e(str(store.path))}.</p>',
    ])
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>fedloom report: {_e(rec.name)} ({_e(rec.run_id)})</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)  # a reader (or a browser reloading) never sees half a page
    return path


# ---- formatting -------------------------------------------------------------------------------------

def _e(text: str) -> str:
    return html.escape(text, quote=True)


def fmt_pct(x: float | None) -> str:
    """Accuracy as the page shows it, e.g. 0.87654 -> '87.65%'."""
    return "–" if x is None else f"{100 * x:.2f}%"


def fmt_bytes(n: int) -> str:
    """Human-readable (decimal units, as the CLI prints them) plus the exact count."""
    value, unit = float(n), "B"
    for next_unit in ("KB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            break
        value, unit = value / 1000, next_unit
    human = f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
    return f"{human} ({n:,} bytes)"


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    minutes, sec = divmod(round(s), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _num(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def _get(config: dict[str, Any], section: str, key: str) -> Any:
    """`config[section][key]`, or None when the stored config lacks it (older or hand-written configs)."""
    part = config.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _labelled(label: str, value: Any) -> str | None:
    return None if value is None else f"{label} {value}"


def _joined(*parts: str | None) -> str | None:
    """Comma-joined parts that are known; None when none is (the table then shows a dash)."""
    return ", ".join(p for p in parts if p) or None


# ---- sections ---------------------------------------------------------------------------------------

def _header(rec: RunRecord) -> str:
    status = _e(rec.status)
    parts = [
        f"<h1>{_e(rec.name)}</h1>",
        f'<p class="sub">run <code>{_e(rec.run_id)}</code> &middot; '
        f'<span class="status {status}">{status}</span> &middot; started {_e(_time(rec.created_at))}</p>',
    ]
    if rec.message:
        parts.append(f'<p class="message">{_e(rec.message)}</p>')
    return "\n".join(parts)


def _setup(rec: RunRecord) -> list[tuple[str, str]]:
    cfg = rec.config

    def g(section: str, key: str) -> Any:
        return _get(cfg, section, key)

    partition = g("data", "partition")
    detail = {"dirichlet": ("alpha", "alpha"), "shards": ("classes per client", "classes_per_client"),
              "quantity": ("beta", "beta"), "feature-noise": ("sigma", "noise_sigma")}.get(partition)
    if detail and g("data", detail[1]) is not None:
        partition = f"{partition} ({detail[0]} = {g('data', detail[1])})"
    per_round = g("server", "clients_per_round")
    if per_round is None and g("server", "fraction") is not None:
        per_round = f"fraction {g('server', 'fraction')}"
    steps, epochs = g("train", "local_steps"), g("train", "local_epochs")
    epochs_text = None if epochs is None else f"{epochs} epoch{'' if epochs == 1 else 's'}"
    local = _joined(f"{steps} local steps" if steps else epochs_text,
                    _labelled("batch", g("train", "batch_size")), _labelled("lr", g("train", "lr")),
                    _labelled("momentum", g("train", "momentum") or None))
    server = _joined(g("server", "optimizer"), _labelled("lr", g("server", "lr")),
                     _labelled("momentum", g("server", "momentum") or None))
    eval_every = g("eval", "every") or g("run", "eval_every")
    rows = [
        ("run id", rec.run_id), ("name", rec.name), ("status", rec.status), ("message", rec.message),
        ("seed", rec.seed), ("dataset", g("data", "dataset")), ("partition", partition),
        ("clients", g("data", "num_clients")), ("clients per round", per_round),
        ("model", g("model", "name")), ("algorithm", g("server", "algorithm")),
        ("local training", local), ("server optimizer", server),
        ("rounds planned", rec.rounds_planned), ("evaluate every", eval_every),
        ("engine", g("run", "engine")), ("output directory", rec.output_dir),
    ]
    return [(k, "–" if v is None else str(v)) for k, v in rows]


def _summary(rec: RunRecord, rounds: list[dict[str, Any]]) -> list[tuple[str, str]]:
    evals = [r for r in rounds if r["test_accuracy"] is not None]
    last = evals[-1] if evals else None
    best = max(evals, key=lambda r: r["test_accuracy"], default=None)
    fed = [r for r in rounds if r["metrics"].get("fed_accuracy") is not None]
    rows = [
        ("rounds completed / planned", f"{rec.rounds_completed} / {rec.rounds_planned}"),
        ("final accuracy", f"{fmt_pct(last['test_accuracy'])} (round {last['round']})" if last else "–"),
        ("best accuracy", f"{fmt_pct(best['test_accuracy'])} (round {best['round']})" if best else "–"),
        ("final test loss", _num(last["test_loss"]) if last else "–"),
        ("final macro-F1", _num(last["test_macro_f1"]) if last else "–"),
    ]
    if fed:
        m = fed[-1]["metrics"]
        rows.append(("final client accuracy", f"mean {fmt_pct(m.get('fed_accuracy'))}, "
                     f"p10 {fmt_pct(m.get('fed_accuracy_p10'))}, min {fmt_pct(m.get('fed_accuracy_min'))} "
                     f"(round {fed[-1]['round']})"))
    per_round = rec.wall_seconds / rec.rounds_completed if rec.rounds_completed else None
    rows += [
        ("wall time", f"{_seconds(rec.wall_seconds)} ({_seconds(per_round)} per round)"),
        ("bytes up (clients to server)", fmt_bytes(sum(r["bytes_up"] for r in rounds))),
        ("bytes down (server to clients)", fmt_bytes(sum(r["bytes_down"] for r in rounds))),
    ]
    return rows + _pipeline_rows(pipeline_used(rounds))


PIPELINE_KEYS = ("upload_codec", "download_codec", "download_delta", "error_feedback", "client_transforms",
                 "aggregator")


def pipeline_used(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run's messages went through, from the last round that recorded it; {} for the plain path.

    Rounds record these keys only when a run departs from float32 messages and the mean aggregator, so
    an empty dict means: f32 both ways, no client transforms, no error feedback.
    """
    for r in reversed(rounds):
        used = {k: r["metrics"][k] for k in PIPELINE_KEYS if k in r["metrics"]}
        if used:
            return used
    return {}


def _pipeline_rows(used: dict[str, Any]) -> list[tuple[str, str]]:
    if not used:
        return []
    upload = str(used.get("upload_codec", "f32")) + (" with error feedback" if used.get("error_feedback") else "")
    download = str(used.get("download_codec", "f32")) + (" of the delta" if used.get("download_delta") else "")
    rows = [("upload codec", upload), ("download codec", download)]
    if used.get("client_transforms"):
        rows.append(("client transforms", " -> ".join(map(str, used["client_transforms"]))))
    if used.get("aggregator"):
        rows.append(("aggregator", str(used["aggregator"])))
    return rows


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">\n{body}\n</table>'


def _figure(path: Path, title: str, caption: str) -> str:
    return figure_html(path.read_bytes(), title, caption)


def figure_html(png: bytes, title: str, caption: str) -> str:
    """A titled figure with the PNG embedded as a data URI (the page needs no other file)."""
    data = base64.b64encode(png).decode("ascii")
    return (f"<h2>{_e(title)}</h2>\n<figure><img alt=\"{_e(title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _clients_section(store: RunStore, run_id: str) -> str:
    clients = store.clients(run_id)
    evals = store.client_rounds(run_id, "eval")
    last_round = max((e["round"] for e in evals), default=None)
    ev = {e["client_id"]: e for e in evals if e["round"] == last_round}
    norms = {f["client_id"]: f["update_norm"] for f in store.client_rounds(run_id, "fit")}  # ordered by round
    title = f"Clients (round {last_round})" if last_round is not None else "Clients"
    parts = [f"<h2>{_e(title)}</h2>"]
    if last_round is None:
        parts.append('<p class="note">No federated evaluation recorded yet.</p>')
    if len(clients) > MAX_CLIENT_ROWS:
        parts.append(f'<p class="note">Showing the first {MAX_CLIENT_ROWS} of {len(clients)} clients.</p>')
    head = "".join(f"<th>{h}</th>" for h in
                   ("client", "train examples", "test examples", "accuracy", "loss", "last update norm"))
    rows = []
    for c in clients[:MAX_CLIENT_ROWS]:
        e = ev.get(c["client_id"], {})
        cells = (str(c["client_id"]), str(c["num_train"]), str(c["num_test"]), fmt_pct(e.get("accuracy")),
                 _num(e.get("loss")), _num(norms.get(c["client_id"]), ".4g"))
        rows.append("<tr>" + "".join(f'<td class="num">{_e(v)}</td>' for v in cells) + "</tr>")
    parts.append(f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>")
    return "\n".join(parts)


def _robustness_section(store: RunStore, run_id: str, rounds: list[dict[str, Any]]) -> str:
    """Attacks and detection (docs/robustness.md): who attacked, who was flagged or left out, and detection's
    precision and recall over the run; empty for a run that recorded none of it."""
    from ..server.detection import summarize

    summary = summarize(rounds, store.client_rounds(run_id, "fit"))
    if summary is None:
        return ""
    last = rounds[-1]["metrics"] if rounds else {}
    kv = [("attack", str(last.get("attack", "none"))), ("aggregator", str(last.get("aggregator", "mean")))]
    if summary["attack"]:
        kv += [("attacking clients", ", ".join(map(str, summary["attackers"])) or "none"),
               ("detection precision", _num(summary["precision"], ".2f")),
               ("detection recall", _num(summary["recall"], ".2f"))]
    backdoor = [r["metrics"]["backdoor_success"] for r in rounds if r["metrics"].get("backdoor_success") is not None]
    if backdoor:
        kv.append(("backdoor success (last evaluation)", fmt_pct(backdoor[-1])))
    head = "".join(f"<th>{h}</th>" for h in ("client", "rounds", "flagged", "left out (suspicion)",
                                              "dropped (NaN/Inf)", "max suspicion", "attacked in"))
    rows = ["<tr>" + "".join(f'<td class="num">{_e(v)}</td>' for v in (
                str(d["client"]), str(d["rounds"]), str(d["flagged"]), str(d["excluded"]), str(d["non_finite"]),
                _num(d["max_suspicion"], ".2f"), str(d["attacked"]))) + "</tr>"
            for d in summary["clients"][:MAX_CLIENT_ROWS]]
    return "\n".join(["<h2>Attacks and detection</h2>", _kv_table(kv),
                      '<p class="note">Suspicion 0..1 per client and round from its update (docs/robustness.md); '
                      "clients most often flagged first.</p>",
                      f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"])


def _figures(plots: dict[str, Path], store: RunStore, run_id: str, rounds: list[dict[str, Any]]) -> list[str]:
    """The plots in page order (personalization only when drawn), the fairness one with its table."""
    out = []
    for key, title, caption in _PLOTS:
        if key in plots:
            out.append(_figure(plots[key], title, caption))
        if key == "fairness":
            out.append(_fairness_table(store, run_id, rounds))
    return out


_SEVERITY_TITLES = {"problem": "Problems", "warning": "Warnings", "info": "Info"}


def _diagnosis_section(store: RunStore, run_id: str) -> str:
    """The findings of `fedloom diagnose`, grouped by severity, each with its remedies and evidence."""
    parts = ["<h2>Diagnosis</h2>"]
    try:
        found: Diagnosis = diagnose(store, run_id)
    except Exception as e:  # the report is what a finished run leaves behind: a diagnosis bug must not cost it
        return parts[0] + f'\n<p class="note">Diagnosis unavailable: {_e(f"{type(e).__name__}: {e}")}</p>'
    problems, warnings = len(found.of("problem")), len(found.of("warning"))
    parts.append(f'<p class="note">{problems} problem{"" if problems == 1 else "s"}, {warnings} warning'
                 f'{"" if warnings == 1 else "s"}; the same as <code>fedloom diagnose {_e(run_id)}</code>.</p>')
    for severity in SEVERITIES:
        findings = found.of(severity)
        if findings:
            parts.append(f"<h3>{_SEVERITY_TITLES[severity]}</h3>")
        for f in findings:
            remedies = "".join(f"<li>{_e(r)}</li>" for r in f.remedies)
            parts.append(
                f'<div class="finding {severity}"><strong>{_e(f.kind.replace("_", " "))}</strong>: {_e(f.message)}'
                + (f"<ul>{remedies}</ul>" if remedies else "")
                + f"<details><summary>evidence</summary><pre>{_e(json.dumps(f.evidence, indent=2))}</pre>"
                "</details></div>")
    return "\n".join(parts)


def _fairness_table(store: RunStore, run_id: str, rounds: list[dict[str, Any]]) -> str:
    """The latest fairness figures of the global model and, when recorded, of the personalized models."""
    evals, personal = store.client_rounds(run_id, "eval"), store.client_rounds(run_id, "personal")
    series = fairness_series(rounds, evals)
    if not series:
        return '<p class="note">No per-client evaluation recorded yet.</p>'
    rnd, glob = series[-1]
    pers = dict(fairness_series(rounds, personal, "pers_fair")).get(rnd)
    clients = len(accuracy_by_round(evals).get(rnd, {}))
    head = "<tr><th>round " + _e(str(rnd)) + "</th><th>global model</th>" + (
        "<th>personalized</th>" if pers else "") + "</tr>"
    rows = []
    for key, label in (("mean", "mean client accuracy"), ("worst10", "worst 10% of clients"),
                       ("best10", "best 10% of clients"), ("std", "standard deviation"), ("jain", "Jain's index")):
        cells = [glob.get(key)] + ([pers.get(key)] if pers else [])
        shown = [_num(v, ".3f") if key == "jain" else fmt_pct(v) for v in cells]
        rows.append(f"<tr><th>{_e(label)}</th>" + "".join(f'<td class="num">{_e(v)}</td>' for v in shown) + "</tr>")
    note = f"{clients} clients, each counting once." if clients else "Every client counts once."
    return f"<table>\n{head}\n" + "\n".join(rows) + f'\n</table>\n<p class="note">{_e(note)}</p>'

