"""Labelled sensor data for replay: HAPT and the documented `.npz` form.

A person's data is split into the stream their device replays as if live
(the training past) and the holdout windows it is evaluated on (its future).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedd.datasets import hapt
from fedd.datasets.windows import (
    contiguous_runs,
    train_mask,
    window_labels,
    window_starts,
)


@dataclass(frozen=True)
class Segment:
    """Contiguous samples (n, channels) with per-sample class labels (-1: none)."""

    samples: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PersonData:
    """What one device replays (`stream`) and is evaluated on (`holdout_*`)."""

    person: int
    stream: list[Segment]
    holdout_windows: np.ndarray
    holdout_labels: np.ndarray

    @property
    def stream_samples(self) -> int:
        return sum(len(seg.samples) for seg in self.stream)


def _hapt_classes(raw: np.ndarray) -> np.ndarray:
    """HAPT labels 1-6 are the activities; transitions and -1 are unlabelled."""
    return np.where((raw >= 1) & (raw <= 6), raw.astype(np.int16) - 1, -1).astype(np.int16)


def hapt_person(person: int, size: int = 128, step: int = 64,
                path: str | Path | None = None,
                people: dict[int, list[hapt.Recording]] | None = None) -> PersonData:
    """One HAPT person as a replay stream of training runs and a holdout."""
    people = people if people is not None else hapt.load(path)
    if person not in people:
        raise KeyError(f"HAPT has no person {person} (people: {min(people)}-{max(people)})")
    per_recording = []
    for rec in people[person]:
        classes = _hapt_classes(rec.labels)
        starts = window_starts(len(classes), size, step)
        labels = window_labels(classes, starts, size)
        keep = labels >= 0
        per_recording.append((rec, classes, starts[keep], labels[keep]))
    is_train = train_mask(np.concatenate([lab for *_, lab in per_recording]))
    stream, holdout_windows, holdout_labels = [], [], []
    offset = 0
    for rec, classes, starts, labels in per_recording:
        train = is_train[offset : offset + len(starts)]
        offset += len(starts)
        for first, last in contiguous_runs(starts[train], step):
            stream.append(Segment(rec.samples[first : last + size], classes[first : last + size]))
        test_starts = starts[~train]
        holdout_windows.append(rec.samples[test_starts[:, None] + np.arange(size)[None, :]])
        holdout_labels.append(labels[~train])
    return PersonData(person, stream, np.concatenate(holdout_windows),
                      np.concatenate(holdout_labels).astype(np.int16))


def npz_person(path: str | Path, person: int) -> PersonData:
    """One subject of a `.npz` dataset (see docs/datasets.md for the form).

    Its windows are replayed one by one, in file order, since nothing says
    whether they overlap.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = {"windows", "labels", "subjects"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        windows, labels, subjects = data["windows"], data["labels"], data["subjects"]
    if windows.ndim != 3 or not (len(windows) == len(labels) == len(subjects)):
        raise ValueError(f"{path}: expected windows (n, size, channels) and n labels and subjects")
    mine = subjects == person
    if not mine.any():
        raise KeyError(f"{path}: no windows for subject {person}")
    windows = windows[mine].astype(np.float32)
    labels = labels[mine].astype(np.int16)
    is_train = train_mask(labels)
    size = windows.shape[1]
    stream = [Segment(w, np.full(size, lab, dtype=np.int16))
              for w, lab in zip(windows[is_train], labels[is_train], strict=True)]
    return PersonData(person, stream, windows[~is_train], labels[~is_train])


def save_stream(data: PersonData, path: str | Path) -> None:
    """Write one person's replay stream and holdout (the "stream" form)."""
    lengths = np.array([len(seg.samples) for seg in data.stream], dtype=np.int64)
    np.savez(path, person=np.int64(data.person),
             samples=np.concatenate([seg.samples for seg in data.stream]).astype(np.float32),
             labels=np.concatenate([seg.labels for seg in data.stream]).astype(np.int16),
             segment_lengths=lengths, holdout_windows=data.holdout_windows.astype(np.float32),
             holdout_labels=data.holdout_labels.astype(np.int16))


def load_stream(path: str | Path) -> PersonData:
    """Read a file written by `save_stream`, checking that its arrays agree."""
    with np.load(path, allow_pickle=False) as f:
        try:
            samples, labels = f["samples"], f["labels"]
            lengths, person = f["segment_lengths"], int(f["person"])
            holdout_windows, holdout_labels = f["holdout_windows"], f["holdout_labels"]
        except KeyError as exc:
            raise ValueError(f"{path}: not a replay stream file: {exc}") from None
    if (samples.ndim != 2 or len(samples) != len(labels) or (lengths <= 0).any()
            or lengths.sum() != len(samples)):
        raise ValueError(f"{path}: samples, labels and segment_lengths disagree")
    if holdout_windows.ndim != 3 or len(holdout_windows) != len(holdout_labels):
        raise ValueError(f"{path}: holdout windows and labels disagree")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    stream = [Segment(samples[lo:hi], labels[lo:hi])
              for lo, hi in itertools.pairwise(bounds)]
    return PersonData(person, stream, holdout_windows, holdout_labels)
