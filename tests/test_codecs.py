"""Codecs: round trips, exact sizes, unbiasedness, top-k selection, hostile payloads and spec errors."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import zstandard

from fedloom.pipeline.codecs import CODEC_NAMES, MAX_SIZE, CodecError, get_codec, parse_codec

SIZES = [0, 1, 2, 7, 13, 101, 997, 100_003]
VALUES = ["f32", "f16", "bf16", "q8", "q4", "q2", "q1", "sign"]
SPARSIFIERS = ["", "topk:0.1+", "topk:3+", "randk:0.1+", "randk:3+"]
QBITS = {"q8": 8, "q4": 4, "q2": 2}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vector(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=gen(1000 + seed)) * 3


def k_of(spec: str, n: int) -> int:
    param = spec.split(":")[1].split("+")[0]
    return min(int(param), n) if param.isdigit() else math.ceil(float(param) * n - 1e-9)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("zstd", ["", "+zstd"])
@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
@pytest.mark.parametrize("value", VALUES)
def test_round_trip_at_every_size_decodes_what_roundtrip_says(value, sparsifier, zstd):
    codec = parse_codec(sparsifier + value + zstd)
    for n in SIZES:
        v = vector(n)
        payload, rt = codec.roundtrip(v, gen(n))
        assert payload == codec.encode(v, gen(n))  # roundtrip's payload is encode's
        out = codec.decode(payload, n)
        assert out.dtype == torch.float32 and out.shape == (n,)
        assert torch.isfinite(out).all()
        assert torch.equal(out, rt), f"{codec.spec} n={n}: roundtrip differs from decode(payload)"
        if not sparsifier:
            continue
        k = k_of(sparsifier, n)
        support = torch.nonzero(out).flatten()
        assert len(support) <= k  # a quantizer may round a kept value to 0, never add one


@pytest.mark.parametrize("spec", ["f32", "f32+zstd", "fp32"])
def test_f32_is_exact_and_lossless(spec):
    codec = parse_codec(spec)
    assert codec.lossless and not codec.biased
    for n in SIZES:
        v = vector(n)
        assert torch.equal(codec.decode(codec.encode(v), n), v)
    assert codec.lossless_size(10) == (None if "zstd" in spec else 40)


@pytest.mark.parametrize("value,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precisions_equal_torch_casts(value, dtype):
    codec = parse_codec(value)
    for n in SIZES:
        v = vector(n)
        assert torch.equal(codec.decode(codec.encode(v), n), v.to(dtype).float())
    assert not codec.lossless and codec.lossless_size(10) is None


def test_roundtrip_never_aliases_the_input():
    v = vector(100)
    _, out = parse_codec("f32").roundtrip(v)
    out += 1
    assert torch.equal(v, vector(100))


@pytest.mark.parametrize("spec", [s + v for s in SPARSIFIERS for v in VALUES])
def test_all_zero_vector_decodes_to_zeros(spec):
    codec = parse_codec(spec)
    for n in [1, 13, 997]:
        assert torch.equal(codec.decode(codec.encode(torch.zeros(n)), n), torch.zeros(n))


# ---------------------------------------------------------------------------------------- exact contents


@pytest.mark.parametrize("value", ["q8", "q4", "q2"])
def test_quantized_values_are_within_one_level_of_the_input(value):
    codec, s = parse_codec(value), 2 ** (QBITS[value] - 1) - 1
    for n in SIZES[1:]:
        v = vector(n)
        step = float(v.abs().max()) / s
        out = codec.decode(codec.encode(v, gen(n)), n)
        assert float((out - v).abs().max()) <= step * (1 + 1e-5)
        levels = out / step  # every output is an integer level in [-s, s]
        assert torch.allclose(levels, levels.round(), atol=1e-3) and float(levels.abs().max()) <= s + 1e-3


def test_q1_and_sign_decode_to_two_values():
    v = vector(997)
    q1 = parse_codec("q1").decode(parse_codec("q1").encode(v), 997)
    assert set(q1.abs().unique().tolist()) == {float(v.abs().max())}
    sign = parse_codec("sign").decode(parse_codec("sign").encode(v), 997)
    scale = np.float32(v.abs().mean())
    assert torch.equal(sign, torch.where(v >= 0, float(scale), -float(scale)))


def test_topk_keeps_exactly_the_largest_and_zeroes_the_rest():
    for n, spec in [(997, "topk:0.1"), (13, "topk:3"), (100_003, "topk:0.01"), (7, "topk:1.0"), (5, "topk:9")]:
        v = vector(n)
        out = parse_codec(spec).decode(parse_codec(spec).encode(v), n)
        k = k_of(spec, n)
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], v[kept])  # f32 values, unchanged
        if k < n:
            assert float(v[kept].abs().min()) > float(v[~kept].abs().max())


def test_topk_with_ties_keeps_exactly_k_of_the_largest_magnitudes():
    v = torch.tensor([3.0, -3.0, 1.0, 3.0, -2.0, 2.0, 3.0, 0.5] * 20)  # 80 values of |v| = 3
    for k in [1, 40, 80, 90, 100]:
        out = parse_codec(f"topk:{k}").decode(parse_codec(f"topk:{k}").encode(v), len(v))
        kept = out != 0
        assert int(kept.sum()) == k and torch.equal(out[kept], v[kept])
        assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())
    assert parse_codec("topk:40").encode(v) == parse_codec("topk:40").encode(v.clone())  # a consistent rule


def test_fractions_use_exact_decimal_arithmetic():
    # 0.07 * 100 = 7.000000000000001 in floating point; ceil would keep 8
    out = parse_codec("topk:0.07").decode(parse_codec("topk:0.07").encode(vector(100)), 100)
    assert int((out != 0).sum()) == 7
    assert parse_codec("randk:0.07").payload_size(100) == 8 + 4 * 7


def test_randk_keeps_k_entries_scaled_by_n_over_k():
    n = 1000
    v = vector(n)
    for spec, k in [("randk:0.1", 100), ("randk:7", 7)]:
        out = parse_codec(spec).decode(parse_codec(spec).encode(v, gen(3)), n)
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.allclose(out[kept], v[kept] * (n / k), rtol=1e-6)


# ------------------------------------------------------------------------------------------ unbiasedness


def _mean_of_draws(spec: str, v: torch.Tensor, draws: int = 2000) -> torch.Tensor:
    codec = parse_codec(spec)
    total = torch.zeros(len(v), dtype=torch.float64)
    for seed in range(draws):
        total += codec.decode(codec.encode(v, gen(seed)), len(v)).double()
    return total / draws


def _assert_unbiased(mean: torch.Tensor, v: torch.Tensor, var: torch.Tensor, draws: int = 2000) -> None:
    """|mean - v| within 5 standard errors (from the exact or a bounding variance) plus float rounding."""
    bound = 5 * torch.sqrt(var / draws) + 1e-5 * float(v.abs().max())
    excess = (mean - v.double()).abs() - bound
    assert float(excess.max()) <= 0, f"coordinate {int(excess.argmax())} off by more than 5 standard errors"


V = torch.tensor([2.0, -1.3, 0.77, 0.0, -0.051, 1.999, 0.5, -2.0, 0.333, 1.25, -0.9, 0.01])


@pytest.mark.parametrize("value", ["q8", "q4", "q2"])
def test_stochastic_quantizers_are_unbiased(value):
    s = 2 ** (QBITS[value] - 1) - 1
    step = float(V.abs().max()) / s
    x = V.double() / step
    p = x - x.floor()
    var = step**2 * p * (1 - p)  # one Bernoulli rounding between two levels a step apart
    _assert_unbiased(_mean_of_draws(value, V), V, var)


def test_q1_is_unbiased():
    m = float(V.abs().max())
    var = m**2 * (1 - (V.double() / m) ** 2)  # +-M with P(+M) = (1 + v/M) / 2
    _assert_unbiased(_mean_of_draws("q1", V), V, var)


def test_randk_is_unbiased():
    n, k = len(V), 3
    var = V.double() ** 2 * (n / k - 1)  # v n/k with probability k/n, else 0
    _assert_unbiased(_mean_of_draws(f"randk:{k}", V), V, var)


def test_randk_with_q4_is_unbiased():
    n, k, s = len(V), 4, 7
    step = float(V.abs().max()) / s  # the sampled values' max is at most the vector's
    var = (n / k) * (V.double() ** 2 + step**2 / 4) - V.double() ** 2  # E[X^2] - v^2, bounded
    _assert_unbiased(_mean_of_draws(f"randk:{k}+q4", V), V, var)


def test_a_biased_rounding_would_fail_the_unbiasedness_check():
    step = float(V.abs().max()) / 7  # q4
    nearest = torch.round(V / step) * step  # what deterministic rounding would average to
    x = V.double() / step
    var = step**2 * (x - x.floor()) * (1 - x + x.floor())
    with pytest.raises(AssertionError):
        _assert_unbiased(nearest.double(), V, var)


def test_bias_flags():
    assert {s: parse_codec(s).biased for s in ["f32", "q8", "q1", "randk:0.1+q2", "topk:0.1", "sign",
                                                   "randk:0.1+sign", "f16"]} == {
        "f32": False, "q8": False, "q1": False, "randk:0.1+q2": False, "topk:0.1": True, "sign": True,
        "randk:0.1+sign": True, "f16": True}


# -------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("n", SIZES)
def test_payload_lengths_match_the_layout(n):
    v = vector(n)
    expect = {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8": 4 + n, "q4": 4 + (n + 1) // 2,
              "q2": 4 + (n + 3) // 4, "q1": 4 + (n + 7) // 8, "sign": 4 + (n + 7) // 8}
    for value, nbytes in expect.items():
        codec = parse_codec(value)
        assert len(codec.encode(v)) == nbytes == codec.payload_size(n), value
        k = k_of("randk:0.1", n)
        assert len(parse_codec(f"randk:0.1+{value}").encode(v)) == 8 + expect_for(value, k)


def expect_for(value: str, m: int) -> int:
    return {"f32": 4 * m, "f16": 2 * m, "bf16": 2 * m, "q8": 4 + m, "q4": 4 + (m + 1) // 2,
            "q2": 4 + (m + 3) // 4, "q1": 4 + (m + 7) // 8, "sign": 4 + (m + 7) // 8}[value]


@pytest.mark.parametrize("n", [8, 13, 101, 997, 100_003])
def test_topk_bitmap_size_when_the_bitmap_is_smaller(n):
    k = math.ceil(0.5 * n)  # half the entries: gaps of ~2 cost a byte each, the bitmap n/8
    payload = parse_codec("topk:0.5+q8").encode(vector(n))
    assert payload[4] == 0  # bitmap tag
    assert len(payload) == 4 + 1 + (n + 7) // 8 + 4 + k


def test_topk_varint_size_with_known_gaps():
    n, spacing, k = 100_000, 300, 334
    v = torch.zeros(n)
    v[::spacing] = torch.arange(1, k + 1, dtype=torch.float32)  # the kept indices: 0, 300, 600, ...
    payload = parse_codec(f"topk:{k}").encode(v)
    assert payload[4] == 1  # varint tag
    assert len(payload) == 4 + 1 + (1 + 2 * (k - 1)) + 4 * k  # gap 0: 1 byte; gap 300: 2 bytes
    assert torch.equal(parse_codec(f"topk:{k}").decode(payload, n), v)


def test_zstd_shrinks_redundant_payloads_and_sizes_are_not_fixed():
    codec = parse_codec("q8+zstd")
    assert len(codec.encode(torch.zeros(10_000))) < 100
    assert codec.payload_size(10) is None and parse_codec("topk:0.1").payload_size(10) is None


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("spec", ["q8", "q1", "randk:0.1+q4+zstd", "topk:0.01+q2", "sign"])
def test_same_generator_seed_gives_the_same_bytes(spec):
    codec, v = parse_codec(spec), vector(997)
    assert codec.encode(v, gen(5)) == codec.encode(v, gen(5))
    assert codec.encode(v) == codec.encode(v, gen(0))  # None: a fresh generator seeded 0
    if spec not in ("sign", "topk:0.01+q2"):  # deterministic codecs aside, seeds matter
        assert codec.encode(v, gen(5)) != codec.encode(v, gen(6))


def test_encoder_draws_from_the_generator_it_is_given():
    g = gen(1)
    parse_codec("q8").encode(vector(10), g)
    assert not torch.equal(g.get_state(), gen(1).get_state())


# --------------------------------------------------------------------------------------- corrupt payloads


CORRUPTIBLE = ["f32", "f16", "bf16", "q8", "q4", "q2", "q1", "sign", "topk:0.3+q4", "topk:3+f32", "topk:0.9+q8",
               "topk:1+f32", "topk:2+q1", "randk:0.5+q2", "f32+zstd", "topk:0.3+q8+zstd", "topk:2+q8+zstd",
               "randk:4+sign+zstd"]


@pytest.mark.parametrize("spec", CORRUPTIBLE)
def test_every_truncation_and_any_extra_byte_is_refused(spec):
    codec, n = parse_codec(spec), 13
    payload = codec.encode(vector(n))
    for cut in range(len(payload)):
        with pytest.raises(CodecError) as e:
            codec.decode(payload[:cut], n)
        assert e.value.kind == "payload" and spec.split("+")[0] in str(e.value)
    for extra in [b"\x00", b"\x80\x01"]:
        with pytest.raises(CodecError):
            codec.decode(payload + extra, n)


@pytest.mark.parametrize("spec", CORRUPTIBLE)
def test_flipped_bytes_give_a_codec_error_or_a_finite_vector(spec):
    codec, n = parse_codec(spec), 13
    payload = bytearray(codec.encode(vector(n)))
    rng = np.random.default_rng(0)
    trials = [(i, 0xFF) for i in range(len(payload))] + [(int(rng.integers(len(payload))),
                                                         int(rng.integers(1, 256))) for _ in range(200)]
    for i, mask in trials:
        bad = bytearray(payload)
        bad[i] ^= mask
        try:
            out = codec.decode(bytes(bad), n)
        except CodecError:
            continue
        assert out.shape == (n,) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", CORRUPTIBLE)
def test_random_garbage_never_escapes_as_another_exception(spec):
    codec, rng = parse_codec(spec), np.random.default_rng(1)
    for _ in range(300):
        data = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        try:
            out = codec.decode(data, int(rng.integers(0, 40)))
        except CodecError:
            continue
        assert torch.isfinite(out).all()


def _topk_payload(k: int, tag: int, index_bytes: bytes, values: list[float]) -> bytes:
    return struct.pack("<IB", k, tag) + index_bytes + struct.pack(f"<{len(values)}f", *values)


@pytest.mark.parametrize("payload,size,why", [
    (_topk_payload(2, 1, bytes([3, 9]), [1.0, 2.0]), 10, "out of range"),  # indices 3, 12
    (_topk_payload(2, 1, bytes([10, 1]), [1.0, 2.0]), 10, "out of range"),  # first index 10
    (_topk_payload(2, 1, bytes([3, 0]), [1.0, 2.0]), 10, "strictly increasing"),  # 3, 3
    (_topk_payload(2, 1, bytes([0x80] * 5 + [1, 1]), [1.0, 2.0]), 10, "varint overflow"),
    (_topk_payload(2, 1, bytes([3, 0x81]), [1.0, 2.0]), 10, "unterminated"),
    (_topk_payload(11, 1, bytes(range(1, 12)), [1.0] * 11), 10, "larger than size"),
    (_topk_payload(3, 1, bytes([1, 1, 1]), [1.0] * 3), 10, "is not the k"),
    (_topk_payload(2, 7, bytes([3, 1]), [1.0, 2.0]), 10, "unknown index coding tag"),
    (_topk_payload(2, 0, bytes([0b00000101, 0b00000100]), [1.0, 2.0]), 10, "padding"),  # bit 10 of size 10
    (_topk_payload(2, 0, bytes([0b00000111, 0]), [1.0, 2.0]), 10, "sets 3 bits"),
    (_topk_payload(2, 1, bytes([3, 1]), [1.0, float("nan")]), 10, "NaN or Inf"),
    (_topk_payload(2, 1, bytes([3, 1]), [float("inf"), 1.0]), 10, "NaN or Inf"),
])
def test_hostile_topk_index_sets_are_refused(payload, size, why):
    with pytest.raises(CodecError, match=why):
        parse_codec("topk:2").decode(payload, size)


@pytest.mark.parametrize("scale,why", [(float("nan"), "scale is nan"), (float("inf"), "scale is inf"),
                                       (-1.0, "negative")])
@pytest.mark.parametrize("value", ["q8", "q4", "q2", "q1", "sign"])
def test_a_bad_scale_is_refused(value, scale, why):
    codec = parse_codec(value)
    payload = struct.pack("<f", scale) + codec.encode(vector(13))[4:]
    with pytest.raises(CodecError, match=why):
        codec.decode(payload, 13)


def test_non_finite_values_and_invalid_levels_are_refused():
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse_codec("f32").decode(struct.pack("<3f", 1.0, float("nan"), 2.0), 3)
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse_codec("f16").decode(np.array([1.0, np.inf], "<f2").tobytes(), 2)
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse_codec("randk:2+f32").decode(struct.pack("<Q2f", 1, 3e38, 1.0), 10)  # 3e38 * 10/2 overflows
    with pytest.raises(CodecError, match="level code 255"):
        parse_codec("q8").decode(struct.pack("<f", 1.0) + bytes([0, 255]), 2)


@pytest.mark.parametrize("size", [-1, MAX_SIZE + 1, 2**64, 3.0, "3", None, True])
def test_bad_sizes_are_refused(size):
    codec = parse_codec("topk:1")
    with pytest.raises(CodecError, match="size"):
        codec.decode(codec.encode(vector(3)), size)


def test_numpy_integer_sizes_are_accepted():
    codec = parse_codec("q8")
    assert codec.decode(codec.encode(vector(5)), np.int64(5)).shape == (5,)


def test_a_size_that_does_not_match_the_payload_is_refused():
    payload = parse_codec("q8").encode(vector(100))
    for size in [99, 101, 10**9]:
        with pytest.raises(CodecError, match="truncated|extra bytes"):
            parse_codec("q8").decode(payload, size)


def test_zstd_bomb_and_malformed_frames_are_refused():
    codec = parse_codec("q8+zstd")
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(20_000_000))
    assert len(bomb) < 2000
    with pytest.raises(CodecError, match="over the cap of 14 "):
        codec.decode(bomb, 10)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = no_size.compress(b"\x00" * 14) + no_size.flush()
    with pytest.raises(CodecError, match="does not declare its content size"):
        codec.decode(frame, 10)
    with pytest.raises(CodecError, match="not a zstd frame"):
        codec.decode(parse_codec("q8").encode(vector(10)), 10)
    good = codec.encode(vector(10))
    with pytest.raises(CodecError, match="extra bytes"):
        codec.decode(good + good, 10)


def test_a_zstd_frame_that_lies_about_its_size_is_refused():
    inner = parse_codec("f32").encode(vector(250))  # 1000 bytes
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(inner))
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20 and fhd & 3 == 0  # 2-byte content size right after the descriptor
    frame[5:7] = struct.pack("<H", 600 - 256)
    assert zstandard.frame_content_size(bytes(frame)) == 600
    with pytest.raises(CodecError):
        parse_codec("f32+zstd").decode(bytes(frame), 250)


# -------------------------------------------------------------------------------------------- encoding


def test_encode_refuses_non_finite_input_and_values_a_format_cannot_hold():
    v = vector(10)
    v[4] = float("nan")
    with pytest.raises(CodecError, match="index 4"):
        parse_codec("q8").encode(v)
    with pytest.raises(CodecError, match="f16 cannot represent"):
        parse_codec("f16").encode(torch.tensor([1.0, 70000.0]))
    assert torch.equal(parse_codec("bf16").roundtrip(torch.tensor([70000.0]))[1], torch.tensor([70144.0]))


def test_encode_flattens_any_shape_and_dtype():
    m = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    assert torch.equal(parse_codec("f32").decode(parse_codec("f32").encode(m), 12), torch.arange(12.0))


# ------------------------------------------------------------------------------------------------ specs


def test_canonical_specs_and_caching():
    codec = parse_codec("topk:0.010+q8+zstd")
    assert codec.spec == "topk:0.01+q8+zstd"
    assert parse_codec(["topk:1e-2", "Q8", "zstd"]) is codec is get_codec("topk:0.01+q8+zstd")
    assert parse_codec("topk:0.1").spec == "topk:0.1+f32"
    assert parse_codec("fp16+zstd").spec == "f16+zstd"
    assert parse_codec("randk:100").spec == "randk:100+f32"  # a whole number is a count
    assert parse_codec("topk:1.0").spec == "topk:1.0+f32"  # a fraction: keep everything
    assert parse_codec(" zstd ").spec == "f32+zstd"
    assert set(CODEC_NAMES) == {"topk", "randk", "f32", "f16", "bf16", "q8", "q4", "q2", "q1", "sign", "zstd"}


@pytest.mark.parametrize("spec,message", [
    ("topp:0.01", "unknown codec stage 'topp:0.01' (did you mean 'topk'?)"),
    ("topk:0.01+q8+zstdd", "unknown codec stage 'zstdd' (did you mean 'zstd'?)"),
    ("float61", "unknown codec stage 'float61' (did you mean 'f16'?)"),
    ("q8+topk:0.01", "'q8+topk:0.01': a sparsifier must come first"),
    ("zstd+q8", "zstd must be the last stage"),
    ("q3", "q3 is not supported: bits must be 1, 2, 4 or 8"),
    ("q16", "q16 is not supported: bits must be 1, 2, 4 or 8"),
    ("topk:2.5", "topk fraction must be in (0, 1], got 2.5"),
    ("topk:2.0", "did you mean the count 'topk:2'?"),
    ("randk:-0.1", "randk fraction must be in (0, 1], got -0.1"),
    ("topk:nan", "topk fraction must be in (0, 1], got nan"),
    ("topk:0", "topk count must be >= 1, got 0"),
    ("topk:1%", "topk takes a fraction in (0, 1] or a count >= 1, got '1%'"),
    ("topk", "topk needs a fraction in (0, 1] or a count >= 1"),
    ("q8:2", "q8 takes no parameter"),
    ("topk:0.1+randk:0.1", "at most one sparsifier"),
    ("q8+f16", "at most one value codec, got q8 and f16"),
    ("zstd+zstd", "zstd given more than once"),
    ("", "empty"),
    ("q8++zstd", "empty stage"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(CodecError) as e:
        parse_codec(spec)
    assert message in str(e.value) and e.value.kind == "spec"
    assert isinstance(e.value, ValueError)


def test_non_string_specs_are_refused():
    for spec in [None, 3, ["q8", 3]]:
        with pytest.raises(CodecError, match="codec spec"):
            parse_codec(spec)  # type: ignore[arg-type]
