"""`fedloom diagnose`: each finding from synthetic runs written straight into a store, plus one real run."""

import json
import sys

import pytest

from fedloom import api, cli
from fedloom.diagnosis import Diagnosis, cosine_bands, diagnose
from fedloom.metrics import fairness
from fedloom.reporting import write_report
from fedloom.store import RunStore

from .conftest import small_config
from .test_report import make_run

CONFIG = {
    "name": "synthetic",
    "data": {"dataset": "digits", "num_clients": 6, "partition": "dirichlet", "alpha": 0.3},
    "model": {"name": "mlp"},
    "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.05, "lr_schedule": "constant"},
    "server": {"algorithm": "fedavg", "optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "fraction": 1.0},
    "eval": {"every": 1, "finetune_epochs": 0},
    "run": {"rounds": 8, "seed": 0},
}
UNIFORM = [10] * 10


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs" / "fedloom.db")
    yield s
    s.close()


def fit(c: int, norm: float = 1.0, cosine: float = 0.7, loss: float = 0.5) -> dict:
    return {"client_id": c, "kind": "fit", "num_examples": 100, "loss": loss + 0.01 * c,
            "update_norm": norm + 0.05 * c, "cosine": cosine, "update_mean": 0.0, "update_std": 0.01}


def record_run(store, tmp_path, *, accs, train_losses, test_losses=None, fits=None, evals=None, personal=None,
               metrics=None, labels=None, config=CONFIG, status="completed", message=None, run_id="synth-1") -> str:
    """A run with one recorded round per entry of `accs` (None: a round that was not evaluated)."""
    labels = labels or [UNIFORM] * 6
    clients = [(c, sum(lc), 30, lc) for c, lc in enumerate(labels)]
    store.create_run(run_id, "synthetic", config, 0, {}, str(tmp_path / run_id), len(accs), clients)
    for i, acc in enumerate(accs):
        r = i + 1
        row = {"seconds": 1.0, "num_clients": len(clients), "bytes_up": 10, "bytes_down": 20,
               "train_loss": train_losses[i], "test_accuracy": acc,
               "test_loss": test_losses[i] if test_losses else (None if acc is None else 1.0 - acc),
               "metrics": dict(metrics(r) if metrics else {})}
        rows = [dict(f) for f in (fits(r) if fits else [fit(c) for c in range(len(clients))])]
        rows += [{"kind": "eval", "num_examples": 30, "loss": 1.0, **e} for e in (evals(r) if evals else [])]
        rows += [{"kind": "personal", "num_examples": 30, "loss": 1.0, **p} for p in (personal(r) if personal else [])]
        store.record_round(run_id, r, row, rows, wall_seconds=float(r))
    store.set_status(run_id, status, message)
    return run_id


def finding(d: Diagnosis, kind: str):
    found = [f for f in d.findings if f.kind == kind]
    assert len(found) == 1, [f.kind for f in d.findings]
    return found[0]


def kinds(d: Diagnosis) -> set[str]:
    return {f.kind for f in d.findings}


RISING = [0.8, 0.7, 0.6, 0.55, 0.5, 0.5, 0.49, 0.48]  # a healthy training loss


def test_drift_names_the_drifting_client(store, tmp_path):
    def fits(r):
        return [fit(c, norm=4.5, cosine=-0.35) if c == 4 else fit(c) for c in range(6)]

    run_id = record_run(store, tmp_path, accs=[0.5, 0.6, 0.7, 0.75, 0.8], train_losses=RISING[:5], fits=fits)
    d = diagnose(store, run_id)
    drift = finding(d, "client_drift")
    assert drift.severity in ("warning", "problem")
    assert "client 4" in drift.message and drift.evidence["drifting_clients"][0]["client"] == 4
    assert [c["client"] for c in drift.evidence["drifting_clients"]] == [4]
    assert drift.evidence["drifting_clients"][0]["cosine"] == pytest.approx(-0.35)
    assert any("fedprox" in r for r in drift.remedies) and any("scaffold" in r for r in drift.remedies)
    assert any("train.local_epochs = 2 now" in r for r in drift.remedies)
    outliers = finding(d, "outlier_clients")
    assert [c["client"] for c in outliers.evidence["clients"]] == [4]  # its norm, every round; the loss is fine
    assert "client 4's update norm in 5 of 5 rounds" in outliers.message
    assert d.findings[0].severity != "info"  # problems and warnings come first


def test_agreeing_clients_are_not_drift(store, tmp_path):
    run_id = record_run(store, tmp_path, accs=[0.5, 0.6, 0.7], train_losses=RISING[:3])
    d = diagnose(store, run_id)
    assert finding(d, "client_drift").severity == "info"
    assert "outlier_clients" not in kinds(d) and not d.of("problem") and not d.of("warning")


def test_diverged_run_says_diverging_and_cites_the_lr(store, tmp_path):
    config = {**CONFIG, "train": {**CONFIG["train"], "lr": 0.5}}
    losses = [1.0, 0.8, 0.9, 1.3, 2.0, 3.1]
    message = ("diverging at round 6: training loss rose for 5 rounds in a row to 3.1 (3.9x its best 0.8); "
               "try a lower learning rate (train.lr = 0.5)")
    run_id = record_run(store, tmp_path, accs=[0.3, 0.4, 0.35, 0.3, 0.2, 0.1], train_losses=losses, config=config,
                        status="diverged", message=message)
    div = finding(diagnose(store, run_id), "diverging")
    assert div.severity == "problem" and "diverg" in div.message and "train.lr = 0.5" in div.message
    assert any("train.lr = 0.5 now, try 0.125" in r for r in div.remedies)
    assert div.evidence["train_loss"]["best"] == 0.8 and div.evidence["train_lr"] == 0.5


def test_rising_test_loss_is_diverging_without_a_diverged_status(store, tmp_path):
    run_id = record_run(store, tmp_path, accs=[0.5, 0.6, 0.6, 0.55, 0.5], train_losses=RISING[:5],
                        test_losses=[1.0, 0.8, 1.0, 1.5, 2.5])
    div = finding(diagnose(store, run_id), "diverging")
    assert "test loss is diverging" in div.message and "3.1x its best" in div.message
    assert "train.lr = 0.05" in div.message


def test_stalled_plateau_and_oscillating(store, tmp_path):
    flat = [0.3, 0.5, 0.55, 0.552, 0.553, 0.551, 0.554, 0.552]
    stalled = record_run(store, tmp_path, accs=flat, train_losses=[2.0, 1.9, 1.85, 1.8, 1.8, 1.8, 1.8, 1.8],
                         run_id="stalled")
    f = finding(diagnose(store, stalled), "stalled")
    assert f.severity == "warning" and "90% of its first-round value" in f.message
    assert any("server.momentum = 0.9" in r for r in f.remedies)
    plateau = record_run(store, tmp_path, accs=flat, train_losses=[2.0, 1.0, 0.5, 0.2, 0.1, 0.1, 0.1, 0.1],
                         run_id="plateau")
    assert finding(diagnose(store, plateau), "plateau").severity == "info"
    swing = [0.5, 0.6, 0.45, 0.62, 0.44, 0.63, 0.46, 0.6]
    osc = record_run(store, tmp_path, accs=swing, train_losses=RISING, run_id="osc")
    f = finding(diagnose(store, osc), "oscillating")
    assert f.evidence["reversals"] >= 3 and any("train.lr = 0.05 now" in r for r in f.remedies)


def test_skewed_partition_names_the_skewed_clients(store, tmp_path):
    labels = [UNIFORM, UNIFORM, [95, 5] + [0] * 8, UNIFORM, UNIFORM, [0, 0, 100] + [0] * 7]
    run_id = record_run(store, tmp_path, accs=[0.5, 0.6], train_losses=RISING[:2], labels=labels)
    skew = finding(diagnose(store, run_id), "label_skew")
    assert skew.severity == "warning" and "2 of 6 clients, clients 2 and 5, have" in skew.message
    assert {c["client"] for c in skew.evidence["skewed_clients"]} == {2, 5}
    assert all(c["top_classes"] == 1 and c["tv"] >= 0.5 for c in skew.evidence["skewed_clients"])
    record_run(store, tmp_path, accs=[0.5], train_losses=[1.0], run_id="iid")
    assert finding(diagnose(store, "iid"), "label_skew").severity == "info"


def test_fairness_and_personalization(store, tmp_path):
    glob = [0.9, 0.9, 0.85, 0.88, 0.3, 0.35]
    pers = [0.8, 0.92, 0.9, 0.9, 0.7, 0.75]  # helps the worst clients, costs client 0 ten points

    def metrics(r):
        return {"fed_accuracy": sum(glob) / 6, "pers_accuracy": sum(pers) / 6, "algorithm": "fedavg",
                **{f"fair_{k}": v for k, v in fairness(glob).items()},
                **{f"pers_fair_{k}": v for k, v in fairness(pers).items()}}

    config = {**CONFIG, "eval": {"every": 1, "finetune_epochs": 1}}
    run_id = record_run(
        store, tmp_path, accs=[0.6, 0.7], train_losses=RISING[:2], metrics=metrics, config=config,
        evals=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(glob)],
        personal=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(pers)])
    d = diagnose(store, run_id)
    fair = finding(d, "fairness")
    assert fair.severity == "problem" and fair.evidence["worst10"] == 0.3 and fair.evidence["worst_clients"] == [4]
    assert "client 4 (30.0%)" in fair.message and any('"qffl"' in r for r in fair.remedies)
    # the run already personalizes: said so, never advised
    assert any("personalization is already on (fine-tuning, 1 epoch)" in r for r in fair.remedies)
    assert not any("eval.finetune_epochs = 1" in r or '"ditto"' in r for r in fair.remedies)
    p = finding(d, "personalization")
    assert "fine-tuning, 1 epoch" in p.message and "69.7%" in p.message and "82.8%" in p.message
    assert p.evidence["clients_hurt"] == [0] and "client 0" in p.message
    assert p.evidence["personal_fairness"]["worst10"] == 0.7
    page = write_report(store, run_id).read_text()
    assert (tmp_path / run_id / "fairness.png").is_file() and (tmp_path / run_id / "personalization.png").is_file()
    assert "<h2>Personalization</h2>" in page and "<th>personalized</th>" in page
    assert "<h2>Diagnosis</h2>" in page and "client 4 (30.0%)" in page


