"""The non-IID algorithms against FedAvg and closed forms, and the state they keep."""

import copy
import math

import numpy as np
import pytest
import torch

import fedloom
from fedloom.algorithms.fednova import step_weight_norm
from fedloom.client.work import ClientTask
from fedloom.config import load_config
from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData
from fedloom.engines import build_engine
from fedloom.errors import ConfigError
from fedloom.metrics import fairness
from fedloom.pipeline import wire
from fedloom.rounds import Federation
from fedloom.server.optimizers import ServerAdaptive
from fedloom.store import RunStore

from .conftest import small_config


def _data(sizes=(30, 30, 30), f=5, c=3, seed=0) -> FederatedData:
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = Dataset("toy", x, y, x[:30].clone(), y[:30].clone(), num_classes=c)
    bounds = np.cumsum((0, *sizes))
    clients = [ClientData(i, np.arange(bounds[i], bounds[i + 1]), np.arange(i * 10, i * 10 + 10))
               for i in range(len(sizes))]
    return FederatedData(ds, clients, "toy")


def _net(bn: bool = False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 8)] + ([torch.nn.BatchNorm1d(8)] if bn else []) + [torch.nn.Tanh(),
                                                                                     torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


def _fed(tmp_path, data, server=None, train=None, model=None, seed=3, **sections) -> Federation:
    cfg = load_config({"data": {"num_clients": data.num_clients}, "run": {"seed": seed, "rounds": 5},
                       "server": server or {}, "eval": {"federated": False},
                       "train": train or {"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.5},
                       **sections})
    net = model or _net()
    store = RunStore(tmp_path / f"{len(list(tmp_path.iterdir()))}.sqlite")
    store.create_run("r", "r", {}, seed, {}, str(tmp_path), cfg.run.rounds, [])
    return Federation(cfg, data, lambda: copy.deepcopy(net), build_engine("sequential"), store, "r", tmp_path)


def _rounds(fed: Federation, n: int) -> torch.Tensor:
    for r in range(1, n + 1):
        fed.run_round(r)
    return fed.params


# ---- equal to FedAvg where the papers say so ----------------------------------------------------------


def test_fedprox_with_mu_zero_is_fedavg_exactly(tmp_path):
    data = _data()
    ref = _rounds(_fed(tmp_path, data), 3)
    prox = _rounds(_fed(tmp_path, data, {"algorithm": "fedprox", "mu": 0.0}), 3)
    assert torch.equal(ref, prox)
    pulled = _rounds(_fed(tmp_path, data, {"algorithm": "fedprox", "mu": 1.0}), 3)
    assert not torch.allclose(ref, pulled)


def test_scaffold_with_zero_control_variates_is_fedavg_then_corrects(tmp_path):
    data = _data()
    ref = _fed(tmp_path, data)
    sca = _fed(tmp_path, data, {"algorithm": "scaffold"})
    ref.run_round(1)
    sca.run_round(1)  # c = c_i = 0 in round 1: plain local SGD
    assert torch.equal(ref.params, sca.params)
    assert sca.alg_state["c"].abs().sum() > 0 and set(sca.client_states) == {0, 1, 2}
    # SCAFFOLD broadcasts [x, c] and clients send [Δy, Δc]: twice FedAvg's payload
    d = sca.params.numel()
    assert wire.decode(sca.broadcast(2)).vector.numel() == 2 * d
    assert sca.runtime.run(ClientTask(2, 0, 0.1, 3, sca.broadcast(2))).message.vector.numel() == 2 * d
    # c = mean of the c_i when every client took part from zero state
    mean_ci = torch.stack([sca.client_states[i]["c"] for i in range(3)]).mean(0)
    assert torch.allclose(sca.alg_state["c"], mean_ci, atol=1e-6)
    sca.run_round(2)
    assert not torch.allclose(ref.params, sca.params)


def test_fednova_with_equal_steps_is_fedavg_and_normalizes_unequal(tmp_path):
    equal_steps = {"local_steps": 5, "batch_size": 8, "lr": 0.1, "momentum": 0.9}
    data = _data((20, 40, 60))
    ref = _rounds(_fed(tmp_path, data, train=equal_steps), 2)
    nova = _rounds(_fed(tmp_path, data, {"algorithm": "fednova"}, train=equal_steps), 2)
    assert torch.allclose(ref, nova, atol=1e-6)
    unequal = {"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.9}
    assert not torch.allclose(_rounds(_fed(tmp_path, data, train=unequal), 2),
                              _rounds(_fed(tmp_path, data, {"algorithm": "fednova"}, train=unequal), 2), atol=1e-4)


def test_fednova_step_weights():
    assert step_weight_norm(7, 0.0) == 7
    rho, tau = 0.9, 5  # sum over k of sum_{j<k} rho^j, i.e. the l1 norm of momentum SGD's step weights
    assert math.isclose(step_weight_norm(tau, rho), sum(sum(rho**j for j in range(k)) for k in range(1, tau + 1)))


def test_qffl_with_q_zero_is_fedavg_on_equal_clients(tmp_path):
    data = _data()
    ref = _rounds(_fed(tmp_path, data), 2)
    q0 = _rounds(_fed(tmp_path, data, {"algorithm": "qffl", "q": 0.0}), 2)
    assert torch.allclose(ref, q0, atol=1e-6)


def test_qffl_weights_high_loss_clients_by_hand(tmp_path):
    from fedloom.algorithms.qffl import QFFL

    alg = QFFL(load_config({"server": {"algorithm": "qffl", "q": 2.0}}).server, 2)
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f = [0.5, 2.0]
    agg, _ = alg.aggregate(u, [1, 1], [{"start_loss": v} for v in f], {}, lr=0.1)
    lip = 10.0
    h = [2 * fk * lip**2 * float(uk @ uk) + lip * fk**2 for fk, uk in zip(f, u, strict=True)]
    expect = (f[0] ** 2 * lip * u[0] + f[1] ** 2 * lip * u[1]) / sum(h)
    assert torch.allclose(agg, expect)


def test_fedadam_yogi_adagrad_steps_match_hand_computation():
    x = torch.tensor([1.0, -2.0])
    d = torch.tensor([0.5, 0.1])
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    m = (1 - b1) * d
    v0 = torch.full_like(x, tau**2)
    expected_v = {"adam": b2 * v0 + (1 - b2) * d**2, "adagrad": v0 + d**2,
                  "yogi": v0 - (1 - b2) * d**2 * torch.sign(v0 - d**2)}
    for kind, v in expected_v.items():
        opt = ServerAdaptive(kind, lr, b1, b2, tau)
        new, state = opt.step(x, d, opt.init(x))
        assert torch.allclose(new, x + lr * m / (v.sqrt() + tau)), kind
        assert torch.allclose(state["v"], v) and torch.allclose(state["m"], m)


def test_feddyn_server_correction_by_hand(tmp_path):
    from fedloom.algorithms.drift import FedDyn

    alg = FedDyn(load_config({"server": {"algorithm": "feddyn", "dyn_alpha": 0.5}}).server, 4)
    u = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    h0 = torch.tensor([0.2, 0.0])
    agg, st = alg.aggregate(u, [5, 50], [{}, {}], {"h": h0}, lr=0.1)
    h = h0 - 0.5 * u.sum(0) / 4
    assert torch.allclose(st["h"], h) and torch.allclose(agg, u.mean(0) - h / 0.5)
    fed = _fed(tmp_path, _data(), {"algorithm": "feddyn"})
    _rounds(fed, 2)
    assert set(fed.client_states) == {0, 1, 2} and fed.alg_state["h"].abs().sum() > 0


# ---- personalization --------------------------------------------------------------------------------


def test_ditto_lambda_infinite_keeps_the_global_model_and_zero_trains_alone(tmp_path):
    data = _data()
    fed = _fed(tmp_path, data, {"algorithm": "ditto", "ditto_lambda": math.inf})
    start = fed.params.clone()
    fed.run_round(1)
    for c in range(3):
        assert torch.equal(fed.client_states[c]["personal"], start)
    free = _fed(tmp_path, data, {"algorithm": "ditto", "ditto_lambda": 0.0})
    free.run_round(1)
    assert not torch.allclose(free.client_states[0]["personal"], start)
    assert not torch.allclose(free.client_states[0]["personal"], free.client_states[1]["personal"])


def test_fedbn_keeps_normalization_layers_home(tmp_path):
    data = _data()
    fed = _fed(tmp_path, data, {"algorithm": "fedbn"}, model=_net(bn=True))
    plain = _fed(tmp_path, data, model=_net(bn=True))
    bn = ~fed.shared
    init = fed.params.clone()
    out = fed.run_round(1)
    ref = plain.run_round(1)
    assert torch.equal(fed.params[bn], init[bn])  # the server never sees them
    locals_ = [fed.client_states[c]["local"][bn] for c in range(3)]
    assert not torch.allclose(locals_[0], locals_[1])  # each client's own statistics
    sent = fed.runtime.run(ClientTask(2, 0, 0.1, 3, fed.broadcast(2))).message
    assert sent.vector.numel() == int(fed.shared.sum()) and out.row["bytes_up"] < ref.row["bytes_up"]
    fed.run_round(2)  # round 2 starts every client from its own normalization layers
    assert not torch.allclose(fed.client_states[0]["local"][bn], locals_[0])


def test_fedbn_refuses_a_model_without_normalization(tmp_path):
    with pytest.raises(ConfigError, match="normalization"):
        _fed(tmp_path, _data(), {"algorithm": "fedbn"})


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_trains_and_personalizes(tmp_path, variant):
    fed = _fed(tmp_path, _data(), {"algorithm": "perfedavg", "perfedavg_variant": variant})
    before = fed.params.clone()
    out = fed.run_round(1)
    assert not torch.allclose(before, fed.params)
    pers = [r for r in out.row["clients"] if r["kind"] == "personal"]
    assert len(pers) == 3 and "pers_accuracy" in out.row["metrics"]


def test_perfedavg_hessian_vector_product_is_exact():
    """The HF variant's H·v by double backprop equals the closed form on a quadratic."""
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    v = torch.tensor([1.0, 2.0])
    (g,) = torch.autograd.grad(0.5 * w @ a @ w, [w], create_graph=True)
    (hv,) = torch.autograd.grad([g], [w], grad_outputs=[v])
    assert torch.allclose(hv, a @ v)


def test_finetuning_reports_personalized_beside_global(runs_dir):
    res = fedloom.run(small_config(eval__finetune_epochs=1, run__rounds=2), make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    last = store.rounds(res.run_id)[-1]["metrics"]
    assert {"pers_accuracy", "pers_fair_jain", "fair_jain", "fed_accuracy"} <= set(last)
    personal = store.client_rounds(res.run_id, "personal")
    assert len(personal) == 2 * 4 and all(0 <= r["accuracy"] <= 1 for r in personal)


# ---- client state survives resume, unequal work ------------------------------------------------------


def test_scaffold_client_state_survives_resume(tmp_path):
    data = _data()
    straight = _fed(tmp_path, data, {"algorithm": "scaffold", "fraction": 0.67})
    _rounds(straight, 4)
    first = _fed(tmp_path, data, {"algorithm": "scaffold", "fraction": 0.67})
    _rounds(first, 2)
    path = first.save_checkpoint(2)
    resumed = _fed(tmp_path, data, {"algorithm": "scaffold", "fraction": 0.67})
    resumed.load_checkpoint(path)
    assert set(resumed.client_states) == set(first.client_states)
    for r in (3, 4):
        resumed.run_round(r)
    assert torch.equal(resumed.params, straight.params)
    assert torch.equal(resumed.alg_state["c"], straight.alg_state["c"])


def test_unequal_epochs_and_stragglers_are_seeded(tmp_path):
    data = _data((30,) * 6)
    fed = _fed(tmp_path, data, train={"local_epochs": 2, "local_epochs_max": 5, "straggler_fraction": 0.5,
                                      "batch_size": 8, "lr": 0.1})
    work, dropped = fed.local_work(1, list(range(6)))
    assert dropped == [] and work == fed.local_work(1, list(range(6)))[0]
    epochs = [e for e, _ in work.values()]
    assert all(1 <= e <= 5 for e in epochs) and len(set(epochs)) > 1
    drop = _fed(tmp_path, data, train={"local_epochs": 2, "straggler_fraction": 0.5, "drop_stragglers": True})
    out = drop.run_round(1)
    assert len(out.row["metrics"]["dropped_stragglers"]) == 3 and out.row["num_clients"] == 3


# ---- config and metrics ------------------------------------------------------------------------------


def test_algorithm_parameter_for_another_algorithm_is_refused():
    with pytest.raises(ConfigError, match="server.mu is used by fedprox, not by 'fedavg'"):
        load_config({"server": {"mu": 0.1}})
    with pytest.raises(ConfigError, match="server.beta2"):
        load_config({"server": {"optimizer": "adagrad", "beta2": 0.5}})
    assert load_config({"server": {"algorithm": "fedprox", "mu": 0.1}}).server.mu == 0.1


def test_fairness_closed_form():
    f = fairness([0.2, 0.4, 0.6, 0.8] + [1.0] * 6)
    assert math.isclose(f["mean"], 0.8) and f["worst10"] == 0.2 and f["best10"] == 1.0
    assert math.isclose(f["jain"], 8.0**2 / (10 * (0.04 + 0.16 + 0.36 + 0.64 + 6)))
    assert fairness([0.5] * 4)["jain"] == pytest.approx(1.0)
    assert fairness([]) == {}


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fednova", "feddyn", "qffl", "ditto"])
def test_every_algorithm_runs_end_to_end(runs_dir, algorithm):
    res = fedloom.run(small_config(server__algorithm=algorithm, run__rounds=2), make_report=False)
    assert res.summary["rounds_completed"] == 2
    # q-FFL's step is divided by L ||Δw||² = ||Δ||² / lr, so it moves slowly with large local updates
    assert res.summary["final_accuracy"] > (0.1 if algorithm == "qffl" else 0.3)


def test_scaffold_local_step_is_the_papers_corrected_sgd(tmp_path):
    """Under plain SGD the correction after the step equals y <- y - lr (g + c - c_i) of the paper."""
    import torch.nn.functional as F

    from fedloom.rng import torch_rng

    data = _data()
    plain_sgd = {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.0, "weight_decay": 1e-3}
    fed = _fed(tmp_path, data, {"algorithm": "scaffold"}, train=plain_sgd)
    fed.run_round(1)
    c, c_i = fed.alg_state["c"], fed.client_states[0]["c"]
    broadcast = fed.broadcast(2)
    got = fed.runtime.run(ClientTask(2, 0, 0.1, 3, broadcast, state=fed.client_states[0])).message

    model = copy.deepcopy(fed.model)
    names = [n for n, _ in model.named_parameters()]
    model.load_state_dict(fed.spec.unflatten(fed.params))
    corr = fed.spec.unflatten(c - c_i)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    idx = torch.as_tensor(data.clients[0].train_idx)
    perm = idx[torch.randperm(len(idx), generator=torch_rng(3, "train", 2, 0))]
    for s in range(0, len(perm), 8):
        b = perm[s : s + 8]
        loss = F.cross_entropy(model(data.dataset.x_train[b]), data.dataset.y_train[b])
        opt.zero_grad()
        loss.backward()
        for n, p in zip(names, model.parameters(), strict=True):
            p.grad.add_(corr[n])
        opt.step()
    d = fed.params.numel()
    expected = fed.spec.flatten(model.state_dict()) - fed.params
    assert torch.allclose(got.vector[:d], expected, atol=1e-6)
