"""Diagnose a run from the run store: what went wrong, in plain words, each finding backed by its numbers.

Like the reports, this reads only the store, so a finished, failed, diverged or killed run can be
diagnosed at any time. Each check looks at one symptom (the run's status, the global loss, client drift,
outlier clients, label skew, fairness, personalization) and returns findings that carry the figures they
read and the remedies that fit this run's config. Metrics an older run did not record are recomputed from
the per-client rows where possible and otherwise skipped, never treated as an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .metrics import fairness
from .store import RunRecord, RunStore

# ---- thresholds ---------------------------------------------------------------------------------------
# docs/diagnose.md states each one as `NAME = value`; tests/test_diagnose.py checks the two agree.
# Loss behaviour
DIVERGE_WINDOW = 3  # a loss rising in each of this many rounds in a row...
DIVERGE_FACTOR = 1.5  # ...to this many times its best is diverging (the run's own stop rule uses 1.5x too)
STALL_WINDOW = 5  # evaluated rounds over which progress is measured
STALL_POINTS = 0.01  # under 1 accuracy point gained in that window is no progress (noise on small test sets)
STALL_FIT_RATIO = 0.5  # training loss still above half its first-round value: the model has not fit the data
OSC_WINDOW = 8  # evaluated rounds searched for oscillation
OSC_STEP = 0.02  # an accuracy move of 2+ points counts as a swing; smaller ones are evaluation noise
OSC_FLIPS = 3  # this many reversals between swings is oscillation, not a lucky bump
# Client drift (over the last DRIFT_WINDOW rounds with client updates)
DRIFT_WINDOW = 5
DRIFT_CV = 0.5  # IID clients doing equal work have update norms within ~20-30% (CV 0.1-0.3); 0.5 is not that
DRIFT_MAX_RATIO = 3.0  # one client's update 3x the median: it moves far from where the others go
COSINE_AGAINST = 0.0  # a client whose median cosine is negative pushes against the aggregate
AGREE_PAIRWISE = 0.2  # agreeing clients' updates have a cosine of 0.2+ with each other (IID digits: 0.2-0.4)
# The bands of the mean cosine to the aggregate depend on the clients per round: see `cosine_bands`.
# Outlier clients
OUTLIER_Z = 3.5  # robust z-score (median/MAD) cut-off of Iglewicz & Hoaglin
OUTLIER_MIN_CLIENTS = 5  # with fewer clients in a round the median and MAD say too little
OUTLIER_MIN_ROUNDS = 2  # "repeatedly": an outlier in at least 2 rounds...
OUTLIER_MIN_SHARE = 0.3  # ...and in at least 30% of the rounds the client trained
# Label skew
SKEW_TV = 0.5  # total-variation distance to the global label mix: half the client's data would have to move
SKEW_MASS = 0.9  # "classes holding 90% of the data" describes how concentrated a client is
# Fairness (accuracy of the global model on each client's own test split, every client counting once)
FAIR_GAP = 0.15  # mean minus worst-10% accuracy, 15 points: some clients are served clearly worse
FAIR_GAP_PROBLEM = 0.30  # 30 points: the global model fails a group of clients
FAIR_JAIN = 0.9  # Jain's index 1 / (1 + CV^2): below 0.9 the accuracies' CV is above 1/3
# Personalization
PERS_HURT = 0.02  # personalization costing a client 2+ points is a loss, not noise
PERS_HURT_SHARE = 0.2  # hurting a fifth of the clients or more is worth a warning
MAX_NAMED = 10  # clients named in a message / listed in evidence

Severity = Literal["problem", "warning", "info"]
StepTrouble = Literal["diverging", "oscillating", "stalled"]
SEVERITIES: tuple[Severity, ...] = ("problem", "warning", "info")
FAIR_KEYS = ("mean", "std", "worst10", "best10", "jain")
PERSONALIZING = ("ditto", "perfedavg", "fedbn")
Row = dict[str, Any]


@dataclass
class Finding:
    """One thing the diagnosis saw: what (`kind`), how bad, in words, the numbers behind it, what to try."""

    kind: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """All findings for one run, most severe first; renders itself with Rich and serialises with `to_dict`."""

    run_id: str
    name: str
    status: str
    rounds_completed: int
    rounds_planned: int
    algorithm: str | None
    findings: list[Finding]

    def of(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __rich__(self) -> Group:
        """Findings grouped by severity; run strings go in as Text, so brackets in them are not markup."""
        algo = f", {self.algorithm}" if self.algorithm else ""
        parts: list[Any] = [Text.assemble(("Diagnosis of ", "bold"), (self.run_id, "bold cyan"),
                                          f"  ({self.status}, {self.rounds_completed}/{self.rounds_planned}"
                                          f" rounds{algo})")]
        if not self.of("problem") and not self.of("warning"):
            parts.append(Text("No problems found.", style="green"))
        for severity, title, style, mark in (("problem", "Problems", "red", "x"),
                                             ("warning", "Warnings", "yellow", "!"), ("info", "Info", "blue", "-")):
            found = self.of(severity)
            if not found:
                continue
            parts.append(Text(f"\n{title}", style=f"bold {style}"))
            grid = Table.grid(padding=(0, 1))  # a hanging indent: wrapped lines stay right of the mark
            grid.add_column(width=1, style=f"bold {style}")
            grid.add_column()
            for f in found:
                head = Text.assemble((f"{f.kind.replace('_', ' ')}: ", f"bold {style}"), f.message)
                remedies = [Text(f"-> {r}", style="dim") for r in f.remedies]
                grid.add_row(mark, Group(head, Padding(Group(*remedies), (0, 0, 0, 2), expand=False)))
            parts.append(grid)
        return Group(*parts)


def diagnose(store: RunStore, run_id: str) -> Diagnosis:
    """Run every check on a run (a unique id prefix is enough); problems first, then warnings, then info."""
    rec = store.get_run(run_id)
    run = _Run(rec, store.rounds(rec.run_id), store.client_rounds(rec.run_id, "fit"),
               store.client_rounds(rec.run_id, "eval"), store.client_rounds(rec.run_id, "personal"),
               store.clients(rec.run_id))
    findings = [f for check in CHECKS for f in check(run)]
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    algo = run.cfg("server.algorithm") or next(
        (r["metrics"]["algorithm"] for r in reversed(run.rounds) if "algorithm" in r["metrics"]), None)
    return Diagnosis(rec.run_id, rec.name, rec.status, rec.rounds_completed, rec.rounds_planned, algo, findings)


def fairness_series(rounds: list[Row], client_rows: list[Row], prefix: str = "fair"
                    ) -> list[tuple[int, dict[str, float]]]:
    """Per evaluated round, fairness of per-client accuracy: the recorded `{prefix}_*` metrics or, for runs
    that predate them, the same figures recomputed from the per-client rows."""
    out: dict[int, dict[str, float]] = {}
    for r in rounds:
        got = {k: float(r["metrics"][f"{prefix}_{k}"]) for k in FAIR_KEYS if _finite(r["metrics"].get(f"{prefix}_{k}"))}
        if "mean" in got:
            out[r["round"]] = got
    for rnd, accs in accuracy_by_round(client_rows).items():
        if rnd not in out:
            out[rnd] = fairness(list(accs.values()))
    return sorted(out.items())


def accuracy_by_round(rows: list[Row]) -> dict[int, dict[int, float]]:
    """{round: {client: accuracy}} from client rows ('eval' or 'personal'), non-finite values left out."""
    out: dict[int, dict[int, float]] = {}
    for c in rows:
        if _finite(c.get("accuracy")):
            out.setdefault(c["round"], {})[c["client_id"]] = float(c["accuracy"])
    return out


def cosine_bands(k: int) -> tuple[float, float]:
    """(unrelated, agree): the mean cosine to their aggregate that k clients' updates score when unrelated (at
    most that) and when they agree (pairwise cosine AGREE_PAIRWISE, at least that).

    k updates of equal norm and weight with pairwise cosine rho each have cosine sqrt(rho + (1 - rho) / k) to
    their mean: 1/sqrt(k) when unrelated (rho = 0; unequal norms or weights only lower it), which is why no
    fixed cut-off fits every run: 0.26 is "unrelated" for 10 clients a round and "agreeing" for 100.
    """
    k = max(1, int(k))
    return 1 / math.sqrt(k), math.sqrt(AGREE_PAIRWISE + (1 - AGREE_PAIRWISE) / k)


# ---- the run as the checks see it ---------------------------------------------------------------------

@dataclass
class _Run:
    rec: RunRecord
    rounds: list[Row]
    fits: list[Row]
    evals: list[Row]
    personal: list[Row]
    clients: list[Row]

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value, or `default` when the stored config lacks it (older or hand-written runs)."""
        node: Any = self.rec.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["round"], float(r[key])) for r in self.rounds if _finite(r.get(key))]

    def partial_participation(self) -> bool:
        n = self.cfg("data.num_clients") or len(self.clients)
        k = self.cfg("server.clients_per_round") or round((self.cfg("server.fraction") or 1.0) * n)
        return k < n


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _r(x: float | None, digits: int = 4) -> float | None:
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _clients(ids: Iterable[int]) -> str:
    """'client 3', 'clients 3 and 7', 'clients 1, 2, 3, ... (12 in all)'."""
    ids = list(ids)
    shown = [str(i) for i in ids[:MAX_NAMED]]
    more = f", ... ({len(ids)} in all)" if len(ids) > MAX_NAMED else ""
    if len(ids) == 1:
        return f"client {shown[0]}"
    listed = ", ".join(shown) + more if more else ", ".join(shown[:-1]) + f" and {shown[-1]}"
    return f"clients {listed}"


