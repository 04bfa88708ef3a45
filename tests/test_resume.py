"""An interrupted run, resumed, ends with exactly the model and the records of a run never interrupted.

Each case trains once straight through, and once stopped after round k (KeyboardInterrupt from the round
callback, after round k is recorded, as Ctrl-C does) and resumed with `fedloom.resume`. The final checkpoints
must hold the same tensors bit for bit, and every recorded round and client row the same numbers: server
optimizer state, per-client state, worker processes, the vectorized engine and sparse checkpoints all have to
come back exactly.
"""

import pytest
import torch

import fedloom
from fedloom.data import datasets
from fedloom.data.datasets import Dataset
from fedloom.params import load_tensors
from fedloom.rounds import Federation
from fedloom.store import RunStore

from .conftest import small_config

_UNTIMED_ROUND = ("run_id", "finished_at", "seconds", "checkpoint")  # wall time and paths differ between runs
_UNTIMED_CLIENT = ("run_id", "seconds")


def _stop_after(k: int):
    def callback(info: dict) -> None:
        if info["round"] == k:
            raise KeyboardInterrupt

    return callback


def _records(store: RunStore, run_id: str) -> tuple[list[dict], list[dict]]:
    rounds = [{k: v for k, v in r.items() if k not in _UNTIMED_ROUND} for r in store.rounds(run_id)]
    for r in rounds:
        r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.endswith("seconds")}
    clients = [{k: v for k, v in c.items() if k not in _UNTIMED_CLIENT} for c in store.client_rounds(run_id)]
    return rounds, clients


def _final_checkpoint(store: RunStore, run_id: str) -> dict[str, torch.Tensor]:
    last = store.rounds(run_id)[-1]
    assert last["checkpoint"], f"round {last['round']} of {run_id} has no checkpoint"
    return load_tensors(last["checkpoint"])


def _interrupted_then_resumed(runs_dir, cfg: dict, stop_after: int) -> str:
    with pytest.raises(KeyboardInterrupt):
        fedloom.run(cfg, make_report=False, callback=_stop_after(stop_after))
    store = RunStore(runs_dir / "fedloom.db")
    stopped = [r for r in store.list_runs() if r.status == "interrupted"]
    assert len(stopped) == 1
    run_id = stopped[0].run_id
    assert store.get_run(run_id).rounds_completed == stop_after
    res = fedloom.resume(run_id, make_report=False)
    assert res.status == "completed", res.message
    return run_id


def _assert_resume_is_exact(runs_dir, cfg: dict, stop_after: int) -> None:
    straight = fedloom.run(cfg, make_report=False)
    assert straight.status == "completed", straight.message
    resumed = _interrupted_then_resumed(runs_dir, cfg, stop_after)
    store = RunStore(runs_dir / "fedloom.db")
    a, b = _final_checkpoint(store, straight.run_id), _final_checkpoint(store, resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final checkpoints differ in {different[:5]}"
    rounds_a, clients_a = _records(store, straight.run_id)
    rounds_b, clients_b = _records(store, resumed)
    assert len(rounds_a) == len(rounds_b) == cfg["run"]["rounds"]
    for ra, rb in zip(rounds_a, rounds_b, strict=True):
        assert ra == rb, f"round {ra['round']} recorded differently after resume"
    assert clients_a == clients_b


def test_resume_with_fedadam_state_is_exact(runs_dir):
    _assert_resume_is_exact(runs_dir, small_config(server__optimizer="adam", server__lr=0.03, run__rounds=4), 2)


def test_resume_with_fedavgm_momentum_is_exact(runs_dir):
    _assert_resume_is_exact(runs_dir, small_config(server__momentum=0.9, run__rounds=4), 2)


@pytest.mark.parametrize("algorithm", ["feddyn", "ditto", "scaffold"])
def test_resume_with_stateful_clients_is_exact(runs_dir, algorithm):
    """Two clients of four a round, so clients come back with state written rounds earlier."""
    cfg = small_config(server__algorithm=algorithm, server__clients_per_round=2, run__rounds=5)
    _assert_resume_is_exact(runs_dir, cfg, 3)


def _tiny_images(data_dir, seed: int, download: bool) -> Dataset:
    """240 uint8 16x16 images, 4 classes told apart by brightness: the smallest input simple-cnn-bn takes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (300,), generator=g)
    x = (torch.rand(300, 1, 16, 16, generator=g) * 100 + y.view(-1, 1, 1, 1) * 40).to(torch.uint8)
    return Dataset("tiny-images", x[:240], y[:240], x[240:], y[240:], num_classes=4, mean=(0.4,), std=(0.3,))


def test_resume_of_fedbn_on_simple_cnn_bn_is_exact(runs_dir, monkeypatch):
    """Each client's own BatchNorm layers (weights and running statistics) live only in its client state."""
    monkeypatch.setitem(datasets._LOADERS, "tiny-images", _tiny_images)
    cfg = small_config(server__algorithm="fedbn", server__clients_per_round=2, run__rounds=4,
                       model__name="simple-cnn-bn", train__batch_size=8)
    cfg["data"] = {"dataset": "tiny-images", "num_clients": 4, "partition": "iid"}
    _assert_resume_is_exact(runs_dir, cfg, 2)


def test_resume_on_the_parallel_engine_is_exact(runs_dir):
    """Worker processes, client state (SCAFFOLD's c_i) sent to them and back, updates in shared rows."""
    cfg = small_config(server__algorithm="scaffold", server__clients_per_round=3, run__rounds=4,
                       run__engine="parallel", run__workers=2)
    _assert_resume_is_exact(runs_dir, cfg, 2)


def test_resume_on_the_vectorized_engine_is_exact(runs_dir):
    cfg = small_config(server__algorithm="fedprox", server__mu=0.1, server__momentum=0.5, run__rounds=4,
                       run__engine="vectorized")
    _assert_resume_is_exact(runs_dir, cfg, 2)


def test_resume_between_sparse_checkpoints_redoes_the_rounds_after_the_last_one(runs_dir):
    """checkpoint_every = 2, stopped after round 3: round 3 has no checkpoint, so the run goes on from round 2's
    and trains round 3 again, with the client states as they were after round 2."""
    cfg = small_config(server__algorithm="feddyn", server__clients_per_round=2, run__rounds=5,
                       run__checkpoint_every=2)
    _assert_resume_is_exact(runs_dir, cfg, 3)


def test_resume_after_a_stop_inside_a_round_is_exact(runs_dir, monkeypatch):
    """Stopped in round 3 after the clients' new states were written and the model updated, before the round was
    recorded: the resumed run must not see those states (they belong to an unrecorded round)."""
    cfg = small_config(server__algorithm="feddyn", server__clients_per_round=2, run__rounds=4)
    straight = fedloom.run(cfg, make_report=False)
    real = Federation._evaluate

    def stop_in_round_3(self, row):
        if self.train_losses and len(self.train_losses) == 3:
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(Federation, "_evaluate", stop_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        fedloom.run(cfg, make_report=False)
    monkeypatch.setattr(Federation, "_evaluate", real)
    store = RunStore(runs_dir / "fedloom.db")
    (stopped,) = [r for r in store.list_runs() if r.status == "interrupted"]
    assert stopped.rounds_completed == 2
    assert fedloom.resume(stopped.run_id, make_report=False).status == "completed"
    a, b = _final_checkpoint(store, straight.run_id), _final_checkpoint(store, stopped.run_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(store, straight.run_id) == _records(store, stopped.run_id)

