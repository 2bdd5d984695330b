"""Agent building blocks: windower, features, SQLite store and the LiteRT learner."""

from __future__ import annotations

import contextlib
import sqlite3
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import fedd.agent.store as store_module
from fedd.agent.features import window_features
from fedd.agent.learner import HEAD, Learner
from fedd.agent.store import AgentStore
from fedd.agent.windowing import Windower
from fedd.config import TrainingConfig
from fedd.datasets import PersonData, hapt_person
from fedd.datasets.windows import window_labels, window_starts
from fedd.hub.aggregate import apply_delta
from fedd.model import ModelSpec, TrainableModel
from fedd.wire import GlobalModel

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
DIM = 96

# ------------------------------------------------------------------ windowing


def labelled_stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples with runs of labels, including unlabelled (-1) stretches."""
    rng = np.random.default_rng(seed)
    samples = rng.normal(size=(n, 6)).astype(np.float32)
    runs = rng.integers(20, 300, n // 20 + 1)
    labels = np.repeat(rng.integers(-1, 6, len(runs)), runs)[:n].astype(np.int16)
    return samples, labels


def push_in_chunks(windower: Windower, samples: np.ndarray, labels: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    out_w, out_l, at = [], [], 0
    while at < len(samples):
        n = int(rng.choice([0, 1, 3, 17, 63, 64, 65, 127, 128, 129, 500]))
        w, lab = windower.push(samples[at : at + n], labels[at : at + n])
        assert w.shape[1:] == (windower.size, 6) and len(w) == len(lab)
        assert windower.pending < windower.size + windower.step
        out_w.append(w)
        out_l.append(lab)
        at += n
    return np.concatenate(out_w), np.concatenate(out_l)


@pytest.mark.parametrize(("size", "step"), [(128, 64), (128, 128), (50, 7), (16, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_windows_match_offline(size: int, step: int, seed: int) -> None:
    samples, labels = labelled_stream(3001, seed)
    got_w, got_l = push_in_chunks(Windower(size, step), samples, labels,
                                  np.random.default_rng(seed + 10))
    starts = window_starts(len(samples), size, step)
    np.testing.assert_array_equal(got_w, samples[starts[:, None] + np.arange(size)[None, :]])
    np.testing.assert_array_equal(got_l, window_labels(labels, starts, size))
    assert got_w.dtype == np.float32 and got_l.dtype == np.int16
    assert (got_l >= 0).any() and (got_l == -1).any()


def test_pending_counts_held_samples() -> None:
    windower = Windower(128, 64)
    samples, labels = labelled_stream(400, 3)
    assert windower.pending == 0
    w, _ = windower.push(samples[:100], labels[:100])
    assert len(w) == 0 and windower.pending == 100
    w, _ = windower.push(samples[100:130], labels[100:130])
    assert len(w) == 1 and windower.pending == 130 - 64
    w, _ = windower.push(samples[130:400], labels[130:400])
    assert len(w) == 4  # starts 64, 128, 192, 256 (+128 <= 400)
    assert windower.pending == 400 - 320


def test_gap_resets_the_window() -> None:
    samples, labels = labelled_stream(600, 4)
    windower = Windower(128, 64)
    w, _ = windower.push(samples[:100], labels[:100])
    assert len(w) == 0
    w, lab = windower.push(samples[100:300], labels[100:300], gap_before=True)
    # Nothing from before the gap: windows start at sample 100 of the stream.
    np.testing.assert_array_equal(w, np.stack([samples[100:228], samples[164:292]]))
    np.testing.assert_array_equal(lab, window_labels(labels[100:300], np.array([0, 64]), 128))
    assert windower.pending == 200 - 128
    windower.push(samples[300:301], labels[300:301], gap_before=True)
    assert windower.pending == 1


# ------------------------------------------------------------------- features


def reference_features(window: np.ndarray, rate: float = 50.0) -> np.ndarray:
    """The 8 x 12 statistics of one window, one channel at a time."""
    x = window.astype(np.float64)
    channels = [*x.T, np.sqrt((x[:, :3] ** 2).sum(1)), np.sqrt((x[:, 3:] ** 2).sum(1))]
    out = []
    for c in channels:
        centred = c - c.mean()
        power = np.abs(np.fft.rfft(centred)) ** 2
        low = power[np.fft.rfftfreq(len(c), 1 / rate) <= 2.5].sum() / (power.sum() + 1e-12)
        crossings = np.mean(np.signbit(centred[1:]) != np.signbit(centred[:-1]))
        out += [c.mean(), c.std(), c.min(), c.max(), *np.percentile(c, [10, 25, 50, 75, 90]),
                np.abs(np.diff(c)).mean(), crossings, low]
    return np.array(out)


def test_features_match_a_per_channel_reference() -> None:
    rng = np.random.default_rng(5)
    windows = rng.normal(0, 2, size=(7, 128, 6)).astype(np.float32)
    got = window_features(windows)
    assert got.shape == (7, DIM) and got.dtype == np.float32
    assert np.isfinite(got).all()
    for i in range(7):
        np.testing.assert_allclose(got[i], reference_features(windows[i]), rtol=1e-5, atol=1e-5)


def test_feature_meaning_on_known_signals() -> None:
    t = np.arange(128) / 50.0
    window = np.zeros((1, 128, 6), np.float32)
    window[0, :, 0] = np.sin(2 * np.pi * 1.0 * t)   # slow: power below 2.5 Hz
    window[0, :, 1] = np.sin(2 * np.pi * 10.0 * t)  # fast: power above it
    window[0, :, 2] = np.where(np.arange(128) % 2, 1.0, -1.0)  # flips every sample
    stats = window_features(window).reshape(8, 12)
    assert stats[0, 11] > 0.9 and stats[1, 11] < 0.1
    assert stats[2, 10] == 1.0 and stats[2, 9] == 2.0  # crossing rate, mean |diff|
    assert stats[2, 2] == -1.0 and stats[2, 3] == 1.0  # min, max


@pytest.mark.parametrize("size", [128, 64, 16])
def test_constant_window_has_zero_spread(size: int) -> None:
    values = np.array([0.25, -1.5, 9.8, 0.0, 3.0, -0.125], np.float32)
    windows = np.broadcast_to(values, (3, size, 6)).copy()
    stats = window_features(windows).reshape(3, 8, 12)
    assert np.isfinite(stats).all()
    # std, mean |diff|, crossing rate, low-band share: zero up to float64 rounding of the
    # magnitude channels' mean (the six axes are exact).
    np.testing.assert_allclose(stats[:, :, [1, 9, 10, 11]], 0, atol=1e-9)
    assert (stats[:, :6, 1] == 0).all()
    np.testing.assert_allclose(stats[0, :6, 0], values)
    np.testing.assert_allclose(stats[0, 6, 0], np.linalg.norm(values[:3]), rtol=1e-6)


def test_no_windows_gives_no_features() -> None:
    assert window_features(np.zeros((0, 128, 6), np.float32)).shape == (0, DIM)


@pytest.mark.parametrize("shape", [(128, 6), (2, 128, 3), (2, 128, 7), (2, 6, 128, 1)])
def test_features_refuse_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        window_features(np.zeros(shape, np.float32))


# ---------------------------------------------------------------------- store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = AgentStore(tmp_path / "state" / "agent.db", input_shape=(DIM,))
    yield s
    with contextlib.suppress(sqlite3.ProgrammingError):  # the test closed it already
        s.close()


def features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def test_store_uses_wal_and_full_sync(store: AgentStore, tmp_path: Path) -> None:
    other = sqlite3.connect(store.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    assert store._query("PRAGMA synchronous")[0][0] == 2  # FULL


def test_windows_add_count_and_read_back(store: AgentStore) -> None:
    empty_x, empty_y = store.labelled_windows()
    assert empty_x.shape == (0, DIM) and empty_y.shape == (0,)
    x = features(10)
    labels = np.array([0, -1, 5, 2, -1, 1, 3, 4, 0, -1])
    store.add_windows(x[:6], labels[:6])
    store.add_windows(x[6:], labels[6:], state={"cursor": 1234})
    assert store.count_windows() == 10
    assert store.count_windows(labelled_only=True) == 7
    got_x, got_y = store.labelled_windows()
    keep = labels >= 0
    assert got_x.dtype == np.float32 and got_y.dtype == np.int32
    assert got_x.tobytes() == x[keep].tobytes()
    np.testing.assert_array_equal(got_y, labels[keep])
    assert store.get("cursor") == 1234


def test_retention_by_count_keeps_the_newest(store: AgentStore) -> None:
    x = features(10, seed=1)
    store.add_windows(x, np.arange(10) % 6)
    assert store.enforce_retention(max_windows=4, max_age_s=1e9) == 6
    got_x, got_y = store.labelled_windows()
    assert got_x.tobytes() == x[6:].tobytes()
    np.testing.assert_array_equal(got_y, np.arange(6, 10) % 6)
    assert store.enforce_retention(max_windows=4, max_age_s=1e9) == 0


def test_retention_by_age(store: AgentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    x = features(6, seed=2)
    store.add_windows(x[:3], np.zeros(3))
    clock[0] = 2000.0
    store.add_windows(x[3:], np.ones(3))
    clock[0] = 2000.0
    assert store.enforce_retention(max_windows=100, max_age_s=1000) == 0  # exactly 1000 s old
    clock[0] = 2000.5
    assert store.enforce_retention(max_windows=100, max_age_s=1000) == 3
    assert store.labelled_windows()[0].tobytes() == x[3:].tobytes()
    clock[0] = 10_000.0
    assert store.enforce_retention(max_windows=100, max_age_s=1000) == 3
    assert store.count_windows() == 0


def test_retention_by_age_and_count_together(store: AgentStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    x = features(8, seed=3)
    store.add_windows(x[:2], np.zeros(2))
    clock[0] = 100.0
    store.add_windows(x[2:], np.zeros(6))
    assert store.enforce_retention(max_windows=4, max_age_s=50) == 4  # 2 aged + 2 over
    assert store.labelled_windows()[0].tobytes() == x[4:].tobytes()


@pytest.mark.parametrize("value", [
    {"a": [1, 2, {"b": None}], "c": "text"}, [1.5, -2], 42, "s", True, 0.1,
])
def test_state_json_round_trip(store: AgentStore, value: object) -> None:
    store.put(key=value)
    assert store.get("key") == value


def test_state_arrays_are_float32_and_exact(store: AgentStore) -> None:
    head = np.random.default_rng(4).normal(size=198).astype(np.float32)
    head[0] = np.float32(1e-45)
    store.put(personal_head=head, feature_mean=np.arange(5, dtype=np.float64) / 3)
    got = store.get("personal_head")
    assert got.dtype == np.float32 and got.tobytes() == head.tobytes()
    got[:] = 0  # a writable copy, not a view of the database row
    assert store.get("personal_head").tobytes() == head.tobytes()
    np.testing.assert_array_equal(store.get("feature_mean"),
                                  (np.arange(5) / 3).astype(np.float32))


def test_state_defaults_and_overwrite(store: AgentStore) -> None:
    assert store.get("missing") is None
    assert store.get("missing", 7) == 7
    store.put(next_seq=1)
    store.put(next_seq=2, other="x")
    assert store.get("next_seq") == 2 and store.get("other") == "x"


def test_outbox_survives_close_and_reopen(store: AgentStore, tmp_path: Path) -> None:
    assert store.oldest_outgoing() is None and store.outbox_size() == 0
    payloads = {5: b"\x00five", 2: b"two\xff", 9: bytes(range(256))}
    for seq, payload in payloads.items():
        store.enqueue(f"fedd/v1/lab/update/dev-{seq}", payload, seq=seq)
    store.put(next_seq=10)
    store.close()
    assert not Path(f"{store.path}-wal").exists() or Path(f"{store.path}-wal").stat().st_size == 0
    again = AgentStore(store.path, input_shape=(DIM,))
    try:
        assert again.outbox_size() == 3 and again.get("next_seq") == 10
        for seq in sorted(payloads):
            item = again.oldest_outgoing()
            assert item is not None
            assert (item.seq, item.topic, item.payload) == (
                seq, f"fedd/v1/lab/update/dev-{seq}", payloads[seq])
            again.acknowledge(seq)
        assert again.oldest_outgoing() is None and again.outbox_size() == 0
        again.acknowledge(12345)  # acknowledging twice or unknown is harmless
    finally:
        again.close()


def test_failing_transactions_roll_back(store: AgentStore) -> None:
    store.add_windows(features(2), np.zeros(2), state={"cursor": 1})
    with pytest.raises(TypeError):  # not JSON-able: fails after the windows were inserted
        store.add_windows(features(3), np.zeros(3), state={"cursor": 4, "bad": object()})
    assert store.count_windows() == 2 and store.get("cursor") == 1
    with pytest.raises(TypeError):
        store.put(a=1, b=object())
    assert store.get("a") is None
    store.enqueue("t", b"x", seq=1)
    with pytest.raises(sqlite3.IntegrityError):
        store.enqueue("t", b"y", seq=1)
    assert store.outbox_size() == 1 and store.oldest_outgoing().payload == b"x"  # type: ignore[union-attr]
    # The store is still usable: no transaction was left open.
    store.put(a=2)
    store.add_windows(features(1), np.zeros(1))
    assert store.get("a") == 2 and store.count_windows() == 3


def test_rollback_is_visible_to_another_connection(store: AgentStore) -> None:
    with pytest.raises(RuntimeError), store._transaction() as db:
        db.execute("INSERT INTO outbox (seq, created, topic, payload) VALUES (1, 0, 't', x'00')")
        raise RuntimeError("power cut in the middle")
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    finally:
        other.close()


# -------------------------------------------------------------------- learner


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_manifest(MANIFEST, "har-mlp")


@pytest.fixture(scope="module")
def person() -> PersonData:
    return hapt_person(5)


@pytest.fixture(scope="module")
def train_data(person: PersonData) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for seg in person.stream:
        starts = window_starts(len(seg.samples), 128, 64)
        labels = window_labels(seg.labels, starts, 128)
        windows = seg.samples[starts[:, None] + np.arange(128)[None, :]]
        xs.append(window_features(windows[labels >= 0]))
        ys.append(labels[labels >= 0])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32)


@pytest.fixture(scope="module")
def holdout(person: PersonData) -> tuple[np.ndarray, np.ndarray]:
    return window_features(person.holdout_windows), person.holdout_labels.astype(np.int32)


@pytest.fixture(scope="module")
def initial(spec: ModelSpec) -> GlobalModel:
    return global_version(spec, 0, TrainableModel(spec).get_parts())


def global_version(spec: ModelSpec, version: int, parts: dict[str, np.ndarray]) -> GlobalModel:
    return GlobalModel(version=version, parent=version - 1 if version else None,
                       model=spec.name, model_sha256=spec.sha256, created=0.0,
                       contributors=1, mean_staleness=0.0, parts=parts)


TRAINING = TrainingConfig(epochs=2, learning_rate=0.05, head_epochs=3)


@pytest.fixture
def learner(spec: ModelSpec) -> Learner:
    return Learner(TrainableModel(spec), TRAINING, seed=0)


def snapshot(parts: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: values.tobytes() for name, values in parts.items()}


def test_person_data_is_enough_to_learn(train_data, holdout) -> None:  # type: ignore[no-untyped-def]
    (x, y), (hx, hy) = train_data, holdout
    assert x.shape[1] == DIM and len(x) > 150 and set(y.tolist()) == set(range(6))
    assert len(hx) > 50 and set(hy.tolist()) == set(range(6))


def test_local_round_returns_a_delta_and_lowers_loss(
        learner: Learner, spec: ModelSpec, initial: GlobalModel, train_data) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    before = snapshot(initial.parts)
    learner.apply_global(initial)
    learner.fit_scaler(x)
    result = learner.local_round(x, y)
    assert result.base_version == 0 and result.num_samples == len(x)
    assert {n: v.shape for n, v in result.delta.items()} == {n: (k,) for n, k in
                                                             spec.parts.items()}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in result.delta.values())
    assert all(np.abs(v).max() > 0 for v in result.delta.values())
    assert result.loss_after < result.loss_before
    assert snapshot(initial.parts) == before  # the global version itself is not touched
    trained = learner.model.get_parts()
    for name in spec.parts:
        np.testing.assert_allclose(initial.parts[name] + result.delta[name], trained[name],
                                   rtol=1e-6, atol=1e-6)


def test_rounds_of_own_deltas_learn_the_persons_activities(
        learner: Learner, spec: ModelSpec, initial: GlobalModel, train_data, holdout) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    learner.apply_global(initial)
    learner.fit_scaler(x)
    first = learner.evaluate(*holdout)
    model = initial
    for version in range(1, 6):
        result = learner.local_round(x, y)
        assert result.base_version == version - 1
        model = global_version(spec, version, apply_delta(model.parts, result.delta, 1.0))
        learner.apply_global(model)
    scores = learner.evaluate(*holdout)
    assert scores.version == 5 and scores.windows == len(holdout[1])
    assert scores.global_accuracy > 0.6, scores  # chance is 1/6
    assert scores.global_accuracy > first.global_accuracy


def test_personalize_trains_only_the_personal_head(
        learner: Learner, spec: ModelSpec, initial: GlobalModel, train_data, holdout) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    learner.apply_global(initial)
    assert learner.personal_head is not None
    np.testing.assert_array_equal(learner.personal_head, initial.parts[HEAD])
    learner.fit_scaler(x)
    before = snapshot(initial.parts)
    head_before = learner.personal_head.copy()
    learner.personalize(x, y)
    assert snapshot(initial.parts) == before
    assert learner.global_model is initial
    assert not np.array_equal(learner.personal_head, head_before)
    assert learner.personal_head.shape == (spec.parts[HEAD],)
    # The model the learner runs: global body, personal head.
    np.testing.assert_array_equal(learner.model.get_part("body"), initial.parts["body"])
    np.testing.assert_array_equal(learner.model.get_part(HEAD), learner.personal_head)
    scores = learner.evaluate(*holdout)
    assert scores.personal_accuracy > scores.global_accuracy
    # A new global version keeps the personal head.
    personal = learner.personal_head.copy()
    learner.apply_global(global_version(spec, 1, {n: v + 0.01 for n, v in
                                                  initial.parts.items()}))
    np.testing.assert_array_equal(learner.personal_head, personal)


def test_personalize_with_no_head_epochs_changes_nothing(
        spec: ModelSpec, initial: GlobalModel, train_data) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    learner = Learner(TrainableModel(spec), replace(TRAINING, head_epochs=0))
    learner.apply_global(initial)
    learner.fit_scaler(x)
    learner.personalize(x, y)
    np.testing.assert_array_equal(learner.personal_head, initial.parts[HEAD])


def test_evaluate_gives_accuracies(learner: Learner, initial: GlobalModel,
                                   holdout) -> None:  # type: ignore[no-untyped-def]
    hx, hy = holdout
    learner.apply_global(initial)
    learner.fit_scaler(hx)
    scores = learner.evaluate(hx, hy)
    assert scores.version == 0 and scores.windows == len(hy)
    for accuracy in (scores.global_accuracy, scores.personal_accuracy):
        assert 0.0 <= accuracy <= 1.0
        assert accuracy * len(hy) == pytest.approx(round(accuracy * len(hy)))
    # Before personalization the personal model is the global one.
    assert scores.personal_accuracy == scores.global_accuracy
    assert learner.predict(hx).shape == (len(hy),)


def test_fit_scaler_standardizes(learner: Learner, train_data) -> None:  # type: ignore[no-untyped-def]
    x, _ = train_data
    learner.fit_scaler(x)
    z = learner.standardize(x)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    spread = z.std(axis=0)
    assert np.all((np.abs(spread - 1) < 1e-3) | (spread == 0))


def test_errors_before_a_global_model(learner: Learner, initial: GlobalModel,
                                      train_data) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    assert learner.version is None
    for call in (lambda: learner.local_round(x, y), lambda: learner.personalize(x, y),
                 lambda: learner.evaluate(x, y)):
        with pytest.raises(RuntimeError, match="no global model"):
            call()
    learner.apply_global(initial)
    assert learner.version == 0
    with pytest.raises(RuntimeError, match="fit_scaler"):
        learner.local_round(x, y)


def test_restored_personal_state_is_used(spec: ModelSpec, initial: GlobalModel,
                                         train_data, holdout) -> None:  # type: ignore[no-untyped-def]
    x, y = train_data
    first = Learner(TrainableModel(spec), TRAINING, seed=1)
    first.apply_global(initial)
    first.fit_scaler(x)
    first.personalize(x, y)
    second = Learner(TrainableModel(spec), TRAINING, seed=2)
    second.restore(first.personal_head, first.mean, first.scale)
    second.apply_global(initial)
    np.testing.assert_array_equal(second.personal_head, first.personal_head)
    np.testing.assert_array_equal(second.predict(holdout[0]), first.predict(holdout[0]))
