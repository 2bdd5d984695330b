"""Draining a sensor source in a test: its chunks, and their samples joined."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import numpy as np

from fedd.agent.sensors import Chunk, SensorSource


def collect(source: SensorSource, *, start_at: int = 0, samples: int | None = None,
            timeout: float = 5.0) -> list[Chunk]:
    """Chunks until the stream ends (or `samples` arrived), within `timeout` seconds."""

    async def run() -> list[Chunk]:
        out: list[Chunk] = []
        async with asyncio.timeout(timeout), contextlib.aclosing(
                source.chunks(start_at)) as chunks:
            async for chunk in chunks:
                out.append(chunk)
                if samples is not None and sum(len(c.samples) for c in out) >= samples:
                    break
        return out

    return asyncio.run(run())


def joined(chunks: Sequence[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([c.samples for c in chunks]),
            np.concatenate([c.labels for c in chunks]))
