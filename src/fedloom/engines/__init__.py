"""Execution engines: where client work runs. The round logic is the same for all of them.

Each engine has a factory `(ExperimentConfig) -> Engine`; optional ones (Ray) import their
dependency only when built, so `fedloom` works without them installed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ..config import ExperimentConfig
from ..errors import ConfigError
from .base import ClientFailure, ClientReply, Engine
from .sequential import SequentialEngine


def _sequential(cfg: ExperimentConfig) -> Engine:
    return SequentialEngine()


def _parallel(cfg: ExperimentConfig) -> Engine:
    from .parallel import ParallelEngine

    return ParallelEngine(cfg.run.workers, cfg.run.threads, cfg.clients_per_round())


def _vectorized(cfg: ExperimentConfig) -> Engine:
    from .vectorized import VectorizedEngine

    return VectorizedEngine()


def _ray(cfg: ExperimentConfig) -> Engine:
    from .ray_engine import RayEngine

    return RayEngine(cfg.run)


def _auto(cfg: ExperimentConfig) -> Engine:
    from .auto import AutoEngine

    return AutoEngine(cfg)


ENGINES: dict[str, Callable[[ExperimentConfig], Engine]] = {
    "auto": _auto, "sequential": _sequential, "parallel": _parallel, "vectorized": _vectorized, "ray": _ray,
}


def build_engine(name: str, cfg: ExperimentConfig | None = None) -> Engine:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, ENGINES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"engines: {', '.join(ENGINES)}"
        raise ConfigError(f"unknown engine '{name}'", hint)
    return ENGINES[name](cfg or ExperimentConfig())


__all__ = ["ENGINES", "ClientFailure", "ClientReply", "Engine", "build_engine"]