def test_old_run_without_fair_metrics_still_diagnoses_and_reports(store, tmp_path):
    run_id = make_run(store, tmp_path)  # the report tests' run: no fair_* / pers_* metrics, 3 clients
    d = diagnose(store, run_id[:-1])  # a unique prefix is enough
    fair = finding(d, "fairness")
    assert fair.evidence["round"] == 3 and fair.evidence["mean"] == pytest.approx(0.61)
    assert fair.evidence["jain"] == pytest.approx(fairness([0.71, 0.61, 0.51])["jain"], abs=1e-4)
    assert "personalization" not in kinds(d)
    json.dumps(d.to_dict(), allow_nan=False)
    page = write_report(store, run_id).read_text()
    assert "<h2>Diagnosis</h2>" in page and "Jain&#x27;s index" in page and "61.00%" in page
    # a bare run: no config, no losses, no labels, nothing evaluated
    store.create_run("bare", "bare", {}, 0, {}, str(tmp_path / "bare"), 2, [(0, 10, 0, [])])
    store.record_round("bare", 1, {"seconds": 1.0, "num_clients": 1, "bytes_up": 1, "bytes_down": 1},
                       [{"client_id": 0, "kind": "fit", "num_examples": 10}], wall_seconds=1.0)
    assert [f.kind for f in diagnose(store, "bare").findings] == ["incomplete"]


