"""Partitioners follow their published definitions; federate's per-client test splits."""

import numpy as np
import pytest
import torch

from fedloom.data import partition as P
from fedloom.data.datasets import Dataset
from fedloom.data.federated import federate


def _labels(n=3000, num_classes=10, seed=0) -> np.ndarray:
    """Imbalanced labels: class c has weight c + 1."""
    p = np.arange(1, num_classes + 1) / np.arange(1, num_classes + 1).sum()
    return np.random.default_rng(seed).choice(num_classes, n, p=p)


def _rng(seed=0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _assert_partition(parts, n, covers=True):
    """int64, sorted, disjoint; all of 0..n-1 when `covers`."""
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    if covers:
        assert np.array_equal(np.sort(flat), np.arange(n))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _dataset(n_train=3000, n_test=1000, num_classes=10, seed=0) -> Dataset:
    x = torch.arange(n_train, dtype=torch.float32)[:, None]  # x identifies the training sample
    y = torch.from_numpy(_labels(n_train, num_classes, seed))
    y_test = torch.from_numpy(_labels(n_test, num_classes, seed + 1))
    return Dataset("toy", x, y, torch.zeros(n_test, 1), y_test, num_classes)


def test_iid():
    parts = P.iid(1003, 10, _rng())
    _assert_partition(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    assert _same(parts, P.iid(1003, 10, _rng())) and not _same(parts, P.iid(1003, 10, _rng(1)))
    with pytest.raises(ValueError, match="only 5 samples"):
        P.iid(5, 6, _rng())


def test_dirichlet_niid_bench():
    y = _labels()
    parts = P.dirichlet(y, 20, 0.5, _rng(), min_size=10)
    _assert_partition(parts, len(y))
    assert min(len(p) for p in parts) >= 10
    assert _same(parts, P.dirichlet(y, 20, 0.5, _rng(), min_size=10))
    assert not _same(parts, P.dirichlet(y, 20, 0.5, _rng(1), min_size=10))

    def skew(alpha):  # mean share of a client's most common class
        ps = P.dirichlet(y, 10, alpha, _rng(), min_size=10)
        return np.mean([np.bincount(y[p]).max() / len(p) for p in ps])

    assert skew(0.1) > skew(100.0) + 0.3  # small alpha: strong label skew; large alpha: near IID
    with pytest.raises(ValueError, match="alpha"):
        P.dirichlet(y, 290, 0.01, _rng(), min_size=10)  # cannot reach 10 samples each
    with pytest.raises(ValueError, match="need 3010 samples"):
        P.dirichlet(y, 301, 1.0, _rng(), min_size=10)
    with pytest.raises(ValueError, match="> 0"):
        P.dirichlet(y, 5, 0.0, _rng())


def test_dirichlet_zeroes_clients_that_are_full():
    """NIID-Bench's balance rule: a client at >= N/num_clients gets no share of later classes."""
    y = np.repeat(np.arange(10), 100)
    for seed in range(20):
        parts = P.dirichlet(y, 4, 0.05, _rng(seed), min_size=1)
        cap = len(y) / 4
        for p in parts:  # a full client may overshoot by at most the last class it was given
            counts = np.bincount(y[p], minlength=10)
            before_last = counts[: np.flatnonzero(counts)[-1]].sum()
            assert before_last < cap


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_label_shards_exactly_k_classes(k):
    y = _labels()
    parts = P.label_shards(y, 20, k, _rng())
    _assert_partition(parts, len(y))  # 20 clients >= 10 classes: every class is held
    for i, p in enumerate(parts):
        classes = np.unique(y[p])
        assert len(classes) == k and i % 10 in classes
    for c in range(10):  # each class split equally among its holders
        sizes = [np.sum(y[p] == c) for p in parts if np.any(y[p] == c)]
        assert max(sizes) - min(sizes) <= 1
    assert _same(parts, P.label_shards(y, 20, k, _rng()))


def test_label_shards_drops_classes_nobody_holds():
    y = _labels()
    parts = P.label_shards(y, 3, 1, _rng())  # clients hold classes 0, 1, 2 only
    _assert_partition(parts, len(y), covers=False)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.flatnonzero(y <= 2))
    with pytest.raises(ValueError, match="1..10"):
        P.label_shards(y, 3, 11, _rng())


def test_quantity_skew():
    parts = P.quantity_skew(2000, 10, 0.5, _rng(), min_size=10)
    _assert_partition(parts, 2000)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 10 and max(sizes) > 2 * min(sizes)
    assert _same(parts, P.quantity_skew(2000, 10, 0.5, _rng(), min_size=10))
    with pytest.raises(ValueError, match="beta"):
        P.quantity_skew(2000, 150, 0.05, _rng(), min_size=10)


def test_feature_noise_levels():
    parts, noise = P.feature_noise(1000, 5, 0.4, _rng())
    _assert_partition(parts, 1000)
    assert noise == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert P.feature_noise(10, 1, 0.4, _rng())[1] == [0.0]


def test_natural_groups():
    groups = np.array([7, 3, 7, 3, 9, 9, 9])
    parts = P.natural(groups)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 2], [4, 5, 6]]
    assert _same(P.natural(groups, 3), parts)
    with pytest.raises(ValueError, match="set num_clients = 3"):
        P.natural(groups, 5)


