"""The shipped trainable LiteRT models, as the agent and the hub use them.

A model file (built by ``scripts/build-model``) carries its own training step:
LiteRT signatures ``train``, ``train_head`` and ``infer``, plus flat access to
each weight *part* (``get_<part>`` / ``set_<part>``). The parts are what
federation moves: the shared ``body`` goes to the hub, the personal ``head``
stays on the device. Nothing here needs TensorFlow.

One :class:`TrainableModel` owns one interpreter and is not thread-safe.
Inputs are float32 arrays of the manifest's ``input_shape`` per row: 96
features for ``har-mlp``, a raw (128, 6) window for ``har-cnn``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - older devices with only tflite-runtime
    from tflite_runtime.interpreter import Interpreter

__all__ = ["ModelError", "ModelSpec", "NonFiniteWeights", "TrainableModel", "all_finite"]


class NonFiniteWeights(ValueError):
    """Weights to set hold NaN or inf (training diverged on the way)."""


def all_finite(parts: Mapping[str, np.ndarray]) -> bool:
    """Whether every value of every part is finite (no NaN, no inf)."""
    return all(np.isfinite(values).all() for values in parts.values())


class ModelError(Exception):
    """The model file or its manifest is missing, corrupt or not what the spec says."""


class DelegateRefused(ModelError):
    """An inference delegate loaded but cannot run this model."""


def _learning_rate(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"learning_rate must be a number > 0, got {value!r}")
    return number


@dataclass(frozen=True)
class ModelSpec:
    """What the manifest promises about one model file; checked when it is loaded."""

    name: str
    path: Path
    sha256: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_batch: int
    features: str
    parts: dict[str, int]
    # What training.learning_rate means when it is not set: the best measured for this
    # model (scripts/build-model); manifests from before it carried one get 0.2.
    learning_rate: float = 0.2

    @classmethod
    def from_manifest(cls, manifest_path: str | Path, name: str) -> ModelSpec:
        """Read model ``name`` from a manifest; a relative ``file`` is beside the manifest."""
        manifest_path = Path(manifest_path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read model manifest {manifest_path}: {exc}") from exc
        models = manifest.get("models") if isinstance(manifest, dict) else None
        if not isinstance(models, dict):
            raise ModelError(f"{manifest_path}: no 'models' table")
        if name not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ModelError(f"{manifest_path}: no model {name!r} (has: {known})")
        entry = models[name]
        try:
            return cls(
                name=name,
                path=manifest_path.parent / entry["file"],
                sha256=str(entry["sha256"]).lower(),
                input_shape=tuple(int(d) for d in entry["input_shape"]),
                num_classes=int(entry["num_classes"]),
                train_batch=int(entry["train_batch"]),
                features=str(entry["features"]),
                parts={str(k): int(v) for k, v in entry["parts"].items()},
                learning_rate=_learning_rate(entry.get("learning_rate", cls.learning_rate)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{manifest_path}: model {name!r} has a bad entry: {exc!r}") from exc


class TrainableModel:
    """A LiteRT model that trains on the CPU (XNNPACK) and exposes its parts as flat vectors."""

    def __init__(self, spec: ModelSpec, *, num_threads: int = 1,
                 max_infer_rows: int = 16, delegate: Any | None = None) -> None:
        """`max_infer_rows` bounds the rows of one interpreter call in `predict`: the
        interpreter sizes (and keeps) its buffers for the largest batch it has run, which
        for a raw-window CNN is ~50 KiB per row (3.1 MiB at 64 rows, 0.5 MiB at 16, with
        no measurable cost in time per row).

        `delegate` (from `load_delegate`) runs `predict` on an accelerator. Delegates do
        not train, so it gets an interpreter of its own, whose weights are brought up to
        date from the training interpreter before the first prediction after a change.
        """
        if max_infer_rows < 1:
            raise ValueError(f"max_infer_rows must be >= 1, got {max_infer_rows}")
        self.spec = spec
        self._max_infer_rows = max_infer_rows
        try:
            # Keep the bytes: the interpreter reads from this buffer, and loading the
            # very bytes that were hashed leaves no window for the file to change.
            self._content = spec.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"model {spec.name!r}: cannot read {spec.path}: {exc}") from exc
        digest = hashlib.sha256(self._content).hexdigest()
        if digest != spec.sha256:
            raise ModelError(
                f"model {spec.name!r}: sha256 of {spec.path} is {digest}, "
                f"the manifest says {spec.sha256}"
            )
        try:
            self._interpreter = Interpreter(model_content=self._content, num_threads=num_threads)
            signatures = self._interpreter.get_signature_list()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"model {spec.name!r}: LiteRT cannot load {spec.path}: {exc}") from exc
        needed = ["train", "train_head", "infer"]
        needed += [f"{op}_{part}" for part in spec.parts for op in ("get", "set")]
        missing = [s for s in needed if s not in signatures]
        if missing:
            raise ModelError(f"model {spec.name!r}: {spec.path} lacks signatures {missing}")
        self._runners = {s: self._interpreter.get_signature_runner(s) for s in needed}
        self._check_shapes()
        self._delegated: dict[str, Any] | None = None
        self._stale = True  # the delegate's weights lag the training interpreter's
        if delegate is not None:
            try:
                accelerated = Interpreter(model_content=self._content, num_threads=num_threads,
                                          experimental_delegates=[delegate])
            except (ValueError, RuntimeError) as exc:
                # LiteRT may raise with no text, having logged the reason on stderr.
                reason = str(exc) or "LiteRT logged why on stderr"
                raise DelegateRefused(
                    f"model {spec.name!r}: the delegate refused it: {reason}") from exc
            self._delegated = {s: accelerated.get_signature_runner(s)
                               for s in ["infer", *(f"set_{part}" for part in spec.parts)]}

    def _check_shapes(self) -> None:
        """Fail at load, not mid-training, when the file does not match the manifest."""
        spec = self.spec
        x = self._runners["train"].get_input_details()["x"]["shape_signature"]
        if tuple(x) != (spec.train_batch, *spec.input_shape):
            raise ModelError(
                f"model {spec.name!r}: train x is {list(x)}, spec says "
                f"{[spec.train_batch, *spec.input_shape]}"
            )
        infer_x = self._runners["infer"].get_input_details()["x"]["shape_signature"]
        if tuple(infer_x[1:]) != spec.input_shape:
            raise ModelError(f"model {spec.name!r}: infer x is {list(infer_x)}")
        # -1 (dynamic) lets predict() run up to max_infer_rows rows in one call.
        self._infer_batch = None if infer_x[0] < 0 else int(infer_x[0])
        logits = self._runners["infer"].get_output_details()["logits"]["shape_signature"]
        if logits[-1] != spec.num_classes:
            raise ModelError(
                f"model {spec.name!r}: infer gives {logits[-1]} classes, "
                f"spec says {spec.num_classes}"
            )
        for part, size in spec.parts.items():
            got = self._runners[f"set_{part}"].get_input_details()[part]["shape_signature"]
            if tuple(got) != (size,):
                raise ModelError(
                    f"model {spec.name!r}: part {part!r} is {list(got)}, spec says {size}"
                )

    @property
    def parts(self) -> dict[str, int]:
        """Part name -> number of float32 parameters."""
        return dict(self.spec.parts)

    # -- training ------------------------------------------------------------
    def _batch(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.int32)
        if x.shape != (spec.train_batch, *spec.input_shape):
            raise ValueError(
                f"x must have shape {(spec.train_batch, *spec.input_shape)} "
                f"(the model's fixed train batch), got {x.shape}"
            )
        if y.shape != (spec.train_batch,):
            raise ValueError(f"y must have shape ({spec.train_batch},), got {y.shape}")
        # An out-of-range label would one-hot to zeros and silently train on nothing.
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise ValueError(f"labels must be in 0..{spec.num_classes - 1}")
        return x, y

    def _train(self, signature: str, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        x, y = self._batch(x, y)
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        out = self._runners[signature](x=x, y=y, lr=np.float32(lr))
        self._stale = True
        return float(out["loss"])

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on every part; returns the batch's mean loss before the step."""
        return self._train("train", x, y, lr)

    def train_head_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on the head only (body frozen), for personal fine-tuning."""
        return self._train("train_head", x, y, lr)

    # -- inference -----------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, shape (rows, num_classes), for any number of rows (0 included)."""
        spec = self.spec
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != spec.input_shape:
            raise ValueError(
                f"x must have shape (rows, {', '.join(map(str, spec.input_shape))}), got {x.shape}"
            )
        rows = x.shape[0]
        if rows == 0:
            return np.zeros((0, spec.num_classes), np.float32)
        infer = self._infer_runner()
        out = np.empty((rows, spec.num_classes), np.float32)
        if self._infer_batch is None:
            # Dynamic batch: chunks of at most max_infer_rows rows bound the memory.
            step = self._max_infer_rows
            for start in range(0, rows, step):
                out[start : start + step] = infer(x=x[start : start + step])["logits"]
            return out
        # Fixed infer batch: run zero-padded chunks and drop the padding rows.
        batch = self._infer_batch
        chunk = np.zeros((batch, *spec.input_shape), np.float32)
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            chunk[:n] = x[start : start + n]
            chunk[n:] = 0.0
            out[start : start + n] = infer(x=chunk)["logits"][:n]
        return out

    def _infer_runner(self) -> Any:
        """The delegate's `infer`, with current weights, or the CPU's."""
        if self._delegated is None:
            return self._runners["infer"]
        if self._stale:
            for part in self.spec.parts:
                self._delegated[f"set_{part}"](**{part: self.get_part(part)})
            self._stale = False
        return self._delegated["infer"]

    # -- parts ---------------------------------------------------------------
    def _size(self, name: str) -> int:
        if name not in self.spec.parts:
            raise KeyError(
                f"model {self.spec.name!r} has no part {name!r} (has: {', '.join(self.spec.parts)})"
            )
        return self.spec.parts[name]

    def get_part(self, name: str) -> np.ndarray:
        """A float32 copy of one part's flat weights (per layer: kernel row-major, then bias)."""
        self._size(name)
        return np.array(self._runners[f"get_{name}"]()[name], dtype=np.float32, copy=True)

    def _checked(self, name: str, values: np.ndarray) -> np.ndarray:
        size = self._size(name)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if values.size != size:
            raise ValueError(f"part {name!r} needs {size} values, got {values.size}")
        if not np.isfinite(values).all():
            raise NonFiniteWeights(f"part {name!r}: values must be finite (NaN or inf given)")
        return values

    def set_part(self, name: str, values: np.ndarray) -> None:
        """Replace one part's weights; refuses a wrong size or non-finite values."""
        self._runners[f"set_{name}"](**{name: self._checked(name, values)})
        self._stale = True

    def get_parts(self) -> dict[str, np.ndarray]:
        """Every part, by name."""
        return {name: self.get_part(name) for name in self.spec.parts}

    def set_parts(self, parts: dict[str, np.ndarray]) -> None:
        """Set several parts; all are checked before any is written, so a bad one changes none."""
        checked = {name: self._checked(name, values) for name, values in parts.items()}
        for name, values in checked.items():
            self._runners[f"set_{name}"](**{name: values})
        self._stale = True
