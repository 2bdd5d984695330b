"""Robust aggregation, pure numpy: bound each update's influence on the global model.

Two layers around FedBuff's weighted mean, each optional (config `robust:`):

* `NormScreen`, per update as it arrives. It takes the L2 norm of the
  update's whole shared vector, all parts together (a sparse part's norm is
  its sent values' norm: nothing is densified), and compares it with the
  median of the fleet's recent norms (`NormTracker`, the last N screened).
  An update above ``reject_multiple`` x that median is refused as
  ``norm-outlier``; one above the clip bound, the smaller of ``clip_norm``
  and ``clip_multiple`` x the median, is scaled down onto it (norm bounding,
  Sun et al. 2019). The median-relative rules wait until ``warmup`` norms
  are in (and the median is > 0); meanwhile an update may not outgrow the
  global model it is added to (see `NormScreen`). ``clip_norm`` holds from
  the first update.
  Every screened norm joins the history, rejected ones too (before
  clipping): with accepted ones alone, a fleet whose norms all grew (a
  damaged or a new model, drift) would be refused for ever, whereas this
  way the median follows it after about N/2 refusals; an attacker must send
  half the recent updates to move the median. The hub keeps each norm in
  the update's ledger row, so a restarted hub reads its history back
  (`Ledger.recent_norms`) and re-folds a buffered update with the clip
  scale it was accepted with.
* The buffer's rule, per flush (a `Reducer` of `fedd.hub.aggregate`):
  FedBuff's `Mean`, or the coordinate-wise `TrimmedMean` / `Median` (Yin et
  al. 2018) of the buffered updates, each damped by its staleness weight and
  its clip scale. These two ignore sample counts (a claimed count is the
  device's word as much as its update is) and keep every buffered update as
  a float32 row: n x d x 4 bytes for n buffered updates of d values (K = 10
  updates of har-mlp's 8,486 values: 340 KB; of a 1 M-value model: 40 MB),
  plus about n x 64 Ki x 16 bytes of working blocks while a flush goes
  through the columns. `Mean` keeps d float64 sums whatever n is.

A trimmed mean with trim 0 equals the mean when every update has the same
sample count; the median and the trimmed mean do not depend on the order the
updates arrived in.

The shipped defaults (clip at 3 x the median, reject above 10 x, the mean)
come from scripts/bench-robust: on HAPT they cost nothing measurable on a
clean fleet and keep 10 % of x100 or sign-flipped devices within a point,
where the coordinate-wise rules cost 1-2.5 points on the clean, non-IID
fleet. Not covered here: a device that claims a huge sample count still
weighs more in the mean (only the coordinate-wise rules ignore the count);
differential privacy needs the absolute `clip_norm` (a median of the
devices' norms is itself data about them).
"""

from __future__ import annotations

import bisect
import math
from abc import abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedd.hub.aggregate import Addable, Mean, Reducer, is_addable

if TYPE_CHECKING:
    from fedd.config import RobustConfig

__all__ = ["NORM_OUTLIER", "CoordinateWise", "Median", "NormScreen", "NormTracker", "Outlier",
           "TrimmedMean", "Verdict", "clip_scale", "coordinate_median", "reducer_for",
           "trimmed_count", "trimmed_mean", "update_norm"]

NORM_OUTLIER = "norm-outlier"  # the rejection's reason code, counted and acknowledged


# ---------------------------------------------------------------- norms and clipping


def update_norm(delta: Mapping[str, np.ndarray | Addable]) -> float:
    """L2 norm of an update's whole vector, all parts together, summed in float64.

    An `Addable` part contributes its `values` (a sparse part's sent entries),
    so a sparse update is never densified for it.
    """
    total = 0.0
    for part in delta.values():
        values = part.values if is_addable(part) else np.asarray(part)  # type: ignore[union-attr]
        values = values.reshape(-1)
        total += float(np.einsum("i,i->", values, values, dtype=np.float64))
    return math.sqrt(total)


def clip_scale(norm: float, bound: float | None) -> float:
    """The factor that brings a vector of `norm` within `bound`: 1 when it is inside."""
    if bound is None or norm <= bound:
        return 1.0
    if bound <= 0:
        raise ValueError(f"a clip bound must be > 0, got {bound}")
    return bound / norm


def _check_norm(norm: float) -> float:
    norm = float(norm)
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"a norm is finite and >= 0, got {norm}")
    return norm


