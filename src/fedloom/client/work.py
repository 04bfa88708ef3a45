"""The unit of client work an engine executes: broadcast bytes in, an update message out.

Engines differ only in where `ClientRuntime.run` executes and how its message travels back (as is in
process, as wire bytes across processes); they all pass it the same `ClientTask` and get back the same
message, so every engine computes the same round. A client's own state (SCAFFOLD's c_i,
Ditto's personal model, FedBN's normalization layers) travels with the task and comes back with the
result: in a deployment it never leaves the client, and in simulation the round logic keeps it for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import EvalConfig, TrainConfig
from ..data.federated import FederatedData
from ..evaluation import predict
from ..models.layout import fast_layout
from ..params import ParamSpec, load_vector, model_vector
from ..pipeline import wire
from ..rng import torch_rng
from .trainer import local_train

if TYPE_CHECKING:
    from ..algorithms import Algorithm, ClientContext

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientTask:
    round: int
    client_id: int
    lr: float
    seed: int
    broadcast: bytes
    kind: str = "fit"  # "fit": local training, update back; "evaluate": personalized test metrics back
    epochs: int | None = None  # this client's local work this round (None: the config's)
    steps: int | None = None
    state: State = field(default_factory=dict)


@dataclass
class ClientResult:
    message: wire.Message
    state: State | None = None  # the client's new state (fit tasks of stateful algorithms)


class ClientRuntime:
    """A model skeleton reused across clients, plus the shared data, the algorithm and the configs."""

    def __init__(self, model_factory: Callable[[], torch.nn.Module], data: FederatedData, train: TrainConfig,
                 algorithm: Algorithm, evaluation: EvalConfig | None = None):
        self.model = fast_layout(model_factory())
        self.spec = ParamSpec.from_model(self.model)
        self.spec_hash = self.spec.hash()
        self.initial = model_vector(self.model, self.spec)  # the seeded initial model, as the server has it
        self.data = data
        self.train = train
        self.evaluation = evaluation or EvalConfig()
        self.algorithm = algorithm
        self.shared = algorithm.shared_mask(self.model, self.spec)

    def context(self, task: ClientTask) -> ClientContext:
        from ..algorithms import ClientContext

        msg = wire.decode(task.broadcast, expect_spec=self.spec_hash)
        parts = list(msg.vector.chunk(1 + self.algorithm.extras)) if self.algorithm.extras else [msg.vector]
        if self.shared is None:
            start = parts[0]
        else:  # entries that never travel come from this client's own last model
            start = task.state.get("local", self.initial).clone()
            start[self.shared] = parts[0]
        load_vector(self.model, self.spec, start)
        return ClientContext(
            self.model, self.spec, self.data.dataset, self.data.clients[task.client_id], self.train, task.lr,
            torch_rng(task.seed, "train" if task.kind == "fit" else task.kind, task.round, task.client_id), start,
            parts[1:], task.state,
            self.train.local_epochs if task.epochs is None else task.epochs,
            self.train.local_steps if task.steps is None else task.steps, self.shared,
        )

    def run(self, task: ClientTask) -> ClientResult:
        return self.fit(task) if task.kind == "fit" else self.evaluate(task)

    def fit(self, task: ClientTask) -> ClientResult:
        out = self.algorithm.client_fit(self.context(task))
        msg = wire.Message("update", task.round, task.client_id, self.spec_hash, out.update, out.num_examples,
                           out.metrics)
        return ClientResult(msg, out.state)

    def evaluate(self, task: ClientTask) -> ClientResult:
        """Personalize (the algorithm's way, then optional fine-tuning) and test on the local test split."""
        ctx = self.context(task)
        personal = self.algorithm.personalize(ctx)
        if personal is not None:
            load_vector(self.model, self.spec, personal)
        client, ds, ev = ctx.client, ctx.dataset, self.evaluation
        if ev.finetune_epochs > 0:
            local_train(self.model, ds, client.train_idx, self.train, ev.finetune_lr or self.train.lr,
                        ctx.generator, client.noise_std, epochs=ev.finetune_epochs, steps=0)
        idx = torch.as_tensor(client.test_idx, dtype=torch.long)
        summary = predict(self.model, ds, ds.x_test[idx], ds.y_test[idx], ev.batch_size).summary(ds.num_classes)
        msg = wire.Message("evaluation", task.round, task.client_id, self.spec_hash, torch.zeros(0),
                           int(summary["num_examples"]), summary)
        return ClientResult(msg)
