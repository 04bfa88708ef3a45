"""Reports of a run, generated from the run store only: PNG plots, a self-contained HTML page, TensorBoard;
and the comparison of several runs (`fedloom compare`).

Because nothing is taken from in-memory training state, a finished, failed or killed run (or one still
running) can be reported at any time, as often as wanted.
"""

from .compare import compare_runs
from .html import write_report
from .plots import make_plots
from .tensorboard import write_tensorboard

__all__ = ["compare_runs", "make_plots", "write_report", "write_tensorboard"]