def _weighted_accuracy(rows: list[Row]) -> float | None:
    ok = [c for c in rows if _finite(c.get("accuracy")) and c["num_examples"] > 0]
    return float(np.average([c["accuracy"] for c in ok], weights=[c["num_examples"] for c in ok])) if ok else None


# ---- remedies that fit the run's config -----------------------------------------------------------------
# Never advise what the run already does: when a remedy is in use, say so and give the next step.

def _algo(run: _Run) -> str:
    return run.cfg("server.algorithm") or "fedavg"


def _raised(value: float, start: float) -> float:
    """Ten times a strength, or `start` when it is 0 (ten times nothing is no advice)."""
    return value * 10 if value > 0 else start


def _instead(run: _Run) -> str:
    algo = _algo(run)
    return "" if algo == "fedavg" else f" (instead of {algo})"


def _step_remedies(run: _Run, trouble: StepTrouble) -> list[str]:
    """Remedies for a badly behaved global loss: smaller, smoother or less noisy steps."""
    out = []
    lr, bs = run.cfg("train.lr"), run.cfg("train.batch_size")
    if lr is not None:
        out.append(f"lower the client learning rate: train.lr = {lr:g} now, try {lr / 4:.3g}")
    if run.cfg("train.lr_schedule", "constant") == "constant":
        out.append('decay the learning rate over rounds: train.lr_schedule = "cosine" (or "step")')
    out += _server_step_remedies(run, trouble)
    if bs is not None:
        out.append(f"larger local batches give less noisy steps: train.batch_size = {bs} now, try {bs * 4}")
    if trouble == "oscillating" and run.partial_participation():
        out.append("sample more clients per round (server.fraction / server.clients_per_round): "
                   "each round's average is then less noisy")
    return out


