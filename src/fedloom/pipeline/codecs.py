"""Payload codecs: a flat float32 vector <-> bytes, as a chain of compression stages.

A codec is named by a spec, stages joined by "+" in this order: ``[sparsifier] [value codec] [zstd]``,
e.g. ``"topk:0.01+q8+zstd"``. The canonical spec (always naming the value codec, default ``f32``) travels
in the wire header, so the receiver never guesses; the payload is what this module writes, and its length
is the communication cost. Encoders take a ``torch.Generator`` that supplies all their randomness, so a run
that derives it from (seed, round, client) is deterministic.

Byte layout (all integers and floats little-endian; ``n`` = the vector's length, known to the receiver from
the wire header; ``m`` = how many values the value codec codes: ``n``, or ``k`` after a sparsifier)::

    payload = inner                          (no zstd stage)
            | zstd_frame(inner)              (zstd stage: exactly one zstandard frame, level 3, that declares
                                              its content size; the decoder refuses a frame declaring more
                                              than the largest inner payload the chain writes for n, and
                                              any byte after the frame)
    inner   = [sparsifier section] value section

Sparsifier sections:

- ``topk:F`` / ``topk:K`` keeps the k largest |v| (k = ceil(F*n) for a fraction 0 < F <= 1, written with a
  decimal point or exponent; k = min(K, n) for a whole number K >= 1). Ties go to whichever index
  ``numpy.argpartition`` returns (deterministic for a given vector)::

      u32 k | u8 tag | index set
      tag 0: bitmap, ceil(n/8) bytes; bit i (byte i // 8, bit i % 8 counting from the least significant)
             is set iff index i is kept; bits past n are zero; exactly k bits set
      tag 1: k unsigned LEB128 varints (7 bits per byte, low groups first, high bit = more bytes follow,
             at most 5 bytes each): d_0 = i_0, d_j = i_j - i_(j-1) >= 1 (indices strictly increasing)
      The encoder writes whichever of the two is smaller (the bitmap on a tie). k must equal the spec's k.

  The value section then codes the k kept values in index order; every other entry decodes to 0.

- ``randk:F`` / ``randk:K`` keeps k uniformly random indices (k as for topk) and is unbiased: the decoder
  multiplies the decoded values by float32(n/k) (each index is kept with probability k/n)::

      u64 seed
      indices = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k])

  (The seed is drawn from the encoder's generator; the index set is defined by torch's CPU randperm.)

Value sections for m values:

- ``f32``: m x float32 (4m bytes). ``f16``: m x IEEE half (2m bytes). ``bf16``: m x bfloat16, the upper 16
  bits of a float32 (2m bytes). f16/bf16 round to nearest even, exactly torch's casts; a value that would
  overflow to Inf (|v| >= 65520 for f16) is refused at encode time.
- ``qB`` for B in {8, 4, 2}: ``f32 M | ceil(m*B/8) bytes of B-bit codes``. M = max|v|, the infinity norm.
  QSGD scales by the L2 norm instead; a coordinate's variance is at most (M/s)^2 / 4, and ||v||_inf <=
  ||v||_2 (about sqrt(m) times smaller for a dense update), so with few levels the infinity norm's grid is
  far finer and the variance far lower. With s = 2^(B-1) - 1, v_i is coded as an integer level l_i in [-s, s]:
  x = v_i / M * s, l_i = floor(x) + 1 with probability x - floor(x), else floor(x), so E[l_i] = x (unbiased).
  The code stored is l_i + s in [0, 2s] (2s + 1 is invalid); codes are packed B bits at a time, the first
  value in the least significant bits of the first byte, padding bits zero. Decoded: l_i * (M / s), where
  M / s is computed in float64, rounded to float32, and the product taken in float32. M = 0 decodes to all zeros.
- ``q1``: ``f32 M | ceil(m/8) bytes of bits`` (packed as the topk bitmap). Bit 1 is +M, bit 0 is -M, with
  P(+M) = (1 + v/M) / 2 (unbiased).
- ``sign``: ``f32 S | ceil(m/8) bytes of bits``, S = mean |v| of the m coded values (= ||v||_1 / m), bit 1
  for v >= 0: decodes to +S / -S (scaled sign, signSGD / EF-signSGD, Karimireddy et al. 2019). Biased: pair
  it with error feedback. An all-zero input has S = 0 and decodes to zeros.

A decoder refuses (CodecError, never another exception) a truncated payload or extra bytes, a count above
n or different from the spec's, an index out of range or not strictly increasing, a varint over 5 bytes,
an unknown tag, nonzero padding, an out-of-range level, a NaN/Inf/negative scale, a non-finite value, a
size below 0 or above MAX_SIZE, and a zstd frame without a content size or beyond the cap.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import re
import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import zstandard

MAX_SIZE = 2**31 - 1  # largest vector a payload may decode to (indices and counts are u32)
ZSTD_LEVEL = 3
_SPARSIFIER_NAMES = ("topk", "randk")
_VALUE_NAMES = ("f32", "f16", "bf16", "q8", "q4", "q2", "q1", "sign")
CODEC_NAMES: list[str] = [*_SPARSIFIER_NAMES, *_VALUE_NAMES, "zstd"]
_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "half": "f16", "bfloat16": "bf16"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F32 = struct.Struct("<f")
_TAG_BITMAP, _TAG_VARINT = 0, 1
_VARINT_MAX_BYTES = 5


class CodecError(ValueError):
    """A bad codec spec (config), a vector a codec cannot encode, or a corrupt payload.

    `kind` is "spec", "input" or "payload"; the message names the spec or stage and says why.
    """

    def __init__(self, message: str, kind: str = "spec"):
        super().__init__(message)
        self.kind = kind


class _Corrupt(Exception):
    """Raised inside decoding; `Codec.decode` turns it into a CodecError naming the spec."""


# ----------------------------------------------------------------------------------------------- helpers


def _all_finite(t: torch.Tensor) -> bool:
    """True iff every entry is finite: a float32 sum first (fast), the exact test only if the sum is not."""
    if t.numel() == 0 or math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _as_vector(vec: torch.Tensor) -> torch.Tensor:
    if not isinstance(vec, torch.Tensor):
        raise CodecError(f"codecs encode a torch.Tensor, got {type(vec).__name__}", "input")
    v = vec.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    if v.numel() > MAX_SIZE:
        raise CodecError(f"a vector of {v.numel()} values is over the codec limit of {MAX_SIZE}", "input")
    if not _all_finite(v):
        bad = int(torch.nonzero(~torch.isfinite(v))[0])
        raise CodecError(f"cannot encode a vector with NaN or Inf values (first at index {bad}: {float(v[bad])})",
                         "input")
    return v


def _need(buf: bytes | memoryview, nbytes: int, what: str) -> None:
    if len(buf) != nbytes:
        word = "truncated" if len(buf) < nbytes else "extra bytes"
        raise _Corrupt(f"{word}: {what} has {len(buf)} bytes, expected {nbytes}")


def _read_scale(buf: bytes | memoryview) -> float:
    (scale,) = _F32.unpack_from(buf, 0)
    if not math.isfinite(scale):
        raise _Corrupt(f"scale is {scale}")
    if scale < 0:
        raise _Corrupt(f"scale is negative ({scale})")
    return scale


def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack_bits(buf: bytes | memoryview, m: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")
    if bits[m:].any():
        raise _Corrupt(f"nonzero padding bits after {m} values")
    return bits[:m]


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """B-bit codes (uint8 < 2^B), the first in the least significant bits of the first byte."""
    if bits == 8:
        return codes.tobytes()
    per = 8 // bits
    pad = (-len(codes)) % per
    c = np.concatenate([codes, np.zeros(pad, np.uint8)]) if pad else codes
    c = c.reshape(-1, per)
    out = c[:, 0].copy()
    for j in range(1, per):
        out |= c[:, j] << np.uint8(bits * j)
    return out.tobytes()


def _unpack_codes(buf: bytes | memoryview, m: int, bits: int) -> np.ndarray:
    raw = np.frombuffer(buf, np.uint8)
    if bits == 8:
        return raw
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    codes = ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)
    if codes[m:].any():
        raise _Corrupt(f"nonzero padding bits after {m} values")
    return codes[:m]


# ------------------------------------------------------------------------------------------ value codecs


class _Value:
    """Codes m float32 values; the size of its section depends only on m."""

    name = ""
    biased = False

    def nbytes(self, m: int) -> int:
        raise NotImplementedError

    def encode(self, v: torch.Tensor, gen: torch.Generator) -> tuple[bytes, torch.Tensor]:
        """(section bytes, the values the decoder will produce from them)."""
        raise NotImplementedError

    def decode(self, buf: bytes | memoryview, m: int) -> torch.Tensor:
        raise NotImplementedError


class _Float(_Value):
    """f32, f16, bf16: a cast, stored as the raw little-endian bits."""

    def __init__(self, name: str, dtype: torch.dtype, raw: str):
        self.name, self.dtype, self.raw = name, dtype, raw
        self.width = np.dtype(raw).itemsize
        self.biased = dtype != torch.float32  # round to nearest is deterministic: E[decode] != v

    def nbytes(self, m: int) -> int:
        return self.width * m

    def encode(self, v: torch.Tensor, gen: torch.Generator) -> tuple[bytes, torch.Tensor]:
        if self.dtype == torch.float32:
            return v.numpy().astype("<f4", copy=False).tobytes(), v  # may alias the input: see roundtrip
        cast = v.to(self.dtype)
        bits = cast.view(torch.int16).numpy().astype(self.raw, copy=False)
        return bits.tobytes(), cast.float()

    def decode(self, buf: bytes | memoryview, m: int) -> torch.Tensor:
        _need(buf, self.nbytes(m), f"{self.name} section for {m} values")
        if self.dtype == torch.float32:
            return torch.from_numpy(np.frombuffer(buf, "<f4").astype(np.float32))
        bits = np.frombuffer(buf, self.raw).astype(np.int16)
        return torch.from_numpy(bits).view(self.dtype).float()


def _dequantize(levels: torch.Tensor, scale: float, s: int) -> torch.Tensor:
    """levels (float32 integers in [-s, s]) * float32(scale / s); shared by encode and decode so they agree."""
    return levels.mul_(torch.tensor(scale / s, dtype=torch.float32))


class _Quant(_Value):
    """qB for B in {8, 4, 2}: unbiased stochastic rounding onto 2s + 1 levels scaled by M = max|v|."""

    def __init__(self, bits: int):
        self.bits, self.name, self.s = bits, f"q{bits}", 2 ** (bits - 1) - 1

    def nbytes(self, m: int) -> int:
        return 4 + (m * self.bits + 7) // 8

    def encode(self, v: torch.Tensor, gen: torch.Generator) -> tuple[bytes, torch.Tensor]:
        s, m = self.s, v.numel()
        lo, hi = torch.aminmax(v) if m else (torch.zeros(()), torch.zeros(()))
        scale = max(-float(lo), float(hi))
        if scale == 0.0:
            return _F32.pack(0.0) + _pack_codes(np.full(m, s, np.uint8), self.bits), torch.zeros(m)
        x = (v / scale).mul_(s).clamp_(-s, s)
        levels = x.floor()
        levels += torch.rand(m, generator=gen) < x.sub_(levels)  # round up with probability frac(x)
        codes = (levels + s).to(torch.uint8).numpy()
        return _F32.pack(scale) + _pack_codes(codes, self.bits), _dequantize(levels, scale, s)

    def decode(self, buf: bytes | memoryview, m: int) -> torch.Tensor:
        _need(buf, self.nbytes(m), f"{self.name} section for {m} values")
        scale = _read_scale(buf)
        codes = _unpack_codes(buf[4:], m, self.bits)
        if m and int(codes.max()) > 2 * self.s:
            raise _Corrupt(f"level code {int(codes.max())} out of range [0, {2 * self.s}]")
        levels = torch.from_numpy(codes.astype(np.float32)).sub_(self.s)
        return _dequantize(levels, scale, self.s)


class _Bits(_Value):
    """q1 (stochastic +-M, unbiased) and sign (+-mean|v|, biased): one bit per value after a f32 scale."""

    def __init__(self, name: str):
        self.name, self.biased = name, name == "sign"

    def nbytes(self, m: int) -> int:
        return 4 + (m + 7) // 8

    def _scale_and_bits(self, v: torch.Tensor, gen: torch.Generator) -> tuple[float, torch.Tensor]:
        m = v.numel()
        if self.name == "sign":
            scale = float(v.abs().mean()) if m else 0.0
            return scale, v >= 0
        scale = float(v.abs().max()) if m else 0.0
        if scale == 0.0:
            return 0.0, torch.ones(m, dtype=torch.bool)
        return scale, torch.rand(m, generator=gen) < (v / scale).add_(1).mul_(0.5)

    def encode(self, v: torch.Tensor, gen: torch.Generator) -> tuple[bytes, torch.Tensor]:
        scale, bits = self._scale_and_bits(v, gen)
        scale = float(np.float32(scale))
        return _F32.pack(scale) + _pack_bits(bits.numpy()), self._values(bits, scale)

    @staticmethod
    def _values(bits: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.full(bits.shape, -scale, dtype=torch.float32)
        out[bits] = scale
        return out

    def decode(self, buf: bytes | memoryview, m: int) -> torch.Tensor:
        _need(buf, self.nbytes(m), f"{self.name} section for {m} values")
        scale = _read_scale(buf)
        bits = torch.from_numpy(_unpack_bits(buf[4:], m).astype(bool))
        return self._values(bits, scale)


_VALUES: dict[str, _Value] = {
    "f32": _Float("f32", torch.float32, "<f4"),
    "f16": _Float("f16", torch.float16, "<i2"),
    "bf16": _Float("bf16", torch.bfloat16, "<i2"),
    "q8": _Quant(8), "q4": _Quant(4), "q2": _Quant(2),
    "q1": _Bits("q1"), "sign": _Bits("sign"),
}


# ----------------------------------------------------------------------------------- top-k index coding


def _varint_lengths(gaps: np.ndarray) -> np.ndarray:
    nb = np.ones(len(gaps), np.int64)
    for t in range(1, _VARINT_MAX_BYTES):
        nb += gaps >= (1 << (7 * t))
    return nb


def _encode_varints(gaps: np.ndarray, nb: np.ndarray) -> bytes:
    if len(gaps) == 0:
        return b""
    width = int(nb.max())
    cols = np.arange(width)
    grid = ((gaps[:, None] >> (7 * cols)) & 0x7F).astype(np.uint8)
    grid |= ((cols < (nb - 1)[:, None]) * 0x80).astype(np.uint8)
    return grid[cols < nb[:, None]].tobytes()


def _decode_varints(buf: bytes | memoryview, k: int) -> np.ndarray:
    b = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != k or (k and ends[-1] != len(b) - 1) or (k == 0 and len(b)):
        tail = "" if len(b) == 0 or b[-1] < 0x80 else "; the last varint is unterminated"
        raise _Corrupt(f"index section holds {len(ends)} varints in {len(b)} bytes, expected {k}{tail}")
    if k == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lens = ends - starts + 1
    if int(lens.max()) > _VARINT_MAX_BYTES:
        raise _Corrupt(f"varint overflow: {int(lens.max())} bytes (at most {_VARINT_MAX_BYTES})")
    pos = np.arange(len(b)) - np.repeat(starts, lens)
    parts = (b & 0x7F).astype(np.int64) << (7 * pos)
    return np.add.reduceat(parts, starts)


def _encode_index_set(idx: np.ndarray, n: int) -> bytes:
    """Tag byte + bitmap or delta varints, whichever is smaller."""
    gaps = np.diff(idx, prepend=0)
    nb = _varint_lengths(gaps)
    if int(nb.sum()) < (n + 7) // 8:
        return bytes([_TAG_VARINT]) + _encode_varints(gaps, nb)
    bits = np.zeros(n, bool)
    bits[idx] = True
    return bytes([_TAG_BITMAP]) + _pack_bits(bits)


def _decode_index_set(buf: bytes | memoryview, n: int, k: int) -> np.ndarray:
    if len(buf) < 1:
        raise _Corrupt("truncated: no index coding tag")
    tag, body = buf[0], buf[1:]
    if tag == _TAG_BITMAP:
        _need(body, (n + 7) // 8, f"index bitmap for size {n}")
        idx = np.flatnonzero(_unpack_bits(body, n))
        if len(idx) != k:
            raise _Corrupt(f"index bitmap sets {len(idx)} bits, the count says {k}")
        return idx
    if tag != _TAG_VARINT:
        raise _Corrupt(f"unknown index coding tag {tag} (0 = bitmap, 1 = varints)")
    gaps = _decode_varints(body, k)
    if k and int(gaps.max()) >= n:
        raise _Corrupt(f"index out of range: a gap of {int(gaps.max())} for size {n}")
    if k > 1 and not gaps[1:].all():
        raise _Corrupt("indices not strictly increasing (a zero gap)")
    idx = np.cumsum(gaps)  # every gap < n <= 2^31 and k <= n: no overflow
    if k and int(idx[-1]) >= n:
        raise _Corrupt(f"index {int(idx[-1])} out of range for size {n}")
    return idx


# ------------------------------------------------------------------------------------------ sparsifiers


@dataclass(frozen=True)
class _Sparsifier:
    """topk or randk with a fraction (k = ceil(F n)) or a count (k = min(K, n))."""

    name: str
    count: int | None
    fraction: Fraction | None
    text: str  # canonical stage text, e.g. "topk:0.01"

    @property
    def biased(self) -> bool:
        return self.name == "topk"

    def k(self, n: int) -> int:
        if self.count is not None:
            return min(self.count, n)
        f = self.fraction
        assert f is not None
        return min(n, -((-f.numerator * n) // f.denominator))

    def header_max(self, n: int) -> int:
        return 5 + (n + 7) // 8 if self.name == "topk" else 8

    def select(self, v: torch.Tensor, gen: torch.Generator) -> tuple[bytes, torch.Tensor, float]:
        """(section bytes, sorted kept indices, factor the decoder applies to the values)."""
        n = v.numel()
        k = self.k(n)
        if self.name == "randk":
            seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen))
            return _U64.pack(seed), _random_indices(seed, n, k), (n / k if k else 1.0)
        a = np.abs(v.numpy())
        if k == n:
            idx = np.arange(n)
        else:
            idx = np.argpartition(a, n - k)[n - k :]
            idx.sort()
        return _U32.pack(k) + _encode_index_set(idx, n), torch.from_numpy(idx), 1.0

    def parse(self, buf: bytes | memoryview, n: int, value_bytes: int) -> tuple[torch.Tensor, int, float]:
        """(sorted indices, offset of the value section, decode factor) from an inner payload."""
        k = self.k(n)
        if self.name == "randk":
            if len(buf) < 8:
                raise _Corrupt(f"truncated: {len(buf)} bytes, no room for the randk seed")
            (seed,) = _U64.unpack_from(buf, 0)
            return _random_indices(seed, n, k), 8, (n / k if k else 1.0)
        if len(buf) < 4:
            raise _Corrupt(f"truncated: {len(buf)} bytes, no room for the topk count")
        (count,) = _U32.unpack_from(buf, 0)
        if count > n:
            raise _Corrupt(f"count {count} larger than size {n}")
        if count != k:
            raise _Corrupt(f"count {count} is not the k = {k} that {self.text} keeps of {n} values")
        end = len(buf) - value_bytes
        if end < 4:
            raise _Corrupt(f"truncated: {len(buf)} bytes, less than the {value_bytes} the values need")
        return torch.from_numpy(_decode_index_set(buf[4:end], n, k)), end, 1.0


def _random_indices(seed: int, n: int, k: int) -> torch.Tensor:
    if k == 0 or k == n:  # what sorting randperm's first 0 or n entries gives, without drawing them
        return torch.arange(k, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


# ---------------------------------------------------------------------------------------------- the codec


@dataclass(frozen=True)
class Codec:
    """One chain of stages; build it with `parse_codec` (which caches it by canonical spec)."""

    spec: str  # canonical chain text, e.g. "topk:0.01+q8+zstd"; goes in the wire header
    lossless: bool  # decode(encode(v)) == v bit for bit (f32, f32+zstd)
    biased: bool  # E[decode(encode(v))] != v: topk, sign, and the round-to-nearest casts f16/bf16
    sparsifier: _Sparsifier | None
    value: _Value
    zstd: bool

    def encode(self, vec: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """The payload for a vector (any shape, flattened; float32 after a cast; NaN/Inf refused).

        `generator` supplies all the randomness (stochastic rounding, the randk seed); None means a fresh
        generator seeded 0, so a caller wanting independent draws per round and client must pass one.
        """
        return self._encode(vec, generator)[0]

    def roundtrip(self, vec: torch.Tensor, generator: torch.Generator | None = None) -> tuple[bytes, torch.Tensor]:
        """(payload, decode(payload)) with one encode: the decoded vector is built from the encoder's own
        intermediate results, bit-identical to decoding the bytes (tested), and never aliases `vec`."""
        payload, out = self._encode(vec, generator)
        if self.sparsifier is None and self.value.name == "f32":
            out = out.clone()
        return payload, out

    def _encode(self, vec: torch.Tensor, generator: torch.Generator | None) -> tuple[bytes, torch.Tensor]:
        v = _as_vector(vec)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        n = v.numel()
        head, idx, factor = b"", None, 1.0
        values = v
        if self.sparsifier is not None:
            head, idx, factor = self.sparsifier.select(v, gen)
            values = v[idx]
        body, decoded_values = self.value.encode(values, gen)
        out = self._assemble(n, idx, decoded_values, factor)
        if out is None:
            raise CodecError(f"{self.spec}: {self.value.name} cannot represent values this large "
                             f"(max |v| = {float(values.abs().max()):.6g})", "input")
        inner = head + body
        payload = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(inner) if self.zstd else inner
        return payload, out

    def decode(self, payload: bytes, size: int) -> torch.Tensor:
        """The float32 vector of length `size` a payload codes; CodecError for anything corrupt."""
        try:
            return self._decode(payload, size)
        except CodecError:
            raise
        except _Corrupt as e:
            raise CodecError(f"corrupt {self.spec!r} payload: {e}", "payload") from None
        except (ValueError, IndexError, TypeError, struct.error, OverflowError, RuntimeError, MemoryError,
                zstandard.ZstdError) as e:  # a check this module missed: still the payload's fault
            raise CodecError(f"corrupt {self.spec!r} payload: {type(e).__name__}: {e}", "payload") from None

    def lossless_size(self, n: int) -> int | None:
        """Payload bytes for n values when the codec is lossless and its size fixed (f32: 4n), else None."""
        return 4 * n if self.lossless and not self.zstd else None

    def payload_size(self, n: int) -> int | None:
        """Payload bytes for n values when they depend on n alone (no topk, no zstd), else None."""
        if self.zstd or (self.sparsifier is not None and self.sparsifier.name == "topk"):
            return None
        if self.sparsifier is None:
            return self.value.nbytes(n)
        return 8 + self.value.nbytes(self.sparsifier.k(n))

    def max_inner_size(self, n: int) -> int:
        """The largest inner (pre-zstd) payload this chain writes for n values: the zstd decoder's cap."""
        if self.sparsifier is None:
            return self.value.nbytes(n)
        return self.sparsifier.header_max(n) + self.value.nbytes(self.sparsifier.k(n))

    # -- internals

    def _decode(self, payload: bytes, size: int) -> torch.Tensor:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise _Corrupt(f"size {size!r} is not an integer in [0, {MAX_SIZE}]")
        size = int(size)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise _Corrupt(f"payload is a {type(payload).__name__}, not bytes")
        inner = _unzstd(payload, self.max_inner_size(size)) if self.zstd else memoryview(payload).cast("B")
        if self.sparsifier is None:
            values = self.value.decode(inner, size)
            idx, factor = None, 1.0
        else:
            k = self.sparsifier.k(size)
            idx, offset, factor = self.sparsifier.parse(inner, size, self.value.nbytes(k))
            values = self.value.decode(inner[offset:], k)
        out = self._assemble(size, idx, values, factor)
        if out is None:
            raise _Corrupt("a decoded value is NaN or Inf")
        return out

    @staticmethod
    def _assemble(n: int, idx: torch.Tensor | None, values: torch.Tensor, factor: float) -> torch.Tensor | None:
        """The dense vector (None if a value is not finite): values at idx, times factor, zeros elsewhere."""
        if factor != 1.0:
            values = values * torch.tensor(factor, dtype=torch.float32)
        if not _all_finite(values):
            return None
        if idx is None:
            return values
        out = torch.zeros(n, dtype=torch.float32)
        out[idx] = values
        return out


