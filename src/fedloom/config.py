"""Experiment configuration: TOML files and presets, validated by pydantic.

An experiment is a TOML file with sections `[data]`, `[model]`, `[train]`, `[server]`, `[eval]`, `[run]`.
Unknown keys and bad values are refused with one line naming the key (and the closest valid one), so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    # strict: a boolean is not a number and "3" is not 3; no field takes an infinity or NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, v: Any) -> Any:
        """Integers go to SQLite, numpy and torch as signed 64-bit values (seeds included): larger ones would be
        cut to their low bits or fail deep inside a run."""
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise ValueError(f"{v} is out of range: integers must fit in 64 bits (signed)")
        return v


class DataConfig(_Section):
    dataset: str = "fashion-mnist"
    path: str | None = Field(None, description="dataset = 'file': a .npz or .csv file (docs/extending.md); setting "
                             "it alone selects 'file'; relative to the current folder, stored absolute")
    data_dir: str | None = None
    download: bool = True
    num_clients: int = Field(5, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "quantity", "feature-noise", "natural", "given"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for label skew")
    classes_per_client: int = Field(2, ge=1, description="k in NIID-Bench's #C=k")
    beta: float = Field(0.5, gt=0, description="Dirichlet concentration for quantity skew")
    noise_sigma: float = Field(0.1, ge=0, description="feature noise: client i gets sigma*i/(N-1)")
    min_size: int = Field(10, ge=0, description="dirichlet/quantity: samples per client at least; iid: 0 allows "
                                                 "more clients than samples (clients without data send no update)")
    client_test: Literal["matched", "holdout"] = "matched"
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific, e.g. synthetic alpha")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        """The dataset checks its options' meaning; no option anywhere takes an infinity or NaN."""
        for key, value in v.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"data.options.{key} = {value} is not a finite number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _path_means_file(cls, v: Any) -> Any:
        """`data.path` on its own is enough: the dataset is then the file."""
        if isinstance(v, dict) and v.get("path") is not None and "dataset" not in v:
            return {**v, "dataset": "file"}
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from .data.datasets import known_datasets, unknown_dataset

        if v not in known_datasets():
            raise ValueError(unknown_dataset(v))
        return v

    @field_validator("path")
    @classmethod
    def _data_file(cls, v: str | None) -> str | None:
        """Absolute, so a resumed run finds the same file from any folder."""
        if v is None:
            return v
        if not v.endswith((".npz", ".csv")):
            raise ValueError(f"{v} is neither .npz nor .csv (fedloom reads numpy .npz and .csv files)")
        return os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _path_with_file(self) -> DataConfig:
        if self.dataset == "file" and self.path is None:
            raise ValueError("data.dataset = 'file' needs data.path, a .npz or .csv file")
        if self.dataset != "file" and self.path is not None:
            raise ValueError(f"data.path is read only by data.dataset = 'file'; the dataset is '{self.dataset}' "
                             "(set data.dataset = 'file', or remove data.path)")
        return self


def _registered(name: str, registry: Any, unknown: Any) -> str:
    """`name` if the registry (built-in and registered plug-ins) has it, else the "did you mean" refusal."""
    if name not in registry:
        message, hint = unknown(name)
        raise ValueError(f"{message} ({hint})")
    return name


class ModelConfig(_Section):
    name: str = "simple-cnn"

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models.zoo import MODELS, unknown_model

        return _registered(v, MODELS, unknown_model)


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
                     "perfedavg_alpha": ("perfedavg",), "perfedavg_variant": ("perfedavg",), "fedbn_norms": ("fedbn",)}
_OPTIMIZER_PARAMS = {"beta1": ("adam", "yogi", "adagrad"), "beta2": ("adam", "yogi"),
                     "tau": ("adam", "yogi", "adagrad"), "momentum": ("sgd",)}


