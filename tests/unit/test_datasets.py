"""Replay datasets (fedd/datasets/): real HAPT, the per-activity time split, npz and streams."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedd.datasets import (
    PersonData,
    Segment,
    hapt,
    hapt_person,
    load_stream,
    npz_person,
    save_stream,
)
from fedd.datasets.windows import train_mask, window_labels, window_starts

SIZE, STEP = 128, 64


@pytest.fixture(scope="module")
def people() -> dict[int, list[hapt.Recording]]:
    return hapt.load()


@pytest.fixture(scope="module")
def persons(people: dict[int, list[hapt.Recording]]) -> dict[int, PersonData]:
    return {p: hapt_person(p, people=people) for p in people}


def labelled_windows(recordings: list[hapt.Recording]) -> tuple[np.ndarray, np.ndarray]:
    """Every single-activity window of one person in time order, computed from scratch."""
    windows, labels = [], []
    for rec in recordings:
        for start in range(0, len(rec.labels) - SIZE + 1, STEP):
            block = rec.labels[start : start + SIZE]
            if 1 <= block[0] <= 6 and (block == block[0]).all():
                windows.append(rec.samples[start : start + SIZE])
                labels.append(int(block[0]) - 1)
    return np.array(windows), np.array(labels)


def rewindow(stream: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """The windows a device replaying `stream` would cut (same rule as the agent)."""
    windows, labels = [], []
    for seg in stream:
        starts = window_starts(len(seg.samples), SIZE, STEP)
        windows.append(seg.samples[starts[:, None] + np.arange(SIZE)[None, :]])
        labels.append(window_labels(seg.labels, starts, SIZE))
    return np.concatenate(windows), np.concatenate(labels)


# --------------------------------------------------------- file and unpickler


def test_default_path_is_the_verified_file() -> None:
    path = hapt.default_path()
    assert path.name == "HAPT.pkl.gz" and path.is_file()
    assert hapt._read_verified(path)[:2] == b"\x1f\x8b"  # gzip


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_altered_copy_is_refused(tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "HAPT.pkl.gz"
    shutil.copyfile(hapt.default_path(), copy)
    data = bytearray(copy.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-1]
    else:
        data += b"\0"
    copy.write_bytes(bytes(data))
    with pytest.raises(hapt.DatasetError, match="sha256"):
        hapt.load(copy)


def test_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(hapt.DatasetError):
        hapt.load(tmp_path / "nope.pkl.gz")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _GetAttr:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (getattr, ("", "join"))


@pytest.mark.parametrize("make", [
    lambda marker: pickle.dumps(_Evil(marker), protocol=2),
    lambda marker: pickle.dumps(_Evil(marker), protocol=0),
    lambda marker: pickle.dumps(_Evil(marker), protocol=5),
    lambda marker: pickle.dumps(_GetAttr(), protocol=2),
    lambda marker: pickle.dumps({"x": [eval]}, protocol=2),
    lambda marker: b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
    lambda marker: b"cbuiltins\nexec\n(S'open(\"" + str(marker).encode() + b"\", \"w\")'\ntR.",
], ids=["os.system-p2", "os.system-p0", "os.system-p5", "getattr", "eval", "raw-os",
        "raw-exec"])
def test_restricted_unpickler_refuses_forbidden_globals(tmp_path: Path, make) -> None:
    marker = tmp_path / "pwned"
    data = make(marker)
    with pytest.raises(hapt.DatasetError, match="forbidden global"):
        hapt._RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    with pytest.raises(hapt.DatasetError, match="forbidden global"):
        hapt._unpickle(io.BytesIO(data))
    assert not marker.exists()


def test_restricted_unpickler_admits_plain_data() -> None:
    value = {1: [b"x", "y", 2.5, (None, True)], "s": slice(1, 5, 2)}
    assert hapt._unpickle(io.BytesIO(pickle.dumps(value, protocol=2))) == value


# ------------------------------------------------------------------- contents


def test_thirty_people_with_six_channel_recordings(
        people: dict[int, list[hapt.Recording]]) -> None:
    assert sorted(people) == list(range(1, 31))
    for recordings in people.values():
        assert recordings
        for rec in recordings:
            assert rec.samples.dtype == np.float32 and rec.samples.shape[1] == 6
            assert rec.labels.dtype == np.int8 and len(rec.labels) == len(rec.samples)
            assert np.isfinite(rec.samples).all()
            assert set(np.unique(rec.labels)) <= {-1, *range(1, 13)}


def test_single_activity_window_counts(people: dict[int, list[hapt.Recording]]) -> None:
    counts = {p: len(labelled_windows(recs)[1]) for p, recs in people.items()}
    assert sum(counts.values()) == 10_017
    assert min(counts.values()) == 269 and max(counts.values()) == 404


def test_unknown_person(people: dict[int, list[hapt.Recording]]) -> None:
    with pytest.raises(KeyError, match="no person 31"):
        hapt_person(31, people=people)


# ------------------------------------------------------------ per-person split


def test_stream_rewindows_to_exactly_the_training_windows(
        people: dict[int, list[hapt.Recording]], persons: dict[int, PersonData]) -> None:
    for person, data in persons.items():
        windows, labels = labelled_windows(people[person])
        train = train_mask(labels)
        got_windows, got_labels = rewindow(data.stream)
        np.testing.assert_array_equal(got_labels, labels[train], err_msg=f"person {person}")
        np.testing.assert_array_equal(got_windows, windows[train], err_msg=f"person {person}")
        np.testing.assert_array_equal(data.holdout_labels, labels[~train])
        np.testing.assert_array_equal(data.holdout_windows, windows[~train])
        assert data.holdout_windows.shape[1:] == (SIZE, 6)
        assert data.holdout_labels.dtype == np.int16


def test_train_and_holdout_split_every_window_in_time_order_per_class(
        people: dict[int, list[hapt.Recording]], persons: dict[int, PersonData]) -> None:
    """Locate each replayed and each holdout window in the person's timeline."""
    for person, data in persons.items():
        windows, labels = labelled_windows(people[person])
        position = {w.tobytes(): i for i, w in enumerate(windows)}
        assert len(position) == len(windows)  # windows are distinct, so lookup is exact
        train_windows, train_labels = rewindow(data.stream)
        train_at = np.array([position[w.tobytes()] for w in train_windows])
        test_at = np.array([position[w.tobytes()] for w in data.holdout_windows])
        assert len(train_at) + len(test_at) == len(windows)
        assert sorted([*train_at, *test_at]) == list(range(len(windows)))
        assert (np.diff(train_at) > 0).all() and (np.diff(test_at) > 0).all()
        np.testing.assert_array_equal(labels[train_at], train_labels)
        np.testing.assert_array_equal(labels[test_at], data.holdout_labels)
        assert set(data.holdout_labels.tolist()) == set(range(6)), f"person {person}"
        for cls in range(6):
            tr, te = train_at[train_labels == cls], test_at[data.holdout_labels == cls]
            assert len(tr) and len(te)
            assert tr.max() < te.min(), f"person {person} class {cls}"
            assert len(tr) == round(0.7 * (len(tr) + len(te)))