def _server_step_remedies(run: _Run, trouble: StepTrouble) -> list[str]:
    slr, opt = run.cfg("server.lr", 1.0), run.cfg("server.optimizer", "sgd")
    momentum = run.cfg("server.momentum") or 0
    smaller = f"a smaller server step: server.lr = {slr:g} now, try {slr / 4:.3g}" if slr is not None else None
    if opt != "sgd":
        return [f"{smaller} (server.optimizer = {opt})"] if smaller else []
    big_step = [smaller] if smaller and slr > 1 else []
    if momentum == 0:
        if trouble == "diverging":
            return big_step
        return ["server momentum averages out round-to-round swings: server.momentum = 0.9 (FedAvgM)", *big_step]
    if trouble == "stalled":
        return [f"server momentum is already on (server.momentum = {momentum:g}); the next step is an adaptive "
                'server optimizer: server.optimizer = "adam", server.lr = 0.01-0.1 (FedAdam, without server.momentum)']
    return [f"server momentum carries each step into the next: server.momentum = {momentum:g} now, try "
            f"{momentum / 2:g}", *big_step]


def _drift_algorithm_remedies(run: _Run) -> list[str]:
    """FedProx / SCAFFOLD against drift, or the next step when the run already uses one of them (or FedDyn)."""
    algo = _algo(run)
    if algo == "fedprox":
        mu = run.cfg("server.mu", 0.01)
        return [f"FedProx is already on with server.mu = {mu:g}: raise server.mu to {_raised(mu, 0.01):g} "
                'for a stronger pull toward the global model, or try SCAFFOLD: server.algorithm = "scaffold"']
    if algo == "scaffold":
        if run.partial_participation():
            return ["SCAFFOLD is already on, but a client's control variate is as old as its last round: sample more "
                    "clients per round (server.fraction / server.clients_per_round)"]
        return ["SCAFFOLD is already on: less local work per round (train.local_epochs / train.local_steps) or "
                "a lower train.lr is the next step"]
    if algo == "feddyn":
        a = run.cfg("server.dyn_alpha", 0.01)
        return [f"FedDyn is already on with server.dyn_alpha = {a:g}: raise it to {a * 10:g} for a stronger pull "
                'toward the global model, or try SCAFFOLD: server.algorithm = "scaffold"']
    return [f'FedProx pulls local models toward the global one: server.algorithm = "fedprox"{_instead(run)}, '
            "server.mu = 0.01-0.1",
            "SCAFFOLD corrects each client's drift with control variates: server.algorithm = \"scaffold\""
            + _instead(run)]


def _drift_remedies(run: _Run) -> list[str]:
    algo = _algo(run)
    out = _drift_algorithm_remedies(run)
    epochs, steps, lr = run.cfg("train.local_epochs"), run.cfg("train.local_steps"), run.cfg("train.lr")
    if steps:
        out.append(f"less local work per round: train.local_steps = {steps} now, try {max(1, steps // 2)}")
    elif epochs and epochs > 1:
        out.append(f"less local work per round: train.local_epochs = {epochs} now, try {max(1, epochs // 2)}")
    elif lr is not None:
        out.append(f"smaller local steps: train.lr = {lr:g} now, try {lr / 2:.3g}")
    unequal = (run.cfg("data.partition") == "quantity" or (run.cfg("train.local_epochs_max") or 0) > (epochs or 0)
               or (run.cfg("train.straggler_fraction") or 0) > 0)
    if unequal and algo != "fednova":
        out.append('FedNova normalises unequal local work: server.algorithm = "fednova"' + _instead(run))
    return out


def _personalizes(run: _Run) -> bool:
    return _algo(run) in PERSONALIZING or (run.cfg("eval.finetune_epochs") or 0) > 0


def _personalization_remedy(run: _Run) -> list[str]:
    if _personalizes(run):
        return [f"personalization is already on ({_method(run)}): the personalization finding compares each "
                "client's personalized and global accuracy"]
    instead = f", instead of {_algo(run)}" if _instead(run) else ""
    return [f'personalization serves each client its own model: server.algorithm = "ditto" (or "fedbn" for '
            f"feature shift{instead}), or fine-tune before testing with eval.finetune_epochs = 1"]


def _outlier_remedies(run: _Run, norm_outliers: bool) -> list[str]:
    out = ["inspect these clients' data (labels, scaling, duplicates): the report's label heatmap and client "
           "table show them"]
    if _personalizes(run):
        out.append(f"personalization is already on ({_method(run)}): it serves these clients but does not keep "
                   "their updates from pulling the global model; bounding their updates does")
    else:
        out.append("if their data is legitimately different, personalization (Ditto, FedBN) serves them without "
                   "pulling the global model")
    if _algo(run) == "fedprox":
        mu = run.cfg("server.mu", 0.01)
        out.append(f"FedProx is already on with server.mu = {mu:g}: raise it to {_raised(mu, 0.01):g} to "
                   "limit further how far any client's local model moves")
    else:
        out.append('FedProx limits how far any client\'s local model moves: server.algorithm = "fedprox"'
                   + _instead(run))
    clip = _clip_remedy(run) if norm_outliers else None
    return out + ([clip] if clip else [])


def _clip_remedy(run: _Run) -> str | None:
    """Norm bounding, sized from the update norms the run recorded (about twice their median)."""
    norms = [f["update_norm"] for f in run.fits if _finite(f.get("update_norm"))]
    bound = 2 * float(np.median(norms)) if norms else None
    for spec in run.cfg("pipeline.client", []) or []:
        name, _, arg = str(spec).partition(":")
        if name.strip() != "clip":
            continue
        try:
            now = float(arg)
        except ValueError:
            now = math.inf
        if bound is not None and bound < now:
            return f"updates are already clipped ({spec} in pipeline.client): tighten to about twice the median " \
                   f"update norm, clip:{bound:.3g}"
        return None  # already clipped at about that bound: clipping harder would cut every client
    at = f"{bound:.3g}" if bound is not None else "B"
    return f'bound every update\'s norm: pipeline.client = ["clip:{at}"] (about twice the median update norm)'


