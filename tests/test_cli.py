"""The command line as a user meets it: real processes, exit codes, one-line errors, resume after kill."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from fedloom.params import load_tensors

from .conftest import small_config


def fedloom_cmd(*args, runs_dir, timeout=300, **kw):
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(runs_dir), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fedloom", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def write_toml(path, cfg: dict) -> str:
    lines = [f'name = "{cfg["name"]}"']
    for section, values in cfg.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_unknown_key_is_one_line_exit_2(tmp_path):
    r = fedloom_cmd("run", "quickstart", "--set", "train.lrr=0.1", runs_dir=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "unknown config key 'train.lrr'" in lines[0] and "did you mean 'train.lr'" in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_value_and_unknown_engine(tmp_path):
    r = fedloom_cmd("run", "quickstart", "--set", "data.partition=bogus", runs_dir=tmp_path)
    assert r.returncode == 2 and "data.partition" in r.stderr and "Traceback" not in r.stderr
    r = fedloom_cmd("run", "quickstart", "--engine", "sequentail", runs_dir=tmp_path)
    assert r.returncode == 2 and "did you mean 'sequential'" in r.stderr


def test_missing_dataset_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "fedloom", "run", "quickstart", "--set", "data.dataset=mnist",
         "--set", f"data.data_dir='{empty}'", "--set", "data.download=false"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
             "FEDLOOM_DATA": str(empty), "COLUMNS": "400"})
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "mnist" in lines[0].lower() and "Traceback" not in r.stderr


def test_corrupt_dataset_file_names_the_file(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (d / name).write_bytes(b"\x1f\x8b\x08\x00garbage")
    r = subprocess.run(
        [sys.executable, "-m", "fedloom", "run", "quickstart", "--set", "data.dataset=mnist",
         "--set", f"data.data_dir='{d}'", "--set", "data.download=false"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
             "COLUMNS": "400"})
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(d) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = fedloom_cmd("--debug", "run", "quickstart", "--set", "train.lrr=0.1", runs_dir=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_run_show_runs_report_json(tmp_path):
    cfg = write_toml(tmp_path / "tiny.toml", small_config())
    r = fedloom_cmd("run", cfg, "--rounds", "2", "--json", runs_dir=tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["rounds_completed"] == 2 and summary["status"] == "completed"
    assert os.path.isfile(summary["report"])
    run_id = summary["run_id"]
    r = fedloom_cmd("runs", runs_dir=tmp_path / "runs")
    assert r.returncode == 0 and run_id[:20] in r.stdout
    r = fedloom_cmd("show", run_id[:-2], "--json", runs_dir=tmp_path / "runs")  # a unique prefix is enough
    assert r.returncode == 0 and len(json.loads(r.stdout)["rounds"]) == 2
    r = fedloom_cmd("report", run_id, "--tensorboard", runs_dir=tmp_path / "runs")
    assert r.returncode == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs" / run_id / "tensorboard").iterdir())
    r = fedloom_cmd("show", "no-such-run", runs_dir=tmp_path / "runs")
    assert r.returncode == 1 and "no run 'no-such-run'" in r.stderr


def test_output_dir_and_seed_flags(tmp_path):
    cfg = write_toml(tmp_path / "tiny.toml", small_config())
    out = tmp_path / "elsewhere"
    r = fedloom_cmd("run", cfg, "--rounds", "1", "--seed", "5", "--output-dir", str(out), "--quiet", "--no-report",
                    runs_dir=tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["seed"] == 5 and s["rounds_completed"] == 1


def test_resume_after_kill_gives_the_same_model(tmp_path):
    """Kill a real run mid-way with SIGKILL, resume it, compare with an uninterrupted run."""
    rounds = 30
    cfg = write_toml(tmp_path / "tiny.toml", small_config(run__rounds=rounds, train__local_epochs=3))
    runs_a = tmp_path / "a"
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(runs_a)}
    proc = subprocess.Popen([sys.executable, "-m", "fedloom", "run", cfg, "--quiet", "--no-report"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = runs_a / "fedloom.db"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                row = sqlite3.connect(db).execute("SELECT run_id, rounds_completed FROM runs").fetchone()
            except sqlite3.Error:
                row = None
            if row and row[1] >= 3:
                done = row[1]
                break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id, status, completed = sqlite3.connect(db).execute(
        "SELECT run_id, status, rounds_completed FROM runs").fetchone()
    assert status == "running" and done <= completed < rounds

    r = fedloom_cmd("resume", run_id, "--quiet", "--json", runs_dir=runs_a)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rounds_completed"] == rounds

    r = fedloom_cmd("run", cfg, "--quiet", "--json", "--no-report", runs_dir=tmp_path / "b")
    assert r.returncode == 0, r.stderr
    straight = json.loads(r.stdout)
    resumed = json.loads((runs_a / run_id / "summary.json").read_text())
    a = load_tensors(resumed["checkpoint"])
    b = load_tensors(straight["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final_accuracy"] == straight["final_accuracy"]
    with sqlite3.connect(runs_a / "fedloom.db") as c:
        rounds_recorded = [r[0] for r in c.execute("SELECT round FROM rounds WHERE run_id=? ORDER BY round",
                                                   (run_id,))]
    assert rounds_recorded == list(range(1, rounds + 1))


def test_resume_of_completed_run_says_so(tmp_path):
    cfg = write_toml(tmp_path / "tiny.toml", small_config(run__rounds=1))
    r = fedloom_cmd("run", cfg, "--quiet", "--json", "--no-report", runs_dir=tmp_path)
    run_id = json.loads(r.stdout)["run_id"]
    r = fedloom_cmd("resume", run_id, runs_dir=tmp_path)
    assert r.returncode == 1 and "nothing to resume" in r.stderr
    r = fedloom_cmd("resume", run_id, "--rounds", "2", "--quiet", "--json", runs_dir=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["rounds_completed"] == 2


@pytest.mark.parametrize("cmd", [["datasets"]])
def test_datasets_lists_every_dataset(tmp_path, cmd):
    r = fedloom_cmd(*cmd, runs_dir=tmp_path)
    assert r.returncode == 0
    for name in ("fashion-mnist", "mnist", "cifar10", "digits", "breast-cancer", "synthetic"):
        assert name in r.stdout


def test_refused_setups_are_one_line_and_leave_no_run_behind(tmp_path):
    cfg = write_toml(tmp_path / "bn.toml", small_config(server__algorithm="fedbn"))
    r = fedloom_cmd("run", cfg, runs_dir=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "normalization" in r.stderr and "simple-cnn-bn" in r.stderr
    cfg = write_toml(tmp_path / "skew.toml", small_config(data__num_clients=300, data__alpha=0.01))
    r = fedloom_cmd("run", cfg, runs_dir=tmp_path)
    assert r.returncode == 2 and "cannot partition digits" in r.stderr and "Traceback" not in r.stderr
    r = fedloom_cmd("run", "quickstart", "--set", "server.mu=0.1", runs_dir=tmp_path)
    assert r.returncode == 2 and "server.mu is used by fedprox, not by 'fedavg'" in r.stderr
    assert "no runs" in fedloom_cmd("runs", runs_dir=tmp_path).stdout.lower()
