"""Loaders read small files in the official formats, and real Fashion-MNIST where it is installed."""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.data import DATASETS, Dataset, dataset_status, load_dataset, sources
from fedloom.data.idx import write_idx
from fedloom.errors import ConfigError, DatasetError

IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    monkeypatch.delenv("FEDLOOM_DOWNLOAD_BASE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [tmp_path / "system"])


def _idx_set(folder: Path, n_train=60, n_test=20, seed=0) -> dict[str, np.ndarray]:
    """Small MNIST-format files: uint8 28x28 images (idx3) and labels (idx1), gzip-compressed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte.gz"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte.gz"] = (np.arange(n) % 10).astype(np.uint8)
    for name, a in arrays.items():
        write_idx(folder / name, a)
    return arrays


def _trust(monkeypatch, dataset: str, folder: Path) -> None:
    """Register the files in `folder` as the official ones (the hashes tests are allowed to patch)."""
    remotes = [sources.RemoteFile(r.name, r.urls, hashlib.sha256((folder / r.name).read_bytes()).hexdigest(),
                                  (folder / r.name).stat().st_size) for r in sources.REMOTES[dataset]]
    monkeypatch.setitem(sources.REMOTES, dataset, remotes)


def _cifar_batches(rows=20, seed=0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {b: {b"batch_label": f"{b} of 6".encode(), b"labels": [int(v) for v in rng.integers(0, 10, rows)],
                b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                b"filenames": [f"img_{i}.png".encode() for i in range(rows)]} for b in BATCHES}


def _cifar_tar(path: Path, batches: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        items = {**{b: pickle.dumps(v, protocol=2) for b, v in batches.items()},
                 "batches.meta": pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)}
        for name, raw in items.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_load_with_trusted_local_files(tmp_path, name):
    arrays = _idx_set(tmp_path / "d")
    ds = load_dataset(name, data_dir=tmp_path / "d", download=False, verify=False)
    assert ds.x_train.shape == (60, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (20, 1, 28, 28) and ds.y_test.dtype == torch.int64
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28) and ds.source == str(tmp_path / "d")
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    assert ds.mean == (mean,) and ds.std == (std,)
    f = ds.features(ds.x_train[:4])
    assert f.dtype == torch.float32
    assert torch.allclose(f, (ds.x_train[:4].float() / 255 - mean) / std)
    if name == "fashion-mnist":
        assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_unverified_files_are_refused_unless_trusted(tmp_path, monkeypatch):
    _idx_set(tmp_path / "d")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    assert str(tmp_path / "d" / "train-images-idx3-ubyte.gz") in e.value.message
    assert "verify = false" in e.value.hint
    _trust(monkeypatch, "mnist", tmp_path / "d")  # the registry route: hash-verified like the real files
    assert len(load_dataset("mnist", data_dir=tmp_path / "d", download=False).y_train) == 60


def test_idx_structure_is_checked_even_when_trusted(tmp_path):
    arrays = _idx_set(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", arrays["train-labels-idx1-ubyte.gz"][:59])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz does not hold 60 labels"):
        load_dataset("mnist", data_dir=tmp_path / "d", download=False, verify=False)
    raw = gzip.decompress((tmp_path / "d" / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    _idx_set(tmp_path / "e")
    (tmp_path / "e" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", data_dir=tmp_path / "e", download=False, verify=False)
    assert str(tmp_path / "e" / "t10k-images-idx3-ubyte.gz") in e.value.message
    assert "truncated" in e.value.message


@pytest.mark.parametrize("layout", ["tar", "extracted"])
def test_cifar10_official_pickle_batches(tmp_path, layout):
    batches = _cifar_batches()
    if layout == "tar":
        _cifar_tar(tmp_path / "d" / "cifar-10-python.tar.gz", batches)
    else:
        folder = tmp_path / "d" / "cifar10" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for b, v in batches.items():
            (folder / b).write_bytes(pickle.dumps(v, protocol=2))
    ds = load_dataset("cifar10", data_dir=tmp_path / "d", download=False, verify=False)
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    # Official layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    row = batches["data_batch_2"][b"data"][3]
    assert torch.equal(ds.x_train[23, 1], torch.from_numpy(row[1024:2048].reshape(32, 32)))
    assert ds.y_train[23] == batches["data_batch_2"][b"labels"][3]
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.class_names[0] == "airplane"
    assert ds.features(ds.x_test[:2]).shape == (2, 3, 32, 32)


def test_cifar10_checks(tmp_path, monkeypatch):
    folder = tmp_path / "d" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, v in _cifar_batches().items():
        (folder / b).write_bytes(pickle.dumps(v, protocol=2))
    # Extracted batches have no published hash: the official sizes are demanded instead.
    with pytest.raises(DatasetError, match=r"should be uint8 \(10000, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load") as e:
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False, verify=False)
    assert str(folder / "data_batch_3") in e.value.message

    _cifar_tar(tmp_path / "t" / "cifar-10-python.tar.gz", {b: v for b, v in _cifar_batches().items()
                                                            if b != "test_batch"})
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "t", download=False, verify=False)
    (tmp_path / "t" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(DatasetError, match="not a readable .tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "t", download=False, verify=False)


def test_digits_and_breast_cancer():
    d = load_dataset("digits", seed=0)
    assert d.x_train.shape[1:] == (64,) and d.x_train.dtype == torch.float32
    assert len(d.y_train) + len(d.y_test) == 1797 and abs(len(d.y_test) - 0.2 * 1797) <= 10
    assert torch.allclose(d.x_train.mean(0), torch.zeros(64), atol=1e-5)  # standardised with train statistics
    assert d.num_classes == 10 and "scikit-learn" in d.source
    tr, te = np.bincount(d.y_train.numpy()), np.bincount(d.y_test.numpy())
    assert np.all(np.abs(te / (tr + te) - 0.2) < 0.02)  # stratified
    again, other = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(again.x_test, d.x_test) and not torch.equal(other.x_test, d.x_test)
    assert len(load_dataset("digits", test_fraction=0.5).y_test) in range(890, 910)
    b = load_dataset("breast-cancer")
    assert b.x_train.shape[1:] == (30,) and len(b.y_train) + len(b.y_test) == 569
    assert b.num_classes == 2 and b.class_names == ["malignant", "benign"]


def test_synthetic_fedprox():
    s = load_dataset("synthetic", seed=0)
    groups = np.concatenate([s.groups_train, s.groups_test])
    sizes = np.bincount(groups)
    assert len(sizes) == 30 and sizes.min() >= 50
    assert s.input_shape == (60,) and s.x_train.dtype == torch.float32 and s.num_classes == 10
    labels = torch.cat([s.y_train, s.y_test])
    assert labels.min() >= 0 and labels.max() <= 9
    assert np.all(np.abs(np.bincount(s.groups_test, minlength=30) - 0.2 * sizes) <= 0.5)  # 80/20 per device
    again, other = load_dataset("synthetic", seed=0), load_dataset("synthetic", seed=1)
    assert torch.equal(again.x_train, s.x_train) and np.array_equal(again.groups_train, s.groups_train)
    assert s.x_train.shape != other.x_train.shape or not torch.equal(s.x_train, other.x_train)
    small = load_dataset("synthetic", num_devices=5, dimension=7, num_classes=3, alpha=0.5, beta=0.5)
    assert small.input_shape == (7,) and set(np.unique(small.groups_train)) == set(range(5))
    assert small.y_train.max() <= 2
    iid = load_dataset("synthetic", iid=True)
    assert abs(float(iid.x_train.mean())) < 0.1
    with pytest.raises(ConfigError, match="num_devices"):
        load_dataset("synthetic", num_devices=0)


def test_unknown_name_and_option():
    with pytest.raises(ConfigError) as e:
        load_dataset("fashon-mnist")
    assert "fashon-mnist" in e.value.message and e.value.hint.startswith("valid names: fashion-mnist")
    with pytest.raises(ConfigError) as e:
        load_dataset("digits", test_fracton=0.3)
    assert "'test_fracton'" in e.value.message and "did you mean 'test_fraction'" in e.value.hint
    with pytest.raises(ConfigError, match="verify"):
        load_dataset("mnist", verify="no")
    with pytest.raises(ConfigError, match="unknown option 'alpha'"):
        load_dataset("mnist", alpha=1)


def test_dataset_status(tmp_path, monkeypatch):
    status = {name: dataset_status(name, tmp_path / "d") for name in DATASETS}
    assert status["digits"][0] == "bundled" and status["synthetic"][0] == "generated"
    assert status["mnist"][0] == "not ready" and "will download" in status["mnist"][1]
    assert "FEDLOOM_DATA" in status["cifar10"][1]
    assert "apt-get install dataset-fashion-mnist" in status["fashion-mnist"][1]
    _idx_set(tmp_path / "d")
    _trust(monkeypatch, "mnist", tmp_path / "d")
    assert dataset_status("mnist", tmp_path / "d") == ("found", str(tmp_path / "d"))
    (tmp_path / "d" / "cifar-10-batches-py").mkdir()
    assert dataset_status("cifar10", tmp_path / "d")[0] == "found"


def test_float_features_are_identity():
    x = torch.randn(5, 3)
    ds = Dataset("t", x, torch.zeros(5, dtype=torch.long), x, torch.zeros(5, dtype=torch.long), 2)
    assert torch.equal(ds.features(x), x) and ds.input_shape == (3,)


FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_real_fashion_mnist_from_the_system_folder(monkeypatch):
    if not FASHION.is_dir():
        pytest.skip(f"{FASHION} absent (Debian package dataset-fashion-mnist not installed)")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [FASHION.parent])
    ds = load_dataset("fashion-mnist", download=False)  # verified: archive or content SHA-256
    assert ds.source == str(FASHION)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train.numpy()).tolist() == [6000] * 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    m = ds.x_train.float().mean() / 255
    assert abs(float(m) - ds.mean[0]) < 1e-3  # the published normalisation constant
