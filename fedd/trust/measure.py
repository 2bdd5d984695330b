"""The agent's measurement: one SHA-256 over its code and model, and what a PCR holds after it.

The agent resets the measurement PCR and extends it once with this digest
(`fedd.trust.tpm.Tpm.measure`), so the PCR's value depends only on the files
measured, never on how often the agent started since boot, and an operator
can compute the value the policy must allow (`pcr_after_measure`) on any
machine with the same release, TPM or not.

Format (version 1): SHA-256 over ``b"fedd-measure-v1\\0"`` and then, for each
entry in ascending order of its label, ``u32 len(label) || label (UTF-8) ||
u64 size || SHA-256(content)``. Labels are POSIX relative paths such as
``code/fedd/agent/daemon.py`` or ``model/har-mlp.tflite`` so that the digest is
the same wherever the files are installed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

__all__ = [
    "MAX_FILES",
    "MEASURE_CONTEXT",
    "agent_files",
    "measurement_digest",
    "pcr_after_measure",
]

MEASURE_CONTEXT = b"fedd-measure-v1\0"
MAX_FILES = 20_000  # a bound, far above a fedd install (~100 files)
MAX_LABEL_BYTES = 1024
CHUNK = 1 << 20
DIGEST_SIZE = 32


def _check_label(label: str) -> bytes:
    path = PurePosixPath(label)
    if (not label or path.is_absolute() or ".." in path.parts or str(path) != label
            or "\\" in label):
        raise ValueError(f"a measurement label must be a normalized relative POSIX path, "
                         f"got {label!r}")
    raw = label.encode("utf-8")
    if len(raw) > MAX_LABEL_BYTES:
        raise ValueError(f"measurement label longer than {MAX_LABEL_BYTES} bytes: {label[:60]!r}…")
    return raw


def _file_digest(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


def measurement_digest(files: Mapping[str, str | Path]) -> bytes:
    """SHA-256 over the labelled files (label -> path), in label order; see the module doc."""
    if not files:
        raise ValueError("nothing to measure: give at least one file")
    if len(files) > MAX_FILES:
        raise ValueError(f"too many files to measure ({len(files)} > {MAX_FILES})")
    total = hashlib.sha256(MEASURE_CONTEXT)
    for label in sorted(files):
        raw = _check_label(label)
        size, content = _file_digest(Path(files[label]))
        total.update(struct.pack(">I", len(raw)) + raw + struct.pack(">Q", size) + content)
    return total.digest()


def agent_files(package_dir: str | Path, models: Iterable[str | Path] = ()) -> dict[str, Path]:
    """The agent's code (every ``*.py`` under ``package_dir``) and model files, labelled.

    Code is labelled ``code/<package name>/<relative path>``, each model
    ``model/<file name>``; two models with the same file name are refused.
    """
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise ValueError(f"{package_dir}: not a folder")
    files: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        rel = path.relative_to(package_dir).as_posix()
        files[f"code/{package_dir.name}/{rel}"] = path
        if len(files) > MAX_FILES:
            raise ValueError(f"{package_dir}: more than {MAX_FILES} files to measure")
    for model in models:
        model = Path(model)
        label = f"model/{model.name}"
        if label in files:
            raise ValueError(f"two models named {model.name!r}: labels must be unique")
        if not model.is_file():
            raise ValueError(f"{model}: no such model file")
        files[label] = model
    return files


def pcr_after_measure(digest: bytes) -> bytes:
    """The SHA-256 PCR value after a reset and one extend with ``digest``: H(0^32 || digest)."""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a measurement is a {DIGEST_SIZE}-byte SHA-256, got {len(digest)} bytes")
    return hashlib.sha256(bytes(DIGEST_SIZE) + digest).digest()
