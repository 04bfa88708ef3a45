"""Robust aggregators against numpy references, their breakdown conditions, bounded example counts, suspicion
scores on a synthetic ground truth, and the aggregator's server state across a checkpoint."""

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.config import load_config
from fedloom.data.federated import FederatedData
from fedloom.engines import build_engine
from fedloom.errors import ConfigError, RunError
from fedloom.rounds import Federation
from fedloom.server.aggregators import MeanAggregator, build_aggregator
from fedloom.server.detection import FLAG, Detector, precision_recall
from fedloom.server.robust import RoundContext, cap_shares, foolsgold_weights
from fedloom.store import RunStore

from .conftest import small_config, toy_data

# ---- numpy references, written from the papers ----------------------------------------------------------


def np_weighted_median(u, p):
    out = np.empty(u.shape[1])
    for j in range(u.shape[1]):
        order = np.argsort(u[:, j], kind="stable")
        vals, cum = u[order, j], np.cumsum(p[order])
        i = int(np.searchsorted(cum, 0.5 - 1e-12))
        out[j] = (vals[i] + vals[i + 1]) / 2 if abs(cum[i] - 0.5) <= 1e-12 else vals[i]
    return out


def np_trimmed(u, p, k):
    order = np.argsort(u, axis=0, kind="stable")
    vals, w = np.take_along_axis(u, order, 0)[k:len(u) - k], p[order][k:len(u) - k]
    return (vals * w).sum(0) / w.sum(0)


def np_krum_scores(u, f):
    n = len(u)
    d2 = ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(d2[i], i))[: max(0, n - f - 2)].sum() for i in range(n)])


def np_multikrum(u, p, f, m):
    sel = np.sort(np.argsort(np_krum_scores(u, f), kind="stable")[:m])
    return (p[sel] / p[sel].sum()) @ u[sel], sel


def np_bulyan(u, p, f):
    remaining, chosen = list(range(len(u))), []
    for _ in range(len(u) - 2 * f):
        scores = np_krum_scores(u[remaining], f)
        chosen.append(remaining.pop(int(np.argsort(scores, kind="stable")[0])))
    chosen.sort()
    vals, w = u[chosen], p[chosen]
    idx = np.argsort(np.abs(vals - np.median(vals, axis=0)), axis=0, kind="stable")[: len(chosen) - 2 * f]
    wk = w[idx]
    return (np.take_along_axis(vals, idx, 0) * wk).sum(0) / wk.sum(0)


def np_geomed(u, p, iters=10, nu=1e-6, tol=1e-6):
    v = p @ u
    for _ in range(iters):
        beta = p / np.maximum(np.linalg.norm(u - v, axis=1), nu)
        new = (beta / beta.sum()) @ u
        moved = np.linalg.norm(new - v)
        v = new
        if moved <= tol * max(np.linalg.norm(v), 1e-12):
            break
    return v


def np_clip(u, bound):
    n = np.linalg.norm(u, axis=1, keepdims=True)
    return u * np.minimum(1.0, bound / n)


def np_centered_clip(u, p, v, tau, iters):
    for _ in range(iters):
        v = v + p @ np_clip(u - v, tau)
    return v


def np_fltrust(u, g0):
    cos = (u @ g0) / (np.linalg.norm(u, axis=1) * np.linalg.norm(g0))
    trust = np.maximum(cos, 0)
    return (trust * np.linalg.norm(g0) / np.linalg.norm(u, axis=1)) @ u / trust.sum()


def np_foolsgold(hist, kappa=1.0):
    """The reference implementation's loop (Fung et al., DistSys/FoolsGold), as published."""
    n = len(hist)
    norms = np.linalg.norm(hist, axis=1)
    cs = hist @ hist.T / np.outer(norms, norms) - np.eye(n)
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[np.isinf(wv) & (wv > 0)] = 1
    return np.clip(wv, 0, 1)


# ---- data ------------------------------------------------------------------------------------------------

def _stack(n=9, d=7, seed=0, outliers=2):
    rng = np.random.default_rng(seed)
    u = rng.normal(0.5, 1.0, (n, d))
    u[:outliers] = rng.normal(0.0, 30.0, (outliers, d))  # a few far updates
    w = rng.integers(5, 50, n).astype(np.float64)
    return u, w


def _combine(name, u, w, params=None, ctx=None):
    agg = build_aggregator(name, params or {})
    agg.context = ctx
    return agg.combine(torch.tensor(u, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)).double().numpy()