def test_stratified_split():
    y = _labels()
    tr, te = P.stratified_split(y, 0.25, _rng())
    _assert_partition([tr, te], len(y))
    assert np.all(np.abs(np.bincount(y[te]) - 0.25 * np.bincount(y)) <= 0.5)


# --- federate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity", "feature-noise"])
def test_federate_is_reproducible_and_covers(partition):
    ds = _dataset()
    a = federate(ds, 10, partition, seed=3)  # 10 clients: #C=k holds every class (client i gets class i)
    b = federate(ds, 10, partition, seed=3)
    c = federate(ds, 10, partition, seed=4)
    assert a.num_clients == 10 and a.partition == partition and [cl.id for cl in a.clients] == list(range(10))
    assert _same([cl.train_idx for cl in a.clients], [cl.train_idx for cl in b.clients])
    assert _same([cl.test_idx for cl in a.clients], [cl.test_idx for cl in b.clients])
    assert not _same([cl.train_idx for cl in a.clients], [cl.train_idx for cl in c.clients])
    _assert_partition([cl.train_idx for cl in a.clients], 3000)
    _assert_partition([cl.test_idx for cl in a.clients], 1000, covers=False)
    counts = a.label_counts()
    assert counts.shape == (10, 10) and counts.dtype == np.int64 and counts.sum() == 3000
    if partition == "feature-noise":
        assert [cl.noise_std for cl in a.clients] == pytest.approx([0.1 * i / 9 for i in range(10)])


def test_matched_test_split_follows_train_labels():
    ds = _dataset()
    fd = federate(ds, 10, "dirichlet", seed=0, alpha=0.3)
    train, test = fd.label_counts("train"), fd.label_counts("test")
    tests = [c.test_idx for c in fd.clients]
    _assert_partition(tests, 1000)  # every class is held by some client, so the test set is covered
    n_test = np.bincount(ds.y_test.numpy(), minlength=10)
    expected = train / train.sum(0) * n_test  # each class's test samples in proportion to train counts
    assert np.all(np.abs(test - expected) <= 1.0)


def test_matched_skips_classes_nobody_trains_on():
    fd = federate(_dataset(), 3, "shards", classes_per_client=1)
    y_test = fd.dataset.y_test.numpy()
    flat = np.concatenate([c.test_idx for c in fd.clients])
    assert np.array_equal(np.sort(flat), np.flatnonzero(y_test <= 2))
    for i, c in enumerate(fd.clients):
        assert set(y_test[c.test_idx]) == {i}


