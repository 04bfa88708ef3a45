"""Your own data: arrays, per-client arrays, `.npz` / `.csv` files, and datasets registered by name.

Every way in ends in the same `Dataset` the built-in sets use, after the same checks, so a mistake in the
data (mismatched lengths, labels outside 0..C-1, NaN features, train and test of different shapes) is one
line naming the array and the fix, not a shape error inside round 1.

Clients can come with the data: per-sample client ids (`client_ids`, `.npz` key `client_train`, a `.csv`
column) or per-client index lists (`client_indices`); `data.partition = "given"` uses them as they are and
`"natural"` makes one client per distinct id. Arrays are copied, so changing them later changes no run.

A registered dataset is looked up by name when a run starts *and when it is resumed*: a new process must
register it again (a plug-in module does that on import) before `fedloom resume`.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import inspect
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DatasetError
from ..rng import numpy_rng
from .datasets import Dataset
from .partition import stratified_split

FILE = "file"  # data.dataset for a .npz / .csv file named by data.path
FILE_SUFFIXES = (".npz", ".csv")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "client_train", "client_test", "class_names")

Loader = Callable[..., Any]
REGISTERED: dict[str, Loader] = {}  # name -> loader(data_dir, **options) -> Dataset or arrays


# ---- checks: one line naming the array and the fix ----------------------------------------------------


def _numpy(src: str, what: str, a: Any) -> np.ndarray:
    """numpy view of an array-like (torch tensors detached and moved to the CPU)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.float() if a.dtype == torch.bfloat16 else a  # numpy has no bfloat16
        return a.numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise DatasetError(f"{src}: {what} is not an array ({e})", "pass a numpy array or torch tensor") from None


def _features(src: str, what: str, a: Any, allow_empty: bool = False) -> np.ndarray:
    """Features as uint8 (images, kept compact) or float32, at least 2-D, finite."""
    x = _numpy(src, what, a)
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{src}: {what} holds {x.dtype} values, not numbers",
                           "features must be numeric (int, uint8 or float)")
    if x.ndim < 2:
        raise DatasetError(f"{src}: {what} has shape {x.shape}; expected (samples, features...)",
                           "for one feature per sample use x.reshape(-1, 1)")
    if len(x) == 0 and not allow_empty:
        raise DatasetError(f"{src}: {what} is empty (shape {x.shape})", "give at least one sample")
    if 0 in x.shape[1:]:
        raise DatasetError(f"{src}: {what} has shape {x.shape}: samples without features")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            n = int(bad.sum())
            raise DatasetError(f"{src}: {what} has NaN or infinite values in {n} sample{'s' * (n > 1)} (the first is "
                               f"sample {int(np.argmax(bad))})", "drop or impute those samples first")
    return np.array(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32, order="C", copy=True)


def _integers(src: str, what: str, a: Any, n: int, n_name: str) -> np.ndarray:
    """A 1-D int64 array of `n` whole numbers (float arrays holding whole numbers are accepted)."""
    v = _numpy(src, what, a)
    if v.ndim != 1:
        raise DatasetError(f"{src}: {what} has shape {v.shape}; expected one value per sample, shape ({n},)",
                           "flatten it, e.g. y.reshape(-1)")
    if len(v) != n:
        raise DatasetError(f"{src}: {what} has {len(v)} values but {n_name} has {n} samples",
                           "give exactly one value per sample")
    if v.dtype.kind == "f":
        bad = ~(np.isfinite(v) & (v == np.round(v))) if len(v) else np.zeros(0, bool)
        if bad.any():
            i = int(np.argmax(bad))
            raise DatasetError(f"{src}: {what} must hold integers; value {v[i].item()!r} at position {i} is not",
                               "labels and client ids are whole numbers")
    elif v.dtype.kind not in "biu":
        raise DatasetError(f"{src}: {what} holds {v.dtype} values, not integers",
                           "map them to 0..C-1 first, e.g. np.unique(y, return_inverse=True)[1]")
    return v.astype(np.int64)


