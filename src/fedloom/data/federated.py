"""A dataset split among clients: each client is index arrays into the shared tensors, never a copy.

So a population of 100k simulated clients costs index memory only, and every engine (in-process or
not) sees the same samples for the same seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..rng import numpy_rng
from . import partition as P
from .datasets import Dataset

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "feature-noise", "natural", "given")
CLIENT_TEST = ("matched", "holdout")


@dataclass
class ClientData:
    id: int
    train_idx: np.ndarray  # int64 indices into dataset.x_train
    test_idx: np.ndarray  # int64 indices into dataset.x_test
    noise_std: float = 0.0  # feature-noise partitions: std of Gaussian noise added to this client's inputs


def _counts(parts: list[np.ndarray], y: np.ndarray, num_classes: int) -> np.ndarray:
    """(len(parts), num_classes) int64 label counts, in one bincount however many clients there are."""
    lengths = np.fromiter((len(p) for p in parts), np.int64, count=len(parts))
    owner = np.repeat(np.arange(len(parts), dtype=np.int64), lengths)
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    counts = np.bincount(owner * num_classes + y[flat], minlength=len(parts) * num_classes)
    return counts.reshape(len(parts), num_classes).astype(np.int64)


@dataclass
class FederatedData:
    dataset: Dataset
    clients: list[ClientData]
    partition: str

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def label_counts(self, split: str = "train") -> np.ndarray:
        """(num_clients, num_classes) int64: how many samples of each class each client holds."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        y = (self.dataset.y_train if split == "train" else self.dataset.y_test).numpy()
        parts = [c.train_idx if split == "train" else c.test_idx for c in self.clients]
        return _counts(parts, y, self.dataset.num_classes)


def _matched(parts: list[np.ndarray], ds: Dataset, rng: np.random.Generator) -> list[np.ndarray]:
    """Split the official test set so each client's test labels follow its train labels.

    Per class, the shuffled test samples are cut among clients in proportion to their train counts of
    that class (cumulative boundaries rounded, so each share is within one sample of proportional).
    Test samples of classes no client trains on belong to no client.
    """
    y_test = ds.y_test.numpy()
    counts = _counts(parts, ds.y_train.numpy(), ds.num_classes)
    owner = np.full(len(y_test), -1, dtype=np.int64)
    for c in range(ds.num_classes):
        total = counts[:, c].sum()
        if total == 0:
            continue
        idx = rng.permutation(np.flatnonzero(y_test == c))
        bounds = np.round(np.cumsum(counts[:, c]) / total * len(idx)).astype(np.int64)
        owner[idx] = np.repeat(np.arange(len(parts)), np.diff(bounds, prepend=0))
    return P.group_indices(owner, len(parts))


def _holdout(parts: list[np.ndarray], ds: Dataset, fraction: float,
             rng: np.random.Generator) -> tuple[Dataset, list[np.ndarray], list[np.ndarray]]:
    """Hold out `fraction` of each client's own samples (at least one kept for training) as its test set.

    Test indices point into `x_test`, so the returned dataset's test split is the union of the held-out
    samples (client by client, one copy of those samples): centralized test metrics then measure the
    same population the clients hold, as in LEAF/FedProx-style per-device splits.
    """
    train, held = [], []
    for p in parts:
        p = rng.permutation(p)
        n_test = max(0, min(int(round(fraction * len(p))), len(p) - 1))
        held.append(p[:n_test])
        train.append(np.sort(p[n_test:]))
    bounds = np.cumsum([0] + [len(h) for h in held])
    flat = torch.from_numpy(np.concatenate(held).astype(np.int64))
    groups = ds.groups_train[flat.numpy()] if ds.groups_train is not None else None
    ds = dataclasses.replace(ds, x_test=ds.x_train[flat], y_test=ds.y_train[flat], groups_test=groups,
                             test_client_indices=None)
    return ds, train, [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(len(parts))]


def _natural_test(groups_train: np.ndarray, groups_test: np.ndarray) -> list[np.ndarray]:
    """Each natural client's test samples: those of its group (groups absent from training are dropped)."""
    ids = np.unique(groups_train)
    pos = np.searchsorted(ids, groups_test)
    known = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == groups_test)
    return P.group_indices(np.where(known, pos, -1).astype(np.int64), len(ids))


def _owned(ids: np.ndarray, num_clients: int, what: str) -> list[np.ndarray]:
    """Client k's samples are those whose id is k (-1: held by no client); an id beyond the clients is refused."""
    if len(ids) and ids.max() >= num_clients:
        top = int(ids.max())
        raise ValueError(f"{what} go up to {top} but num_clients is {num_clients} (ids 0..{num_clients - 1}); "
                         f"set num_clients = {top + 1}")
    if len(ids) and ids.min() < -1:
        raise ValueError(f"{what} hold {int(ids.min())}: ids are 0..num_clients-1, or -1 for no client")
    return P.group_indices(ids.astype(np.int64), num_clients)


