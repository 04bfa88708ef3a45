"""The non-IID algorithms against FedAvg and closed forms, and the state they keep."""

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fedloom
from fedloom.algorithms.base import param_mask
from fedloom.algorithms.fednova import step_weight_norm
from fedloom.client.work import ALG, ClientTask, joined, part
from fedloom.config import load_config
from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData
from fedloom.engines import build_engine
from fedloom.errors import ConfigError
from fedloom.metrics import fairness
from fedloom.models import build_model
from fedloom.pipeline import wire
from fedloom.rounds import Federation
from fedloom.server.optimizers import ServerAdaptive, ServerSGD, masked_step
from fedloom.store import RunStore

from .conftest import small_config, toy_data


def _data(sizes=(30, 30, 30), f=5, c=3, seed=0) -> FederatedData:
    return toy_data(sizes, f, c, seed)


def _net(bn: bool = False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 8)] + ([torch.nn.BatchNorm1d(8)] if bn else []) + [torch.nn.Tanh(),
                                                                                     torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


def _fed(tmp_path, data, server=None, train=None, model=None, seed=3, out=None, **sections) -> Federation:
    cfg = load_config({"data": {"num_clients": data.num_clients}, "run": {"seed": seed, "rounds": 5},
                       "server": server or {}, "eval": {"federated": False},
                       "train": train or {"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.5},
                       **sections})
    net = model or _net()
    store = RunStore(Path(tempfile.mkdtemp(dir=tmp_path)) / "runs.sqlite")  # a store and folder per federation
    store.create_run("r", "r", {}, seed, {}, str(tmp_path), cfg.run.rounds, [])
    return Federation(cfg, data, lambda: copy.deepcopy(net), build_engine("sequential"), store, "r",
                      out or store.path.with_suffix(".run"))  # a folder per run: its client state file


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


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1, 2, 7])
def test_fednova_step_weights_are_those_of_torchs_momentum_sgd(rho, tau):
    """a_i is the l1 norm of the weights with which local momentum SGD sums its gradients: with every gradient
    equal to 1 (f(x) = x) the weights are all that moves x, so τ steps move it by lr·a_i exactly."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=1.0, momentum=rho)
    for _ in range(tau):
        opt.zero_grad()
        x.sum().backward()
        opt.step()
    assert step_weight_norm(tau, rho) == pytest.approx(-float(x.detach()), rel=1e-12)
    assert step_weight_norm(0, rho) == 0.0


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


def _reddi_algorithm_2(kind, x, deltas, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2 in numpy (float64), with the code's conventions: Δ is the update (not -Δ),
    m starts at 0, v at τ², no bias correction."""
    x, m, v = x.copy(), np.zeros_like(x), np.full_like(x, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d * d
        elif kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, m, v


def _deltas(steps=6, d=9, seed=0):
    """Updates whose scale jumps between steps, so that yogi's sign(v - Δ²) takes both signs."""
    rng = np.random.default_rng(seed)
    scales = [1.0, 0.01, 2.0, 0.001, 0.5, 0.05][:steps]
    return rng.normal(size=d), [rng.normal(size=d) * s for s in scales]


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_fedopt_follows_reddi_algorithm_2_over_consecutive_steps(kind):
    x0, deltas = _deltas()
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-2
    opt = ServerAdaptive(kind, lr, b1, b2, tau)
    x = torch.tensor(x0, dtype=torch.float64)
    state = opt.init(x)
    signs = set()
    for t, d in enumerate(deltas, start=1):
        signs |= set(np.sign(state["v"].numpy() - d * d).tolist())
        x, state = opt.step(x, torch.tensor(d), state)
        ref_x, ref_m, ref_v = _reddi_algorithm_2(kind, x0, deltas[:t], lr, b1, b2, tau)
        np.testing.assert_allclose(x.numpy(), ref_x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(state["m"].numpy(), ref_m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state["v"].numpy(), ref_v, rtol=1e-12, atol=1e-15)
    assert signs == {-1.0, 1.0}  # yogi's two branches were both taken


def test_fedavgm_is_heavy_ball_on_the_update_over_consecutive_steps():
    x0, deltas = _deltas(seed=1)
    opt = ServerSGD(lr=0.7, momentum=0.9)
    x, state = torch.tensor(x0), opt.init(torch.tensor(x0))
    ref_x, ref_m = x0.copy(), np.zeros_like(x0)
    for d in deltas:
        x, state = opt.step(x, torch.tensor(d), state)
        ref_m = 0.9 * ref_m + d  # Hsu et al. 2019: v = βv + Δ, x = x + lr·v (Δ the update, -Δ the gradient)
        ref_x = ref_x + 0.7 * ref_m
        np.testing.assert_allclose(x.numpy(), ref_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opt", [ServerAdaptive("adam", 0.1), ServerSGD(lr=0.5, momentum=0.9)])
def test_masked_step_steps_only_the_masked_entries(opt):
    x0, deltas = _deltas(seed=2)
    mask = torch.tensor([True, False] * 4 + [True])
    x = torch.tensor(x0)
    state = opt.init(x)
    start = {k: v.clone() for k, v in state.items()}
    ref, ref_state = torch.tensor(x0), opt.init(x)
    for d in deltas:
        x, state = masked_step(opt, x, torch.tensor(d), state, mask)
        ref, ref_state = opt.step(ref, torch.tensor(d), ref_state)
    assert torch.equal(x[mask], ref[mask])  # the optimizer, untouched, where it applies
    assert torch.allclose(x[~mask], torch.tensor(x0 + sum(deltas))[~mask], rtol=0, atol=1e-12)  # params + Δ
    assert all(torch.equal(state[k][~mask], start[k][~mask]) for k in state)


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


def test_ditto_lambda_huge_keeps_the_global_model_and_zero_trains_alone(tmp_path):
    data = _data()
    fed = _fed(tmp_path, data, {"algorithm": "ditto", "ditto_lambda": 1e30})  # λ -> ∞ (the config wants it finite)
    start = fed.params.clone()
    fed.run_round(1)
    for c in range(3):
        assert torch.allclose(fed.client_states[c]["personal"], start, rtol=0, atol=1e-7)
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


@pytest.mark.parametrize("norms", [[], [torch.nn.GroupNorm(2, 8), torch.nn.LayerNorm(8)]])
def test_fedbn_refuses_a_model_without_batchnorm(tmp_path, norms):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), *norms, torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="BatchNorm"):
        _fed(tmp_path, _data(), {"algorithm": "fedbn"}, model=net)


def test_fedbn_keeps_batchnorm_home_and_shares_groupnorm_and_layernorm(tmp_path):
    """Li et al. 2021 keep BatchNorm local; other normalizations have no running statistics and are shared."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.GroupNorm(2, 8),
                              torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    fed = _fed(tmp_path, _data(), {"algorithm": "fedbn"}, model=net)
    home = {e.name for e in fed.spec.entries if not fed.shared[e.offset : e.offset + e.numel].any()}
    assert home == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert all(fed.shared[e.offset : e.offset + e.numel].all() for e in fed.spec.entries if e.name not in home)


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_trains_and_personalizes(tmp_path, variant):
    fed = _fed(tmp_path, _data(), {"algorithm": "perfedavg", "perfedavg_variant": variant})
    before = fed.params.clone()
    out = fed.run_round(1)
    assert not torch.allclose(before, fed.params)
    pers = [r for r in out.row["clients"] if r["kind"] == "personal"]
    assert len(pers) == 3 and "pers_accuracy" in out.row["metrics"]


class _Softmax:
    """Multinomial logistic regression (a torch Linear(f, k) as one vector [W row-major, b]): its mean
    cross-entropy's gradient and Hessian in closed form, numpy float64, independent of torch's autograd."""

    def __init__(self, x: np.ndarray, y: np.ndarray, k: int):
        self.x, self.y1 = x.astype(np.float64), np.eye(k)[y]
        self.n, self.f, self.k = len(x), x.shape[1], k

    def _probs(self, theta):
        w, b = theta[: self.k * self.f].reshape(self.k, self.f), theta[self.k * self.f :]
        z = self.x @ w.T + b
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def _jacobian(self, i):  # d logits_i / d theta, (k, k*f + k)
        j = np.zeros((self.k, self.k * self.f + self.k))
        for c in range(self.k):
            j[c, c * self.f : (c + 1) * self.f] = self.x[i]
            j[c, self.k * self.f + c] = 1.0
        return j

    def grad(self, theta):
        r = (self._probs(theta) - self.y1) / self.n
        return np.concatenate([(r.T @ self.x).ravel(), r.sum(0)])

    def hessian(self, theta):
        p = self._probs(theta)
        return sum(self._jacobian(i).T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ self._jacobian(i)
                   for i in range(self.n)) / self.n


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_update_is_the_meta_gradient_step_by_hand(tmp_path, variant):
    """Fallah et al. 2020: w' = w - α∇f(w), then w <- w - β (I - α∇²f(w)) ∇f(w') ("hf") or w - β∇f(w') ("fo"),
    here with full batches (D1 = D2 = D3 = the client's data), so each step is a closed form."""
    data = _data((12, 12, 12))
    torch.manual_seed(0)
    alpha, beta, steps = 0.8, 0.5, 3
    fed = _fed(tmp_path, data, {"algorithm": "perfedavg", "perfedavg_alpha": alpha, "perfedavg_variant": variant},
               train={"local_steps": steps, "batch_size": 64, "lr": beta}, model=torch.nn.Linear(5, 3))
    got = fed.runtime.run(ClientTask(1, 0, beta, 3, fed.broadcast(1))).message.vector.double().numpy()

    idx = data.clients[0].train_idx
    f = _Softmax(data.dataset.x_train[idx].numpy(), data.dataset.y_train[idx].numpy(), 3)
    w0 = fed.params.double().numpy()
    w = w0.copy()
    fo = w0.copy()
    for _ in range(steps):
        g = f.grad(w - alpha * f.grad(w))
        w = w - beta * (g - alpha * f.hessian(w) @ g if variant == "hf" else g)
        fo = fo - beta * f.grad(fo - alpha * f.grad(fo))
    np.testing.assert_allclose(got, w - w0, rtol=1e-4, atol=1e-6)
    if variant == "hf":  # the Hessian term is large enough here that dropping it would fail the check above
        assert np.abs((fo - w0) - (w - w0)).max() > 100 * 1e-6


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
    resumed = _fed(tmp_path, data, {"algorithm": "scaffold", "fraction": 0.67}, out=first.out_dir)  # same run
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
    assert res.summary["rounds_completed"] == 2 and res.status == "completed"
    if algorithm != "qffl":  # q-FFL moves by ||Δ||²/lr-damped steps: its math is checked against the paper instead
        assert res.summary["final_accuracy"] > 0.3


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
    got = fed.runtime.run(ClientTask(2, 0, 0.1, 3, broadcast, state=joined(fed.client_states[0], {}))).message

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


# ---- buffers (BatchNorm statistics) are not parameters ------------------------------------------------


def _images(sizes=(24, 16, 20), side=16, seed=0) -> FederatedData:
    """Small uint8 images, big enough for simple-cnn-bn (16x16 is its smallest working input)."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (torch.rand(n, 1, side, side, generator=g) * 80 + y.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    ds = Dataset("imgs", x, y, x[:12].clone(), y[:12].clone(), num_classes=3, mean=(0.4,), std=(0.3,))
    bounds = np.cumsum((0, *sizes))
    clients = [ClientData(i, np.arange(bounds[i], bounds[i + 1]), np.arange(i * 4, i * 4 + 4))
               for i in range(len(sizes))]
    return FederatedData(ds, clients, "toy")


def _cnn_bn(data: FederatedData) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("simple-cnn-bn", data.dataset.input_shape, data.dataset.num_classes)


def _entries(spec, suffix: str) -> torch.Tensor:
    mask = torch.zeros(spec.size, dtype=torch.bool)
    for e in spec.entries:
        if e.name.endswith(suffix):
            mask[e.offset : e.offset + e.numel] = True
    return mask


def _spy_aggregate(fed: Federation) -> list[tuple[torch.Tensor, list[int], torch.Tensor]]:
    """Records each round's (updates, num_examples, aggregate) as the algorithm saw and returned them."""
    seen, real = [], fed.algorithm.aggregate

    def spy(updates, num_examples, *rest):
        agg, state = real(updates, num_examples, *rest)
        seen.append((updates.clone(), list(num_examples), agg.clone()))
        return agg, state

    fed.algorithm.aggregate = spy
    return seen


@pytest.mark.parametrize("server", [{"optimizer": "adam", "lr": 0.3}, {"momentum": 0.9}])
def test_server_optimizer_steps_parameters_only_and_buffers_take_the_mean(tmp_path, server):
    """FedAdam moves every entry by about lr·sign(Δ) and FedAvgM sums past updates: on BatchNorm's running
    variance either one drives it below zero. Buffers must be exactly params + mean update instead."""
    data = _images()
    fed = _fed(tmp_path, data, server, train={"local_epochs": 1, "batch_size": 8, "lr": 0.1}, model=_cnn_bn(data))
    buffers = ~param_mask(fed.model, fed.spec)
    var = _entries(fed.spec, "running_var")
    assert var.any() and (var & ~buffers).sum() == 0
    seen = _spy_aggregate(fed)
    opt = fed.algorithm.server_optimizer
    ref_state = opt.init(fed.params)
    start_state = {k: v.clone() for k, v in fed.opt_state.items()}
    for r in range(1, 5):
        before = fed.params.clone()
        assert fed.run_round(r).updated
        agg = seen[-1][2]
        ref, ref_state = opt.step(before, agg, ref_state)  # the optimizer alone, on every entry
        assert torch.equal(fed.params[buffers], (before + agg)[buffers])
        assert torch.equal(fed.params[~buffers], ref[~buffers])
        assert (fed.params[var] >= 0).all()
    assert all(torch.equal(fed.opt_state[k][buffers], start_state[k][buffers]) for k in start_state)


@pytest.mark.parametrize("algorithm, weights", [("feddyn", "uniform"), ("fednova", "examples"),
                                                ("qffl", "uniform")])
def test_buffers_are_averaged_under_algorithms_that_reweight_parameters(tmp_path, algorithm, weights):
    """FedDyn's h summed the buffers' changes round after round, FedNova scaled them by τ_eff/a_i (weights that
    do not sum to 1), q-FFL by its fairness weights: running statistics take the plain mean instead."""
    data = _images()
    server = {"algorithm": algorithm, **({"q": 2.0} if algorithm == "qffl" else {})}
    train = {"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.5}  # 6, 4 and 6 steps: unequal
    fed = _fed(tmp_path, data, server, train=train, model=_cnn_bn(data))
    buffers = ~param_mask(fed.model, fed.spec)
    seen = _spy_aggregate(fed)
    for r in range(1, 4):
        before = fed.params.clone()
        fed.run_round(r)
        updates, n, _ = seen[-1]
        w = torch.full((len(n),), 1 / len(n)) if weights == "uniform" else torch.tensor(n) / sum(n)
        assert torch.allclose(fed.params[buffers], (before + w.double() @ updates.double()).float()[buffers],
                              rtol=0, atol=1e-5)
        assert (fed.params[_entries(fed.spec, "running_var")] >= 0).all()


@pytest.mark.parametrize("server, named", [
    ({"optimizer": "adam", "lr": 0.01}, ["server.optimizer = 'adam'", "server.lr = 0.01"]),
    ({"lr": 0.5}, ["server.lr = 0.5"]),
    ({"momentum": 0.9}, ["server.momentum = 0.9"]),
])
def test_feddyn_refuses_a_server_step_other_than_its_own(tmp_path, server, named):
    with pytest.raises(ConfigError) as e:
        _fed(tmp_path, _data(), {"algorithm": "feddyn", **server})
    assert all(n in e.value.message for n in named), e.value.message
    assert "feddyn" in e.value.message


def test_feddyn_with_a_server_optimizer_is_refused_before_a_run_is_recorded(runs_dir):
    with pytest.raises(ConfigError, match="server.momentum"):
        fedloom.run(small_config(server__algorithm="feddyn", server__momentum=0.5), make_report=False)
    assert RunStore(runs_dir / "fedloom.db").list_runs() == []


# ---- client-side math by hand ---------------------------------------------------------------------------


def test_feddyn_local_steps_follow_the_dynamic_regularizer_by_hand(tmp_path):
    """Each local step is w <- w - lr (∇L(w) - g + α (w - w0)) (Acar et al. 2021, eq. 2's gradient), and the
    client's linear term becomes g - α (w_K - w0). Full batches, plain SGD: every step is a closed form."""
    data = _data((12, 12, 12))
    torch.manual_seed(0)
    lr, alpha, steps = 0.3, 0.7, 3
    fed = _fed(tmp_path, data, {"algorithm": "feddyn", "dyn_alpha": alpha},
               train={"local_steps": steps, "batch_size": 64, "lr": lr}, model=torch.nn.Linear(5, 3))
    g = torch.randn(fed.spec.size, generator=torch.Generator().manual_seed(1))
    res = fed.runtime.run(ClientTask(1, 0, lr, 3, fed.broadcast(1), state=joined({"g": g}, {})))

    idx = data.clients[0].train_idx
    f = _Softmax(data.dataset.x_train[idx].numpy(), data.dataset.y_train[idx].numpy(), 3)
    w0, gk = fed.params.double().numpy(), g.double().numpy()
    w = w0.copy()
    for _ in range(steps):
        w = w - lr * (f.grad(w) - gk + alpha * (w - w0))
    np.testing.assert_allclose(res.message.vector.double().numpy(), w - w0, rtol=1e-5, atol=1e-6)
    new_g = part(res.state, ALG)["g"].double().numpy()
    np.testing.assert_allclose(new_g, gk - alpha * (w - w0), rtol=1e-5, atol=1e-6)


def _momentum_step_weights(tau: int, rho: float) -> float:
    """Σ_k Σ_{j<k} ρ^j: the l1 norm of momentum SGD's step weights, written out."""
    return sum(sum(rho**j for j in range(k)) for k in range(1, tau + 1))


def test_fednova_aggregate_is_normalized_averaging_by_hand(tmp_path):
    """Wang et al. 2020: x moves by τ_eff Σ p_i Δ_i / a_i, τ_eff = Σ p_i a_i, p_i = n_i / n, here with
    momentum 0.9 and unequal local steps (2 epochs of 20, 40 and 60 samples in batches of 8: 6, 10, 16 steps)."""
    data = _data((20, 40, 60))
    fed = _fed(tmp_path, data, {"algorithm": "fednova"},
               train={"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.9})
    replies = [fed.runtime.run(ClientTask(1, c, 0.1, 3, fed.broadcast(1))).message for c in range(3)]
    assert [m.metrics["steps"] for m in replies] == [6, 10, 16]
    n = np.array([20.0, 40.0, 60.0])
    p = n / n.sum()
    a = np.array([_momentum_step_weights(t, 0.9) for t in (6, 10, 16)])
    tau_eff = float(p @ a)
    deltas = np.stack([m.vector.double().numpy() for m in replies])
    expected = sum(tau_eff * p[i] * deltas[i] / a[i] for i in range(3))
    before = fed.params.double().numpy()
    fed.run_round(1)
    np.testing.assert_allclose(fed.params.double().numpy() - before, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - p @ deltas).max() > 1e-3  # normalization changed something FedAvg would not


def _q_fedavg_step(u: np.ndarray, losses: np.ndarray, q: float, lr: float) -> np.ndarray:
    """Li et al. 2020, Algorithm 2 (q-FedAvg), written from the paper with w = 0 and w_k = u_k: the server's
    new model minus its old one."""
    lip = 1.0 / lr
    w = np.zeros(u.shape[1])
    delta_w = [lip * (w - (w + uk)) for uk in u]
    big_delta = [fk**q * dw for fk, dw in zip(losses, delta_w, strict=True)]
    h = [q * fk ** (q - 1) * float(dw @ dw) + lip * fk**q for fk, dw in zip(losses, delta_w, strict=True)]
    return (w - sum(big_delta) / sum(h)) - w


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 3.0])
def test_qffl_aggregate_is_the_papers_q_fedavg_on_random_inputs(q):
    from fedloom.algorithms.qffl import QFFL

    rng = np.random.default_rng(int(q * 10))
    u = rng.normal(size=(5, 7)) * rng.uniform(0.1, 2.0, size=(5, 1))
    losses = rng.uniform(0.2, 3.0, size=5)
    alg = QFFL(load_config({"server": {"algorithm": "qffl", "q": q}}).server, 10)
    agg, _ = alg.aggregate(torch.tensor(u, dtype=torch.float32), [3, 9, 1, 4, 4],
                           [{"start_loss": float(f)} for f in losses], {}, lr=0.05)
    np.testing.assert_allclose(agg.double().numpy(), _q_fedavg_step(u, losses, q, 0.05), rtol=1e-5, atol=1e-7)
    if q == 0:  # uniform mean, whatever the losses and the client sizes
        np.testing.assert_allclose(agg.double().numpy(), u.mean(0), rtol=1e-5, atol=1e-7)


def test_qffl_norms_are_over_parameters_and_buffers_take_the_mean():
    """A BatchNorm step counter changes by the number of local steps: in ||Δw||² it would outweigh every
    parameter. The norms are the parameters'; the buffers take the uniform mean."""
    from fedloom.algorithms.qffl import QFFL
    from fedloom.params import ParamSpec

    net = _net(bn=True)
    spec = ParamSpec.from_model(net)
    alg = QFFL(load_config({"server": {"algorithm": "qffl", "q": 1.0}}).server, 10)
    alg.shared_mask(net, spec)
    params = param_mask(net, spec)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, spec.size)) * 0.1
    u[:, ~params.numpy()] = rng.uniform(5, 30, size=(3, int((~params).sum())))
    losses = np.array([0.5, 1.0, 2.0])
    agg, _ = alg.aggregate(torch.tensor(u, dtype=torch.float32), [1, 1, 1], [{"start_loss": f} for f in losses],
                           {}, lr=0.1)
    expected = _q_fedavg_step(u[:, params.numpy()], losses, 1.0, 0.1)
    np.testing.assert_allclose(agg[params].double().numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(agg[~params].double().numpy(), u[:, ~params.numpy()].mean(0), rtol=1e-5)


def test_qffl_client_reports_the_global_models_loss_on_its_training_data(tmp_path):
    import torch.nn.functional as F

    data = _data()
    fed = _fed(tmp_path, data, {"algorithm": "qffl"})
    msg = fed.runtime.run(ClientTask(1, 1, 0.1, 3, fed.broadcast(1))).message
    idx = torch.as_tensor(data.clients[1].train_idx)
    model = copy.deepcopy(fed.model).eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(data.dataset.x_train[idx]), data.dataset.y_train[idx]).item()
    assert msg.metrics["start_loss"] == pytest.approx(expected, rel=1e-6)


# ---- SCAFFOLD's control variates --------------------------------------------------------------------------


def test_scaffold_client_without_examples_keeps_its_control_variate(tmp_path):
    """No data, no local step: c_i stays as it was and Δc = 0 (option II would have set c_i = c_i - c)."""
    data = _data((30, 30, 0))
    fed = _fed(tmp_path, data, {"algorithm": "scaffold"})
    fed.run_round(1)
    c = fed.alg_state["c"]
    assert c.abs().sum() > 0
    before = fed.client_states.get(2, {})
    res = fed.runtime.run(ClientTask(2, 2, 0.1, 3, fed.broadcast(2), state=joined(before, {})))
    assert res.message.num_examples == 0
    assert torch.equal(res.message.vector, torch.zeros(2 * fed.params.numel()))
    fed.run_round(2)
    after = fed.client_states.get(2, {})
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_scaffold_client_with_a_non_finite_control_variate_update_is_dropped(tmp_path, monkeypatch):
    """Δc is half of SCAFFOLD's update: a NaN there must drop that client as one in Δy does, or the server's c
    (and every client's next step) turns NaN while the model still looks fine. The client keeps its old c_i;
    the others' round counts."""
    from fedloom.algorithms.drift import Scaffold

    fed = _fed(tmp_path, _data(), {"algorithm": "scaffold"})
    fed.run_round(1)
    real = Scaffold.client_fit

    def nan_in_delta_c(self, ctx):
        out = real(self, ctx)
        if ctx.client.id == 1:
            out.update[-1] = float("nan")  # the last entry of Δc: Δy stays finite
        return out

    monkeypatch.setattr(Scaffold, "client_fit", nan_in_delta_c)
    params, c, states = fed.params.clone(), fed.alg_state["c"].clone(), fed.client_states
    out = fed.run_round(2)
    assert out.updated and out.stop is None
    assert out.row["metrics"]["excluded_clients"] == {"1": "non-finite update (NaN/Inf)"}
    assert torch.isfinite(fed.params).all() and torch.isfinite(fed.alg_state["c"]).all()
    assert not torch.equal(fed.params, params) and not torch.equal(fed.alg_state["c"], c)
    after = fed.client_states
    assert torch.equal(after[1]["c"], states[1]["c"])  # the dropped client's new c_i was not kept
    assert all(not torch.equal(after[k]["c"], states[k]["c"]) for k in states if k != 1)


# ---- personalized metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ditto", "fedbn"])
def test_personalized_metrics_come_only_from_clients_with_a_model_of_their_own(tmp_path, algorithm):
    """One client a round: the others have no personal model yet, and evaluating them with the global model
    would mix global accuracy into `pers_accuracy`."""
    data = _data()
    fed = _fed(tmp_path, data, {"algorithm": algorithm, "clients_per_round": 1}, model=_net(bn=True))
    trained: set[int] = set()
    for r in range(1, 4):
        out = fed.run_round(r)
        trained |= {c["client_id"] for c in out.row["clients"] if c["kind"] == "fit"}
        pers = [c for c in out.row["clients"] if c["kind"] == "personal"]
        assert {c["client_id"] for c in pers} == trained
        m = out.row["metrics"]
        assert m["pers_clients"] == len(trained)
        acc = np.array([c["accuracy"] for c in pers])
        w = np.array([c["num_examples"] for c in pers], dtype=float)
        assert m["pers_accuracy"] == pytest.approx(float(acc @ w / w.sum()))
    assert len(trained) < 3 or r == 3


def test_fedbn_norms_all_keeps_group_and_layer_norm_local_too():
    from fedloom.algorithms.personal import FedBN
    from fedloom.params import ParamSpec

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GroupNorm(2, 6), torch.nn.LayerNorm(6),
                              torch.nn.Linear(6, 3))
    spec = ParamSpec.from_model(net)
    with pytest.raises(ConfigError, match='fedbn_norms = "all"'):
        FedBN(load_config({"server": {"algorithm": "fedbn"}}).server, 2).shared_mask(net, spec)
    cfg = load_config({"server": {"algorithm": "fedbn", "fedbn_norms": "all"}}).server
    mask = FedBN(cfg, 2).shared_mask(net, spec)
    local = {e.name for e in spec.entries if not mask[e.offset : e.offset + e.numel].any()}
    assert local == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert all(mask[spec[n].offset : spec[n].offset + spec[n].numel].all() for n in ("0.weight", "3.bias"))
    with pytest.raises(ConfigError, match="fedbn_norms"):
        load_config({"server": {"algorithm": "fedavg", "fedbn_norms": "all"}})
