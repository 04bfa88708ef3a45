"""The round logic, written once: selection -> broadcast -> client work -> aggregation -> evaluation.

`Federation` owns the global state (flat parameter vector + server optimizer state) and records each
round in the run store in one transaction, after its checkpoint is on disk; so a run killed at any
moment resumes from its last recorded round and, because every random draw is derived from
(seed, round, client), finishes with the same model as a run that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .algorithms import build_algorithm
from .attacks import Backdoor, backdoor_success, build_attack, with_collusion
from .callbacks import STOP, StopRun, stop_message
from .client.state_store import ClientStateStore
from .client.trainer import round_lr
from .client.work import ALG, ClientRuntime, ClientTask, joined, part
from .config import ExperimentConfig
from .data.federated import FederatedData
from .engines import ClientFailure, Engine
from .errors import ClientError
from .evaluation import Predictions, client_summaries, predict
from .metrics import fairness, spread
from .models.layout import fast_layout
from .params import ParamSpec, ReusedBuffer, load_tensors, load_vector, model_vector, save_tensors, stack_rows
from .pipeline import wire
from .pipeline.codecs import parse_codec
from .rng import numpy_rng, torch_rng
from .server.detection import Detector, Scores, flag_threshold, precision_recall
from .server.robust import FLTrust, RootTrainer, RoundContext, cap_shares
from .store import RunStore

Callback = Callable[[dict[str, Any]], Any]  # returns fedloom.STOP (or raises StopRun) to stop
log = logging.getLogger(__name__)
EVAL_CHUNK = 256  # clients per batch of personalized evaluation tasks


@dataclass
class RoundOutcome:
    round: int
    row: dict[str, Any]
    stop: str | None = None  # why the run must stop now (divergence), in plain words
    updated: bool = True  # False when the round's updates were refused (non-finite)
    failed_clients: list[int] = field(default_factory=list)


class Federation:
    def __init__(self, cfg: ExperimentConfig, data: FederatedData, model_factory: Callable[[], torch.nn.Module],
                 engine: Engine, store: RunStore, run_id: str, out_dir: Path):
        self.cfg, self.data, self.engine = cfg, data, engine
        self.store, self.run_id, self.out_dir = store, run_id, out_dir
        self.model = fast_layout(model_factory())  # seeded: this is the initial global model
        self.algorithm = build_algorithm(cfg.server, data.num_clients)
        self.runtime = ClientRuntime(model_factory, data, cfg.train, self.algorithm, cfg.eval, cfg.pipeline)
        self.spec: ParamSpec = self.runtime.spec
        self.shared = self.runtime.shared  # entries that travel (None: all)
        self.runtime.attack = build_attack(cfg, data.dataset.num_classes)  # before the engine sees the runtime
        engine.check(self.runtime)
        self.params = model_vector(self.model, self.spec)
        self.opt_state = self.algorithm.server_optimizer.init(self.params)
        self.alg_state = self.algorithm.init_state(self._shared(self.params))
        # what each client keeps across rounds (algorithm and pipeline state): on disk, per client and round
        self.client_store = ClientStateStore(out_dir / "client_state.sqlite")
        self.download = parse_codec(cfg.pipeline.download)
        # download_delta: the reconstruction the holders have of the last broadcast, its round, and who holds it
        self.down_ref: torch.Tensor | None = None
        self.down_round = 0
        self.down_holders: set[int] = set()
        self._down_pending: tuple[torch.Tensor, int, set[int]] | None = None
        self.personalized = self.algorithm.personalizes or cfg.eval.finetune_epochs > 0
        self.train_losses: list[float] = []
        self._updates = ReusedBuffer()  # the round's stacked updates
        self._init_defences()

    def _init_defences(self) -> None:
        """The robust aggregator's server state, FLTrust's root set, and the suspicion detector."""
        cfg, agg = self.cfg, self.algorithm.aggregator
        self.agg_state: dict[str, torch.Tensor] = {}  # checkpointed as aggregator/...
        self.root = (RootTrainer(self.runtime, agg.params["root_size"], cfg.run.seed)
                     if isinstance(agg, FLTrust) else None)
        detect = cfg.server.detect
        if detect is None:
            detect = (self.runtime.attack is not None or cfg.server.exclude_suspicion is not None
                      or getattr(agg, "sees_clients", False))
        width = self.spec.size if self.shared is None else int(self.shared.sum())
        self.detector = Detector(width, cfg.run.seed) if detect else None

    def close(self) -> None:
        self.client_store.close()

    @property
    def client_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every client's algorithm state as of now, read from the store (for inspection and tests)."""
        return {c: part(s, ALG) for c, s in self.client_store.get_many(self.client_store.clients()).items()}

    def _shared(self, vec: torch.Tensor) -> torch.Tensor:
        return vec if self.shared is None else vec[self.shared]

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, round_: int) -> Path:
        path = self.out_dir / "checkpoints" / f"round-{round_:05d}.safetensors"
        tensors = {f"model/{k}": v for k, v in self.spec.unflatten(self.params).items()}
        tensors.update({f"server/{k}": v for k, v in self.opt_state.items()})
        tensors.update({f"algorithm/{k}": v for k, v in self.alg_state.items()})
        tensors.update({f"aggregator/{k}": v for k, v in self.agg_state.items()})
        if self.detector is not None:
            tensors.update({f"detect/{k}": v for k, v in self.detector.state().items()})
        if self.down_ref is not None:
            tensors.update({"download/ref": self.down_ref, "download/round": torch.tensor(self.down_round),
                            "download/holders": torch.tensor(sorted(self.down_holders), dtype=torch.int64)})
        # client states are not in the checkpoint: the client state store holds every client's version at or
        # before this round, and resuming from here drops the newer ones
        save_tensors(path, tensors, {"round": round_, "spec": self.spec.hash(), "run_id": self.run_id})
        return path

    def prune_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints`, and the newest checkpoint at or before the best evaluated round:
        when a run diverges, the newest are the diverging models, and that one is the last good model."""
        ckpts = sorted((self.out_dir / "checkpoints").glob("round-*.safetensors"))
        best = self.store.best_checkpoint(self.run_id)
        keep = {p.name for p in ckpts[-self.cfg.run.keep_checkpoints:]} | ({Path(best).name} if best else set())
        for old in ckpts:
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path) -> None:
        tensors = load_tensors(path)
        model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        self.params = self.spec.flatten(model)
        self.opt_state = {k[len("server/"):]: v for k, v in tensors.items() if k.startswith("server/")}
        self.alg_state = {k[len("algorithm/"):]: v for k, v in tensors.items() if k.startswith("algorithm/")}
        self.agg_state = {k[len("aggregator/"):]: v for k, v in tensors.items() if k.startswith("aggregator/")}
        if self.detector is not None:
            self.detector.load({k[len("detect/"):]: v for k, v in tensors.items() if k.startswith("detect/")})
        if "download/ref" in tensors:
            self.down_ref, self.down_round = tensors["download/ref"], int(tensors["download/round"])
            self.down_holders = {int(c) for c in tensors["download/holders"].tolist()}
        legacy: dict[int, dict[str, torch.Tensor]] = {}  # checkpoints before the client state store held them
        for k, v in tensors.items():
            if k.startswith("client/"):
                _, cid, name = k.split("/", 2)
                legacy.setdefault(int(cid), {})[name] = v
        with safe_open(str(path), "pt") as f:
            rnd = int((f.metadata() or {}).get("round", 0))
        self.client_store.truncate_after(rnd)  # client states pair with this checkpoint: none newer
        if legacy:
            self.client_store.put(rnd, {c: joined(st, {}) for c, st in legacy.items()})
        self.train_losses = [r["train_loss"] for r in self.store.rounds(self.run_id)
                             if r["train_loss"] is not None]

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self, start_round: int, wall_before: float = 0.0, callback: Callback | None = None
              ) -> tuple[str, str | None]:
        """Rounds `start_round..cfg.run.rounds`; returns the final status and, if stopped early, why."""
        t_start = time.perf_counter()
        total = self.cfg.run.rounds
        self.client_store.truncate_after(start_round - 1)  # versions from a killed attempt at these rounds
        with interrupt_between_rounds() as interrupted:
            return self._train(start_round, total, t_start, wall_before, callback, interrupted)

    def _train(self, start_round: int, total: int, t_start: float, wall_before: float, callback: Callback | None,
               interrupted: Callable[[], bool]) -> tuple[str, str | None]:
        for r in range(start_round, total + 1):
            if interrupted():
                raise KeyboardInterrupt
            out = self.run_round(r)
            row = out.row
            if out.updated and (r % self.cfg.run.checkpoint_every == 0 or r == total or out.stop):
                row["checkpoint"] = str(self.save_checkpoint(r))
            wall = wall_before + time.perf_counter() - t_start
            clients = row.pop("clients")
            self.store.record_round(self.run_id, r, row, clients, wall)
            self.prune_checkpoints()
            self._prune_client_states()
            halt = self._call_back(callback, {"run_id": self.run_id, "round": r, "rounds": total, **row,
                                              "clients": clients}) if callback else None
            if out.stop:
                return "diverged", out.stop
            if halt is not None:
                return "stopped", halt
        if interrupted():
            raise KeyboardInterrupt
        return "completed", None

    @staticmethod
    def _call_back(callback: Callback, event: dict[str, Any]) -> str | None:
        """The callback on a recorded round (docs/guide.md, "Callbacks"); the run's message if it asks to stop,
        by returning `fedloom.STOP` or raising `fedloom.StopRun(reason)`."""
        try:
            answer = callback(event)
        except StopRun as e:
            return stop_message(event["round"], e.reason)
        return stop_message(event["round"], None) if answer is STOP else None

    # ---- one round --------------------------------------------------------------------------------
    def select(self, round_: int) -> list[int]:
        k = self.cfg.clients_per_round()
        n = self.data.num_clients
        if k >= n:
            return list(range(n))
        return sorted(int(c) for c in numpy_rng(self.cfg.run.seed, "select", round_).choice(n, k, replace=False))

    def _prune_client_states(self) -> None:
        """Drop client state versions that no checkpoint on disk can need any more."""
        ckpts = sorted((self.out_dir / "checkpoints").glob("round-*.safetensors"))
        if ckpts:
            self.client_store.prune(int(ckpts[0].stem.split("-")[1]))

    def _broadcast_vector(self) -> torch.Tensor:
        return torch.cat([self._shared(self.params), *self.algorithm.broadcast_extras(self.alg_state)])

    def broadcast(self, round_: int) -> bytes:
        """The global model (and the algorithm's extras) as the clients receive it: encoded with the download
        codec; every client starts from what it decodes, while the server keeps its exact model."""
        return self._encode_broadcast(round_, self._broadcast_vector())

    def _encode_broadcast(self, round_: int, vec: torch.Tensor, delta_of: int | None = None) -> bytes:
        msg = wire.Message("broadcast", round_, -1, self.spec.hash(), vec, codec=self.download.spec,
                           metrics={} if delta_of is None else {"delta_of": delta_of})
        if not self.download.lossless:
            msg.payload = self.download.encode(vec, torch_rng(self.cfg.run.seed, "download", round_, delta_of or 0))
        return wire.encode(msg)

    def broadcasts(self, round_: int, clients: list[int]) -> dict[int, bytes]:
        """What each client is sent. With `pipeline.download_delta`, a client that holds last round's model gets
        only the change since, encoded with the download codec; the others get the model. The reference the
        holders end up with is committed when the round is (`_commit_download`)."""
        vec = self._broadcast_vector()
        full = self._encode_broadcast(round_, vec)
        if not self.cfg.pipeline.download_delta:
            return dict.fromkeys(clients, full)
        holders = [c for c in clients if c in self.down_holders and self.down_ref is not None]
        if not holders:  # everyone starts from the model's reconstruction, which becomes the reference
            self._down_pending = (wire.decode(full).vector, round_, set(clients))
            return dict.fromkeys(clients, full)
        assert self.down_ref is not None
        delta = self._encode_broadcast(round_, vec - self.down_ref, delta_of=self.down_round)
        ref = self.down_ref + wire.decode(delta).vector  # what the holders reconstruct, exactly
        self._down_pending = (ref, round_, set(holders))
        return {c: delta if c in self.down_holders else full for c in clients}

    def _commit_download(self, stored: set[int]) -> None:
        """The round counted: its reference stands, held by the recipients whose new state was kept."""
        if self._down_pending is not None:
            ref, round_, holders = self._down_pending
            self.down_ref, self.down_round, self.down_holders = ref, round_, holders & stored
            self._down_pending = None

    def local_work(self, round_: int, selected: list[int]) -> tuple[dict[int, tuple[int, int]], list[int]]:
        """(epochs, steps) per selected client, the config's or drawn for unequal work and stragglers; and
        the stragglers dropped, when the config drops them instead of using their partial work."""
        t = self.cfg.train
        work, dropped = {}, []
        for c in selected:
            if t.local_epochs_max:
                rng = numpy_rng(self.cfg.run.seed, "work", round_, c)
                work[c] = (int(rng.integers(t.local_epochs, t.local_epochs_max + 1)), t.local_steps)
            else:
                work[c] = (t.local_epochs, t.local_steps)
        k = round(t.straggler_fraction * len(selected))
        if k:  # FedProx's systems heterogeneity: stragglers finish 1..E epochs (or 1..S steps), uniformly
            for c in numpy_rng(self.cfg.run.seed, "stragglers", round_).choice(selected, k, replace=False):
                rng = numpy_rng(self.cfg.run.seed, "straggler-work", round_, int(c))
                e, s = work[int(c)]
                work[int(c)] = (e, int(rng.integers(1, s + 1))) if s else (int(rng.integers(1, e + 1)), 0)
                if t.drop_stragglers:
                    dropped.append(int(c))
        return work, sorted(dropped)

    def run_round(self, round_: int) -> RoundOutcome:
        cfg = self.cfg
        t0 = time.perf_counter()
        selected = self.select(round_)
        sent = self.broadcasts(round_, selected)
        lr = round_lr(cfg.train, round_, cfg.run.rounds)
        work, stragglers_dropped = self.local_work(round_, selected)
        running = [c for c in selected if c not in stragglers_dropped]
        states = self.client_store.get_many(running)
        tasks = [ClientTask(round_, c, lr, cfg.run.seed, sent[c], epochs=work[c][0], steps=work[c][1],
                            state=states.get(c, {}))
                 for c in running]
        # colluding attackers (ALIE, IPM) first train honestly and share what they learnt: a pass of their own
        tasks = with_collusion(self.runtime.attack, tasks, lambda acting: self.engine.fit(self.runtime, acting))
        results = self.engine.fit(self.runtime, tasks)
        t_train = time.perf_counter() - t0

        messages, failed, new_states, errors = [], [], {}, {}
        for res in results:
            if isinstance(res, ClientFailure):
                if cfg.run.on_client_error == "fail":
                    raise ClientError(round_, res.client_id, res.traceback)
                failed.append(res.client_id)
                errors[str(res.client_id)] = _last_line(res.traceback)
                log.warning("round %d: client %d dropped: %s", round_, res.client_id, errors[str(res.client_id)])
                continue
            msg = res.message
            msg.metrics["seconds"] = res.seconds
            messages.append((res.nbytes, msg))
            if res.state is not None:
                new_states[msg.client_id] = res.state
        bytes_down = sum(len(b) for b in sent.values())  # stragglers dropped later were sent the model too
        bytes_up = sum(n for n, _ in messages)
        messages = [(n, m) for n, m in messages if m.num_examples > 0]
        if not messages:
            raise ClientError(round_, -1, "no client returned an update with at least one example")

        t1 = time.perf_counter()
        self._updates.release()  # nothing reads the last round's stack any more: it may be lent again
        updates = stack_rows([m.vector for _, m in messages], self._updates)
        size = updates.shape[1] // (1 + self.algorithm.extras)  # the parameter update; SCAFFOLD's Δc follows
        ids = [m.client_id for _, m in messages]
        excluded = self._non_finite_clients(messages, updates)  # client -> why its update is left out
        scores, sketches, scored = self._suspicion(round_, ids, updates[:, :size], excluded)
        keep = [i for i, c in enumerate(ids) if c not in excluded]
        agg, alg_state, agg_state, info = (self._aggregate(round_, lr, messages, updates, keep) if keep
                                           else (None, self.alg_state, self.agg_state, {}))
        client_rows, stats = self._update_stats(messages, updates[:, :size],
                                                torch.zeros(size) if agg is None else agg, keep)
        kept = [messages[i][1] for i in keep]
        train_loss = (float(np.average([m.metrics["loss"] for m in kept], weights=[m.num_examples for m in kept]))
                      if kept else float("nan"))
        stop = self._non_finite(round_, excluded, agg, train_loss)
        updated = stop is None
        if updated:
            assert agg is not None
            if self.shared is not None:
                agg = torch.zeros_like(self.params).masked_scatter_(self.shared, agg)
            self.params, self.opt_state = self.algorithm.server_step(self.params, agg, self.opt_state)
            self.alg_state, self.agg_state = alg_state, agg_state
            if self.detector is not None and sketches is not None:
                self.detector.commit(scored, sketches)
            kept_states = {c: st for c, st in new_states.items() if not excluded.get(c, "").startswith("non-finite")}
            self.client_store.put(round_, kept_states)
            self._commit_download(set(kept_states))
        info.update(self._detection_info(round_, ids, excluded, scores, scored, client_rows))
        t_agg = time.perf_counter() - t1

        row: dict[str, Any] = {
            "num_clients": len(keep), "bytes_up": bytes_up, "bytes_down": bytes_down,
            "train_loss": train_loss,
            "metrics": {"lr": lr, **stats, "train_seconds": t_train, "aggregate_seconds": t_agg,
                        "dropped_clients": failed, "dropped_stragglers": stragglers_dropped, "updated": updated,
                        "engine": self.engine.name, **({"client_errors": errors} if errors else {}),
                        **self.algorithm.describe(), **self._pipeline_info(), **info},
        }
        if updated:
            self.train_losses.append(train_loss)
            stop = self._rising_loss(round_)
            if round_ % cfg.eval.every == 0 or round_ == cfg.run.rounds or stop:
                t2 = time.perf_counter()
                client_rows += self._evaluate(row)
                if isinstance(self.runtime.attack, Backdoor):  # the global model as _evaluate loaded it
                    row["metrics"]["backdoor_success"] = backdoor_success(
                        self.model, self.data.dataset, self.runtime.attack, cfg.eval.batch_size)
                if self.personalized:
                    client_rows += self._evaluate_personalized(round_, row)
                row["metrics"]["eval_seconds"] = time.perf_counter() - t2
        row["seconds"] = time.perf_counter() - t0
        return RoundOutcome(round_, row | {"clients": client_rows}, stop, updated, failed)

    def _pipeline_info(self) -> dict[str, Any]:
        """What the round's messages went through, when it is not the plain f32 path."""
        info = self.runtime.pipeline.describe()
        if self.runtime.pipeline.identity:
            info = {}
        if self.download.spec != "f32":
            info["download_codec"] = self.download.spec
        if self.cfg.pipeline.download_delta:
            info["download_delta"] = True
        if self.algorithm.aggregator.name != "mean":
            info["aggregator"] = self.algorithm.aggregator.name
            describe = getattr(self.algorithm.aggregator, "describe", None)
            if describe is not None and describe():
                info["aggregator_params"] = describe()
        if self.runtime.attack is not None:
            info["attack"] = self.runtime.attack.kind
        return info

    def _update_stats(self, messages, updates: torch.Tensor, agg: torch.Tensor, keep: list[int]):
        """Per-client update statistics, computed for all clients at once: one pass each for the norms, the
        sums and the projections on the aggregate (the std follows from the norm and the sum). The round's
        summary covers the aggregated updates (`keep`), never a dropped NaN."""
        norms = torch.linalg.vector_norm(updates, dim=1)
        agg_norm = agg.norm()
        sums = updates.sum(dim=1).double()
        dots = updates @ agg
        d = updates.shape[1]
        mean = sums / d
        std = ((norms.double() ** 2 - d * mean**2) / max(d - 1, 1)).clamp(min=0).sqrt()
        cos = dots / (norms * agg_norm).clamp(min=1e-12)
        cols = zip(norms.tolist(), mean.tolist(), std.tolist(), cos.tolist(), strict=True)
        rows = [
            {"client_id": m.client_id, "kind": "fit", "num_examples": m.num_examples, "loss": m.metrics["loss"],
             "update_norm": nm, "update_mean": mu, "update_std": sd, "cosine": c, "bytes_up": n,
             "seconds": m.metrics.get("seconds"), "metrics": m.metrics}  # the algorithm's own: stored as JSON
            for (n, m), (nm, mu, sd, c) in zip(messages, cols, strict=True)
        ]
        if not keep:
            return rows, {}
        k = torch.tensor(keep)
        stats = {"update_norm_mean": float(norms[k].mean()), "update_norm_max": float(norms[k].max()),
                 "cosine_mean": float(cos[k].mean()), "aggregate_norm": float(agg_norm)}
        return rows, stats

    def _non_finite_clients(self, messages, updates: torch.Tensor) -> dict[int, str]:
        """Clients whose update (any entry, SCAFFOLD's Δc included) is NaN/Inf or past float32's range, or whose
        training loss is not finite: each is dropped from the round and flagged; the others go on."""
        norms = torch.linalg.vector_norm(updates, dim=1).tolist()
        out = {}
        for (_, m), nm in zip(messages, norms, strict=True):
            if not math.isfinite(nm):
                out[m.client_id] = "non-finite update (NaN/Inf)"
            elif not math.isfinite(m.metrics["loss"]):
                out[m.client_id] = "non-finite training loss"
        for c, why in out.items():
            log.warning("client %d dropped from the round: %s", c, why)
        return out

    def _non_finite(self, round_: int, excluded: dict[int, str], agg: torch.Tensor | None,
                    train_loss: float) -> str | None:
        """The run stops when no update is finite, or when the aggregate of the finite ones is not."""
        from .errors import learning_rate_hint

        if agg is None:
            bad = sorted(c for c, why in excluded.items() if why.startswith("non-finite"))
            return (f"diverged in round {round_}: every update (clients {bad}) produced NaN/Inf, so the global "
                    f"model was not updated; {learning_rate_hint(self.cfg)}")
        if not torch.isfinite(agg).all() or not math.isfinite(train_loss):
            return (f"diverged in round {round_}: the aggregate produced NaN/Inf, so the global model was not "
                    f"updated; {learning_rate_hint(self.cfg)}")
        return None

    def _suspicion(self, round_: int, ids: list[int], updates: torch.Tensor, excluded: dict[int, str]
                   ) -> tuple[Scores | None, torch.Tensor | None, list[int]]:
        """Suspicion scores of the finite updates (when detection is on), and with `server.exclude_suspicion`,
        those at or above it left out (never all of them). Returns the scores, the sketches to commit and the
        scored client ids."""
        rows = [i for i, c in enumerate(ids) if c not in excluded]
        if self.detector is None or not rows:
            return None, None, []
        scored = [ids[i] for i in rows]
        scores, sketches = self.detector.score(round_, scored, updates if len(rows) == len(ids) else updates[rows])
        thr = self.cfg.server.exclude_suspicion
        if thr is not None:
            out = {c: s for c, s in zip(scored, scores.suspicion, strict=True) if s is not None and s >= thr}
            if len(out) < len(scored):
                excluded.update({c: f"suspicion {s:.2f} >= {thr}" for c, s in out.items()})
        return scores, sketches, scored

    def _example_counts(self, kept: list[Any]) -> tuple[list[Any], dict[str, int]]:
        """The example counts the aggregation weighs with: a claim above the client's train size is cut to it,
        and with `server.max_example_weight` no client's share of the weights exceeds it."""
        claimed = [m.num_examples for m in kept]
        held = [len(self.data.clients[m.client_id].train_idx) for m in kept]
        clipped = {str(m.client_id): c for m, c, h in zip(kept, claimed, held, strict=True) if c > h}
        counts: list[Any] = [min(c, h) for c, h in zip(claimed, held, strict=True)] if clipped else claimed
        if self.cfg.server.max_example_weight is not None:
            counts = cap_shares(counts, self.cfg.server.max_example_weight)
        return counts, clipped

    def _aggregate(self, round_: int, lr: float, messages, updates: torch.Tensor, keep: list[int]):
        """The algorithm's aggregate of the kept updates, through the configured aggregator (which gets the
        round's context first, and checks its breakdown condition with the clients actually aggregated)."""
        kept = [messages[i][1] for i in keep]
        sub = updates if len(keep) == len(messages) else updates[keep]
        counts, clipped = self._example_counts(kept)
        aggregator = self.algorithm.aggregator
        check = getattr(aggregator, "check", None)
        if check is not None:
            check(len(kept), where=f"round {round_} ({len(messages) - len(kept)} of {len(messages)} updates "
                                   f"left out)")
        ctx = None
        if hasattr(aggregator, "context"):
            root = self.root
            ctx = RoundContext(round_, [m.client_id for m in kept], self.cfg.run.seed, dict(self.agg_state),
                               (lambda: root(round_, lr, self.params)) if root is not None else None)
            aggregator.context = ctx
        try:
            agg, alg_state = self.algorithm.aggregate(sub, counts, [m.metrics for m in kept], self.alg_state, lr)
        finally:
            if ctx is not None:
                aggregator.context = None
        info: dict[str, Any] = {"examples_clipped": clipped} if clipped else {}
        if ctx is not None and ctx.notes:
            info["aggregator_notes"] = ctx.notes
        return agg, alg_state, (ctx.state if ctx is not None else self.agg_state), info

    def _detection_info(self, round_: int, ids: list[int], excluded: dict[int, str], scores: Scores | None,
                        scored: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Who was left out and why, who attacked, the suspicion scores (into the client rows), and the
        detection's precision and recall against the attackers when the run has them."""
        attack = self.runtime.attack
        info: dict[str, Any] = {}
        if excluded:
            info["excluded_clients"] = {str(c): why for c, why in excluded.items()}
        attackers = {c for c in ids if attack is not None and attack.acts(round_, c)}
        if attack is not None:
            info["attackers"] = sorted(attackers)
        at = {c: j for j, c in enumerate(scored)}
        for r in rows:
            c = r["client_id"]
            r["excluded"] = excluded.get(c)
            r["attacker"] = None if attack is None else int(c in attackers)
            if scores is not None and c in at:
                r["suspicion"], r["cosine_prev"] = scores.suspicion[at[c]], scores.cosine_prev[at[c]]
        if scores is not None:
            thr = flag_threshold(self.cfg.server.exclude_suspicion)
            values = [s for s in scores.suspicion if s is not None]
            flagged = {c for c, s in zip(scored, scores.suspicion, strict=True) if s is not None and s >= thr}
            info.update(flagged=sorted(flagged), suspicion_max=max(values) if values else None)
            if attack is not None and values:
                precision, recall = precision_recall(flagged, attackers & set(scored))
                info.update(detect_precision=precision, detect_recall=recall)
        return info

    def _rising_loss(self, round_: int) -> str | None:
        from .errors import learning_rate_hint

        run = self.cfg.run
        h = self.train_losses
        if not run.stop_on_divergence or len(h) <= run.divergence_patience:
            return None
        recent = h[-(run.divergence_patience + 1):]
        rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
        if rising and recent[-1] > run.divergence_factor * min(h):
            return (f"diverging at round {round_}: training loss rose for {run.divergence_patience} rounds in a "
                    f"row to {recent[-1]:.4g} ({recent[-1] / min(h):.1f}x its best {min(h):.4g}); "
                    f"{learning_rate_hint(self.cfg)}")
        return None

    def _evaluate(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        ds = self.data.dataset
        load_vector(self.model, self.spec, self.params)
        preds: Predictions = predict(self.model, ds, ds.x_test, ds.y_test, self.cfg.eval.batch_size)
        central = preds.summary(ds.num_classes)
        row.update(test_loss=central["loss"], test_accuracy=central["accuracy"],
                   test_macro_f1=central["macro_f1"])
        if not self.cfg.eval.federated:
            return []
        clients = self.data.clients
        rows = [{"client_id": c.id, "kind": "eval", **s}
                for c, s in zip(clients, client_summaries(preds, [c.test_idx for c in clients], ds.num_classes),
                                strict=True)]
        _summarize_clients(row["metrics"], rows, "fed", "fair")
        return rows

    def _evaluate_personalized(self, round_: int, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Every client that has a model of its own personalizes the global model its own way and tests it on its
        own split. Clients without one (no training data; Ditto's or FedBN's never sampled) would only repeat the
        global model under another name: they are left out, and `pers_clients` says how many are in."""
        broadcast = self.broadcast(round_)
        rows: list[dict[str, Any]] = []
        sent = received = 0
        clients = self.data.clients
        for i in range(0, len(clients), EVAL_CHUNK):  # states read a chunk at a time: memory stays bounded
            chunk = clients[i : i + EVAL_CHUNK]
            states = self.client_store.get_many(c.id for c in chunk)
            own = [c for c in chunk
                   if len(c.train_idx) > 0 and self.algorithm.has_personal_model(part(states.get(c.id, {}), ALG))]
            tasks = [ClientTask(round_, c.id, self.cfg.train.lr, self.cfg.run.seed, broadcast, kind="evaluate",
                                state=states.get(c.id, {})) for c in own]
            sent += len(broadcast) * len(tasks)
            for res in self.engine.fit(self.runtime, tasks):
                if isinstance(res, ClientFailure):
                    if self.cfg.run.on_client_error == "fail":
                        raise ClientError(round_, res.client_id, res.traceback)
                    continue
                msg = res.message
                received += res.nbytes
                rows.append({"client_id": msg.client_id, "kind": "personal", "num_examples": msg.num_examples,
                             "loss": msg.metrics["loss"], "accuracy": msg.metrics["accuracy"],
                             "macro_f1": msg.metrics["macro_f1"], "seconds": res.seconds})
        # measured apart from training traffic: personalized evaluation is how fedloom reports, not how it trains
        row["metrics"]["eval_bytes_down"], row["metrics"]["eval_bytes_up"] = sent, received
        row["metrics"]["pers_clients"] = len(rows)
        _summarize_clients(row["metrics"], rows, "pers", "pers_fair")
        return rows


@contextmanager
def interrupt_between_rounds() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) lets the round in flight finish and be recorded, then stops the run; a second Ctrl-C stops
    at once. An interrupt raised at an arbitrary point (inside a process pool's bookkeeping, say) can leave locks
    held and a shutdown that never returns; between rounds nothing is half done. Only the main thread can own
    signals: elsewhere Ctrl-C keeps Python's default behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a worker forked during the run: the run decides when it stops
            return
        if pressed.is_set():  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        pressed.set()
        if sys.stderr.isatty():  # someone is waiting at a terminal: say why it has not stopped yet
            print("stopping after this round (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    owner = os.getpid()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        if os.getpid() == owner:
            signal.signal(signal.SIGINT, previous)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def _summarize_clients(m: dict[str, Any], rows: list[dict[str, Any]], prefix: str, fair: str) -> None:
    """Per-client results into round metrics: example-weighted means, accuracy spread, and fairness."""
    w = [r["num_examples"] for r in rows]
    acc = spread([r["accuracy"] for r in rows], w)
    m.update({f"{prefix}_accuracy_{k}": v for k, v in acc.items() if k != "mean"})
    m[f"{prefix}_accuracy"] = acc.get("mean")
    m[f"{prefix}_loss"] = spread([r["loss"] for r in rows], w).get("mean")
    m[f"{prefix}_macro_f1"] = spread([r["macro_f1"] for r in rows], w).get("mean")
    m.update({f"{fair}_{k}": v for k, v in fairness([r["accuracy"] for r in rows]).items()})