def test_failed_run_is_a_problem(store, tmp_path):
    run_id = record_run(store, tmp_path, accs=[0.5], train_losses=[1.0], status="failed",
                        message="client 3 failed in round 1: ValueError: boom")
    f = finding(diagnose(store, run_id), "run_failed")
    assert f.severity == "problem" and "ValueError: boom" in f.message and "fedloom resume synth-1" in f.remedies[0]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["fedloom", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_cli_prints_json_parses_and_unknown_id_is_one_line(store, tmp_path, monkeypatch, capsys):
    runs = str(tmp_path / "runs")
    record_run(store, tmp_path, accs=[0.5, 0.6], train_losses=RISING[:2], status="diverged",
               message="diverged in round 2: clients [3] produced NaN/Inf; try a lower learning rate (train.lr = 0.05)")
    code, out, _ = _cli(monkeypatch, capsys, "diagnose", "synth", "--runs-dir", runs)
    text = " ".join(out.split())  # Rich wraps to the terminal width
    assert code == 0 and "Diagnosis of synth-1" in text and "Problems" in text
    assert "clients [3] produced NaN/Inf" in text  # brackets from the run are text, not Rich markup
    code, out, _ = _cli(monkeypatch, capsys, "diagnose", "synth-1", "--json", "--runs-dir", runs)
    data = json.loads(out)
    assert code == 0 and data["run_id"] == "synth-1" and data["findings"][0]["kind"] == "diverging"
    assert {"kind", "severity", "message", "evidence", "remedies"} == set(data["findings"][0])
    code, out, err = _cli(monkeypatch, capsys, "diagnose", "no-such-run", "--runs-dir", runs)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "no run 'no-such-run'" in lines[0] and "Traceback" not in err


def test_a_real_tiny_run_diagnoses_and_reports(runs_dir):
    result = api.run(small_config(), rounds=2, runs_dir=runs_dir)
    d = api.diagnose(result.run_id[:-1])  # runs_dir from FEDLOOM_RUNS_DIR, like the CLI
    assert d.run_id == result.run_id and d.status == "completed" and d.rounds_completed == 2
    assert {"client_drift", "label_skew", "fairness"} <= kinds(d)
    fair = finding(d, "fairness")
    assert fair.evidence["round"] == 2 and 0 < fair.evidence["jain"] <= 1
    json.dumps(d.to_dict(), allow_nan=False)
    page = result.report.read_text()
    assert "<h2>Diagnosis</h2>" in page and "<h2>Fairness across clients</h2>" in page


# ---- issue 10: no remedy the run already uses; thresholds as documented; like with like -------------------

SKEWED = [[95, 5] + [0] * 8, [0, 0, 100] + [0] * 7] * 3
UNFAIR = [0.9, 0.9, 0.85, 0.88, 0.3, 0.35]


def _with(**sections) -> dict:
    """CONFIG with some keys of some sections replaced: _with(server={"algorithm": "fedprox"})."""
    return {**CONFIG, **{name: {**CONFIG.get(name, {}), **keys} for name, keys in sections.items()}}


def troubled_run(store, tmp_path, config, run_id, *, accs=(0.5, 0.6, 0.45, 0.62, 0.44, 0.63, 0.46, 0.6),
                 pers=None) -> Diagnosis:
    """Drift (client 4 pushes against the rest, with 4x the norm), skewed labels, unfair accuracy, swinging
    test accuracy, and, with `pers`, personalized accuracy: every finding that carries remedies at once."""
    def fits(r):
        return [fit(c, norm=4.5, cosine=-0.35) if c == 4 else fit(c, cosine=0.1) for c in range(6)]

    record_run(store, tmp_path, accs=list(accs), train_losses=RISING[:len(accs)], fits=fits, labels=SKEWED,
               config=config, run_id=run_id,
               evals=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(UNFAIR)],
               personal=(lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(pers)]) if pers else None)
    return diagnose(store, run_id)