def test_holdout_fraction():
    ds = _dataset()
    fd = federate(ds, 6, "quantity", seed=1, beta=1.0, client_test="holdout", holdout_fraction=0.25)
    sizes = [len(c.train_idx) + len(c.test_idx) for c in fd.clients]
    assert sum(sizes) == 3000
    for c, n in zip(fd.clients, sizes, strict=True):
        assert len(c.test_idx) == round(0.25 * n)
        held = fd.dataset.x_test[c.test_idx, 0].long().numpy()  # x is the original training index
        assert not set(held) & set(c.train_idx.tolist())
        assert torch.equal(fd.dataset.y_test[c.test_idx], ds.y_train[held])
    _assert_partition([c.test_idx for c in fd.clients], len(fd.dataset.y_test))
    all_held = np.sort(fd.dataset.x_test[:, 0].long().numpy())
    _assert_partition([c.train_idx for c in fd.clients] + [all_held], 3000)  # held out = the rest
    tiny = Dataset("tiny", torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(1, 1),
                   torch.zeros(1, dtype=torch.long), 1)
    fd = federate(tiny, 4, "iid", client_test="holdout", holdout_fraction=0.9)
    assert all(len(c.train_idx) == 1 and len(c.test_idx) == 0 for c in fd.clients)  # keep >= 1 to train on


def test_natural_partition_uses_group_test_samples():
    ds = _dataset(n_train=60, n_test=30)
    ds.groups_train = np.repeat([5, 1, 3], 20)
    ds.groups_test = np.repeat([3, 5, 1], 10)
    fd = federate(ds, 3, "natural")
    train, test = [c.train_idx for c in fd.clients], [c.test_idx for c in fd.clients]
    assert _same(train, [np.arange(20, 40), np.arange(40, 60), np.arange(20)])  # groups 1, 3, 5
    assert _same(test, [np.arange(20, 30), np.arange(10), np.arange(10, 20)])
    with pytest.raises(ValueError, match="set num_clients = 3"):
        federate(ds, 4, "natural")
    with pytest.raises(ValueError, match="natural client ids"):
        federate(_dataset(), 3, "natural")


def test_federate_rejects_bad_arguments():
    ds = _dataset()
    for kwargs, match in [(dict(partition="dirichlet2"), "unknown partition"),
                          (dict(partition="dirichlet", alpha=0), "alpha"),
                          (dict(partition="quantity", beta=-1), "beta"),
                          (dict(partition="shards", classes_per_client=0), "classes_per_client"),
                          (dict(client_test="local"), "client_test"),
                          (dict(client_test="holdout", holdout_fraction=1.0), "holdout_fraction")]:
        with pytest.raises(ValueError, match=match):
            federate(ds, 5, **kwargs)
    with pytest.raises(ValueError, match="num_clients"):
        federate(ds, 0)
    with pytest.raises(ValueError, match="only 3000 samples"):
        federate(ds, 3001)


def test_many_clients_are_index_arrays_only():
    ds = _dataset(n_train=60000, n_test=1000)
    fd = federate(ds, 20000, "iid")
    assert fd.num_clients == 20000 and sum(len(c.train_idx) for c in fd.clients) == 60000
    assert fd.dataset is ds  # no copy of the data
    assert fd.label_counts().sum() == 60000


def test_iid_with_min_size_zero_allows_a_population_larger_than_the_dataset():
    x = torch.zeros(50, 3)
    y = torch.arange(50) % 5
    ds = Dataset("tab", x, y, x[:10].clone(), y[:10].clone(), num_classes=5)
    big = federate(ds, 101, "iid", seed=1, min_size=0)
    sizes = np.array([len(c.train_idx) for c in big.clients])
    assert len(sizes) == 101 and set(sizes) == {0, 1} and sizes.sum() == 50
    assert len(np.unique(np.concatenate([c.train_idx for c in big.clients]))) == 50  # disjoint, every sample
    small = federate(ds, 7, "iid", seed=1, min_size=0)  # at or below the sample count: the usual iid split
    ref = federate(ds, 7, "iid", seed=1)
    assert all(np.array_equal(a.train_idx, b.train_idx) for a, b in zip(small.clients, ref.clients, strict=True))
    with pytest.raises(ValueError, match="min_size = 0"):
        federate(ds, 101, "iid", seed=1)
