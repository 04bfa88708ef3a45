"""Results from Python (run / load / runs / to_pandas), callbacks and stopping early, personalized accuracy
everywhere it is reported, and TensorBoard written while a run trains."""

import json
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fedloom
from fedloom.errors import ConfigError, RunError
from fedloom.store import RunStore

from .conftest import small_config


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The `fedloom` command in this process: (exit code, stdout, stderr)."""
    from fedloom import cli

    monkeypatch.setattr(sys, "argv", ["fedloom", *args])
    monkeypatch.setenv("COLUMNS", "250")
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_result_rounds_and_clients_are_the_store_rows(runs_dir):
    res = fedloom.run(small_config(run__rounds=2), make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    assert res.rounds == store.rounds(res.run_id) and [r["round"] for r in res.rounds] == [1, 2]
    assert res.clients == store.client_rounds(res.run_id)
    fits = [c for c in res.clients if c["kind"] == "fit"]
    assert len(fits) == 2 * 4 and all(c["metrics"]["steps"] >= 1 for c in fits)
    assert res.summary["algorithm"] == "fedavg" and res.summary["partition"] == "dirichlet(1)"
    again = fedloom.load(res.run_id[:-2])  # a unique prefix is enough
    assert (again.run_id, again.status, again.rounds, again.clients) == (res.run_id, "completed", res.rounds,
                                                                         res.clients)
    assert again.summary["final_accuracy"] == res.summary["final_accuracy"] == res.rounds[-1]["test_accuracy"]


def test_to_pandas_spreads_metrics_into_columns(runs_dir, monkeypatch):
    res = fedloom.run(small_config(run__rounds=1), make_report=False)
    monkeypatch.setitem(sys.modules, "pandas", None)  # not installed
    with pytest.raises(ImportError, match="to_pandas\\(\\) needs pandas.*pip install pandas"):
        res.to_pandas()
    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=list))  # rows as given to pandas
    rounds, clients = res.to_pandas()
    assert rounds[0]["fed_accuracy"] == res.rounds[0]["metrics"]["fed_accuracy"]
    assert rounds[0]["test_accuracy"] == res.rounds[0]["test_accuracy"] and "metrics" not in rounds[0]
    fit = next(c for c in clients if c["kind"] == "fit")
    assert fit["steps"] >= 1 and "metrics" not in fit
    assert len(clients) == len(res.clients)


def test_to_pandas_with_pandas(runs_dir):
    pd = pytest.importorskip("pandas")
    res = fedloom.run(small_config(run__rounds=2), make_report=False)
    rounds, clients = res.to_pandas()
    assert isinstance(rounds, pd.DataFrame) and list(rounds["round"]) == [1, 2]
    assert len(clients) == len(res.clients) and "steps" in clients.columns


def test_runs_filters_and_json(runs_dir, monkeypatch, capsys):
    a = fedloom.run(small_config(run__rounds=1) | {"name": "alpha-study"}, make_report=False)
    b = fedloom.run(small_config(run__rounds=1, server__algorithm="fedprox") | {"name": "beta"}, make_report=False)
    assert [r.run_id for r in fedloom.runs()] == [b.run_id, a.run_id]
    assert [r.run_id for r in fedloom.runs(algorithm="fedprox")] == [b.run_id]
    assert [r.run_id for r in fedloom.runs(name="study")] == [a.run_id]
    assert fedloom.runs(status="failed") == [] and fedloom.runs(dataset="mnist") == []
    assert [r.run_id for r in fedloom.runs(limit=1)] == [b.run_id]
    assert [r.run_id for r in fedloom.runs(dataset="digits", limit=1)] == [b.run_id]
    with pytest.raises(ConfigError, match="status must be a string"):
        fedloom.runs(status=3)
    code, out, _ = _cli(monkeypatch, capsys, "runs", "--json", "--algorithm", "fedavg")
    (rec,) = json.loads(out)
    assert code == 0 and rec["run_id"] == a.run_id and rec["algorithm"] == "fedavg"
    assert rec["dataset"] == "digits" and rec["partition"] == "dirichlet(1)"
    assert rec["final_accuracy"] == a.summary["final_accuracy"]
    code, out, _ = _cli(monkeypatch, capsys, "runs")
    assert a.run_id in out and b.run_id in out and "fedprox" in out and "dirichlet(1)" in out
    code, out, _ = _cli(monkeypatch, capsys, "runs", "--status", "running")
    assert "no runs match --status running" in out


def test_callback_event_has_global_and_client_metrics(runs_dir):
    events = []
    res = fedloom.run(small_config(run__rounds=2), make_report=False, callback=events.append)
    assert [e["round"] for e in events] == [1, 2] and all(e["rounds"] == 2 for e in events)
    assert all(e["run_id"] == res.run_id for e in events)
    for e, stored in zip(events, res.rounds, strict=True):
        assert e["test_accuracy"] == stored["test_accuracy"]
        assert e["metrics"]["fed_accuracy"] == stored["metrics"]["fed_accuracy"]
        fits = [c for c in e["clients"] if c["kind"] == "fit"]
        assert sorted(c["client_id"] for c in fits) == [0, 1, 2, 3]
        stored_fits = [c for c in res.clients if c["round"] == e["round"] and c["kind"] == "fit"]
        assert [c["update_norm"] for c in sorted(fits, key=lambda c: c["client_id"])] == \
            [c["update_norm"] for c in stored_fits]
        assert {c["client_id"] for c in e["clients"] if c["kind"] == "eval"} == {0, 1, 2, 3}


def test_stop_from_a_callback_then_resume_equals_an_uninterrupted_run(runs_dir):
    full = fedloom.run(small_config(run__rounds=4), engine="sequential", make_report=False)

    def stop_at_2(event):
        return fedloom.STOP if event["round"] == 2 else None

    stopped = fedloom.run(small_config(run__rounds=4), engine="sequential", make_report=False, callback=stop_at_2)
    assert stopped.status == "stopped" and stopped.summary["rounds_completed"] == 2
    assert "stopped by a callback after round 2" in stopped.message and "--rounds" in stopped.message
    assert stopped.summary["checkpoint"] and stopped.summary["rounds_planned"] == 4
    assert [r.run_id for r in fedloom.runs(status="stopped")] == [stopped.run_id]
    with pytest.raises(RunError, match="is stopped after 2 rounds.*pass --rounds N"):
        fedloom.resume(stopped.run_id)  # a deliberate end: trained further only when asked
    more = fedloom.resume(stopped.run_id, rounds=4, make_report=False)
    assert more.status == "completed" and more.summary["rounds_completed"] == 4
    assert [r["test_accuracy"] for r in more.rounds] == [r["test_accuracy"] for r in full.rounds]

    def enough(event):
        if event["test_accuracy"] is not None and event["round"] >= 1:
            raise fedloom.StopRun("accuracy is enough")

    res = fedloom.run(small_config(run__rounds=3), make_report=False, callback=enough)
    assert res.status == "stopped" and res.summary["rounds_completed"] == 1
    assert res.message.startswith("stopped by a callback after round 1: accuracy is enough")


def test_personalized_accuracy_in_summary_progress_final_line_and_show(runs_dir, monkeypatch, capsys):
    cfg = small_config(run__rounds=2, eval__finetune_epochs=1)
    res = fedloom.run(cfg, make_report=False)
    personal = [c for c in res.clients if c["kind"] == "personal" and c["round"] == 2]
    acc = [c["accuracy"] for c in personal]
    assert len(personal) == 4
    assert res.summary["final_pers_accuracy"] == pytest.approx(
        np.average(acc, weights=[c["num_examples"] for c in personal]))
    assert res.summary["final_pers_accuracy_p10"] == pytest.approx(np.percentile(acc, 10))
    summary = json.loads((res.output_dir / "summary.json").read_text())
    assert summary["final_pers_accuracy"] == res.summary["final_pers_accuracy"]

    exp = runs_dir.parent / "pers.toml"
    exp.write_text('name = "pers"\n[data]\ndataset = "digits"\nnum_clients = 4\n[model]\nname = "mlp"\n'
                   '[eval]\nfinetune_epochs = 1\n[run]\nrounds = 1\nthreads = 1\n')
    code, out, err = _cli(monkeypatch, capsys, "run", str(exp), "--no-report")
    assert code == 0
    assert "personalized" in err.splitlines()[0] and " p10 " in err.splitlines()[0]  # the round's progress line
    assert "personalized" in out and "(p10 " in out  # the final line
    run_id = fedloom.runs(name="pers")[0].run_id
    code, out, _ = _cli(monkeypatch, capsys, "show", run_id)
    assert "pers acc" in out and "pers p10" in out and "final_pers_accuracy" in out


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_written_live_with_fairness_and_personalized_metrics(runs_dir):
    seen = {}

    def peek(event):  # while the run trains, this round is already in the event files
        seen[event["round"]] = _scalars(res_dir() / "tensorboard").get("test/accuracy", [])

    def res_dir():
        return next(p for p in runs_dir.iterdir() if p.is_dir())

    res = fedloom.run(small_config(run__rounds=2, eval__finetune_epochs=1), tensorboard=True, make_report=False,
                      callback=peek)
    assert [step for step, _ in seen[1]] == [1] and [step for step, _ in seen[2]] == [1, 2]
    tb = _scalars(res.output_dir / "tensorboard")
    assert [v for _, v in tb["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in res.rounds])
    for tag, key in (("pers/accuracy", "pers_accuracy"), ("pers/accuracy_p10", "pers_accuracy_p10"),
                     ("fair/jain", "fair_jain"), ("pers_fair/worst10", "pers_fair_worst10")):
        assert [v for _, v in tb[tag]] == pytest.approx([r["metrics"][key] for r in res.rounds]), tag
    assert res.rounds  # the run also kept its store rows
    # resumed further: each round once, the new one appended
    more = fedloom.resume(res.run_id, rounds=3, make_report=False)
    tb = _scalars(more.output_dir / "tensorboard")
    assert [step for step, _ in tb["test/accuracy"]] == [1, 2, 3]
    assert json.loads((res.output_dir / "config.json").read_text())["eval"]["tensorboard"] is True
