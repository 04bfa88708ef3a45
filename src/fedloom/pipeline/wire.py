"""The wire format: what a client sends and what the server broadcasts, as bytes.

    b"FLW1" | u32 little-endian header length | header (UTF-8 JSON) | payload (codec-encoded vector)

The header carries the codec, the ParamSpec hash (a client with another model is refused), the round,
the client id, the number of examples and the client's metrics. `len(message)` is the communication cost,
measured rather than estimated. Messages that cross a process or machine boundary travel as these bytes;
in process, `passthrough` gives the receiver what decoding would (the same vector, for a lossless codec
without copying it) and the exact number of bytes the encoding has.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from .codecs import get_codec

MAGIC = b"FLW1"
_LEN = struct.Struct("<I")


@dataclass
class Message:
    kind: str  # "broadcast" (server -> client), "update" or "evaluation" (client -> server)
    round: int
    client_id: int
    spec_hash: str
    vector: torch.Tensor
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    codec: str = "f32"  # the codec chain's canonical spec, e.g. "topk:0.01+q8+zstd"
    payload: bytes | None = None  # already encoded with `codec` (lossy codecs, error feedback); None: encode `vector`
    size: int | None = None  # values the payload decodes to (None: vector.numel())


def _header(msg: Message, payload_bytes: int) -> bytes:
    return json.dumps(
        {
            "kind": msg.kind, "codec": msg.codec, "spec": msg.spec_hash, "round": msg.round,
            "client": msg.client_id, "num_examples": msg.num_examples, "metrics": msg.metrics,
            "size": int(msg.vector.numel() if msg.size is None else msg.size), "payload_bytes": payload_bytes,
        },
        separators=(",", ":"),
    ).encode()


def encode(msg: Message) -> bytes:
    payload = msg.payload if msg.payload is not None else get_codec(msg.codec).encode(msg.vector)
    header = _header(msg, len(payload))
    return MAGIC + _LEN.pack(len(header)) + header + payload


def passthrough(msg: Message) -> tuple[Message, int]:
    """(what the receiver decodes, len(encode(msg))) for a message that stays in this process.

    A lossless codec's vector is handed over as is (float32), its size computed from the header and the
    codec; any other codec is really encoded and decoded, so its loss is applied and its bytes counted.
    """
    codec = get_codec(msg.codec)
    if msg.payload is not None or codec.lossless_size(0) is None or msg.vector.dtype != torch.float32:
        data = encode(msg)
        return decode(data), len(data)
    vec = msg.vector.detach()
    out = Message(msg.kind, msg.round, msg.client_id, msg.spec_hash, vec, msg.num_examples, dict(msg.metrics),
                  msg.codec)
    payload = codec.lossless_size(vec.numel())
    return out, 8 + len(_header(msg, payload)) + payload


def decode_header(data: bytes) -> dict[str, Any]:
    """The JSON header alone (who sent it, which codec), without decoding the payload."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError("not a fedloom message (bad magic bytes)")
    (hlen,) = _LEN.unpack_from(data, 4)
    if 8 + hlen > len(data):
        raise ValueError(f"truncated message: header says {hlen} bytes, {len(data) - 8} present")
    try:
        return dict(json.loads(data[8 : 8 + hlen]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"corrupt message header: {e}") from None


def decode(data: bytes, expect_spec: str | None = None, expect_sizes: tuple[int, ...] | None = None) -> Message:
    """The message in `data`; ValueError (CodecError for the payload) names what is wrong with corrupt bytes."""
    h = decode_header(data)
    hlen = _LEN.unpack_from(data, 4)[0]
    try:
        fields = (str(h["kind"]), int(h["round"]), int(h["client"]), str(h["spec"]), int(h["num_examples"]),
                  dict(h["metrics"]), str(h["codec"]), int(h["size"]), int(h["payload_bytes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt message header: {e}") from None
    kind, round_, client, spec, num_examples, metrics, codec, size, payload_bytes = fields
    payload = data[8 + hlen :]
    if len(payload) != payload_bytes:
        raise ValueError(f"truncated message: payload has {len(payload)} of {payload_bytes} bytes")
    if expect_spec is not None and spec != expect_spec:
        raise ValueError(f"model mismatch: message is for parameter spec {spec}, expected {expect_spec}")
    if num_examples < 0:
        raise ValueError(f"corrupt message header: num_examples = {num_examples}")
    if expect_sizes is not None and size not in expect_sizes:
        raise ValueError(f"message claims {size} values; this model's messages have "
                         f"{' or '.join(map(str, expect_sizes))}")
    vec = get_codec(codec).decode(payload, size)
    return Message(kind, round_, client, spec, vec, num_examples, metrics, codec)
