"""The uplink budget: an hourly byte window, the allowance and the compression level (pure).

The agent counts every MQTT PUBLISH of an update (`publish_wire_bytes`) when
the broker has acknowledged (or refused) it. Before the next update it asks
for the allowance: the smaller of ``max_update_bytes`` and what
``bytes_per_hour`` leaves after the bytes sent in the last hour and those
still in the outbox. `choose_level` then
tries the configured codec and ever sparser top-k levels (k halved each time,
the value coding and byte coder kept) until one fits; None means the budget
is spent and the delta is folded into the residual instead. Each try is a
full encode, so when the configured level does not fit the sparsest is tried
next: a spent budget costs two encodes a round, not one per level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fedd.pipeline import Pipeline
from fedd.pipeline.stage import Sparsifier
from fedd.pipeline.topk import TopK

HOUR_S = 3600.0


@dataclass
class HourlyWindow:
    """Bytes queued at each time in the last hour (persisted as ``[[time, bytes], ...]``)."""

    records: list[tuple[float, int]] = field(default_factory=list)

    def add(self, now: float, nbytes: int) -> None:
        self.records.append((now, int(nbytes)))
        self._expire(now)

    def used(self, now: float) -> int:
        """Bytes in the hour before `now` (reads only: the model thread asks too)."""
        return sum(n for t, n in self.records if now - t < HOUR_S)

    def _expire(self, now: float) -> None:
        self.records = [(t, n) for t, n in self.records if now - t < HOUR_S]

    def to_state(self) -> list[list[float]]:
        return [[t, n] for t, n in self.records]

    @classmethod
    def from_state(cls, state: object) -> HourlyWindow:
        records = []
        for item in state if isinstance(state, list) else []:
            try:
                t, n = item
                records.append((float(t), int(n)))
            except (TypeError, ValueError):
                continue
        return cls(records)


def allowance(*, max_update_bytes: int | None, bytes_per_hour: int | None, used: int,
              queued: int) -> int | None:
    """The bytes the next update may take (None: unlimited, never below 0)."""
    limits = []
    if max_update_bytes is not None:
        limits.append(max_update_bytes)
    if bytes_per_hour is not None:
        limits.append(bytes_per_hour - used - queued)
    return max(0, min(limits)) if limits else None


def levels(configured: Pipeline, length: int) -> Iterator[Pipeline]:
    """The configured pipeline, then top-k with k halved each step down to 1.

    `length` is the largest part's: the first sparser k is half of what the
    configured stack keeps of it (all of it when it has no top-k stage).
    """
    yield configured
    stages = list(configured.stages)
    topk = next((s for s in stages if isinstance(s, Sparsifier)), None)
    rest = [s for s in stages if not isinstance(s, Sparsifier)]
    k = topk.kept(length) if isinstance(topk, TopK) else length
    while k > 1:
        k //= 2
        yield Pipeline([TopK(count=k), *rest])


def choose_level(configured: Pipeline, length: int, size: Callable[[Pipeline], int],
                 limit: int | None) -> tuple[Pipeline, int] | None:
    """The first level whose update (`size` bytes) fits `limit`; None if even k = 1 does not."""
    first, *sparser = levels(configured, length)
    nbytes = size(first)
    if limit is None or nbytes <= limit:
        return first, nbytes
    if not sparser or size(sparser[-1]) > limit:
        return None  # not even the sparsest fits: skip the levels in between
    for pipeline in sparser:
        nbytes = size(pipeline)
        if nbytes <= limit:
            return pipeline, nbytes
    return None
