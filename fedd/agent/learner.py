"""Local learning on LiteRT: the shared model's round and the personal head.

Strategy (FedAvg with a personal head): the *shared* model (body and its
global classifier head) is what the fleet averages; each local round starts
from the current global version, trains on the device's windows and yields
the delta that goes to the hub. The *personal head* is a classifier of this
device's own, fine-tuned on top of the current global body; it never leaves
the device. Features are standardized with this device's own statistics
(worth about 2 points on HAPT, DESIGN.md), kept with the personal state.

One Learner owns one TrainableModel; the agent serializes access to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedd.config import TrainingConfig
from fedd.model import TrainableModel
from fedd.wire import GlobalModel

HEAD = "head"
Step = Callable[[np.ndarray, np.ndarray, float], float]


@dataclass(frozen=True)
class RoundResult:
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


class Learner:
    def __init__(self, model: TrainableModel, training: TrainingConfig, *, seed: int = 0) -> None:
        self.model = model
        self.training = training
        self.batch = model.spec.train_batch
        self.rng = np.random.default_rng(seed)
        self.global_model: GlobalModel | None = None
        self.personal_head: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def version(self) -> int | None:
        return None if self.global_model is None else self.global_model.version

    def restore(self, personal_head: np.ndarray | None, mean: np.ndarray | None,
                scale: np.ndarray | None) -> None:
        """Personal state saved by an earlier run (None when there is none)."""
        self.personal_head, self.mean, self.scale = personal_head, mean, scale

    def apply_global(self, model: GlobalModel) -> None:
        """Take a new global version; the personal head is kept."""
        self.global_model = model
        if self.personal_head is None:
            self.personal_head = model.parts[HEAD].copy()

    def fit_scaler(self, features: np.ndarray) -> None:
        """Per-device standardization statistics from the stored windows."""
        self.mean = features.mean(axis=0)
        self.scale = np.maximum(features.std(axis=0), 1e-6)

    def _standardize(self, features: np.ndarray) -> np.ndarray:
        if self.mean is None or self.scale is None:
            raise RuntimeError("no feature statistics yet: fit_scaler first")
        return ((features - self.mean) / self.scale).astype(np.float32)

    def _batches(self, n: int, epochs: int) -> list[np.ndarray]:
        """Shuffled full batches; the last one is topped up at random."""
        steps = max(1, -(-n // self.batch))
        out = []
        for _ in range(epochs):
            order = self.rng.permutation(n)
            padded = np.concatenate([order, self.rng.integers(0, n, steps * self.batch - n)])
            out.extend(padded.reshape(steps, self.batch))
        return out

    def _train(self, step: Step, x: np.ndarray, y: np.ndarray,
               epochs: int) -> tuple[float, float]:
        losses = [step(x[i], y[i], self.training.learning_rate)
                  for i in self._batches(len(x), epochs)]
        per_epoch = len(losses) // epochs
        return float(np.mean(losses[:per_epoch])), float(np.mean(losses[-per_epoch:]))

    def local_round(self, features: np.ndarray, labels: np.ndarray) -> RoundResult:
        """Train the shared model from the global version; return its delta."""
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        base = self.global_model
        x = self._standardize(features)
        self.model.set_parts(dict(base.parts))
        before, after = self._train(self.model.train_step, x, labels, self.training.epochs)
        trained = self.model.get_parts()
        delta = {name: trained[name] - base.parts[name] for name in trained}
        return RoundResult(delta, base.version, len(x), before, after)

    def personalize(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Fine-tune the personal head on top of the current global body."""
        if self.global_model is None or self.personal_head is None:
            raise RuntimeError("no global model yet")
        if not self.training.head_epochs or not len(features):
            return
        self._load_personal()
        self._train(self.model.train_head_step, self._standardize(features), labels,
                    self.training.head_epochs)
        self.personal_head = self.model.get_part(HEAD)

    def _load_personal(self) -> None:
        assert self.global_model is not None and self.personal_head is not None
        self.model.set_parts({**self.global_model.parts, HEAD: self.personal_head})

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The personal model's classes for featurized windows."""
        self._load_personal()
        return self.model.predict(self._standardize(features)).argmax(axis=1)

    def evaluate(self, features: np.ndarray, labels: np.ndarray) -> Scores:
        """Accuracy of the global model and of the personal model on windows."""
        if self.global_model is None:
            raise RuntimeError("no global model yet")
        x = self._standardize(features)
        self.model.set_parts(dict(self.global_model.parts))
        global_acc = float((self.model.predict(x).argmax(axis=1) == labels).mean())
        personal_acc = float((self.predict(features) == labels).mean())
        return Scores(self.global_model.version, len(labels), global_acc, personal_acc)