def _unzstd(payload: bytes | bytearray | memoryview, cap: int) -> bytes:
    """One zstd frame, decompressed only if it declares at most `cap` bytes; nothing may follow it."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        raise _Corrupt(f"not a zstd frame ({len(payload)} bytes)") from None
    if declared < 0:
        raise _Corrupt("zstd frame does not declare its content size")
    if declared > cap:
        raise _Corrupt(f"zstd frame declares {declared} bytes, over the cap of {cap} for this size")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        inner = dobj.decompress(payload)
    except zstandard.ZstdError as e:
        raise _Corrupt(f"zstd: {e}") from None
    if not dobj.eof:
        raise _Corrupt("truncated zstd frame")
    if dobj.unused_data:
        raise _Corrupt(f"extra bytes: {len(dobj.unused_data)} after the zstd frame")
    if len(inner) != declared:
        raise _Corrupt(f"zstd frame decompressed to {len(inner)} bytes, declared {declared}")
    return inner


# -------------------------------------------------------------------------------------------------- parsing


_QBITS = re.compile(r"q(\d+)")
_NUMBER = re.compile(r"[0-9]+")


def _spec_error(text: str, why: str) -> CodecError:
    return CodecError(f"codec spec {text!r}: {why}", "spec")


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, [*CODEC_NAMES, *_ALIASES], n=1, cutoff=0.5)
    if match:
        return f" (did you mean {_ALIASES.get(match[0], match[0])!r}?)"
    return f" (known stages: {', '.join(CODEC_NAMES)})"


def _parse_amount(name: str, param: str, text: str) -> _Sparsifier:
    example = f"e.g. '{name}:0.01' for 1% or '{name}:1000' for a count"
    if not param:
        raise _spec_error(text, f"{name} needs a fraction in (0, 1] or a count >= 1, {example}")
    if _NUMBER.fullmatch(param):
        count = int(param)
        if count < 1:
            raise _spec_error(text, f"{name} count must be >= 1, got {param} ({example})")
        return _Sparsifier(name, count, None, f"{name}:{count}")
    try:
        f = float(param)
    except ValueError:
        raise _spec_error(text, f"{name} takes a fraction in (0, 1] or a count >= 1, got {param!r} "
                                f"({example})") from None
    if not 0.0 < f <= 1.0:  # also refuses nan
        whole = math.isfinite(f) and f > 1 and f == int(f)
        hint = f"did you mean the count '{name}:{int(f)}'?" if whole else example
        raise _spec_error(text, f"{name} fraction must be in (0, 1], got {param} ({hint})")
    return _Sparsifier(name, None, Fraction(repr(f)), f"{name}:{f!r}")


def _parse_stage(stage: str, text: str) -> str | _Sparsifier:
    """A stage's canonical value-codec name, "zstd", or a sparsifier."""
    raw = stage.strip().lower()
    name, colon, param = raw.partition(":")
    name = _ALIASES.get(name.strip(), name.strip())
    param = param.strip()
    if name in _SPARSIFIER_NAMES:
        return _parse_amount(name, param, text)
    if name in _VALUE_NAMES or name == "zstd":
        if colon:
            raise _spec_error(text, f"{name} takes no parameter, got {stage.strip()!r}")
        return name
    if _QBITS.fullmatch(name):
        raise _spec_error(text, f"{name} is not supported: bits must be 1, 2, 4 or 8")
    if not name:
        raise _spec_error(text, "an empty stage (a stray '+'?)")
    raise _spec_error(text, f"unknown codec stage {stage.strip()!r}{_closest(name)}")


