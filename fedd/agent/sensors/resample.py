"""Evenly spaced samples from timestamped ones.

The windower and the features assume samples `1 / rate_hz` apart. A source
whose samples carry their own times (a command's timestamp column) is put
on that grid by linear interpolation between the neighbouring inputs; a
sample takes the label of the latest input at or before it. A jump of more
than `max_gap_s` (or back in time) is a gap: the grid restarts at the next
input and the next output says `gap_before`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

Segment = tuple[np.ndarray, np.ndarray, bool]  # (samples (n, c) float64, labels (n,) int16, gap)


class Resampler:
    def __init__(self, rate_hz: float, max_gap_s: float) -> None:
        if not rate_hz > 0 or not max_gap_s > 0:
            raise ValueError("rate_hz and max_gap_s must be positive")
        self.period = 1.0 / rate_hz
        self.max_gap_s = max_gap_s
        self._last: tuple[float, np.ndarray, int] | None = None  # the latest input sample
        self._origin = 0.0  # time of the current grid's first output
        self._emitted = 0  # outputs of the current grid so far
        self._gap = True  # the next output follows a gap (or starts the stream)
        self.gaps = 0  # gaps seen after the stream's start

    def push(self, times: np.ndarray, samples: np.ndarray, labels: np.ndarray) -> list[Segment]:
        """Add inputs (times in seconds); return the outputs now due, split at gaps."""
        times = np.asarray(times, np.float64)
        if not len(times):
            return []
        samples = np.asarray(samples, np.float64).reshape(len(times), -1)
        labels = np.asarray(labels, np.int16)
        if self._last is None:
            self._origin, self._emitted = float(times[0]), 0
        else:
            t, v, label = self._last
            times = np.concatenate([[t], times])
            samples = np.concatenate([v[None], samples])
            labels = np.concatenate([np.array([label], np.int16), labels])
        steps = np.diff(times)
        breaks = np.flatnonzero((steps > self.max_gap_s) | (steps < 0)) + 1
        out: list[Segment] = []
        bounds = [0, *breaks.tolist(), len(times)]
        for lo, hi in itertools.pairwise(bounds):
            if lo:
                self._origin, self._emitted, self._gap = float(times[lo]), 0, True
                self.gaps += 1
            t, v, lab = times[lo:hi], samples[lo:hi], labels[lo:hi]
            last = math.floor((t[-1] - self._origin) / self.period + 1e-9)
            count = last - self._emitted + 1
            if count <= 0:
                continue
            grid = self._origin + self.period * np.arange(self._emitted, last + 1)
            values = np.stack([np.interp(grid, t, v[:, c]) for c in range(v.shape[1])], axis=1)
            nearest = np.clip(np.searchsorted(t, grid + 1e-12, side="right") - 1, 0, len(t) - 1)
            out.append((values, lab[nearest], self._gap))
            self._emitted, self._gap = last + 1, False
        self._last = (float(times[-1]), samples[-1].copy(), int(labels[-1]))
        return out
