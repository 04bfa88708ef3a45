"""Worker processes on one machine: the round's clients are spread over them, one task per client.

The dataset is moved into shared memory once and the workers are forked from the process that holds
it, so every worker reads the same pages: memory does not grow with workers or clients. A round's
broadcast and its clients' updates do not go through the pipes either: they are written into memory
shared with the workers (`_Slots`, made before the fork), so a task carries only the client's id, its
work and its own state, and the updates arrive as consecutive rows of one matrix that the round logic
aggregates without copying. Each worker gets cores // workers intra-op threads so the machine is busy
and not oversubscribed (two processes both asking torch for every core can run many times slower than
one).

A worker that dies (killed, out of memory) fails only the client it was training: the pool is rebuilt and
the other tasks it took down are re-run; the round logic decides, as for any client error, whether the
round fails or drops that client. A run killed outright takes its workers with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from ..client.work import ClientRuntime, ClientTask
from ..pipeline import wire
from .base import ClientFailure, ClientReply, balanced_batches, run_task, unpacked, usable_cores

_runtime: ClientRuntime | None = None  # set in each worker by the fork
_slots: _Slots | None = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
HEADER_ROOM = 1 << 16  # bytes of a broadcast's header the shared buffer leaves room for
BATCHES_PER_WORKER = 4  # hand-offs per worker and round: fewer pay less overhead, more balance better


class _Slots:
    """A round's broadcast bytes and one row per client for its update, in an anonymous shared mapping made
    before the workers fork (so it needs no /dev/shm space). For T2's 100 clients of 0.8 MB the pipes would
    otherwise carry 160 MB a round, pickled on both sides."""

    def __init__(self, rows: int, width: int):
        self.rows, self.width = rows, width
        self._broadcast = mmap.mmap(-1, 8 + 4 * width + HEADER_ROOM)  # u64 length, then the bytes: all shared
        self.updates = torch.frombuffer(mmap.mmap(-1, 4 * rows * width), dtype=torch.float32).view(rows, width)

    def put_broadcast(self, data: bytes) -> bool:
        if 8 + len(data) > len(self._broadcast):
            return False
        self._broadcast[:8] = len(data).to_bytes(8, "little")
        self._broadcast[8 : 8 + len(data)] = data
        return True

    def broadcast(self) -> bytes:
        return self._broadcast[8 : 8 + int.from_bytes(self._broadcast[:8], "little")]


def _init_worker(runtime: ClientRuntime, slots: _Slots | None, threads: int, parent: int) -> None:
    global _runtime, _slots
    _exit_with_parent(parent)
    _runtime, _slots = runtime, slots
    torch.set_num_threads(threads)


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive a run that was killed outright (SIGKILL leaves no chance to shut the pool down,
    and the workers would sit on the shared dataset forever)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:  # no parent-death signal: watch for being re-parented
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _run_batch(batch: list[tuple[ClientTask, int]]) -> list[tuple[ClientReply | ClientFailure, int]]:
    return [_run(task, slot) for task, slot in batch]


def _run(task: ClientTask, slot: int) -> tuple[ClientReply | ClientFailure, int]:
    """(reply, values written to update row `slot`); slot -1: broadcast in the task, update in the reply's bytes."""
    assert _runtime is not None
    if slot < 0 or _slots is None:
        return run_task(_runtime, task, packed=True), -1
    task = dataclasses.replace(task, broadcast=_slots.broadcast())
    if not _runtime.pipeline.identity:  # encoded updates are small: their bytes travel, the server decodes them
        return run_task(_runtime, task, packed=True), -1
    reply = run_task(_runtime, task)
    if not isinstance(reply, ClientReply) or reply.message is None:
        return reply, -1
    vec = reply.message.vector
    if vec.numel() > _slots.width:  # an algorithm sending more than the rows hold: the (decoded) message's bytes
        return dataclasses.replace(reply, message=None, payload=wire.encode(reply.message)), -1
    _slots.updates[slot, : vec.numel()] = vec
    reply.message.vector = torch.empty(0)  # travels in the row
    return reply, vec.numel()


class ParallelEngine:
    name = "parallel"

    def __init__(self, workers: int = 0, threads: int = 0, clients_per_round: int = 0):
        cores = threads or usable_cores()  # the thread budget: `run.threads`, else every usable core
        self.workers = workers or cores
        self.threads = max(1, cores // self.workers)
        self.rows = clients_per_round  # update rows in shared memory (0: every update through the pipes)
        self._pool: ProcessPoolExecutor | None = None
        self._runtime: ClientRuntime | None = None
        self._slots: _Slots | None = None

    def _pool_for(self, runtime: ClientRuntime) -> ProcessPoolExecutor:
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self.close()
        if self._pool is None or self._runtime is not runtime:
            self.close()
            ds = runtime.data.dataset
            for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
                t.share_memory_()  # once; forked workers then share these pages
            width = runtime.spec.size * (1 + runtime.algorithm.extras)
            self._slots = _Slots(self.rows, width) if self.rows else None
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                             initializer=_init_worker,
                                             initargs=(runtime, self._slots, self.threads, os.getpid()))
            self._runtime = runtime
        return self._pool

    def check(self, runtime: ClientRuntime) -> None:
        pass

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        pool = self._pool_for(runtime)
        slots = self._slots
        # the rows are lent to the caller until this engine's next fit (the Engine contract), so they are free now
        shared = (slots is not None and 0 < len(tasks) <= slots.rows
                  and all(t.broadcast == tasks[0].broadcast for t in tasks) and slots.put_broadcast(tasks[0].broadcast))
        futures: list[tuple[list[int], Future]] = [
            (batch, pool.submit(_run_batch, [(dataclasses.replace(tasks[i], broadcast=b"") if shared else tasks[i],
                                              i if shared else -1) for i in batch]))
            for batch in balanced_batches(runtime, tasks, BATCHES_PER_WORKER * self.workers)]
        out: list[ClientReply | ClientFailure | None] = [None] * len(tasks)
        for batch, fut in futures:
            try:
                results = fut.result()
            except BrokenProcessPool:
                continue
            for i, (reply, n) in zip(batch, results, strict=True):
                if n >= 0 and slots is not None and isinstance(reply, ClientReply) and reply.message is not None:
                    reply.message.vector = slots.updates[i, :n]  # the row the worker wrote
                out[i] = reply
        # A dying worker breaks the whole pool and every task in flight with it; re-run those one at a time
        # in a fresh pool (client work is deterministic), so only the client that kills its worker fails.
        for i, task in enumerate(tasks):
            if out[i] is None:
                try:
                    out[i] = self._pool_for(runtime).submit(_run, task, -1).result()[0]
                except BrokenProcessPool:
                    self.close()
                    out[i] = ClientFailure(task.client_id, f"the worker process training client {task.client_id} "
                                           "died (killed, or out of memory) before it finished")
        return unpacked([r for r in out if r is not None], runtime.spec_hash, runtime.reply_sizes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._runtime = None
            self._slots = None