class ServerConfig(_Section):
    algorithm: str = Field("fedavg", description="fedavg | fedprox | scaffold | fednova | feddyn | qffl | ditto | "
                           "perfedavg | fedbn, or a registered algorithm's name (docs/extending.md)")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="a registered algorithm's own "
                                             "parameters, e.g. {max_norm = 1.0} (docs/extending.md)")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        from .algorithms import ALGORITHMS, unknown_algorithm

        return _registered(v, ALGORITHMS, unknown_algorithm)

    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    aggregator: str = Field("mean", description="how updates are combined: mean (the weighted sum); "
                            "robust and private aggregators plug in here")

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, v: str) -> str:
        from .server.aggregators import AGGREGATORS

        if v not in AGGREGATORS:
            close = difflib.get_close_matches(v, AGGREGATORS, n=1)
            raise ValueError(f"unknown aggregator '{v}' " + (f"(did you mean '{close[0]}'?)" if close
                                                             else f"(aggregators: {', '.join(AGGREGATORS)})"))
        return v
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
    fedbn_norms: Literal["batch", "all"] = Field("batch", description="FedBN: keep BatchNorm layers local (the "
                                                 "paper), or every normalization layer (also GroupNorm, LayerNorm)")
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round (count)")
    fraction: float = Field(1.0, gt=0, le=1, description="clients sampled per round (fraction), if no count")
    aggregator_params: dict[str, Any] = Field(default_factory=dict, description="the aggregator's parameters, "
                                              "e.g. {f = 2} for krum (docs/robustness.md)")
    max_example_weight: float | None = Field(None, gt=0, le=1, description="cap on any one client's share of the "
                                             "aggregation weights (e.g. 0.2), the others renormalized")
    detect: bool | None = Field(None, description="score every update for suspicion (None: when an attack, a robust "
                                "aggregator or exclude_suspicion is set)")
    exclude_suspicion: float | None = Field(None, gt=0, lt=1, description="leave out of the aggregate the updates "
                                            "whose suspicion score is above this (docs/robustness.md)")

    @model_validator(mode="after")
    def _aggregator_takes_params(self) -> ServerConfig:
        from .server.aggregators import build_aggregator

        build_aggregator(self.aggregator, self.aggregator_params)  # ConfigError naming a bad key or value
        if self.exclude_suspicion is not None and self.detect is False:
            raise ValueError("server.exclude_suspicion needs the suspicion scores: remove server.detect = false")
        return self

    @model_validator(mode="after")
    def _params_in_use(self) -> ServerConfig:
        from .algorithms import ALGORITHMS

        cls = ALGORITHMS[self.algorithm]
        for key, users, chosen in [*((k, u, self.algorithm) for k, u in _ALGORITHM_PARAMS.items()),
                                   *((k, u, self.optimizer) for k, u in _OPTIMIZER_PARAMS.items())]:
            # a registered subclass of an algorithm reads that algorithm's parameters too (a FedProx variant: mu)
            if key in _ALGORITHM_PARAMS and any(issubclass(cls, ALGORITHMS[u]) for u in users):
                continue
            # set and not the default: a stored config (every field written out) still validates
            if (key in self.model_fields_set and chosen not in users
                    and getattr(self, key) != type(self).model_fields[key].default):
                raise ValueError(f"server.{key} is used by {' / '.join(users)}, not by '{chosen}'")
        return self

    @model_validator(mode="after")
    def _algorithm_params_known(self) -> ServerConfig:
        """`algorithm_params` belong to registered algorithms; one that declares `defaults` (a dict) gets an
        unknown key refused here, with the closest one."""
        from .algorithms import ALGORITHMS, BUILTIN_ALGORITHMS

        if not self.algorithm_params:
            return self
        if self.algorithm in BUILTIN_ALGORITHMS:
            raise ValueError(f"server.algorithm_params is read by registered algorithms, not by built-in "
                             f"'{self.algorithm}' (its parameters are server keys, docs/configuration.md)")
        defaults = getattr(ALGORITHMS[self.algorithm], "defaults", None)
        if isinstance(defaults, dict):
            for key in self.algorithm_params:
                if key not in defaults:
                    close = difflib.get_close_matches(key, defaults, n=1)
                    raise ValueError(f"server.algorithm_params.{key}: algorithm '{self.algorithm}' has no parameter "
                                     f"'{key}' ({f'did you mean {close[0]!r}?' if close else 'its parameters: '}"
                                     f"{'' if close else ', '.join(defaults) or 'none'})")
        return self


class EvalConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate every this many rounds (and always the last)")
    federated: bool = Field(True, description="also evaluate on every client's local test split")
    batch_size: int = Field(1024, ge=1)
    finetune_epochs: int = Field(0, ge=0, description="personalized evaluation: each client fine-tunes the "
                                 "global model this many local epochs before its local test")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default train.lr)")
    tensorboard: bool = Field(False, description="write TensorBoard event files while the run trains, into "
                              "<run folder>/tensorboard (also `fedloom run --tensorboard`)")


class PipelineConfig(_Section):
    """What happens to an update between local training and the server (docs/architecture.md)."""

    client: list[str] = Field(default_factory=list, description="client transforms on each update, in order, "
                              "e.g. ['clip:10']")
    upload: list[str] = Field(default_factory=lambda: ["f32"], description="codec chain of client updates, "
                              "e.g. ['topk:0.01', 'q8', 'zstd'] (docs/compression.md)")
    error_feedback: bool = Field(False, description="keep what the upload codec lost on the client and add it "
                                 "to the next update")
    download: list[str] = Field(default_factory=lambda: ["f32"], description="codec chain of the broadcast, "
                                "e.g. ['f16'] or ['q8']")
    download_delta: bool = Field(False, description="send a client that holds last round's model only the "
                                 "change since, encoded with the download codec")

    @field_validator("client", "upload", "download", mode="before")
    @classmethod
    def _chain_text(cls, v: Any) -> Any:
        return [p.strip() for p in v.split("+") if p.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _known_stages(self) -> PipelineConfig:
        from .pipeline.codecs import CodecError, parse_codec
        from .pipeline.transforms import parse_transform

        for key in ("upload", "download"):
            try:
                parse_codec(getattr(self, key))
            except CodecError as e:
                raise ValueError(f"pipeline.{key} = {getattr(self, key)!r}: {e}") from None
        for spec in self.client:
            parse_transform(spec)
        return self


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
    workers: int = Field(0, ge=0, le=1024, description="parallel / ray: worker processes (0 = one per core)")
    ray: RayConfig = Field(default_factory=RayConfig)
    threads: int = Field(0, ge=0, le=1024, description="torch intra-op threads; 0 = all cores")
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    stop_on_divergence: bool = True
    divergence_patience: int = Field(5, ge=2, description="rounds of rising training loss before stopping")
    divergence_factor: float = Field(1.5, gt=1, description="...and the loss is this many times its best")
    on_client_error: Literal["fail", "drop"] = "fail"


ATTACK_KINDS = ("none", "label-flip", "backdoor", "sign-flip", "gaussian", "scaling", "alie", "ipm", "free-rider",
                "inflate")


class AttackConfig(_Section):
    """Simulated attackers (docs/robustness.md): which clients, from which round, doing what."""

    kind: Literal["none", "label-flip", "backdoor", "sign-flip", "gaussian", "scaling", "alie", "ipm", "free-rider",
                  "inflate"] = "none"
    clients: list[int] | None = Field(None, description="the attacking client ids (else `fraction` of them)")
    fraction: float = Field(0.1, ge=0, le=1, description="share of the population that attacks, drawn with the "
                            "run's seed")
    start_round: int = Field(1, ge=1, description="the first round they attack in")
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's parameters, e.g. {factor = 10}")

    @model_validator(mode="after")
    def _known_params(self) -> AttackConfig:
        from .attacks import check_params

        check_params(self.kind, self.params)  # ConfigError naming a bad key or value
        return self


class ExperimentConfig(_Section):
    name: str = "experiment"
    plugins: list[str] = Field(default_factory=list, description="modules or .py files (relative to the "
                               "experiment file) imported before the experiment is validated; stored absolute")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @model_validator(mode="after")
    def _defences_fit(self) -> ExperimentConfig:
        """The numbers a defence and an attack depend on, checked before a run starts."""
        from .server.aggregators import build_aggregator

        k, s, n = self.clients_per_round(), self.server, self.data.num_clients
        agg = build_aggregator(s.aggregator, s.aggregator_params)
        if hasattr(agg, "check"):
            agg.check(k)  # a breakdown condition (e.g. krum: n > 2f + 2) with clients_per_round
        if s.max_example_weight is not None and s.max_example_weight * k < 1:
            raise ConfigError(f"server.max_example_weight = {s.max_example_weight} with {k} clients per round: "
                              f"the weights cannot sum to one ({s.max_example_weight} x {k} < 1)",
                              f"set it to at least 1/{k} = {1 / k:.3g}")
        bad = [c for c in self.attack.clients or [] if not 0 <= c < n]
        if bad:
            raise ConfigError(f"attack.clients {bad} are not client ids (0..{n - 1})")
        return self

    def clients_per_round(self) -> int:
        """Clients sampled per round; a count above the number of clients is refused, not quietly lowered."""
        k, n = self.server.clients_per_round, self.data.num_clients
        if k is not None:
            if k > n:
                raise ConfigError(f"server.clients_per_round = {k} is more than data.num_clients = {n}",
                                  f"set server.clients_per_round to at most {n}, or raise data.num_clients")
            return k
        return max(1, min(n, round(self.server.fraction * n)))


# ---- loading ---------------------------------------------------------------------------------------

def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fedloom.presets").iterdir() if p.name.endswith(".toml"))


def load_config(
    source: str | Path | dict[str, Any] | ExperimentConfig, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """Load a TOML file, a preset name, or a dict; apply `key=value` overrides; validate. Arguments of another
    type are refused with a ConfigError; the caller's dict is never modified."""
    if isinstance(source, ExperimentConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides below write into nested sections
    elif isinstance(source, str | os.PathLike):
        raw = _read_source(os.fspath(source))
    else:
        raise ConfigError(f"an experiment must be a TOML file path, preset name, dict or ExperimentConfig, not "
                          f"{type(source).__name__}")
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, list | tuple):
        items = [_split_override(o) for o in overrides]
    elif overrides is None:
        items = []
    else:
        raise ConfigError(f"overrides must be a list of 'key=value' strings or a dict, not {type(overrides).__name__}",
                          "e.g. overrides=['train.lr=0.05'] or overrides={'train.lr': 0.05}")
    for key, value in items:
        _set_dotted(raw, key, value)
    _load_plugins(raw, source)
    return validate(raw)


def _load_plugins(raw: dict[str, Any], source: Any) -> None:
    """Installed packages' plug-ins (once per process), then the experiment's own `plugins`, before validation
    (they register the names it uses); paths are stored absolute, relative to the experiment file."""
    from .plugins import load_entry_points, load_plugins

    load_entry_points()
    if "plugins" in raw:
        base = None
        if isinstance(source, str | os.PathLike) and Path(source).is_file():
            base = Path(source).resolve().parent
        raw["plugins"] = load_plugins(raw["plugins"], base)


def _read_source(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"experiment file {source} {what}", f"presets: {', '.join(presets())}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"experiment file {source} is not UTF-8 text (byte {e.start} is "
                              f"{e.object[e.start]:#04x})", "TOML files are UTF-8: save it again with that encoding"
                              ) from None
        except OSError as e:
            raise ConfigError(f"cannot read experiment file {source}: {e.strerror}") from None
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
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r} is not a 'key=value' string",
                          "e.g. overrides=['train.lr=0.05'] or overrides={'train.lr': 0.05}")
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not key=value", "e.g. --set train.lr=0.05")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # bare words are strings: --set data.dataset=mnist
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if not isinstance(key, str) or not all(key.split(".")):
        raise ConfigError(f"override key {key!r} is not a dotted config key", "e.g. 'train.lr'")
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
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(*_describe(err)) from None
    cfg.clients_per_round()  # refuses more clients per round than there are clients
    return cfg


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "dict_type": "a table", "model_type": "a table", "list_type": "a list"}


def _kind(value: Any) -> str:
    """What a value is, in TOML's words."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a table"),
             (list, "a list"))
    return next((name for t, name in kinds if isinstance(value, t)), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


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
    if err["type"] in _EXPECTED:
        value = err["input"]
        return f"bad value for '{key}': {_shown(value)} is {_kind(value)}, expected {_EXPECTED[err['type']]}", None
    if err["type"] == "finite_number":
        return f"bad value for '{key}': {err['input']!r} is not a finite number", None
    if err["type"] == "value_error":
        if key and not isinstance(err["input"], dict):  # a field's own check: name the key like the others
            return f"bad value for '{key}': {err['msg'].removeprefix('Value error, ')}", None
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