# ---- checks -------------------------------------------------------------------------------------------

def _check_status(run: _Run) -> list[Finding]:
    rec = run.rec
    done = f"{rec.rounds_completed} of {rec.rounds_planned} rounds"
    ev = {"status": rec.status, "message": rec.message, "rounds_completed": rec.rounds_completed,
          "rounds_planned": rec.rounds_planned}
    if rec.status == "failed":
        why = (rec.message or "no reason recorded").rstrip(".")
        return [Finding("run_failed", "problem", f"The run failed after {done}: {why}.",
                        ev, [f"fix the cause, then continue from the last checkpoint: fedloom resume {rec.run_id}"])]
    if rec.status in ("running", "interrupted"):
        what = "is still running" if rec.status == "running" else "was interrupted"
        return [Finding("incomplete", "info", f"The run {what} after {done}; what follows covers those rounds.",
                        ev, [f"fedloom resume {rec.run_id}"] if rec.status == "interrupted" else [])]
    return []


def _check_loss(run: _Run) -> list[Finding]:
    """Diverging (rising loss or a 'diverged' stop), else oscillating and/or stalled test accuracy."""
    diverging = _diverging(run)
    if diverging:
        return [diverging]  # stalling or swinging is moot once the loss runs away
    return [f for f in (_oscillating(run), _stalled(run)) if f]


def _rising(values: list[float]) -> bool:
    recent = values[-(DIVERGE_WINDOW + 1):]
    return (len(recent) == DIVERGE_WINDOW + 1 and all(b > a for a, b in zip(recent, recent[1:], strict=False))
            and recent[-1] > DIVERGE_FACTOR * min(values))


def _diverging(run: _Run) -> Finding | None:
    lr = run.cfg("train.lr")
    lr_text = f" The clients train with train.lr = {lr:g}." if lr is not None else ""
    ev: dict[str, Any] = {"train_lr": lr}
    for key, label in (("train_loss", "training loss"), ("test_loss", "test loss")):
        pts = run.series(key)
        if not pts:
            continue
        best = min(pts, key=lambda p: p[1])
        ev[key] = {"best": _r(best[1]), "best_round": best[0], "last": _r(pts[-1][1]), "last_round": pts[-1][0]}
        if run.rec.status != "diverged" and _rising([v for _, v in pts]):
            msg = (f"The {label} is diverging: it rose in each of the last {DIVERGE_WINDOW} recorded rounds to "
                   f"{pts[-1][1]:.4g} in round {pts[-1][0]}, {pts[-1][1] / best[1]:.1f}x its best ({best[1]:.4g} in "
                   f"round {best[0]}).{lr_text}")
            return Finding("diverging", "problem", msg, ev, _step_remedies(run, "diverging"))
    if run.rec.status == "diverged":
        why = (run.rec.message or "no reason recorded").rstrip(".")
        msg = f"The run stopped as diverged: {why}." + ("" if "train.lr" in why else lr_text)
        return Finding("diverging", "problem", msg, ev | {"message": run.rec.message},
                       _step_remedies(run, "diverging"))
    return None


def _oscillating(run: _Run) -> Finding | None:
    pts = run.series("test_accuracy")[-OSC_WINDOW:]
    if len(pts) < OSC_FLIPS + 2:
        return None
    accs = [a for _, a in pts]
    swings = [d for d in np.diff(accs) if abs(d) >= OSC_STEP]
    flips = sum(1 for a, b in zip(swings, swings[1:], strict=False) if a * b < 0)
    if flips < OSC_FLIPS:
        return None
    mean_move = float(np.mean(np.abs(np.diff(accs))))
    msg = (f"Test accuracy swung up and down {flips} times over rounds {pts[0][0]}-{pts[-1][0]}, by "
           f"{100 * mean_move:.1f} points per evaluation on average, between {_pct(min(accs))} and {_pct(max(accs))}.")
    ev = {"rounds": [p[0] for p in pts], "test_accuracy": [_r(a) for a in accs], "reversals": flips,
          "mean_abs_change": _r(mean_move), "train_lr": run.cfg("train.lr")}
    return Finding("oscillating", "warning", msg, ev, _step_remedies(run, "oscillating"))


def _stalled(run: _Run) -> Finding | None:
    pts = run.series("test_accuracy")
    if len(pts) < STALL_WINDOW:
        return None
    window = pts[-STALL_WINDOW:]
    accs = [a for _, a in window]
    gain = max(accs[1:]) - accs[0]
    if gain >= STALL_POINTS:
        return None
    train = run.series("train_loss")
    ratio = train[-1][1] / train[0][1] if len(train) >= 2 and train[0][1] > 0 else None
    ev = {"rounds": [window[0][0], window[-1][0]], "test_accuracy": [_r(a) for a in accs], "gain": _r(gain),
          "train_loss_first": _r(train[0][1]) if train else None,
          "train_loss_last": _r(train[-1][1]) if train else None, "train_loss_ratio": _r(ratio),
          "train_lr": run.cfg("train.lr")}
    span = f"over the last {STALL_WINDOW} evaluated rounds ({window[0][0]}-{window[-1][0]})"
    if ratio is not None and ratio <= STALL_FIT_RATIO:
        msg = (f"Test accuracy levelled off at {_pct(accs[-1])} {span} after the clients' training loss fell to "
               f"{ratio:.0%} of its first-round value: the model fits the local data; more rounds add little.")
        return Finding("plateau", "info", msg, ev, [])
    fit = (f"while the clients' training loss is still {ratio:.0%} of its first-round value "
           f"({train[0][1]:.3g} -> {train[-1][1]:.3g})" if ratio is not None else "with no training loss recorded")
    msg = f"Test accuracy gained only {100 * gain:.1f} points {span}, now {_pct(accs[-1])}, {fit}: training stalled."
    return Finding("stalled", "warning", msg, ev, _step_remedies(run, "stalled"))


