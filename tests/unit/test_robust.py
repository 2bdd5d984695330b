"""fedd/hub/robust.py: norms, clipping, the outlier screen, trimmed mean and median."""

from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedd.config import RobustConfig
from fedd.hub.aggregate import FedBuff, Mean
from fedd.hub.ledger import Ledger
from fedd.hub.robust import (
    NORM_OUTLIER,
    Median,
    NormScreen,
    NormTracker,
    Outlier,
    TrimmedMean,
    clip_scale,
    coordinate_median,
    reducer_for,
    trimmed_count,
    trimmed_mean,
    update_norm,
)
from fedd.pipeline import Pipeline

SIZES = {"body": 257, "head": 13}


def random_delta(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: (scale * rng.normal(0, 1, n)).astype(np.float32) for name, n in SIZES.items()}


def buffer(reducer: object = None, **kw: float) -> FedBuff:
    args = {"buffer_size": 8, "max_wait_s": 10.0, "quorum": 1, "staleness_exponent": 0.5}
    args.update(kw)
    return FedBuff(**args, reducer=reducer)  # type: ignore[arg-type]


def decoded_parts(codec: str, delta: dict[str, np.ndarray], seed: int = 0) -> dict:
    pipe = Pipeline.from_spec(codec)
    rng = np.random.default_rng(seed)
    return {name: pipe.read(pipe.encode(values, rng=rng).payload, length=values.size,
                            max_bytes=1 << 20) for name, values in delta.items()}


# ---------------------------------------------------------------- norms and clipping


def test_norm_takes_all_parts_together() -> None:
    assert update_norm({"body": np.array([3.0], np.float32),
                        "head": np.array([4.0], np.float32)}) == 5.0
    assert update_norm({"body": np.array([1.0, 2.0, 2.0])}) == 3.0
    assert update_norm({}) == 0.0


def test_norm_is_summed_in_float64() -> None:
    # A float32 dot of these overflows (1e40 > 3.4e38).
    big = np.full(4, 1e20, np.float32)
    assert update_norm({"body": big}) == pytest.approx(2e20, rel=1e-6)


@pytest.mark.parametrize("codec", ["topk:0.05+q:4+zstd", "topk:3", "topk:0.1+f16", "q:8",
                                   "float32"])
def test_the_sparse_norm_equals_the_dense_norm(codec: str) -> None:
    parts = decoded_parts(codec, random_delta(np.random.default_rng(1)))
    dense = {name: part.dense() for name, part in parts.items()}
    assert update_norm(parts) == pytest.approx(update_norm(dense), rel=1e-12)


def test_the_sparse_norm_builds_no_dense_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = decoded_parts("topk:0.05+float32", random_delta(np.random.default_rng(2)))
    assert all(part.sparse for part in parts.values())
    monkeypatch.setattr(type(parts["body"]), "dense", lambda self: pytest.fail("densified"))
    assert update_norm(parts) > 0


@pytest.mark.parametrize(("norm", "bound", "scale"), [
    (5.0, None, 1.0), (5.0, 10.0, 1.0), (5.0, 5.0, 1.0), (10.0, 5.0, 0.5), (0.0, 1.0, 1.0),
    (1e6, 2.0, 2e-6)])
def test_clip_scale(norm: float, bound: float | None, scale: float) -> None:
    assert clip_scale(norm, bound) == pytest.approx(scale)


# ---------------------------------------------------------------- the norm history


def test_tracker_warms_up_then_gives_the_median_of_the_last_norms() -> None:
    tracker = NormTracker(size=4, warmup=3)
    tracker.add(1.0)
    tracker.add(100.0)
    assert tracker.median() is None  # 2 < warmup
    tracker.add(3.0)
    assert tracker.median() == 3.0
    tracker.add(5.0)
    assert tracker.median() == 4.0  # (3 + 5) / 2
    tracker.add(7.0)  # 1.0 leaves
    assert tracker.norms == [100.0, 3.0, 5.0, 7.0] and tracker.median() == 6.0


def test_tracker_median_equals_numpys_over_the_window() -> None:
    norms = np.round(np.random.default_rng(12).lognormal(0, 1, 400), 2)  # with ties
    tracker = NormTracker(size=37, warmup=1)
    for i, norm in enumerate(norms):
        if i == 200:
            tracker.resize(size=20, warmup=1)
        tracker.add(norm)
        window = norms[max(0, i + 1 - (37 if i < 200 else 20)):i + 1]
        assert tracker.norms == list(window)
        assert tracker.median() == float(np.median(window))