# ---- every aggregator against its reference ----------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.3])  # weights summing to 1 (FedAvg) or not (SCAFFOLD's Δc over N)
def test_each_aggregator_matches_its_numpy_reference_times_the_weight_sum(scale):
    u, w = _stack()
    w = w / w.sum() * scale
    p = w / w.sum()
    f = 2
    expected = {
        "median": (np_weighted_median(u, p), {}),
        "trimmed-mean": (np_trimmed(u, p, 2), {"f": 2}),
        "krum": (np_multikrum(u, p, f, 1)[0], {"f": f}),
        "multi-krum": (np_multikrum(u, p, f, len(u) - f)[0], {"f": f}),
        "bulyan": (None, {"f": 2}),
        "geometric-median": (np_geomed(u, p), {}),
        "norm-bound": (p @ np_clip(u, 2.0), {"bound": 2.0}),
        "centered-clip": (np_centered_clip(u, p, np.zeros(u.shape[1]), 1.5, 3), {"tau": 1.5, "iters": 3}),
    }
    for name, (ref, params) in expected.items():
        uu, ww = u, w
        if name == "bulyan":  # n >= 4f + 3 = 11 updates
            uu, ww = np.vstack([u, u[2:4] + 0.1]), np.r_[w, w[2:4]]
            ref = np_bulyan(uu, ww / ww.sum(), 2)
        got = _combine(name, uu, ww, params)
        np.testing.assert_allclose(got, ww.sum() * ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_median_of_equal_weights_is_numpys_and_far_updates_cannot_drag_it():
    u, _ = _stack(n=8)
    np.testing.assert_allclose(_combine("median", u, np.full(8, 1 / 8)), np.median(u, axis=0), rtol=1e-6, atol=1e-6)
    far = u.copy()
    far[:2] *= 1e4  # two of eight updates go anywhere: the median stays within the others' range
    got = _combine("median", far, np.full(8, 1 / 8))
    assert (got >= u[2:].min(0) - 1e-6).all() and (got <= u[2:].max(0) + 1e-6).all()


def test_krum_picks_the_update_numpy_picks_and_names_the_client():
    u, w = _stack(n=9)
    ctx = RoundContext(4, [10 + i for i in range(9)])
    got = _combine("multi-krum", u, w / w.sum(), {"f": 2, "m": 3}, ctx)
    ref, sel = np_multikrum(u, w / w.sum(), 2, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert ctx.notes["selected"] == [10 + int(i) for i in sel] and not {10, 11} & set(ctx.notes["selected"])


def test_geometric_median_lowers_the_sum_of_distances_below_the_means():
    u, w = _stack(n=9)
    p = w / w.sum()
    v = _combine("geometric-median", u, p)

    def cost(x):
        return float(p @ np.linalg.norm(u - x, axis=1))

    centre = np.median(u[2:], 0)  # of the updates without the two far ones
    assert cost(v) < cost(p @ u) and np.linalg.norm(v - centre) < np.linalg.norm(p @ u - centre)


def test_centered_clipping_starts_from_last_rounds_aggregate_kept_in_server_state():
    u, w = _stack(n=7)
    p = w / w.sum()
    state: dict = {}
    first = _combine("centered-clip", u, p, {"tau": 1.0, "iters": 2}, RoundContext(1, list(range(7)), state=state))
    assert set(state) == {"centered-clip/0"}
    u2 = u + 1.0
    second = _combine("centered-clip", u2, p, {"tau": 1.0, "iters": 2}, RoundContext(2, list(range(7)), state=state))
    np.testing.assert_allclose(first, np_centered_clip(u, p, np.zeros(7), 1.0, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, np_centered_clip(u2, p, first, 1.0, 2), rtol=1e-5, atol=1e-5)


def test_fltrust_weights_by_trust_in_the_servers_update_and_rescales_to_its_norm():
    u, w = _stack(n=6, outliers=0)
    g0 = np.full(7, 0.4)
    u[0] = -3 * g0 + 0.1 * u[0]  # points away from the server's update: no trust
    ctx = RoundContext(1, list(range(6)), server_update=lambda: torch.tensor(g0, dtype=torch.float32))
    got = _combine("fltrust", u, w / w.sum(), {"root_size": 10}, ctx)
    np.testing.assert_allclose(got, np_fltrust(u, g0), rtol=1e-5, atol=1e-6)
    assert ctx.notes["trust"][0] == 0.0 and np.linalg.norm(got) <= np.linalg.norm(g0) + 1e-6


def test_foolsgold_matches_the_published_loop_and_zeroes_sybils():
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 1, (5, 12))
    sybil = rng.normal(0, 1, 12)
    hist = np.vstack([honest, sybil + 0.01 * rng.normal(0, 1, (3, 12))])
    got = foolsgold_weights(torch.tensor(hist, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np_foolsgold(hist), atol=1e-9)
    assert (got[5:] == 0).all() and (got[:5] > 0).all()
    # through combine: histories accumulate in the server state, per client
    state: dict = {}
    for r in (1, 2):
        _combine("foolsgold", hist / 2, np.full(8, 1 / 8), {}, RoundContext(r, list(range(8)), state=state))
    np.testing.assert_allclose(state["foolsgold/0/3"].numpy(), hist[3], rtol=1e-6)


# ---- equal to the mean where theory says -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), [
    ("trimmed-mean", {"beta": 0.0}), ("trimmed-mean", {"f": 0}), ("multi-krum", {"f": 0}), ("bulyan", {"f": 0}),
    ("norm-bound", {"bound": 1e9}), ("centered-clip", {"tau": 1e9, "iters": 1}),
])
def test_with_nothing_to_trim_or_clip_a_robust_aggregator_is_the_weighted_mean(name, params):
    u, w = _stack(n=7)
    t = torch.tensor
    mean = MeanAggregator().combine(t(u, dtype=torch.float32), t(w / w.sum(), dtype=torch.float32))
    np.testing.assert_allclose(_combine(name, u, w / w.sum(), params), mean.double().numpy(), rtol=1e-5, atol=1e-4)


def test_the_median_of_two_equal_weights_is_their_mean():
    u, _ = _stack(n=2, outliers=0)
    np.testing.assert_allclose(_combine("median", u, [0.5, 0.5]), u.mean(0), rtol=1e-6)


def test_a_run_with_trimmed_mean_and_no_trimming_is_fedavg(tmp_path):
    data = _toy()
    mean = _fed(tmp_path, data, {})
    robust = _fed(tmp_path, data, {"aggregator": "trimmed-mean", "aggregator_params": {"beta": 0.0}, "detect": False})
    for r in (1, 2):
        mean.run_round(r)
        robust.run_round(r)
    torch.testing.assert_close(robust.params, mean.params, rtol=1e-5, atol=1e-6)


# ---- breakdown conditions and parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(("server", "clients", "says"), [
    ({"aggregator": "krum", "aggregator_params": {"f": 2}}, 6, "with f = 2 needs n > 2f + 2 = 6 updates, but n = 6"),
    ({"aggregator": "multi-krum", "aggregator_params": {"f": 1}}, 4, "needs n > 2f + 2 = 4 updates, but n = 4"),
    ({"aggregator": "bulyan", "aggregator_params": {"f": 1}}, 6, "with f = 1 needs n >= 4f + 3 = 7 updates, but n = 6"),
    ({"aggregator": "trimmed-mean", "aggregator_params": {"f": 2}}, 4, "needs 2*2 < n, but n = 4"),
])
def test_breakdown_conditions_are_refused_at_config_time_with_the_numbers(server, clients, says):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(clients, **server))
    assert says in e.value.message and "(server.clients_per_round)" in e.value.message
    load_config(_cfg(clients + 3, **server))  # enough clients


