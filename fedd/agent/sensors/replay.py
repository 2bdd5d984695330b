"""Replay: a recorded person played back as if it were a live sensor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from fedd.agent.sensors.source import CHUNK_INTERVAL_S, Chunk
from fedd.datasets import PersonData


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
