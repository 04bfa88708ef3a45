"""`fedloom diagnose`: each finding from synthetic runs written straight into a store, plus one real run."""

import json
import sys

import pytest

from fedloom import api, cli
from fedloom.diagnosis import Diagnosis, diagnose
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
    assert not any("personalization" in r for r in fair.remedies)  # the run already personalizes
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
