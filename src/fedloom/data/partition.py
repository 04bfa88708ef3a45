"""Partitioners: which training samples each client holds, following the published definitions.

Label and quantity skew follow NIID-Bench (Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos:
An Experimental Study", ICDE 2022; `partition_data` in Xtra-Computing/NIID-Bench `utils.py`). Every
function returns one sorted int64 index array per client; the arrays are disjoint and cover every
sample, except `label_shards`, which (as in NIID-Bench) drops the classes no client holds.
Randomness comes only from the `rng` passed in, so a partition is a function of its seed.
"""

from __future__ import annotations

import numpy as np

MAX_ATTEMPTS = 1000


def group_indices(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Index arrays per client from an owner id per sample (-1: held by nobody).

    One stable argsort gives every client's indices already sorted, as views of a single array.
    """
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    kept = order[len(owner) - int(counts.sum()):]  # the -1s sort first
    return np.split(kept, np.cumsum(counts)[:-1])


def _check(n: int, num_clients: int, allow_empty: bool = False) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n and not allow_empty:
        raise ValueError(f"{num_clients} clients but only {n} samples: every client needs at least one "
                         f"(an iid partition with min_size = 0 lets clients hold none)")


def _check_min_size(n: int, num_clients: int, min_size: int) -> None:
    if min_size * num_clients > n:
        raise ValueError(f"{num_clients} clients with >= {min_size} samples each need "
                         f"{min_size * num_clients} samples; the dataset has {n}: lower min_size or "
                         f"num_clients")


def stratified_split(labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices: round(test_fraction * n_c) of each label c to test, >= 1 kept in train.

    Used for tabular train/test splits (labels = classes) and per-device splits (labels = device ids).
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def iid(n: int, num_clients: int, rng: np.random.Generator, allow_empty: bool = False) -> list[np.ndarray]:
    """A random permutation cut into near-equal parts (NIID-Bench `homo`).

    `allow_empty`: a population larger than the dataset (cross-device scale), the last clients holding none.
    """
    _check(n, num_clients, allow_empty)
    return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 10) -> list[np.ndarray]:
    """Label skew (NIID-Bench `noniid-labeldir`): per class, shares ~ Dir(alpha) over clients.

    A client that already holds >= N / num_clients samples gets no share of later classes (keeps sizes
    balanced), and the whole partition is redrawn until every client has >= `min_size` samples.
    """
    n = len(labels)
    _check(n, num_clients)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    _check_min_size(n, num_clients, min_size)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_ATTEMPTS):
        owner = np.empty(n, dtype=np.int64)
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < n / num_clients)
            cum = np.cumsum(p)
            # cum / cum[-1] is exactly 1.0 from the last non-zero share on, so a zeroed client at the end
            # gets exactly nothing (NIID-Bench normalises first, and rounding can hand it one sample).
            cuts = (cum / cum[-1] * len(idx)).astype(np.int64)[:-1]
            share = np.diff(cuts, prepend=0, append=len(idx))
            owner[idx] = np.repeat(np.arange(num_clients), share)
            sizes += share
        if sizes.min() >= min_size:
            return group_indices(owner, num_clients)
    raise ValueError(f"dirichlet partition: no draw in {MAX_ATTEMPTS} gave all {num_clients} clients "
                     f">= {min_size} samples (alpha={alpha} is too small for this many clients); raise "
                     f"alpha, or lower num_clients or min_size")


def label_shards(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's #C=k: client i holds class i % K and k-1 further distinct random classes.

    Each class is split equally among the clients that hold it. Classes no client holds (possible when
    num_clients < K) are dropped, as in NIID-Bench.
    """
    classes = np.unique(labels)
    num_classes = len(classes)
    _check(len(labels), num_clients)
    if not 1 <= k <= num_classes:
        raise ValueError(f"classes_per_client must be in 1..{num_classes} (the classes present), got {k}")
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for i in range(num_clients):
        first = i % num_classes
        others = rng.choice(np.delete(np.arange(num_classes), first), k - 1, replace=False)
        for c in (first, *others):
            holders[int(c)].append(i)
    owner = np.full(len(labels), -1, dtype=np.int64)
    for c, clients in enumerate(holders):
        if not clients:
            continue
        idx = rng.permutation(np.flatnonzero(labels == classes[c]))
        for client, part in zip(clients, np.array_split(idx, len(clients)), strict=True):
            owner[part] = client
    return group_indices(owner, num_clients)


def quantity_skew(n: int, num_clients: int, beta: float, rng: np.random.Generator,
                  min_size: int = 10) -> list[np.ndarray]:
    """Quantity skew (NIID-Bench `iid-diff-quantity`): sizes ~ Dir(beta), labels IID.

    Redrawn until every client has >= `min_size` samples; NIID-Bench checks the unrounded shares, we check
    the sizes actually cut, which is the same rule without rounding letting a client fall below the minimum.
    """
    _check(n, num_clients)
    if beta <= 0:
        raise ValueError(f"quantity-skew beta must be > 0, got {beta}")
    _check_min_size(n, num_clients, min_size)
    for _ in range(MAX_ATTEMPTS):
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, beta))) * n).astype(np.int64)[:-1]
        if np.diff(cuts, prepend=0, append=n).min() >= min_size:
            return [np.sort(p).astype(np.int64) for p in np.split(rng.permutation(n), cuts)]
    raise ValueError(f"quantity-skew partition: no draw in {MAX_ATTEMPTS} gave all {num_clients} clients "
                     f">= {min_size} samples (beta={beta} is too small); raise beta, or lower num_clients "
                     f"or min_size")


def feature_noise(n: int, num_clients: int, sigma: float, rng: np.random.Generator
                  ) -> tuple[list[np.ndarray], list[float]]:
    """NIID-Bench's noise-based feature skew: an IID split; client i's inputs get Gaussian noise of std
    sigma * i / (N - 1), added at batch time by the trainer (a single client gets none)."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    parts = iid(n, num_clients, rng)
    return parts, [sigma * i / (num_clients - 1) if num_clients > 1 else 0.0 for i in range(num_clients)]


def natural(groups: np.ndarray, num_clients: int | None = None) -> list[np.ndarray]:
    """One client per distinct group id (e.g. Synthetic's devices), in sorted id order."""
    ids, owner = np.unique(groups, return_inverse=True)
    if num_clients is not None and num_clients != len(ids):
        raise ValueError(f"partition 'natural': the dataset has {len(ids)} natural clients but "
                         f"num_clients is {num_clients}; set num_clients = {len(ids)}")
    return group_indices(owner.astype(np.int64), len(ids))
