"""Datasets loaded from their official files (or bundled / generated), as tensors in memory.

Image sets stay uint8 (N, C, H, W): a quarter of the memory of float32, and clients index them without
copies; `Dataset.features` turns a batch into normalised float32 when it is used. Tabular and synthetic
sets are float32 (N, F) already standardised.
"""

from __future__ import annotations

import difflib
import inspect
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DatasetError
from ..rng import numpy_rng
from . import sources, synthetic
from .idx import read_idx
from .partition import stratified_split


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W) for image sets; float32 (N, F) for tabular/synthetic
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None  # per-channel normalisation for uint8 images
    std: tuple[float, ...] | None = None
    groups_train: np.ndarray | None = None  # natural owner id per sample (Synthetic devices, client_ids)
    groups_test: np.ndarray | None = None
    source: str = ""  # where the files were found, for the report
    class_names: list[str] | None = None
    client_indices: list[np.ndarray] | None = None  # per-client index lists into x_train (partition "given")
    test_client_indices: list[np.ndarray] | None = None  # ...and into x_test

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Model input for a batch: float32; uint8 images scaled to [0, 1] and normalised per channel."""
        if x.dtype != torch.uint8:
            return x.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over channels of (N, C, H, W)
        mean = torch.tensor(self.mean or (0.0,), device=x.device).view(shape)
        std = torch.tensor(self.std or (1.0,), device=x.device).view(shape)
        return (x.float().div_(255) - mean) / std


DATASETS = ("fashion-mnist", "mnist", "cifar10", "digits", "breast-cancer", "synthetic")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz")
_CIFAR_DIR = "cifar-10-batches-py"
_FIX = "delete it and run again to re-download, or put the official file there"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _option(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"data: dataset option {name} = {value!r} is invalid: expected {expected}")


def _check_verify(verify: Any) -> None:
    _option("verify", verify, isinstance(verify, bool), "true or false")


# --- IDX: MNIST, Fashion-MNIST -------------------------------------------------------------------------


def _idx_dataset(name: str, data_dir: Any, download: bool, verify: bool, mean: float, std: float,
                 class_names: list[str]) -> Dataset:
    _check_verify(verify)
    remotes = {r.name: r for r in sources.REMOTES[name]}
    paths = [sources.locate(name, remotes[f], data_dir, download, verify) for f in _IDX_FILES]
    arrays = [read_idx(p) for p in paths]
    for (images, labels), (pi, pl) in ((arrays[:2], paths[:2]), (arrays[2:], paths[2:])):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DatasetError(f"{pi} holds {images.dtype} {images.shape}, not uint8 28x28 images",
                               hint="put the official file there")
        if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= 10:
            raise DatasetError(f"{pl} does not hold {len(images)} labels in 0..9 for {pi}",
                               hint="put the official files there")
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(a) for a in arrays)
    return Dataset(name, x_tr.unsqueeze(1), y_tr.long(), x_te.unsqueeze(1), y_te.long(), 10, (mean,), (std,),
                   source=", ".join(dict.fromkeys(str(p.parent) for p in paths)), class_names=class_names)


def _fashion_mnist(data_dir: Any, seed: int, download: bool, verify: bool = True) -> Dataset:
    return _idx_dataset("fashion-mnist", data_dir, download, verify, 0.2860, 0.3530, FASHION_CLASSES)


def _mnist(data_dir: Any, seed: int, download: bool, verify: bool = True) -> Dataset:
    return _idx_dataset("mnist", data_dir, download, verify, 0.1307, 0.3081, [str(i) for i in range(10)])


# --- CIFAR-10: python pickle batches -------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a doctored batch file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(raw: bytes, where: str, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64) of one batch, after checking its structure."""
    fix = "delete it and run again to re-download, or put the official CIFAR-10 python version there"
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise DatasetError(f"{where} is not a readable CIFAR-10 batch ({type(e).__name__}: {e})",
                           hint=fix) from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get(b"labels", []) if isinstance(batch, dict) else [])
    rows = 10000 if strict else (len(data) if isinstance(data, np.ndarray) and data.ndim == 2 else -1)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (rows, 3072)):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{where}: b'data' should be uint8 ({rows if rows >= 0 else 'n'}, 3072), "
                           f"found {found}", hint=fix)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or \
            labels.max(initial=0) > 9:
        raise DatasetError(f"{where}: b'labels' should be {rows} integers in 0..9", hint=fix)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar_tar(path: Path, strict: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tf:
            for member in tf:  # sequential: a .tar.gz cannot seek back cheaply
                head, _, base = member.name.rpartition("/")
                if head.endswith(_CIFAR_DIR) and base in _CIFAR_BATCHES and member.isfile():
                    out[base] = _cifar_batch(tf.extractfile(member).read(), f"{path}:{member.name}", strict)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path} is not a readable .tar.gz ({e})", hint=_FIX) from e
    missing = [b for b in _CIFAR_BATCHES if b not in out]
    if missing:
        raise DatasetError(f"{path} lacks {_CIFAR_DIR}/{', '.join(missing)}", hint=_FIX)
    return out


