"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI prints `error: <message>` (plus `hint: <fix>`) and exits with `exit_code`; a traceback is shown
only with `--debug`. Library callers can catch `FedloomError` and read `.message` / `.hint`.
"""

from __future__ import annotations


class FedloomError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.message = message
        self.hint = hint


class ConfigError(FedloomError):
    """A bad experiment file, preset, override or CLI value."""

    exit_code = 2


class DatasetError(FedloomError):
    """A dataset that is missing, truncated, corrupt or cannot be downloaded."""


class RunError(FedloomError):
    """A run that cannot be found, resumed or reported."""


class ClientError(FedloomError):
    """Client code raised: names the round and the client, carries the client's own traceback."""

    def __init__(self, round_: int, client_id: int, traceback_text: str):
        last = traceback_text.strip().splitlines()[-1] if traceback_text.strip() else "unknown error"
        super().__init__(f"client {client_id} failed in round {round_}: {last}")
        self.round = round_
        self.client_id = client_id
        self.traceback_text = traceback_text
