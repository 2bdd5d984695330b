"""Drift on real HAPT windows: a new activity mix moves both signals."""

from __future__ import annotations

import numpy as np
import pytest

from fedd.agent.drift import DriftMonitor, DriftScore, kl_divergence
from fedd.agent.features import window_features
from fedd.datasets import hapt_person
from fedd.datasets.windows import window_labels, window_starts

WALKING, SITTING, LYING = 0, 3, 5


@pytest.fixture(scope="module")
def person() -> tuple[np.ndarray, np.ndarray]:
    """Person 1's training windows as features, with their activity labels."""
    data = hapt_person(1)
    features, labels = [], []
    for segment in data.stream:
        starts = window_starts(len(segment.samples), 128, 64)
        windows = segment.samples[starts[:, None] + np.arange(128)[None, :]]
        features.append(window_features(windows))
        labels.append(window_labels(segment.labels, starts, 128))
    return np.concatenate(features), np.concatenate(labels)


def test_kl_is_zero_for_equal_histograms_and_grows_with_difference() -> None:
    same = np.array([5.0, 5, 5])
    assert kl_divergence(same, same) == pytest.approx(0.0)
    near = kl_divergence(np.array([6.0, 5, 4]), same)
    far = kl_divergence(np.array([15.0, 0, 0]), same)
    assert 0 < near < far


def test_no_score_without_reference_or_enough_windows(person) -> None:
    features, labels = person
    monitor = DriftMonitor(6, recent=64, min_windows=32)
    monitor.observe(labels[:40], features[:40])
    assert monitor.score() is None
    monitor.set_reference(labels, features)
    monitor.observe(labels[:10], features[:10])
    assert monitor.score() is None


def test_a_switch_of_activity_mix_is_drift_and_the_same_mix_is_not(person) -> None:
    features, labels = person
    trained = np.isin(labels, [WALKING, SITTING])
    monitor = DriftMonitor(6, recent=64, min_windows=32)
    # The labels stand in for a perfect model's predictions.
    monitor.set_reference(labels[trained], features[trained])

    rng = np.random.default_rng(0)
    same = rng.choice(np.flatnonzero(trained), 64, replace=False)
    monitor.observe(labels[same], features[same])
    calm = monitor.score()
    assert calm is not None and calm.exceeds(0.5, 1.0) is None

    lying = np.flatnonzero(labels == LYING)[:64]
    monitor.observe(labels[lying], features[lying])
    moved = monitor.score()
    assert moved is not None
    assert moved.prediction_kl > 10 * calm.prediction_kl
    assert moved.feature_shift > 3 * calm.feature_shift
    assert "prediction drift" in moved.exceeds(0.5, 1.0)


def test_exceeds_names_the_signal() -> None:
    assert DriftScore(0.1, 2.0, 50).exceeds(0.5, 1.0).startswith("feature drift")
    assert DriftScore(0.1, 0.2, 50).exceeds(0.5, 1.0) is None


def test_constructor_rejects_a_window_smaller_than_its_minimum() -> None:
    with pytest.raises(ValueError, match="min_windows"):
        DriftMonitor(6, recent=10, min_windows=20)
