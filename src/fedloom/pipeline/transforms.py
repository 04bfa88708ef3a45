"""Client transforms: what happens to an update between local training and the wire.

A transform is optax-shaped: `init(size) -> state` and `apply(vector, state, ctx) -> (vector, state)`, with
the state a dict of tensors that belongs to one client and is kept across rounds (in the client state
store in simulation, on the agent in a deployment). `ClientPipeline` runs the configured transforms in
order, then encodes the result with the upload codec; with error feedback it keeps, per client, what the
codec lost and adds it to the next update (Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

Transforms register by name (`TRANSFORMS`); a config names them as "name" or "name:argument".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..rng import torch_rng
from .codecs import Codec, CodecError, parse_codec

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the update it transforms: whose, which round, and the run's seed."""

    round: int
    client_id: int
    seed: int
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)  # the client's metrics; a stage may add to them

    def generator(self, purpose: str) -> torch.Generator:
        return torch_rng(self.seed, purpose, self.round, self.client_id)


class Transform(Protocol):
    name: str

    def init(self, size: int) -> State: ...

    def apply(self, vec: torch.Tensor, state: State, ctx: StageContext) -> tuple[torch.Tensor, State]: ...


@dataclass(frozen=True)
class ClipNorm:
    """Scale the update down to an L2 norm of at most `max_norm` (the clipping of DP-FedAvg and of norm
    bounding); an update already inside the ball is unchanged."""

    max_norm: float
    name: str = "clip"

    def init(self, size: int) -> State:
        return {}

    def apply(self, vec: torch.Tensor, state: State, ctx: StageContext) -> tuple[torch.Tensor, State]:
        norm = float(torch.linalg.vector_norm(vec))
        if norm > self.max_norm:
            vec = vec * (self.max_norm / norm)
        return vec, state


def _clip(arg: str | None) -> Transform:
    if arg is None:
        raise ValueError("clip needs a norm bound, e.g. 'clip:10'")
    bound = float(arg)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip bound must be a finite number > 0, got {arg}")
    return ClipNorm(bound)


# name -> factory(argument or None); plug-ins add theirs with `register_transform`
TRANSFORMS: dict[str, Callable[[str | None], Transform]] = {"clip": _clip}


def register_transform(name: str, factory: Callable[[str | None], Transform]) -> None:
    TRANSFORMS[name] = factory


def parse_transform(spec: str) -> Transform:
    name, _, arg = spec.partition(":")
    if name not in TRANSFORMS:
        close = difflib.get_close_matches(name, TRANSFORMS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"transforms: {', '.join(TRANSFORMS)}"
        raise ValueError(f"unknown client transform '{spec}' ({hint})")
    return TRANSFORMS[name](arg or None)


@dataclass(frozen=True)
class Encoded:
    """An update ready for the wire: the codec's payload, or None for plain f32 (encoded when it is sent)."""

    vector: torch.Tensor  # f32 messages: the update itself; encoded ones: the values the server will decode
    payload: bytes | None
    codec: str


class ClientPipeline:
    """The client's stages after local work: transforms in order, then the upload codec (with error feedback).

    State keys are namespaced per stage (`t0.clip/...`, `ef/residual`) so that they sit in one flat dict
    with the algorithm's own state.
    """

    def __init__(self, transforms: list[str] | None = None, upload: list[str] | str = "f32",
                 error_feedback: bool = False):
        self.transforms = [parse_transform(s) for s in transforms or []]
        self.codec: Codec = parse_codec(upload)
        self.error_feedback = error_feedback

    @property
    def identity(self) -> bool:
        """Nothing to do: the update travels as plain f32 and no stage keeps state."""
        return not self.transforms and self.codec.spec == "f32" and not self.error_feedback

    def describe(self) -> dict[str, Any]:
        return {"client_transforms": [t.name for t in self.transforms], "upload_codec": self.codec.spec,
                "error_feedback": self.error_feedback}

    def run(self, vec: torch.Tensor, state: State, ctx: StageContext) -> tuple[Encoded, State]:
        """(what to send, the client's new pipeline state). `state` holds only `pipe/` keys, prefix removed."""
        new: State = {}
        for i, t in enumerate(self.transforms):
            key = f"t{i}.{t.name}/"
            own = {k[len(key):]: v for k, v in state.items() if k.startswith(key)} or t.init(vec.numel())
            vec, own = t.apply(vec, own, ctx)
            new.update({key + k: v for k, v in own.items()})
        if self.identity:
            return Encoded(vec, None, "f32"), new
        if self.error_feedback:
            residual = state.get("ef/residual")
            if residual is not None and residual.numel() == vec.numel():
                vec = vec + residual
        payload = self.codec.encode(vec, ctx.generator("codec"))
        if self.error_feedback:  # what the server will decode, so that sent + residual == what was meant
            sent = self.codec.decode(payload, vec.numel())
            new["ef/residual"] = vec - sent
        return Encoded(vec, payload, self.codec.spec), new


def check_codec(key: str, spec: list[str] | str) -> None:
    """Refuse a bad codec chain in the config with the key, the value and the closest valid choice."""
    try:
        parse_codec(spec)
    except CodecError as e:
        raise ConfigError(f"bad value for '{key}': {spec!r}: {e}") from None
