"""Federated algorithms as bundles: client behaviour + aggregation + server optimizer.

Each is selected by `server.algorithm` and plugs into the one round implementation in `rounds.py`
through the five methods of `base.Algorithm`. See docs/algorithms.md for papers and parameters.
"""

from __future__ import annotations

import difflib

from ..config import ServerConfig
from ..errors import ConfigError
from .base import Algorithm, ClientContext, ClientOutput, State
from .drift import FedDyn, FedProx, Scaffold
from .fednova import FedNova
from .personal import Ditto, FedBN, PerFedAvg
from .qffl import QFFL

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Algorithm, FedProx, Scaffold, FedNova, FedDyn, QFFL, Ditto, PerFedAvg, FedBN)
}


BUILTIN_ALGORITHMS = tuple(ALGORITHMS)  # names register_algorithm may not take


def register_algorithm(name: str, cls: type[Algorithm]) -> None:
    """Make `server.algorithm = name` run `cls(server_config, num_clients)`, a subclass of `Algorithm`.

    The run records the algorithm under `name` (whatever `cls.name` says). Registering a name again replaces
    it; built-in names cannot be taken. Registrations live in this process: a plug-in module that registers on
    import brings them back in a new one (docs/extending.md)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"an algorithm name must be a non-empty string without surrounding spaces, not {name!r}")
    if name in BUILTIN_ALGORITHMS:
        raise ConfigError(f"'{name}' is a built-in algorithm name", "register yours under another name")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"register_algorithm('{name}', ...) needs a subclass of fedloom.algorithms.Algorithm, "
                          f"not {cls!r}", "subclass Algorithm (FedAvg) and override what your algorithm changes")
    ALGORITHMS[name] = cls


def unknown_algorithm(name: str) -> tuple[str, str]:
    """(message, hint) for a name neither built in nor registered: the closest name, or every name."""
    close = difflib.get_close_matches(name, ALGORITHMS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else \
        "register yours with fedloom.register_algorithm (again in every new process, or as a plug-in)"
    return f"unknown algorithm '{name}'; algorithms: {', '.join(ALGORITHMS)}", hint


def build_algorithm(cfg: ServerConfig, num_clients: int) -> Algorithm:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(*unknown_algorithm(cfg.algorithm))
    algorithm = ALGORITHMS[cfg.algorithm](cfg, num_clients)
    if algorithm.name != cfg.algorithm:  # a registered subclass: recorded, described and refused by its own name
        algorithm.name = cfg.algorithm
    return algorithm


__all__ = ["ALGORITHMS", "BUILTIN_ALGORITHMS", "Algorithm", "ClientContext", "ClientOutput", "State",
           "build_algorithm", "register_algorithm", "unknown_algorithm"]
