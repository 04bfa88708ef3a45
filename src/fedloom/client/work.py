"""The unit of client work an engine executes: broadcast bytes in, update bytes out.

Engines differ only in where `ClientRuntime.fit` runs; they all pass it the same `ClientTask` and get
back the same wire bytes, so every engine computes the same round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data.federated import FederatedData
from ..params import ParamSpec, load_vector, model_vector
from ..pipeline import wire
from ..rng import torch_rng
from .trainer import local_train


@dataclass(frozen=True)
class ClientTask:
    round: int
    client_id: int
    lr: float
    seed: int
    broadcast: bytes


class ClientRuntime:
    """A model skeleton reused across clients, plus the shared data and the local-training config."""

    def __init__(self, model_factory: Callable[[], torch.nn.Module], data: FederatedData, train: TrainConfig):
        self.model = model_factory()
        self.spec = ParamSpec.from_model(self.model)
        self.spec_hash = self.spec.hash()
        self.data = data
        self.train = train

    def fit(self, task: ClientTask) -> bytes:
        start = wire.decode(task.broadcast, expect_spec=self.spec_hash)
        load_vector(self.model, self.spec, start.vector)
        client = self.data.clients[task.client_id]
        result = local_train(
            self.model, self.data.dataset, client.train_idx, self.train, task.lr,
            torch_rng(task.seed, "train", task.round, task.client_id), noise_std=client.noise_std,
        )
        delta = model_vector(self.model, self.spec) - start.vector
        metrics = {"loss": result.loss, "steps": result.steps}
        return wire.encode(wire.Message("update", task.round, task.client_id, self.spec_hash, delta,
                                        result.num_examples, metrics))