def test_stream_segments_are_labelled_runs(persons: dict[int, PersonData]) -> None:
    for data in persons.values():
        for seg in data.stream:
            assert len(seg.samples) == len(seg.labels) >= SIZE
            assert (len(seg.samples) - SIZE) % STEP == 0
            assert seg.labels.dtype == np.int16 and seg.labels.max() <= 5
        assert data.stream_samples == sum(len(s.samples) for s in data.stream)


def test_size_and_step_are_honoured(people: dict[int, list[hapt.Recording]]) -> None:
    data = hapt_person(3, size=64, step=32, people=people)
    assert data.holdout_windows.shape[1] == 64
    for seg in data.stream:
        assert (len(seg.samples) - 64) % 32 == 0


# -------------------------------------------------------------------- streams


def test_save_and_load_stream_round_trip(tmp_path: Path, persons: dict[int, PersonData]) -> None:
    data = persons[7]
    path = tmp_path / "p7.npz"
    save_stream(data, path)
    got = load_stream(path)
    assert got.person == 7
    assert len(got.stream) == len(data.stream)
    for a, b in zip(got.stream, data.stream, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)
        np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(got.holdout_windows, data.holdout_windows)
    np.testing.assert_array_equal(got.holdout_labels, data.holdout_labels)
    assert got.stream_samples == data.stream_samples