def remedies(d: Diagnosis) -> list[str]:
    return [r for f in d.findings for r in f.remedies]


def switches_to(d: Diagnosis) -> set[str]:
    """Algorithms a remedy tells the user to switch to."""
    import re

    return {m for r in remedies(d) for m in re.findall(r'server\.algorithm = "(\w+)"', r)}


def test_a_fedprox_run_is_told_to_raise_mu_not_to_use_fedprox(store, tmp_path):
    d = troubled_run(store, tmp_path, _with(server={"algorithm": "fedprox", "mu": 0.01}), "prox")
    assert {"client_drift", "outlier_clients", "label_skew", "fairness", "oscillating"} <= kinds(d)
    assert "fedprox" not in switches_to(d)
    drift = finding(d, "client_drift").remedies
    assert any("FedProx is already on with server.mu = 0.01: raise server.mu to 0.1" in r and '"scaffold"' in r
               for r in drift)
    assert any("FedProx is already on with server.mu = 0.01" in r for r in finding(d, "label_skew").remedies)
    assert any("FedProx is already on" in r for r in finding(d, "outlier_clients").remedies)
    # mu = 0 is FedProx in name only: ten times nothing is no advice
    d = troubled_run(store, tmp_path, _with(server={"algorithm": "fedprox", "mu": 0.0}), "prox0")
    assert any("server.mu = 0: raise server.mu to 0.01" in r for r in finding(d, "client_drift").remedies)