def _usable_fits(run: _Run) -> dict[int, list[Row]]:
    """Fit rows by round, without rounds that blew up (NaN is stored as NULL, Inf as Inf): their norms and
    cosines describe the blow-up, which the divergence finding reports, not how the clients differ."""
    train = {r["round"]: r.get("train_loss") for r in run.rounds}
    by_round: dict[int, list[Row]] = {}
    for f in run.fits:
        by_round.setdefault(f["round"], []).append(f)

    def ok(rnd: int, rows: list[Row]) -> bool:
        values = [f[k] for f in rows for k in ("loss", "update_norm", "cosine") if f.get(k) is not None]
        losses_recorded = any(f.get("loss") is not None for f in rows)
        return all(math.isfinite(v) for v in values) and (_finite(train.get(rnd)) or not losses_recorded)

    return {rnd: rows for rnd, rows in by_round.items() if ok(rnd, rows)}


def _check_drift(run: _Run) -> list[Finding]:
    """Do the clients' updates agree? Spread of their norms and their cosine to the aggregate, last rounds."""
    usable = _usable_fits(run)
    by_round = {rnd: [f for f in rows if _finite(f.get("update_norm"))] for rnd, rows in usable.items()}
    window = [r for r in sorted(by_round) if len(by_round[r]) >= 2][-DRIFT_WINDOW:]
    if not window:
        trained = {r["round"] for r in run.rounds if _finite(r.get("train_loss"))}  # not a round gone NaN
        if any(len(rows) >= 2 and rnd in trained for rnd, rows in usable.items()):  # updates came, statistics not
            return [Finding("client_drift", "info", "Not checked: the run recorded no per-client update norms or "
                            "cosines (client-level privacy withholds them).", {"skipped": "no update_norm"}, [])]
        return []
    cvs, ratios, cosines = [], [], []
    per_client: dict[int, tuple[list[float], list[float]]] = {}
    for rnd in window:
        norms = np.array([f["update_norm"] for f in by_round[rnd]])
        med = float(np.median(norms))
        cvs.append(float(norms.std() / norms.mean()) if norms.mean() > 0 else 0.0)
        ratios.append(float(norms.max() / med) if med > 0 else 1.0)
        for f in by_round[rnd]:
            cos, ratio = per_client.setdefault(f["client_id"], ([], []))
            if _finite(f.get("cosine")):
                cos.append(f["cosine"])
                cosines.append(f["cosine"])
            ratio.append(f["update_norm"] / med if med > 0 else 1.0)
    cv, ratio = float(np.median(cvs)), float(np.median(ratios))
    mean_cos = float(np.mean(cosines)) if cosines else None
    k = int(np.median([len(usable[rnd]) for rnd in window]))  # updates in each round's aggregate
    unrelated, agree = cosine_bands(k)
    drifting = []
    for cid, (cos, rat) in per_client.items():
        c, q = (float(np.median(cos)) if cos else None), float(np.median(rat))
        if (c is not None and c < COSINE_AGAINST) or q > DRIFT_MAX_RATIO:
            drifting.append({"client": cid, "cosine": _r(c), "norm_ratio": _r(q)})
    drifting.sort(key=lambda d: (d["cosine"] if d["cosine"] is not None else 1.0, -d["norm_ratio"]))
    spread = cv > DRIFT_CV or ratio > DRIFT_MAX_RATIO
    low = mean_cos is not None and mean_cos <= unrelated
    against = any(d["cosine"] is not None and d["cosine"] < COSINE_AGAINST for d in drifting)
    span = f"rounds {window[0]}-{window[-1]}" if len(window) > 1 else f"round {window[0]}"
    band = None if mean_cos is None else "unrelated" if low else "agree" if mean_cos >= agree else "partly"
    ev = {"rounds": [window[0], window[-1]], "norm_cv": _r(cv), "norm_max_median_ratio": _r(ratio),
          "cosine_mean": _r(mean_cos), "clients_per_round": k, "cosine_unrelated": _r(unrelated),
          "cosine_agree": _r(agree), "agreement": band, "drifting_clients": drifting[:MAX_NAMED]}
    figures = f"update norms have a coefficient of variation of {cv:.2f}, the largest {ratio:.3g}x the median"
    if mean_cos is not None:
        figures += (f"; mean cosine similarity to the aggregate {mean_cos:.2f} with {k} clients a round ({k} "
                    f"unrelated updates score {unrelated:.2f} or less, agreeing clients {agree:.2f} or more)")
    else:
        figures += "; no cosines recorded"
    if not (spread or low or drifting):
        said = {"agree": "agree", "partly": "partly agree"}.get(band or "", "are of even size")
        return [Finding("client_drift", "info", f"Client updates {said} over {span}: {figures}.", ev, [])]
    signals = []
    if low:
        signals.append("they agree with their aggregate no more than unrelated updates would")
    if spread:
        signals.append("their sizes differ widely")
    if drifting:
        signals.append(f"{_clients(d['client'] for d in drifting)} {'pulls' if len(drifting) == 1 else 'pull'} "
                       "away from the rest")
    said = ", ".join(signals[:-1]) + " and " + signals[-1] if len(signals) > 1 else signals[0]
    msg = f"Client updates drift apart over {span}: {said}. Figures: {figures}"
    if drifting:
        d = drifting[0]
        why = (f"median cosine {d['cosine']:.2f}, " if d["cosine"] is not None else "") + f"norm {d['norm_ratio']:.3g}x"
        msg += f"; client {d['client']}: {why} the median"
    severity: Severity = "problem" if (low and (spread or against)) or (mean_cos is not None and mean_cos < 0) \
        else "warning"
    return [Finding("client_drift", severity, msg + ".", ev, _drift_remedies(run))]


