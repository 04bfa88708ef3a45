"""Experiment configuration: TOML files and presets, validated by pydantic.

An experiment is a TOML file with sections `[data]`, `[model]`, `[train]`, `[server]`, `[eval]`, `[run]`.
Unknown keys and bad values are refused with one line naming the key (and the closest valid one), so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    num_clients: int = Field(5, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "quantity", "feature-noise", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for label skew")
    classes_per_client: int = Field(2, ge=1, description="k in NIID-Bench's #C=k")
    beta: float = Field(0.5, gt=0, description="Dirichlet concentration for quantity skew")
    noise_sigma: float = Field(0.1, ge=0, description="feature noise: client i gets sigma*i/(N-1)")
    min_size: int = Field(10, ge=0, description="dirichlet/quantity: samples per client at least; iid: 0 allows "
                                                 "more clients than samples (clients without data send no update)")
    client_test: Literal["matched", "holdout"] = "matched"
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific, e.g. synthetic alpha")


class ModelConfig(_Section):
    name: str = "simple-cnn"


class TrainConfig(_Section):
    """Local training on each client."""

    local_epochs: int = Field(1, ge=0)
    local_steps: int = Field(0, ge=0, description="if > 0, a fixed number of steps instead of epochs")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "step", "exponential", "cosine"] = "constant"
    lr_decay: float = Field(0.1, gt=0, le=1, description="gamma for step / exponential schedules")
    lr_step_rounds: int = Field(10, ge=1, description="step schedule: decay every this many rounds")
    min_lr: float = Field(0.0, ge=0, description="cosine schedule floor")
    local_epochs_max: int = Field(0, ge=0, description="if > local_epochs: each client and round draws its "
                                  "epochs uniformly from local_epochs..local_epochs_max")
    straggler_fraction: float = Field(0.0, ge=0, le=1, description="share of the selected clients that only "
                                      "finish part of their work (1..E epochs, or 1..S steps, uniformly)")
    drop_stragglers: bool = Field(False, description="discard stragglers' partial work (FedProx paper's FedAvg)")

    @model_validator(mode="after")
    def _some_work(self) -> TrainConfig:
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ValueError("local_epochs and local_steps are both 0: clients would do no training")
        if self.local_epochs_max and (self.local_steps or self.local_epochs_max < self.local_epochs):
            raise ValueError("local_epochs_max needs local_steps = 0 and local_epochs_max >= local_epochs")
        return self


ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "qffl", "ditto", "perfedavg", "fedbn")

# Algorithm parameters, and the algorithms that read each: setting one the chosen algorithm ignores is
# an error, so a typo'd experiment cannot silently run plain FedAvg.
_ALGORITHM_PARAMS = {"mu": ("fedprox",), "dyn_alpha": ("feddyn",), "q": ("qffl",), "ditto_lambda": ("ditto",),
                     "perfedavg_alpha": ("perfedavg",), "perfedavg_variant": ("perfedavg",)}
_OPTIMIZER_PARAMS = {"beta1": ("adam", "yogi", "adagrad"), "beta2": ("adam", "yogi"),
                     "tau": ("adam", "yogi", "adagrad"), "momentum": ("sgd",)}


class ServerConfig(_Section):
    algorithm: Literal["fedavg", "fedprox", "scaffold", "fednova", "feddyn", "qffl", "ditto", "perfedavg",
                       "fedbn"] = "fedavg"
    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(1.0, gt=0, description="server learning rate; 1.0 with momentum 0 is FedAvg")
    momentum: float = Field(0.0, ge=0, lt=1, description="server momentum (FedAvgM when > 0)")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam / FedYogi second-moment decay")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity (epsilon), also the initial v = tau^2")
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    dyn_alpha: float = Field(0.01, gt=0, description="FedDyn regularisation weight")
    q: float = Field(1.0, ge=0, description="q-FFL fairness exponent (0 = uniform-weight FedAvg)")
    ditto_lambda: float = Field(0.1, ge=0, description="Ditto: pull of the personal model to the global one")
    perfedavg_alpha: float = Field(0.01, gt=0, description="Per-FedAvg inner (personalization) step size")
    perfedavg_variant: Literal["fo", "hf"] = Field("fo", description="first-order or Hessian-free")
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round (count)")
    fraction: float = Field(1.0, gt=0, le=1, description="clients sampled per round (fraction), if no count")

    @model_validator(mode="after")
    def _params_in_use(self) -> ServerConfig:
        for key, users, chosen in [*((k, u, self.algorithm) for k, u in _ALGORITHM_PARAMS.items()),
                                   *((k, u, self.optimizer) for k, u in _OPTIMIZER_PARAMS.items())]:
            # set and not the default: a stored config (every field written out) still validates
            if (key in self.model_fields_set and chosen not in users
                    and getattr(self, key) != type(self).model_fields[key].default):
                raise ValueError(f"server.{key} is used by {' / '.join(users)}, not by '{chosen}'")
        return self


class EvalConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate every this many rounds (and always the last)")
    federated: bool = Field(True, description="also evaluate on every client's local test split")
    batch_size: int = Field(1024, ge=1)
    finetune_epochs: int = Field(0, ge=0, description="personalized evaluation: each client fine-tunes the "
                                 "global model this many local epochs before its local test")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default train.lr)")


class RayConfig(_Section):
    """The `ray` engine: where the cluster is and what each client may use."""

    address: str | None = Field(None, description="None starts a local Ray; 'auto' or 'ray://host:port' joins one")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per client task (default resource class)")
    classes: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                 description="resource classes, e.g. {big = {num_cpus = 2}}")
    client_class: dict[str, str] = Field(default_factory=dict,
                                         description="client ids or ranges -> class, e.g. {'0-9' = 'big'}")

    @model_validator(mode="after")
    def _known_classes(self) -> RayConfig:
        for ids, name in self.client_class.items():
            if name not in self.classes:
                raise ValueError(f"run.ray.client_class['{ids}'] names class '{name}', which run.ray.classes "
                                 f"does not define ({', '.join(self.classes) or 'none defined'})")
        return self


class RunConfig(_Section):
    rounds: int = Field(20, ge=1)
    seed: int = Field(0, ge=0)
    engine: str = Field("auto", description="where client work runs: auto | sequential | parallel | vectorized | ray")
    workers: int = Field(0, ge=0, description="parallel / ray: worker processes (0 = one per core)")
    ray: RayConfig = Field(default_factory=RayConfig)
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    stop_on_divergence: bool = True
    divergence_patience: int = Field(5, ge=2, description="rounds of rising training loss before stopping")
    divergence_factor: float = Field(1.5, gt=1, description="...and the loss is this many times its best")
    on_client_error: Literal["fail", "drop"] = "fail"


class ExperimentConfig(_Section):
    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def clients_per_round(self) -> int:
        if self.server.clients_per_round is not None:
            return min(self.server.clients_per_round, self.data.num_clients)
        return max(1, min(self.data.num_clients, round(self.server.fraction * self.data.num_clients)))


# ---- loading ---------------------------------------------------------------------------------------

def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fedloom.presets").iterdir() if p.name.endswith(".toml"))


def load_config(
    source: str | Path | dict[str, Any] | ExperimentConfig, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """Load a TOML file, a preset name, or a dict; apply `key=value` overrides; validate."""
    if isinstance(source, ExperimentConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        raw = _read_source(str(source))
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(raw, key, value)
    return validate(raw)


def _read_source(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"experiment file {source} does not exist", f"presets: {', '.join(presets())}")
        text = path.read_text()
    elif source in presets():
        text = (resources.files("fedloom.presets") / f"{source}.toml").read_text()
    else:
        close = difflib.get_close_matches(source, presets(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(presets())}"
        raise ConfigError(f"'{source}' is neither a TOML file nor a preset", hint)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    raw.setdefault("name", path.stem if path.suffix == ".toml" else source)
    return raw


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not key=value", "e.g. --set train.lr=0.05")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # bare words are strings: --set data.dataset=mnist
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(*_describe(err)) from None


def _describe(err: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        prefix = ".".join(loc[:-1] + [""])
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"unknown config key '{key}'", hint
    if err["type"] == "literal_error":
        return f"bad value for '{key}': {err['input']!r}; {err['msg'].lower()}", None
    if err["type"] == "value_error":
        where = f" in [{key}]" if key else ""
        return f"invalid config{where}: {err['msg'].removeprefix('Value error, ')}", None
    return f"bad value for '{key}': {err['input']!r} ({err['msg'].lower()})", None


def _valid_keys(section: list[str]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for p in section:
        ann = model.model_fields[p].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)
