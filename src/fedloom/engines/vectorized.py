"""Many clients trained at once in one process: their models stacked, one batched forward and backward per step.

Client k's parameters are slice k of stacked tensors, and `torch.func.vmap(grad(functional_call))` gives
every client its own gradient in one batched computation. SGD with momentum and weight decay (and
FedProx's proximal term) is then applied to the stacks exactly as `torch.optim.SGD` would apply it to each
client. Each client draws its batches from its own seeded generator in the same order as the sequential
engine, so the result is the same model, to float tolerance.

Where the time goes, and what this engine does about it (measured on the cross-device task T2, where a
client does one step of 6 samples on a 0.8 MB MLP):
- the first step of a round starts every client from the same model, so it is taken with the parameters
  shared (one forward matmul for the whole group, per-client gradients only), and a client whose work is
  that one step writes -lr * gradient straight into its update;
- clients go through in equal groups of at most `GROUP_BYTES` of stacked parameters: the whole round in
  one group streams every step's stacks through main memory and was 40% slower on T2;
- the updates are rows of one matrix the engine keeps across rounds, so the round logic aggregates them
  without stacking copies, and no round pays again for fresh pages of that size.

Clients with unequal amounts of work are grouped by step count (less padding) and padded: a short batch
is masked per sample, and a client that has finished keeps its weights and momentum while the others
step. What cannot be stacked is refused in one line at start-up: models with buffers (BatchNorm) or
dropout, client-specific starting points, algorithms other than FedAvg and FedProx, and feature-noise
clients. Personalized evaluation tasks run one by one, as in the sequential engine. After training, each
client's row goes through `ClientRuntime.finish`, the client pipeline every engine runs (transforms, error
feedback, the upload codec), with that client's own pipeline state.
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ..algorithms import Algorithm
from ..algorithms.drift import FedProx
from ..client.trainer import batch_indices, step_count
from ..client.work import ClientRuntime, ClientTask
from ..errors import ConfigError
from ..params import ReusedBuffer
from ..pipeline import wire
from ..rng import torch_rng
from .base import ClientFailure, ClientReply
from .sequential import SequentialEngine

GROUP_BYTES = 32 * 2**20  # stacked parameters per group at most (T2: 16-64 MB within 10%; 80 MB, one group: +40%)
MAX_GROUP = 256  # clients per group at most; bounds activation memory for tiny models
_SUPPORTED = (Algorithm, FedProx)


class VectorizedEngine:
    name = "vectorized"

    def __init__(self) -> None:
        self._fallback = SequentialEngine()
        self._updates = ReusedBuffer()  # the (clients, parameters) update matrix, kept across rounds
        self._checked: ClientRuntime | None = None

    def check(self, runtime: ClientRuntime) -> None:
        if runtime is self._checked:
            return
        why = unsupported(runtime)
        if why:
            raise ConfigError(f"the vectorized engine cannot run this experiment: {why}",
                              "use engine = \"parallel\" or \"sequential\"")
        self._checked = runtime

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        self.check(runtime)
        out: dict[int, ClientReply | ClientFailure] = {}
        fits = [t for t in tasks if t.kind == "fit"]
        others = [t for t in tasks if t.kind != "fit"]
        for task, res in zip(others, self._fallback.fit(runtime, others), strict=True):
            out[id(task)] = res
        if fits:
            for task, res in zip(fits, self._fit(runtime, fits), strict=True):
                out[id(task)] = res
        return [out[id(t)] for t in tasks]

    def _fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        plans = [_plan(runtime, t) for t in tasks]
        # the last fit's update rows were the round logic's to read within that round only (a caller keeping
        # a reply's update past the next fit clones it): they may be lent again
        self._updates.release()
        updates = self._updates.get(len(tasks), runtime.spec.size)
        starts: dict[int, torch.Tensor] = {}
        for t in tasks:
            if id(t.broadcast) not in starts:
                starts[id(t.broadcast)] = wire.decode(t.broadcast, expect_spec=runtime.spec_hash).vector
        losses = torch.full((len(tasks),), float("nan"), dtype=torch.float64)
        seconds = [0.0] * len(tasks)
        failed: dict[int, str] = {}
        most = max(1, min(MAX_GROUP, GROUP_BYTES // (4 * runtime.spec.size)))
        # same starting point and similar step counts together: less padding
        order = sorted(range(len(tasks)), key=lambda i: (id(tasks[i].broadcast), len(plans[i])))
        for i in order:
            if not plans[i]:
                updates[i].zero_()  # no data: no update (and num_examples 0, so the round skips it)
        for b, same in itertools.groupby((i for i in order if plans[i]), key=lambda i: id(tasks[i].broadcast)):
            rows_all = list(same)
            size = math.ceil(len(rows_all) / math.ceil(len(rows_all) / most))  # equal groups of at most `most`
            for s in range(0, len(rows_all), size):
                rows = rows_all[s : s + size]
                t0 = time.perf_counter()
                try:
                    losses[rows] = _train_group(runtime, starts[b], [plans[i] for i in rows],
                                                torch.tensor([tasks[i].lr for i in rows]), updates, rows)
                except Exception as e:  # noqa: BLE001 - a failure of the stacked step fails every client in it
                    tb = traceback.format_exc()
                    for i in rows:
                        failed[i] = f"vectorized group of {len(rows)} clients failed: {e}\n{tb}"
                per = (time.perf_counter() - t0) / len(rows)  # the group's time, shared: clients ran together
                for i in rows:
                    seconds[i] = per
        replies: list[ClientReply | ClientFailure] = []
        for i, task in enumerate(tasks):
            if i in failed:
                replies.append(ClientFailure(task.client_id, failed[i]))
                continue
            n = len(runtime.data.clients[task.client_id].train_idx)
            metrics = {"loss": float(losses[i]), "steps": len(plans[i])}
            t0 = time.perf_counter()
            try:  # the same client pipeline as every engine: transforms, error feedback, the upload codec
                result = runtime.finish(task, updates[i], n, metrics)
                msg, nbytes = wire.passthrough(result.message)
            except Exception:  # noqa: BLE001 - the round logic decides: fail the round or drop the client
                replies.append(ClientFailure(task.client_id, traceback.format_exc()))
                continue
            replies.append(ClientReply(msg, nbytes, seconds[i] + time.perf_counter() - t0, result.state))
        return replies

    def close(self) -> None:
        self._updates.clear()
        self._checked = None


def unsupported(runtime: ClientRuntime) -> str | None:
    alg = runtime.algorithm
    if runtime.attack is not None:
        return f"attack '{runtime.attack.kind}' acts inside each client's own training (sequential, parallel, ray)"
    if type(alg) not in _SUPPORTED:
        return f"algorithm '{alg.name}' is not vectorized (fedavg and fedprox are)"
    if runtime.shared is not None:
        return f"algorithm '{alg.name}' starts clients from different models"
    if runtime.pipeline_config.download_delta:
        return "pipeline.download_delta starts clients from the models they hold"
    if any(True for _ in runtime.model.buffers()):
        return "the model has buffers (e.g. BatchNorm statistics), which differ per client"
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in runtime.model.modules()):
        return "the model has dropout, which draws random masks per client and step"
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
    return list(batch_indices(torch.as_tensor(client.train_idx, dtype=torch.long), cfg.batch_size,
                              step_count(n, cfg.batch_size, epochs, steps),
                              torch_rng(task.seed, "train", task.round, task.client_id)))


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


def _train_group(runtime: ClientRuntime, start: torch.Tensor, plans: list[list[torch.Tensor]], lr: torch.Tensor,
                 updates: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Train one group of clients from `start`; write their updates into `updates[rows]`; return their mean loss."""
    ds, cfg, model, spec = runtime.data.dataset, runtime.train, runtime.model, runtime.spec
    k = len(plans)
    base = {n: v.unsqueeze(0) for n, v in spec.unflatten(start).items()}  # (1, ...): broadcasts over clients
    mu = runtime.algorithm.cfg.mu if isinstance(runtime.algorithm, FedProx) else 0.0
    total = max(len(p) for p in plans)

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (ce * m).sum() / m.sum().clamp(min=1.0)

    first_step = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0, 0))  # parameters shared, gradients per client
    step = vmap(grad_and_value(loss_of))
    params: dict[str, torch.Tensor] = {}
    bufs: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros(k, dtype=torch.float64)
    steps = torch.zeros(k, dtype=torch.long)
    contiguous = rows == list(range(rows[0], rows[0] + k))
    out = updates[rows[0] : rows[0] + k] if contiguous else torch.empty(k, spec.size)
    model.train()
    for s, (idx, mask, active) in enumerate(_stacked_steps(plans, cfg.batch_size)):
        x = ds.features(ds.x_train[idx.view(-1)])
        x = x.view(k, cfg.batch_size, *x.shape[1:])
        y = ds.y_train[idx]
        if s == 0:  # every client starts from the same model: one shared copy, no stacks yet
            grads, losses = first_step({n: v[0] for n, v in base.items()}, x, y, mask)
        else:
            grads, losses = step(params, x, y, mask)
        all_on = bool(active.all())
        with torch.no_grad():
            for n, g in grads.items():
                e = spec[n]
                shape = (k,) + (1,) * (g.dim() - 1)
                p = params.get(n, base[n])
                if cfg.weight_decay:
                    g = g.add_(p, alpha=cfg.weight_decay)
                if mu and s > 0:
                    g = g.add_(p - base[n], alpha=mu)
                if cfg.momentum:
                    if s == 0:
                        bufs[n] = g  # torch.optim.SGD's first step: the buffer is the gradient
                    elif all_on:
                        bufs[n].mul_(cfg.momentum).add_(g)
                    else:
                        on = active.view(shape)
                        bufs[n] = torch.where(on, bufs[n] * cfg.momentum + g, bufs[n])
                    g = bufs[n]
                if s == 0 and total == 1:  # the update is the one step: straight into the output rows
                    torch.mul(g.view(k, -1), -lr.view(k, 1), out=out[:, e.offset : e.offset + e.numel])
                    continue
                step_ = g * lr.view(shape)
                if s == 0:
                    params[n] = p - step_
                elif all_on:
                    params[n].sub_(step_)
                else:
                    params[n].sub_(torch.where(active.view(shape), step_, torch.zeros(())))
        loss_sum += torch.where(active, losses.detach().double(), torch.zeros((), dtype=torch.float64))
        steps += active.long()
    if total > 1:
        with torch.no_grad():
            for n, p in params.items():
                e = spec[n]
                torch.sub(p.view(k, -1), base[n].view(1, -1), out=out[:, e.offset : e.offset + e.numel])
    if not contiguous:
        updates.index_copy_(0, torch.tensor(rows), out)
    return loss_sum / steps.clamp(min=1)
