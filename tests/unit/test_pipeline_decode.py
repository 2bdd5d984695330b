"""Strict, bounded decoding of pipeline payloads: every reason, and fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedd.pipeline import REASONS, DecodeError, Pipeline, accumulate, decode
from fedd.pipeline import varint as v

MAX = 1 << 20
N = 300
FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False)

# stage descriptors as on the wire
TOPK, F32, F16, ZSTD = b"\x10", b"\x01", b"\x02", b"\x20"


def q(bits: int, log2: int = 8) -> bytes:
    return bytes([0x03, bits, log2])


def craft(stages: list[bytes], body: bytes, *, n: int = N, version: int = 1) -> bytes:
    """A payload built by hand: version, stage count, descriptors, n, body."""
    return bytes([version, len(stages)]) + b"".join(stages) + v.encode_one(n) + body


def frame(body: bytes, *, content_size: bool = False) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0,
        write_content_size=int(content_size), write_dict_id=0)
    return zstandard.ZstdCompressor(compression_params=params).compress(body)


def f32(values: list[float] | np.ndarray) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def varint_indices(indices: list[int]) -> bytes:
    gaps = np.diff(np.asarray(indices, np.int64), prepend=0) if indices else []
    return b"\x00" + v.encode_one(len(indices)) + v.encode_many(np.asarray(gaps, np.uint64))


def valid_payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    d = (rng.standard_t(3, N) * 1e-3).astype(np.float32)
    specs = ["float32", "f16", "q:4", "q:1:16", "sign:64", "topk:0.05+q:4+zstd", "topk:0.5+f16",
             "topk:0.02", "q:8+zstd", "topk:3+sign+zstd"]
    return {s: Pipeline.from_spec(s).encode(d, rng=rng).payload for s in specs}


VALID = valid_payloads()
dense_values = f32(np.linspace(-1, 1, N))

# reason → [(what, payload)]; "too-large" is decoded with max_bytes one short
CASES: dict[str, list[tuple[str, bytes]]] = {
    "too-large": [("over max_bytes", VALID["float32"] + b"")],
    "truncated": [
        ("empty", b""),
        ("no stage count", b"\x01"),
        ("values cut short", craft([F32], dense_values[:-1])),
        ("q parameters cut", b"\x01\x01\x03\x04"),
        ("no part length", craft([F32], b"")[:-2]),
        ("index count missing", craft([TOPK, F32], b"\x00")),
        ("index gaps cut", craft([TOPK, F32], b"\x00\x05\x01\x01")),
        ("zstd flag missing", craft([F32, ZSTD], b"")),
        ("bitmap cut", craft([TOPK, F32], b"\x01" + bytes(10))),
    ],
    "trailing-bytes": [
        ("after dense values", craft([F32], dense_values + b"\x00")),
        ("after sparse values", craft([TOPK, F32], varint_indices([1, 2]) + f32([1, 2]) + b"x")),
        ("inside a zstd body", craft([TOPK, F32, ZSTD], b"\x01" + frame(
            varint_indices([1, 2]) + f32([1, 2]) + b"x"))),
    ],
    "unknown-version": [("version 2", craft([F32], dense_values, version=2)),
                        ("version 0", craft([F32], dense_values, version=0))],
    "unknown-stage": [("code 0x7f", craft([b"\x7f"], dense_values)),
                      ("code 0x00", craft([TOPK, b"\x00"], dense_values))],
    "bad-stack": [
        ("no stages", b"\x01\x00" + v.encode_one(N)),
        ("four stages", b"\x01\x04"),
        ("q before topk", craft([q(4), TOPK], b"")),
        ("two value codings", craft([F32, F16], b"")),
        ("zstd first", craft([ZSTD, F32], b"")),
        ("no value coding", craft([TOPK], b"")),
        ("zstd twice", craft([F32, ZSTD, ZSTD], b"")),
    ],
    "bad-parameter": [("3 bits", craft([q(3)], b"")), ("0 bits", craft([q(0)], b"")),
                      ("chunk 2**17", craft([q(4, 17)], b"")),
                      ("sign chunk 2**40", craft([b"\x04\x28"], b""))],
    "stack-mismatch": [("q:4 payload to an f16 pipeline", VALID["q:4"])],
    "wrong-length": [("n + 1", craft([F32], dense_values, n=N + 1)),
                     ("n = 0", craft([F32], b"", n=0))],
    "bad-varint": [
        ("part length not shortest", bytes([1, 1, 1]) + b"\xac\x82\x00" + dense_values),
        ("part length too long", bytes([1, 1, 1]) + b"\xff" * 10),
        ("gap not shortest", craft([TOPK, F32], b"\x00\x01\x80\x00" + f32([1]))),
        ("gap too long", craft([TOPK, F32], b"\x00\x01\xff\xff\xff\xff\xff\x01" + f32([1]))),
    ],
    "bad-index-coding": [
        ("flag 2", craft([TOPK, F32], b"\x02" + f32([1]))),
        ("varints longer than the bitmap",
         craft([TOPK, F32], varint_indices(list(range(0, 300, 2))) + f32(np.ones(150)))),
    ],
    "bad-count": [("k > n", craft([TOPK, F32], b"\x00" + v.encode_one(N + 1)))],
    "index-out-of-range": [
        ("last index = n", craft([TOPK, F32], varint_indices([5, N]) + f32([1, 2]))),
        ("bitmap bit n", craft([TOPK, F32],
                               b"\x01" + bytes(37) + b"\x10" + f32([1]))),  # bit 300
    ],
    "duplicate-index": [("zero gap", craft([TOPK, F32], b"\x00\x02\x05\x00" + f32([1, 2])))],
    "non-finite": [
        ("float32 NaN", craft([F32], f32([np.nan] + [0] * (N - 1)))),
        ("float32 Inf in sparse values", craft([TOPK, F32], varint_indices([3]) + f32([np.inf]))),
        ("f16 Inf", craft([F16], np.array([np.inf] + [0] * (N - 1), "<f2").tobytes())),
        ("q scale Inf", craft([q(8, 9)], b"\x80\x7f" + bytes(N))),
        ("q scale NaN", craft([q(8, 9)], b"\xc0\x7f" + bytes(N))),
        ("sign scale NaN", craft([b"\x04\x09"], b"\xc0\x7f" + bytes(38))),
    ],
    "bad-scale": [("negative q scale", craft([q(8, 9)], b"\x80\xbf" + bytes(N)))],
    "bad-padding": [
        ("q:4, 3 values, high nibble of the last byte set",
         craft([TOPK, q(4)], varint_indices([1, 2, 3]) + b"\x80\x3f" + b"\x21\xf3")),
        ("sign bit past the end", craft([TOPK, b"\x04\x08"], varint_indices([1, 2, 3])
                                        + b"\x80\x3f" + b"\x0f")),
    ],
    "bad-zstd": [
        ("flag 2", craft([F32, ZSTD], b"\x02" + dense_values)),
        ("garbage frame", craft([F32, ZSTD], b"\x01\x07\x07\x07")),
        ("empty frame", craft([F32, ZSTD], b"\x01")),
        ("truncated frame", craft([F32, ZSTD], b"\x01" + frame(dense_values)[:-3])),
        ("byte after the frame", craft([F32, ZSTD], b"\x01" + frame(dense_values) + b"\x00")),
        ("two frames", craft([F32, ZSTD], b"\x01" + frame(dense_values[:600])
                             + frame(dense_values[600:]))),
    ],
    "decompressed-too-large": [
        ("bomb", craft([F32, ZSTD], b"\x01" + frame(bytes(50_000_000)))),
        ("bomb declaring its size", craft([F32, ZSTD],
                                          b"\x01" + frame(bytes(5_000_000), content_size=True))),
        ("one byte over the largest body", craft([F32, ZSTD],
                                                 b"\x01" + frame(dense_values + bytes(1)))),
    ],
}


def test_every_reason_has_a_crafted_case() -> None:
    assert set(CASES) == set(REASONS)


@pytest.mark.parametrize(("reason", "name", "payload"),
                         [(r, name, p) for r, cases in CASES.items() for name, p in cases],
                         ids=[f"{r}:{name}" for r, cases in CASES.items() for name, _ in cases])
def test_crafted_payload_is_rejected_with_its_reason(reason: str, name: str,
                                                     payload: bytes) -> None:
    max_bytes = len(payload) - 1 if reason == "too-large" else MAX
    total = np.zeros(N)
    with pytest.raises(DecodeError) as caught:
        if reason == "stack-mismatch":
            Pipeline.from_spec("f16").decode(payload, length=N, max_bytes=max_bytes)
        else:
            decode(payload, length=N, max_bytes=max_bytes)
    assert caught.value.reason == reason, caught.value
    if reason != "stack-mismatch":
        with pytest.raises(DecodeError):
            accumulate(total, payload, 1.0, max_bytes=max_bytes)
        assert not total.any()


def test_the_crafted_builder_makes_valid_payloads_when_asked() -> None:
    """The hand-built layout is the real one: the same bytes decode when valid."""
    np.testing.assert_array_equal(decode(craft([F32], dense_values), length=N, max_bytes=MAX),
                                  np.linspace(-1, 1, N).astype(np.float32))
    got = decode(craft([TOPK, F32], varint_indices([0, 7, 299]) + f32([1, 2, 3])), length=N,
                 max_bytes=MAX)
    assert got[0] == 1 and got[7] == 2 and got[299] == 3 and np.count_nonzero(got) == 3
    got = decode(craft([F32, ZSTD], b"\x01" + frame(dense_values)), length=N, max_bytes=MAX)
    assert got.shape == (N,)
    got = decode(craft([F32, ZSTD], b"\x00" + dense_values), length=N, max_bytes=MAX)
    assert got.shape == (N,)


def test_a_bomb_is_refused_quickly() -> None:
    import time

    payload = CASES["decompressed-too-large"][0][1]
    start = time.perf_counter()
    with pytest.raises(DecodeError):
        decode(payload, length=N, max_bytes=MAX)
    assert time.perf_counter() - start < 1.0  # it never inflates 50 MB


def test_length_and_payload_type_are_checked() -> None:
    with pytest.raises(ValueError):
        decode(VALID["f16"], length=-1, max_bytes=MAX)
    with pytest.raises(TypeError):
        decode("text", length=N, max_bytes=MAX)  # type: ignore[arg-type]
    assert decode(bytearray(VALID["f16"]), length=N, max_bytes=MAX).shape == (N,)


# ---------------------------------------------------------------- fuzzing


def _decode_or_reason(payload: bytes) -> None:
    """Either a finite float32 vector of the right length, or the pipeline's DecodeError."""
    try:
        got = decode(payload, length=N, max_bytes=MAX)
    except DecodeError as exc:
        assert exc.reason in REASONS
        return
    assert got.dtype == np.float32 and got.shape == (N,) and np.isfinite(got).all()


@FUZZ
@given(st.binary(max_size=400))
@example(b"\x01\x01\x01")
@example(b"\x01\x03\x10\x03\x04\x08\x20\xac\x02\x01")
def test_fuzz_random_bytes(payload: bytes) -> None:
    _decode_or_reason(payload)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.binary(max_size=300))
def test_fuzz_random_bodies_after_valid_headers(spec: str, body: bytes) -> None:
    header = Pipeline.from_spec(spec).header + v.encode_one(N)
    _decode_or_reason(header + body)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.data())
def test_fuzz_mutated_valid_payloads(spec: str, data: st.DataObject) -> None:
    payload = bytearray(VALID[spec])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "drop"]))
        at = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if kind == "flip" and payload:
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and payload:
            payload[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del payload[at:]
        elif kind == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "drop" and payload:
            del payload[at]
    _decode_or_reason(bytes(payload))
    total = np.zeros(N, np.float32)
    try:
        accumulate(total, bytes(payload), 0.5, max_bytes=MAX)
    except DecodeError:
        assert not total.any()
    else:
        assert np.isfinite(total).all()
