"""Execution engines: where client work runs. The round logic is the same for all of them.

Each engine module registers a factory `(RunConfig) -> Engine`; optional ones (Ray) import their
dependency only when built, so `fedloom` works without them installed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ..config import RunConfig
from ..errors import ConfigError
from .base import ClientFailure, ClientReply, Engine
from .sequential import SequentialEngine


def _sequential(run: RunConfig) -> Engine:
    return SequentialEngine()


def _parallel(run: RunConfig) -> Engine:
    from .parallel import ParallelEngine

    return ParallelEngine(run.workers)


def _vectorized(run: RunConfig) -> Engine:
    from .vectorized import VectorizedEngine

    return VectorizedEngine()


def _ray(run: RunConfig) -> Engine:
    from .ray_engine import RayEngine

    return RayEngine(run)


ENGINES: dict[str, Callable[[RunConfig], Engine]] = {
    "sequential": _sequential, "parallel": _parallel, "vectorized": _vectorized, "ray": _ray,
}


def build_engine(name: str, run: RunConfig | None = None) -> Engine:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, ENGINES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"engines: {', '.join(ENGINES)}"
        raise ConfigError(f"unknown engine '{name}'", hint)
    return ENGINES[name](run or RunConfig())


__all__ = ["ENGINES", "ClientFailure", "ClientReply", "Engine", "build_engine"]