def test_tracker_resize_keeps_the_newest() -> None:
    tracker = NormTracker(size=5, warmup=1, norms=[1, 2, 3, 4, 5])
    tracker.resize(size=2, warmup=2)
    assert tracker.norms == [4.0, 5.0] and tracker.median() == 4.5
    tracker.resize(size=10, warmup=3)
    assert tracker.median() is None and len(tracker) == 2


def test_tracker_median_of_zeros_is_no_median() -> None:
    assert NormTracker(size=3, warmup=1, norms=[0.0, 0.0, 1.0]).median() is None


@pytest.mark.parametrize("norm", [-1.0, math.nan, math.inf])
def test_tracker_refuses_a_bad_norm(norm: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        NormTracker(size=3, warmup=1).add(norm)


@pytest.mark.parametrize(("size", "warmup"), [(3, 4), (0, 0), (5, 0)])
def test_tracker_refuses_bad_bounds(size: int, warmup: int) -> None:
    with pytest.raises(ValueError, match="warmup"):
        NormTracker(size=size, warmup=warmup)


# ---------------------------------------------------------------- the screen


def vector(norm: float) -> dict[str, np.ndarray]:
    return {"body": np.array([0.6 * norm, 0.8 * norm], np.float32)}


def screen(**kw: object) -> NormScreen:
    args: dict[str, object] = {"clip_multiple": 2.0, "reject_multiple": 10.0,
                               "norm_history": 5, "warmup": 3}
    args.update(kw)
    return NormScreen(**args)  # type: ignore[arg-type]


def admit_all(s: NormScreen, norms: list[float]) -> None:
    for norm in norms:
        s.admit(s.check(vector(norm)))


def test_screen_passes_everything_while_warming_up() -> None:
    s = screen()
    verdict = s.check(vector(1000.0))
    assert verdict.scale == 1.0 and verdict.median is None and verdict.bound is None
    s.admit(verdict)
    assert s.tracker.norms == [pytest.approx(1000.0)]


def test_screen_clips_to_a_multiple_of_the_median() -> None:
    s = screen()
    admit_all(s, [1.0, 2.0, 3.0])
    verdict = s.check(vector(8.0))
    assert verdict.median == pytest.approx(2.0) and verdict.bound == pytest.approx(4.0)
    assert verdict.scale == pytest.approx(0.5) and verdict.clipped
    assert s.check(vector(3.9)).scale == 1.0


def test_screen_rejects_far_outliers_and_keeps_every_norm() -> None:
    s = screen(norm_history=10)
    admit_all(s, [1.0, 2.0, 3.0])
    with pytest.raises(Outlier) as raised:
        s.check(vector(20.5))
    assert raised.value.reason == NORM_OUTLIER == "norm-outlier"
    assert raised.value.limit == pytest.approx(20.0) and "20.5" in str(raised.value)
    assert s.tracker.norms == pytest.approx([1.0, 2.0, 3.0, 20.5])  # the rejected one too
    s.admit(s.check(vector(19.0)))  # inside the limit: clipped, and its raw norm counts
    assert s.tracker.norms[-1] == pytest.approx(19.0)
    assert s.measurements() == {"checked": 5, "clipped": 1, "rejected": 1, "history": 5,
                                "median_norm": pytest.approx(3.0),
                                "clip_bound": pytest.approx(6.0)}


def test_a_fleet_whose_norms_all_grew_is_accepted_again_after_half_the_history() -> None:
    """Rejected norms join the history: a shift of the whole fleet cannot lock it out."""
    s = screen(norm_history=10, warmup=3)
    admit_all(s, [1.0] * 10)
    outcomes = []
    for _ in range(12):
        try:
            s.admit(s.check(vector(50.0)))
            outcomes.append("accepted")
        except Outlier:
            outcomes.append("rejected")
    assert outcomes == ["rejected"] * 5 + ["accepted"] * 7


MODEL = {"body": np.array([3.0, 4.0], np.float32), "head": np.array([12.0], np.float32)}


def test_while_warming_up_no_update_may_outgrow_the_model() -> None:
    s = screen()
    with pytest.raises(Outlier, match="the model's own norm, while 0 of 3"):
        s.check(vector(5.5), model=MODEL)  # the body's own norm is 5: same parts only
    assert s.check(vector(4.5), model=MODEL).scale == 1.0
    assert s.check({**vector(4.0), "head": np.array([9.0])}, model=MODEL).scale == 1.0
    clip_only = screen(reject_multiple=None)
    verdict = clip_only.check(vector(10.0), model=MODEL)
    assert verdict.bound == pytest.approx(5.0) and verdict.scale == pytest.approx(0.5)
    neither = screen(reject_multiple=None, clip_multiple=None)
    assert neither.check(vector(1e6), model=MODEL).scale == 1.0
    zero = {"body": np.zeros(2, np.float32)}
    assert s.check(vector(1e6), model=zero).scale == 1.0  # norm 0: no bound
    admit_all(s, [1.0, 1.0, 1.0])
    verdict = s.check(vector(4.5), model=MODEL)  # warm: the median rules, not the model
    assert verdict.median == pytest.approx(1.0) and verdict.bound == pytest.approx(2.0)


def test_an_absolute_clip_norm_holds_from_the_first_update_and_the_smaller_bound_wins() -> None:
    s = screen(clip_norm=3.0)
    assert s.check(vector(6.0)).scale == pytest.approx(0.5)  # warming up: clip_norm only
    admit_all(s, [1.0, 1.0, 1.0])
    assert s.check(vector(6.0)).bound == pytest.approx(2.0)  # 2 x median 1 < 3
    s = screen(clip_norm=1.5)
    admit_all(s, [1.0, 1.0, 1.0])
    assert s.check(vector(6.0)).bound == pytest.approx(1.5)


def test_a_screen_without_bounds_only_measures() -> None:
    s = NormScreen(norm_history=3, warmup=1)
    admit_all(s, [1.0, 1e9, 1e-9])
    assert s.rejected == s.clipped == 0 and len(s.tracker) == 3


@pytest.mark.parametrize("kw", [{"clip_norm": 0.0}, {"clip_multiple": -1.0},
                                {"reject_multiple": math.nan}])
def test_screen_refuses_bad_bounds(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        screen(**kw)


def test_a_restarted_screen_on_the_recent_norms_judges_like_the_running_one() -> None:
    """What HubCore does on start: a screen built from the last N accepted norms."""
    rng = np.random.default_rng(3)
    running = screen(norm_history=20, warmup=5)
    norms = list(rng.lognormal(0, 0.5, 40))
    admit_all(running, norms)
    restarted = screen(norm_history=20, warmup=5, norms=running.tracker.norms)
    for norm in [0.5, 1.0, 3.0, 9.0, 40.0]:
        outcomes = []
        for s in (running, restarted):
            try:
                outcomes.append(s.check(vector(norm)))
            except Outlier as exc:
                outcomes.append(exc.reason)
        assert outcomes[0] == outcomes[1]


def test_screen_from_config_and_reconfigure_keep_the_history() -> None:
    s = NormScreen.from_config(RobustConfig(), norms=[1.0] * 50)
    assert (s.clip_multiple, s.reject_multiple, s.tracker.size) == (3.0, 10.0, 100)
    s.configure(RobustConfig(clip_multiple=None, reject_multiple=None, norm_history=10,
                             warmup=10))
    assert s.bound(1.0) is None and s.tracker.norms == [1.0] * 10


# ---------------------------------------------------------------- trimmed mean and median


def test_trimmed_mean_and_median_by_hand() -> None:
    rows = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0]])
    np.testing.assert_array_equal(trimmed_mean(rows, 0.25), [2.5, 15.0])
    np.testing.assert_array_equal(trimmed_mean(rows, 0.0), rows.mean(axis=0))
    np.testing.assert_array_equal(coordinate_median(rows), [2.5, 15.0])
    np.testing.assert_array_equal(coordinate_median(rows[:3]), [2.0, 10.0])
    np.testing.assert_array_equal(trimmed_mean(rows[:3], 0.4), [2.0, 10.0])  # cut 1 of 3


