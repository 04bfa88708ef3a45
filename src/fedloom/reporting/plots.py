"""PNG plots of one run, drawn from the run store alone.

Reading only the store means a finished, failed or killed run can be plotted later, and a run still in
progress can be plotted while it writes. Every plot copes with zero or one recorded round and with
metrics that a run did not record: the panel says "no data yet" instead of failing.

Figures are built with `matplotlib.figure.Figure`, not pyplot: rendering then needs no display and
touches no global backend or figure registry, so plotting inside a notebook or a server leaves them alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..diagnosis import accuracy_by_round, fairness_series
from ..store import RunStore

MAX_LINES = 20  # above this many clients, per-client lines become a median and a 10-90% band
MAX_HEATMAP_CLIENTS = 50
MAX_BARS = 30  # above this many clients, global vs personalized accuracy is a scatter instead of bars
MAX_ANNOTATED = (20, 10)  # (clients, classes) up to which heatmap cells show their counts
DPI = 100
LOG_SPREAD = 20  # compared runs whose upload volumes differ by more than this share a log MB axis
_LINESTYLES = ("-", "--", ":", "-.")  # past 10 runs the colour cycle repeats: the line style tells them apart


def make_plots(store: RunStore, run_id: str, out_dir: Path) -> dict[str, Path]:
    """Write the report PNGs into `out_dir`; returns {name: path}.

    Six always; a seventh, "personalization", only for runs that recorded personalized accuracy.
    """
    run_id = store.get_run(run_id).run_id  # resolves a unique prefix, refuses an unknown id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = store.rounds(run_id)
    evals = store.client_rounds(run_id, "eval")
    personal = store.client_rounds(run_id, "personal")
    drawers: dict[str, Callable[[], Figure]] = {
        "accuracy_loss": lambda: _accuracy_loss(rounds),
        "accuracy_mb": lambda: _accuracy_mb(rounds),
        "client_spread": lambda: _client_spread(rounds, evals),
        "fairness": lambda: _fairness(rounds, evals),
        "label_heatmap": lambda: _label_heatmap(store.clients(run_id)),
        "update_norms": lambda: _update_norms(rounds, store.client_rounds(run_id, "fit")),
    }
    if personal or any(_finite(r["metrics"].get("pers_accuracy")) for r in rounds):
        drawers["personalization"] = lambda: _personalization(rounds, evals, personal)
    paths = {}
    for key, draw in drawers.items():
        fig = draw()
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key], dpi=DPI, metadata={"Software": None})  # no version string: stable bytes
    return paths


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, for pages that embed their plots without writing files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def accuracy_by_mb(rounds: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(cumulative MB uploaded, test accuracy) at each evaluated round.

    The bytes of every round count, evaluated or not: the x value is what the clients had sent in total
    when the model reached that accuracy. MB are decimal (10^6 bytes), as everywhere in fedloom.
    """
    xs, ys, total = [], [], 0
    for r in rounds:
        total += r["bytes_up"]
        if _finite(r["test_accuracy"]):
            xs.append(total / 1e6)
            ys.append(float(r["test_accuracy"]))
    return xs, ys


def compare_accuracy_round(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> Figure:
    """Test accuracy per round of several runs, overlaid: `runs` is [(legend label, rounds)]."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    title = "test accuracy per round"
    curves = [(label, _series(rounds, lambda r: r["test_accuracy"])) for label, rounds in runs]
    if not any(xs for _, (xs, _) in curves):
        _no_data(ax, title)
        return fig
    for i, (label, (xs, ys)) in enumerate(curves):
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, ls=_LINESTYLES[i // 10 % len(_LINESTYLES)], label=label)
    ax.set_title(title)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    _round_axis(ax)
    return fig


def compare_accuracy_mb(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> Figure:
    """Test accuracy against cumulative MB uploaded of several runs, overlaid; a log x axis when the runs'
    upload volumes differ by more than `LOG_SPREAD`x (a 100x compressed run would otherwise be a dot at 0)."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    title = "test accuracy against MB uploaded"
    curves = [(label, accuracy_by_mb(rounds)) for label, rounds in runs]
    totals = [max(xs) for _, (xs, _) in curves if xs and max(xs) > 0]
    if not totals:
        _no_data(ax, title)
        return fig
    log = max(totals) / min(totals) > LOG_SPREAD
    for i, (label, (xs, ys)) in enumerate(curves):
        pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 or not log]
        if pairs:
            ax.plot(*zip(*pairs, strict=True), marker="o", ms=3, ls=_LINESTYLES[i // 10 % len(_LINESTYLES)],
                    label=label)
    if log:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)  # distances from zero are what a reduction factor compares
    ax.set_title(title)
    ax.set_xlabel("cumulative MB uploaded by all clients" + (" (log scale)" if log else ""))
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, which="both" if log else "major")
    return fig