@pytest.mark.parametrize("algorithm", ["ditto", "fedbn", "perfedavg"])
def test_a_personalizing_run_is_not_told_to_personalize(store, tmp_path, algorithm):
    pers = [0.8, 0.8, 0.9, 0.9, 0.7, 0.75]  # costs clients 0 and 1 ten points: a personalization warning too
    d = troubled_run(store, tmp_path, _with(server={"algorithm": algorithm}), algorithm, pers=pers)
    assert not {"ditto", "fedbn", "perfedavg"} & switches_to(d)
    assert not any("eval.finetune_epochs = 1" in r and "fine-tune before testing" in r for r in remedies(d))
    name = {"ditto": "Ditto", "fedbn": "FedBN", "perfedavg": "Per-FedAvg"}[algorithm]
    for kind in ("label_skew", "fairness"):
        assert any(f"personalization is already on ({name})" in r for r in finding(d, kind).remedies), kind
    assert any(f"personalization is already on ({name})" in r for r in finding(d, "outlier_clients").remedies)
    p = finding(d, "personalization")
    assert p.severity == "warning" and not any("finetune_lr" in r for r in p.remedies)  # fine-tuning is off
    for r in switches_to(d):  # what remains (FedProx, SCAFFOLD, q-FFL) says it replaces the algorithm
        assert any(f'server.algorithm = "{r}"' in x and f"instead of {algorithm}" in x for x in remedies(d))


def test_ditto_lambda_zero_and_fine_tuning_on_top(store, tmp_path):
    config = _with(server={"algorithm": "ditto", "ditto_lambda": 0.0}, eval={"every": 1, "finetune_epochs": 2})
    d = troubled_run(store, tmp_path, config, "ditto0", pers=[0.8, 0.8, 0.9, 0.9, 0.7, 0.75])
    p = finding(d, "personalization")
    assert "Ditto + fine-tuning, 2 epochs" in p.message
    assert any("server.ditto_lambda = 0 now, try 0.1" in r for r in p.remedies)
    assert any("eval.finetune_epochs = 2 now, try 1" in r for r in p.remedies)
    assert any("eval.finetune_lr is unset, so fine-tuning uses train.lr = 0.05; try eval.finetune_lr = 0.0125" in r
               for r in p.remedies)


def test_scaffold_qffl_and_fednova_runs_are_not_told_to_switch_to_themselves(store, tmp_path):
    d = troubled_run(store, tmp_path, _with(server={"algorithm": "scaffold"}), "scaffold")
    assert "scaffold" not in switches_to(d)
    assert any("SCAFFOLD is already on" in r for r in finding(d, "client_drift").remedies)
    d = troubled_run(store, tmp_path, _with(server={"algorithm": "qffl", "q": 2.0}), "qffl")
    assert "qffl" not in switches_to(d)
    assert any("q-FFL is already on with server.q = 2: a stronger fairness exponent, try 4" in r
               for r in finding(d, "fairness").remedies)
    config = _with(server={"algorithm": "fednova"}, data={**CONFIG["data"], "partition": "quantity"})
    assert "fednova" not in switches_to(troubled_run(store, tmp_path, config, "nova"))
    config = _with(data={**CONFIG["data"], "partition": "quantity"})
    assert "fednova" in switches_to(troubled_run(store, tmp_path, config, "avg-quantity"))


def test_server_momentum_already_on_is_not_advised_again(store, tmp_path):
    d = troubled_run(store, tmp_path, _with(server={**CONFIG["server"], "momentum": 0.9}), "avgm")
    osc = finding(d, "oscillating").remedies
    assert not any("server.momentum = 0.9 (FedAvgM)" in r for r in osc)
    assert any("server.momentum = 0.9 now, try 0.45" in r for r in osc)
    flat = [0.3, 0.5, 0.55, 0.552, 0.553, 0.551, 0.554, 0.552]
    record_run(store, tmp_path, accs=flat, train_losses=[2.0, 1.9, 1.85, 1.8, 1.8, 1.8, 1.8, 1.8],
               config=_with(server={**CONFIG["server"], "momentum": 0.9}), run_id="stalled-m")
    stalled = finding(diagnose(store, "stalled-m"), "stalled").remedies
    assert not any("(FedAvgM)" in r for r in stalled)
    assert any("server momentum is already on (server.momentum = 0.9)" in r and '"adam"' in r for r in stalled)
    # an adaptive server optimizer: neither momentum (the config refuses it) nor the optimizer itself
    d = troubled_run(store, tmp_path, _with(server={"algorithm": "fedavg", "optimizer": "adam", "lr": 0.1}), "adam")
    osc = finding(d, "oscillating").remedies
    assert not any("server.momentum" in r for r in osc)
    assert any("server.lr = 0.1 now, try 0.025 (server.optimizer = adam)" in r for r in osc)


