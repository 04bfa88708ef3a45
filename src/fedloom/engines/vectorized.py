"""Many clients trained at once in one process: their models stacked, one batched forward and backward per step.

Client k's parameters are slice k of stacked tensors; `torch.func.vmap(functional_call)` runs all
clients' forward passes as one batched computation, and since the clients' losses are independent, the
gradient of their sum is every client's own gradient. SGD with momentum and weight decay is then applied
to the stacks exactly as `torch.optim.SGD` would apply it to each client. Each client draws its batches
from its own seeded generator in the same order as the sequential engine, so the result is the same
model, to float tolerance.

Clients with unequal amounts of work are grouped by step count (less padding) and padded: a short batch
is masked per sample, and a client that has finished keeps its weights and momentum while the others
step. What cannot be stacked is refused in one line at start-up: models with buffers (BatchNorm) or
client-specific starting points, algorithms other than FedAvg and FedProx, and feature-noise clients.
Personalized evaluation tasks run one by one, as in the sequential engine.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..algorithms import Algorithm
from ..algorithms.drift import FedProx
from ..client.work import ClientRuntime, ClientTask
from ..errors import ConfigError
from ..pipeline import wire
from ..rng import torch_rng
from .base import ClientFailure, ClientReply
from .sequential import SequentialEngine

MAX_GROUP = 256  # clients stacked at once; bounds activation memory
_SUPPORTED = (Algorithm, FedProx)


class VectorizedEngine:
    name = "vectorized"

    def __init__(self) -> None:
        self._fallback = SequentialEngine()

    def check(self, runtime: ClientRuntime) -> None:
        why = unsupported(runtime)
        if why:
            raise ConfigError(f"the vectorized engine cannot run this experiment: {why}",
                              "use engine = \"parallel\" or \"sequential\"")

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        self.check(runtime)
        out: dict[int, ClientReply | ClientFailure] = {}
        fits = [t for t in tasks if t.kind == "fit"]
        others = [t for t in tasks if t.kind != "fit"]
        for task, res in zip(others, self._fallback.fit(runtime, others), strict=True):
            out[id(task)] = res
        plans = [(t, _plan(runtime, t)) for t in fits]
        plans.sort(key=lambda p: len(p[1]))  # similar step counts together: less padding
        for s in range(0, len(plans), MAX_GROUP):
            group = plans[s : s + MAX_GROUP]
            t0 = time.perf_counter()
            try:
                replies = _train_group(runtime, group)
            except Exception as e:  # noqa: BLE001 - a failure of the stacked step fails every client in it
                tb = traceback.format_exc()
                replies = [ClientFailure(t.client_id, f"vectorized group of {len(group)} clients failed: {e}\n{tb}")
                           for t, _ in group]
            per = (time.perf_counter() - t0) / max(len(group), 1)
            for (task, _), rep in zip(group, replies, strict=True):
                if isinstance(rep, ClientReply):
                    rep.seconds = per  # the group's time, shared: clients ran together
                out[id(task)] = rep
        return [out[id(t)] for t in tasks]

    def close(self) -> None:
        pass


def unsupported(runtime: ClientRuntime) -> str | None:
    alg = runtime.algorithm
    if type(alg) not in _SUPPORTED:
        return f"algorithm '{alg.name}' is not vectorized (fedavg and fedprox are)"
    if runtime.shared is not None:
        return f"algorithm '{alg.name}' starts clients from different models"
    if any(True for _ in runtime.model.buffers()):
        return "the model has buffers (e.g. BatchNorm statistics), which differ per client"
    if any(c.noise_std > 0 for c in runtime.data.clients):
        return "feature-noise clients draw fresh noise per batch"
    return None


def _plan(runtime: ClientRuntime, task: ClientTask) -> list[torch.Tensor]:
    """The client's batches, drawn exactly as `local_train` draws them."""
    client = runtime.data.clients[task.client_id]
    cfg = runtime.train
    n = len(client.train_idx)
    if n == 0:
        return []
    epochs = cfg.local_epochs if task.epochs is None else task.epochs
    steps = cfg.local_steps if task.steps is None else task.steps
    bs = cfg.batch_size
    per_epoch = math.ceil(n / bs)
    total = steps if steps > 0 else epochs * per_epoch
    idx = torch.as_tensor(client.train_idx, dtype=torch.long)
    g = torch_rng(task.seed, "train", task.round, task.client_id)
    batches: list[torch.Tensor] = []
    while len(batches) < total:
        perm = idx[torch.randperm(n, generator=g)]
        batches += [perm[b * bs : (b + 1) * bs] for b in range(per_epoch)][: total - len(batches)]
    return batches