def _robust_z(values: np.ndarray) -> np.ndarray | None:
    """0.6745 (x - median) / MAD; with a zero MAD (most clients equal) the mean absolute deviation stands in."""
    med = np.median(values)
    mad = np.median(np.abs(values - med))
    tiny = 1e-12 + 1e-9 * abs(med)
    if mad > tiny:
        return 0.6745 * (values - med) / mad
    mean_ad = np.mean(np.abs(values - med))
    return (values - med) / (1.2533 * mean_ad) if mean_ad > tiny else None


def _check_outliers(run: _Run) -> list[Finding]:
    """Clients whose local loss or update norm is a robust-z outlier among that round's clients, repeatedly."""
    by_round = _usable_fits(run)
    seen: dict[int, int] = {}
    hits: dict[tuple[int, str], list[float]] = {}  # (client, metric) -> z-scores of its outlier rounds
    for rows in by_round.values():
        for f in rows:
            seen[f["client_id"]] = seen.get(f["client_id"], 0) + 1
        for metric in ("update_norm", "loss"):
            ok = [f for f in rows if _finite(f.get(metric))]
            if len(ok) < OUTLIER_MIN_CLIENTS:
                continue
            z = _robust_z(np.array([f[metric] for f in ok], dtype=np.float64))
            if z is None:
                continue
            for f, zi in zip(ok, z, strict=True):
                if abs(zi) > OUTLIER_Z:
                    hits.setdefault((f["client_id"], metric), []).append(float(zi))
    flagged = [{"client": cid, "metric": metric, "outlier_rounds": len(zs), "rounds_trained": seen[cid],
                "median_z": _r(float(np.median(zs)), 2)}
               for (cid, metric), zs in hits.items()
               if len(zs) >= OUTLIER_MIN_ROUNDS and len(zs) / seen[cid] >= OUTLIER_MIN_SHARE]
    if not flagged:
        return []
    flagged.sort(key=lambda d: (-d["outlier_rounds"], -abs(d["median_z"] or 0)))
    names = {"update_norm": "update norm", "loss": "local loss"}
    parts = [f"client {d['client']}'s {names[d['metric']]} in {d['outlier_rounds']} of {d['rounds_trained']} rounds "
             f"({'above' if (d['median_z'] or 0) > 0 else 'below'} the others, median z {d['median_z']:+.1f})"
             for d in flagged[:MAX_NAMED]]
    msg = (f"Outlier clients (robust z-score beyond {OUTLIER_Z} among the round's clients, repeatedly): "
           + "; ".join(parts) + ".")
    remedies = _outlier_remedies(run, any(d["metric"] == "update_norm" for d in flagged))
    ev = {"clients": flagged[:MAX_NAMED], "z_threshold": OUTLIER_Z}
    return [Finding("outlier_clients", "warning", msg, ev, remedies)]


def _check_label_skew(run: _Run) -> list[Finding]:
    """How far each client's train label mix is from the global one (total variation, Jensen-Shannon)."""
    rows = [(c["client_id"], np.asarray(c["label_counts"], dtype=np.float64)) for c in run.clients]
    width = max((len(v) for _, v in rows), default=0)
    rows = [(cid, np.pad(v, (0, width - len(v)))) for cid, v in rows if v.sum() > 0]
    if len(rows) < 2 or width < 2:
        return []
    total = sum(v for _, v in rows)
    g = total / total.sum()
    stats = []
    for cid, v in rows:
        p = v / v.sum()
        classes = int(np.searchsorted(np.cumsum(np.sort(p)[::-1]), SKEW_MASS - 1e-9) + 1)
        stats.append({"client": cid, "tv": _r(0.5 * float(np.abs(p - g).sum()), 3), "js": _r(_js_distance(p, g), 3),
                      "top_classes": classes})
    present = int((total > 0).sum())
    skewed = sorted((s for s in stats if s["tv"] >= SKEW_TV), key=lambda s: -s["tv"])
    tv_mean = float(np.mean([s["tv"] for s in stats]))
    ev = {"num_classes": present, "top_classes_mass": SKEW_MASS, "tv_mean": _r(tv_mean, 3),
          "tv_max": max(s["tv"] for s in stats), "num_skewed": len(skewed), "skewed_clients": skewed[:MAX_NAMED]}
    if not skewed:
        worst = max(stats, key=lambda s: s["tv"])
        msg = (f"No client's labels are strongly skewed: every total-variation distance to the global label mix is "
               f"below {SKEW_TV} (largest {worst['tv']:.3f}, client {worst['client']}; mean {tv_mean:.2f}).")
        return [Finding("label_skew", "info", msg, ev, [])]
    detail = ", ".join(f"client {s['client']} (TV {s['tv']:.2f}, {round(100 * SKEW_MASS)}% of its data in "
                       f"{s['top_classes']} of {present} classes)" for s in skewed[:3])
    who = (f"All {len(stats)} clients have" if len(skewed) == len(stats)
           else f"{len(skewed)} of {len(stats)} clients, {_clients(sorted(s['client'] for s in skewed))}, have")
    msg = (f"{who} strongly skewed labels (total-variation distance to the global label mix >= {SKEW_TV}); "
           f"most skewed {detail}. Mean distance over all clients {tv_mean:.2f}.")
    remedies = [*_drift_algorithm_remedies(run), *_personalization_remedy(run)]
    if run.partial_participation():
        remedies.append("sample more clients per round so each round sees every class")
    return [Finding("label_skew", "warning", msg, ev, remedies)]


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2): 0 for equal distributions, 1 for disjoint ones."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return math.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def _check_fairness(run: _Run) -> list[Finding]:
    """Worst-10% vs mean client accuracy of the global model, and Jain's index, in the last evaluated round."""
    series = fairness_series(run.rounds, run.evals)
    if not series:
        return []
    rnd, fair = series[-1]
    accs = accuracy_by_round(run.evals).get(rnd, {})
    if len(accs) < 2 and "worst10" not in fair:
        return []
    gap = fair["mean"] - fair.get("worst10", fair["mean"])
    jain = fair.get("jain")
    k = max(1, math.ceil(0.1 * len(accs)))
    worst = sorted(accs, key=accs.get)[:k]
    ev = {"round": rnd, **{k_: _r(v) for k_, v in fair.items()}, "gap": _r(gap), "worst_clients": worst[:MAX_NAMED]}
    jain_text = f"; Jain's index {jain:.3f}" if jain is not None else ""
    msg = (f"In round {rnd} the worst 10% of clients reach {_pct(fair.get('worst10', fair['mean']))} accuracy against "
           f"a mean of {_pct(fair['mean'])} over clients (gap {100 * gap:.1f} points"
           + (f", best 10% {_pct(fair['best10'])}" if "best10" in fair else "") + f"){jain_text}.")
    if worst:
        msg += " Worst: " + ", ".join(f"client {c} ({_pct(accs[c])})" for c in worst[:3]) + "."
    unfair = gap >= FAIR_GAP or (jain is not None and jain < FAIR_JAIN)
    if not unfair:
        return [Finding("fairness", "info", msg, ev, [])]
    q = run.cfg("server.q", 1.0)
    if _algo(run) == "qffl":
        remedies = [f"q-FFL is already on with server.q = {q:g}: a stronger fairness exponent, try {max(1.0, 2 * q):g}"]
    else:
        remedies = [f'q-FFL weights struggling clients up: server.algorithm = "qffl"{_instead(run)}, server.q = 1-5']
    remedies += _personalization_remedy(run)
    return [Finding("fairness", "problem" if gap >= FAIR_GAP_PROBLEM else "warning", msg, ev, remedies)]


