"""Local learning on LiteRT: the shared model's round and the personal model.

A *strategy* decides which weight parts the fleet shares and which stay on
the device, and how each is trained. Every strategy is honest about what
leaves the device: a round's update carries exactly `strategy.shared`
(nothing at all for ``local``), and the personal parts (`strategy.personal`)
never appear in it. The model a device runs is the current global version
with its personal parts laid over it.

=========  ===========  ============  =========================================
name       sends        keeps         training
=========  ===========  ============  =========================================
fedavg     body, head   nothing       global model only (the baseline)
local      nothing      body, head    own full model from the initial weights
fedper     body         head          body + personal head jointly; body delta
finetune   body, head   head          FedAvg, then the personal head fine-tuned
                                      on the current global body
fedrep     body         head          head on the global body first, then the
                                      body with that head frozen; body delta
ditto      body, head   body, head    FedAvg, plus a personal model pulled
                                      towards the global one (Li et al. 2021)
=========  ===========  ============  =========================================

Features are standardized with this device's own statistics (worth about 2
points on HAPT, DESIGN.md), kept with the personal state.

Measured on HAPT (`scripts/bench-personalization`: 30 people, 3 seeds, 300
versions of K=10, epochs 2, learning rate 0.2, head epochs 1): ``finetune``
has the best mean accuracy on the natural and the label-skewed fleet and is
the default. Ditto's λ (``--ditto-lam`` 0, 0.01, 0.1, 1): 0.01 was best on the
label-skewed fleet and for the worst person on both; on the natural fleet 0.1
was 0.1 point ahead, within the seeds' spread; λ = 0 is local-only.

One Learner owns one TrainableModel; the agent serializes access to it. The
Learner sets every part before it trains or predicts, so it never depends on
what the interpreter held before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedd.config import TrainingConfig
from fedd.model import NonFiniteWeights, TrainableModel, all_finite
from fedd.wire import GlobalModel

__all__ = ["BODY", "HEAD", "STRATEGIES", "Ditto", "FedAvg", "FedPer", "FedRep", "FineTune",
           "Learner", "LocalOnly", "RoundResult", "Scores", "Strategy", "make_strategy"]

log = logging.getLogger(__name__)

BODY = "body"
HEAD = "head"
Step = Callable[[np.ndarray, np.ndarray, float], float]
Parts = dict[str, np.ndarray]
SCALER_KEYS = ("feature_mean", "feature_scale")


class Diverged(RuntimeError):
    """Local training went non-finite (too high a learning rate, or a wrecked global
    model): the round is discarded and the personal parts are as before it."""


@dataclass(frozen=True)
class RoundResult:
    """One local round. `delta` holds exactly the parts that leave the device
    (empty when the strategy shares nothing: then there is nothing to send)."""

    delta: dict[str, np.ndarray]
    base_version: int
    num_samples: int
    loss_before: float
    loss_after: float


@dataclass(frozen=True)
class Scores:
    version: int
    windows: int
    global_accuracy: float
    personal_accuracy: float


# ---------------------------------------------------------------- strategies


class Strategy:
    """Which parts are shared and which stay personal, and how each trains.

    Hooks: `round` (the local round: returns the trained shared parts, which
    the Learner turns into the update's delta) and `personalize` (refresh the
    personal parts on the current global version). Variants override one hook
    and call `super()`.
    """

    name: ClassVar[str]
    shared: ClassVar[tuple[str, ...]] = (BODY, HEAD)
    personal: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, float]:
        """The strategy's own hyperparameters (for reports)."""
        return {}

    def round(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> tuple[Parts, float, float]:
        """Train the shared model from the global version: (trained parts, loss before, after)."""
        learner.load(learner.global_parts())
        before, after = learner.fit(learner.model.train_step, x, y, learner.training.epochs)
        return {name: learner.model.get_part(name) for name in self.shared}, before, after

    def personalize(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> None:
        """Refresh the personal parts on the current global version (default: none)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class FedAvg(Strategy):
    """Global-only baseline: the shared model is the whole model, used as is."""

    name = "fedavg"


class LocalOnly(Strategy):
    """No federation: the device trains its own full model and sends nothing."""

    name = "local"
    shared = ()
    personal = (BODY, HEAD)

    def round(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> tuple[Parts, float, float]:
        learner.load(learner.personal_parts())
        before, after = learner.fit(learner.model.train_step, x, y, learner.training.epochs)
        learner.personal.update(learner.model.get_parts())
        return {}, before, after


class FedPer(Strategy):
    """FedPer (Arivazhagan et al. 2019): body shared, head personal, trained jointly."""

    name = "fedper"
    shared = (BODY,)
    personal = (HEAD,)

    def round(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> tuple[Parts, float, float]:
        learner.load(learner.personal_parts())
        before, after = learner.fit(learner.model.train_step, x, y, learner.training.epochs)
        trained = learner.model.get_parts()
        learner.personal[HEAD] = trained[HEAD]
        return {BODY: trained[BODY]}, before, after


class FineTune(FedAvg):
    """FedAvg on body + global head, plus a personal head fine-tuned on the global body."""

    name = "finetune"
    personal = (HEAD,)

    def personalize(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> None:
        learner.train_personal_head(x, y)


class FedRep(Strategy):
    """FedRep (Collins et al. 2021): the personal head first, then the shared body
    with that head frozen; only the body is sent.

    The model has no body-only train signature, so the body step is a full
    `train` step with the head put back afterwards: exactly an SGD step on the
    body alone (both gradients come from the same forward pass).
    """

    name = "fedrep"
    shared = (BODY,)
    personal = (HEAD,)

    def round(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> tuple[Parts, float, float]:
        learner.train_personal_head(x, y)
        learner.load(learner.personal_parts())
        head = learner.personal[HEAD]
        model = learner.model

        def body_step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
            loss = model.train_step(xb, yb, lr)
            model.set_part(HEAD, head)
            return loss

        before, after = learner.fit(body_step, x, y, learner.training.epochs)
        return {BODY: model.get_part(BODY)}, before, after

    def personalize(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> None:
        learner.train_personal_head(x, y)


class Ditto(FedAvg):
    """Ditto (Li et al. 2021): FedAvg for the global model, plus a full personal
    model trained on min F_k(v) + λ/2 ‖v - w_global‖².

    Each SGD step on F_k is followed by the exact proximal step towards the
    current global weights, v ← (v + ηλ w) / (1 + ηλ), so any λ ≥ 0 is stable.
    `personal_epochs` is the personal budget per call (None: the config's
    head epochs).
    """

    name = "ditto"
    personal = (BODY, HEAD)

    def __init__(self, *, lam: float = 0.01, personal_epochs: int | None = None) -> None:
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"Ditto's lam must be a finite number >= 0, got {lam}")
        if personal_epochs is not None and personal_epochs < 0:
            raise ValueError(f"personal_epochs must be >= 0, got {personal_epochs}")
        self.lam = float(lam)
        self.personal_epochs = personal_epochs

    def params(self) -> dict[str, float]:
        out: dict[str, float] = {"lam": self.lam}
        if self.personal_epochs is not None:
            out["personal_epochs"] = self.personal_epochs
        return out

    def personalize(self, learner: Learner, x: np.ndarray, y: np.ndarray) -> None:
        epochs = (learner.training.head_epochs if self.personal_epochs is None
                  else self.personal_epochs)
        if not epochs or not len(x):
            return
        anchor = learner.global_parts()
        learner.load(learner.personal_parts())
        model = learner.model
        lam = self.lam

        def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
            loss = model.train_step(xb, yb, lr)
            if lam:
                shrink = lr * lam
                model.set_parts({name: (v + shrink * anchor[name]) / (1.0 + shrink)
                                 for name, v in model.get_parts().items()})
            return loss

        learner.fit(step, x, y, epochs)
        learner.personal.update(model.get_parts())


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, LocalOnly, FedPer, FineTune, FedRep, Ditto)}


def make_strategy(name: str, **params: float) -> Strategy:
    """A strategy by name, with its own hyperparameters (e.g. ``ditto``, ``lam=0.1``)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r} does not take {sorted(params)}: {exc}") from None


# ---------------------------------------------------------------- learner


class Learner:
    def __init__(self, model: TrainableModel, training: TrainingConfig, *,
                 strategy: str | Strategy = "finetune", seed: int = 0) -> None:
        self.model = model
        self.training = training
        self.strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.stop_check: Callable[[], str | None] | None = None
        unknown = set(self.strategy.shared + self.strategy.personal) - set(model.parts)
        if unknown:
            raise ValueError(f"strategy {self.strategy.name!r} needs parts {sorted(unknown)} "
                             f"that model {model.spec.name!r} lacks")
        self.batch = model.spec.train_batch
        self.learning_rate = (model.spec.learning_rate if training.learning_rate is None
                              else training.learning_rate)
        self.rng = np.random.default_rng(seed)
        self.global_model: GlobalModel | None = None
        self.personal: Parts = {}
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def version(self) -> int | None:
        return None if self.global_model is None else self.global_model.version

    @property
    def personal_head(self) -> np.ndarray | None:
        return self.personal.get(HEAD)

    # -- personal state --------------------------------------------------------
    def personal_state(self) -> dict[str, np.ndarray]:
        """What makes this device's model its own, to store between runs:
        ``personal_<part>`` for each personal part, ``feature_mean``, ``feature_scale``."""
        state = {f"personal_{name}": values for name, values in self.personal.items()}
        if self.mean is not None and self.scale is not None:
            state.update(feature_mean=self.mean, feature_scale=self.scale)
        return state

    def state_keys(self) -> tuple[str, ...]:
        """Every key `personal_state` may hold for this model, whatever the strategy."""
        return (*(f"personal_{name}" for name in self.model.parts), *SCALER_KEYS)

    def restore_state(self, state: Mapping[str, np.ndarray | None]) -> None:
        """Personal state saved by an earlier run (`personal_state`); missing keys or None
        values mean none. Parts this strategy does not keep, or of the wrong size (another
        model), are dropped with a log line rather than trusted."""
        self.personal = {}
        for name in self.strategy.personal:
            values = state.get(f"personal_{name}")
            if values is None:
                continue
            values = np.asarray(values, dtype=np.float32).reshape(-1)
            if values.size != self.model.parts[name] or not np.isfinite(values).all():
                log.warning("dropped the stored personal %s: %d values, the model needs %d",
                            name, values.size, self.model.parts[name])
                continue
            self.personal[name] = values
        # One statistic per feature, or per channel of a raw window (see fit_scaler).
        mean, scale = state.get("feature_mean"), state.get("feature_scale")
        width = self.model.spec.input_shape[-1]
        if mean is not None and scale is not None and np.size(mean) == np.size(scale) == width:
            self.mean = np.asarray(mean, dtype=np.float32).reshape(width)
            self.scale = np.asarray(scale, dtype=np.float32).reshape(width)
        else:
            self.mean = self.scale = None

    def restore(self, personal_head: np.ndarray | None, mean: np.ndarray | None,
                scale: np.ndarray | None) -> None:
        """Deprecated: `restore_state` also restores a personal body."""
        self.restore_state({"personal_head": personal_head, "feature_mean": mean,
                            "feature_scale": scale})

    # -- global versions -------------------------------------------------------
    def apply_global(self, model: GlobalModel) -> None:
        """Take a new global version; personal parts are kept, and the first version
        seeds the ones this device does not have yet."""
        self.global_model = model
        for name in self.strategy.personal:
            if name not in self.personal:
                self.personal[name] = np.array(model.parts[name], dtype=np.float32)

    def global_parts(self) -> Parts:
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        return dict(self.global_model.parts)

    def personal_parts(self) -> Parts:
        """The model this device runs: the global version with its personal parts over it."""
        return {**self.global_parts(), **self.personal}

    def load(self, parts: Parts) -> None:
        self.model.set_parts(parts)

    # -- features --------------------------------------------------------------
    def fit_scaler(self, features: np.ndarray) -> None:
        """Per-device standardization statistics from the stored windows: per feature,
        or per channel for raw windows (every time step of a channel shares them)."""
        flat = features.reshape(-1, features.shape[-1])
        self.mean = flat.mean(axis=0)
        self.scale = np.maximum(flat.std(axis=0), 1e-6)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """Model inputs from features, with this device's statistics (`fit_scaler`)."""
        if self.mean is None or self.scale is None:
            raise RuntimeError("no feature statistics yet: fit_scaler first")
        return ((features - self.mean) / self.scale).astype(np.float32)

    # -- training --------------------------------------------------------------
    def _batches(self, n: int, epochs: int) -> list[np.ndarray]:
        """Shuffled full batches; the last one is topped up at random."""
        steps = max(1, -(-n // self.batch))
        out = []
        for _ in range(epochs):
            order = self.rng.permutation(n)
            padded = np.concatenate([order, self.rng.integers(0, n, steps * self.batch - n)])
            out.extend(padded.reshape(steps, self.batch))
        return out

    def fit(self, step: Step, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[float, float]:
        """Run `step` over shuffled batches; mean loss of the first and of the last epoch.

        `stop_check` (the scheduler's mid-run check) is asked between batches; a
        reason ends the run early, and what was trained so far stands.
        """
        losses: list[float] = []
        for batch in self._batches(len(x), epochs):
            if self.stop_check is not None and self.stop_check() is not None:
                break
            losses.append(step(x[batch], y[batch], self.learning_rate))
        if not losses:
            return float("nan"), float("nan")
        per_epoch = max(1, min(len(losses), -(-len(x) // self.batch)))
        return float(np.mean(losses[:per_epoch])), float(np.mean(losses[-per_epoch:]))

    def train_personal_head(self, x: np.ndarray, y: np.ndarray) -> None:
        """`head_epochs` of head-only steps on the current global body (x standardized)."""
        if not self.training.head_epochs or not len(x):
            return
        self.load(self.personal_parts())
        self.fit(self.model.train_head_step, x, y, self.training.head_epochs)
        self.personal[HEAD] = self.model.get_part(HEAD)

    def local_round(self, features: np.ndarray, labels: np.ndarray) -> RoundResult:
        """One local round from the current global version. The result's delta holds
        exactly the strategy's shared parts: empty for ``local`` (send nothing)."""
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        base = self.global_model
        x = self.standardize(features)
        try:
            with self._personal_kept_if_non_finite():
                trained, before, after = self.strategy.round(self, x, labels)
                assert set(trained) == set(self.strategy.shared), (trained.keys(), self.strategy)
                delta = {name: trained[name] - base.parts[name] for name in self.strategy.shared}
                if not all_finite(delta):
                    raise NonFiniteWeights(f"loss {before:.3g} at the start, {after:.3g} at "
                                           "the end")
        except NonFiniteWeights as exc:
            raise Diverged(f"training on version {base.version} went non-finite: {exc}") from exc
        return RoundResult(delta, base.version, len(x), before, after)

    def personalize(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Refresh the personal parts on the current global version (a no-op for
        strategies whose personal parts only change in the round)."""
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        if not len(features):
            return
        try:
            with self._personal_kept_if_non_finite():
                self.strategy.personalize(self, self.standardize(features), labels)
        except NonFiniteWeights:
            log.warning("personalizing on version %s went non-finite: kept the personal "
                        "parts as they were", self.global_model.version)

    @contextlib.contextmanager
    def _personal_kept_if_non_finite(self) -> Iterator[None]:
        """Raise NonFiniteWeights, with the personal parts as before, when the block's
        training overflows (while setting weights, or in the parts it leaves)."""
        personal = dict(self.personal)
        try:
            yield
            if not all_finite(self.personal):
                raise NonFiniteWeights("the personal parts")
        except NonFiniteWeights:
            self.personal = personal
            raise

    # -- inference -------------------------------------------------------------
    def predict(self, features: np.ndarray) -> np.ndarray:
        """The personal model's classes for featurized windows."""
        self.load(self.personal_parts())
        return self.model.predict(self.standardize(features)).argmax(axis=1)

    def evaluate(self, features: np.ndarray, labels: np.ndarray) -> Scores:
        """Accuracy of the global model and of the personal model on windows."""
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        x = self.standardize(features)
        self.load(self.global_parts())
        global_acc = float((self.model.predict(x).argmax(axis=1) == labels).mean())
        personal_acc = float((self.predict(features) == labels).mean())
        return Scores(self.global_model.version, len(labels), global_acc, personal_acc)
