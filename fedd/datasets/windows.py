"""Windows over labelled recordings and the time-ordered per-activity split.

The split follows DESIGN.md: within each person and each activity, the first
70 % of that activity's windows (in time order) train and the rest test, so a
device trains on its past and is tested on its future without losing whole
activities that HAPT's fixed protocol runs late.
"""

from __future__ import annotations

import numpy as np

UNLABELLED = -1


def window_starts(length: int, size: int, step: int) -> np.ndarray:
    """Start offsets of every full window in a stream of `length` samples."""
    if length < size:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, length - size + 1, step, dtype=np.int64)


def window_labels(labels: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """A window's class if every sample carries the same one, else UNLABELLED."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int16)
    blocks = labels[starts[:, None] + np.arange(size)[None, :]]
    uniform = (blocks == blocks[:, :1]).all(axis=1) & (blocks[:, 0] >= 0)
    return np.where(uniform, blocks[:, 0], UNLABELLED).astype(np.int16)


def train_mask(labels: np.ndarray, train_fraction: float = 0.7) -> np.ndarray:
    """True for the first `train_fraction` of each class's windows, in order.

    `labels` are the labelled windows of one person in time order.
    """
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        mask[idx[: round(train_fraction * len(idx))]] = True
    return mask


def contiguous_runs(starts: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Group sorted window starts into runs of consecutive windows.

    Returns (first start, last start) for each run, so a replay can stream a
    run's samples once instead of each overlapping window separately.
    """
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(np.diff(starts) != step) + 1
    return [(int(run[0]), int(run[-1])) for run in np.split(starts, breaks)]