def test_outlier_norms_get_clipping_unless_already_clipped_tighter(store, tmp_path):
    d = troubled_run(store, tmp_path, CONFIG, "noclip")
    # norms 1.0 + 0.05 c, client 4's 4.5: the median of 1.0, 1.05, 1.1, 1.15, 1.25 and 4.5 is 1.125, twice it 2.25
    assert any('pipeline.client = ["clip:2.25"]' in r for r in finding(d, "outlier_clients").remedies)
    d = troubled_run(store, tmp_path, _with(pipeline={"client": ["clip:10"]}), "clip10")
    assert any("already clipped (clip:10 in pipeline.client): tighten" in r and "clip:2.25" in r
               for r in finding(d, "outlier_clients").remedies)
    d = troubled_run(store, tmp_path, _with(pipeline={"client": ["clip:2"]}), "clip2")
    assert not any("clip" in r for r in finding(d, "outlier_clients").remedies)


@pytest.mark.parametrize(("k", "cosine", "band", "severity"), [
    (10, 0.26, "unrelated", "warning"),  # the run: 0.26 with 10 clients was called agreement
    (10, 0.45, "partly", "info"),
    (10, 0.70, "agree", "info"),
    (100, 0.26, "partly", "info"),  # the same 0.26 over 100 clients is well above their 0.10
    (2, 0.72, "partly", "info"),  # two unrelated updates already score 0.71
])
def test_cosine_bands_follow_the_clients_per_round(store, tmp_path, k, cosine, band, severity):
    run_id = record_run(store, tmp_path, accs=[0.5, 0.6, 0.7], train_losses=RISING[:3],
                        fits=lambda r: [fit(c, cosine=cosine) for c in range(k)], labels=[UNIFORM] * k)
    drift = finding(diagnose(store, run_id), "client_drift")
    unrelated, agree = cosine_bands(k)
    assert drift.evidence["agreement"] == band and drift.severity == severity
    assert drift.evidence["clients_per_round"] == k
    assert drift.evidence["cosine_unrelated"] == pytest.approx(unrelated, abs=1e-4)
    assert f"{k} unrelated updates score {unrelated:.2f} or less, agreeing clients {agree:.2f} or more" in drift.message
    assert ("agree with their aggregate no more than unrelated updates" in drift.message) == (band == "unrelated")
    assert drift.message.startswith("Client updates agree over") == (band == "agree")


@pytest.mark.parametrize(("k", "rho"), [(2, 0.0), (10, 0.0), (10, 0.2), (25, 0.5), (100, 0.2)])
def test_cosine_bands_match_simulated_updates(k, rho):
    """k random updates sharing a pairwise cosine rho: their mean cosine to the aggregate is sqrt(rho + (1-rho)/k),
    so rho = 0 gives the 'unrelated' bound and rho = AGREE_PAIRWISE the 'agree' one."""
    import numpy as np

    from fedloom.diagnosis import AGREE_PAIRWISE

    rng = np.random.default_rng(k)
    d = 200_000
    shared = rng.standard_normal(d)
    u = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal((k, d))
    agg = u.mean(0)
    cos = float(np.mean(u @ agg / (np.linalg.norm(u, axis=1) * np.linalg.norm(agg))))
    assert cos == pytest.approx(np.sqrt(rho + (1 - rho) / k), abs=0.01)
    unrelated, agree = cosine_bands(k)
    if rho == 0.0:
        assert cos == pytest.approx(unrelated, abs=0.01)
    if rho == AGREE_PAIRWISE:
        assert cos == pytest.approx(agree, abs=0.01)