@pytest.mark.parametrize(("n", "trim", "cut"), [(10, 0.1, 1), (10, 0.2, 2), (10, 0.19, 1),
                                                 (100, 0.29, 29), (3, 0.49, 1), (1, 0.49, 0),
                                                 (7, 0.0, 0)])
def test_trimmed_count_rounds_down(n: int, trim: float, cut: int) -> None:
    assert trimmed_count(n, trim) == cut


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7])
def test_trimmed_mean_refuses_a_bad_trim(trim: float) -> None:
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(trim)


def test_rules_refuse_no_rows() -> None:
    with pytest.raises(ValueError, match="1 update"):
        coordinate_median(np.zeros((0, 3)))


@pytest.mark.parametrize("rule", [lambda r: coordinate_median(r), lambda r: trimmed_mean(r, 0.2)])
def test_rules_do_not_depend_on_the_order_of_updates(rule: object) -> None:
    rows = np.random.default_rng(4).normal(size=(7, 50))
    want = rule(rows)  # type: ignore[operator]
    for order in itertools.islice(itertools.permutations(range(7)), 0, 5040, 97):
        np.testing.assert_allclose(rule(rows[list(order)]), want, rtol=0, atol=1e-15)  # type: ignore[operator]


@pytest.mark.parametrize("reducer", [Median, lambda: TrimmedMean(0.2)])
def test_a_buffer_of_a_robust_rule_does_not_depend_on_arrival_order(reducer: object) -> None:
    rng = np.random.default_rng(5)
    updates = [(random_delta(rng), int(rng.integers(10, 50)), int(rng.integers(0, 3)))
               for _ in range(6)]
    results = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 4, 0, 5, 1, 3]):
        buf = buffer(reducer())  # type: ignore[operator]
        for i in order:
            delta, samples, staleness = updates[i]
            buf.fold(delta, num_samples=samples, staleness=staleness)
        results.append(buf.flush().delta)
    for other in results[1:]:
        for name in SIZES:
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-6, atol=1e-7)


