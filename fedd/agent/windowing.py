"""Streaming windower: fixed-size, fixed-step windows over a chunked stream.

Windows never span a gap. A window is labelled with a class only when every
sample in it carries that class (the same rule as `fedd.datasets.windows`),
so a live stream and the offline split agree window for window.
"""

from __future__ import annotations

import numpy as np

from fedd.datasets.windows import window_labels, window_starts


class Windower:
    def __init__(self, size: int, step: int, channels: int = 6) -> None:
        self.size, self.step = size, step
        self._samples = np.zeros((0, channels), np.float32)
        self._labels = np.zeros(0, np.int16)

    @property
    def pending(self) -> int:
        """Samples held for the next window (replayed again after a restart)."""
        return len(self._samples)

    def push(self, samples: np.ndarray, labels: np.ndarray,
             gap_before: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Add samples; return the windows (n, size, channels) and labels now complete."""
        if gap_before:
            self._samples, self._labels = self._samples[:0], self._labels[:0]
        self._samples = np.concatenate([self._samples, samples.astype(np.float32)])
        self._labels = np.concatenate([self._labels, labels.astype(np.int16)])
        starts = window_starts(len(self._samples), self.size, self.step)
        windows = self._samples[starts[:, None] + np.arange(self.size)[None, :]]
        labels_out = window_labels(self._labels, starts, self.size)
        keep_from = int(starts[-1]) + self.step if len(starts) else 0
        self._samples, self._labels = self._samples[keep_from:], self._labels[keep_from:]
        return windows, labels_out
