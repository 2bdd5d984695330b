"""Drift: how far a device's recent data departs from what its model learned.

Two signals, both cheap enough to update on every new window:
- prediction drift: KL divergence of the recent predicted-class histogram
  from the reference histogram (predictions on the data of the last
  training run), Laplace-smoothed so an empty class is not infinite;
- feature drift: the mean absolute shift of each feature's recent mean from
  its reference mean, in reference standard deviations.

A user who starts a new activity shifts both long before any label could
say so, which is why the agent uses them to ask for a training run early.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DriftScore:
    prediction_kl: float
    feature_shift: float
    windows: int  # recent windows the score is based on

    def exceeds(self, kl_threshold: float, shift_threshold: float) -> str | None:
        """The reason drift crosses a threshold, or None."""
        if self.prediction_kl > kl_threshold:
            return f"prediction drift KL {self.prediction_kl:.2f} > {kl_threshold:.2f}"
        if self.feature_shift > shift_threshold:
            return f"feature drift {self.feature_shift:.2f} sd > {shift_threshold:.2f} sd"
        return None


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray, smoothing: float = 1.0) -> float:
    """KL(p ‖ q) in nats between two smoothed count histograms."""
    p = p_counts + smoothing
    q = q_counts + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


class DriftMonitor:
    """Keeps a reference from training time and a bounded window of recent data."""

    def __init__(self, num_classes: int, *, recent: int = 128, min_windows: int = 32) -> None:
        if recent < min_windows or min_windows < 1:
            raise ValueError(f"need 1 <= min_windows ({min_windows}) <= recent ({recent})")
        self.num_classes = num_classes
        self.min_windows = min_windows
        self._recent_classes: deque[int] = deque(maxlen=recent)
        self._recent_features: deque[np.ndarray] = deque(maxlen=recent)
        self._ref_hist: np.ndarray | None = None
        self._ref_mean: np.ndarray | None = None
        self._ref_std: np.ndarray | None = None

    @property
    def has_reference(self) -> bool:
        return self._ref_hist is not None

    def set_reference(self, predicted: np.ndarray, features: np.ndarray) -> None:
        """What the model was trained on; resets the recent window."""
        self._ref_hist = np.bincount(predicted, minlength=self.num_classes).astype(np.float64)
        self._ref_mean = features.mean(axis=0)
        self._ref_std = np.maximum(features.std(axis=0), 1e-6)
        self._recent_classes.clear()
        self._recent_features.clear()

    def observe(self, predicted: np.ndarray, features: np.ndarray) -> None:
        self._recent_classes.extend(int(c) for c in predicted)
        self._recent_features.extend(features)

    def score(self) -> DriftScore | None:
        """None until there is a reference and enough recent windows."""
        n = len(self._recent_classes)
        if self._ref_hist is None or n < self.min_windows:
            return None
        assert self._ref_mean is not None and self._ref_std is not None
        recent = np.bincount(np.fromiter(self._recent_classes, dtype=np.int64, count=n),
                             minlength=self.num_classes).astype(np.float64)
        shift = np.abs(np.mean(self._recent_features, axis=0) - self._ref_mean) / self._ref_std
        return DriftScore(kl_divergence(recent, self._ref_hist), float(shift.mean()), n)