def _read_cifar_dir(path: Path, strict: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    missing = [b for b in _CIFAR_BATCHES if not (path / b).is_file()]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)}",
                           hint="extract the official cifar-10-python.tar.gz there, or remove the folder")
    return {b: _cifar_batch((path / b).read_bytes(), str(path / b), strict) for b in _CIFAR_BATCHES}


def _find_cifar(data_dir: Any, verify: bool) -> Path | None:
    """The first archive (checked) or extracted batch folder in the search dirs."""
    remote = sources.REMOTES["cifar10"][0]
    for d in sources.search_dirs("cifar10", data_dir):
        if (d / remote.name).is_file():
            return sources.check_file(d / remote.name, remote, verify)
        if (d / _CIFAR_DIR).is_dir():
            return d / _CIFAR_DIR
    return None


def _cifar10(data_dir: Any, seed: int, download: bool, verify: bool = True) -> Dataset:
    """Extracted batches have no published hash, so their structure is checked strictly instead
    (10000 rows a batch) unless `verify=False` (small test copies)."""
    _check_verify(verify)
    path = _find_cifar(data_dir, verify) or sources.locate("cifar10", sources.REMOTES["cifar10"][0], data_dir,
                                                           download, verify)
    batches = _read_cifar_dir(path, verify) if path.is_dir() else _read_cifar_tar(path, verify)
    train = [batches[b] for b in _CIFAR_BATCHES[:5]]
    x_tr = torch.from_numpy(np.concatenate([x for x, _ in train]))
    y_tr = torch.from_numpy(np.concatenate([y for _, y in train]))
    x_te, y_te = (torch.from_numpy(a) for a in batches["test_batch"])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                   source=str(path), class_names=CIFAR10_CLASSES)


# --- scikit-learn's bundled tabular sets ---------------------------------------------------------------


