"""What every sensor source shares: the `Chunk` it yields, its protocol, its errors.

A source yields `Chunk`s of consecutive samples; `gap_before` tells the
windower the stream was interrupted (a restart, lost samples, a stalled
clock), so no window spans the gap. `cursor` counts the samples the source
has emitted, this chunk included, starting from the `start_at` the daemon
resumes with; a live source cannot rewind, so for it the cursor only keeps
counting across restarts and its first chunk always says `gap_before`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

CHUNK_INTERVAL_S = 0.1  # live sources batch about this much time per chunk


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


class SensorError(Exception):
    """A sensor source cannot start or cannot go on; the message says why."""


def split_at_gaps(samples: np.ndarray, labels: np.ndarray, gaps: np.ndarray,
                  cursor: int) -> list[Chunk]:
    """Cut consecutive samples into chunks that each start at a gap (or at the first sample).

    `gaps[i]` says samples were lost just before sample `i`.
    """
    samples = samples.astype(np.float32, copy=False)
    labels = labels.astype(np.int16, copy=False)
    cuts = [0, *np.flatnonzero(gaps[1:]) + 1, len(samples)]
    out = []
    for lo, hi in itertools.pairwise(cuts):
        cursor += hi - lo
        out.append(Chunk(samples[lo:hi], labels[lo:hi], bool(gaps[lo]), cursor))
    return out


class FdReader:
    """Non-blocking reads of a file descriptor, awaited through the event loop.

    Pipes, FIFOs and character devices (`/dev/iio:deviceN`) are watched
    with `loop.add_reader`; a regular file, which epoll refuses, is always
    ready and is read directly. The descriptor is switched to non-blocking.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._pollable: bool | None = None

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes as soon as some are there; b"" at end of file."""
        while True:
            if self._pollable is not False:
                await self._readable()
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                continue

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        try:
            loop.add_reader(self.fd, wake)
        except PermissionError:  # epoll refuses regular files: they are always readable
            self._pollable = False
            return
        self._pollable = True
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)
