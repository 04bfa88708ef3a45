"""Worker processes on one machine: the round's clients are spread over them, one task per client.

The dataset is moved into shared memory once and the workers are forked from the process that holds
it, so every worker reads the same pages: memory does not grow with workers or clients, and a task
carries only its broadcast bytes, the client's index into the shared data and its own state. Each
worker gets cores // workers intra-op threads so the machine is busy and not oversubscribed (two
processes both asking torch for every core can run many times slower than one).

A worker that dies (killed, out of memory) fails only the client it was training: the pool is rebuilt and
the other tasks it took down are re-run; the round logic decides, as for any client error, whether the
round fails or drops that client.
"""

from __future__ import annotations

import ctypes
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
from .base import ClientFailure, ClientReply, largest_first, run_task, unpacked

_runtime: ClientRuntime | None = None  # set in each worker by the fork
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(runtime: ClientRuntime, threads: int, parent: int) -> None:
    global _runtime
    _exit_with_parent(parent)
    _runtime = runtime
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


def _run(task: ClientTask) -> ClientReply | ClientFailure:
    assert _runtime is not None
    return run_task(_runtime, task, packed=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ParallelEngine:
    name = "parallel"

    def __init__(self, workers: int = 0, threads: int = 0):
        cores = threads or usable_cores()  # the thread budget: `run.threads`, else every usable core
        self.workers = workers or cores
        self.threads = max(1, cores // self.workers)
        self._pool: ProcessPoolExecutor | None = None
        self._runtime: ClientRuntime | None = None

    def _pool_for(self, runtime: ClientRuntime) -> ProcessPoolExecutor:
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self.close()
        if self._pool is None or self._runtime is not runtime:
            self.close()
            ds = runtime.data.dataset
            for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
                t.share_memory_()  # once; forked workers then share these pages
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                             initializer=_init_worker,
                                             initargs=(runtime, self.threads, os.getpid()))
            self._runtime = runtime
        return self._pool

    def check(self, runtime: ClientRuntime) -> None:
        pass

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        pool = self._pool_for(runtime)
        futures: dict[int, Future] = {i: pool.submit(_run, tasks[i]) for i in largest_first(runtime, tasks)}
        out: list[ClientReply | ClientFailure | None] = []
        for i in range(len(tasks)):
            try:
                out.append(futures[i].result())
            except BrokenProcessPool:
                out.append(None)
        # A dying worker breaks the whole pool and every task in flight with it; re-run those one at a time
        # in a fresh pool (client work is deterministic), so only the client that kills its worker fails.
        for i, task in enumerate(tasks):
            if out[i] is None:
                try:
                    out[i] = self._pool_for(runtime).submit(_run, task).result()
                except BrokenProcessPool:
                    self.close()
                    out[i] = ClientFailure(task.client_id, f"the worker process training client {task.client_id} "
                                           "died (killed, or out of memory) before it finished")
        return unpacked([r for r in out if r is not None], runtime.spec_hash)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._runtime = None
