"""Aggregation arithmetic, pure numpy: staleness weights and FedBuff.

FedBuff (Nguyen et al., 2022) folds each arriving update into a running
buffer instead of waiting for a synchronous round; a new global version is
published when the buffer holds K updates, or when T seconds have passed
with at least a quorum. Each update is damped by its staleness τ (how many
versions the hub moved on since the device's base): s(τ) = (1 + τ)^-a.

What the buffer keeps of its updates is its `Reducer`, the innermost layer
(TensorFlow Federated's plain sum): the default `Mean` keeps only running
sums, so memory is one model's size whatever K is. The weighted mean divides
by the plain sample count, not the staleness-weighted one, so a stale update
really moves the model less. The robust rules of `fedd.hub.robust` (trimmed
mean, median) are reducers that keep the buffer's updates.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

Parts = Mapping[str, np.ndarray]


@runtime_checkable
class Addable(Protocol):
    """A decoded part that adds itself into a sum (fedd.pipeline.Decoded is one).

    A sparse one touches only its sent entries: the hub never builds its dense
    vector. `values` are the sent values (all of them when dense): their L2
    norm is the part's.
    """

    length: int
    values: np.ndarray

    def add_to(self, total: np.ndarray, weight: float) -> None: ...


def staleness_weight(staleness: int, exponent: float) -> float:
    """Polynomial staleness damping, 1 for a fresh update."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


def weighted_mean(deltas: list[Parts], weights: list[float], total: float) -> dict[str, np.ndarray]:
    """Σ w_i Δ_i / total, part by part; the reference the buffer must match."""
    return {name: sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / total
            for name in deltas[0]}


def apply_delta(parts: Parts, delta: Parts, learning_rate: float) -> dict[str, np.ndarray]:
    """The new global weights: w + η Δ; a part the delta does not hold stays as it is."""
    return {name: (parts[name] + learning_rate * delta[name]).astype(np.float32)
            if name in delta else parts[name] for name in parts}


@dataclass(frozen=True)
class Flushed:
    """What one buffer flush folded in, for the version's provenance."""

    delta: dict[str, np.ndarray]
    contributors: int
    samples: int
    mean_staleness: float


def is_addable(part: object) -> bool:
    """isinstance(part, Addable), at the cost of one attribute lookup (a runtime
    protocol check costs ~30 µs on Python 3.11, per part and per update)."""
    return hasattr(part, "add_to")


def part_length(part: np.ndarray | Addable) -> int:
    """The length of a part's vector, dense or `Addable`."""
    return part.length if is_addable(part) else len(part)


class Reducer(ABC):
    """What a buffer keeps of its updates, and the one delta it makes of them.

    `add` takes one update whose part lengths the buffer has checked, with
    its sample count and its coefficient c (staleness damping x clipping
    scale); `result` is the delta of everything added since `clear`.
    """

    keeps_updates: bool = False  # True: memory grows with the buffer (K x model size)

    @abstractmethod
    def add(self, delta: Mapping[str, np.ndarray | Addable], *, num_samples: int,
            coefficient: float) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, np.ndarray]:
        """The float32 delta per part."""

    @abstractmethod
    def clear(self) -> None: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of numpy arrays it holds now."""


class Mean(Reducer):
    """FedBuff's weighted mean Σ n·c·Δ / Σ n, in float64 running sums: O(model) memory.

    An Addable's sparse entries are scattered straight into the sums.
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._samples: dict[str, int] = {}  # strategies may share only some parts

    def add(self, delta: Mapping[str, np.ndarray | Addable], *, num_samples: int,
            coefficient: float) -> None:
        weight = num_samples * coefficient
        for name, values in delta.items():
            acc = self._sums.get(name)
            if acc is None:
                acc = self._sums[name] = np.zeros(part_length(values), np.float64)
            if is_addable(values):
                values.add_to(acc, weight)  # type: ignore[union-attr]
            else:
                acc += weight * np.asarray(values, dtype=np.float64)
            self._samples[name] = self._samples.get(name, 0) + num_samples

    def result(self) -> dict[str, np.ndarray]:
        return {n: (s / self._samples[n]).astype(np.float32) for n, s in self._sums.items()}

    def clear(self) -> None:
        self._sums, self._samples = {}, {}

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sums.values())


class FedBuff:
    """A staleness-weighted buffer of updates with FedBuff's K/T/quorum rule."""

    def __init__(self, *, buffer_size: int, max_wait_s: float, quorum: int,
                 staleness_exponent: float, reducer: Reducer | None = None) -> None:
        self.configure(buffer_size=buffer_size, max_wait_s=max_wait_s, quorum=quorum,
                       staleness_exponent=staleness_exponent)
        self.reducer = Mean() if reducer is None else reducer
        self._lengths: dict[str, int] = {}
        self._samples = 0
        self._count = 0
        self._staleness_total = 0
        self._first_at: float | None = None

    def configure(self, *, buffer_size: int, max_wait_s: float, quorum: int,
                  staleness_exponent: float) -> None:
        """Set the K/T/quorum rule and the damping; what is buffered stays."""
        if not 1 <= quorum <= buffer_size:
            raise ValueError(f"need 1 <= quorum ({quorum}) <= buffer_size ({buffer_size})")
        if max_wait_s <= 0 or staleness_exponent < 0:
            raise ValueError("max_wait_s must be > 0 and staleness_exponent >= 0")
        self.buffer_size = buffer_size
        self.max_wait_s = max_wait_s
        self.quorum = quorum
        self.staleness_exponent = staleness_exponent

    def __len__(self) -> int:
        return self._count

    def fold(self, delta: Mapping[str, np.ndarray | Addable], *, num_samples: int,
             staleness: int, scale: float = 1.0, now: float | None = None) -> float:
        """Add one update, each part a dense vector or an `Addable`; returns its weight.

        `scale` (0 < scale <= 1) multiplies the update's values, not its
        weight: the clipping factor of `fedd.hub.robust`. Every part's length
        is checked before anything is added: a refused update changes nothing.
        """
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        damping = staleness_weight(staleness, self.staleness_exponent)
        lengths = {name: part_length(values) for name, values in delta.items()}
        for name, size in lengths.items():
            if self._lengths.get(name, size) != size:
                raise ValueError(f"part {name} has {size} values, the buffer "
                                 f"{self._lengths[name]}")
        self.reducer.add(delta, num_samples=num_samples, coefficient=damping * scale)
        self._lengths.update(lengths)
        self._samples += num_samples
        self._count += 1
        self._staleness_total += staleness
        if self._first_at is None:
            self._first_at = time.monotonic() if now is None else now
        return num_samples * damping

    def due_at(self) -> float | None:
        """Monotonic time at which the T rule fires, if anything is buffered."""
        return None if self._first_at is None else self._first_at + self.max_wait_s

    def ready(self, now: float | None = None) -> bool:
        if self._count >= self.buffer_size:
            return True
        due = self.due_at()
        now = time.monotonic() if now is None else now
        return due is not None and now >= due and self._count >= self.quorum

    def flush(self) -> Flushed:
        """Empty the buffer into one delta (the reducer's)."""
        if not self._count:
            raise ValueError("nothing buffered")
        flushed = Flushed(delta=self.reducer.result(), contributors=self._count,
                          samples=self._samples,
                          mean_staleness=self._staleness_total / self._count)
        self.reducer.clear()
        self._lengths, self._samples, self._count = {}, 0, 0
        self._staleness_total, self._first_at = 0, None
        return flushed
