"""FedBuff arithmetic (fedd/hub/aggregate.py) against its plain-numpy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedd.hub.aggregate import FedBuff, apply_delta, staleness_weight, weighted_mean
from fedd.pipeline import Pipeline

SIZES = {"body": 257, "head": 13}


def random_delta(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: (scale * rng.normal(0, 1, n)).astype(np.float32) for name, n in SIZES.items()}


def buffer(**kw: float) -> FedBuff:
    args = {"buffer_size": 4, "max_wait_s": 10.0, "quorum": 2, "staleness_exponent": 0.5}
    args.update(kw)
    return FedBuff(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.5])
def test_fresh_update_weighs_one(exponent: float) -> None:
    assert staleness_weight(0, exponent) == 1.0


@pytest.mark.parametrize(("staleness", "exponent", "expected"), [
    (1, 0.5, 2 ** -0.5), (3, 0.5, 0.5), (3, 1.0, 0.25), (8, 1 / 3, 9 ** (-1 / 3)),
    (5, 0.0, 1.0), (99, 2.0, 1e-4), (1, 4.0, 1 / 16),
])
def test_staleness_weight_is_polynomial(staleness: int, exponent: float, expected: float) -> None:
    assert staleness_weight(staleness, exponent) == pytest.approx(expected, rel=1e-12)
    assert isinstance(staleness_weight(staleness, exponent), float)


def test_staleness_weight_decreases() -> None:
    weights = [staleness_weight(s, 0.5) for s in range(10)]
    assert all(a > b for a, b in itertools.pairwise(weights))


@pytest.mark.parametrize("staleness", [-1, -10])
def test_negative_staleness_raises(staleness: int) -> None:
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(staleness, 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.5])
def test_flush_equals_reference_weighted_mean(seed: int, exponent: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    deltas = [random_delta(rng, scale=float(rng.uniform(0.01, 10))) for _ in range(n)]
    samples = [int(s) for s in rng.integers(1, 5000, n)]
    stale = [int(s) for s in rng.integers(0, 6, n)]
    buf = buffer(buffer_size=n, quorum=1, staleness_exponent=exponent)
    for delta, num, tau in zip(deltas, samples, stale, strict=True):
        weight = buf.fold(delta, num_samples=num, staleness=tau, now=0.0)
        assert weight == pytest.approx(num * (1 + tau) ** -exponent, rel=1e-12)
    assert len(buf) == n
    flushed = buf.flush()
    weights = [num * staleness_weight(tau, exponent)
               for num, tau in zip(samples, stale, strict=True)]
    expected = weighted_mean([{k: v.astype(np.float64) for k, v in d.items()} for d in deltas],
                             weights, float(sum(samples)))
    assert set(flushed.delta) == set(SIZES)
    for name in SIZES:
        assert flushed.delta[name].dtype == np.float32
        assert flushed.delta[name].shape == (SIZES[name],)
        np.testing.assert_allclose(flushed.delta[name], expected[name], rtol=1e-6, atol=1e-7)
    assert flushed.contributors == n
    assert flushed.samples == sum(samples)
    assert flushed.mean_staleness == pytest.approx(sum(stale) / n)


def test_stale_update_moves_the_mean_less() -> None:
    """Dividing by plain samples (not weighted ones) really damps a stale update."""
    ones = {"body": np.ones(3, np.float32)}
    fresh, stale = buffer(quorum=1), buffer(quorum=1)
    fresh.fold(ones, num_samples=10, staleness=0)
    stale.fold(ones, num_samples=10, staleness=3)
    np.testing.assert_allclose(fresh.flush().delta["body"], 1.0)
    np.testing.assert_allclose(stale.flush().delta["body"], 0.5, rtol=1e-6)


def test_weighted_mean_reference_by_hand() -> None:
    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 4.0])}]
    got = weighted_mean(deltas, [3.0, 1.0], 4.0)
    np.testing.assert_array_equal(got["w"], [0.75, 1.0])


def test_ready_by_buffer_size() -> None:
    buf = buffer(buffer_size=3, quorum=3, max_wait_s=1e9)
    rng = np.random.default_rng(0)
    for i in range(3):
        assert not buf.ready(now=100.0)
        buf.fold(random_delta(rng), num_samples=10, staleness=0, now=float(i))
    assert buf.ready(now=2.0)


def test_ready_by_time_with_quorum() -> None:
    buf = buffer(buffer_size=5, quorum=2, max_wait_s=30.0)
    rng = np.random.default_rng(1)
    buf.fold(random_delta(rng), num_samples=1, staleness=0, now=100.0)
    buf.fold(random_delta(rng), num_samples=1, staleness=0, now=120.0)
    assert buf.due_at() == 130.0  # T counts from the first buffered update
    assert not buf.ready(now=129.9)
    assert buf.ready(now=130.0)
    assert buf.ready(now=1e6)


def test_not_ready_by_time_below_quorum() -> None:
    buf = buffer(buffer_size=5, quorum=3, max_wait_s=30.0)
    rng = np.random.default_rng(2)
    assert not buf.ready(now=1e9)  # empty: never ready
    assert buf.due_at() is None
    buf.fold(random_delta(rng), num_samples=1, staleness=0, now=0.0)
    buf.fold(random_delta(rng), num_samples=1, staleness=0, now=1.0)
    assert not buf.ready(now=1e9)
    buf.fold(random_delta(rng), num_samples=1, staleness=0, now=2.0)
    assert buf.ready(now=30.0)


def test_flush_resets_the_buffer() -> None:
    rng = np.random.default_rng(3)
    buf = buffer(buffer_size=2, quorum=1, max_wait_s=5.0)
    first = random_delta(rng)
    buf.fold(first, num_samples=7, staleness=2, now=0.0)
    buf.fold(random_delta(rng), num_samples=3, staleness=0, now=1.0)
    buf.flush()
    assert len(buf) == 0
    assert buf.due_at() is None
    assert not buf.ready(now=1e9)
    second = random_delta(rng)
    buf.fold(second, num_samples=4, staleness=0, now=50.0)
    assert buf.due_at() == 55.0
    flushed = buf.flush()
    # Nothing of the first round leaks into the second.
    assert (flushed.contributors, flushed.samples, flushed.mean_staleness) == (1, 4, 0.0)
    for name in SIZES:
        np.testing.assert_allclose(flushed.delta[name], second[name], rtol=1e-6)


def test_flush_on_empty_raises() -> None:
    buf = buffer()
    with pytest.raises(ValueError, match="nothing buffered"):
        buf.flush()
    buf.fold(random_delta(np.random.default_rng(4)), num_samples=1, staleness=0)
    buf.flush()
    with pytest.raises(ValueError, match="nothing buffered"):
        buf.flush()


def test_fold_does_not_keep_a_reference_to_the_delta() -> None:
    delta = {"body": np.ones(4, np.float32)}
    buf = buffer(quorum=1)
    buf.fold(delta, num_samples=2, staleness=0)
    delta["body"][:] = 100.0
    np.testing.assert_array_equal(buf.flush().delta["body"], 1.0)


@pytest.mark.parametrize(("buffer_size", "quorum"), [(3, 4), (1, 2), (5, 0), (2, -1)])
def test_constructor_rejects_bad_quorum(buffer_size: int, quorum: int) -> None:
    with pytest.raises(ValueError, match="quorum"):
        buffer(buffer_size=buffer_size, quorum=quorum)


@pytest.mark.parametrize(("buffer_size", "quorum"), [(1, 1), (4, 4), (10, 1)])
def test_constructor_accepts_quorum_up_to_buffer_size(buffer_size: int, quorum: int) -> None:
    assert buffer(buffer_size=buffer_size, quorum=quorum).quorum == quorum


@pytest.mark.parametrize(("max_wait_s", "exponent"), [(0.0, 0.5), (-1.0, 0.5), (5.0, -0.1)])
def test_constructor_rejects_bad_wait_or_exponent(max_wait_s: float, exponent: float) -> None:
    with pytest.raises(ValueError):
        buffer(max_wait_s=max_wait_s, staleness_exponent=exponent)


def test_configure_keeps_what_is_buffered() -> None:
    rng = np.random.default_rng(7)
    buf = buffer(buffer_size=4, quorum=3, max_wait_s=100.0)
    first, second = random_delta(rng), random_delta(rng)
    buf.fold(first, num_samples=2, staleness=0, now=10.0)
    buf.fold(second, num_samples=6, staleness=0, now=11.0)
    assert not buf.ready(now=50.0)
    buf.configure(buffer_size=2, quorum=1, max_wait_s=20.0, staleness_exponent=1.0)
    assert len(buf) == 2 and buf.due_at() == 30.0 and buf.ready(now=11.0)
    with pytest.raises(ValueError):
        buf.configure(buffer_size=1, quorum=2, max_wait_s=20.0, staleness_exponent=1.0)
    assert (buf.buffer_size, buf.quorum) == (2, 1)  # a refused rule changes nothing
    flushed = buf.flush()
    assert flushed.samples == 8
    for name in SIZES:
        np.testing.assert_allclose(flushed.delta[name], (2 * first[name] + 6 * second[name]) / 8,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("learning_rate", [1.0, 0.5, 2.0])
def test_apply_delta_with_learning_rate(learning_rate: float) -> None:
    rng = np.random.default_rng(5)
    parts = random_delta(rng)
    delta = random_delta(rng, scale=0.1)
    new = apply_delta(parts, delta, learning_rate)
    for name in SIZES:
        assert new[name].dtype == np.float32
        np.testing.assert_allclose(new[name], parts[name] + learning_rate * delta[name],
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(parts["body"], random_delta(np.random.default_rng(5))["body"])


def test_apply_delta_zero_delta_is_identity() -> None:
    parts = random_delta(np.random.default_rng(6))
    new = apply_delta(parts, {k: np.zeros_like(v) for k, v in parts.items()}, 0.7)
    for name in SIZES:
        np.testing.assert_array_equal(new[name], parts[name])


@pytest.mark.parametrize("codec", ["topk:0.05+q:4+zstd", "topk:3", "q:8", "float32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fold_of_decoded_parts_equals_the_dense_reference(codec: str, seed: int) -> None:
    """Decoded (sparse or dense) parts fold like their dense vectors, without building them."""
    pipe = Pipeline.from_spec(codec)
    rng = np.random.default_rng(seed)
    decoded, dense = [], []
    for _ in range(4):
        parts = {name: pipe.read(pipe.encode(values, rng=rng).payload, length=values.size,
                                 max_bytes=1 << 20)
                 for name, values in random_delta(rng).items()}
        decoded.append(parts)
        dense.append({name: part.dense() for name, part in parts.items()})
    by_parts, by_vectors = buffer(quorum=1), buffer(quorum=1)
    for i, (parts, vectors) in enumerate(zip(decoded, dense, strict=True)):
        by_parts.fold(parts, num_samples=10 + i, staleness=i % 3, now=0.0)
        by_vectors.fold(vectors, num_samples=10 + i, staleness=i % 3, now=0.0)
    got, want = by_parts.flush(), by_vectors.flush()
    for name in SIZES:
        np.testing.assert_allclose(got.delta[name], want.delta[name], rtol=1e-6, atol=1e-9)


def test_fold_refuses_a_part_of_another_length() -> None:
    buf = buffer(quorum=1)
    buf.fold({"body": np.ones(4, np.float32)}, num_samples=1, staleness=0)
    with pytest.raises(ValueError, match="part body"):
        buf.fold({"body": np.ones(5, np.float32)}, num_samples=1, staleness=0)
