"""Simulated attacks: each changes what it should (the attacker's data or update, from its start round) and
nothing else; colluding attacks craft from the colluders' honest updates; every engine runs them or refuses;
a short run with an attack and a defence records who attacked and is the same in sequential and parallel."""

import copy
import dataclasses
import tempfile
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

import fedloom
from fedloom.attacks import ATTACKS, alie_z, attacker_ids, backdoor_success, stamp, with_collusion
from fedloom.client.work import ClientTask
from fedloom.config import ATTACK_KINDS, load_config
from fedloom.data.datasets import Dataset
from fedloom.data.federated import ClientData, FederatedData
from fedloom.engines import build_engine
from fedloom.errors import ConfigError
from fedloom.params import load_tensors
from fedloom.rng import torch_rng
from fedloom.rounds import Federation
from fedloom.store import RunStore

from .conftest import small_config


def _toy(sizes=(30, 30, 30, 30), seed=0, labels=None) -> FederatedData:
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() if labels is None else labels
    ds = Dataset("toy", x, y, x[:30].clone(), y[:30].clone(), num_classes=3)
    bounds = np.cumsum((0, *sizes))
    return FederatedData(ds, [ClientData(i, np.arange(bounds[i], bounds[i + 1]), np.arange(10))
                              for i in range(len(sizes))], "toy")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _fed(tmp_path, data, attack=None, server=None) -> Federation:
    cfg = load_config({"data": {"num_clients": data.num_clients}, "run": {"seed": 5, "rounds": 4},
                       "server": server or {}, "eval": {"federated": False}, "attack": attack or {},
                       "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.5}})
    net = _net()
    store = RunStore(Path(tempfile.mkdtemp(dir=tmp_path)) / "runs.sqlite")
    store.create_run("r", "r", {}, 5, {}, str(tmp_path), cfg.run.rounds, [])
    return Federation(cfg, data, lambda: copy.deepcopy(net), build_engine("sequential"), store, "r",
                      store.path.with_suffix(".run"))


def _fit(fed: Federation, round_: int, client: int, **task):
    """Client `client`'s reply in round `round_`, started from the initial model."""
    sent = fed._encode_broadcast(round_, fed.runtime.initial)
    return fed.runtime.run(ClientTask(round_, client, 0.1, 5, sent, **task)).message


# ---- data poisoning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "mapping"), [({}, [2, 1, 0]), ({"source": 0, "target": 2}, [2, 1, 2])])
def test_label_flip_trains_the_attacker_on_flipped_labels_only_from_its_start_round(tmp_path, params, mapping):
    data = _toy()
    attacked = _fed(tmp_path, data, {"kind": "label-flip", "clients": [1], "start_round": 2, "params": params})
    honest = _fed(tmp_path, data)
    flipped_y = torch.tensor(mapping)[data.dataset.y_train]
    flipped = _fed(tmp_path, dataclasses.replace(data, dataset=dataclasses.replace(data.dataset, y_train=flipped_y)))
    for client in (0, 1):
        assert torch.equal(_fit(attacked, 1, client).vector, _fit(honest, 1, client).vector)  # before start_round
    assert torch.equal(_fit(attacked, 2, 0).vector, _fit(honest, 2, 0).vector)  # an honest client
    got = _fit(attacked, 2, 1).vector
    assert torch.equal(got, _fit(flipped, 2, 1).vector) and not torch.equal(got, _fit(honest, 2, 1).vector)
    assert torch.equal(attacked.data.dataset.y_train, data.dataset.y_train)  # the shared labels stay clean


def test_the_trigger_is_a_checkerboard_in_the_bottom_right_corner():
    x = torch.full((2, 1, 6, 6), 7, dtype=torch.uint8)
    got = stamp(x, 3)
    board = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(got[:, 0, 3:, 3:], board.expand(2, 3, 3))
    got[:, 0, 3:, 3:] = 7
    assert torch.equal(got, x) and x.max() == 7  # nothing else, and not in place
    flat = stamp(torch.zeros(1, 5), 2)
    assert flat.tolist() == [[0.0, 0.0, 0.0, 3.0, -3.0]]


def test_backdoor_poisons_a_fixed_fraction_of_the_attackers_samples_and_nothing_else(tmp_path):
    data = _toy()
    attacked = _fed(tmp_path, data, {"kind": "backdoor", "clients": [2], "params": {"target": 1, "size": 2,
                                                                                     "fraction": 0.5}})
    attack = attacked.runtime.attack
    mask = attack.mask(len(data.dataset.y_train))
    assert 0.35 < float(mask.float().mean()) < 0.65
    x, y = data.dataset.x_train.clone(), data.dataset.y_train.clone()
    x[mask] = stamp(x[mask], 2)
    y[mask] = 1
    poisoned = _fed(tmp_path, dataclasses.replace(data, dataset=dataclasses.replace(data.dataset, x_train=x,
                                                                                      y_train=y)))
    honest = _fed(tmp_path, data)
    assert torch.equal(_fit(attacked, 1, 2).vector, _fit(poisoned, 1, 2).vector)
    assert not torch.equal(_fit(attacked, 1, 2).vector, _fit(honest, 1, 2).vector)
    assert torch.equal(_fit(attacked, 1, 0).vector, _fit(honest, 1, 0).vector)


def test_backdoor_success_counts_stamped_test_samples_of_other_classes_sent_to_the_target(tmp_path):
    data = _toy()
    attack = _fed(tmp_path, data, {"kind": "backdoor", "clients": [0], "params": {"target": 1}}).runtime.attack

    class Always(torch.nn.Module):
        def __init__(self, label):
            super().__init__()
            self.label = label

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), self.label), 3).float()

    assert backdoor_success(Always(1), data.dataset, attack) == 1.0
    assert backdoor_success(Always(0), data.dataset, attack) == 0.0


