"""The Ray engine against the sequential one, its failures, and its resource classes.

One local Ray (2 CPUs) serves the module. The algorithms that misbehave on purpose are defined here and
shipped to the Ray workers by value, so the workers need not import the tests package.
"""

import logging
import os
import sys

import pytest
import torch

import fedloom
from fedloom.algorithms import ALGORITHMS, Algorithm, ClientContext, ClientOutput
from fedloom.api import prepare
from fedloom.config import RayConfig, RunConfig, load_config
from fedloom.engines import build_engine
from fedloom.engines.ray_engine import ClientResources, RayEngine, parse_client_ids
from fedloom.errors import ClientError, ConfigError
from fedloom.params import load_tensors
from fedloom.rounds import Federation
from fedloom.store import RunStore

from .conftest import small_config

try:
    import ray
except ImportError:  # the dev extra installs it; without it only the Ray-free tests run
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'fedloom[ray]')")
pytestmark = pytest.mark.xdist_group("ray")  # with --dist loadgroup: one Ray for the whole module


@pytest.fixture(scope="module")
def local_ray():
    if ray is None:
        pytest.skip("ray is not installed")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, object_store_memory=200 << 20)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


class Flaky(Algorithm):
    """FedAvg, except that client 2 raises in its own code."""

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        if ctx.client.id == 2:
            raise RuntimeError("disk on fire")
        return super().client_fit(ctx)


class Crashy(Algorithm):
    """FedAvg, except that client 1 kills the process it runs in, as a segfault or OOM kill would."""

    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        if ctx.client.id == 1:
            os._exit(1)
        return super().client_fit(ctx)


def _federation(tmp_path, cfg, engine) -> Federation:
    data, factory = prepare(cfg)
    store = RunStore(tmp_path / f"{engine.name}.sqlite")
    return Federation(cfg, data, factory, engine, store, "r",
                      store.path.with_suffix(".run"))  # one folder per federation: its client state file


def _final_model(store: RunStore, run_id: str) -> dict[str, torch.Tensor]:
    return load_tensors(store.rounds(run_id)[-1]["checkpoint"])


# ---- the same results as the sequential engine --------------------------------------------------------


