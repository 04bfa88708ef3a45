"""`fedloom bench`: the plain loop is a faithful baseline, the records are complete, errors are one line.

Everything runs the `tiny` task (bundled digits, mlp, 20 clients) on one thread; only the CLI test pays for
the isolated measurement processes the real benchmark uses.
"""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from fedloom import bench
from fedloom.cli import app, main
from fedloom.errors import ConfigError, DatasetError

REQUIRED = {"engine", "task", "seconds_per_round", "plain_seconds_per_round", "ratio_to_plain", "samples_per_second",
            "peak_rss_mb", "final_accuracy", "rounds", "cpu_count", "torch_threads", "torch_version", "platform"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "engines.json"
    with pytest.MonkeyPatch.context() as mp:  # ray reported as unavailable, without starting one
        real = bench.importlib.util.find_spec
        mp.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
        records = bench.run_bench("tiny", "sequential,vectorized,ray", rounds=2, json_path=path, threads=1,
                                  isolate=False, quiet=True)
    return records, path


def test_plain_loop_trains_the_same_model_as_the_sequential_engine(tiny_run):
    records, _ = tiny_run
    by = {r["engine"]: r for r in records}
    seq, plain = by["sequential"], by["plain"]
    assert seq["status"] == plain["status"] == "ok"
    assert seq["final_accuracy"] == plain["final_accuracy"] == seq["plain_final_accuracy"]
    assert seq["max_param_diff_vs_plain"] < 1e-6  # same clients, shuffles, weights and averaging: same model
    assert by["vectorized"]["max_param_diff_vs_plain"] < 1e-4
    assert by["ray"]["status"] == "unavailable" and "not installed" in by["ray"]["error"]


def test_json_records_have_the_required_keys(tiny_run):
    records, path = tiny_run
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(records))
    assert [r["engine"] for r in saved] == ["plain", "sequential", "vectorized", "ray"]
    for r in saved:
        assert set(r) >= REQUIRED, REQUIRED - set(r)
        assert r["task"] == "tiny" and r["rounds"] == 2 and r["torch_threads"] == 1
    seq = saved[1]
    assert len(seq["round_seconds"]) == 2 and seq["seconds_per_round"] > 0 and seq["samples_per_second"] > 0
    assert seq["ratio_to_plain"] == pytest.approx(seq["seconds_per_round"] / seq["plain_seconds_per_round"])


def test_repetitions_pool_the_rounds_and_report_the_ratio_range():
    import statistics

    records = bench.run_bench("tiny", "sequential", rounds=2, repeat=2, threads=1, isolate=False, quiet=True)
    plain, seq = records
    for r in records:
        assert r["repeats"] == 2 and len(r["round_seconds"]) == 4  # two repetitions of two timed rounds
        assert r["seconds_per_round"] == pytest.approx(statistics.median(r["round_seconds"]))
    lo, hi = seq["ratio_range"]
    assert 0 < lo <= hi
    assert seq["ratio_to_plain"] == pytest.approx(seq["seconds_per_round"] / plain["seconds_per_round"])
    assert seq["final_accuracy"] == plain["final_accuracy"]


def test_unknown_engine_task_or_rounds_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown engine 'sequentail'") as e:
        bench.run_bench("tiny", "sequentail")
    assert e.value.hint == "did you mean 'sequential'?"
    with pytest.raises(ConfigError, match="unknown benchmark task 'T3'"):
        bench.run_bench("T1,T3", "sequential")
    with pytest.raises(ConfigError, match="rounds"):
        bench.run_bench("tiny", "sequential", rounds=0)


def test_cli_unknown_engine_prints_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fedloom", "bench", "--tasks", "tiny", "--engines", "warp"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown engine 'warp'" in lines[0]


def test_cli_bench_tiny_isolated_writes_json(tmp_path):
    path = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["bench", "--tasks", "tiny", "--engines", "sequential", "--rounds", "1",
                                   "--threads", "1", "--json", str(path)])
    assert res.exit_code == 0, res.output
    records = json.loads(path.read_text())
    assert [(r["engine"], r["status"]) for r in records] == [("plain", "ok"), ("sequential", "ok")]
    assert all(r["rss_isolated"] and r["peak_rss_mb"] > 0 for r in records)
    assert records[1]["final_accuracy"] == records[0]["final_accuracy"]


def test_scale_check_runs_past_the_sample_count_and_reports_the_rss_ratio():
    recs = bench.run_bench("", "vectorized", rounds=1, scale=True, scale_task=bench.TASKS["tiny"],
                           populations=(20, 3000), scale_rounds=1, threads=1, isolate=False, quiet=True)
    assert [(r["task"], r["population"], r["status"]) for r in recs] == [("scale", 20, "ok"), ("scale", 3000, "ok")]
    assert recs[0]["rss_ratio_to_smallest"] == 1.0 and recs[1]["rss_ratio_to_smallest"] > 0
    assert recs[1]["engine"] == "vectorized" and recs[1]["seconds_per_round"] > 0


def test_missing_dataset_stops_the_benchmark_with_the_dataset_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDLOOM_DATA", str(empty))
    cfg = {**bench.TASKS["tiny"].config, "data": {"dataset": "mnist", "num_clients": 5, "download": False}}
    with pytest.raises(DatasetError, match="mnist: .* not found") as e:
        bench.run_bench([bench.BenchTask("gone", "mnist, not on disk", cfg)], "sequential", rounds=1,
                        data_dir=empty, threads=1, isolate=False, quiet=True)
    assert e.value.hint
