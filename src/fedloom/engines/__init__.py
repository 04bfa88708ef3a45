"""Execution engines: where client work runs. The round logic is the same for all of them."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .base import ClientFailure, ClientReply, Engine
from .sequential import SequentialEngine

ENGINES = {"sequential": SequentialEngine}


def build_engine(name: str) -> Engine:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, ENGINES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"engines: {', '.join(ENGINES)}"
        raise ConfigError(f"unknown engine '{name}'", hint)
    return ENGINES[name]()


__all__ = ["ENGINES", "ClientFailure", "ClientReply", "Engine", "build_engine"]
