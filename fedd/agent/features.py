"""Model inputs computed on the device from raw 6-axis IMU windows.

Eight channels (the six axes plus the accelerometer and gyroscope
magnitudes) times twelve statistics give the 96 features the shipped
`har-mlp` model expects ("hapt-stats-v1"). Everything is vectorized over a
batch of windows, so the agent featurizes a backlog in one call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FEATURE_SET = "hapt-stats-v1"
RAW_SET = "raw-128x6-v1"
NUM_STATS = 12
PERCENTILES = (10, 25, 50, 75, 90)
LOW_BAND_HZ = 2.5


def _channels(windows: np.ndarray) -> np.ndarray:
    """(n, size, 6) → (n, 8, size): axes plus the two vector magnitudes."""
    acc = np.linalg.norm(windows[:, :, 0:3], axis=2)
    gyro = np.linalg.norm(windows[:, :, 3:6], axis=2)
    return np.concatenate([windows.transpose(0, 2, 1), acc[:, None], gyro[:, None]], axis=1)


def window_features(windows: np.ndarray, rate_hz: float = 50.0) -> np.ndarray:
    """Return (n, 96) float32 features for (n, size, 6) windows."""
    if windows.ndim != 3 or windows.shape[2] != 6:
        raise ValueError(f"expected windows of shape (n, size, 6), got {windows.shape}")
    if not len(windows):
        return np.zeros((0, 8 * NUM_STATS), np.float32)
    x = _channels(windows.astype(np.float64, copy=False))
    mean = x.mean(axis=2)
    centred = x - mean[..., None]
    std = x.std(axis=2)
    percentiles = np.percentile(x, PERCENTILES, axis=2)  # (5, n, 8)
    mean_abs_diff = np.abs(np.diff(x, axis=2)).mean(axis=2)
    signs = np.signbit(centred)
    crossing_rate = (signs[..., 1:] != signs[..., :-1]).mean(axis=2)
    power = np.abs(np.fft.rfft(centred, axis=2)) ** 2
    freqs = np.fft.rfftfreq(x.shape[2], d=1.0 / rate_hz)
    low_band_share = power[..., freqs <= LOW_BAND_HZ].sum(axis=2) / (power.sum(axis=2) + 1e-12)
    stats = [mean, std, x.min(axis=2), x.max(axis=2), *percentiles, mean_abs_diff,
             crossing_rate, low_band_share]
    return np.stack(stats, axis=2).reshape(len(windows), -1).astype(np.float32)


def raw_windows(windows: np.ndarray, rate_hz: float = 50.0) -> np.ndarray:
    """The windows themselves, for models that learn their own features (har-cnn)."""
    if windows.ndim != 3 or windows.shape[1:] != (128, 6):
        raise ValueError(f"expected windows of shape (n, 128, 6), got {windows.shape}")
    return windows.astype(np.float32)


INPUTS = {FEATURE_SET: window_features, RAW_SET: raw_windows}


def model_inputs(feature_set: str) -> Callable[[np.ndarray, float], np.ndarray]:
    """The function that turns (n, size, 6) windows into a model's inputs."""
    try:
        return INPUTS[feature_set]
    except KeyError:
        raise ValueError(f"unknown feature set {feature_set!r} (known: "
                         f"{', '.join(INPUTS)})") from None