class NormTracker:
    """The last `size` norms, and their median once `warmup` of them are in."""

    def __init__(self, *, size: int, warmup: int, norms: Iterable[float] = ()) -> None:
        self._norms: deque[float] = deque(maxlen=1)  # in arrival order
        self._sorted: list[float] = []  # the same, sorted: the median in O(1)
        self.resize(size=size, warmup=warmup)
        for norm in norms:
            self.add(norm)

    def resize(self, *, size: int, warmup: int) -> None:
        """New bounds; the most recent norms stay."""
        if not 1 <= warmup <= size:
            raise ValueError(f"need 1 <= warmup ({warmup}) <= size ({size})")
        self._norms = deque(self._norms, maxlen=size)
        self._sorted = sorted(self._norms)
        self.size, self.warmup = size, warmup

    def add(self, norm: float) -> None:
        norm = _check_norm(norm)
        if len(self._norms) == self.size:  # the oldest leaves
            del self._sorted[bisect.bisect_left(self._sorted, self._norms[0])]
        self._norms.append(norm)
        bisect.insort(self._sorted, norm)

    def __len__(self) -> int:
        return len(self._norms)

    @property
    def norms(self) -> list[float]:
        """Oldest first."""
        return list(self._norms)

    def median(self) -> float | None:
        """The median of the history, or None while warming up (or if it is 0)."""
        n = len(self._sorted)
        if n < self.warmup:
            return None
        middle = self._sorted[n // 2]
        median = middle if n % 2 else (self._sorted[n // 2 - 1] + middle) / 2
        return median if median > 0 else None


@dataclass(frozen=True)
class Verdict:
    """An update the screen lets through: its norm and the clip scale to fold it with."""

    norm: float
    scale: float  # in (0, 1]; 1 = not clipped
    bound: float | None  # the clip bound in force, None if none
    median: float | None  # the history's median it was judged by

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0


class Outlier(Exception):
    """An update whose norm is far outside the fleet's recent ones; `reason` is counted."""

    reason = NORM_OUTLIER

    def __init__(self, norm: float, limit: float, why: str) -> None:
        super().__init__(f"norm {norm:.4g} > {limit:.4g} ({why})")
        self.norm, self.limit = norm, limit


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 or None, got {value}")
    return None if value is None else float(value)


class NormScreen:
    """Outlier rejection and clipping of whole updates against the recent norms.

    `check` judges one update: it raises `Outlier`, the norm joining the
    history at once, or returns the update's `Verdict`, whose norm joins
    the history when the caller `admit`s it (after recording it durably).

    While the history warms up there is no median to judge by, yet the
    first updates of a fleet are the ones that hurt most (bench-robust: one
    x100 update in the first version cost 45 points for good). Given the
    global `model` the update will be added to, the screen then holds every
    update to the model's own norm (over the same parts): no update may
    outgrow the model, refused above it when `reject_multiple` is set,
    clipped onto it when `clip_multiple` is. A model of norm 0 gives no
    such bound.
    """

    def __init__(self, *, clip_norm: float | None = None, clip_multiple: float | None = None,
                 reject_multiple: float | None = None, norm_history: int = 100,
                 warmup: int = 10, norms: Iterable[float] = ()) -> None:
        self.tracker = NormTracker(size=norm_history, warmup=warmup, norms=norms)
        self._bounds(clip_norm, clip_multiple, reject_multiple)
        self.checked = self.clipped = self.rejected = 0

    def _bounds(self, clip_norm: float | None, clip_multiple: float | None,
                reject_multiple: float | None) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.clip_multiple = _positive("clip_multiple", clip_multiple)
        self.reject_multiple = _positive("reject_multiple", reject_multiple)

    @classmethod
    def from_config(cls, config: RobustConfig, norms: Iterable[float] = ()) -> NormScreen:
        return cls(clip_norm=config.clip_norm, clip_multiple=config.clip_multiple,
                   reject_multiple=config.reject_multiple, norm_history=config.norm_history,
                   warmup=config.warmup, norms=norms)

    def configure(self, config: RobustConfig) -> None:
        """Apply a reloaded config; the history stays (its newest norms, if it shrinks)."""
        self.tracker.resize(size=config.norm_history, warmup=config.warmup)
        self._bounds(config.clip_norm, config.clip_multiple, config.reject_multiple)

    def bound(self, median: float | None) -> float | None:
        """The clip bound in force with the history's `median`, None if there is none."""
        bounds = [self.clip_norm]
        if median is not None and self.clip_multiple is not None:
            bounds.append(self.clip_multiple * median)
        return min((b for b in bounds if b is not None), default=None)

    def check(self, delta: Mapping[str, np.ndarray | Addable],
              model: Mapping[str, np.ndarray] | None = None) -> Verdict:
        """Judge one update (all its parts); raises `Outlier` if it is refused.

        `model` (the global weights the update will be added to) bounds the
        updates that come while the history warms up.
        """
        norm = update_norm(delta)
        if not math.isfinite(norm):
            raise ValueError("the update holds NaN or Inf (the hub's decoders refuse it)")
        self.checked += 1
        median = self.tracker.median()
        reject, bound = None, self.bound(median)
        if median is not None:
            if self.reject_multiple is not None:
                reject = self.reject_multiple * median
                why = f"{self.reject_multiple:g} x the median {median:.4g} of the recent norms"
        elif model is not None:
            own = update_norm({name: model[name] for name in delta if name in model})
            if own > 0:
                why = (f"the model's own norm, while {len(self.tracker)} of {self.tracker.warmup}"
                       " norms are in")
                reject = own if self.reject_multiple is not None else None
                if self.clip_multiple is not None:
                    bound = own if bound is None else min(bound, own)
        if reject is not None and norm > reject:
            self.rejected += 1
            self.tracker.add(norm)
            raise Outlier(norm, reject, why)
        return Verdict(norm, clip_scale(norm, bound), bound, median)

    def admit(self, verdict: Verdict) -> None:
        """The update of `verdict` was accepted: its norm joins the history."""
        self.tracker.add(verdict.norm)
        self.clipped += verdict.clipped

    def measurements(self) -> dict[str, object]:
        median = self.tracker.median()
        return {"checked": self.checked, "clipped": self.clipped, "rejected": self.rejected,
                "history": len(self.tracker), "median_norm": median,
                "clip_bound": self.bound(median)}


# ---------------------------------------------------------------- coordinate-wise rules


def trimmed_count(n: int, trim: float) -> int:
    """How many values a trimmed mean drops from each end of n: ⌊trim·n⌋."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    return math.floor(trim * n + 1e-9)  # 0.29 x 100 is 28.999...: still 29


def _rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or not rows.shape[0]:
        raise ValueError(f"need a 2-D (updates, values) array with >= 1 update, got "
                         f"shape {rows.shape}")
    return rows


def trimmed_mean(rows: np.ndarray, trim: float) -> np.ndarray:
    """Per column, the mean of the values left after dropping ⌊trim·n⌋ from each end.

    `rows` is (n updates, d values); the result is float64 of d.
    """
    rows = _rows(rows)
    n = rows.shape[0]
    cut = trimmed_count(n, trim)
    if cut:
        rows = np.partition(rows, sorted({cut, n - cut - 1}), axis=0)[cut:n - cut]
    return rows.mean(axis=0, dtype=np.float64)


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """Per column, the median of the n values (the mean of the middle two when n is even)."""
    return np.median(_rows(rows).astype(np.float64, copy=False), axis=0)


class CoordinateWise(Reducer):
    """A rule over each coordinate's values in the buffer: keeps every update as a row.

    Each row is the update times its coefficient (staleness damping x clip
    scale), float32; sample counts do not weigh in. A part is ruled over the
    updates that sent it (a strategy may share only some parts).
    """

    keeps_updates = True
    BLOCK = 1 << 16  # columns per step of a flush: bounds its working memory

    def __init__(self) -> None:
        self._rows: dict[str, list[np.ndarray]] = {}

    @abstractmethod
    def statistic(self, rows: np.ndarray) -> np.ndarray:
        """(n, b) → b values."""

    def add(self, delta: Mapping[str, np.ndarray | Addable], *, num_samples: int,
            coefficient: float) -> None:
        rows = {}
        for name, part in delta.items():
            if is_addable(part):
                row = np.zeros(part.length, np.float32)  # type: ignore[union-attr]
                part.add_to(row, coefficient)  # type: ignore[union-attr]
            else:
                row = np.multiply(np.asarray(part), coefficient, dtype=np.float32)
            rows[name] = row
        for name, row in rows.items():
            self._rows.setdefault(name, []).append(row)

    def result(self) -> dict[str, np.ndarray]:
        out = {}
        for name, rows in self._rows.items():
            values = np.empty(rows[0].size, np.float32)
            for start in range(0, values.size, self.BLOCK):
                block = np.stack([row[start:start + self.BLOCK] for row in rows])
                values[start:start + self.BLOCK] = self.statistic(block)
            out[name] = values
        return out

    def clear(self) -> None:
        self._rows = {}

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for rows in self._rows.values() for row in rows)


class TrimmedMean(CoordinateWise):
    """Coordinate-wise trimmed mean: ⌊trim·n⌋ values dropped from each end."""

    def __init__(self, trim: float) -> None:
        trimmed_count(1, trim)  # validates
        super().__init__()
        self.trim = trim

    def statistic(self, rows: np.ndarray) -> np.ndarray:
        return trimmed_mean(rows, self.trim)


class Median(CoordinateWise):
    """Coordinate-wise median."""

    def statistic(self, rows: np.ndarray) -> np.ndarray:
        return coordinate_median(rows)


def reducer_for(config: RobustConfig | None) -> Reducer:
    """The buffer's rule of a `robust:` config; None is the plain mean."""
    if config is None or config.rule == "mean":
        return Mean()
    if config.rule == "trimmed_mean":
        return TrimmedMean(config.trim)
    if config.rule == "median":
        return Median()
    raise ValueError(f"unknown rule {config.rule!r}")