def _check_order(stages: list[str | _Sparsifier], text: str) -> None:
    sparsifiers = [s for s in stages if isinstance(s, _Sparsifier)]
    values = [s for s in stages if isinstance(s, str) and s != "zstd"]
    if len(sparsifiers) > 1:
        raise _spec_error(text, f"at most one sparsifier, got {' and '.join(s.text for s in sparsifiers)}")
    if len(values) > 1:
        raise _spec_error(text, f"at most one value codec, got {' and '.join(values)}")
    if stages.count("zstd") > 1:
        raise _spec_error(text, "zstd given more than once")
    if sparsifiers and not isinstance(stages[0], _Sparsifier):
        raise _spec_error(text, "a sparsifier must come first")
    if "zstd" in stages and stages[-1] != "zstd":
        raise _spec_error(text, "zstd must be the last stage")


@functools.lru_cache(maxsize=512)
def _build(sparsifier: _Sparsifier | None, value_name: str, zstd: bool) -> Codec:
    """One Codec object per canonical chain (bounded: specs can come from a hostile wire header)."""
    value = _VALUES[value_name]
    spec = "+".join([*([sparsifier.text] if sparsifier else []), value_name, *(["zstd"] if zstd else [])])
    lossless = sparsifier is None and value_name == "f32"
    biased = value.biased or (sparsifier is not None and sparsifier.biased)
    return Codec(spec, lossless, biased, sparsifier, value, zstd)


