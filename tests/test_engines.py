"""Every engine computes the same round as the sequential reference, and fails the same way."""

import copy
import os

import numpy as np
import pytest
import torch

from fedloom.algorithms import ALGORITHMS, Algorithm
from fedloom.config import load_config
from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData
from fedloom.engines import build_engine
from fedloom.errors import ClientError, ConfigError
from fedloom.models import build_model
from fedloom.pipeline import wire
from fedloom.rounds import Federation
from fedloom.store import RunStore


def _images(sizes=(40, 25, 33, 7), seed=0) -> FederatedData:
    """Small uint8 images in Fashion-MNIST's layout, so the CNN path (conv under vmap) is exercised."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (torch.rand(n, 1, 28, 28, generator=g) * 60 + y.view(-1, 1, 1, 1) * 40).to(torch.uint8)
    ds = Dataset("imgs", x, y, x[:20].clone(), y[:20].clone(), num_classes=4, mean=(0.3,), std=(0.3,))
    bounds = np.cumsum((0, *sizes))
    clients = [ClientData(i, np.arange(bounds[i], bounds[i + 1]), np.arange(i * 5, i * 5 + 5))
               for i in range(len(sizes))]
    return FederatedData(ds, clients, "toy")


def _fed(tmp_path, engine, data, model="simple-cnn", **over) -> Federation:
    raw = {"data": {"num_clients": data.num_clients}, "run": {"seed": 5, "rounds": 3, "engine": engine,
                                                               "workers": 2},
           "server": {"fraction": 1.0}, "eval": {"federated": True},
           "train": {"local_epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    cfg = load_config(raw)
    torch.manual_seed(0)
    net = build_model(model, data.dataset.input_shape, data.dataset.num_classes)
    store = RunStore(tmp_path / f"{engine}-{len(list(tmp_path.iterdir()))}.sqlite")
    store.create_run("r", "r", {}, 5, {}, str(tmp_path), cfg.run.rounds, [])
    return Federation(cfg, data, lambda: copy.deepcopy(net), build_engine(engine, cfg), store, "r",
                      store.path.with_suffix(".run"))  # one folder per federation: its client state file


def _train(fed: Federation, rounds: int = 2):
    rows = [fed.run_round(r).row for r in range(1, rounds + 1)]
    fed.engine.close()
    return fed.params, rows


@pytest.mark.parametrize("engine", ["parallel", "vectorized"])
@pytest.mark.parametrize("over", [{}, {"server__algorithm": "fedprox", "server__mu": 0.1},
                                  {"train__local_epochs": 1, "train__local_epochs_max": 3},
                                  {"train__local_steps": 1}],
                         ids=["fedavg", "fedprox", "unequal-work", "one-step"])
def test_engine_equals_sequential(tmp_path, engine, over):
    data = _images()
    ref, ref_rows = _train(_fed(tmp_path, "sequential", data, **over))
    got, rows = _train(_fed(tmp_path, engine, data, **over))
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    for a, b in zip(ref_rows, rows, strict=True):
        # the payloads are the same size; the JSON header holds each client's loss, whose last digits (and
        # so its length) may differ with the order of float operations
        assert abs(a["bytes_up"] - b["bytes_up"]) <= 4 * a["num_clients"] and a["num_clients"] == b["num_clients"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_accuracy"] == b["test_accuracy"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vectorized_in_small_groups_with_reordered_rows_and_an_empty_client(tmp_path, monkeypatch, momentum):
    """Groups of 2 (forced), clients sorted by step count so a group's rows are not consecutive, and one
    client without data: the same round as sequential, and the per-client statistics match too."""
    from fedloom.engines import vectorized

    data = _images(sizes=(40, 0, 9, 33, 17))
    over = {"model": "mlp", "train__momentum": momentum, "eval__federated": False}
    ref, ref_rows = _train(_fed(tmp_path, "sequential", data, **over))
    fed = _fed(tmp_path, "vectorized", data, **over)
    monkeypatch.setattr(vectorized, "GROUP_BYTES", 2 * 4 * fed.spec.size)
    got, rows = _train(fed)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    for a, b in zip(ref_rows, rows, strict=True):
        assert a["num_clients"] == b["num_clients"] == 4  # the empty client sends no update
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for k in ("update_norm_mean", "cosine_mean", "aggregate_norm"):
            assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-4)
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert ca["client_id"] == cb["client_id"]
            for k in ("update_norm", "update_std", "cosine"):
                assert ca[k] == pytest.approx(cb[k], rel=1e-4, abs=1e-7)


def test_update_statistics_match_per_client_torch(tmp_path):
    fed = _fed(tmp_path, "sequential", _images(), model="mlp")
    out = fed.run_round(1)
    fed.engine.close()
    fits = [c for c in out.row["clients"] if c["kind"] == "fit"]
    tasks = list(range(4))
    assert [c["client_id"] for c in fits] == tasks
    from fedloom.client.work import ClientTask

    start = fed.runtime.initial.clone()
    fed.params = start
    broadcast = fed.broadcast(1)
    ups = [fed.runtime.run(ClientTask(1, c, 0.05, 5, broadcast)).message.vector for c in tasks]
    u = torch.stack(ups)
    w = torch.tensor([c["num_examples"] for c in fits], dtype=torch.float64)
    agg = ((w / w.sum()).float() @ u)
    for row, v in zip(fits, ups, strict=True):
        assert row["update_norm"] == pytest.approx(float(v.norm()), rel=1e-5)
        assert row["update_mean"] == pytest.approx(float(v.mean()), rel=1e-4, abs=1e-9)
        assert row["update_std"] == pytest.approx(float(v.std()), rel=1e-4)
        assert row["cosine"] == pytest.approx(float(v @ agg / (v.norm() * agg.norm())), rel=1e-4)


def test_parallel_updates_come_back_in_shared_rows_lent_until_the_next_fit(tmp_path):
    from fedloom.client.work import ClientTask

    fed = _fed(tmp_path, "parallel", _images(), model="mlp")
    engine, runtime = fed.engine, fed.runtime
    try:
        first = engine.fit(runtime, [ClientTask(1, c, 0.05, 5, fed.broadcast(1)) for c in range(4)])
        rows = engine._slots.updates
        assert all(r.message.vector.data_ptr() == rows[i].data_ptr() for i, r in enumerate(first))
        kept = [r.message.vector.clone() for r in first]  # the contract: clone what is kept past the next fit
        fed.params = fed.params + 0.5
        second = engine.fit(runtime, [ClientTask(2, c, 0.05, 5, fed.broadcast(2)) for c in range(4)])
        assert all(r.message.vector.data_ptr() == rows[i].data_ptr() for i, r in enumerate(second))  # rows reused
        assert not torch.equal(second[0].message.vector, kept[0])
        seq = [fed.runtime.run(ClientTask(2, c, 0.05, 5, fed.broadcast(2))).message.vector for c in range(4)]
        assert all(torch.allclose(r.message.vector, v, atol=1e-6) for r, v in zip(second, seq, strict=True))
    finally:
        engine.close()


def test_a_worker_sends_bytes_when_an_update_is_wider_than_its_row(tmp_path, monkeypatch):
    from fedloom.client.work import ClientTask
    from fedloom.engines import parallel

    fed = _fed(tmp_path, "sequential", _images(), model="mlp")
    task = ClientTask(1, 0, 0.05, 5, fed.broadcast(1))
    slots = parallel._Slots(rows=4, width=fed.spec.size - 1)  # one value too narrow
    slots.put_broadcast(task.broadcast)
    monkeypatch.setattr(parallel, "_runtime", fed.runtime)
    monkeypatch.setattr(parallel, "_slots", slots)
    reply, written = parallel._run(task, 0)
    assert written == -1 and reply.message is None and reply.payload is not None
    got = reply.unpack(fed.spec.hash())
    ref = fed.runtime.run(task).message
    assert torch.equal(got.message.vector, ref.vector) and got.nbytes == len(wire.encode(ref))


def test_parallel_keeps_client_state_like_sequential(tmp_path):
    data = _images()
    seq = _fed(tmp_path, "sequential", data, model="mlp", server__algorithm="scaffold", server__fraction=0.5)
    par = _fed(tmp_path, "parallel", data, model="mlp", server__algorithm="scaffold", server__fraction=0.5)
    ref, _ = _train(seq, 3)
    got, _ = _train(par, 3)
    assert torch.allclose(ref, got, atol=1e-5)
    assert set(seq.client_states) == set(par.client_states)
    for c in seq.client_states:
        assert torch.allclose(seq.client_states[c]["c"], par.client_states[c]["c"], atol=1e-5)


class _Faulty(Algorithm):
    """Client 2 raises; client 1 kills its worker process (parallel) when asked to."""

    name = "faulty-test"

    def client_fit(self, ctx):
        if ctx.client.id == 2:
            raise RuntimeError("disk on fire at client 2")
        if ctx.client.id == 1 and os.environ.get("FEDLOOM_TEST_KILL_WORKER") == "1" and os.getpid() != _PARENT:
            os._exit(9)
        return super().client_fit(ctx)


_PARENT = os.getpid()


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "fedavg", _Faulty)  # forked workers inherit the patched registry


@pytest.mark.parametrize("engine", ["sequential", "parallel"])
def test_client_error_reports_round_client_and_its_traceback(tmp_path, faulty, engine):
    fed = _fed(tmp_path, engine, _images(), model="mlp")
    with pytest.raises(ClientError) as e:
        fed.run_round(1)
    fed.engine.close()
    assert e.value.round == 1 and e.value.client_id == 2
    assert "disk on fire at client 2" in e.value.message and "client_fit" in e.value.traceback_text
    fed = _fed(tmp_path, engine, _images(), model="mlp", run__on_client_error="drop")
    out = fed.run_round(1)
    fed.engine.close()
    assert out.failed_clients == [2] and out.row["num_clients"] == 3


def test_a_dead_worker_fails_only_its_client_and_the_pool_recovers(tmp_path, faulty, monkeypatch):
    monkeypatch.setenv("FEDLOOM_TEST_KILL_WORKER", "1")
    fed = _fed(tmp_path, "parallel", _images(), model="mlp", run__on_client_error="drop")
    out = fed.run_round(1)
    assert sorted(out.failed_clients) == [1, 2] and out.row["num_clients"] == 2
    monkeypatch.setenv("FEDLOOM_TEST_KILL_WORKER", "0")  # the next round gets a fresh pool
    assert fed.run_round(2).failed_clients == [2]
    fed.engine.close()


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_engines import _fed, _images
import pathlib
fed = _fed(pathlib.Path({tmp!r}), "parallel", _images(), model="mlp")
fed.run_round(1)
print(*fed.engine._pool._processes, flush=True)
time.sleep(60)
"""


