"""Plug-ins: registered algorithms, transforms and aggregators used like built-in ones, and plug-in loading from
an experiment, the command line and entry points."""

import json
import math
import os
import runpy
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import fedloom
from fedloom import plugins
from fedloom.algorithms import ALGORITHMS, Algorithm
from fedloom.algorithms.drift import FedProx
from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.pipeline.transforms import TRANSFORMS
from fedloom.server.aggregators import AGGREGATORS, MeanAggregator
from fedloom.store import RunStore

from .conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_algorithm.py"


@pytest.fixture
def clipped(monkeypatch):
    """examples/custom_algorithm.py loaded as a plug-in; the registration is undone after the test."""
    monkeypatch.setattr(plugins, "_loaded", {})
    fedloom.load_plugins([str(EXAMPLE)])
    yield ALGORITHMS["clipped-fedavg"]
    ALGORITHMS.pop("clipped-fedavg", None)


def test_custom_algorithm_runs_under_its_name_and_its_client_metrics_are_stored(runs_dir, clipped):
    cfg = small_config(run__rounds=2, server__algorithm="clipped-fedavg", server__algorithm_params={"max_norm": 0.05})
    res = fedloom.run(cfg, engine="sequential", make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    assert store.get_run(res.run_id).config["server"]["algorithm"] == "clipped-fedavg"
    for r in store.rounds(res.run_id):
        assert r["metrics"]["algorithm"] == "clipped-fedavg" and r["metrics"]["max_norm"] == 0.05
    fits = store.client_rounds(res.run_id, "fit")
    assert len(fits) == 2 * 4
    for f in fits:
        m = f["metrics"]
        # the client's own metrics, stored like the built-in columns: the clipping in closed form
        assert m["clip_scale"] == pytest.approx(min(1.0, 0.05 / m["raw_norm"]))
        assert f["update_norm"] == pytest.approx(m["raw_norm"] * m["clip_scale"], rel=1e-4)
        assert f["update_norm"] <= 0.05 * (1 + 1e-4)
        assert m["steps"] == math.ceil(f["num_examples"] / 16)  # one epoch of batches of 16
        assert "loss" not in m and "seconds" not in m  # those have columns of their own


def test_builtin_algorithms_own_client_metrics_are_stored_too(runs_dir):
    cfg = small_config(run__rounds=1, server__algorithm="fednova", train__momentum=0.0)
    res = fedloom.run(cfg, engine="sequential", make_report=False)
    fits = RunStore(runs_dir / "fedloom.db").client_rounds(res.run_id, "fit")
    # FedNova's a_i for plain SGD (no momentum) is the number of local steps tau_i
    assert [f["metrics"]["nova_a"] for f in fits] == [math.ceil(f["num_examples"] / 16) for f in fits]
    assert [f["metrics"]["steps"] for f in fits] == [math.ceil(f["num_examples"] / 16) for f in fits]


def test_registered_names_in_validation_and_did_you_mean(clipped):
    assert load_config(small_config(server__algorithm="clipped-fedavg")).server.algorithm == "clipped-fedavg"
    with pytest.raises(ConfigError, match="did you mean 'clipped-fedavg'"):
        load_config(small_config(server__algorithm="clipped-fedavgg"))
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'.*fedavg, fedprox.*clipped-fedavg"):
        load_config(small_config(server__algorithm="nope"))
    # its parameters: known keys only, with the closest one; a built-in takes none; mu is FedProx's
    with pytest.raises(ConfigError, match="no parameter 'max_nrm'.*did you mean 'max_norm'"):
        load_config(small_config(server__algorithm="clipped-fedavg", server__algorithm_params={"max_nrm": 1}))
    with pytest.raises(ConfigError, match="algorithm_params is read by registered algorithms, not by built-in"):
        load_config(small_config(server__algorithm_params={"max_norm": 1}))
    with pytest.raises(ConfigError, match="server.mu is used by fedprox, not by 'clipped-fedavg'"):
        load_config(small_config(server__algorithm="clipped-fedavg", server__mu=0.5))
    with pytest.raises(ConfigError, match="max_norm must be a number > 0"):
        fedloom.run(small_config(server__algorithm="clipped-fedavg", server__algorithm_params={"max_norm": -1}))


def test_a_registered_fedprox_variant_reads_mu_and_the_vectorized_engine_refuses_it_by_name(runs_dir, monkeypatch):
    class MyProx(FedProx):
        pass

    monkeypatch.setitem(ALGORITHMS, "my-prox", MyProx)
    cfg = load_config(small_config(server__algorithm="my-prox", server__mu=0.5))
    assert cfg.server.mu == 0.5
    with pytest.raises(ConfigError, match="vectorized engine cannot run this experiment: algorithm 'my-prox' is not "
                                          "vectorized"):
        fedloom.run(cfg, engine="vectorized", make_report=False)
    assert not (runs_dir / "fedloom.db").exists() or fedloom.runs() == []  # refused before anything is recorded


def test_register_refuses_builtin_names_and_wrong_kinds():
    with pytest.raises(ConfigError, match="'fedprox' is a built-in algorithm name"):
        fedloom.register_algorithm("fedprox", Algorithm)
    with pytest.raises(ConfigError, match="needs a subclass of fedloom.algorithms.Algorithm"):
        fedloom.register_algorithm("mine", object)
    with pytest.raises(ConfigError, match="'clip' is a built-in transform name"):
        fedloom.register_transform("clip", lambda arg: None)
    with pytest.raises(ConfigError, match="'krum' is a built-in aggregator name"):
        fedloom.register_aggregator("krum", MeanAggregator)
    with pytest.raises(ConfigError, match="without spaces around it, ':' or '\\+'"):
        fedloom.register_transform("a:b", lambda arg: None)


class _Scale:
    """A transform multiplying the update by a constant."""

    name = "scale"

    def __init__(self, factor: float):
        self.factor = factor

    def init(self, size):
        return {}

    def apply(self, vec, state, ctx):
        return vec * self.factor, state


class _First:
    """An aggregator that takes the first update as it is (counts its calls)."""

    name = "first"
    sees_clients = True
    calls = 0

    def combine(self, updates, weights):
        _First.calls += 1
        return updates[0].clone()


def test_registered_transform_and_aggregator_are_used(runs_dir, monkeypatch):
    monkeypatch.setattr("fedloom.pipeline.transforms.TRANSFORMS", dict(TRANSFORMS))
    monkeypatch.setattr("fedloom.server.aggregators.AGGREGATORS", dict(AGGREGATORS))
    fedloom.register_transform("scale", lambda arg: _Scale(float(arg)))
    fedloom.register_aggregator("first", _First)
    with pytest.raises(ConfigError, match="did you mean 'first'"):
        load_config(small_config(server__aggregator="firts"))
    res = fedloom.run(small_config(run__rounds=1, pipeline__client=["scale:0"]), engine="sequential",
                      make_report=False)
    row = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)[0]
    assert row["metrics"]["client_transforms"] == ["scale"] and row["metrics"]["aggregate_norm"] == 0.0
    res = fedloom.run(small_config(run__rounds=1, server__aggregator="first"), engine="sequential",
                      make_report=False)
    row = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)[0]
    assert _First.calls == 1 and row["metrics"]["aggregator"] == "first"
    fits = RunStore(runs_dir / "fedloom.db").client_rounds(res.run_id, "fit")
    assert fits[0]["cosine"] == pytest.approx(1.0, abs=1e-5)  # the aggregate is client 0's update itself


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


