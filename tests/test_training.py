"""FedAvg against centralized training, determinism, and what a run records."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedloom
from fedloom.config import load_config
from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData
from fedloom.engines import build_engine
from fedloom.rng import torch_rng
from fedloom.rounds import Federation
from fedloom.store import RunStore

from .conftest import small_config


def _toy_dataset(n=96, f=5, c=3, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Dataset("toy", x, y, x[:24].clone(), y[:24].clone(), num_classes=c)


def _federation(tmp_path, data, model, **over):
    cfg = load_config({"data": {"dataset": "digits", "num_clients": data.num_clients}, "model": {"name": "mlp"},
                       "run": {"seed": 7, "rounds": 3}, **over})
    store = RunStore(tmp_path / "db.sqlite")
    store.create_run("r", "r", {}, 7, {}, str(tmp_path), cfg.run.rounds, [])
    return cfg, Federation(cfg, data, lambda: copy.deepcopy(model), build_engine("sequential"), store, "r",
                      store.path.with_suffix(".run"))  # one folder per federation: its client state file


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_fedavg_one_client_equals_centralized_training_step_for_step(tmp_path):
    ds = _toy_dataset()
    idx = np.arange(len(ds.y_train))
    data = FederatedData(ds, [ClientData(0, idx, np.arange(24))], "iid")
    model = _net()
    cfg, fed = _federation(tmp_path, data, model,
                           train={"local_epochs": 2, "batch_size": 10, "lr": 0.1, "momentum": 0.9,
                                  "weight_decay": 1e-3})
    for r in (1, 2, 3):
        fed.run_round(r)

    # The plain loop a user would write: same shuffles (the client's per-round generator), fresh
    # optimizer each round (FedAvg restarts local optimizer state every round).
    ref = copy.deepcopy(model)
    for r in (1, 2, 3):
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        g = torch_rng(7, "train", r, 0)
        for _ in range(2):
            perm = torch.randperm(len(idx), generator=g)
            for s in range(0, len(idx), 10):
                b = perm[s : s + 10]
                loss = F.cross_entropy(ref(ds.x_train[b]), ds.y_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    ref_vec = torch.cat([p.detach().reshape(-1) for p in ref.state_dict().values()])
    assert torch.allclose(fed.params, ref_vec, atol=1e-6)


def test_fedavg_equal_clients_one_full_batch_step_equals_centralized_step(tmp_path):
    ds = _toy_dataset(n=90)
    parts = np.array_split(np.random.default_rng(0).permutation(90), 3)  # 3 clients x 30 examples
    data = FederatedData(ds, [ClientData(i, np.sort(p), np.arange(24)) for i, p in enumerate(parts)], "iid")
    model = _net()
    _, fed = _federation(tmp_path, data, model, train={"local_steps": 1, "batch_size": 30, "lr": 0.5})
    fed.run_round(1)

    ref = copy.deepcopy(model)
    loss = F.cross_entropy(ref(ds.x_train), ds.y_train)
    loss.backward()
    with torch.no_grad():
        expected = torch.cat([(p - 0.5 * p.grad).reshape(-1) for p in ref.parameters()])
    assert torch.allclose(fed.params, expected, atol=1e-6)


def test_fedavg_weights_unequal_clients_by_examples(tmp_path):
    ds = _toy_dataset(n=90)
    parts = [np.arange(0, 10), np.arange(10, 90)]
    data = FederatedData(ds, [ClientData(i, p, np.arange(24)) for i, p in enumerate(parts)], "iid")
    model = _net()
    _, fed = _federation(tmp_path, data, model, train={"local_steps": 1, "batch_size": 100, "lr": 0.5})
    fed.run_round(1)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(ds.x_train), ds.y_train).backward()  # the union's mean loss = weighted client means
    with torch.no_grad():
        expected = torch.cat([(p - 0.5 * p.grad).reshape(-1) for p in ref.parameters()])
    assert torch.allclose(fed.params, expected, atol=1e-6)


def test_run_records_everything_and_is_deterministic(runs_dir):
    a = fedloom.run(small_config(), make_report=False)
    b = fedloom.run(small_config(), make_report=False)
    assert a.status == "completed" and a.summary["rounds_completed"] == 3
    store = RunStore(runs_dir / "fedloom.db")
    ra, rb = store.rounds(a.run_id), store.rounds(b.run_id)
    keys = ["test_accuracy", "test_loss", "test_macro_f1", "train_loss", "bytes_up", "bytes_down"]
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    ca, cb = store.client_rounds(a.run_id), store.client_rounds(b.run_id)
    assert [(c["client_id"], c["update_norm"], c["cosine"]) for c in ca] == \
        [(c["client_id"], c["update_norm"], c["cosine"]) for c in cb]
    c = fedloom.run(small_config(run__seed=1), make_report=False)
    assert store.rounds(c.run_id)[-1]["test_loss"] != ra[-1]["test_loss"]

    summary = json.loads((a.output_dir / "summary.json").read_text())
    for key in ("run_id", "rounds_completed", "final_accuracy", "best_accuracy", "wall_seconds", "bytes_up",
                "bytes_down"):
        assert key in summary
    assert summary["final_accuracy"] > 0.5  # 3 rounds of FedAvg on digits learn something real

    # bytes are the serialized messages: broadcast and updates carry every parameter as float32
    n_params = 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    r1 = ra[0]
    assert r1["bytes_down"] >= 4 * 4 * n_params and r1["bytes_down"] < 4 * 4 * n_params + 4 * 500
    assert r1["bytes_up"] >= 4 * 4 * n_params and summary["bytes_up"] == sum(r["bytes_up"] for r in ra)

    fits = [c for c in ca if c["kind"] == "fit" and c["round"] == 1]
    evals = [c for c in ca if c["kind"] == "eval" and c["round"] == 3]
    assert len(fits) == 4 and len(evals) == 4
    assert all(c["update_norm"] > 0 and -1 <= c["cosine"] <= 1 for c in fits)
    m = ra[-1]["metrics"]
    assert m["fed_accuracy_min"] <= m["fed_accuracy_p10"] <= m["fed_accuracy_median"] <= m["fed_accuracy_max"]
    assert len(store.clients(a.run_id)) == 4
    assert sum(sum(c["label_counts"]) for c in store.clients(a.run_id)) == sum(c["num_train"] for c in
                                                                                store.clients(a.run_id))


def test_client_sampling_is_seeded_and_sized(runs_dir):
    res = fedloom.run(small_config(server__clients_per_round=2, run__rounds=4), make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    per_round = {}
    for c in store.client_rounds(res.run_id, "fit"):
        per_round.setdefault(c["round"], []).append(c["client_id"])
    assert all(len(v) == 2 for v in per_round.values())
    assert len({tuple(v) for v in per_round.values()}) > 1  # not the same pair every round
    again = fedloom.run(small_config(server__clients_per_round=2, run__rounds=4), make_report=False)
    assert [c["client_id"] for c in store.client_rounds(again.run_id, "fit")] == \
        [c["client_id"] for c in store.client_rounds(res.run_id, "fit")]


def _nan_from(monkeypatch, round_, clients):
    """Clients `clients` diverge in round `round_` (a NaN learning rate: every weight they send is NaN)."""
    import dataclasses

    from fedloom.client import work

    real_fit = work.ClientRuntime.fit

    def diverging(self, task):
        if task.round == round_ and task.client_id in clients:
            task = dataclasses.replace(task, lr=float("nan"))
        return real_fit(self, task)

    monkeypatch.setattr(work.ClientRuntime, "fit", diverging)
    return real_fit


def test_a_nan_client_is_dropped_and_flagged_and_the_run_goes_on(runs_dir, monkeypatch):
    """Client 1 sends NaN in round 3: only that client is left out (flagged with the reason in the round's
    metrics and its client row); the run completes, and its model is exactly that of a run where client 1
    failed outright in round 3 and was dropped."""
    from fedloom.client import work
    from fedloom.params import load_tensors

    real_fit = _nan_from(monkeypatch, 3, {1})
    res = fedloom.run(small_config(run__rounds=4, run__engine="sequential"), make_report=False)
    assert res.status == "completed", res.message
    store = RunStore(runs_dir / "fedloom.db")
    rounds = store.rounds(res.run_id)
    assert [r["metrics"]["updated"] for r in rounds] == [True] * 4
    assert rounds[2]["metrics"]["excluded_clients"] == {"1": "non-finite update (NaN/Inf)"}
    assert rounds[2]["num_clients"] == 3 and all("excluded_clients" not in r["metrics"] for r in rounds[:2])
    fit3 = {c["client_id"]: c for c in store.client_rounds(res.run_id, "fit") if c["round"] == 3}
    assert fit3[1]["excluded"] == "non-finite update (NaN/Inf)" and fit3[0]["excluded"] is None
    nan_model = load_tensors(res.summary["checkpoint"])
    assert all(torch.isfinite(t).all() for t in nan_model.values())

    def failing(self, task):
        if task.round == 3 and task.client_id == 1:
            raise RuntimeError("client 1 fails")
        return real_fit(self, task)

    monkeypatch.setattr(work.ClientRuntime, "fit", failing)
    ref = fedloom.run(small_config(run__rounds=4, run__engine="sequential", run__on_client_error="drop"),
                      make_report=False)
    ref_model = load_tensors(ref.summary["checkpoint"])
    assert nan_model.keys() == ref_model.keys() and all(torch.equal(nan_model[k], ref_model[k]) for k in ref_model)


def test_nan_from_every_client_stops_run_cleanly_with_the_last_good_model_saved(runs_dir, monkeypatch):
    """Every client diverges in round 3: the run stops as diverged, the global model is not updated, and the
    checkpoint on disk is exactly the model of round 2, which a run of 2 rounds reproduces."""
    from fedloom.client import work
    from fedloom.params import load_tensors

    real_fit = _nan_from(monkeypatch, 3, {0, 1, 2, 3})
    res = fedloom.run(small_config(run__rounds=6, run__engine="sequential"), make_report=False)
    assert res.status == "diverged", res.message
    assert "round 3" in res.message and "every update (clients [0, 1, 2, 3])" in res.message
    store = RunStore(runs_dir / "fedloom.db")
    rec = store.get_run(res.run_id)
    assert rec.status == "diverged" and rec.rounds_completed < 6
    rounds = store.rounds(res.run_id)
    assert [r["metrics"]["updated"] for r in rounds] == [True, True, False]
    ckpt = res.summary["checkpoint"]
    assert ckpt is not None and ckpt.endswith("round-00002.safetensors")
    saved = load_tensors(ckpt)
    assert all(torch.isfinite(t).all() for t in saved.values())

    monkeypatch.setattr(work.ClientRuntime, "fit", real_fit)
    good = fedloom.run(small_config(run__rounds=2, run__engine="sequential"), make_report=False)
    ref = load_tensors(good.summary["checkpoint"])
    assert saved.keys() == ref.keys() and all(torch.equal(saved[k], ref[k]) for k in ref)


def test_rising_loss_is_detected(tmp_path):
    ds = _toy_dataset()
    data = FederatedData(ds, [ClientData(0, np.arange(96), np.arange(24))], "iid")
    _, fed = _federation(tmp_path, data, _net(), run={"divergence_patience": 3, "divergence_factor": 1.5})
    fed.train_losses = [1.0, 0.5, 0.6, 0.7, 0.8]
    assert fed._rising_loss(5) is not None
    fed.train_losses = [1.0, 0.5, 0.6, 0.7, 0.7]
    assert fed._rising_loss(5) is None
    fed.train_losses = [1.0, 0.5, 0.51, 0.52, 0.53]  # rising, but not far from its best: overfitting, not divergence
    assert fed._rising_loss(5) is None


def test_client_error_fail_and_drop(runs_dir, monkeypatch):
    from fedloom.client import work
    from fedloom.errors import ClientError

    real_fit = work.ClientRuntime.fit

    def flaky(self, task):
        if task.client_id == 1:
            raise RuntimeError("disk on fire")
        return real_fit(self, task)

    monkeypatch.setattr(work.ClientRuntime, "fit", flaky)
    with pytest.raises(ClientError) as e:
        fedloom.run(small_config(), make_report=False)
    assert e.value.client_id == 1 and e.value.round == 1 and "disk on fire" in e.value.traceback_text
    store = RunStore(runs_dir / "fedloom.db")
    assert store.list_runs()[0].status == "failed"

    res = fedloom.run(small_config(run__on_client_error="drop"), make_report=False)
    assert res.status == "completed"
    assert all(r["metrics"]["dropped_clients"] == [1] for r in store.rounds(res.run_id))


def test_ctrl_c_lets_the_round_in_flight_finish_and_a_second_stops_at_once():
    import os
    import signal

    from fedloom.rounds import interrupt_between_rounds

    before = signal.getsignal(signal.SIGINT)
    with interrupt_between_rounds() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, nothing raised mid-round
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
