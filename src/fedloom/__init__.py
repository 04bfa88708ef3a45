"""fedloom: federated learning for research simulation and real deployment."""

__version__ = "0.1.0"

from .api import RunResult, compare, datasets, diagnose, load, report, resume, run, runs, show  # noqa: E402
from .callbacks import STOP, StopRun  # noqa: E402
from .config import ExperimentConfig, load_config  # noqa: E402
from .plugins import (  # noqa: E402
    load_plugins,
    register_aggregator,
    register_algorithm,
    register_dataset,
    register_model,
    register_transform,
)
from .sweep import SweepResult, sweep  # noqa: E402

__all__ = ["STOP", "ExperimentConfig", "RunResult", "StopRun", "SweepResult", "__version__", "compare", "datasets",
           "diagnose", "load", "load_config", "load_plugins", "register_aggregator", "register_algorithm",
           "register_dataset", "register_model", "register_transform", "report", "resume", "run", "runs", "show",
           "sweep"]