def _stream_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"person": np.int64(4), "samples": rng.normal(size=(300, 6)).astype(np.float32),
            "labels": rng.integers(0, 6, 300).astype(np.int16),
            "segment_lengths": np.array([100, 200]),
            "holdout_windows": np.zeros((5, 128, 6), np.float32),
            "holdout_labels": np.zeros(5, np.int16)}


@pytest.mark.parametrize(("changes", "message"), [
    ({"segment_lengths": np.array([100, 150])}, "disagree"),
    ({"segment_lengths": np.array([100, 250])}, "disagree"),
    ({"labels": np.zeros(299, np.int16)}, "disagree"),
    ({"samples": np.zeros(300, np.float32)}, "disagree"),
    ({"holdout_labels": np.zeros(4, np.int16)}, "disagree"),
    ({"holdout_windows": np.zeros((5, 128), np.float32)}, "disagree"),
    ({"segment_lengths": None}, "not a replay stream"),
    ({"person": None}, "not a replay stream"),
])
def test_corrupted_stream_file(tmp_path: Path, changes: dict, message: str) -> None:
    arrays = {**_stream_arrays(), **changes}
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ValueError, match=message):
        load_stream(path)


def test_valid_synthetic_stream_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez(path, **_stream_arrays())
    got = load_stream(path)
    assert [len(s.samples) for s in got.stream] == [100, 200]


def test_negative_segment_lengths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "neg.npz"
    np.savez(path, **{**_stream_arrays(), "segment_lengths": np.array([200, -100, 200])})
    with pytest.raises(ValueError):
        load_stream(path)


# ------------------------------------------------------------------------ npz


def write_npz(path: Path, **override: np.ndarray | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 60
    arrays = {"windows": rng.normal(size=(n, 16, 6)).astype(np.float64),
              "labels": np.tile(np.arange(3), n // 3),
              "subjects": np.repeat([1, 2, 3], n // 3)}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_person(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    arrays = write_npz(path)
    data = npz_person(path, 2)
    mine = arrays["subjects"] == 2
    windows, labels = arrays["windows"][mine].astype(np.float32), arrays["labels"][mine]
    train = train_mask(labels)
    assert data.person == 2
    assert len(data.stream) == train.sum() == 20 - len(data.holdout_labels) == 14
    for seg, w, lab in zip(data.stream, windows[train], labels[train], strict=True):
        np.testing.assert_array_equal(seg.samples, w)
        assert seg.samples.dtype == np.float32
        assert seg.labels.dtype == np.int16
        np.testing.assert_array_equal(seg.labels, np.full(16, lab))
    np.testing.assert_array_equal(data.holdout_windows, windows[~train])
    np.testing.assert_array_equal(data.holdout_labels, labels[~train])
    # Each class: the first 70 % in file order train, the rest are held out.
    for cls, (kept, held) in enumerate([(5, 2), (4, 2), (5, 2)]):
        idx = np.flatnonzero(labels == cls)
        assert train[idx].tolist() == [True] * kept + [False] * held


@pytest.mark.parametrize(("override", "error", "message"), [
    ({"labels": None}, ValueError, "missing arrays \\['labels'\\]"),
    ({"subjects": None, "windows": None}, ValueError, "missing arrays"),
    ({"windows": np.zeros((60, 16))}, ValueError, "expected windows"),
    ({"labels": np.zeros(59, np.int64)}, ValueError, "expected windows"),
    ({}, KeyError, "no windows for subject 9"),
])
def test_npz_person_errors(tmp_path: Path, override: dict, error: type, message: str) -> None:
    path = tmp_path / "data.npz"
    write_npz(path, **override)
    with pytest.raises(error, match=message):
        npz_person(path, 9 if error is KeyError else 1)
