"""fedloom: federated learning for research simulation and real deployment."""

__version__ = "0.1.0"

from .api import RunResult, compare, datasets, diagnose, report, resume, run, runs, show  # noqa: E402
from .config import ExperimentConfig, load_config  # noqa: E402

__all__ = ["ExperimentConfig", "RunResult", "__version__", "compare", "datasets", "diagnose", "load_config", "report",
           "resume", "run", "runs", "show"]