def _standardised(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardise with train statistics only, so nothing about the test split leaks into training."""
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0  # constant features (digits' blank border pixels) stay 0
    return ((x - mean) / std).astype(np.float32)


def _sklearn(name: str, bunch: Any, seed: int, test_fraction: float, class_names: list[str]) -> Dataset:
    import sklearn

    _option("test_fraction", test_fraction, isinstance(test_fraction, int | float) and 0 < test_fraction < 1,
            "a number between 0 and 1")
    x, y = np.asarray(bunch.data, np.float64), np.asarray(bunch.target, np.int64)
    tr, te = stratified_split(y, test_fraction, numpy_rng(seed, "split", name))
    x = torch.from_numpy(_standardised(x, tr))
    yt = torch.from_numpy(y)
    return Dataset(name, x[tr], yt[tr], x[te], yt[te], len(class_names),
                   source=f"bundled with scikit-learn {sklearn.__version__}", class_names=class_names)


def _digits(data_dir: Any, seed: int, download: bool, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits

    return _sklearn("digits", load_digits(), seed, test_fraction, [str(i) for i in range(10)])


def _breast_cancer(data_dir: Any, seed: int, download: bool, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return _sklearn("breast-cancer", bunch, seed, test_fraction, [str(n) for n in bunch.target_names])


# --- FedProx Synthetic(alpha, beta) --------------------------------------------------------------------


def _synthetic(data_dir: Any, seed: int, download: bool, alpha: float = 1.0, beta: float = 1.0,
               num_devices: int = 30, dimension: int = 60, num_classes: int = 10, iid: bool = False,
               test_fraction: float = 0.2) -> Dataset:
    """Samples grouped by device (`groups_*`); each device's samples split `test_fraction` to test."""
    number = (int, float)
    _option("alpha", alpha, isinstance(alpha, number) and alpha >= 0, "a number >= 0")
    _option("beta", beta, isinstance(beta, number) and beta >= 0, "a number >= 0")
    _option("num_devices", num_devices, isinstance(num_devices, int) and num_devices >= 1, "an integer >= 1")
    _option("dimension", dimension, isinstance(dimension, int) and dimension >= 1, "an integer >= 1")
    _option("num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 2, "an integer >= 2")
    _option("iid", iid, isinstance(iid, bool), "true or false")
    _option("test_fraction", test_fraction, isinstance(test_fraction, number) and 0 < test_fraction < 1,
            "a number between 0 and 1")
    x, y, device = synthetic.generate(numpy_rng(seed, "synthetic"), alpha, beta, num_devices, dimension,
                                      num_classes, iid)
    tr, te = stratified_split(device, test_fraction, numpy_rng(seed, "synthetic-split"))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    label = "iid" if iid else f"alpha={alpha:g}, beta={beta:g}"
    source = f"generated: Synthetic({label}), {num_devices} devices, seed {seed}"
    return Dataset("synthetic", xt[tr], yt[tr], xt[te], yt[te], num_classes, groups_train=device[tr],
                   groups_test=device[te], source=source, class_names=[str(i) for i in range(num_classes)])


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": _fashion_mnist, "mnist": _mnist, "cifar10": _cifar10, "digits": _digits,
    "breast-cancer": _breast_cancer, "synthetic": _synthetic,
}


def known_datasets() -> list[str]:
    """Every name `data.dataset` accepts: the built-in sets, "file" (data.path) and the registered ones."""
    from .custom import FILE, REGISTERED

    return [*_LOADERS, FILE, *REGISTERED]


def unknown_dataset(name: str) -> str:
    """One line for a name no loader has: the closest names, and how a registered one comes back."""
    known = known_datasets()
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown dataset {name!r} (did you mean {close[0]!r}?)"
    return (f"unknown dataset {name!r} (datasets: {', '.join(known)}; data.path reads a .npz or .csv file; a "
            "dataset registered with fedloom.register_dataset must be registered again in every new process)")


def _check_options(name: str, loader: Callable[..., Any], options: dict[str, Any], reserved: tuple[str, ...]) -> None:
    valid = [p for p in inspect.signature(loader).parameters if p not in reserved]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(f"data: unknown option {key!r} for dataset {name!r}",
                              ((f"did you mean {close[0]!r}? " if close else "")
                               + (f"valid options: {', '.join(valid)}" if valid else "it takes no options")))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0, download: bool = True,
                 path: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load `name`: one of DATASETS, "file" (the .npz / .csv at `path`) or a registered dataset. Options:
    `verify` (file sets; False trusts local files whose hash is unknown, their structure is still checked),
    `test_fraction` (digits, breast-cancer, synthetic, file), synthetic's `alpha`, `beta`, `num_devices`,
    `dimension`, `num_classes`, `iid`, and file's `label`, `client`, `test_path`, `standardize`."""
    from . import custom

    if name == custom.FILE:
        _check_options(name, custom.load_file, options, ("path", "seed"))
        return custom.load_file(path, seed, **options)
    if path is not None:
        raise ConfigError(f"data: a path ({path}) is read only by the dataset 'file', not {name!r}")
    if name in custom.REGISTERED and name not in _LOADERS:
        return custom.load_registered(name, data_dir, seed, download, **options)
    loader = _LOADERS.get(name)
    if loader is None:
        ranked = difflib.get_close_matches(name, known_datasets(), n=len(known_datasets()), cutoff=0.0)
        raise ConfigError(f"data: unknown dataset {name!r}", f"valid names: {', '.join(ranked)}")
    _check_options(name, loader, options, ("data_dir", "seed", "download"))
    return loader(data_dir=data_dir, seed=seed, download=download, **options)


def dataset_status(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(status, where it is / what will happen and how to fix it), without downloading anything."""
    if name in ("digits", "breast-cancer"):
        return "bundled", "bundled with scikit-learn"
    if name == "synthetic":
        return "generated", "generated from the seed (FedProx Synthetic(alpha, beta))"
    if name == "cifar10":
        try:
            path = _find_cifar(data_dir, verify=True)
        except DatasetError as e:
            return "not ready", f"{e.message}; {e.hint}"
        if path is not None:
            return "found", f"{path}{' (extracted: structure checked on load)' if path.is_dir() else ''}"
    if name not in sources.REMOTES:
        raise DatasetError(f"unknown dataset {name!r}", hint=f"valid names: {', '.join(DATASETS)}")
    where, note = sources.status(name, sources.REMOTES[name], data_dir)
    return ("found", str(where)) if where is not None else ("not ready", note)