# ---- model poisoning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "params", "expect"), [
    ("sign-flip", {}, lambda h, t: -h),
    ("sign-flip", {"scale": 3.0}, lambda h, t: -3 * h),
    ("scaling", {}, lambda h, t: 4 * h),  # model replacement: 4 clients a round / server.lr 1
    ("scaling", {"factor": 2.5}, lambda h, t: 2.5 * h),
    ("gaussian", {"std": 0.5}, lambda h, t: 0.5 * torch.randn(h.shape, generator=torch_rng(5, "attack", 3, 1))),
    ("free-rider", {}, lambda h, t: torch.zeros_like(h)),
    ("free-rider", {"noise": 0.01}, lambda h, t: 0.01 * torch.randn(h.shape, generator=torch_rng(5, "attack", 3, 1))),
    ("inflate", {"factor": 10.0}, lambda h, t: h),
])
def test_each_update_attack_sends_what_it_should_and_only_from_the_attacker(tmp_path, kind, params, expect):
    data = _toy()
    attacked = _fed(tmp_path, data, {"kind": kind, "clients": [1], "start_round": 3, "params": params})
    honest = _fed(tmp_path, data)
    sent, clean = _fit(attacked, 3, 1), _fit(honest, 3, 1)
    torch.testing.assert_close(sent.vector, expect(clean.vector, None), rtol=1e-6, atol=1e-7)
    assert sent.num_examples == (300 if kind == "inflate" else 30)
    for r, c in ((2, 1), (3, 0)):  # before its start round; another client
        got, ref = _fit(attacked, r, c), _fit(honest, r, c)
        assert torch.equal(got.vector, ref.vector) and got.num_examples == ref.num_examples


def test_alie_z_is_baruchs_z_max():
    assert alie_z(6, 2) == pytest.approx(NormalDist().inv_cdf(4 / 6))  # s = floor(6/2 + 1) - 2 = 2
    assert alie_z(50, 10) == pytest.approx(NormalDist().inv_cdf((50 - 16) / 50))  # s = 26 - 10 = 16


@pytest.mark.parametrize(("kind", "params"), [("alie", {}), ("alie", {"z": 1.5}), ("ipm", {"epsilon": 0.1})])
def test_colluders_craft_their_update_from_their_own_honest_updates(tmp_path, kind, params):
    data = _toy(sizes=(30,) * 6)
    attacked = _fed(tmp_path, data, {"kind": kind, "clients": [1, 3, 4], "params": params})
    honest = _fed(tmp_path, data)
    own = torch.stack([_fit(honest, 1, c).vector for c in (1, 3, 4)]).double()
    mean, std = own.mean(0), own.std(0, correction=1)
    expected = -0.1 * mean if kind == "ipm" else mean - params.get("z", alie_z(6, 3)) * std
    sent = attacked._encode_broadcast(1, attacked.runtime.initial)
    tasks = [ClientTask(1, c, 0.1, 5, sent) for c in range(6)]
    tasks = with_collusion(attacked.runtime.attack, tasks, lambda ts: attacked.engine.fit(attacked.runtime, ts))
    assert [t.collusion is not None for t in tasks] == [False, True, False, True, True, False]
    for t in tasks:
        got = attacked.runtime.run(t).message.vector
        if t.client_id in (1, 3, 4):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, _fit(honest, 1, t.client_id).vector)


# ---- who attacks, engines, config ---------------------------------------------------------------------------


def test_attackers_are_the_list_or_a_seeded_fraction_of_the_population():
    picked = attacker_ids(None, 0.25, 40, seed=1)
    assert len(picked) == 10 and picked == attacker_ids(None, 0.25, 40, seed=1) == sorted(picked)
    assert picked != attacker_ids(None, 0.25, 40, seed=2)
    assert attacker_ids([7, 3, 7], 0.9, 40, seed=1) == [3, 7] and attacker_ids(None, 0.0, 40, 0) == []