def _check_labels(src: str, ys: dict[str, np.ndarray], num_classes: int | None) -> int:
    """The number of classes (given, or 1 + the largest label); every label in 0..C-1."""
    if num_classes is None:
        num_classes = max((int(y.max()) for y in ys.values() if len(y)), default=0) + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DatasetError(f"{src}: num_classes must be an integer, not {type(num_classes).__name__}")
    for what, y in ys.items():
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DatasetError(f"{src}: {what} holds label {int(y[i])} (position {i}), outside 0..{num_classes - 1}",
                               "labels must be 0..num_classes-1: remap them (np.unique(y, return_inverse=True)) "
                               "or pass num_classes")
    if num_classes < 2:
        raise DatasetError(f"{src}: the labels hold a single class (num_classes = {num_classes})",
                           "a classifier needs at least two classes")
    return int(num_classes)


def _client_ids(src: str, what: str, a: Any, n: int, n_name: str) -> np.ndarray:
    ids = _integers(src, what, a, n, n_name)
    if len(ids) and ids.min() < -1:
        raise DatasetError(f"{src}: {what} holds {int(ids.min())}; client ids are 0, 1, ... (-1: held by no client)")
    return ids


def _index_lists(src: str, what: str, lists: Any, n: int, allow_overlap: bool) -> list[np.ndarray]:
    """Sorted int64 index arrays into n samples; disjoint unless `allow_overlap`."""
    if isinstance(lists, np.ndarray | torch.Tensor) or not isinstance(lists, Sequence) or not len(lists):
        raise DatasetError(f"{src}: {what} must be a non-empty list with one index list per client")
    out = []
    for k, idx in enumerate(lists):
        v = _numpy(src, f"{what}[{k}]", idx)
        if v.ndim != 1 or (len(v) and v.dtype.kind not in "iu"):
            raise DatasetError(f"{src}: {what}[{k}] must be a flat list of integer sample indices")
        v = v.astype(np.int64)
        if len(v) and (v.min() < 0 or v.max() >= n):
            bad = int(v[(v < 0) | (v >= n)][0])
            raise DatasetError(f"{src}: {what}[{k}] holds index {bad}, outside 0..{n - 1}",
                               "indices point into the training (or test) arrays")
        v = np.sort(v)
        if len(v) > 1 and (np.diff(v) == 0).any():
            raise DatasetError(f"{src}: {what}[{k}] lists sample {int(v[np.argmax(np.diff(v) == 0)])} twice")
        out.append(v)
    if not allow_overlap:
        counts = np.bincount(np.concatenate(out), minlength=n) if n else np.zeros(0, np.int64)
        if (counts > 1).any():
            i = int(np.argmax(counts > 1))
            holders = [k for k, v in enumerate(out) if np.isin(i, v)]
            raise DatasetError(f"{src}: {what}: sample {i} is given to clients {holders[0]} and {holders[1]}",
                               "clients' samples must not overlap; pass allow_overlap=True if they may")
    return out


def _same_samples(src: str, ref: np.ndarray, x: np.ndarray, name: str = "x_test", ref_name: str = "x_train") -> None:
    """`x` holds the same kind of sample as `ref`: shape and uint8-ness (uint8 is normalised, floats are not)."""
    if x.shape[1:] != ref.shape[1:]:
        raise DatasetError(f"{src}: {name} samples have shape {x.shape[1:]} but {ref_name} samples have "
                           f"{ref.shape[1:]}", "train and test must hold the same kind of sample")
    if (x.dtype == np.uint8) != (ref.dtype == np.uint8):
        raise DatasetError(f"{src}: {ref_name} is {ref.dtype} but {name} is {x.dtype}",
                           "give both the same dtype (uint8 images are normalised per channel, floats are not)")


