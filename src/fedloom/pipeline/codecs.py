"""Payload codecs: a flat float32 vector <-> bytes.

Compression codecs (quantization, sparsification) register here too; the wire header names the codec,
so the receiver never guesses and the bytes counted are the bytes a deployment would send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[torch.Tensor], bytes]
    decode: Callable[[bytes, int], torch.Tensor]
    # For a lossless codec whose size depends only on the vector's length: payload bytes for n values. In
    # process, `wire.passthrough` then hands the vector over as is and counts exactly these bytes.
    lossless_size: Callable[[int], int] | None = None


def _encode_f32(vec: torch.Tensor) -> bytes:
    return vec.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _decode_f32(payload: bytes, size: int) -> torch.Tensor:
    if len(payload) != 4 * size:
        raise ValueError(f"f32 payload has {len(payload)} bytes, expected {4 * size} for {size} values")
    return torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))


CODECS: dict[str, Codec] = {"f32": Codec("f32", _encode_f32, _decode_f32, lambda n: 4 * n)}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec '{name}' (known: {', '.join(CODECS)})") from None