@functools.lru_cache(maxsize=512)
def _parse_text(text: str) -> Codec:
    if not text.strip():
        raise _spec_error(text, "empty: name at least one stage, e.g. 'f32' or 'topk:0.01+q8+zstd'")
    stages = [_parse_stage(s, text) for s in text.split("+")]
    _check_order(stages, text)
    sparsifier = next((s for s in stages if isinstance(s, _Sparsifier)), None)
    value_name = next((s for s in stages if isinstance(s, str) and s != "zstd"), "f32")
    return _build(sparsifier, value_name, "zstd" in stages)


def parse_codec(spec: str | list[str] | tuple[str, ...]) -> Codec:
    """The codec a spec names: "topk:0.01+q8+zstd" or ["topk:0.01", "q8", "zstd"]; CodecError if bad."""
    if isinstance(spec, list | tuple):
        if not all(isinstance(s, str) for s in spec):
            raise CodecError(f"codec spec {spec!r}: every stage must be a string", "spec")
        spec = "+".join(spec)
    if not isinstance(spec, str):
        raise CodecError(f"codec spec must be a string or a list of stages, got {type(spec).__name__}", "spec")
    return _parse_text(spec)


def get_codec(spec: str) -> Codec:
    """= parse_codec (the name wire.py uses)."""
    return parse_codec(spec)
