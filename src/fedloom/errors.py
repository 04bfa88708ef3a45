"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI prints `error: <message>` (plus `hint: <fix>`) and exits with `exit_code`; a traceback is shown
only with `--debug`. Library callers can catch `FedloomError` and read `.message` / `.hint`.
"""

from __future__ import annotations

from typing import Any


class FedloomError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.message = message
        self.hint = hint


class ConfigError(FedloomError):
    """A bad experiment file, preset, override, CLI value or Python API argument."""

    exit_code = 2


class DatasetError(FedloomError):
    """A dataset that is missing, truncated, corrupt or cannot be downloaded."""


class RunError(FedloomError):
    """A run that cannot be found, resumed or reported, or a run store or run folder that cannot be used."""


class ClientError(FedloomError):
    """Client code raised: names the round and the client, carries the client's own traceback."""

    def __init__(self, round_: int, client_id: int, traceback_text: str):
        last = traceback_text.strip().splitlines()[-1] if traceback_text.strip() else "unknown error"
        super().__init__(f"client {client_id} failed in round {round_}: {last}")
        self.round = round_
        self.client_id = client_id
        self.traceback_text = traceback_text


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the run was recorded as `interrupted`: still a KeyboardInterrupt (so
    `except KeyboardInterrupt` keeps working), and it carries what the user needs to continue."""

    def __init__(self, run_id: str, rounds_completed: int):
        super().__init__(f"run {run_id} interrupted after round {rounds_completed}")
        self.run_id = run_id
        self.rounds_completed = rounds_completed


def learning_rate_hint(cfg: Any) -> str:
    """What to lower when a run diverges: the clients' learning rate and, when the server does more than add
    the mean update (server SGD at lr 1 without momentum), the server's step too, since either can blow up."""
    hint = f"try a lower learning rate (train.lr = {cfg.train.lr}"
    s = cfg.server
    if s.optimizer != "sgd" or s.lr != 1.0 or s.momentum:
        how = f"server.optimizer = {s.optimizer}" + (f", server.momentum = {s.momentum}" if s.momentum else "")
        hint += f", or server.lr = {s.lr} with {how}"
    return hint + ")"