def test_breakdown_is_checked_again_with_the_clients_that_replied(tmp_path, monkeypatch):
    """Krum with f = 1 over 5 clients holds (5 > 4); a client sending NaN leaves 4: the round refuses."""
    from fedloom.client import work

    real = work.ClientRuntime.fit

    def nan_from_client_0(self, task):
        res = real(self, task)
        if task.client_id == 0:
            res.message.vector = torch.full_like(res.message.vector, float("nan"))
        return res

    monkeypatch.setattr(work.ClientRuntime, "fit", nan_from_client_0)
    fed = _fed(tmp_path, _toy(sizes=(20,) * 5), {"aggregator": "krum", "aggregator_params": {"f": 1}})
    with pytest.raises(RunError) as e:
        fed.run_round(1)
    assert "round 1 (1 of 5 updates left out): aggregator 'krum' with f = 1 needs n > 2f + 2 = 4" in e.value.message


@pytest.mark.parametrize(("params", "says"), [
    ({"aggregator": "krum", "aggregator_params": {"g": 1}}, "server.aggregator_params.g: aggregator 'krum' has no "
                                                             "parameter 'g'"),
    ({"aggregator": "krum", "aggregator_params": {"f": -1}}, "server.aggregator_params.f = -1: must be >= 0"),
    ({"aggregator": "norm-bound", "aggregator_params": {"bound": "big"}}, "server.aggregator_params.bound = 'big': "
                                                                           "expected a finite number"),
    ({"aggregator": "trimmed-mean", "aggregator_params": {"beta": 0.5}}, "beta = 0.5: must be >= 0.0 and < 0.5"),
    ({"aggregator_params": {"f": 1}}, "server.aggregator_params.f: aggregator 'mean' takes no parameters"),
    ({"max_example_weight": 0.2}, "server.max_example_weight = 0.2 with 4 clients per round"),
])
def test_bad_aggregator_parameters_are_refused_naming_the_key(params, says):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(4, **params))
    assert says in e.value.message