def test_trim_zero_equals_the_mean_when_sample_counts_are_equal() -> None:
    rng = np.random.default_rng(6)
    trimmed, mean = buffer(TrimmedMean(0.0)), buffer(Mean())
    for i in range(5):
        delta = random_delta(rng)
        for buf in (trimmed, mean):
            buf.fold(delta, num_samples=30, staleness=i % 3, scale=1.0 if i else 0.25)
    got, want = trimmed.flush(), mean.flush()
    for name in SIZES:
        np.testing.assert_allclose(got.delta[name], want.delta[name], rtol=1e-5, atol=1e-7)


def test_robust_rules_stay_within_the_honest_values_and_the_mean_does_not() -> None:
    rng = np.random.default_rng(7)
    honest = [random_delta(rng, 0.1) for _ in range(9)]
    attacker = {name: 100 * values for name, values in honest[0].items()}
    low = np.min([d["body"] for d in honest], axis=0)
    high = np.max([d["body"] for d in honest], axis=0)
    for reducer, robust in ((Median(), True), (TrimmedMean(0.2), True), (Mean(), False)):
        buf = buffer(reducer, buffer_size=10)
        for delta in [*honest, attacker]:
            buf.fold(delta, num_samples=20, staleness=0)
        body = buf.flush().delta["body"]
        inside = (body >= low) & (body <= high)
        assert inside.all() if robust else inside.mean() < 0.5


@pytest.mark.parametrize("reducer", [Median, lambda: TrimmedMean(0.25), Mean])
@pytest.mark.parametrize("codec", ["topk:0.05+q:4+zstd", "topk:3", "q:8"])
def test_the_sparse_path_of_a_rule_equals_the_dense_path(reducer: object, codec: str) -> None:
    rng = np.random.default_rng(8)
    by_parts, by_vectors = buffer(reducer()), buffer(reducer())  # type: ignore[operator]
    for i in range(5):
        parts = decoded_parts(codec, random_delta(rng), seed=i)
        by_parts.fold(parts, num_samples=10 + i, staleness=i % 2, scale=0.5)
        by_vectors.fold({n: p.dense() for n, p in parts.items()}, num_samples=10 + i,
                        staleness=i % 2, scale=0.5)
    got, want = by_parts.flush(), by_vectors.flush()
    for name in SIZES:
        np.testing.assert_allclose(got.delta[name], want.delta[name], rtol=1e-6, atol=1e-9)


def test_scale_multiplies_the_values_not_the_weight() -> None:
    rng = np.random.default_rng(9)
    a, b = random_delta(rng), random_delta(rng)
    buf = buffer()
    buf.fold(a, num_samples=10, staleness=0, scale=0.5)
    assert buf.fold(b, num_samples=30, staleness=0) == 30
    flushed = buf.flush()
    for name in SIZES:
        np.testing.assert_allclose(flushed.delta[name], (10 * 0.5 * a[name] + 30 * b[name]) / 40,
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="scale"):
        buf.fold(a, num_samples=1, staleness=0, scale=0.0)