def test_the_config_kinds_are_the_attacks_and_bad_parameters_are_refused_naming_the_key(tmp_path):
    assert set(ATTACK_KINDS) == {"none", *ATTACKS}
    for attack, says in [
        ({"kind": "scaling", "params": {"factr": 2}}, "attack.params.factr: attack 'scaling' has no parameter "
                                                      "'factr' (did you mean 'factor'?)"),
        ({"kind": "backdoor", "params": {"fraction": 1.5}}, "attack.params.fraction = 1.5: must be >= 0.0 and <= 1.0"),
        ({"kind": "none", "params": {"factor": 2}}, "attack.params.factor is set but attack.kind is 'none'"),
        ({"kind": "sign-flip", "clients": [0, 9]}, "attack.clients [9] are not client ids (0..3)"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(small_config() | {"attack": attack})
        assert says in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="attack.params.target = 5: the dataset has 3 classes"):
        _fed(tmp_path, _toy(), {"kind": "backdoor", "params": {"target": 5}})


def test_the_vectorized_engine_refuses_an_attack_in_one_line_and_auto_picks_another():
    from fedloom.api import prepare
    from fedloom.engines.auto import choose
    from fedloom.engines.vectorized import VectorizedEngine

    cfg = load_config(small_config(data__num_clients=8) | {"attack": {"kind": "sign-flip", "clients": [1]}})
    data, factory = prepare(cfg)
    fed_runtime = _runtime(cfg, data, factory)
    with pytest.raises(ConfigError) as e:
        VectorizedEngine().check(fed_runtime)
    assert e.value.message == ("the vectorized engine cannot run this experiment: attack 'sign-flip' acts inside "
                               "each client's own training (sequential, parallel, ray)")
    assert choose(fed_runtime, 8, 1) == "sequential"


def test_the_ray_recipe_carries_the_attack_to_the_workers():
    from fedloom.api import prepare
    from fedloom.engines.ray_engine import RuntimeRecipe

    cfg = load_config(small_config() | {"attack": {"kind": "label-flip", "clients": [2], "start_round": 2}})
    data, factory = prepare(cfg)
    rebuilt = RuntimeRecipe.of(_runtime(cfg, data, factory)).build()
    assert rebuilt.attack.kind == "label-flip" and rebuilt.attack.clients == {2} and rebuilt.attack.start_round == 2


def _runtime(cfg, data, factory):
    from fedloom.algorithms import build_algorithm
    from fedloom.attacks import build_attack
    from fedloom.client.work import ClientRuntime

    rt = ClientRuntime(factory, data, cfg.train, build_algorithm(cfg.server, data.num_clients), cfg.eval,
                       cfg.pipeline)
    rt.attack = build_attack(cfg, data.dataset.num_classes)
    return rt


# ---- runs ---------------------------------------------------------------------------------------------------


def test_an_inflated_example_count_is_cut_to_the_clients_train_size(runs_dir):
    clean = fedloom.run(small_config(run__rounds=2, run__engine="sequential"), make_report=False)
    inflated = fedloom.run(small_config(run__rounds=2, run__engine="sequential")
                           | {"attack": {"kind": "inflate", "clients": [2], "params": {"factor": 50.0}}},
                           make_report=False)
    a, b = load_tensors(clean.summary["checkpoint"]), load_tensors(inflated.summary["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    store = RunStore(runs_dir / "fedloom.db")
    rounds = store.rounds(inflated.run_id)
    held = {c["client_id"]: c["num_train"] for c in store.clients(inflated.run_id)}
    assert all(r["metrics"]["examples_clipped"] == {"2": 50 * held[2]} for r in rounds)


@pytest.mark.parametrize(("attack", "server"), [
    ({"kind": "scaling", "clients": [1, 5], "start_round": 2, "params": {"factor": 20.0}},
     {"aggregator": "multi-krum", "aggregator_params": {"f": 2}}),
    ({"kind": "alie", "clients": [0, 3]}, {"aggregator": "trimmed-mean", "aggregator_params": {"f": 2},
                                          "exclude_suspicion": 0.6}),
])
def test_an_attacked_defended_run_is_recorded_and_the_same_in_sequential_and_parallel(runs_dir, attack, server):
    runs = {}
    for engine in ("sequential", "parallel"):
        cfg = small_config(data__num_clients=8, run__rounds=3, run__engine=engine, run__workers=2) | {"attack": attack}
        cfg["server"].update(server)
        runs[engine] = fedloom.run(cfg, make_report=False)
        assert runs[engine].status == "completed", runs[engine].message
    seq, par = (load_tensors(runs[e].summary["checkpoint"]) for e in ("sequential", "parallel"))
    assert all(torch.equal(seq[k], par[k]) for k in seq)
    store = RunStore(runs_dir / "fedloom.db")
    fits = {e: store.client_rounds(runs[e].run_id, "fit") for e in runs}
    keys = ("round", "client_id", "suspicion", "attacker", "excluded")
    assert [[f[k] for k in keys] for f in fits["sequential"]] == [[f[k] for k in keys] for f in fits["parallel"]]
    start = attack.get("start_round", 1)
    for f in fits["sequential"]:
        assert f["attacker"] == int(f["client_id"] in attack["clients"] and f["round"] >= start)
        assert f["suspicion"] is not None and 0 <= f["suspicion"] <= 1
    for r in store.rounds(runs["sequential"].run_id):
        m = r["metrics"]
        assert m["attackers"] == (attack["clients"] if r["round"] >= start else [])
        assert "detect_precision" in m and "detect_recall" in m and m["aggregator"] == server["aggregator"]