@needs_ray
def test_fedavg_run_matches_sequential(local_ray, runs_dir):
    seq = fedloom.run(small_config(run__rounds=2), make_report=False)
    on_ray = fedloom.run(small_config(run__rounds=2), make_report=False, overrides={"run.engine": "ray"})
    assert on_ray.status == "completed"
    store = RunStore(runs_dir / "fedloom.db")
    a, b = _final_model(store, seq.run_id), _final_model(store, on_ray.run_id)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    for ra, rb in zip(store.rounds(seq.run_id), store.rounds(on_ray.run_id), strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
        assert ra["test_accuracy"] == pytest.approx(rb["test_accuracy"], abs=1e-6)
    assert ray.is_initialized()  # the engine closed, but did not shut down a Ray it had not started


@needs_ray
def test_codec_pipeline_with_error_feedback_matches_sequential(local_ray, runs_dir):
    over = dict(run__rounds=3, pipeline__upload=["topk:0.1", "q8", "zstd"], pipeline__error_feedback=True,
                pipeline__download=["bf16"], server__fraction=0.75)
    seq = fedloom.run(small_config(**over), engine="sequential", make_report=False)
    on_ray = fedloom.run(small_config(**over), engine="ray", make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    a, b = _final_model(store, seq.run_id), _final_model(store, on_ray.run_id)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [r["bytes_up"] for r in store.rounds(seq.run_id)] == [r["bytes_up"] for r in store.rounds(on_ray.run_id)]


@needs_ray
def test_client_state_personalization_and_a_resource_class_match_sequential(local_ray, tmp_path):
    """Ditto keeps client state and personalizes at evaluation; client 0 runs in a 2-CPU class (the whole
    local cluster), the others in the default 1-CPU class."""
    over = {"server.algorithm": "ditto", "run.ray.classes": {"big": {"num_cpus": 2}},
            "run.ray.client_class": {"0": "big"}}
    cfg = load_config(small_config(run__rounds=2), over)
    seq = _federation(tmp_path / "s", cfg, build_engine("sequential", cfg))
    engine = build_engine("ray", cfg)
    assert engine.resources.options(0) == {"num_cpus": 2} and engine.resources.options(1) == {"num_cpus": 1.0}
    dist = _federation(tmp_path / "r", cfg, engine)
    try:
        for r in (1, 2):
            rs, rr = seq.run_round(r).row, dist.run_round(r).row
            assert rs["train_loss"] == pytest.approx(rr["train_loss"], abs=1e-5)
            pers = [(c["client_id"], c["accuracy"]) for c in rs["clients"] if c["kind"] == "personal"]
            assert pers and pers == [(c["client_id"], c["accuracy"]) for c in rr["clients"] if c["kind"] == "personal"]
    finally:
        engine.close()
    assert torch.allclose(seq.params, dist.params, atol=1e-5)
    assert seq.client_states.keys() == dist.client_states.keys() == {0, 1, 2, 3}
    for c, state in seq.client_states.items():
        assert all(torch.allclose(v, dist.client_states[c][k], atol=1e-5) for k, v in state.items())


# ---- failures -----------------------------------------------------------------------------------------


@needs_ray
def test_client_error_fails_the_run_or_drops_the_client(local_ray, runs_dir, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "fedavg", Flaky)
    with pytest.raises(ClientError) as e:
        fedloom.run(small_config(run__rounds=1), make_report=False, engine="ray")
    assert e.value.client_id == 2 and e.value.round == 1
    assert "disk on fire" in e.value.traceback_text and "in client_fit" in e.value.traceback_text  # its own frames

    res = fedloom.run(small_config(run__rounds=2, run__on_client_error="drop"), make_report=False, engine="ray")
    assert res.status == "completed"
    rounds = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)
    assert [r["metrics"]["dropped_clients"] for r in rounds] == [[2], [2]]


@needs_ray
def test_a_crashed_worker_is_a_client_failure(local_ray, tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "fedavg", Crashy)
    cfg = load_config(small_config(run__rounds=1, eval__federated=False))
    engine = build_engine("ray", cfg)
    try:
        with pytest.raises(ClientError) as e:
            _federation(tmp_path, cfg, engine).run_round(1)
        assert e.value.client_id == 1 and "outside the client's code: its worker died" in e.value.message
        cfg = load_config(cfg, {"run.on_client_error": "drop"})
        out = _federation(tmp_path, cfg, engine).run_round(1)  # a new run on the same engine: a new recipe
        assert out.failed_clients == [1] and out.row["num_clients"] == 3
    finally:
        engine.close()


# ---- configuration ------------------------------------------------------------------------------------


@needs_ray
def test_an_unreachable_address_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"cannot reach the Ray cluster at run.ray.address 'ray://127.0.0.1:1'"):
        RayEngine(RunConfig(ray={"address": "ray://127.0.0.1:1"}))
    with pytest.raises(ConfigError, match="is not 'auto'"):
        RayEngine(RunConfig(ray={"address": "somewhere"}))


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match="the ray engine needs Ray") as e:
        build_engine("ray", load_config(small_config(run__engine="ray")))
    assert e.value.hint == "pip install 'fedloom[ray]'"


def test_unknown_resource_class_is_refused():
    with pytest.raises(ConfigError, match="names class 'huge'"):
        load_config(small_config(), {"run.ray.client_class": {"0-1": "huge"}})


def test_client_classes_map_ids_to_ray_options():
    res = ClientResources(RayConfig(num_cpus=0.5, client_class={"0-2,5": "big", "7": "gpu"},
                                    classes={"big": {"num_cpus": 2, "memory": 1e9, "ssd": 1},
                                             "gpu": {"num_gpus": 1}}))
    assert parse_client_ids("0-2, 5") == [(0, 2), (5, 5)]
    assert [res.class_of(c) for c in range(8)] == ["big"] * 3 + ["default", "default", "big", "default", "gpu"]
    assert res.options(5) == {"num_cpus": 2, "memory": 1_000_000_000, "resources": {"ssd": 1}}
    assert res.options(7) == {"num_cpus": 0.5, "num_gpus": 1} and res.options(3) == {"num_cpus": 0.5}
    # a 2-CPU node without GPU or "ssd": those classes could never run there
    assert res.infeasible([{"CPU": 2.0, "memory": 4e9}]) == ["big", "gpu"]
    assert res.infeasible([{"CPU": 2.0, "memory": 4e9, "ssd": 1.0}, {"CPU": 1.0, "GPU": 1.0}]) == []
    for bad in ("a-b", "5-2", ""):
        with pytest.raises(ConfigError, match="not a list of client ids"):
            parse_client_ids(bad)
    with pytest.raises(ConfigError, match="clients 2-2 in both"):
        ClientResources(RayConfig(client_class={"0-2": "a", "2-4": "b"}, classes={"a": {}, "b": {}}))