def test_a_rule_works_per_part_over_the_updates_that_sent_it() -> None:
    """A strategy may share only the body (fedper): the head is ruled over the others."""
    buf = buffer(Median())
    buf.fold({"body": np.full(3, 1.0), "head": np.full(2, 5.0)}, num_samples=1, staleness=0)
    buf.fold({"body": np.full(3, 2.0)}, num_samples=1, staleness=0)
    buf.fold({"body": np.full(3, 9.0), "head": np.full(2, 7.0)}, num_samples=1, staleness=0)
    delta = buf.flush().delta
    np.testing.assert_array_equal(delta["body"], 2.0)
    np.testing.assert_array_equal(delta["head"], 6.0)


def test_a_flush_in_column_blocks_equals_one_in_a_single_block() -> None:
    class SmallBlocks(Median):
        BLOCK = 7

    rng = np.random.default_rng(10)
    whole, blocks = buffer(Median()), buffer(SmallBlocks())
    for _ in range(4):
        delta = random_delta(rng)
        whole.fold(delta, num_samples=1, staleness=0)
        blocks.fold(delta, num_samples=1, staleness=0)
    for name, values in whole.flush().delta.items():
        np.testing.assert_array_equal(blocks.flush().delta[name] if name == "body" else values,
                                      values)


def test_memory_rows_for_robust_rules_and_sums_for_the_mean() -> None:
    rng = np.random.default_rng(11)
    size = sum(SIZES.values())
    rows, sums = buffer(TrimmedMean(0.1)), buffer(Mean())
    for n in range(1, 6):
        delta = random_delta(rng)
        rows.fold(delta, num_samples=1, staleness=0)
        sums.fold(delta, num_samples=1, staleness=0)
        assert rows.reducer.nbytes == n * size * 4
        assert sums.reducer.nbytes == size * 8
    assert rows.reducer.keeps_updates and not sums.reducer.keeps_updates
    rows.flush()
    assert rows.reducer.nbytes == 0


def test_a_robust_buffer_does_not_keep_a_reference_to_the_delta() -> None:
    delta = {"body": np.ones(4, np.float32)}
    buf = buffer(Median())
    buf.fold(delta, num_samples=2, staleness=0)
    delta["body"][:] = 100.0
    np.testing.assert_array_equal(buf.flush().delta["body"], 1.0)


def test_reducer_for_config() -> None:
    assert type(reducer_for(None)) is Mean
    assert type(reducer_for(RobustConfig())) is Mean
    assert type(reducer_for(RobustConfig(rule="median"))) is Median
    trimmed = reducer_for(RobustConfig(rule="trimmed_mean", trim=0.3))
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim == 0.3


@pytest.mark.parametrize(("kw", "message"), [
    ({"trim": 0.5}, "below 0.5"), ({"warmup": 20, "norm_history": 10}, "warmup"),
    ({"clip_multiple": 5.0, "reject_multiple": 4.0}, "reject_multiple")])
def test_config_refuses_inconsistent_settings(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RobustConfig(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the ledger keeps the norms


def test_the_ledger_keeps_norms_and_scales_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    for seq in range(6):
        ledger.accept("d", seq, version=1, staleness=0, num_samples=1, payload=b"x",
                      norm=float(seq), scale=1.0 if seq % 2 else 0.5)
    ledger.reject("d", 6, NORM_OUTLIER, norm=60.0)
    ledger.reject("d", 8, "future-base")  # not screened: no norm
    ledger.folded_into(1)  # payloads are dropped, norms stay
    ledger.accept("d", 7, version=2, staleness=0, num_samples=1, payload=b"y", norm=7.0,
                  scale=0.25)
    ledger.close()
    again = Ledger(path)
    assert again.recent_norms(4) == [4.0, 5.0, 60.0, 7.0]
    assert again.recent_norms(100) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 60.0, 7.0]
    [row] = again.buffered()
    assert (row.seq, row.norm, row.scale) == (7, 7.0, 0.25)


def test_a_ledger_made_before_the_norm_columns_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE updates (device TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
            reason TEXT, received REAL NOT NULL, version INTEGER, staleness INTEGER,
            num_samples INTEGER, payload BLOB, PRIMARY KEY (device, seq)) WITHOUT ROWID;
        INSERT INTO updates VALUES ('d', 1, 'buffered', NULL, 1.0, 1, 0, 5, x'00');
        """)
    db.close()
    ledger = Ledger(path)
    [row] = ledger.buffered()
    assert (row.norm, row.scale) == (None, 1.0)
    assert ledger.recent_norms(10) == []
    ledger.accept("d", 2, version=1, staleness=0, num_samples=1, payload=b"x", norm=2.5)
    assert ledger.recent_norms(10) == [2.5]