def test_workers_die_with_a_run_killed_outright(tmp_path):
    """SIGKILL gives the run no chance to shut its pool down; the workers must not stay behind."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = KILLED_RUN.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited; its parent (init) reaps it
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("over", "why"), [
    ({"server__algorithm": "scaffold"}, "algorithm 'scaffold' is not vectorized"),
    ({"model": "simple-cnn-bn"}, "buffers"),
])
def test_vectorized_refuses_what_it_cannot_stack(tmp_path, over, why):
    model = over.pop("model", "simple-cnn")
    with pytest.raises(ConfigError, match=why):
        _fed(tmp_path, "vectorized", _images(), model=model, **over)


def test_auto_picks_by_model_clients_and_cores(tmp_path):
    from fedloom.engines.auto import choose

    small = FederatedData(_images().dataset, [ClientData(i, np.arange(i, i + 3), np.arange(0)) for i in range(20)],
                          "toy")
    fed = _fed(tmp_path, "sequential", small, model="mlp")
    assert choose(fed.runtime, clients_per_round=20, cores=2) == "vectorized"
    scaffold = _fed(tmp_path, "sequential", small, model="mlp", server__algorithm="scaffold")
    assert choose(scaffold.runtime, clients_per_round=20, cores=2) == "parallel"
    assert choose(scaffold.runtime, clients_per_round=20, cores=1) == "sequential"
    assert choose(scaffold.runtime, clients_per_round=3, cores=2) == "sequential"
    cnn = _fed(tmp_path, "sequential", small, model="simple-cnn")  # convolutions: vmap is slower than parallel
    assert choose(cnn.runtime, clients_per_round=20, cores=2) == "parallel"
    one_thread = _fed(tmp_path, "auto", small, model="simple-cnn", run__threads=1)
    assert one_thread.engine.name == "auto:sequential"  # run.threads is the budget, whatever the machine has
    auto = _fed(tmp_path, "auto", small, model="mlp")
    assert auto.engine.name == "auto:vectorized"
    assert auto.run_round(1).row["metrics"]["engine"] == "auto:vectorized"
