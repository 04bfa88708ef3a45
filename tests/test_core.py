"""Parameter vectors, wire format, aggregation, server optimizer and metrics against closed forms."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from fedloom.metrics import macro_f1, spread
from fedloom.params import ParamSpec, load_tensors, save_tensors
from fedloom.pipeline import wire
from fedloom.rng import derive_seed, numpy_rng
from fedloom.server.aggregators import example_weights, weighted_mean
from fedloom.server.optimizers import ServerSGD


def _model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_paramspec_roundtrip_keeps_dtypes():
    m = _model()
    spec = ParamSpec.from_model(m)
    vec = spec.flatten(m.state_dict())
    assert vec.dtype == torch.float32 and vec.numel() == spec.size
    back = spec.unflatten(vec)
    for k, v in m.state_dict().items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert spec.hash() == ParamSpec.from_model(_model()).hash()
    with pytest.raises(ValueError, match="expects"):
        spec.unflatten(vec[:-1])


def test_safetensors_atomic_roundtrip(tmp_path):
    t = {"a": torch.arange(5.0), "b": torch.ones(2, 2)}
    save_tensors(tmp_path / "x.safetensors", t, {"round": 3})
    got = load_tensors(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], t[k]) for k in t)
    assert not list(tmp_path.glob("*.tmp"))


def test_wire_roundtrip_and_size_is_exact():
    vec = torch.randn(1000)
    msg = wire.Message("update", 3, 7, "abc", vec, num_examples=42, metrics={"loss": 0.5})
    data = wire.encode(msg)
    header_len = int.from_bytes(data[4:8], "little")
    assert len(data) == 8 + header_len + 4 * 1000
    back = wire.decode(data, expect_spec="abc")
    assert torch.equal(back.vector, vec) and back.client_id == 7 and back.num_examples == 42
    assert back.metrics == {"loss": 0.5}
    with pytest.raises(ValueError, match="model mismatch"):
        wire.decode(data, expect_spec="other")
    with pytest.raises(ValueError, match="truncated"):
        wire.decode(data[:-3])
    with pytest.raises(ValueError, match="magic"):
        wire.decode(b"XXXX" + data[4:])


def test_example_weights_sum_to_one_and_weighted_mean():
    w = example_weights([10, 30, 60])
    assert torch.allclose(w, torch.tensor([0.1, 0.3, 0.6]))
    assert abs(float(w.sum()) - 1.0) < 1e-6
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(weighted_mean(u, w), torch.tensor([0.7, 0.9]))
    with pytest.raises(ValueError):
        example_weights([0, 0])


def test_server_sgd_lr1_is_fedavg_and_momentum_matches_hand_computation():
    x = torch.tensor([1.0, 2.0])
    d = torch.tensor([0.5, -1.0])
    opt = ServerSGD(lr=1.0)
    x1, _ = opt.step(x, d, opt.init(x))
    assert torch.equal(x1, x + d)
    opt = ServerSGD(lr=0.5, momentum=0.9)
    s = opt.init(x)
    x1, s = opt.step(x, d, s)  # m1 = -d ; x1 = x + 0.5 d
    x2, s = opt.step(x1, d, s)  # m2 = 0.9 * -d - d ; x2 = x1 + 0.5 * 1.9 d
    assert torch.allclose(x2, x + 0.5 * d + 0.95 * d)


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 6, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 7, 200))
        ours = macro_f1(torch.as_tensor(y), torch.as_tensor(p), 7)
        assert ours == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


def test_macro_f1_present_only_averages_over_the_true_classes():
    rng = np.random.default_rng(1)
    for n_true in (1, 2, 5):
        y = rng.choice(rng.permutation(9)[:n_true], 60)
        p = np.where(rng.random(60) < 0.8, y, rng.integers(0, 9, 60))  # misses land on absent classes too
        ours = macro_f1(torch.as_tensor(y), torch.as_tensor(p), 9, present_only=True)
        ref = f1_score(y, p, labels=np.unique(y), average="macro")
        assert ours == pytest.approx(ref, abs=1e-12)
    # 2 classes, 80% right, the misses on 2 absent classes: F1 = 2*4 / (5 + 4) = 8/9 for each present class;
    # over every class seen the absent ones add two zeros and halve it
    y, p = torch.tensor([0] * 5 + [1] * 5), torch.tensor([0, 0, 0, 0, 2, 1, 1, 1, 1, 3])
    assert macro_f1(y, p, 10) == pytest.approx(4 / 9)
    assert macro_f1(y, p, 10, present_only=True) == pytest.approx(8 / 9)
    assert np.isnan(macro_f1(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3,
                             present_only=True))


def test_spread_weighted_mean_and_quantiles():
    s = spread([0.5, 0.7, 0.9, float("nan")], [1, 1, 2, 5])
    assert s["mean"] == pytest.approx((0.5 + 0.7 + 1.8) / 4)
    assert s["min"] == 0.5 and s["max"] == 0.9 and s["median"] == 0.7


def test_rng_streams_are_deterministic_and_distinct():
    assert derive_seed(0, "select", 1) == derive_seed(0, "select", 1)
    assert derive_seed(0, "select", 1) != derive_seed(0, "select", 2)
    assert derive_seed(0, "select", 1) != derive_seed(1, "select", 1)
    assert numpy_rng(3, "x").integers(1 << 30) == numpy_rng(3, "x").integers(1 << 30)


def test_passthrough_hands_over_the_vector_and_counts_the_exact_encoded_size():
    vec = torch.randn(1000)
    msg = wire.Message("update", 3, 7, "abc", vec, 12, {"loss": 0.123456789, "steps": 4, "bad": float("nan")})
    got, nbytes = wire.passthrough(msg)
    assert nbytes == len(wire.encode(msg))
    assert got.vector is not None and got.vector.data_ptr() == vec.data_ptr()  # lossless: no copy
    decoded = wire.decode(wire.encode(msg))
    assert (got.round, got.client_id, got.num_examples) == (decoded.round, decoded.client_id, decoded.num_examples)
    assert got.metrics["loss"] == decoded.metrics["loss"] and np.isnan(got.metrics["bad"])


def test_passthrough_really_encodes_a_codec_it_cannot_skip():
    vec = torch.tensor([1.0001, 2.0, 3.0])
    msg = wire.Message("update", 1, 0, "abc", vec, 1, {}, codec="f16")
    got, nbytes = wire.passthrough(msg)
    assert nbytes == len(wire.encode(msg))
    assert torch.equal(got.vector, vec.to(torch.float16).float())  # the codec's loss is applied


def test_stack_rows_is_zero_copy_for_rows_of_one_matrix_and_reuses_a_released_buffer():
    from fedloom.params import ReusedBuffer, stack_rows

    m = torch.randn(5, 8)
    s = stack_rows([m[i] for i in range(5)])
    assert s.data_ptr() == m.data_ptr() and torch.equal(s, m)
    assert torch.equal(stack_rows([m[i] for i in (0, 2, 1)]), m[[0, 2, 1]])  # not consecutive: copied
    buf = ReusedBuffer()
    rows = [torch.randn(8) for _ in range(3)]
    first = stack_rows(rows, buf)
    ptr = first.data_ptr()
    assert torch.equal(first, torch.stack(rows)) and buf.lent
    second = stack_rows([r + 1 for r in rows], buf)  # not released: the first is still its holder's
    assert second.data_ptr() != ptr and torch.equal(first, torch.stack(rows))
    ptr = second.data_ptr()
    buf.release()
    third = stack_rows(rows, buf)
    assert third.data_ptr() == ptr and torch.equal(third, torch.stack(rows))


def _row1_of_storage(s: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0).set_(s, 0, (2, 3))[1]


@pytest.mark.parametrize("keep, row1", [(lambda t: t[1], lambda v: v), (lambda t: t.detach(), lambda v: v[1]),
                                        (lambda t: t.numpy(), lambda v: torch.from_numpy(v[1])),
                                        (lambda t: t.untyped_storage(), _row1_of_storage)])
def test_a_view_kept_of_a_lent_buffer_is_never_written_over(keep, row1):
    """Counting references to the tensor missed `.detach()`, `.numpy()` and storages (none refers to the tensor
    object): a lent buffer is not lent again, whatever still refers to its memory, until it is released."""
    from fedloom.params import ReusedBuffer

    buf = ReusedBuffer()
    t = buf.get(2, 3)
    t.copy_(torch.arange(6.0).view(2, 3))
    kept = keep(t)
    del t
    buf.get(2, 3).fill_(-1.0)
    assert torch.equal(row1(kept), torch.tensor([3.0, 4.0, 5.0]))


@pytest.mark.parametrize("overlap", [False, True])
def test_client_summaries_equal_one_subset_per_client(overlap):
    from fedloom.evaluation import Predictions, client_summaries

    g = torch.Generator().manual_seed(3)
    n, k = 500, 7
    preds = Predictions(torch.rand(n, generator=g) * 3, torch.randint(0, k, (n,), generator=g),
                        torch.randint(0, k, (n,), generator=g))
    perm = torch.randperm(n, generator=g).numpy()
    parts = [np.sort(p) for p in np.array_split(perm[:450], 40)] + [np.zeros(0, np.int64)]  # one client without
    if overlap:
        parts[1] = np.concatenate([parts[1], parts[0][:3]])
    got = client_summaries(preds, parts, k)
    for idx, s in zip(parts, got, strict=True):
        ref = preds.subset(idx).summary(k, present_only=True)
        assert s["num_examples"] == ref["num_examples"]
        for key in ("loss", "accuracy", "macro_f1"):
            assert s[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12, nan_ok=True), key


def test_client_macro_f1_is_sklearn_over_the_classes_in_each_clients_split():
    """Clients with one class, with a few, with all, and with none; wrong predictions of every class."""
    from fedloom.evaluation import Predictions, client_summaries

    rng = np.random.default_rng(7)
    k, n = 10, 2000
    labels = rng.integers(0, k, n)
    parts = [np.flatnonzero(labels == 3)[:17], np.flatnonzero(labels == 5)[:1], np.zeros(0, np.int64),
             np.flatnonzero(np.isin(labels, [1, 8]))[:40], np.arange(1000, 1400)]
    parts += [rng.choice(np.flatnonzero(np.isin(labels, rng.choice(k, rng.integers(1, 4), replace=False))),
                         rng.integers(1, 30), replace=False) for _ in range(50)]
    preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    p = Predictions(torch.from_numpy(rng.random(n)), torch.from_numpy(preds), torch.from_numpy(labels))
    got = client_summaries(p, parts, k)
    for idx, s in zip(parts, got, strict=True):
        if len(idx) == 0:
            assert s["num_examples"] == 0 and np.isnan(s["macro_f1"]) and np.isnan(s["accuracy"])
            continue
        y, yhat = labels[idx], preds[idx]
        ref = f1_score(y, yhat, labels=np.unique(y), average="macro", zero_division=0)
        assert s["macro_f1"] == pytest.approx(ref, abs=1e-12)
        assert s["accuracy"] == pytest.approx(float(np.mean(y == yhat)), abs=1e-12)
    single = got[0]  # one class: F1 = 2 TP / (support + predicted as that class)
    assert single["macro_f1"] == pytest.approx(2 * (preds[parts[0]] == 3).sum() / (17 + (preds[parts[0]] == 3).sum()))
    empty = client_summaries(p, [np.zeros(0, np.int64)] * 3, k)  # nobody has a test example
    assert [s["num_examples"] for s in empty] == [0, 0, 0] and all(np.isnan(s["macro_f1"]) for s in empty)


def test_a_checkpoint_write_that_fails_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import builtins
    import errno

    from fedloom.params import save_tensors

    real_open = builtins.open

    def full_disk(path, mode="r", *a, **k):
        if str(path).endswith(".tmp") and "w" in mode:
            f = real_open(path, mode, *a, **k)
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_disk)
    target = tmp_path / "ckpt" / "round-00001.safetensors"
    with pytest.raises(OSError, match=r"cannot write checkpoint .*round-00001.safetensors: No space left"):
        save_tensors(target, {"w": torch.ones(3)})
    assert list((tmp_path / "ckpt").iterdir()) == []
