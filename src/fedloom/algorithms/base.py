"""What an algorithm is: a server half (aggregate, state, extras to broadcast) and a client half (local work).

`Algorithm` itself is FedAvg (McMahan et al. 2017): plain local SGD, the example-weighted mean of the
client updates, and the configured server optimizer on that pseudo-gradient (trainable parameters only:
buffers take their aggregated value). Every other algorithm subclasses it and overrides only what it
changes; the round logic in `rounds.py` calls the same methods for all of them. One object serves both
halves, so it must stay picklable: engines ship it to wherever clients run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..client.trainer import Hook, LocalResult, local_train
from ..config import ServerConfig, TrainConfig
from ..data.datasets import Dataset
from ..data.federated import ClientData
from ..params import ParamSpec, load_vector, model_vector
from ..server.aggregators import build_aggregator, example_weights
from ..server.optimizers import build_server_optimizer, masked_step

State = dict[str, torch.Tensor]


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_mask(model: torch.nn.Module, spec: ParamSpec) -> torch.Tensor:
    """True on the entries of trainable parameters (False on buffers such as BatchNorm statistics)."""
    mask = torch.zeros(spec.size, dtype=torch.bool)
    for name in trainable_names(model):
        e = spec[name]
        mask[e.offset : e.offset + e.numel] = True
    return mask


@dataclass
class ClientContext:
    """Everything one client's local work may read: the model skeleton, its data, and what it was sent."""

    model: torch.nn.Module
    spec: ParamSpec
    dataset: Dataset
    client: ClientData
    train: TrainConfig
    lr: float
    generator: torch.Generator
    start: torch.Tensor  # full parameter vector the client starts from (already loaded into `model`)
    extras: list[torch.Tensor]  # algorithm vectors broadcast after the parameters (SCAFFOLD's c)
    state: State  # this client's own state from earlier rounds (empty the first time)
    epochs: int
    steps: int
    shared: torch.Tensor | None = None  # bool mask of the entries that travel (None: all of them)
    metrics: dict[str, Any] = field(default_factory=dict)

    def train_local(self, grad_hook: Hook | None = None, post_step: Hook | None = None) -> LocalResult:
        result = local_train(self.model, self.dataset, self.client.train_idx, self.train, self.lr, self.generator,
                             self.client.noise_std, epochs=self.epochs, steps=self.steps, grad_hook=grad_hook,
                             post_step=post_step)
        self.metrics.update(loss=result.loss, steps=result.steps)
        return result

    def vector(self) -> torch.Tensor:
        return model_vector(self.model, self.spec)

    def load(self, vec: torch.Tensor) -> None:
        load_vector(self.model, self.spec, vec)

    def as_params(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """`vec` cut into tensors aligned with the model's trainable parameters (views, no copies)."""
        parts = self.spec.unflatten(vec)
        return [parts[n] for n in trainable_names(self.model)]

    def delta(self, vec: torch.Tensor | None = None) -> torch.Tensor:
        """The update to send: (trained - start), only the shared entries."""
        d = (self.vector() if vec is None else vec) - self.start
        return d if self.shared is None else d[self.shared]


@dataclass
class ClientOutput:
    update: torch.Tensor  # flat; an algorithm may append vectors after the parameter update (SCAFFOLD's Δc)
    num_examples: int
    metrics: dict[str, Any]
    state: State | None = None  # the client's new state; None keeps nothing


class Algorithm:
    """FedAvg; the base every algorithm extends."""

    name = "fedavg"
    extras = 0  # how many shared-size vectors follow the parameters in the broadcast and in each update
    stateful = False  # keeps per-client state across rounds
    trainable: torch.Tensor | None = None  # bool over the parameter vector: trainable entries (None: all are)
    trainable_shared: torch.Tensor | None = None  # the same over the entries that travel, as `aggregate` sees them
    _bound = False

    def __init__(self, cfg: ServerConfig, num_clients: int):
        self.cfg = cfg
        self.num_clients = num_clients
        self.server_optimizer = build_server_optimizer(cfg)
        self.aggregator = build_aggregator(cfg.aggregator, cfg.aggregator_params)

    # ---- server half ---------------------------------------------------------------------------------
    def init_state(self, params: torch.Tensor) -> State:
        return {}

    def broadcast_extras(self, state: State) -> list[torch.Tensor]:
        return []

    def shared_mask(self, model: torch.nn.Module, spec: ParamSpec) -> torch.Tensor | None:
        """Entries that travel and are aggregated; None means all. FedBN keeps normalization layers home.

        Called once with the run's model before any round: an override must return `self.bind(model, spec, mask)`.
        """
        return self.bind(model, spec, None)

    def bind(self, model: torch.nn.Module, spec: ParamSpec, shared: torch.Tensor | None) -> torch.Tensor | None:
        """Learn which entries are trainable parameters and which are buffers (BatchNorm running statistics and
        counters): only parameters go through the server optimizer and an algorithm's corrections; buffers take
        their averaged value. Returns `shared`."""
        mask = param_mask(model, spec)
        here = mask if shared is None else mask[shared]
        self.trainable = None if bool(mask.all()) else mask
        self.trainable_shared = None if bool(here.all()) else here
        self._bound = True
        return shared

    def server_step(self, params: torch.Tensor, update: torch.Tensor, opt_state: State) -> tuple[torch.Tensor, State]:
        """The server optimizer on the aggregated update (full parameter vector), over trainable parameters only.

        Buffers are set to params + update, their aggregated value: a momentum or adaptive step would move a
        running variance by lr·sign(Δ) or past its target, below zero. Their optimizer state keeps its start value.
        """
        if not self._bound:
            raise RuntimeError(f"{type(self).__name__}.server_step before shared_mask: it has not seen the model")
        return masked_step(self.server_optimizer, params, update, opt_state, self.trainable)

    def average_buffers(self, agg: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`agg` on trainable entries, the `weights` mean of the updates on buffers: running statistics are not
        gradients for an algorithm to normalize (FedNova) or reweight (q-FFL)."""
        if self.trainable_shared is None:
            return agg
        return torch.where(self.trainable_shared, agg, self.aggregator.combine(updates, weights).to(agg.dtype))

    def on_trainable(self, vec: torch.Tensor) -> torch.Tensor:
        """`vec` with its buffer entries (over the shared entries) set to zero."""
        return vec if self.trainable_shared is None else torch.where(self.trainable_shared, vec, 0.0)

    def aggregate(self, updates: torch.Tensor, num_examples: list[int], metrics: list[dict[str, Any]],
                  state: State, lr: float) -> tuple[torch.Tensor, State]:
        """(aggregated parameter update, new server state) from the (clients, size) stack of updates."""
        return self.aggregator.combine(updates, example_weights(num_examples)), state

    # ---- client half ---------------------------------------------------------------------------------
    def client_fit(self, ctx: ClientContext) -> ClientOutput:
        result = ctx.train_local()
        return ClientOutput(ctx.delta(), result.num_examples, ctx.metrics)

    def personalize(self, ctx: ClientContext) -> torch.Tensor | None:
        """The client's personalized parameters for evaluation, or None if the algorithm has none."""
        return None

    def has_personal_model(self, state: State) -> bool:
        """Whether a client holding `state` has a model of its own to evaluate (Ditto's: once it has trained)."""
        return True

    @property
    def personalizes(self) -> bool:
        return type(self).personalize is not Algorithm.personalize

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name}
