"""The unit of client work an engine executes: broadcast bytes in, an update message out.

`ClientRuntime.fit` is the one client path: decode the broadcast, the algorithm's local work, then the
client pipeline (transforms, error feedback, the upload codec). Engines differ only in where it runs and
how its message travels back (as is in process, as wire bytes across processes); an engine that trains
clients its own way (vectorized) still ends each client with `finish`, the same pipeline. A client's own
state (the algorithm's, namespaced `alg/`, and the pipeline's, `pipe/`) travels with the task and comes
back with the result: in a deployment it never leaves the client, in simulation the client state store
keeps it for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import EvalConfig, PipelineConfig, TrainConfig
from ..data.federated import FederatedData
from ..evaluation import predict
from ..models.layout import fast_layout
from ..params import ParamSpec, load_vector, model_vector
from ..pipeline import wire
from ..pipeline.transforms import ClientPipeline, StageContext
from ..rng import torch_rng
from .trainer import local_train

if TYPE_CHECKING:
    from ..algorithms import Algorithm, ClientContext
    from ..attacks import Attack

State = dict[str, torch.Tensor]
ALG, PIPE = "alg/", "pipe/"


def part(state: State, prefix: str) -> State:
    """The entries of one owner (`alg/` or `pipe/`) of a client's state, prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def joined(alg: State, pipe: State) -> State:
    return {**{ALG + k: v for k, v in alg.items()}, **{PIPE + k: v for k, v in pipe.items()}}


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
    state: State = field(default_factory=dict)  # the client's whole state (`alg/...`, `pipe/...`)
    collusion: State | None = None  # colluding attackers (ALIE, IPM): the statistics they share this round


@dataclass
class ClientResult:
    message: wire.Message
    state: State | None = None  # the client's new whole state; None: nothing to keep


class ClientRuntime:
    """A model skeleton reused across clients, plus the shared data, the algorithm and the configs."""

    attack: Attack | None = None  # simulated attackers (fedloom.attacks), set by the round logic

    def __init__(self, model_factory: Callable[[], torch.nn.Module], data: FederatedData, train: TrainConfig,
                 algorithm: Algorithm, evaluation: EvalConfig | None = None,
                 pipeline: PipelineConfig | None = None):
        self.model = fast_layout(model_factory())
        self.spec = ParamSpec.from_model(self.model)
        self.spec_hash = self.spec.hash()
        self.initial = model_vector(self.model, self.spec)  # the seeded initial model, as the server has it
        self.data = data
        self.train = train
        self.evaluation = evaluation or EvalConfig()
        self.algorithm = algorithm
        self.shared = algorithm.shared_mask(self.model, self.spec)
        width = self.spec.size if self.shared is None else int(self.shared.sum())
        self.reply_sizes = (width * (1 + algorithm.extras), 0)  # an update, or an evaluation's empty vector
        self.pipeline_config = pipeline or PipelineConfig()
        p = self.pipeline_config
        self.pipeline = ClientPipeline(p.client, p.upload, p.error_feedback)

    def receive(self, task: ClientTask) -> torch.Tensor:
        """The broadcast vector as this client reconstructs it: decoded, plus the model it holds when the server
        sent only the change since (`pipeline.download_delta`)."""
        msg = wire.decode(task.broadcast, expect_spec=self.spec_hash)
        base = msg.metrics.get("delta_of")
        if base is None:
            return msg.vector
        held = part(task.state, PIPE)
        if "down/held" not in held or int(held["down/round"]) != base:
            have = int(held["down/round"]) if "down/round" in held else None
            raise ValueError(f"the broadcast is a change since round {base}'s model, but this client holds "
                             f"{'no model' if have is None else f'round {have} model'}")
        return held["down/held"] + msg.vector

    def context(self, task: ClientTask, received: torch.Tensor | None = None) -> ClientContext:
        from ..algorithms import ClientContext

        vec = self.receive(task) if received is None else received
        parts = list(vec.chunk(1 + self.algorithm.extras)) if self.algorithm.extras else [vec]
        own = part(task.state, ALG)
        if self.shared is None:
            start = parts[0]
        else:  # entries that never travel come from this client's own last model
            start = own.get("local", self.initial).clone()
            start[self.shared] = parts[0]
        load_vector(self.model, self.spec, start)
        return ClientContext(
            self.model, self.spec, self.data.dataset, self.data.clients[task.client_id], self.train, task.lr,
            torch_rng(task.seed, "train" if task.kind == "fit" else task.kind, task.round, task.client_id), start,
            parts[1:], own,
            self.train.local_epochs if task.epochs is None else task.epochs,
            self.train.local_steps if task.steps is None else task.steps, self.shared,
        )

    def run(self, task: ClientTask) -> ClientResult:
        return self.fit(task) if task.kind == "fit" else self.evaluate(task)

    def fit(self, task: ClientTask) -> ClientResult:
        received = self.receive(task)
        ctx = self.context(task, received)
        attack = self.attack if self.attack is not None and self.attack.acts(task.round, task.client_id) else None
        if attack is not None:  # an attacker: poisoned data for training, then its update before the pipeline
            attack.poison(ctx)
        out = self.algorithm.client_fit(ctx)
        update, num_examples = out.update, out.num_examples
        if attack is not None:
            update, num_examples = attack.on_update(task, update, num_examples)
        return self.finish(task, update, num_examples, out.metrics, out.state, received)

    def finish(self, task: ClientTask, update: torch.Tensor, num_examples: int, metrics: dict,
               alg_state: State | None = None, received: torch.Tensor | None = None) -> ClientResult:
        """The client pipeline on a trained update: transforms, error feedback, the upload codec; the message to
        send and the client's new whole state (the algorithm's new state, or its old one, plus the pipeline's,
        which holds the model received when later broadcasts may be deltas against it)."""
        ctx = StageContext(task.round, task.client_id, task.seed, num_examples, metrics)
        sent, pipe = self.pipeline.run(update, part(task.state, PIPE), ctx)
        if self.pipeline_config.download_delta and received is not None:
            pipe.update({"down/held": received, "down/round": torch.tensor(task.round)})
        msg = wire.Message("update", task.round, task.client_id, self.spec_hash, sent.vector, num_examples,
                           metrics, sent.codec, sent.payload, update.numel())
        alg = part(task.state, ALG) if alg_state is None else alg_state
        return ClientResult(msg, joined(alg, pipe) if (alg or pipe) else None)

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
        preds = predict(self.model, ds, ds.x_test[idx], ds.y_test[idx], ev.batch_size)
        summary = preds.summary(ds.num_classes, present_only=True)  # macro-F1 over the client's own classes
        msg = wire.Message("evaluation", task.round, task.client_id, self.spec_hash, torch.zeros(0),
                           int(summary["num_examples"]), summary)
        return ClientResult(msg)
