"""Stopping a run from a callback: return `fedloom.STOP`, or raise `fedloom.StopRun("why")`.

A callback is called once per round, after the round (and its checkpoint) is recorded, with one dict: the
event described in docs/guide.md ("Callbacks"). A run a callback stops ends with status "stopped" and the
callback's reason as its message; its checkpoints stay, and `fedloom resume RUN_ID --rounds N` trains it on.
"""

from __future__ import annotations

from typing import Any


class _Stop:
    """The sentinel a callback returns to end the run after this round."""

    _instance: _Stop | None = None

    def __new__(cls) -> _Stop:  # one instance, also after a copy or unpickling
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "fedloom.STOP"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Stop, ())


STOP = _Stop()


class StopRun(Exception):
    """Raised by a callback to end the run after this round, with `reason` as the run's message."""

    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason


def stop_message(round_: int, reason: str | None) -> str:
    """The run's message when a callback stops it."""
    why = f": {reason}" if reason else ""
    return f"stopped by a callback after round {round_}{why}"