# ---- building the Dataset -----------------------------------------------------------------------------


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (axis 1) mean and std of uint8 data scaled to [0, 1], exactly, from 256-bin histograms
    (no float copy of the images)."""
    levels = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        h = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        m = float(h @ levels / h.sum())
        var = float(h @ (levels - m) ** 2 / h.sum())
        means.append(m)
        stds.append(var**0.5 if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _float_tuple(src: str, what: str, v: Any, channels: int) -> tuple[float, ...]:
    t = tuple(float(a) for a in (v if isinstance(v, Sequence | np.ndarray) else [v]))
    if len(t) not in (1, channels) or not all(np.isfinite(t)) or (what == "std" and min(t) <= 0):
        raise DatasetError(f"{src}: {what} must be 1 or {channels} finite numbers" +
                           (" > 0" if what == "std" else "") + f", got {v!r}")
    return t


def _split(src: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, test_fraction: Any, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices: `test_fraction` of each client's samples (of each class, without clients) to test."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float) or not 0 < test_fraction < 1:
        raise DatasetError(f"{src}: test_fraction must be a number between 0 and 1, got {test_fraction!r}")
    tr, te = stratified_split(groups if groups is not None else y, test_fraction, numpy_rng(seed, "split", "custom"))
    if not len(te):
        raise DatasetError(f"{src}: holding out test_fraction = {test_fraction} of {len(y)} samples leaves no test "
                           "sample", "raise test_fraction, or give test arrays")
    return tr, te


def _dataset(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, num_classes: int,
             *, groups: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
             lists: tuple[list[np.ndarray] | None, list[np.ndarray] | None] = (None, None),
             class_names: Any = None, mean: Any = None, std: Any = None, standardize: bool = False,
             source: str = "") -> Dataset:
    """The Dataset of checked arrays: uint8 normalised per channel (given or train statistics), floats as they
    are or standardised with train statistics."""
    src = f"dataset {name!r}"
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise DatasetError(f"{src}: {len(class_names)} class_names for {num_classes} classes")
    if not isinstance(standardize, bool):
        raise DatasetError(f"{src}: standardize must be True or False, not {standardize!r}")
    if x_tr.dtype == np.uint8:
        channels = x_tr.shape[1]
        m, s = _channel_stats(x_tr)
        mean = _float_tuple(src, "mean", mean, channels) if mean is not None else m
        std = _float_tuple(src, "std", std, channels) if std is not None else s
    else:
        if mean is not None or std is not None:
            raise DatasetError(f"{src}: mean/std normalise uint8 images; these features are {x_tr.dtype}",
                               "use standardize=True for float features")
        if standardize:
            mu, sd = x_tr.mean(0), x_tr.std(0)
            sd[sd == 0] = 1.0
            x_tr, x_te = ((x_tr - mu) / sd).astype(np.float32), ((x_te - mu) / sd).astype(np.float32)
    return Dataset(name, torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                   torch.from_numpy(y_te), num_classes, mean if x_tr.dtype == np.uint8 else None,
                   std if x_tr.dtype == np.uint8 else None, groups_train=groups[0], groups_test=groups[1],
                   source=source, class_names=class_names or [str(i) for i in range(num_classes)],
                   client_indices=lists[0], test_client_indices=lists[1])


def from_arrays(x_train: Any, y_train: Any, x_test: Any = None, y_test: Any = None, *, name: str = "arrays",
                num_classes: int | None = None, client_ids: Any = None, test_client_ids: Any = None,
                client_indices: Sequence[Any] | None = None, test_client_indices: Sequence[Any] | None = None,
                allow_overlap: bool = False, class_names: Sequence[str] | None = None, test_fraction: float = 0.2,
                seed: int = 0, standardize: bool = False, mean: Any = None, std: Any = None,
                source: str = "arrays") -> Dataset:
    """A Dataset from numpy arrays or torch tensors: images (N, C, H, W) uint8 or float, tabular (N, F).

    Labels are integers 0..num_classes-1 (num_classes defaults to 1 + the largest label). Without test
    arrays, `test_fraction` of the samples (stratified by client when `client_ids` are given, else by
    class; seeded by `seed`) become the test split. Clients, for `data.partition = "given"` / `"natural"`:
    `client_ids` (one id per training sample, -1 for none) with optional `test_client_ids`, or
    `client_indices` (one index list per client into x_train; disjoint unless `allow_overlap`) with optional
    `test_client_indices` (into x_test). uint8 data are scaled to [0, 1] and normalised per channel
    (axis 1) by `mean`/`std`, by default the training split's; float features are used as they are, or
    standardised with training statistics when `standardize`.
    """
    src = f"dataset {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"name must be a non-empty string, not {name!r}")
    if (x_test is None) != (y_test is None):
        raise DatasetError(f"{src}: give both x_test and y_test, or neither (then test_fraction is held out)")
    if client_ids is not None and client_indices is not None:
        raise DatasetError(f"{src}: give clients as client_ids or as client_indices, not both")
    if (test_client_ids is not None and client_ids is None) or (test_client_indices is not None
                                                                and client_indices is None):
        raise DatasetError(f"{src}: test clients need training clients of the same kind",
                           "pass client_ids with test_client_ids, client_indices with test_client_indices")
    x_tr = _features(src, "x_train", x_train)
    y_tr = _integers(src, "y_train", y_train, len(x_tr), "x_train")
    g_tr = _client_ids(src, "client_ids", client_ids, len(x_tr), "x_train") if client_ids is not None else None
    if x_test is None:
        if client_indices is not None:
            raise DatasetError(f"{src}: client_indices point into x_train, so test arrays must be given too",
                               "pass x_test and y_test, or give clients as client_ids")
        tr, te = _split(src, x_tr, y_tr, g_tr, test_fraction, seed)
        x_tr, x_te, y_tr, y_te = x_tr[tr], x_tr[te], y_tr[tr], y_tr[te]
        g_tr, g_te = (g_tr[tr], g_tr[te]) if g_tr is not None else (None, None)
    else:
        x_te = _features(src, "x_test", x_test)
        _same_samples(src, x_tr, x_te)
        y_te = _integers(src, "y_test", y_test, len(x_te), "x_test")
        g_te = _client_ids(src, "test_client_ids", test_client_ids, len(x_te), "x_test") \
            if test_client_ids is not None else None
    c = _check_labels(src, {"y_train": y_tr, "y_test": y_te}, num_classes)
    lists = (None, None)
    if client_indices is not None:
        if not isinstance(allow_overlap, bool):
            raise DatasetError(f"{src}: allow_overlap must be True or False, not {allow_overlap!r}")
        lists = (_index_lists(src, "client_indices", client_indices, len(x_tr), allow_overlap),
                 _index_lists(src, "test_client_indices", test_client_indices, len(x_te), allow_overlap)
                 if test_client_indices is not None else None)
        if lists[1] is not None and len(lists[1]) != len(lists[0]):
            raise DatasetError(f"{src}: {len(lists[0])} clients in client_indices but {len(lists[1])} in "
                               "test_client_indices", "give one test index list per client (empty lists allowed)")
    return _dataset(name, x_tr, y_tr, x_te, y_te, c, groups=(g_tr, g_te), lists=lists, class_names=class_names,
                    mean=mean, std=std, standardize=standardize, source=source)


def _pair(src: str, what: str, pair: Any, allow_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise DatasetError(f"{src}: {what} must be an (x, y) pair")
    x = _features(src, f"{what} x", pair[0], allow_empty=allow_empty)
    return x, _integers(src, f"{what} y", pair[1], len(x), f"{what} x")


def from_client_arrays(clients: Sequence[Any], test: Any = None, *, name: str = "clients",
                       num_classes: int | None = None, class_names: Sequence[str] | None = None,
                       test_fraction: float = 0.2, seed: int = 0, standardize: bool = False, mean: Any = None,
                       std: Any = None, source: str = "per-client arrays") -> Dataset:
    """A Dataset whose clients come with it: `clients[k] = (x_k, y_k)` is client k's training data.

    `test`: one (x, y) pair per client (each client's own test data; empty arrays allowed), or one shared
    (x_test, y_test) pair of arrays (clients' test splits then follow `data.client_test`), or None: each
    client's `test_fraction` is held out as its test data. Use with `data.partition = "natural"` (or
    "given") and `data.num_clients = len(clients)`.
    """
    src = f"dataset {name!r}"
    if isinstance(clients, np.ndarray | torch.Tensor) or not isinstance(clients, Sequence) or not clients:
        raise DatasetError(f"{src}: clients must be a non-empty list of (x, y) pairs, one per client")
    pairs = [_pair(src, f"client {k}", p, allow_empty=False) for k, p in enumerate(clients)]
    for k, (x, _) in enumerate(pairs):
        _same_samples(src, pairs[0][0], x, f"client {k}'s x", "client 0's x")
    x_tr = np.concatenate([x for x, _ in pairs])
    y_tr = np.concatenate([y for _, y in pairs])
    g_tr = np.repeat(np.arange(len(pairs), dtype=np.int64), [len(y) for _, y in pairs])
    per_client = isinstance(test, tuple | list) and len(test) > 0 and all(isinstance(t, tuple | list) for t in test)
    if test is None:
        tr, te = _split(src, x_tr, y_tr, g_tr, test_fraction, seed)
        x_tr, x_te, y_tr, y_te, g_tr, g_te = x_tr[tr], x_tr[te], y_tr[tr], y_tr[te], g_tr[tr], g_tr[te]
    elif per_client:
        if len(test) != len(pairs):
            raise DatasetError(f"{src}: {len(pairs)} clients but {len(test)} test pairs",
                               "give one (x, y) test pair per client, or one shared (x_test, y_test)")
        tests = [_pair(src, f"client {k}'s test", p, allow_empty=True) for k, p in enumerate(test)]
        for k, (x, _) in enumerate(tests):
            _same_samples(src, x_tr, x, f"client {k}'s test x", "client 0's x")
        x_te, y_te = np.concatenate([x for x, _ in tests]), np.concatenate([y for _, y in tests])
        g_te = np.repeat(np.arange(len(tests), dtype=np.int64), [len(y) for _, y in tests])
        if not len(y_te):
            raise DatasetError(f"{src}: every client's test arrays are empty", "give some test data, or test=None")
    else:
        x_te, y_te = _pair(src, "test", test, allow_empty=False)
        _same_samples(src, x_tr, x_te, "test x", "client 0's x")
        g_te = None
    c = _check_labels(src, {"y_train": y_tr, "y_test": y_te}, num_classes)
    return _dataset(name, x_tr, y_tr, x_te, y_te, c, groups=(g_tr, g_te), class_names=class_names, mean=mean,
                    std=std, standardize=standardize, source=source)


# ---- files: .npz and .csv -----------------------------------------------------------------------------


def _file_option(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:  # the config named a bad value: a configuration error (exit 2)
        raise ConfigError(f"data: dataset option {name} = {value!r} is invalid: expected {expected}")


def load_file(path: str | os.PathLike, seed: int = 0, *, label: str = "label", client: str | None = None,
              test_path: str | None = None, test_fraction: float = 0.2, standardize: bool = False) -> Dataset:
    """A Dataset from a `.npz` or `.csv` file (docs/extending.md, "Your own data").

    `.npz`: arrays x_train, y_train and optionally x_test, y_test (else `test_fraction` is held out),
    client_train / client_test (per-sample client ids) and class_names. `.csv`: a header row; the column
    `label` holds the class (integers 0..C-1, or names, numbered in sorted order), the column `client` (if
    set) per-row client ids, every other column a numeric feature; the test split is the file `test_path`
    (same columns; relative to the first file's folder) or `test_fraction` of the rows.
    """
    _file_option("label", label, isinstance(label, str) and bool(label), "a column name")
    _file_option("client", client, client is None or isinstance(client, str) and bool(client), "a column name")
    _file_option("test_path", test_path, test_path is None or isinstance(test_path, str) and bool(test_path),
                 "a file path")
    _file_option("test_fraction", test_fraction, not isinstance(test_fraction, bool) and
                 isinstance(test_fraction, int | float) and 0 < test_fraction < 1, "a number between 0 and 1")
    _file_option("standardize", standardize, isinstance(standardize, bool), "true or false")
    if path is None:
        raise ConfigError("data.dataset = 'file' needs data.path", "set data.path to a .npz or .csv file")
    p = Path(path)
    if p.suffix not in FILE_SUFFIXES:
        raise ConfigError(f"data.path {p} is neither .npz nor .csv", "save the data as .npz (numpy) or .csv")
    _exists(p, "data.path")
    if p.suffix == ".npz":
        for opt, value in (("label", label != "label"), ("client", client), ("test_path", test_path)):
            if value:
                raise ConfigError(f"data.options.{opt} is for .csv files; {p.name} is a .npz",
                                  "a .npz names its arrays: x_train, y_train, x_test, y_test, client_train, "
                                  "client_test")
        return _load_npz(p, seed, test_fraction, standardize)
    test = p.parent / Path(test_path).expanduser() if test_path else None
    return _load_csv(p, test, seed, label, client, test_fraction, standardize)


def _exists(p: Path, what: str) -> None:
    if not p.is_file():
        raise DatasetError(f"{what} {p} {'is not a file' if p.exists() else 'does not exist'}",
                           "check the path (relative paths start from the directory you run fedloom in)")


def _load_npz(p: Path, seed: int, test_fraction: float, standardize: bool) -> Dataset:
    if not zipfile.is_zipfile(p):  # np.load would try it as a pickle
        raise DatasetError(f"{p} is not a readable .npz file (not a zip archive)", "write it with np.savez")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle, which could run code
        raise DatasetError(f"{p}: holds Python objects ({e})", "save plain numeric arrays with np.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"{p} is not a readable .npz file ({e})", "write it with np.savez") from None
    unknown = [k for k in arrays if k not in NPZ_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0].lower(), NPZ_KEYS, n=1)
        raise DatasetError(f"{p}: unknown array {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                           f"a .npz for fedloom holds {', '.join(NPZ_KEYS)}")
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or ("x_test" in arrays) != ("y_test" in arrays):
        missing = missing or [k for k in ("x_test", "y_test") if k not in arrays]
        raise DatasetError(f"{p}: no array {missing[0]!r} (found: {', '.join(arrays) or 'none'})",
                           "save x_train, y_train and, optionally, x_test, y_test: np.savez(path, x_train=..., ...)")
    names = arrays.get("class_names")
    return _in_file(p, lambda: from_arrays(
        arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"), name=FILE,
        client_ids=arrays.get("client_train"), test_client_ids=arrays.get("client_test"),
        class_names=None if names is None else [str(n) for n in names], test_fraction=test_fraction, seed=seed,
        standardize=standardize, source=str(p)))


def _in_file(p: Path, make: Callable[[], Dataset]) -> Dataset:
    """Checks of a file's arrays name the file (rather than the dataset 'file')."""
    try:
        return make()
    except DatasetError as e:
        raise DatasetError(f"{p}: {e.message.removeprefix(f'dataset {FILE!r}: ')}", e.hint) from None


def _read_csv(p: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p} is not UTF-8 text (byte {e.start})", "save the CSV as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DatasetError(f"{p} is not a readable CSV file ({e})") from None
    if len(rows) < 2:
        raise DatasetError(f"{p}: needs a header row and at least one data row, found {len(rows)} rows")
    header = [h.strip() for h in rows[0]]
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DatasetError(f"{p}: row {i} has {len(r)} fields but the header has {len(header)}")
    return header, rows[1:]


def _numeric(p: Path, column: str, values: list[str], row_offset: int = 2) -> np.ndarray:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise DatasetError(f"{p}: column {column!r} is not numeric (row {i + row_offset}: {v.strip()!r})",
                                   "features must be numbers: encode or drop that column") from None
        raise


def _csv_columns(p: Path, header: list[str], rows: list[list[str]], label: str, client: str | None
                 ) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """(features float64 (n, F), raw label strings, client ids or None) of one CSV file."""
    for col in (label, client):
        if col is not None and col not in header:
            close = difflib.get_close_matches(col, header, n=1)
            raise DatasetError(f"{p}: no column {col!r} (columns: {', '.join(header)})",
                               f"did you mean {close[0]!r}? set data.options.label / client" if close
                               else "name the label column with data.options.label")
    cols = list(zip(*rows, strict=True))
    feats = [h for h in header if h not in (label, client)]
    if not feats:
        raise DatasetError(f"{p}: no feature columns besides {label!r}")
    x = np.stack([_numeric(p, h, list(cols[header.index(h)])) for h in feats], axis=1)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DatasetError(f"{p}: row {int(np.argmax(bad)) + 2} has a missing, NaN or infinite feature",
                           "fill or drop incomplete rows")
    ids = _numeric(p, client, list(cols[header.index(client)])) if client else None
    return x, [v.strip() for v in cols[header.index(label)]], ids


def _label_codes(labels: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as they are; anything else numbered in sorted order (the names become class_names)."""
    try:
        values = np.array([float(v) for v in labels])
        if np.all(np.isfinite(values) & (values == np.round(values))):
            return values.astype(np.int64), None
    except ValueError:
        pass
    names, codes = np.unique(np.array(labels, dtype=str), return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def _load_csv(p: Path, test: Path | None, seed: int, label: str, client: str | None, test_fraction: float,
              standardize: bool) -> Dataset:
    header, rows = _read_csv(p)
    x, y_raw, ids = _csv_columns(p, header, rows, label, client)
    x_te = y_te = ids_te = None
    if test is not None:
        _exists(test, "data.options.test_path")
        t_header, t_rows = _read_csv(test)
        if sorted(t_header) != sorted(header):
            raise DatasetError(f"{test}: columns differ from {p.name}'s ({', '.join(t_header)} vs "
                               f"{', '.join(header)})", "the test file needs the same columns")
        t_rows = [[r[t_header.index(h)] for h in header] for r in t_rows]  # the train file's column order
        x_te, y_te_raw, ids_te = _csv_columns(test, header, t_rows, label, client)
        codes, names = _label_codes(y_raw + y_te_raw)
        y, y_te = codes[: len(y_raw)], codes[len(y_raw):]
    else:
        y, names = _label_codes(y_raw)
    return _in_file(p, lambda: from_arrays(
        x, y, x_te, y_te, name=FILE, client_ids=ids, test_client_ids=ids_te, class_names=names,
        test_fraction=test_fraction, seed=seed, standardize=standardize,
        source=str(p) + (f" + {test}" if test is not None else "")))


# ---- datasets registered by name ----------------------------------------------------------------------


def register_dataset(name: str, loader: Loader | Dataset) -> None:
    """Make `data.dataset = name` load `loader(data_dir, **data.options)`.

    The loader returns a `Dataset` (e.g. from `from_arrays`) or arrays `(x_train, y_train, x_test, y_test)`
    (or a dict of them), which are checked like `from_arrays`' input. It may also take `seed` (the run's)
    and `download` (data.download). A Dataset instead of a loader is served as it is. Registering a name
    again replaces it; built-in names cannot be taken. Registrations live in this process: register again
    (or load the plug-in module) before resuming a run in a new process.
    """
    from .datasets import DATASETS

    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"a dataset name must be a non-empty string without surrounding spaces, not {name!r}")
    if name in DATASETS or name == FILE:
        raise ConfigError(f"'{name}' is a built-in dataset name", "register yours under another name")
    if isinstance(loader, Dataset):
        ds = loader
        loader = lambda data_dir=None: ds  # noqa: E731
    if not callable(loader):
        raise ConfigError(f"register_dataset('{name}', ...) needs a loader function or a Dataset, not "
                          f"{type(loader).__name__}")
    REGISTERED[name] = loader


def load_registered(name: str, data_dir: Any, seed: int, download: bool, **options: Any) -> Dataset:
    """Call the registered loader with the options it takes; check what it returns."""
    loader = REGISTERED[name]
    params = inspect.signature(loader).parameters
    dir_param = _data_dir_param(params)
    reserved = {dir_param, "seed", "download"}
    named = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    takes_any = any(v.kind is v.VAR_KEYWORD for v in params.values())
    valid = [p for p in named if p not in reserved]
    for key in options:
        if key in reserved or (key not in valid and not takes_any):
            close = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(f"data: unknown option {key!r} for dataset {name!r}",
                              (f"did you mean {close[0]!r}? " if close else "")
                              + (f"valid options: {', '.join(valid)}" if valid else "it takes no options"))
    given = {k: v for k, v in ((dir_param, data_dir), ("seed", seed), ("download", download)) if k in named}
    try:
        out = loader(**given, **options)
    except (DatasetError, ConfigError):
        raise
    except Exception as e:  # the user's code: say whose, keep the traceback for --debug
        raise DatasetError(f"the loader of dataset '{name}' failed: {type(e).__name__}: {e}") from e
    return _as_dataset(name, out, f"registered loader {getattr(loader, '__qualname__', type(loader).__name__)}")


def _data_dir_param(params: Any) -> str | None:
    """The parameter that receives data.data_dir: `data_dir`, else the first positional one (`loader(data_dir,
    **options)`, whatever it is called); None when the loader takes no such parameter."""
    if "data_dir" in params:
        return "data_dir"
    first = next(iter(params.values()), None)
    if first is not None and first.kind is first.POSITIONAL_OR_KEYWORD and first.name not in ("seed", "download"):
        return first.name
    return None


def _as_dataset(name: str, out: Any, who: str) -> Dataset:
    """What a loader returned, as a Dataset recorded under the registered name."""
    if isinstance(out, Dataset):
        return out if out.name == name else dataclasses.replace(out, name=name)
    if isinstance(out, dict):
        accepted = [p for p in inspect.signature(from_arrays).parameters if p not in ("name", "source")]
        unknown = [k for k in out if k not in accepted]
        if unknown or not {"x_train", "y_train"} <= set(out):
            raise DatasetError(f"the loader of dataset '{name}' returned a dict with keys {', '.join(map(str, out))}",
                               f"keys are those of fedloom.data.from_arrays: {', '.join(accepted)}")
        return from_arrays(**out, name=name, source=who)
    if isinstance(out, tuple | list) and len(out) in (2, 4):
        return from_arrays(*out, name=name, source=who)
    raise DatasetError(f"the loader of dataset '{name}' returned {type(out).__name__}",
                       "return a Dataset (fedloom.data.from_arrays) or (x_train, y_train, x_test, y_test)")
