"""Hardening (issue 8): exit codes and Ctrl-C, resume that never silently restarts, the run lock, safe run
folders, the run store under faults (damaged, read-only, full disk), and the Python API's argument types."""

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fedloom
from fedloom import api
from fedloom.config import load_config
from fedloom.errors import ConfigError, RunError, RunInterrupted, learning_rate_hint
from fedloom.params import load_tensors
from fedloom.store import RunStore

from .conftest import small_config
from .test_cli import fedloom_cmd, write_toml


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _interrupt_after(round_: int):
    """A progress callback that presses Ctrl-C once `round_` is recorded (the callback runs after that)."""
    def callback(ev):
        if ev["round"] == round_:
            raise KeyboardInterrupt
    return callback


def _interrupted_run(runs_dir, at: int, **over) -> str:
    with pytest.raises(RunInterrupted) as e:
        fedloom.run(small_config(**over), runs_dir=runs_dir, make_report=False, callback=_interrupt_after(at))
    return e.value.run_id


def _wait_for_round(db: Path, proc: subprocess.Popen, at_least: int = 1, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                    row = c.execute("SELECT run_id, rounds_completed FROM runs").fetchone()
            except sqlite3.Error:
                row = None
            if row and row[1] >= at_least:
                return row[0]
        time.sleep(0.05)
    raise AssertionError(f"no round recorded in time; stderr: {proc.stderr.read() if proc.poll() is not None else ''}")


# ---- exit codes -----------------------------------------------------------------------------------

def test_a_diverged_run_exits_3_also_with_json_and_quiet(tmp_path):
    cfg = write_toml(tmp_path / "tiny.toml", small_config(run__rounds=2))
    r = fedloom_cmd("run", cfg, "--set", "train.lr=1e6", "--no-report", "--json", "--quiet", runs_dir=tmp_path / "runs")
    assert r.returncode == 3, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "diverged" and "diverged in round 1" in summary["message"]


@pytest.mark.parametrize(("args", "named"), [
    (["run", "quickstart", "--rounds", "abc"], "'--rounds'"),
    (["run", "quickstart", "--bogus"], "--bogus"),
    (["resume"], "Missing argument"),
])
def test_usage_errors_are_click_usage_errors_exit_2(tmp_path, args, named):
    r = fedloom_cmd(*args, runs_dir=tmp_path)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "Usage:" in r.stderr
    assert "BadParameter" not in r.stderr and "NoSuchOption" not in r.stderr and "--debug" not in r.stderr


@pytest.mark.parametrize(("key", "value", "says"), [
    ("data.dataset", "digitz", "unknown dataset 'digitz'"),
    ("data.options", {"bogus": 1}, "unknown option 'bogus'"),
    ("data.options", {"test_fraction": 2}, "test_fraction = 2 is invalid"),
    ("data.options", {"test_fraction": float("nan")}, "data.options.test_fraction = nan is not a finite number"),
    ("model.name", "mlpp", "unknown model 'mlpp'"),
    ("run.engine", "vectorised", "unknown engine 'vectorised'"),
    ("server.clients_per_round", 9, "server.clients_per_round = 9 is more than data.num_clients = 4"),
    ("run.seed", 2**64, "integers must fit in 64 bits"),
    ("run.seed", -1, "'run.seed': -1 (input should be greater than or equal to 0)"),
    ("train.lr", float("inf"), "'train.lr': inf is not a finite number"),
    ("server.lr", float("nan"), "'server.lr': nan is not a finite number"),
    ("run.rounds", True, "'run.rounds': true is a boolean, expected an integer"),
    ("data.num_clients", 4.0, "'data.num_clients': 4.0 is a number, expected an integer"),
    ("run.threads", 100_000, "'run.threads': 100000 (input should be less than or equal to 1024)"),
])
def test_configuration_errors_are_config_errors_before_anything_is_written(runs_dir, key, value, says):
    """Found while loading the config or, for the dataset's options, the data: all exit 2, none leaves a run."""
    with pytest.raises(ConfigError) as e:
        fedloom.run(small_config(), overrides={key: value}, make_report=False)
    assert e.value.exit_code == 2 and says in str(e.value), str(e.value)
    assert fedloom.runs() == []


def test_a_configuration_error_found_with_the_data_exits_2_in_one_line(tmp_path):
    cfg = write_toml(tmp_path / "tiny.toml", small_config())
    r = fedloom_cmd("run", cfg, "--set", "data.options={test_fraction = 2}", runs_dir=tmp_path / "runs")
    lines = _lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "test_fraction = 2 is invalid" in lines[0], r.stderr


def _press_ctrl_c(args: list[str], runs: Path, rounds_before: int) -> tuple[str, str, int]:
    """Start `fedloom ARGS`, send SIGINT once it has recorded a round, return (run id, stderr, rounds done)."""
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(runs), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "fedloom", *args, "--quiet"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_id = _wait_for_round(runs / "fedloom.db", proc, at_least=rounds_before + 1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:  # a test that fails leaves no training process behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    with sqlite3.connect(runs / "fedloom.db") as c:
        status, done = c.execute("SELECT status, rounds_completed FROM runs").fetchone()
    assert status == "interrupted" and done > rounds_before
    return run_id, stderr, done


def test_ctrl_c_during_run_and_resume_exits_130_saying_how_to_continue(tmp_path):
    runs = tmp_path / "runs"
    cfg = write_toml(tmp_path / "slow.toml", small_config(run__rounds=5000, train__local_epochs=3))
    run_id, stderr, done = _press_ctrl_c(["run", cfg], runs, 0)
    assert _lines(stderr) == [f"interrupted after round {done}; continue with `fedloom resume {run_id}`"]
    _, stderr, done = _press_ctrl_c(["resume", run_id], runs, done)
    assert _lines(stderr) == [f"interrupted after round {done}; continue with `fedloom resume {run_id}`"]
    with api.run_lock(runs / run_id, run_id):  # the interrupted process let go of the run
        pass


# ---- resume and checkpoints -----------------------------------------------------------------------

def test_resume_refuses_when_the_checkpoints_are_gone_and_keeps_the_history(tmp_path):
    runs = tmp_path / "runs"
    run_id = _interrupted_run(runs, at=2, run__rounds=3)
    store = RunStore(runs / "fedloom.db")
    recorded = store.rounds(run_id)
    assert [r["round"] for r in recorded] == [1, 2]
    shutil.rmtree(runs / run_id / "checkpoints")
    with pytest.raises(RunError) as e:
        fedloom.resume(run_id, runs_dir=runs, make_report=False)
    assert "round-00002.safetensors" in e.value.message and "is missing" in e.value.message
    assert "--from-scratch" in e.value.hint and "fedloom run" in e.value.hint
    assert store.rounds(run_id) == recorded and store.get_run(run_id).status == "interrupted"

    r = fedloom.resume(run_id, runs_dir=runs, make_report=False, from_scratch=True)  # asked for: retrain
    straight = fedloom.run(small_config(run__rounds=3), runs_dir=tmp_path / "straight", make_report=False)
    assert r.summary["rounds_completed"] == 3 and [x["round"] for x in store.rounds(run_id)] == [1, 2, 3]
    a, b = load_tensors(r.summary["checkpoint"]), load_tensors(straight.summary["checkpoint"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_before_any_checkpoint_restarts_from_round_1(tmp_path):
    """checkpoint_every = 5, stopped after round 2: no checkpoint was ever written, so there is nothing to lose
    and the rounds are trained again from the seeded initial model."""
    runs = tmp_path / "runs"
    run_id = _interrupted_run(runs, at=2, run__rounds=3, run__checkpoint_every=5)
    r = fedloom.resume(run_id, runs_dir=runs, make_report=False)
    assert r.status == "completed" and [x["round"] for x in RunStore(runs / "fedloom.db").rounds(run_id)] == [1, 2, 3]


def test_a_diverged_run_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    """Rounds 1-4 train normally; from round 4 on the clients' step grows 4x a round, so the loss rises and the
    run stops as diverged in round 6. Rotation keeps the newest two checkpoints (the diverging rounds 5 and 6)
    and also round 4's, the best evaluated model."""
    from fedloom.client import work

    real_fit = work.ClientRuntime.fit

    def growing_step(self, task):
        if task.round > 3:
            task = dataclasses.replace(task, lr=task.lr * 4 ** (task.round - 3))
        return real_fit(self, task)

    monkeypatch.setattr(work.ClientRuntime, "fit", growing_step)
    r = fedloom.run(small_config(run__rounds=12, run__divergence_patience=2, run__engine="sequential"),
                    runs_dir=tmp_path, make_report=False)
    assert r.status == "diverged" and r.summary["rounds_completed"] == 6, r.message
    assert r.summary["best_round"] == 4
    kept = sorted(p.name for p in (r.output_dir / "checkpoints").glob("round-*.safetensors"))
    assert kept == ["round-00004.safetensors", "round-00005.safetensors", "round-00006.safetensors"]
    assert Path(r.summary["best_checkpoint"]).name == "round-00004.safetensors"


def test_the_divergence_message_names_what_the_run_was_changing():
    plain = load_config(small_config())
    assert learning_rate_hint(plain) == "try a lower learning rate (train.lr = 0.05)"
    adam = load_config(small_config(server__optimizer="adam", server__lr=0.5))
    assert "server.lr = 0.5 with server.optimizer = adam" in learning_rate_hint(adam)
    avgm = load_config(small_config(server__momentum=0.9))
    assert "server.lr = 1.0 with server.optimizer = sgd, server.momentum = 0.9" in learning_rate_hint(avgm)


def test_a_run_being_trained_is_locked(tmp_path):
    """While a resume trains, the run's lock is held: taking it (as a second resume would) is refused, naming
    the holder; afterwards it is free. A lock held elsewhere makes a resume refuse before it changes anything."""
    runs = tmp_path / "runs"
    run_id = _interrupted_run(runs, at=1, run__rounds=3)
    refused = []

    def try_lock(ev):
        holder = rf"run x is being trained by another process \(pid {os.getpid()}\)"
        with pytest.raises(RunError, match=holder), api.run_lock(runs / run_id, "x"):
            pass
        refused.append(ev["round"])

    r = fedloom.resume(run_id, runs_dir=runs, make_report=False, callback=try_lock)
    assert r.status == "completed" and refused == [2, 3]
    # free again; held here, another resume of the run is refused
    with api.run_lock(runs / run_id, run_id), pytest.raises(RunError, match="being trained by another process"):
        fedloom.resume(run_id, runs_dir=runs, rounds=4, make_report=False)
    with pytest.raises(RunError, match="has 3 rounds recorded; --rounds 2 would end it before them"):
        fedloom.resume(run_id, runs_dir=runs, rounds=2, make_report=False)
    rec = RunStore(runs / "fedloom.db").get_run(run_id)
    assert (rec.rounds_completed, rec.rounds_planned, rec.status) == (3, 3, "completed")


# ---- input that reaches the file system ---------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/x", "etc-x"), ("/abs/path", "abs-path"), ("Über Straße 名前", "Uber-Strae"), ("", "run"),
    ("..", "run"), (".hidden", "hidden"), ("a" * 300, "a" * 64), ("ok_name-1.2", "ok_name-1.2"),
])
def test_run_names_become_safe_folder_names(name, expected):
    s = api.slug(name)
    assert s == expected and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", s)


def test_a_run_named_with_dot_dots_stays_in_the_runs_directory(tmp_path):
    runs = tmp_path / "deep" / "runs"
    r = fedloom.run({**small_config(run__rounds=1), "name": "../../escaped"}, runs_dir=runs, make_report=False)
    assert r.output_dir.resolve().parent == runs.resolve() and r.run_id.startswith("escaped-")
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["runs"]
    assert RunStore(runs / "fedloom.db").get_run(r.run_id).name == "../../escaped"  # what the user wrote


def test_an_output_folder_holding_a_run_is_not_reused(tmp_path):
    """A second run into the same --output-dir would mix its checkpoints with the first's (and rotation would
    delete the new ones, sorting below the old): refused before anything is written."""
    out = tmp_path / "out"
    fedloom.run(small_config(run__rounds=2), output_dir=out, runs_dir=tmp_path / "runs", make_report=False)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConfigError, match="already holds a run"):
        fedloom.run(small_config(run__rounds=1), output_dir=out, runs_dir=tmp_path / "runs", make_report=False)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert len(fedloom.runs(tmp_path / "runs")) == 1


def test_a_non_utf8_experiment_file_is_refused_naming_it(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('name = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.message == f"experiment file {p} is not UTF-8 text (byte 11 is 0xe9)"


# ---- the run store under faults ---------------------------------------------------------------------

def _store_with_runs(path: Path, ids: list[str]) -> None:
    store = RunStore(path)
    for i, run_id in enumerate(ids):
        store.create_run(run_id, run_id.split("-")[0], {}, 0, {}, str(path.parent / run_id), 5, [(0, 10, 2, [5, 5])])
        store.conn.execute("UPDATE runs SET created_at=? WHERE run_id=?", (1_800_000_000 + i, run_id))
    store.close()


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_a_damaged_store_is_one_line_naming_the_file(tmp_path, damage):
    db = tmp_path / "fedloom.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:  # a real store whose pages after the header are overwritten
        _store_with_runs(db, [f"exp-{i}" for i in range(50)])
        data = bytearray(db.read_bytes())
        data[4096:] = b"\xa5" * (len(data) - 4096)
        db.write_bytes(bytes(data))
    for readonly in (True, False):
        with pytest.raises(RunError) as e:
            RunStore(db, readonly=readonly).list_runs()
        assert e.value.message.startswith(f"run store {db} is damaged")
        assert f"mv {db} {db}.damaged" in e.value.hint
    if damage == "pages":
        r = fedloom_cmd("runs", runs_dir=tmp_path)
        lines = _lines(r.stderr)
        assert r.returncode == 1 and len(lines) == 1 and str(db) in lines[0] and "move it aside" in lines[0]
        assert "DatabaseError" not in r.stderr


def test_reading_commands_open_the_store_read_only(tmp_path):
    """`runs`, `show` and friends open the store with mode=ro: they never write it, and on a folder that does
    not exist they create nothing."""
    db = tmp_path / "runs" / "fedloom.db"
    _store_with_runs(db, ["exp-1", "exp-2"])
    before = db.read_bytes()
    store = RunStore(db, readonly=True)
    assert [r.run_id for r in store.list_runs()] == ["exp-2", "exp-1"]
    with pytest.raises(RunError, match="cannot write the run store"):
        store.set_status("exp-1", "failed")
    assert db.read_bytes() == before
    assert fedloom.runs(tmp_path / "nowhere") == [] and not (tmp_path / "nowhere").exists()


def _as_nobody() -> list[str] | None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def test_a_read_only_runs_directory_can_still_be_read():
    """A real run, then its runs directory made read-only (files 0444, folders 0555) and every reading command
    run as `nobody` (root ignores permissions)."""
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("needs root and setpriv to run a command as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="fedloom-ro-"))  # under /tmp, which nobody can reach
    os.chmod(base, 0o755)
    runs, writable = base / "runs", base / "elsewhere"
    cfg = write_toml(base / "tiny.toml", small_config(run__rounds=2))
    run_id = fedloom.run(small_config(run__rounds=2), runs_dir=runs, make_report=False).run_id
    writable.mkdir()
    os.chmod(writable, 0o777)
    for p in sorted(runs.rglob("*"), reverse=True) + [runs]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(runs), "COLUMNS": "200", "MPLCONFIGDIR": str(writable),
           "HOME": str(writable)}

    def nobody(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "fedloom", *args], capture_output=True, text=True,
                              env=env, timeout=300, cwd=writable)

    try:
        assert run_id in nobody("runs").stdout
        r = nobody("report", run_id, "--output-dir", str(writable))  # reads everything `show`/`diagnose` read
        assert r.returncode == 0 and (writable / "report.html").is_file(), r.stderr
        r = nobody("report", run_id)  # into the read-only run folder: says so, and the way out
        lines = _lines(r.stderr)
        assert r.returncode == 1 and len(lines) == 1 and str(runs / run_id) in lines[0], r.stderr
        assert "--output-dir" in lines[0]
        r = nobody("run", cfg)
        lines = _lines(r.stderr)
        assert r.returncode == 1 and len(lines) == 1 and str(runs / "fedloom.db") in lines[0], r.stderr
        assert "--runs-dir" in lines[0]
    finally:
        for p in [runs, *runs.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        shutil.rmtree(base)


def _full_disk_write(self, *args, **kwargs):
    self.open("w").close()  # what a full disk leaves: the file, with nothing in it
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    r = fedloom.run(small_config(run__rounds=1), runs_dir=runs, make_report=False)
    store = RunStore(runs / "fedloom.db")
    monkeypatch.setattr(Path, "write_text", _full_disk_write)
    with pytest.raises(RunError) as e:
        api.write_summary(store, r.run_id)
    assert e.value.message == f"cannot write {r.output_dir / 'summary.json'}: the disk is full"
    assert not (r.output_dir / "summary.json.tmp").exists()


def test_a_write_failing_during_a_run_names_the_file_and_marks_the_run_failed(tmp_path):
    """An OSError out of the training loop (e.g. a checkpoint on a full disk) is one line naming the file; its
    temporary file is removed and the run is recorded as failed with that line."""
    runs = tmp_path / "runs"
    tmp = tmp_path / "round-00002.safetensors.tmp"

    def disk_full(ev):
        if ev["round"] == 1:
            tmp.write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(RunError) as e:
        fedloom.run(small_config(), runs_dir=runs, make_report=False, callback=disk_full)
    assert e.value.message == f"cannot write {tmp_path / 'round-00002.safetensors'}: the disk is full"
    assert "fedloom resume" in e.value.hint and not tmp.exists()
    rec = RunStore(runs / "fedloom.db").list_runs()[0]
    assert rec.status == "failed" and rec.message == e.value.message


def test_run_id_prefixes_ambiguous_or_with_wildcards(tmp_path):
    db = tmp_path / "fedloom.db"
    _store_with_runs(db, ["exp-1a", "exp-1b", "exp-2", "my_run-1"])
    store = RunStore(db, readonly=True)
    with pytest.raises(RunError) as e:
        store.get_run("exp-1")
    assert "ambiguous: 2 runs" in e.value.message and e.value.hint.endswith("exp-1b, exp-1a")
    assert store.get_run("exp-2").run_id == "exp-2" and store.get_run("my_").run_id == "my_run-1"
    for no_match in ("exp_", "%", "my%"):  # LIKE wildcards are plain characters in a prefix
        with pytest.raises(RunError, match="no run"):
            store.get_run(no_match)
    with pytest.raises(RunError, match="no run id given"):
        store.get_run("")


# ---- the Python API's argument types ----------------------------------------------------------------

@pytest.mark.parametrize(("call", "says"), [
    (lambda: fedloom.run(small_config(), overrides=[("train.lr", 1)]), "is not a 'key=value' string"),
    (lambda: fedloom.run(small_config(), overrides="train.lr=1"), "overrides must be a list"),
    (lambda: fedloom.run(small_config(), overrides={1: 2}), "not a dotted config key"),
    (lambda: fedloom.run(123), "not int"),
    (lambda: fedloom.run(small_config(), rounds="5"), "'run.rounds': '5' is a string, expected an integer"),
    (lambda: fedloom.run(small_config(), rounds=True), "'run.rounds': true is a boolean"),
    (lambda: fedloom.run(small_config(), seed=1.5), "'run.seed': 1.5 is a number, expected an integer"),
    (lambda: fedloom.run(small_config(), engine=3), "'run.engine': 3 is an integer, expected a string"),
    (lambda: fedloom.run(small_config(), output_dir=5), "output_dir must be a folder path"),
    (lambda: fedloom.run(small_config(), runs_dir=["x"]), "runs_dir must be a folder path"),
    (lambda: fedloom.run(small_config(), callback="print"), "callback must be a function"),
    (lambda: fedloom.run(small_config(), make_report="no"), "make_report must be True or False"),
    (lambda: fedloom.run(small_config(train__lr=True)), "'train.lr': true is a boolean, expected a number"),
    (lambda: fedloom.run(small_config(data__num_clients=4.0)), "'data.num_clients': 4.0 is a number"),
    (lambda: fedloom.run({**small_config(), "name": 7}), "'name': 7 is an integer, expected a string"),
    (lambda: fedloom.resume(5), "run_id must be a run id"),
    (lambda: fedloom.resume("x", rounds="3"), "rounds must be a number of rounds"),
    (lambda: fedloom.show(None), "run_id must be a run id"),
    (lambda: fedloom.report("x", tensorboard="yes"), "tensorboard must be True or False"),
    (lambda: fedloom.runs(limit="3"), "limit must be a number"),
    (lambda: load_config(None), "not NoneType"),
])
def test_python_api_refuses_wrong_types_with_config_error(runs_dir, call, says):
    with pytest.raises(ConfigError) as e:
        call()
    assert says in e.value.message, e.value.message
    assert not runs_dir.exists() or not any(runs_dir.glob("*/config.json"))


def test_load_config_leaves_the_callers_dict_alone():
    cfg = small_config()
    load_config(cfg, {"train.lr": 0.5, "data.alpha": 0.1})
    assert cfg == small_config()


# ---- `fedloom runs` on a narrow terminal ------------------------------------------------------------

def test_runs_keeps_every_run_id_whole_at_80_columns(tmp_path):
    ids = ["quickstart-20261129-211045-ab12", "fmnist-dir01-fedprox-mu-0.01-20261129-211045-ab12"]
    _store_with_runs(tmp_path / "fedloom.db", ids)
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path), "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "fedloom", "runs"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(run_id in r.stdout for run_id in ids), r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