# ---- helpers ----------------------------------------------------------------------------------------

Row = dict[str, Any]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _series(rounds: list[Row], get: Callable[[Row], Any]) -> tuple[list[int], list[float]]:
    """(round, value) pairs for the rounds where `get` gives a finite number."""
    pairs = [(r["round"], get(r)) for r in rounds]
    pairs = [(x, float(y)) for x, y in pairs if _finite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _metric(key: str) -> Callable[[Row], Any]:
    return lambda r: r["metrics"].get(key)


def _no_data(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="0.45",
            fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])


def _round_axis(ax: Axes) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


# ---- the figures -----------------------------------------------------------------------------------

def _accuracy_loss(rounds: list[Row]) -> Figure:
    """Centralized test accuracy and loss per round, with the federated mean accuracy and train loss."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    acc = _series(rounds, lambda r: r["test_accuracy"])
    fed = _series(rounds, _metric("fed_accuracy"))
    if acc[0] or fed[0]:
        if acc[0]:
            acc_ax.plot(*acc, marker="o", ms=3, label="test (centralized)")
        if fed[0]:
            acc_ax.plot(*fed, marker="s", ms=3, ls="--", label="clients, weighted mean")
        acc_ax.set_title("accuracy")
        acc_ax.set_ylabel("accuracy")
        acc_ax.legend(loc="lower right")
        _round_axis(acc_ax)
    else:
        _no_data(acc_ax, "accuracy")
    test_loss = _series(rounds, lambda r: r["test_loss"])
    train_loss = _series(rounds, lambda r: r["train_loss"])
    if test_loss[0] or train_loss[0]:
        if test_loss[0]:
            loss_ax.plot(*test_loss, marker="o", ms=3, label="test (centralized)")
        if train_loss[0]:
            loss_ax.plot(*train_loss, ls="--", label="train (clients' local loss)")
        loss_ax.set_title("loss")
        loss_ax.set_ylabel("cross-entropy")
        loss_ax.legend(loc="upper right")
        _round_axis(loss_ax)
    else:
        _no_data(loss_ax, "loss")
    return fig


def _accuracy_mb(rounds: list[Row]) -> Figure:
    """Accuracy against the bytes it cost to reach it, and the cumulative traffic each way per round."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, mb_ax = fig.subplots(1, 2)
    xs, ys = accuracy_by_mb(rounds)
    title = "test accuracy against MB uploaded"
    if xs:
        acc_ax.plot(xs, ys, marker="o", ms=3)
        acc_ax.set_title(title)
        acc_ax.set_xlabel("cumulative MB uploaded by all clients")
        acc_ax.set_xlim(left=0)
        acc_ax.set_ylabel("accuracy")
        acc_ax.grid(alpha=0.3)
    else:
        _no_data(acc_ax, title)
    if rounds:
        x = [r["round"] for r in rounds]
        up, down = (np.cumsum([r[k] for r in rounds]) / 1e6 for k in ("bytes_up", "bytes_down"))
        mb_ax.plot(x, up, marker="o", ms=3, label="up (clients to server)")
        mb_ax.plot(x, down, ls="--", label="down (server to clients)")
        mb_ax.set_title("cumulative traffic")
        mb_ax.set_ylabel("MB")
        mb_ax.set_ylim(bottom=0)
        mb_ax.legend(loc="upper left")
        _round_axis(mb_ax)
    else:
        _no_data(mb_ax, "cumulative traffic")
    return fig