def test_every_threshold_in_the_doc_is_the_codes():
    """docs/diagnose.md states each threshold as `NAME = value`: every one it states is the code's value, every
    numeric constant of the module is stated, and its table of cosine bands is `cosine_bands`."""
    import re
    from pathlib import Path

    from fedloom import diagnosis

    doc = (Path(__file__).parents[1] / "docs" / "diagnose.md").read_text()
    stated = re.findall(r"`([A-Z][A-Z0-9_]*) = ([-+0-9.e]+)`", doc)
    assert stated
    for name, value in stated:
        assert hasattr(diagnosis, name), f"docs/diagnose.md names {name}, which diagnosis.py lacks"
        assert float(value) == getattr(diagnosis, name), f"docs say {name} = {value}, code {getattr(diagnosis, name)}"
    constants = {n for n, v in vars(diagnosis).items()
                 if n.isupper() and isinstance(v, int | float) and not isinstance(v, bool)}
    assert constants - {n for n, _ in stated} == set(), "thresholds the doc does not state"
    rows = re.findall(r"^ *\| (\d+) \| (\d\.\d\d) \| (\d\.\d\d) \|$", doc, re.M)
    assert len(rows) >= 4
    for k, unrelated, agree in rows:
        assert (unrelated, agree) == tuple(f"{v:.2f}" for v in cosine_bands(int(k))), k


def test_rows_without_update_statistics_skip_drift_with_a_note(store, tmp_path):
    """Client-level privacy withholds per-client update norms and cosines: drift is not checked, said in one
    line; outliers are still judged on the local loss."""
    def fits(r):
        return [{**fit(c, loss=5.0 if c == 3 else 0.5), "update_norm": None, "cosine": None} for c in range(6)]

    run_id = record_run(store, tmp_path, accs=[0.5, 0.6, 0.7], train_losses=RISING[:3], fits=fits)
    d = diagnose(store, run_id)
    drift = finding(d, "client_drift")
    assert drift.severity == "info" and drift.message.startswith("Not checked") and "\n" not in drift.message
    out = finding(d, "outlier_clients")
    assert [c["client"] for c in out.evidence["clients"]] == [3] and out.evidence["clients"][0]["metric"] == "loss"
    assert not any("clip" in r for r in out.remedies)  # no norms, nothing to size a bound from
    json.dumps(d.to_dict(), allow_nan=False)
    # a round where every client went NaN (stored as NULL) is the divergence finding's, not a privacy note
    record_run(store, tmp_path, accs=[None], train_losses=[None], run_id="all-nan", status="diverged",
               fits=lambda r: [{**fit(c), "loss": None, "update_norm": None, "cosine": None} for c in range(6)])
    assert "client_drift" not in kinds(diagnose(store, "all-nan"))
    # norms but no cosines: drift from the norms alone
    record_run(store, tmp_path, accs=[0.5, 0.6], train_losses=RISING[:2], run_id="no-cos",
               fits=lambda r: [{**fit(c), "cosine": None} for c in range(6)])
    drift = finding(diagnose(store, "no-cos"), "client_drift")
    assert drift.evidence["cosine_mean"] is None and "no cosines recorded" in drift.message


def test_personalization_compares_the_same_clients(store, tmp_path):
    """Ditto personalizes only the clients it sampled: the global side is cut to those, not fed_accuracy over
    everyone (which would credit personalization with the unsampled clients' low accuracy)."""
    glob = [0.9, 0.9, 0.9, 0.3, 0.3, 0.3]
    pers = [0.85, 0.85, 0.85]  # clients 0-2 only; each loses 5 points

    def metrics(r):
        return {"fed_accuracy": 0.6, "pers_accuracy": 0.85, "pers_clients": 3}

    run_id = record_run(store, tmp_path, accs=[0.6, 0.6], train_losses=RISING[:2], metrics=metrics,
                        config=_with(server={"algorithm": "ditto"}),
                        evals=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(glob)],
                        personal=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(pers)])
    p = finding(diagnose(store, run_id), "personalization")
    assert p.evidence["global_accuracy"] == pytest.approx(0.9) and p.evidence["gain"] == pytest.approx(-0.05)
    assert p.severity == "warning" and "-5.0 points" in p.message
    assert "both over the 3 of 6 clients that have a personal model" in p.message
    assert p.evidence["global_fairness"]["worst10"] == pytest.approx(0.9)
    # only round metrics (no per-client personal rows): compared, and said not to be the same clients
    record_run(store, tmp_path, accs=[0.6, 0.6], train_losses=RISING[:2], metrics=metrics, run_id="metrics-only",
               config=_with(server={"algorithm": "ditto"}),
               evals=lambda r: [{"client_id": c, "accuracy": a} for c, a in enumerate(glob)])
    p = finding(diagnose(store, "metrics-only"), "personalization")
    assert p.evidence["same_clients"] is False and "not necessarily the same clients" in p.message
    assert "personalized over the 3 clients" in p.message