# ---- bounded example counts ------------------------------------------------------------------------------------


def test_capped_shares_spread_the_excess_in_proportion():
    counts = [100, 10, 10, 20, 60]  # shares 0.5, 0.05, 0.05, 0.1, 0.3
    got = np.array(cap_shares(counts, 0.25)) / 200
    # 0.5 and 0.3 capped at 0.25; the other 0.5 split 1:1:2 -> 0.125, 0.125, 0.25
    np.testing.assert_allclose(got, [0.25, 0.125, 0.125, 0.25, 0.25], atol=1e-12)
    assert cap_shares([5, 5], 0.6) == [5.0, 5.0] and cap_shares([9, 1], 0.4) == [5.0, 5.0]  # cap * n < 1: uniform


def test_max_example_weight_caps_the_largest_clients_share_in_the_aggregate(tmp_path):
    """Client sizes 80/10/10: capped at 1/3 every client weighs the same, so the aggregate is the plain mean of
    the updates, which a run with equal sizes' weights reproduces."""
    data = _toy(sizes=(80, 10, 10))
    capped = _fed(tmp_path, data, {"max_example_weight": 1 / 3})
    plain = _fed(tmp_path, data, {})
    start = capped.params.clone()
    out = capped.run_round(1)
    plain.run_round(1)
    upd = torch.stack([m for m in _honest_updates(plain, 1)])
    torch.testing.assert_close(capped.params - start, upd.mean(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(plain.params, capped.params)
    assert out.row["num_clients"] == 3


# ---- detection ground truth --------------------------------------------------------------------------------------


def _synthetic(n=20, d=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    scale = 1 + 0.3 * torch.rand(n, 1, generator=g)  # unequal client norms, as with unequal data
    return scale * (base + 1.0 * torch.randn(n, d, generator=g)), g


def test_scaled_and_sign_flipped_updates_are_flagged_and_honest_ones_are_not():
    u, _ = _synthetic()
    u[[3, 11, 17]] *= 10  # scaling attackers
    u[[5, 8]] *= -1  # sign flippers
    det = Detector(u.shape[1], seed=0)
    scores, sketches = det.score(1, list(range(20)), u)
    flagged = {c for c, s in enumerate(scores.suspicion) if s >= FLAG}
    assert flagged == {3, 11, 17, 5, 8}, scores.suspicion
    assert precision_recall(flagged, {3, 11, 17, 5, 8}) == (1.0, 1.0)
    assert all(0 <= s <= 1 for s in scores.suspicion)


def test_a_clean_round_flags_nobody_and_the_history_cosine_follows_the_true_cosine():
    u, g = _synthetic(seed=2)
    det = Detector(u.shape[1], seed=0)
    scores, sketches = det.score(1, list(range(20)), u)
    assert max(scores.suspicion) < FLAG and scores.cosine_prev == [None] * 20
    det.commit(list(range(20)), sketches)
    v = 0.6 * u + torch.randn(u.shape, generator=g)
    again, _ = det.score(2, list(range(20)), v)
    true = torch.nn.functional.cosine_similarity(u, v, dim=1)
    np.testing.assert_allclose(again.cosine_prev, true.numpy(), atol=0.1)
    # a client that turns to noise loses its agreement with its own history
    v[4] = torch.randn(u.shape[1], generator=g) * u[4].norm() / math.sqrt(u.shape[1])
    turned, _ = det.score(2, list(range(20)), v)
    assert abs(turned.cosine_prev[4]) < 0.15 and turned.suspicion[4] >= FLAG


def test_detection_state_and_aggregator_state_survive_a_checkpoint(tmp_path):
    """FoolsGold's histories and the detector's sketches are server state: a federation resumed from the round-2
    checkpoint runs round 3 exactly as the one that never stopped."""
    data = _toy(sizes=(20,) * 6)
    server = {"aggregator": "foolsgold", "detect": True}
    a = _fed(tmp_path, data, server)
    a.run_round(1)
    a.run_round(2)
    ckpt = a.save_checkpoint(2)
    assert any(k.startswith("foolsgold/0/") for k in a.agg_state) and a.detector.prev
    saved = {k: v.clone() for k, v in a.agg_state.items()}
    ran = a.run_round(3)
    b = _fed(tmp_path, data, server)
    b.load_checkpoint(ckpt)
    assert b.agg_state.keys() == saved.keys() and all(torch.equal(b.agg_state[k], saved[k]) for k in saved)
    resumed = b.run_round(3)
    assert torch.equal(b.params, a.params)

    def seen(out):
        return [(r["client_id"], r["suspicion"], r["cosine_prev"]) for r in out.row["clients"] if r["kind"] == "fit"]

    assert seen(resumed) == seen(ran) and all(cp is not None for _, _, cp in seen(ran))


def test_scaffold_with_a_stateful_aggregator_keeps_one_state_per_combine(tmp_path):
    fed = _fed(tmp_path, _toy(), {"algorithm": "scaffold", "aggregator": "centered-clip",
                                  "aggregator_params": {"tau": 10.0}})
    fed.run_round(1)
    assert set(fed.agg_state) == {"centered-clip/0", "centered-clip/1"}  # Δy, then Δc
    assert torch.isfinite(fed.params).all() and torch.isfinite(fed.alg_state["c"]).all()


# ---- helpers ------------------------------------------------------------------------------------------------------


def _cfg(num_clients: int, **server) -> dict:
    cfg = small_config(data__num_clients=num_clients)
    cfg["server"].update(server)
    return cfg


def _toy(sizes=(30, 30, 30, 30), f=5, c=3, seed=0) -> FederatedData:
    return toy_data(sizes, f, c, seed, shared_test=True)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _fed(tmp_path, data, server, **sections) -> Federation:
    cfg = load_config({"data": {"num_clients": data.num_clients}, "run": {"seed": 3, "rounds": 5},
                       "server": server, "eval": {"federated": False},
                       "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.5}, **sections})
    net = _net()
    store = RunStore(Path(tempfile.mkdtemp(dir=tmp_path)) / "runs.sqlite")
    store.create_run("r", "r", {}, 3, {}, str(tmp_path), cfg.run.rounds, [])
    return Federation(cfg, data, lambda: copy.deepcopy(net), build_engine("sequential"), store, "r",
                      store.path.with_suffix(".run"))


def _honest_updates(fed: Federation, round_: int) -> list[torch.Tensor]:
    """Each client's honest update in round `round_` from the initial model (what round 1 sends)."""
    from fedloom.client.work import ClientTask

    start = fed.runtime.initial
    sent = fed._encode_broadcast(round_, start)
    return [fed.runtime.run(ClientTask(round_, c.id, fed.cfg.train.lr, fed.cfg.run.seed, sent)).message.vector
            for c in fed.data.clients]


def test_fltrust_root_update_takes_as_many_steps_as_an_average_client():
    """Every client update is rescaled to the root update's norm: a root update of fewer steps (one epoch of a
    100-example root set) would shrink every round's step. Found as FLTrust staying at chance on Fashion-MNIST."""
    from fedloom.algorithms import build_algorithm
    from fedloom.client.work import ClientRuntime
    from fedloom.server.robust import RootTrainer

    data = _toy(sizes=(40, 64, 100, 30))
    cfg = load_config({"train": {"batch_size": 8, "local_epochs": 2}, "server": {"aggregator": "fltrust"}})
    rt = ClientRuntime(lambda: torch.nn.Linear(5, 3), data, cfg.train, build_algorithm(cfg.server, 4))
    root = RootTrainer(rt, size=10, seed=0)
    per_client = [2 * math.ceil(n / 8) for n in (40, 64, 100, 30)]  # 10, 16, 26, 8 steps
    assert root.steps == math.ceil(sum(per_client) / 4) == 15