def _client_spread(rounds: list[Row], evals: list[Row]) -> Figure:
    """How unequal the global model is across clients: spread per round, and the last round's clients."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    band_ax, strip_ax = fig.subplots(1, 2, width_ratios=(3, 1))
    keys = ("min", "p10", "median", "max")
    full = [r for r in rounds if all(_finite(r["metrics"].get(f"fed_accuracy_{k}")) for k in keys)]
    mean = _series(rounds, _metric("fed_accuracy"))
    if full or mean[0]:
        if full:
            x = [r["round"] for r in full]
            lo, p10, med, hi = ([r["metrics"][f"fed_accuracy_{k}"] for r in full] for k in keys)
            band_ax.fill_between(x, lo, hi, alpha=0.2, color="C0", label="min - max")
            band_ax.fill_between(x, p10, med, alpha=0.4, color="C0", label="p10 - median")
        if mean[0]:
            band_ax.plot(*mean, color="C1", marker="o", ms=3, label="weighted mean")
        band_ax.set_title("per-client accuracy (federated evaluation)")
        band_ax.set_ylabel("accuracy")
        band_ax.legend(loc="lower right")
        _round_axis(band_ax)
    else:
        _no_data(band_ax, "per-client accuracy (federated evaluation)")
    last_round = max((e["round"] for e in evals), default=None)
    accs = [e["accuracy"] for e in evals if e["round"] == last_round and _finite(e["accuracy"])]
    if accs:
        strip_ax.boxplot(accs, widths=0.5, showfliers=False)
        jitter = np.linspace(-0.18, 0.18, len(accs)) if len(accs) > 1 else np.zeros(1)
        strip_ax.scatter(1 + jitter, accs, s=10, alpha=0.6, color="C1", zorder=3)
        strip_ax.set_xticks([1], [f"{len(accs)} clients"])
        strip_ax.set_title(f"round {last_round}")
        strip_ax.grid(alpha=0.3, axis="y")
    else:
        _no_data(strip_ax, "last evaluated round")
    return fig


def _label_heatmap(clients: list[Row]) -> Figure:
    """Train label counts per client: the picture of how non-IID the partition is."""
    shown = clients[:MAX_HEATMAP_CLIENTS]
    width = max((len(c["label_counts"]) for c in shown), default=0)
    size = (min(14.0, max(5.0, 1.5 + 0.5 * width)), min(8.0, max(3.0, 1.2 + 0.25 * len(shown))))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    title = "train labels per client"
    if not shown or width == 0:
        _no_data(ax, title)
        return fig
    counts = np.zeros((len(shown), width), dtype=np.int64)
    for i, c in enumerate(shown):
        counts[i, : len(c["label_counts"])] = c["label_counts"]
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="examples")
    if len(clients) > MAX_HEATMAP_CLIENTS:
        title += f" (first {MAX_HEATMAP_CLIENTS} of {len(clients)} clients)"
    ax.set_title(title)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(0, width, max(1, width // 20)))
    ids = [c["client_id"] for c in shown]
    step = max(1, len(ids) // 25)
    ax.set_yticks(range(0, len(ids), step), [str(i) for i in ids[::step]])  # ids need not be 0..n-1
    if len(shown) <= MAX_ANNOTATED[0] and width <= MAX_ANNOTATED[1]:
        threshold = counts.max() / 2
        for (i, j), v in np.ndenumerate(counts):
            color = "black" if v > threshold else "white"  # readable on both ends of viridis
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    return fig


def _update_norms(rounds: list[Row], fits: list[Row]) -> Figure:
    """Client update sizes and their agreement with the aggregate: drift and outliers show up here."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    norm_ax, cos_ax = fig.subplots(1, 2)
    fits = [f for f in fits if _finite(f["update_norm"])]
    by_client: dict[int, tuple[list[int], list[float]]] = {}
    for f in fits:
        xs, ys = by_client.setdefault(f["client_id"], ([], []))
        xs.append(f["round"])
        ys.append(f["update_norm"])
    title = "client update L2 norm"
    if not by_client:
        _no_data(norm_ax, title)
    elif len(by_client) <= MAX_LINES:
        for cid, (xs, ys) in sorted(by_client.items()):
            norm_ax.plot(xs, ys, marker="o", ms=2, lw=1, label=f"client {cid}")
        norm_ax.legend(fontsize=7, ncol=2 if len(by_client) > 10 else 1, loc="best")
    else:
        per_round: dict[int, list[float]] = {}
        for f in fits:
            per_round.setdefault(f["round"], []).append(f["update_norm"])
        x = sorted(per_round)
        p10, med, p90 = np.array([np.percentile(per_round[r], [10, 50, 90]) for r in x]).T
        norm_ax.fill_between(x, p10, p90, alpha=0.3, label="p10 - p90")
        norm_ax.plot(x, med, marker="o", ms=2, label="median")
        norm_ax.legend(loc="best")
        title += f" ({len(by_client)} clients)"
    if by_client:
        norm_ax.set_title(title)
        norm_ax.set_ylabel("||local - global||")
        _round_axis(norm_ax)
    cos = _series(rounds, _metric("cosine_mean"))
    if cos[0]:
        cos_ax.plot(*cos, marker="o", ms=3)
        cos_ax.axhline(0, color="0.5", lw=0.8)
        cos_ax.set_title("mean cosine similarity of updates to the aggregate")
        cos_ax.set_ylabel("cosine")
        _round_axis(cos_ax)
    else:
        _no_data(cos_ax, "mean cosine similarity of updates to the aggregate")
    return fig