HALVED = """
import fedloom
from fedloom.algorithms import Algorithm, ClientOutput

class Halved(Algorithm):
    def client_fit(self, ctx):
        out = super().client_fit(ctx)
        return ClientOutput(out.update * 0.5, out.num_examples, out.metrics)

fedloom.register_algorithm("halved-{tag}", Halved)
"""


def test_experiment_plugins_are_relative_to_its_file_stored_absolute_and_loaded_again(tmp_path, runs_dir,
                                                                                      monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.chdir(tmp_path)  # not the experiment's folder: paths are relative to the file
    plug = _write(tmp_path / "exp" / "plugs" / "halved.py", HALVED.format(tag="a"))
    exp = _write(tmp_path / "exp" / "study.toml",
                 'name = "study"\nplugins = ["plugs/halved.py"]\n[server]\nalgorithm = "halved-a"\n')
    try:
        cfg = load_config(str(exp), {"data.dataset": "digits", "model.name": "mlp", "run.rounds": 1})
        assert cfg.plugins == [str(plug.resolve())]
        res = fedloom.run(cfg, make_report=False)
        # a new process knows nothing of it: the stored config brings it back on resume
        del ALGORITHMS["halved-a"]
        monkeypatch.setattr(plugins, "_loaded", {})
        more = fedloom.resume(res.run_id, rounds=2, make_report=False)
        assert more.status == "completed" and "halved-a" in ALGORITHMS
        assert json.loads((res.output_dir / "config.json").read_text())["plugins"] == [str(plug.resolve())]
    finally:
        ALGORITHMS.pop("halved-a", None)


def test_plugin_errors_name_the_plugin(tmp_path, monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", {})
    with pytest.raises(ConfigError, match="plug-in 'no_such_plugin_mod' not found: no module named") as e:
        load_config({"plugins": ["no_such_plugin_mod"]})
    assert e.value.exit_code == 2
    with pytest.raises(ConfigError, match="plug-in file .*missing.py does not exist"):
        fedloom.load_plugins(["missing.py"], base=tmp_path)
    bad = _write(tmp_path / "needs_dep.py", "import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError, match="plug-in '.*needs_dep.py' failed to import: ModuleNotFoundError: No module "
                                          "named 'no_such_dependency_xyz' \\(needs_dep.py, line 1\\)"):
        fedloom.load_plugins([str(bad)])
    clash = _write(tmp_path / "clash.py", "import fedloom\nfedloom.register_model('mlp', lambda s, c: None)\n")
    with pytest.raises(ConfigError, match="plug-in '.*clash.py': 'mlp' is a built-in model name"):
        fedloom.load_plugins([str(clash)])
    with pytest.raises(ConfigError, match="plugins must be a list"):
        load_config({"plugins": "x.py"})
    assert not any(name.startswith("fedloom_plugin_needs_dep") for name in sys.modules)  # a failed import is undone


def test_entry_point_plugins_load_once_modules_imported_callables_called(tmp_path, monkeypatch):
    _write(tmp_path / "ep_plugin_mod.py", "import fedloom\nCALLS = []\ndef setup():\n    CALLS.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("mod", "ep_plugin_mod", plugins.ENTRY_POINT_GROUP),
           EntryPoint("call", "ep_plugin_mod:setup", plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps if group == plugins.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    load_config({})
    load_config({})
    import ep_plugin_mod

    assert ep_plugin_mod.CALLS == [1]  # once per process, however many configs are loaded
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    eps[:] = [EntryPoint("broken", "ep_plugin_mod:nothing_here", plugins.ENTRY_POINT_GROUP)]
    with pytest.raises(ConfigError, match="entry point 'broken' \\(ep_plugin_mod:nothing_here\\) of group "
                                          "fedloom.plugins failed to load: AttributeError"):
        load_config({})


def test_custom_algorithm_example_through_the_cli_and_resume_in_new_processes(tmp_path):
    """The example as a user runs it: an experiment naming the plug-in, then a resume in another process."""
    env = {**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path), "COLUMNS": "200"}

    def fedloom_cmd(*args):
        return subprocess.run([sys.executable, "-m", "fedloom", *args], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)

    r = fedloom_cmd("run", str(ROOT / "examples" / "custom_algorithm.toml"), "--rounds", "1", "--no-report",
                    "--json", "--set", "run.threads=1")
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout)["run_id"]
    assert json.loads(r.stdout)["algorithm"] == "clipped-fedavg"
    r = fedloom_cmd("resume", run_id, "--rounds", "2", "--json", "--no-report")  # a new process: no registration
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rounds_completed"] == 2 and json.loads(r.stdout)["algorithm"] == "clipped-fedavg"


def test_custom_algorithm_example_through_python(runs_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--rounds", "1", "--no-report", "--max-norm", "0.01"])
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        ALGORITHMS.pop("clipped-fedavg", None)
    assert "completed after 1 rounds" in capsys.readouterr().out
    (rec,) = fedloom.runs()
    fits = [c for c in fedloom.load(rec.run_id).clients if c["kind"] == "fit"]
    assert rec.algorithm == "clipped-fedavg" and all(f["metrics"]["clip_scale"] < 1 for f in fits)


def test_load_plugins_runs_a_file_once(tmp_path, monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", {})
    counter = _write(tmp_path / "count_me.py", "import builtins\nbuiltins._fedloom_loads = "
                     "getattr(builtins, '_fedloom_loads', 0) + 1\n")
    import builtins

    monkeypatch.setattr(builtins, "_fedloom_loads", 0, raising=False)
    first = fedloom.load_plugins([str(counter), "count_me.py"], base=tmp_path)
    fedloom.load_plugins(["count_me.py"], base=tmp_path)
    assert first == [str(counter.resolve())] and builtins._fedloom_loads == 1
