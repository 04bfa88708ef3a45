"""Bring your own data and model: arrays, per-client arrays, .npz / .csv files, registered names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedloom
from fedloom.api import prepare
from fedloom.config import load_config
from fedloom.data import custom, federate, from_arrays, from_client_arrays, load_file
from fedloom.errors import ConfigError, DatasetError
from fedloom.models import zoo

from .conftest import small_config
from .test_cli import fedloom_cmd, write_toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Each test registers what it needs; nothing leaks into the next one."""
    monkeypatch.setattr(custom, "REGISTERED", dict(custom.REGISTERED))
    monkeypatch.setattr(zoo, "MODELS", dict(zoo.MODELS))


def _blobs(n=160, f=6, seed=0):
    """Tabular data a linear model learns: 3 classes told apart by two features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.4)
    return x, y


def _config(dataset, partition, num_clients=4, rounds=2, **data):
    return {"name": "custom", "data": {"dataset": dataset, "num_clients": num_clients, "partition": partition,
                                       **data},
            "model": {"name": "logreg"}, "train": {"lr": 0.1, "batch_size": 16},
            "run": {"rounds": rounds, "threads": 1}}


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---- arrays end to end --------------------------------------------------------------------------------


def test_arrays_with_client_ids_run_two_rounds_with_the_given_clients(runs_dir):
    x, y = _blobs(200)
    ids = np.random.default_rng(1).integers(0, 4, 200)
    ids[:5] = -1  # held by no client
    ds = from_arrays(x[:160], y[:160], x[160:], y[160:], client_ids=ids[:160], test_client_ids=ids[160:])
    fedloom.register_dataset("mine", ds)
    cfg = _config("mine", "given")
    data, _ = prepare(load_config(cfg))
    for k, c in enumerate(data.clients):
        assert np.array_equal(c.train_idx, np.flatnonzero(ids[:160] == k))
        assert np.array_equal(c.test_idx, np.flatnonzero(ids[160:] == k))
    result = fedloom.run(cfg, make_report=False)
    assert result.status == "completed" and result.summary["rounds_completed"] == 2
    assert fedloom.show(result.run_id)["config"]["data"]["dataset"] == "mine"


def test_index_lists_are_the_clients_and_may_overlap_only_when_allowed(runs_dir):
    x, y = _blobs(100)
    lists = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(10, 40)), list(range(40, 80))]
    tests = [[0, 1], [2, 3, 4], []]
    ds = from_arrays(x[:80], y[:80], x[80:], y[80:], client_indices=lists, test_client_indices=tests)
    fedloom.register_dataset("lists", ds)
    data, _ = prepare(load_config(_config("lists", "given", num_clients=4)))
    assert [c.train_idx.tolist() for c in data.clients] == [*lists, []]  # a client the data leave out holds none
    assert [c.test_idx.tolist() for c in data.clients] == [*tests, []]
    assert fedloom.run(_config("lists", "given", num_clients=3), make_report=False).status == "completed"
    with pytest.raises(DatasetError) as err:
        from_arrays(x[:80], y[:80], x[80:], y[80:], client_indices=[[0, 1, 2], [2, 3]])
    assert "sample 2 is given to clients 0 and 1" in _one_line(err) and "allow_overlap" in err.value.hint
    ds = from_arrays(x[:80], y[:80], x[80:], y[80:], client_indices=[[0, 1, 2], [2, 3]], allow_overlap=True)
    got = federate(ds, 2, "given")
    assert [c.train_idx.tolist() for c in got.clients] == [[0, 1, 2], [2, 3]]


def test_natural_client_arrays_run_and_each_client_holds_its_own(runs_dir):
    rng = np.random.default_rng(0)
    pairs = [_blobs(30 + 10 * k, seed=k) for k in range(3)]
    tests = [_blobs(8, seed=10 + k) for k in range(3)]
    ds = from_client_arrays(pairs, test=tests)
    fedloom.register_dataset("sites", ds)
    data, _ = prepare(load_config(_config("sites", "natural", num_clients=3)))
    for k, c in enumerate(data.clients):
        assert np.array_equal(ds.x_train[c.train_idx].numpy(), pairs[k][0])
        assert np.array_equal(ds.y_test[c.test_idx].numpy(), tests[k][1])
    result = fedloom.run(_config("sites", "natural", num_clients=3), make_report=False)
    assert result.status == "completed" and result.summary["final_fed_accuracy"] is not None
    # without test data, each client's own test_fraction is held out: its test samples come from its arrays
    held = from_client_arrays(pairs, test_fraction=0.25, seed=rng.integers(100))
    fed = federate(held, 3, "natural")
    for k, c in enumerate(fed.clients):
        n = len(pairs[k][1])
        assert len(c.test_idx) == round(0.25 * n) and len(c.train_idx) == n - round(0.25 * n)
        own = {tuple(r) for r in pairs[k][0]}
        assert all(tuple(r) in own for r in held.x_test[c.test_idx].numpy())


def test_one_shared_test_set_for_client_arrays_follows_client_test():
    pairs = [_blobs(40, seed=k) for k in range(2)]
    ds = from_client_arrays(pairs, test=_blobs(30, seed=5))
    assert ds.groups_test is None and len(ds.y_test) == 30
    fed = federate(ds, 2, "natural", client_test="matched")
    assert sum(len(c.test_idx) for c in fed.clients) <= 30


def test_uint8_images_are_normalised_with_their_own_channel_statistics():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 3, 6, 6), dtype=np.uint8)
    x[:, 1] //= 4  # a darker channel
    y = np.arange(50) % 4
    ds = from_arrays(torch.from_numpy(x), torch.from_numpy(y), test_fraction=0.2)
    assert ds.x_train.dtype == torch.uint8 and ds.input_shape == (3, 6, 6) and ds.num_classes == 4
    tr = ds.x_train.numpy() / 255
    assert np.allclose(ds.mean, tr.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(ds.std, tr.std(axis=(0, 2, 3)), atol=1e-12)
    f = ds.features(ds.x_train).numpy()
    assert np.allclose(f.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(f.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_standardize_uses_training_statistics_only_and_arrays_are_copied():
    x, y = _blobs(100)
    x = x * 10 + 3
    source = x.copy()
    ds = from_arrays(x[:80], y[:80], x[80:], y[80:], standardize=True)
    mu, sd = x[:80].mean(0), x[:80].std(0)
    assert np.allclose(ds.x_train.numpy(), (x[:80] - mu) / sd, atol=1e-5)
    assert np.allclose(ds.x_test.numpy(), (x[80:] - mu) / sd, atol=1e-5)
    raw = from_arrays(x[:80], y[:80], x[80:], y[80:])
    x[:] = 0  # the caller's array changes afterwards: the dataset does not
    assert np.array_equal(raw.x_train.numpy(), source[:80])


def test_without_test_arrays_a_stratified_seeded_fraction_is_held_out():
    x, y = _blobs(200)
    a, b = from_arrays(x, y, test_fraction=0.25, seed=3), from_arrays(x, y, test_fraction=0.25, seed=3)
    assert torch.equal(a.x_test, b.x_test) and len(a.y_test) + len(a.y_train) == 200
    for c in range(3):
        assert (a.y_test == c).sum() == round(0.25 * (y == c).sum())


# ---- bad input: one line naming the problem -----------------------------------------------------------

X, Y = _blobs(20)


@pytest.mark.parametrize(("call", "says"), [
    (lambda: from_arrays(X, Y[:19], X, Y), "y_train has 19 values but x_train has 20 samples"),
    (lambda: from_arrays(X, Y, X, Y, num_classes=2), "y_train holds label 2 (position"),
    (lambda: from_arrays(X, Y - 1, X, Y), "y_train holds label -1"),
    (lambda: from_arrays(X, np.where(np.arange(20) == 3, 0.5, Y), X, Y),
     "y_train must hold integers; value 0.5 at position 3"),
    (lambda: from_arrays(X, Y.astype(str), X, Y), "values, not integers"),
    (lambda: from_arrays(X, Y, X[:, :5], Y), "x_test samples have shape (5,) but x_train samples have (6,)"),
    (lambda: from_arrays(np.where(np.arange(20)[:, None] == 7, np.nan, X), Y, X, Y),
     "x_train has NaN or infinite values in 1 sample (the first is sample 7)"),
    (lambda: from_arrays(X, Y, np.full_like(X, np.inf), Y), "x_test has NaN or infinite values in 20 samples"),
    (lambda: from_arrays(X[:0], Y[:0], X, Y), "x_train is empty"),
    (lambda: from_arrays(X[:, 0], Y, X, Y), "x_train has shape (20,); expected (samples, features...)"),
    (lambda: from_arrays(X, Y, X, None), "give both x_test and y_test, or neither"),
    (lambda: from_arrays(X.astype(np.uint8), Y, X, Y), "x_train is uint8 but x_test is float32"),
    (lambda: from_arrays(X, np.zeros(20, int), X, np.zeros(20, int)), "the labels hold a single class"),
    (lambda: from_arrays(X, Y, X, Y, client_ids=np.zeros(19, int)), "client_ids has 19 values but x_train has 20"),
    (lambda: from_arrays(X, Y, X, Y, client_ids=np.full(20, -2)), "client_ids holds -2"),
    (lambda: from_arrays(X, Y, X, Y, client_indices=[[0, 25]]), "client_indices[0] holds index 25, outside 0..19"),
    (lambda: from_arrays(X, Y, X, Y, client_indices=[[3, 3]]), "client_indices[0] lists sample 3 twice"),
    (lambda: from_arrays(X, Y, X, Y, client_indices=[[1]], test_client_indices=[[1], [2]]),
     "1 clients in client_indices but 2 in test_client_indices"),
    (lambda: from_arrays(X, Y, client_indices=[[1]]), "client_indices point into x_train, so test arrays"),
    (lambda: from_arrays(X, Y, X, Y, test_client_ids=np.zeros(20, int)), "test clients need training clients"),
    (lambda: from_client_arrays([(X, Y), (X[:, :3], Y)]),
     "client 1's x samples have shape (3,) but client 0's x samples have (6,)"),
    (lambda: from_client_arrays([(X, Y)], test=[(X[:0, :2], Y[:0])]), "client 0's test x samples have shape (2,)"),
    (lambda: from_client_arrays([(X, Y), (X[:0], Y[:0])]), "client 1 x is empty"),
    (lambda: from_client_arrays([(X, Y)], test=[(X, Y), (X, Y)]), "1 clients but 2 test pairs"),
])
def test_bad_arrays_get_one_line_naming_the_problem(call, says):
    with pytest.raises(DatasetError) as err:
        call()
    assert says in _one_line(err)


def test_client_ids_beyond_num_clients_are_refused_naming_the_fix(runs_dir):
    x, y = _blobs(40)
    fedloom.register_dataset("ids", from_arrays(x, y, x, y, client_ids=np.arange(40) % 6))
    with pytest.raises(ConfigError) as err:
        fedloom.run(_config("ids", "given", num_clients=4), make_report=False)
    assert "client ids go up to 5 but num_clients is 4" in _one_line(err) and "set num_clients = 6" in str(err.value)
    with pytest.raises(ConfigError, match="partition 'given' needs clients from the data"):
        prepare(load_config(_config("digits", "given")))
    with pytest.raises(ValueError, match="-1 .held by no client. needs partition 'given'"):
        federate(from_arrays(x, y, x, y, client_ids=np.arange(40) % 3 - 1), 3, "natural")
    fedloom.register_dataset("lists", from_arrays(x, y, x, y, client_indices=[[0], [1], [2]]))
    with pytest.raises(ConfigError, match="its clients are index lists: use partition 'given'"):
        prepare(load_config(_config("lists", "natural", num_clients=3)))
    assert not runs_dir.exists() or not any(p.is_dir() for p in runs_dir.iterdir())


# ---- files by config: .npz and .csv -------------------------------------------------------------------


def _npz(tmp_path, **extra) -> Path:
    x, y = _blobs(200)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:], **extra)
    return path


def _toml(path: Path, cfg: dict) -> str:
    """write_toml, with tables (data.options) written inline."""
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)
    lines = [f'name = "{cfg["name"]}"']
    for section, values in cfg.items():
        if isinstance(values, dict):
            lines += [f"[{section}]", *(f"{k} = {value(v)}" for k, v in values.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _csv(path: Path, x: np.ndarray, labels, client=None) -> Path:
    cols = [f"f{i}" for i in range(x.shape[1])]
    lines = [",".join(["label", *cols] + (["site"] if client is not None else []))]
    for i, row in enumerate(x):
        lines.append(",".join([str(labels[i]), *(f"{v:.6f}" for v in row)]
                              + ([str(client[i])] if client is not None else [])))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_npz_by_config_through_run_and_the_cli(tmp_path, runs_dir):
    ids = np.arange(200) % 4
    path = _npz(tmp_path, client_train=ids[:160], client_test=ids[160:])
    ds = load_file(path)
    x, y = _blobs(200)
    assert np.array_equal(ds.x_train.numpy(), x[:160]) and np.array_equal(ds.y_test.numpy(), y[160:])
    assert ds.source == str(path) and ds.name == "file"
    cfg = {**_config("file", "given", path=str(path))}
    result = fedloom.run(cfg, make_report=False)
    assert result.status == "completed" and result.summary["rounds_completed"] == 2
    toml_cfg = _config("file", "given", path=str(path))
    del toml_cfg["data"]["dataset"]  # data.path alone selects the file
    r = fedloom_cmd("run", write_toml(tmp_path / "npz.toml", toml_cfg), "--no-report", "--json", runs_dir=runs_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "completed"


def test_csv_by_config_with_named_labels_a_client_column_and_a_test_file(tmp_path, runs_dir):
    x, y = _blobs(200)
    names = np.array(["low", "mid", "high"])[y]
    sites = np.arange(200) % 3
    train = _csv(tmp_path / "train.csv", x[:150], names[:150], sites[:150])
    _csv(tmp_path / "test.csv", x[150:], names[150:], sites[150:])
    ds = load_file(train, client="site", test_path="test.csv")
    assert ds.class_names == ["high", "low", "mid"]  # names are numbered in sorted order
    assert np.array_equal(np.array(ds.class_names)[ds.y_train.numpy()], names[:150])
    assert np.allclose(ds.x_test.numpy(), x[150:], atol=1e-6) and np.array_equal(ds.groups_train, sites[:150])
    opts = {"client": "site", "test_path": "test.csv", "standardize": True}
    result = fedloom.run(_config("file", "given", num_clients=3, path=str(train), options=opts), make_report=False)
    assert result.status == "completed"
    r = fedloom_cmd("run", _toml(tmp_path / "csv.toml", _config("file", "natural", num_clients=3,
                                                                        path=str(train), options=opts)),
                    "--no-report", "--json", runs_dir=runs_dir)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "completed", r.stderr


def test_csv_without_test_file_holds_out_test_fraction_and_takes_label_option(tmp_path):
    x, y = _blobs(100)
    path = _csv(tmp_path / "d.csv", x, y)
    path.write_text(path.read_text().replace("label,", "target,", 1))
    ds = load_file(path, label="target", test_fraction=0.3)
    assert len(ds.y_train) + len(ds.y_test) == 100 and ds.class_names == ["0", "1", "2"]
    assert all((ds.y_test == c).sum() == round(0.3 * (y == c).sum()) for c in range(3))


@pytest.mark.parametrize(("setup", "options", "says", "names"), [
    (lambda d: d / "nope.npz", {}, "does not exist", "nope.npz"),
    (lambda d: _save(d / "a.npz", x_train=X, x_test=X, y_test=Y), {}, "no array 'y_train' (found: x_train, x_test",
     "a.npz"),
    (lambda d: _save(d / "a.npz", x_train=X, y_train=Y, X_test=X), {},
     "unknown array 'X_test' (did you mean 'x_test'?)", "a.npz"),
    (lambda d: _save(d / "a.npz", x_train=X, y_train=Y[:10]), {}, "y_train has 10 values but x_train has 20",
     "a.npz"),
    (lambda d: _save(d / "a.npz", x_train=X, y_train=Y, x_test=X * np.nan, y_test=Y), {},
     "x_test has NaN or infinite values in 20 samples", "a.npz"),
    (lambda d: _save(d / "a.npz", x_train=X, y_train=np.array([{}] * 20)), {}, "holds Python objects", "a.npz"),
    (lambda d: _text(d / "a.csv", "label,a,b\n1,2,x\n0,1,2\n"), {}, "column 'b' is not numeric (row 2: 'x')", "a.csv"),
    (lambda d: _text(d / "a.csv", "y,a\n1,2\n0,1\n"), {}, "no column 'label' (columns: y, a)", "a.csv"),
    (lambda d: _text(d / "a.csv", "label,a\n1,2\n0\n"), {}, "row 3 has 1 fields but the header has 2", "a.csv"),
    (lambda d: _text(d / "a.csv", "label,a\n1,2\n0,\n"), {}, "column 'a' is not numeric (row 3: '')", "a.csv"),
    (lambda d: _text(d / "a.csv", "label,a\n1,2\n0,1\n"), {"test_path": "t.csv"}, "test_path", "t.csv"),
    (lambda d: _text(d / "a.npz", ""), {"label": "y"}, "data.options.label is for .csv files", "a.npz"),
    (lambda d: _text(d / "a.npz", "not a zip"), {}, "is not a readable .npz file", "a.npz"),
    (lambda d: d / "x.bin", {}, "neither .npz nor .csv", "x.bin"),
])
def test_bad_files_get_one_line_naming_the_file(tmp_path, setup, options, says, names):
    path = setup(tmp_path)
    with pytest.raises((DatasetError, ConfigError)) as err:
        load_file(path, **options)
    text = _one_line(err)
    assert says in text and names in text, text


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _text(path, text):
    path.write_text(text)
    return path


def test_file_errors_through_the_cli_are_one_line_with_the_exit_code(tmp_path, runs_dir):
    missing = write_toml(tmp_path / "m.toml", _config("file", "iid", path=str(tmp_path / "none.npz")))
    r = fedloom_cmd("run", missing, runs_dir=runs_dir)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "none.npz does not exist" in lines[0], r.stderr
    path = _npz(tmp_path)
    bad_opt = _toml(tmp_path / "o.toml", _config("file", "iid", path=str(path), options={"lable": "y"}))
    r = fedloom_cmd("run", bad_opt, runs_dir=runs_dir)
    assert r.returncode == 2 and "unknown option 'lable'" in r.stderr and "did you mean 'label'" in r.stderr
    both = write_toml(tmp_path / "b.toml", _config("digits", "iid", path=str(path)))
    r = fedloom_cmd("run", both, runs_dir=runs_dir)
    assert r.returncode == 2 and "data.path is read only by data.dataset = 'file'" in r.stderr
    assert not (runs_dir / "fedloom.db").exists() or "no runs" in fedloom_cmd("runs", runs_dir=runs_dir).stdout


def test_a_stored_file_path_is_absolute_so_resume_finds_it_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _npz(tmp_path)
    cfg = load_config(_config("file", "iid", path="data.npz"))
    assert cfg.data.path == str(tmp_path / "data.npz")
    assert load_config(cfg.model_dump()).data.path == cfg.data.path


# ---- registered datasets and models -------------------------------------------------------------------


def test_registered_loader_gets_its_options_and_the_seed_and_may_return_arrays(runs_dir):
    seen = {}

    def loader(data_dir, seed, n=100):
        seen.update(data_dir=data_dir, seed=seed, n=n)
        x, y = _blobs(n, seed=seed)
        return x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:]

    fedloom.register_dataset("blobs", loader)
    result = fedloom.run(_config("blobs", "iid", options={"n": 120}, data_dir="/somewhere"), seed=3,
                         make_report=False)
    assert result.status == "completed" and seen == {"data_dir": "/somewhere", "seed": 3, "n": 120}
    with pytest.raises(ConfigError) as err:
        prepare(load_config(_config("blobs", "iid", options={"m": 1})))
    assert "unknown option 'm' for dataset 'blobs'" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        load_config(_config("blobz", "iid"))
    assert "unknown dataset 'blobz' (did you mean 'blobs'?)" in _one_line(err)

    def broken(data_dir):
        raise KeyError("labels")

    fedloom.register_dataset("broken", broken)
    with pytest.raises(DatasetError, match="the loader of dataset 'broken' failed: KeyError: 'labels'"):
        prepare(load_config(_config("broken", "iid")))
    fedloom.register_dataset("odd", lambda data_dir: 42)
    with pytest.raises(DatasetError, match="the loader of dataset 'odd' returned int"):
        prepare(load_config(_config("odd", "iid")))


def test_registration_refuses_built_in_names_and_non_callables():
    with pytest.raises(ConfigError, match="'mnist' is a built-in dataset name"):
        fedloom.register_dataset("mnist", lambda data_dir: None)
    with pytest.raises(ConfigError, match="'file' is a built-in dataset name"):
        fedloom.register_dataset("file", lambda data_dir: None)
    with pytest.raises(ConfigError, match="'mlp' is a built-in model name"):
        fedloom.register_model("mlp", lambda s, k: torch.nn.Linear(1, k))
    with pytest.raises(ConfigError, match="needs a builder function"):
        fedloom.register_model("x", "not a function")
    with pytest.raises(ConfigError, match="needs a loader function or a Dataset"):
        fedloom.register_dataset("x", 3)


class TwoLayer(torch.nn.Module):
    def __init__(self, shape, k):
        super().__init__()
        self.a, self.b = torch.nn.Linear(int(np.prod(shape)), 16), torch.nn.Linear(16, k)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flatten(1))))


@pytest.mark.parametrize("engine", ["sequential", "parallel", "vectorized"])
def test_a_registered_model_is_used_by_name_in_every_engine(runs_dir, engine):
    fedloom.register_model("two-layer", TwoLayer)
    cfg = small_config(model__name="two-layer", run__rounds=2, run__engine=engine, run__workers=2)
    _, factory = prepare(load_config(cfg))
    assert isinstance(factory(), TwoLayer)
    result = fedloom.run(cfg, make_report=False)
    assert result.status == "completed" and fedloom.show(result.run_id)["config"]["model"]["name"] == "two-layer"


def test_unknown_and_unfit_models_are_refused_before_a_run_folder_exists(runs_dir):
    fedloom.register_model("two-layer", TwoLayer)
    with pytest.raises(ConfigError) as err:
        fedloom.run(small_config(model__name="two-layr"), make_report=False)
    assert "unknown model 'two-layr'" in _one_line(err) and "did you mean 'two-layer'?" in str(err.value)
    fedloom.register_model("wrong-out", lambda shape, k: torch.nn.Linear(int(np.prod(shape)), k + 1))
    with pytest.raises(ConfigError) as err:
        fedloom.run(small_config(model__name="wrong-out"), make_report=False)
    assert "model 'wrong-out' gives (2, 11) for a batch of 2; expected logits of shape (2, 10)" in _one_line(err)
    fedloom.register_model("wrong-in", lambda shape, k: torch.nn.Linear(7, k))
    with pytest.raises(ConfigError, match=r"model 'wrong-in' fails on the dataset's input \(batch of shape \(2, 64\)"):
        fedloom.run(small_config(model__name="wrong-in"), make_report=False)
    fedloom.register_model("raises", lambda shape, k: 1 / 0)
    with pytest.raises(ConfigError, match="model 'raises' could not be built for input shape .64,. and 10 classes: "
                                          "ZeroDivisionError"):
        fedloom.run(small_config(model__name="raises"), make_report=False)
    fedloom.register_model("not-module", lambda shape, k: "model")
    with pytest.raises(ConfigError, match="returned str, not a torch.nn.Module"):
        fedloom.run(small_config(model__name="not-module"), make_report=False)
    assert not runs_dir.exists() or not any(p.is_dir() for p in runs_dir.iterdir())


def test_resume_needs_the_registration_again_and_then_continues(runs_dir):
    x, y = _blobs(200)
    fedloom.register_dataset("mine", from_arrays(x, y, client_ids=np.arange(200) % 4))
    first = fedloom.run(_config("mine", "given", rounds=2), make_report=False)
    custom.REGISTERED.clear()  # as in a new process
    with pytest.raises(ConfigError) as err:
        fedloom.resume(first.run_id, rounds=3, make_report=False)
    assert "unknown dataset 'mine'" in _one_line(err) and "registered again in every new process" in str(err.value)
    fedloom.register_dataset("mine", from_arrays(x, y, client_ids=np.arange(200) % 4))
    more = fedloom.resume(first.run_id, rounds=3, make_report=False)
    assert more.status == "completed" and more.summary["rounds_completed"] == 3


# ---- the examples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["custom_data.py", "custom_model.py"])
def test_examples_run(tmp_path, example):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--rounds", "1", "--no-report"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path / "runs")})
    assert r.returncode == 0, r.stderr
    assert "completed after 1 rounds, test accuracy" in r.stdout



@pytest.mark.parametrize(("example", "settings"), [
    ("custom_data.py", ["data.dataset=hospitals", "data.partition=natural", "data.num_clients=5",
                        "data.options={sites = 5}", "model.name=logreg", "train.lr=0.1"]),
    ("custom_model.py", ["data.dataset=digits", "data.num_clients=4", "model.name=digits-cnn", "train.lr=0.05"]),
])
def test_examples_as_plugins_through_the_cli(tmp_path, example, settings):
    """The example files register their dataset / model when loaded with --plugin; `fedloom run` then uses them
    by name and records the run under those names."""
    sets = [a for s in settings for a in ("--set", s)]
    plugin = str(ROOT / "examples" / example)
    r = subprocess.run([sys.executable, "-m", "fedloom", "run", "quickstart", "--plugin", plugin, *sets,
                        "--rounds", "1", "--no-report", "--json", "--quiet", "--engine", "sequential"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "FEDLOOM_RUNS_DIR": str(tmp_path / "runs"), "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    config = json.loads((Path(summary["output_dir"]) / "config.json").read_text())
    assert config["data"]["dataset"] == settings[0].split("=")[1]
    assert config["model"]["name"] == next(s for s in settings if s.startswith("model.name")).split("=")[1]
