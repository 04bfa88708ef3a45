"""`fedloom sweep`: grid x seeds as tagged runs, resumable, mean ± std per setting from the store."""

import json
import math
import statistics
import sys

import pytest

import fedloom
import fedloom.algorithms
from fedloom.errors import ConfigError, RunInterrupted
from fedloom.store import RunStore
from fedloom.sweep import mean_std, parse_grid, parse_seeds

from .conftest import small_config

GRID = {"server.algorithm": ["fedavg", "fedprox"]}


def test_parse_seeds_and_grid():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7] and parse_seeds("3") == [3]
    for bad, why in (("a-b", "is not a seed"), ("4-1", "is empty"), ("1,1", "given twice"), ("", "is not a seed")):
        with pytest.raises(ConfigError, match=why):
            parse_seeds(bad)
    assert parse_grid(["server.algorithm=fedavg,fedprox", "train.lr=0.01,0.1", "eval.federated=true,false"]) == {
        "server.algorithm": ["fedavg", "fedprox"], "train.lr": [0.01, 0.1], "eval.federated": [True, False]}
    for bad, why in ((["server.algorithm"], "is not key=value1"), (["a=1", "a=2"], "given twice"),
                     (["run.seed=1,2"], "give the seeds with --seeds"), (["train.lr=0.1,0.1"], "a value is given")):
        with pytest.raises(ConfigError, match=why):
            parse_grid(bad)


def test_mean_std_is_the_sample_std():
    values = [0.81, 0.84, 0.79, 0.9]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)


def test_sweep_runs_the_cross_product_and_summarizes_from_the_store(runs_dir):
    res = fedloom.sweep(small_config(run__rounds=1), seeds=[0, 1], grid=GRID)
    assert len(res.run_ids) == 4 and set(res.actions.values()) == {"ran"} and not res.failures
    store = RunStore(runs_dir / "fedloom.db")
    recs = [store.get_run(r) for r in res.run_ids]
    assert {(r.algorithm, r.seed) for r in recs} == {(a, s) for a in GRID["server.algorithm"] for s in (0, 1)}
    assert all(r.sweep_id == res.sweep_id for r in recs)
    assert sorted(r.run_id for r in fedloom.runs(sweep=res.sweep_id[:12])) == sorted(res.run_ids)
    for row in res.rows:
        finals = [fedloom.load(rid).summary["final_accuracy"] for rid in row["runs"].values()]
        assert row["n"] == 2 and row["final_accuracy_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_accuracy_std"] == pytest.approx(statistics.stdev(finals))
    assert [r["setting_label"] for r in res.rows] == ["server.algorithm=fedavg", "server.algorithm=fedprox"]
    assert res.html.is_file() and res.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = res.html.read_text()
    assert "server.algorithm=fedprox" in page and "±" in page
    assert json.loads(res.json.read_text())["rows"] == json.loads(json.dumps(res.rows))

    again = fedloom.sweep(small_config(run__rounds=1), seeds="0-1", grid=["server.algorithm=fedavg,fedprox"])
    assert again.sweep_id == res.sweep_id and set(again.actions.values()) == {"kept"}
    assert len(fedloom.runs()) == 4  # nothing ran twice
    other = fedloom.sweep(small_config(run__rounds=1), seeds=[0], grid={"train.lr": [0.05]})
    assert other.sweep_id != res.sweep_id  # another sweep, another id


def test_an_interrupted_sweep_resumes_where_it_stopped(runs_dir):
    calls = []

    def interrupt_third_run(event):
        calls.append(event["run_id"])
        if len(set(calls)) == 3 and event["round"] == 1:
            raise KeyboardInterrupt

    cfg = small_config(run__rounds=2)
    with pytest.raises(RunInterrupted):
        fedloom.sweep(cfg, seeds=[0, 1], grid=GRID, callback=interrupt_third_run)
    (cut,) = fedloom.runs(status="interrupted")
    assert len(fedloom.runs()) == 3
    res = fedloom.sweep(cfg, seeds=[0, 1], grid=GRID)
    assert sorted(res.actions.values()) == ["kept", "kept", "ran", "resumed"] and res.actions[cut.run_id] == "resumed"
    assert len(fedloom.runs()) == 4 and all(r.status == "completed" for r in fedloom.runs())
    assert [r["n"] for r in res.rows] == [2, 2]
    # the resumed run reached the same result as one never interrupted
    plain = fedloom.run(small_config(run__rounds=2, run__seed=cut.seed, server__algorithm=cut.algorithm),
                        make_report=False)
    assert fedloom.load(cut.run_id).summary["final_accuracy"] == plain.summary["final_accuracy"]