def _stacked_steps(plans: list[list[torch.Tensor]],
                   bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step: (K, bs) sample indices, (K, bs) sample mask, (K,) client active."""
    k = len(plans)
    for s in range(max((len(p) for p in plans), default=0)):
        idx = torch.zeros(k, bs, dtype=torch.long)
        mask = torch.zeros(k, bs)
        active = torch.zeros(k, dtype=torch.bool)
        for i, p in enumerate(plans):
            if s < len(p):
                b = p[s]
                idx[i, : len(b)] = b
                mask[i, : len(b)] = 1.0
                active[i] = True
        yield idx, mask, active


def _train_group(runtime: ClientRuntime, group: list[tuple[ClientTask, list[torch.Tensor]]]) -> list[ClientReply]:
    ds, cfg, model, spec = runtime.data.dataset, runtime.train, runtime.model, runtime.spec
    tasks = [t for t, _ in group]
    plans = [p for _, p in group]
    k = len(group)
    start = wire.decode(tasks[0].broadcast, expect_spec=runtime.spec_hash).vector
    base = spec.unflatten(start)
    names = [n for n, _ in model.named_parameters()]
    params = {n: base[n].unsqueeze(0).repeat(k, *([1] * base[n].dim())).requires_grad_(True) for n in names}
    anchor = {n: base[n].unsqueeze(0) for n in names}
    bufs = {n: torch.zeros_like(params[n]) for n in names}
    lr = torch.tensor([t.lr for t in tasks])
    mu = runtime.algorithm.cfg.mu if isinstance(runtime.algorithm, FedProx) else 0.0

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (ce * m).sum() / m.sum().clamp(min=1.0)

    batched_loss = vmap(loss_of)
    loss_sum = torch.zeros(k, dtype=torch.float64)
    steps = torch.zeros(k, dtype=torch.long)
    model.train()
    for idx, mask, active in _stacked_steps(plans, cfg.batch_size):
        x = ds.features(ds.x_train[idx.view(-1)])
        x = x.view(k, cfg.batch_size, *x.shape[1:])
        y = ds.y_train[idx]
        losses = batched_loss(params, x, y, mask)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                shape = (k,) + (1,) * (p.dim() - 1)
                on = active.view(shape)
                if cfg.weight_decay:
                    g = g + cfg.weight_decay * p
                if mu:
                    g = g + mu * (p - anchor[n])
                bufs[n] = torch.where(on, cfg.momentum * bufs[n] + g, bufs[n]) if cfg.momentum else g
                p.sub_(torch.where(on, lr.view(shape) * bufs[n], torch.zeros(())))
        loss_sum += torch.where(active, losses.detach().double(), torch.zeros((), dtype=torch.float64))
        steps += active.long()

    replies = []
    for i, task in enumerate(tasks):
        n = len(runtime.data.clients[task.client_id].train_idx)
        final = spec.flatten({nm: params[nm][i].detach() for nm in names})
        s = int(steps[i])
        metrics = {"loss": float(loss_sum[i] / max(s, 1)) if s else float("nan"), "steps": s}
        msg = wire.Message("update", task.round, task.client_id, runtime.spec_hash, final - start, n, metrics)
        replies.append(ClientReply(wire.encode(msg), 0.0, None))
    return replies
