"""Sensor sources: where the agent's samples come from.

A source yields `Chunk`s of consecutive samples; `gap_before` tells the
windower the stream was interrupted, so no window spans the gap. `replay`
plays a recorded person back on an accelerated clock as if it were live;
it also offers the person's holdout windows, so a demo can score the
device on its own future. Real sensor sources (IIO, command) come later
and need not offer a holdout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedd.config import SensorConfig, WindowConfig
from fedd.datasets import PersonData, hapt_person, load_stream, npz_person

CHUNK_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Chunk:
    samples: np.ndarray  # (n, channels) float32
    labels: np.ndarray  # (n,) int16 class per sample, -1 when unknown
    gap_before: bool
    cursor: int  # samples emitted by the source so far, this chunk included


class SensorSource(Protocol):
    rate_hz: float

    def chunks(self, start_at: int = 0) -> AsyncIterator[Chunk]: ...

    def holdout(self) -> tuple[np.ndarray, np.ndarray] | None: ...


class ReplaySource:
    """Plays a person's recorded stream at `speed` times real time."""

    def __init__(self, data: PersonData, *, rate_hz: float, speed: float, loop: bool) -> None:
        self.data = data
        self.rate_hz = rate_hz
        self.speed = speed
        self.loop = loop

    def holdout(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.holdout_windows, self.data.holdout_labels

    async def chunks(self, start_at: int = 0) -> AsyncIterator[Chunk]:
        """Yield the stream from sample `start_at` (a resumed cursor) on."""
        per_chunk = max(1, round(self.rate_hz * self.speed * CHUNK_INTERVAL_S))
        total = self.data.stream_samples
        cursor = start_at % total if self.loop and total else start_at
        clock = asyncio.get_running_loop().time()
        while True:
            offset = 0
            for segment in self.data.stream:
                end = offset + len(segment.samples)
                first = True
                for lo in range(max(cursor, offset), end, per_chunk):
                    hi = min(lo + per_chunk, end)
                    cursor = hi
                    clock += (hi - lo) / (self.rate_hz * self.speed)
                    await asyncio.sleep(max(0.0, clock - asyncio.get_running_loop().time()))
                    yield Chunk(segment.samples[lo - offset : hi - offset],
                                segment.labels[lo - offset : hi - offset], first, cursor)
                    first = False
                offset = end
            if not self.loop:
                return
            cursor = 0


def open_source(sensor: SensorConfig, window: WindowConfig) -> SensorSource:
    """Build the configured source."""
    replay = sensor.replay
    if replay.dataset == "hapt":
        data = hapt_person(replay.person, window.size, window.step)
    elif replay.dataset == "stream":
        data = load_stream(replay.npz_path or "")
    else:
        data = npz_person(replay.npz_path or "", replay.person)
    return ReplaySource(data, rate_hz=sensor.rate_hz, speed=replay.speed, loop=replay.loop)