def test_a_bad_setting_fails_before_any_run(runs_dir):
    with pytest.raises(ConfigError, match="sweep setting train.lr=-1: .*train.lr"):
        fedloom.sweep(small_config(run__rounds=1), seeds=[0], grid={"train.lr": [0.05, -1]})
    assert fedloom.runs() == []


def test_sweep_cli(runs_dir, monkeypatch, capsys, tmp_path):
    from fedloom import cli

    exp = tmp_path / "study.toml"
    exp.write_text('name = "study"\n[data]\ndataset = "digits"\nnum_clients = 4\n[model]\nname = "mlp"\n'
                   '[train]\nbatch_size = 16\nlr = 0.05\n[run]\nrounds = 1\nthreads = 1\n')
    monkeypatch.setenv("COLUMNS", "200")
    args = ["fedloom", "sweep", str(exp), "--seeds", "0-1", "--grid", "server.algorithm=fedavg,scaffold"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert e.value.code in (0, None)
    assert "[1/4] server.algorithm=fedavg, seed 0: starting" in err
    assert "server.algorithm=scaffold" in out and "±" in out and "page:" in out
    monkeypatch.setattr(sys, "argv", [*args, "--json"])
    with pytest.raises(SystemExit):
        cli.main()
    result = json.loads(capsys.readouterr().out)
    assert [r["n"] for r in result["rows"]] == [2, 2] and all(math.isfinite(r["final_accuracy_mean"])
                                                            for r in result["rows"])
    monkeypatch.setattr(sys, "argv", ["fedloom", "sweep", str(exp), "--grid", "server.algoritm=fedavg"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "did you mean 'server.algorithm'" in capsys.readouterr().err


def test_a_store_from_before_sweeps_is_migrated_and_still_read(runs_dir):
    import sqlite3

    res = fedloom.run(small_config(run__rounds=1), make_report=False)
    db = runs_dir / "fedloom.db"
    conn = sqlite3.connect(db)  # back to the layout before sweeps and client metrics
    conn.executescript("ALTER TABLE client_rounds DROP COLUMN metrics_json; ALTER TABLE runs DROP COLUMN sweep_id;"
                       "DROP TABLE sweeps; UPDATE meta SET value='1' WHERE key='schema_version';")
    conn.close()
    old = RunStore(db, readonly=True)  # read as it is: no sweep, no client metrics
    assert old.get_run(res.run_id).sweep_id is None and old.sweep_runs("x") == []
    assert all(c["metrics"] == {} for c in old.client_rounds(res.run_id))
    old.close()
    for _ in range(2):  # opened to write: the columns are added, once
        RunStore(db).close()
    conn = sqlite3.connect(db)
    assert "metrics_json" in {r[1] for r in conn.execute("PRAGMA table_info(client_rounds)")}
    assert "sweep_id" in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    swept = fedloom.sweep(small_config(run__rounds=1), seeds=[0])
    assert [r.run_id for r in fedloom.runs(sweep=swept.sweep_id)] == swept.run_ids


class _Broken(fedloom.algorithms.Algorithm):
    def client_fit(self, ctx):
        raise RuntimeError("broken on purpose")


def test_a_failing_run_is_reported_and_the_sweep_goes_on(runs_dir, monkeypatch):
    monkeypatch.setitem(fedloom.algorithms.ALGORITHMS, "broken-alg", _Broken)
    grid = {"server.algorithm": ["broken-alg", "fedavg"]}
    res = fedloom.sweep(small_config(run__rounds=1), seeds=[0], grid=grid)
    (failed_id, why), = res.failures.items()
    assert "broken on purpose" in why and fedloom.load(failed_id).status == "failed"
    broken, fedavg = res.rows
    assert broken["n"] == 0 and broken["final_accuracy_mean"] is None and broken["not_counted"] == {failed_id: "failed"}
    assert fedavg["n"] == 1 and fedavg["final_accuracy_std"] is None  # one run: no spread to state
    monkeypatch.setitem(fedloom.algorithms.ALGORITHMS, "broken-alg", fedloom.algorithms.Algorithm)  # fixed
    again = fedloom.sweep(small_config(run__rounds=1), seeds=[0], grid=grid)
    assert again.actions[failed_id] == "resumed" and not again.failures and [r["n"] for r in again.rows] == [1, 1]