def _check_personalization(run: _Run) -> list[Finding]:
    """Personalized vs global accuracy in the last round that recorded both, over the same clients: only those
    with a personal model are personalized (`pers_clients`), so the global side is cut to them too."""
    pers_acc = accuracy_by_round(run.personal)
    marked = [r["round"] for r in run.rounds if _finite(r["metrics"].get("pers_accuracy"))]
    rounds = sorted(set(marked) | set(pers_acc))
    if not rounds:
        return []
    rnd = rounds[-1]
    glob, pers = accuracy_by_round(run.evals).get(rnd, {}), pers_acc.get(rnd, {})
    gains = {c: pers[c] - glob[c] for c in pers if c in glob}
    compared = _compare_like_with_like(run, rnd, gains) if gains else _compare_round_metrics(run, rnd)
    if compared is None:
        return []
    g_mean, p_mean, g_fair, p_fair, scope = compared
    hurt = sorted((c for c, g in gains.items() if g < -PERS_HURT), key=gains.get)
    method = _method(run)
    delta = p_mean - g_mean
    msg = (f"Personalization ({method}) changes mean client accuracy from {_pct(g_mean)} (global model) to "
           f"{_pct(p_mean)} ({100 * delta:+.1f} points) in round {rnd}, {scope}")
    if "worst10" in g_fair and "worst10" in p_fair:
        msg += f"; the worst 10% go from {_pct(g_fair['worst10'])} to {_pct(p_fair['worst10'])}"
    msg += "."
    if hurt:
        msg += f" It costs {_clients(hurt)} more than {100 * PERS_HURT:.0f} points."
    ev = {"round": rnd, "method": method, "global_accuracy": _r(g_mean), "personal_accuracy": _r(p_mean),
          "gain": _r(delta), "global_fairness": {k: _r(v) for k, v in g_fair.items()},
          "personal_fairness": {k: _r(v) for k, v in p_fair.items()}, "clients_compared": len(gains),
          "clients_evaluated": len(glob), "same_clients": bool(gains), "clients_hurt": hurt[:MAX_NAMED]}
    if delta >= 0 and len(hurt) < PERS_HURT_SHARE * max(1, len(gains)):
        return [Finding("personalization", "info", msg, ev, [])]
    return [Finding("personalization", "warning", msg, ev, _gentler_personalization(run))]


Compared = tuple[float, float, dict[str, float], dict[str, float], str]


def _compare_like_with_like(run: _Run, rnd: int, gains: dict[int, float]) -> Compared | None:
    """Both models' example-weighted mean and fairness over the clients that have both results."""
    both = set(gains)
    g_rows = [c for c in run.evals if c["round"] == rnd and c["client_id"] in both]
    p_rows = [c for c in run.personal if c["round"] == rnd and c["client_id"] in both]
    g_mean, p_mean = _weighted_accuracy(g_rows), _weighted_accuracy(p_rows)
    if g_mean is None or p_mean is None:
        return None
    evaluated = len({c["client_id"] for c in run.evals if c["round"] == rnd})
    scope = (f"both over the {len(both)} clients" if len(both) == evaluated
             else f"both over the {len(both)} of {evaluated} clients that have a personal model")
    return (g_mean, p_mean, fairness([float(c["accuracy"]) for c in g_rows]),
            fairness([float(c["accuracy"]) for c in p_rows]), scope)