def _fairness(rounds: list[Row], evals: list[Row]) -> Figure:
    """Mean, worst-10% and best-10% client accuracy per evaluated round, Jain's index on a twin axis.

    Every client counts once (unlike the example-weighted mean elsewhere): a small client failed by the
    global model shows up here. Runs that predate the fair_* metrics get them recomputed from client rows.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    title = "fairness of the global model across clients (every client counts once)"
    series = fairness_series(rounds, evals)
    if not series:
        _no_data(ax, title)
        return fig
    for key, label, style in (("best10", "best 10%", "--"), ("mean", "mean", "-"), ("worst10", "worst 10%", "--")):
        x = [r for r, f in series if key in f]
        ax.plot(x, [f[key] for r, f in series if key in f], ls=style, marker="o", ms=3, label=label)
    ax.set_title(title)
    ax.set_ylabel("client accuracy")
    _round_axis(ax)
    jain = [(r, f["jain"]) for r, f in series if "jain" in f]
    handles, labels = ax.get_legend_handles_labels()
    if jain:
        jax = ax.twinx()
        line = jax.plot([r for r, _ in jain], [j for _, j in jain], color="C3", ls=":", marker="^", ms=4)[0]
        jax.set_ylabel("Jain's index (1 = all clients equal)")
        jax.set_ylim(max(0.0, min(j for _, j in jain) - 0.05), 1.005)
        handles, labels = [*handles, line], [*labels, "Jain's index (right axis)"]
    ax.legend(handles, labels, loc="best", fontsize=8)
    return fig


def _personalization(rounds: list[Row], evals: list[Row], personal: list[Row]) -> Figure:
    """Global vs personalized accuracy: per client in the last round that has both, and the means per round."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    client_ax, curve_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    glob, pers = accuracy_by_round(evals), accuracy_by_round(personal)
    both = sorted(r for r in pers if r in glob and set(pers[r]) & set(glob[r]))
    if both:
        rnd = both[-1]
        ids = sorted(set(pers[rnd]) & set(glob[rnd]))
        g, p = [glob[rnd][c] for c in ids], [pers[rnd][c] for c in ids]
        if len(ids) <= MAX_BARS:
            x = np.arange(len(ids))
            client_ax.bar(x - 0.2, g, width=0.4, label="global model")
            client_ax.bar(x + 0.2, p, width=0.4, label="personalized")
            client_ax.set_xticks(x, [str(c) for c in ids])
            client_ax.set_xlabel("client")
            client_ax.set_ylabel("accuracy on the client's test split")
            client_ax.set_ylim(0, 1.15)  # headroom above 100% for the legend
            client_ax.legend(loc="upper center", ncol=2, fontsize=8)
        else:
            client_ax.scatter(g, p, s=10, alpha=0.6)
            client_ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, label="no change")
            client_ax.set_xlabel("global model accuracy")
            client_ax.set_ylabel("personalized accuracy")
            client_ax.legend(loc="lower right", fontsize=8)
        client_ax.set_title(f"per client, round {rnd}")
        client_ax.grid(alpha=0.3, axis="y")
    else:
        _no_data(client_ax, "per client")
    lines = [(_series(rounds, _metric("fed_accuracy")), "global, weighted mean", "-"),
             (_series(rounds, _metric("pers_accuracy")), "personalized, weighted mean", "-"),
             (_fair_series(fairness_series(rounds, evals)), "global, worst 10%", "--"),
             (_fair_series(fairness_series(rounds, personal, "pers_fair")), "personalized, worst 10%", "--")]
    if any(xs for (xs, _), _, _ in lines):
        for i, ((xs, ys), label, style) in enumerate(lines):
            if xs:
                curve_ax.plot(xs, ys, ls=style, marker="o", ms=3, color=f"C{i % 2}", label=label)
        curve_ax.set_title("client accuracy over rounds")
        curve_ax.set_ylabel("accuracy")
        curve_ax.legend(loc="best", fontsize=8)
        _round_axis(curve_ax)
    else:
        _no_data(curve_ax, "client accuracy over rounds")
    return fig


def _fair_series(series: list[tuple[int, dict[str, float]]], key: str = "worst10") -> tuple[list[int], list[float]]:
    pairs = [(r, f[key]) for r, f in series if key in f]
    return [r for r, _ in pairs], [v for _, v in pairs]
