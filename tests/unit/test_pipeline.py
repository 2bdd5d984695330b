"""Update codec pipeline (fedd/pipeline): specs, round trips, statistics, error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from fedd.pipeline import (
    Decoded,
    Pipeline,
    SpecError,
    accumulate,
    decode,
    largest_payload,
    read,
    varint,
)
from fedd.pipeline import indices as index_coding
from fedd.pipeline.reader import Reader
from fedd.pipeline.topk import TopK
from fedd.pipeline.zstd import Zstd

MAX = 1 << 24
STACKS = ["float32", "f16", "q:8", "q:4", "q:2", "q:1", "q:4:16", "sign", "sign:32",
          "topk:0.01", "topk:0.05+f16", "topk:0.01+q:4+zstd", "topk:0.3+q:2:64+zstd:1",
          "topk:7+sign+zstd", "zstd", "f16+zstd", "q:8+zstd:19", "topk:1.0+q:1"]


def delta(size: int = 2000, seed: int = 0, scale: float = 1e-3) -> np.ndarray:
    """Heavy-tailed like a real update, with a few exact zeros and a run of equal values."""
    rng = np.random.default_rng(seed)
    out = (rng.standard_t(3, size) * scale).astype(np.float32)
    out[: size // 50] = 0.0
    out[size // 2 : size // 2 + 10] = np.float32(scale)
    return out


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(("spec", "canonical"), [
    ("float32", "float32"), ("f32", "float32"), ("F16", "f16"), ("float16", "f16"),
    ("q:4", "q:4:256"), ("q:2:64", "q:2:64"), ("sign", "sign:256"),
    ("topk:0.01", "topk:0.01+float32"), ("topk:1%", "topk:0.01+float32"),
    ("topk:100", "topk:100+float32"), ("topk:1e-3+q:4+zstd", "topk:0.001+q:4:256+zstd:3"),
    (" topk : 0.01 + q : 4 + zstd : 9 ", "topk:0.01+q:4:256+zstd:9"),
    ("zstd", "float32+zstd:3"), ("topk:0.01+zstd", "topk:0.01+float32+zstd:3"),
    ("topk:1.0+f16", "topk:1.0+f16"),
])
def test_spec_is_canonical_and_stable(spec: str, canonical: str) -> None:
    pipe = Pipeline.from_spec(spec)
    assert pipe.spec == canonical
    assert Pipeline.from_spec(pipe.spec) == pipe
    assert Pipeline.from_spec(pipe.spec).header == pipe.header


@pytest.mark.parametrize(("spec", "says"), [
    ("", "empty"),
    ("q4", "unknown stage 'q4'"),
    ("topk:0.01+quant:4", "unknown stage 'quant:4'"),
    ("zstdd", "did you mean 'zstd'"),
    ("q:3", "bits must be 1, 2, 4 or 8"),
    ("q", "needs the number of bits"),
    ("q:4:100", "power of two"),
    ("q:4:131072", "between 1 and 65536"),
    ("q:x", "must be an integer"),
    ("q:4+topk:0.01", "must come before the value coding"),
    ("zstd+topk:0.01", "must come before the value coding"),
    ("topk:0.01+topk:0.1", "at most one sparsifier"),
    ("f16+q:4", "one value coding"),
    ("zstd+q:4", "must be the last stage"),
    ("q:4+zstd+zstd", "at most one byte coder"),
    ("q:4++zstd", "empty stage"),
    ("topk", "needs how much to keep"),
    ("topk:0", "between 1 and"),
    ("topk:1.5", "in (0, 1]"),
    ("topk:0.0", "in (0, 1]"),
    ("topk:nan.", "not a number"),
    ("topk:200%", "(0, 100]"),
    ("topk:x", "must be an integer"),
    ("zstd:0", "between 1 and 22"),
    ("f16:2", "takes no parameter"),
    ("sign:4:4", "at most a chunk size"),
])
def test_bad_specs_are_refused_with_a_sentence(spec: str, says: str) -> None:
    with pytest.raises(SpecError) as caught:
        Pipeline.from_spec(spec)
    assert says in str(caught.value)
    assert isinstance(caught.value, ValueError)  # config loaders catch ValueError


def test_a_spec_must_be_a_string() -> None:
    with pytest.raises(SpecError, match="string"):
        Pipeline.from_spec(4)  # type: ignore[arg-type]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec", STACKS)
def test_round_trip_sends_exactly_what_the_residual_assumes(spec: str) -> None:
    """decode(payload) is bit-for-bit the vector error feedback subtracted."""
    pipe = Pipeline.from_spec(spec)
    d = delta()
    residual = delta(seed=1, scale=1e-4)
    out = pipe.encode(d, residual, rng=np.random.default_rng(3))
    accumulated = d + residual
    got = pipe.decode(out.payload, length=d.size, max_bytes=MAX)
    assert got.dtype == np.float32 and got.shape == d.shape and np.isfinite(got).all()
    np.testing.assert_array_equal(decode(out.payload, length=d.size, max_bytes=MAX), got)
    parsed = read(out.payload, length=d.size, max_bytes=MAX)
    if pipe.sparse:
        assert parsed.indices is not None
        kept = parsed.indices
        assert (got[np.setdiff1d(np.arange(d.size), kept)] == 0).all()
        np.testing.assert_array_equal(out.residual[kept], accumulated[kept] - got[kept])
        unsent = np.ones(d.size, bool)
        unsent[kept] = False
        np.testing.assert_array_equal(out.residual[unsent], accumulated[unsent])
    else:
        assert parsed.indices is None
        np.testing.assert_array_equal(out.residual, accumulated - got)
    assert out.measurements["bytes"] == len(out.payload) <= pipe.max_payload_bytes(d.size)
    assert out.payload[:len(pipe.header)] == pipe.header


def test_float32_is_lossless_including_odd_values() -> None:
    d = np.array([-0.0, 1e-45, 3.4e38, -3.4e38, 1 / 3, 0.0], np.float32)
    out = Pipeline.from_spec("float32").encode(d)
    np.testing.assert_array_equal(decode(out.payload, length=6, max_bytes=MAX).view(np.uint32),
                                  d.view(np.uint32))
    assert not out.residual.any()
    assert len(out.payload) == 4 * 6 + 4  # version, 1 stage, code, n


def test_float16_error_bound_and_clipping() -> None:
    rng = np.random.default_rng(5)
    normal = (rng.choice([-1, 1], 3000) * 10 ** rng.uniform(-4.5, 4.8, 3000)).astype(np.float32)
    tiny = (rng.uniform(-1, 1, 500) * 2.0**-14).astype(np.float32)
    huge = np.array([7e4, -1e9, 65504, 65519], np.float32)
    d = np.concatenate([normal, tiny, huge])
    out = Pipeline.from_spec("f16").encode(d)
    got = decode(out.payload, length=d.size, max_bytes=MAX)
    big = np.abs(d) >= 2.0**-14
    inside = big & (np.abs(d) <= 65504)
    assert (np.abs(got - d)[inside] <= 2.0**-11 * np.abs(d[inside])).all()
    assert (np.abs(got - d)[~big] <= 2.0**-25).all()
    np.testing.assert_array_equal(got[-4:], [65504, -65504, 65504, 65504])
    assert out.measurements["f16"]["clipped"] == 3  # 65519 too, though it rounds to 65504


def test_empty_part() -> None:
    for spec in ("float32", "q:4+zstd", "topk:0.01+q:2", "sign"):
        pipe = Pipeline.from_spec(spec)
        out = pipe.encode(np.zeros(0, np.float32), rng=np.random.default_rng(0))
        assert pipe.decode(out.payload, length=0, max_bytes=MAX).shape == (0,)


def test_zero_vector_and_constant_chunks() -> None:
    for spec in ("q:1", "q:8", "sign", "topk:0.1+q:4"):
        got = decode(Pipeline.from_spec(spec).encode(np.zeros(300, np.float32),
                                                     rng=np.random.default_rng(0)).payload,
                     length=300, max_bytes=MAX)
        assert not got.any()


def test_encode_is_deterministic_given_the_rng_and_works_without_one() -> None:
    pipe = Pipeline.from_spec("topk:0.1+q:2+zstd")
    d = delta()
    a = pipe.encode(d, rng=np.random.default_rng(9)).payload
    assert a == pipe.encode(d, rng=np.random.default_rng(9)).payload
    assert pipe.decode(pipe.encode(d).payload, length=d.size, max_bytes=MAX).shape == d.shape


def test_encode_refuses_bad_input() -> None:
    pipe = Pipeline.from_spec("f16")
    with pytest.raises(ValueError, match="NaN"):
        pipe.encode(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pipe.encode(np.ones(2, np.float32), np.array([np.inf, 0], np.float32))
    with pytest.raises(ValueError, match="shape"):
        pipe.encode(np.ones(3, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        pipe.encode(np.ones((2, 2), np.float32))


def test_stages_read_from_a_payload_decode_but_do_not_encode() -> None:
    out = Pipeline.from_spec("topk:0.01+q:4+zstd").encode(delta(), rng=np.random.default_rng(0))
    parsed = read(out.payload, length=2000, max_bytes=MAX)
    assert parsed.stack == "topk+q:4:256+zstd"
    hub_side = Pipeline.from_spec("topk:5+q:4+zstd:1")  # another k and level: same decoder
    assert hub_side.decode(out.payload, length=2000, max_bytes=MAX).shape == (2000,)
    with pytest.raises(SpecError, match="decode, not encode"):
        Pipeline([TopK()]).encode(delta())
    with pytest.raises(SpecError, match="decode, not encode"):
        Pipeline([Zstd(level=None)]).encode(delta())


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_quantization_is_unbiased_and_within_its_chunk_grid(bits: int) -> None:
    chunk = 64
    x = delta(size=200, seed=bits)  # 4 chunks, the last one short
    pipe = Pipeline.from_spec(f"q:{bits}:{chunk}")
    rng = np.random.default_rng(100 + bits)
    draws = 3000
    total = np.zeros(x.size, np.float64)
    scales = np.array([np.abs(x[i : i + chunk]).max() for i in range(0, x.size, chunk)])
    spacing = np.repeat(2 * scales / ((1 << bits) - 1), chunk)[: x.size] * (1 + 2.0**-7)
    for _ in range(draws):
        got = pipe.decode(pipe.encode(x, rng=rng).payload, length=x.size, max_bytes=MAX)
        # one grid step at most, and never past the chunk's scale (rounded up to bf16)
        assert (np.abs(got - x) <= spacing * (1 + 1e-6)).all()
        assert (np.abs(got) <= np.repeat(scales, chunk)[: x.size] * (1 + 2.0**-7)).all()
        total += got
    mean = total / draws
    # each draw's error is within ±spacing with variance <= spacing²/4: 6 standard errors
    bound = 6 * spacing / (2 * np.sqrt(draws)) + 1e-9
    assert (np.abs(mean - x) <= bound).all()


def test_scales_are_bfloat16_rounded_up_and_cover_the_chunk() -> None:
    x = np.array([3.0000001, -1e-30, 2.5e38, 1e-40], np.float32)
    for value in x:
        v = np.full(4, value, np.float32)
        pipe = Pipeline.from_spec("q:8:4")
        out = pipe.encode(v, rng=np.random.default_rng(0))
        start = len(pipe.header) + 1  # after the header and n (one varint byte)
        scale_bits = int.from_bytes(out.payload[start : start + 2], "little")
        scale = np.array([scale_bits << 16], np.uint32).view(np.float32)[0]
        # bfloat16 keeps 8 significant bits; its subnormals are 2**-133 apart
        assert abs(value) <= scale <= abs(value) + max(abs(value) * 2.0**-7, 2.0**-133)


def test_sign_sends_the_mean_magnitude_with_each_sign() -> None:
    x = delta(size=100, seed=4)
    x[x == 0] = 1e-5
    got = decode(Pipeline.from_spec("sign:32").encode(x).payload, length=100, max_bytes=MAX)
    assert (np.sign(got) == np.sign(x)).all()
    for start in range(0, 100, 32):
        block = x[start : start + 32]
        np.testing.assert_allclose(np.abs(got[start : start + 32]), np.abs(block).mean(),
                                   rtol=2.0**-8)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize(("spec", "size", "kept"), [
    ("topk:0.01", 2000, 20), ("topk:0.001", 8288, 8), ("topk:0.001", 198, 1),
    ("topk:5", 2000, 5), ("topk:5000", 2000, 2000), ("topk:1.0", 300, 300),
])
def test_topk_keeps_the_largest_magnitudes(spec: str, size: int, kept: int) -> None:
    x = delta(size=size, seed=size)
    out = Pipeline.from_spec(spec).encode(x)
    parsed = read(out.payload, length=size, max_bytes=MAX)
    assert parsed.indices is not None and parsed.indices.size == kept
    assert out.measurements["topk"]["kept"] == kept
    dropped = np.ones(size, bool)
    dropped[parsed.indices] = False
    if dropped.any():
        assert np.abs(x[parsed.indices]).min() >= np.abs(x[dropped]).max()
    np.testing.assert_array_equal(parsed.values, x[parsed.indices])  # float32 values: exact


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.01+q:4+zstd", "topk:3+sign", "sign",
                                  "q:8", "q:4:16", "f16", "topk:0.05+q:2:8", "q:1"])
def test_error_feedback_loses_nothing_over_many_rounds(spec: str) -> None:
    """Σ decoded sends + final residual == Σ deltas, to float32 rounding of what moved."""
    pipe = Pipeline.from_spec(spec)
    rng = np.random.default_rng(11)
    residual = None
    sent = np.zeros(1000, np.float64)
    deltas = np.zeros(1000, np.float64)
    largest = 0.0
    for round_ in range(60):
        d = delta(size=1000, seed=round_)
        out = pipe.encode(d, residual, rng=rng)
        residual = out.residual
        decoded = pipe.decode(out.payload, length=1000, max_bytes=MAX)
        sent += decoded
        deltas += d
        largest = max(largest, np.abs(decoded).max(), np.abs(residual).max())
    # float32 rounds each round's residual and send at 2**-24 of their size
    np.testing.assert_allclose(sent + residual, deltas, rtol=0, atol=60 * 2.0**-23 * largest)
    if pipe.error_feedback_safe(1000):  # bounded: not much more than the deltas' own size
        assert np.abs(residual).max() < 100 * np.abs(deltas).max()


def test_error_feedback_safety_is_stated_and_real() -> None:
    expected = {"float32": True, "f16": True, "sign": True, "q:8": True, "q:4:128": True,
                "q:4": False, "q:2": False, "q:2:8": True, "q:1": False, "q:1:1": False,
                "topk:0.001+q:4": True, "topk:0.001+q:1": False, "topk:0.5+q:4": False,
                "topk:0.01": True}
    for spec, safe in expected.items():
        assert Pipeline.from_spec(spec).error_feedback_safe(8288) is safe, spec
    grows, stays = Pipeline.from_spec("q:1"), Pipeline.from_spec("sign")
    rng = np.random.default_rng(0)
    residuals = {grows: None, stays: None}
    for round_ in range(40):
        d = delta(size=1000, seed=round_)
        for pipe in residuals:
            residuals[pipe] = pipe.encode(d, residuals[pipe], rng=rng).residual
    scale = np.abs(delta(size=1000)).max()
    assert np.abs(residuals[stays]).max() < 50 * scale
    assert np.abs(residuals[grows]).max() > 1000 * scale  # why the property exists


def test_error_feedback_sends_every_coordinate_eventually() -> None:
    """A small, steady coordinate grows in the residual until top-k sends it."""
    pipe = Pipeline.from_spec("topk:1")
    d = np.zeros(10, np.float32)
    d[0], d[1] = 1.0, 0.3
    residual, sent = None, np.zeros(10)
    for _ in range(10):
        out = pipe.encode(d, residual)
        residual = out.residual
        sent += decode(out.payload, length=10, max_bytes=MAX)
    assert sent[1] > 0


# ---------------------------------------------------------------- index coding and varints


def test_index_coding_picks_the_cheaper_form_and_both_decode() -> None:
    length = 8000
    rng = np.random.default_rng(2)
    for density, mode in [(0.001, "varint"), (0.02, "varint"), (0.2, "bitmap"), (1.0, "bitmap")]:
        kept = np.sort(rng.choice(length, max(1, int(density * length)), replace=False))
        section, chosen = index_coding.encode(kept, length)
        assert chosen == mode
        gaps = np.diff(kept, prepend=0)
        varint_size = 1 + len(varint.encode_one(kept.size)) + int(varint.sizes(gaps).sum())
        assert len(section) == min(varint_size, 1 + length // 8)
        reader = Reader(section)
        np.testing.assert_array_equal(index_coding.decode(reader, length), kept)
        assert reader.remaining == 0
    # the same message via the pipeline, both regimes
    for spec, mode in [("topk:0.002", "varint"), ("topk:0.5", "bitmap")]:
        out = Pipeline.from_spec(spec).encode(delta(size=length))
        assert out.measurements["topk"]["index_coding"] == mode
        assert decode(out.payload, length=length, max_bytes=MAX).shape == (length,)


def test_index_coding_edges() -> None:
    for length, kept in [(1, [0]), (9, [8]), (200, [0, 199]), (1 << 20, [0, 127, 128, 16511,
                                                                          (1 << 20) - 1])]:
        section, _ = index_coding.encode(np.array(kept, np.int64), length)
        np.testing.assert_array_equal(index_coding.decode(Reader(section), length), kept)


def test_varints_round_trip_vectorized() -> None:
    values = np.array([0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**35 - 1, 2**56, 2**63 - 1],
                      np.uint64)
    blob = varint.encode_many(values)
    assert blob == b"".join(varint.encode_one(int(v)) for v in values)
    got, used = varint.decode_many(np.frombuffer(blob + b"\x05", np.uint8), values.size,
                                   max_len=9, what="test")
    np.testing.assert_array_equal(got, values)
    assert used == len(blob)
    assert list(varint.sizes(values)) == [len(varint.encode_one(int(v))) for v in values]


# ---------------------------------------------------------------- hub side


@pytest.mark.parametrize("spec", ["topk:0.01+q:4+zstd", "topk:0.2+f16", "q:4", "float32+zstd"])
def test_accumulate_equals_weighted_sum_of_decodes(spec: str) -> None:
    pipe = Pipeline.from_spec(spec)
    rng = np.random.default_rng(4)
    payloads = [pipe.encode(delta(seed=s), rng=rng).payload for s in range(8)]
    weights = [0.5, 1.0, 2.0, 0.25, 1.5, 3.0, 0.1, 1.0]
    total = np.zeros(2000, np.float64)
    for payload, weight in zip(payloads, weights, strict=True):
        folded = accumulate(total, payload, weight, max_bytes=MAX)
        assert isinstance(folded, Decoded) and folded.sparse == pipe.sparse
    expected = sum(w * decode(p, length=2000, max_bytes=MAX).astype(np.float64)
                   for p, w in zip(payloads, weights, strict=True))
    np.testing.assert_allclose(total, expected, rtol=1e-6, atol=1e-12)
    total32 = np.zeros(2000, np.float32)
    for payload, weight in zip(payloads, weights, strict=True):
        pipe.accumulate(total32, payload, weight, max_bytes=MAX)
    np.testing.assert_allclose(total32, expected, rtol=1e-5, atol=1e-9)


def test_a_rejected_update_leaves_the_sum_untouched() -> None:
    pipe = Pipeline.from_spec("topk:0.05+q:4")
    payload = pipe.encode(delta(), rng=np.random.default_rng(0)).payload
    total = np.ones(2000)
    with pytest.raises(ValueError):
        accumulate(total, payload + b"\0", 1.0, max_bytes=MAX)
    with pytest.raises(ValueError):
        accumulate(total, payload, float("nan"), max_bytes=MAX)
    assert (total == 1).all()


def test_measurements_are_nested_by_stage() -> None:
    out = Pipeline.from_spec("topk:0.01+q:4+zstd").encode(delta(), rng=np.random.default_rng(0))
    m = out.measurements
    assert set(m) == {"topk", "q", "zstd", "error_feedback", "values", "bytes"}
    assert m["topk"]["kept"] == 20 and m["topk"]["density"] == 0.01
    assert m["q"]["bits"] == 4
    assert m["zstd"]["out"] == len(out.payload) - len(Pipeline.from_spec("topk:1+q:4+zstd")
                                                       .header) - 2
    assert m["bytes"] == len(out.payload) and m["values"] == 2000


def test_largest_payload_bounds_every_stack() -> None:
    for size in (0, 1, 8288):
        d = delta(size=size) if size else np.zeros(0, np.float32)
        worst = max(len(Pipeline.from_spec(s).encode(d).payload)
                    for s in ["topk:1.0+float32+zstd", "topk:1.0+q:8:1+zstd", "float32+zstd"])
        assert worst <= largest_payload(size)
        assert max(Pipeline.from_spec(s).max_payload_bytes(size) for s in STACKS) \
            <= largest_payload(size)


def test_max_payload_bytes_is_exact_for_dense_stacks_and_bounds_sparse_ones() -> None:
    for spec in ("float32", "f16", "q:4", "q:2:64", "sign"):
        pipe = Pipeline.from_spec(spec)
        for size in (0, 1, 255, 8288):
            out = pipe.encode(delta(size=size) if size else np.zeros(0, np.float32))
            assert len(out.payload) == pipe.max_payload_bytes(size)
    for spec in ("topk:0.001+q:4+zstd", "topk:0.5+f16", "topk:3+sign"):
        pipe = Pipeline.from_spec(spec)
        for seed in range(5):
            out = pipe.encode(delta(size=8288, seed=seed))
            assert len(out.payload) <= pipe.max_payload_bytes(8288)