def _padded(lists: list[np.ndarray], num_clients: int, what: str) -> list[np.ndarray]:
    if len(lists) > num_clients:
        raise ValueError(f"the data give {len(lists)} {what} but num_clients is {num_clients}; "
                         f"set num_clients = {len(lists)}")
    return [*lists, *(np.zeros(0, np.int64) for _ in range(num_clients - len(lists)))]


def _given(ds: Dataset, num_clients: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The clients the data came with: client k holds index list k, or the samples whose client id is k (clients
    the data leave out hold nothing). Their test samples too, when the data give them."""
    if ds.client_indices is not None:
        tests = ds.test_client_indices
        return (_padded(ds.client_indices, num_clients, "clients' index lists"),
                _padded(tests, num_clients, "clients' test index lists") if tests is not None else None)
    if ds.groups_train is not None:
        return (_owned(ds.groups_train, num_clients, "the data's client ids"),
                _owned(ds.groups_test, num_clients, "the data's test client ids") if ds.groups_test is not None
                else None)
    raise ValueError(f"partition 'given' needs clients from the data; dataset {ds.name!r} has none (give "
                     "from_arrays client_ids or client_indices, from_client_arrays, a .npz client_train array or "
                     "a .csv client column)")


def federate(dataset: Dataset, num_clients: int, partition: str = "iid", seed: int = 0, *, alpha: float = 0.5,
             classes_per_client: int = 2, beta: float = 0.5, noise_sigma: float = 0.1, min_size: int = 10,
             client_test: str = "matched", holdout_fraction: float = 0.2) -> FederatedData:
    """Split `dataset` among `num_clients` clients; the same seed gives identical index arrays.

    partition: `iid` (`min_size = 0`: more clients than samples allowed, some holding none); `dirichlet`
    (label skew, `alpha`, `min_size`); `shards` (#C=k label skew,
    `classes_per_client`); `quantity` (size skew, `beta`, `min_size`); `feature-noise` (IID, client i's
    inputs get noise std `noise_sigma * i / (num_clients - 1)`); `natural` (one client per
    `dataset.groups_train` id); `given` (client k holds `dataset.client_indices[k]`, or the samples whose
    `groups_train` id is k). client_test: `matched` splits the official test set so each client's
    test labels match its train labels; `holdout` holds out `holdout_fraction` of each client's samples
    (the returned dataset's test split is then the union of those). A natural or given partition of a
    dataset that assigns its test samples to clients (`groups_test`, `test_client_indices`) uses that
    assignment instead.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; valid: {', '.join(PARTITIONS)}")
    if client_test not in CLIENT_TEST:
        raise ValueError(f"unknown client_test {client_test!r}; valid: {', '.join(CLIENT_TEST)}")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    labels = dataset.y_train.numpy()
    n = len(labels)
    rng = numpy_rng(seed, "partition")
    noise = [0.0] * num_clients
    given_tests: list[np.ndarray] | None = None
    if partition == "iid":
        parts = P.iid(n, num_clients, rng, allow_empty=min_size == 0)
    elif partition == "dirichlet":
        parts = P.dirichlet(labels, num_clients, alpha, rng, min_size)
    elif partition == "shards":
        parts = P.label_shards(labels, num_clients, classes_per_client, rng)
    elif partition == "quantity":
        parts = P.quantity_skew(n, num_clients, beta, rng, min_size)
    elif partition == "feature-noise":
        parts, noise = P.feature_noise(n, num_clients, noise_sigma, rng)
    elif partition == "given":
        parts, given_tests = _given(dataset, num_clients)
    else:
        if dataset.groups_train is None:
            lists = " (its clients are index lists: use partition 'given')" if dataset.client_indices else ""
            raise ValueError(f"partition 'natural' needs natural client ids; dataset {dataset.name!r} "
                             f"has none{lists} (synthetic has them; so do from_arrays(client_ids=...), "
                             f"from_client_arrays, a .npz client_train array, a .csv client column)")
        if dataset.groups_train.min(initial=0) < 0:
            raise ValueError("partition 'natural' makes a client of every id; -1 (held by no client) needs "
                             "partition 'given'")
        parts = P.natural(dataset.groups_train, num_clients)

    test_rng = numpy_rng(seed, "client-test")
    if partition == "given" and given_tests is not None:
        tests = given_tests
    elif partition == "natural" and dataset.groups_test is not None:
        tests = _natural_test(dataset.groups_train, dataset.groups_test)
    elif client_test == "matched":
        tests = _matched(parts, dataset, test_rng)
    else:
        dataset, parts, tests = _holdout(parts, dataset, holdout_fraction, test_rng)
    clients = [ClientData(i, parts[i], tests[i], noise[i]) for i in range(num_clients)]
    return FederatedData(dataset, clients, partition)
