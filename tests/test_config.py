import pytest

from fedloom.config import load_config, presets
from fedloom.errors import ConfigError


def test_quickstart_preset_matches_issue():
    cfg = load_config("quickstart")
    assert "quickstart" in presets()
    assert cfg.data.dataset == "fashion-mnist" and cfg.data.num_clients == 5
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.model.name == "simple-cnn" and cfg.server.algorithm == "fedavg"
    assert cfg.clients_per_round() == 5
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.momentum) == (1, 32, 0.01, 0.9)
    assert cfg.run.rounds == 20


def test_overrides_parse_toml_values():
    cfg = load_config("quickstart", ["train.lr=0.05", "data.dataset=mnist", "eval.federated=false", "run.rounds=3"])
    assert cfg.train.lr == 0.05 and cfg.data.dataset == "mnist"
    assert cfg.eval.federated is False and cfg.run.rounds == 3


def test_unknown_key_names_closest(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.lrr" in e.value.message and "train.lr" in e.value.hint
    assert e.value.exit_code == 2


def test_unknown_section_and_bad_value():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config({"trian": {}})
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("quickstart", ["train.lr=-1"])
    with pytest.raises(ConfigError, match="data.partition"):
        load_config("quickstart", ["data.partition=dirichelt"])
    with pytest.raises(ConfigError, match="no training"):
        load_config("quickstart", ["train.local_epochs=0"])


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.toml")
    with pytest.raises(ConfigError) as e:
        load_config("quickstrat")
    assert "quickstart" in e.value.hint


def test_bad_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_clients_per_round_count_and_fraction():
    assert load_config({"data": {"num_clients": 10}, "server": {"fraction": 0.3}}).clients_per_round() == 3
    assert load_config({"data": {"num_clients": 10}, "server": {"clients_per_round": 4}}).clients_per_round() == 4
    assert load_config({"data": {"num_clients": 3}, "server": {"clients_per_round": 3}}).clients_per_round() == 3
    # more per round than there are clients is refused with both numbers, not quietly lowered to 3
    with pytest.raises(ConfigError, match=r"server.clients_per_round = 9 is more than data.num_clients = 3"):
        load_config({"data": {"num_clients": 3}, "server": {"clients_per_round": 9}})