def _compare_round_metrics(run: _Run, rnd: int) -> Compared | None:
    """Without per-client rows on both sides only the round metrics are left; they may cover different
    clients, and the message says so."""
    m = next((r["metrics"] for r in run.rounds if r["round"] == rnd), {})
    g_mean = m.get("fed_accuracy") if _finite(m.get("fed_accuracy")) else \
        _weighted_accuracy([c for c in run.evals if c["round"] == rnd])
    p_mean = m.get("pers_accuracy") if _finite(m.get("pers_accuracy")) else \
        _weighted_accuracy([c for c in run.personal if c["round"] == rnd])
    if g_mean is None or p_mean is None:
        return None
    g_fair = dict(fairness_series(run.rounds, run.evals)).get(rnd, {})
    p_fair = dict(fairness_series(run.rounds, run.personal, "pers_fair")).get(rnd, {})
    n = m.get("pers_clients")
    who = f"the {n} clients" if _finite(n) else "the clients"
    return (g_mean, p_mean, g_fair, p_fair, f"global over every client evaluated, personalized over {who} that "
            "have a personal model (round metrics only: not necessarily the same clients)")


def _method(run: _Run) -> str:
    algo = _algo(run)
    epochs = run.cfg("eval.finetune_epochs") or 0
    tune = f"fine-tuning, {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ""
    if algo in PERSONALIZING:
        name = {"ditto": "Ditto", "perfedavg": "Per-FedAvg", "fedbn": "FedBN"}[algo]
        return f"{name} + {tune}" if tune else name
    return tune or "personalized evaluation"


def _gentler_personalization(run: _Run) -> list[str]:
    """Gentler settings of each personalization the run uses (its algorithm's, then fine-tuning's)."""
    algo, out = _algo(run), []
    if algo == "ditto":
        lam = run.cfg("server.ditto_lambda", 0.1)
        out.append(f"keep personal models closer to the global one: server.ditto_lambda = {lam:g} now, try "
                   f"{_raised(lam, 0.1):g}")
    elif algo == "perfedavg":
        a = run.cfg("server.perfedavg_alpha", 0.01)
        out.append(f"a smaller personalization step: server.perfedavg_alpha = {a:g} now, try {a / 4:.3g}")
    elif algo == "fedbn":
        if run.cfg("server.fedbn_norms") == "all":
            out.append('keep only BatchNorm layers local: server.fedbn_norms = "all" now, try "batch"')
        else:
            out.append("FedBN's local BatchNorm layers do not suit these clients: compare FedAvg with fine-tuning "
                       "(eval.finetune_epochs = 1)")
    epochs = run.cfg("eval.finetune_epochs") or 0
    if epochs > 0:
        if epochs > 1:
            out.append(f"fine-tune less: eval.finetune_epochs = {epochs} now, try {epochs // 2}")
        ft_lr, lr = run.cfg("eval.finetune_lr"), run.cfg("train.lr")
        if ft_lr is not None:
            out.append(f"fine-tune gentler: eval.finetune_lr = {ft_lr:g} now, try {ft_lr / 4:.3g}")
        elif lr is not None:
            out.append(f"fine-tune gentler: eval.finetune_lr is unset, so fine-tuning uses train.lr = {lr:g}; "
                       f"try eval.finetune_lr = {lr / 4:.3g}")
    return out or ["clients with little local data gain little from personalization; compare per client"]


def _check_suspects(run: _Run) -> list[Finding]:
    """Clients the round logic left out (NaN/Inf, suspicion) or flagged, and how detection fared against the
    attackers of a simulated attack (docs/robustness.md)."""
    from .server.detection import summarize

    summary = summarize(run.rounds, run.fits)
    if summary is None:
        return []
    named = [d for d in summary["clients"] if d["flagged"] or d["excluded"] or d["non_finite"]][:MAX_NAMED]
    parts = []
    for d in named:
        what = [f"flagged in {d['flagged']}" if d["flagged"] else "",
                f"left out for suspicion in {d['excluded']}" if d["excluded"] else "",
                f"dropped for NaN/Inf in {d['non_finite']}" if d["non_finite"] else ""]
        top = f", suspicion up to {d['max_suspicion']:.2f}" if d["max_suspicion"] is not None else ""
        parts.append(f"client {d['client']} {' and '.join(w for w in what if w)} of {d['rounds']} rounds{top}"
                     + (" (an attacker)" if d["attacked"] else ""))
    ev = {k: summary[k] for k in ("attackers", "precision", "recall", "true_positives", "false_positives",
                                  "false_negatives")} | {"clients": named}
    score = ""
    if summary["attack"]:
        p, r = summary["precision"], summary["recall"]
        score = (f" Against the {len(summary['attackers'])} clients that attacked: precision "
                 f"{'-' if p is None else f'{p:.2f}'}, recall {'-' if r is None else f'{r:.2f}'}.")
    if not parts:
        return [Finding("suspected_clients", "info", "No client was flagged or left out." + score, ev, [])]
    remedies = []
    if run.cfg("server.exclude_suspicion") is None:
        remedies.append("leave flagged updates out of the aggregate: server.exclude_suspicion = 0.6")
    if (run.cfg("server.aggregator") or "mean") == "mean":
        remedies.append('aggregate robustly: server.aggregator = "trimmed-mean" or "multi-krum" (docs/robustness.md)')
    if any(d["non_finite"] for d in named):
        remedies.append("NaN/Inf updates come from diverging local training: a lower train.lr, or clipping")
    msg = "; ".join(parts) + "." + score
    msg = msg[0].upper() + msg[1:]
    return [Finding("suspected_clients", "warning", msg, ev, remedies)]


CHECKS: tuple[Callable[[_Run], list[Finding]], ...] = (
    _check_status, _check_loss, _check_drift, _check_outliers, _check_label_skew, _check_fairness,
    _check_personalization, _check_suspects,
)
