"""Inference delegates (Edge TPU, Arm NN, vendor NPUs, GPU), tried in order.

A delegate is named in the config as its shared library with optional
options after `?`, e.g. `libedgetpu.so.1` or
`libarmnnDelegate.so?backends=GpuAcc,CpuAcc&logging-severity=warning`.
The first one that loads and takes the model wins; a library that is
missing, is not a delegate plugin, or refuses the model (a static-shape
accelerator and a graph with dynamic shapes) is skipped with its reason, and
with none left inference runs on the CPU with XNNPACK. Delegates only run
inference: training always runs on the CPU (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

try:
    from ai_edge_litert.interpreter import load_delegate
except ImportError:  # pragma: no cover - older devices with only tflite-runtime
    from tflite_runtime.interpreter import load_delegate

from fedd.config import parse_delegate_spec
from fedd.model import DelegateRefused

CPU = "xnnpack"


@dataclass(frozen=True)
class DelegateChoice:
    """The delegate inference got (`CPU` when none), why the others failed, and what
    `accept` built on it."""

    name: str
    delegate: Any | None
    failures: tuple[str, ...]
    accepted: Any = None


@contextlib.contextmanager
def _quiet_failed_delegate() -> Iterator[None]:
    """LiteRT's Delegate.__del__ raises AttributeError after a failed load: hide it."""
    previous = sys.unraisablehook

    def hook(info: Any) -> None:
        if not (isinstance(info.exc_value, AttributeError) and "Delegate" in repr(info.object)):
            previous(info)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _one_line(exc: Exception) -> str:
    """LiteRT puts a plugin's own reason on a second line: keep one log line."""
    return "; ".join(line for line in str(exc).splitlines() if line.strip())


def choose_delegate(chain: Sequence[str],
                    accept: Callable[[Any], Any] | None = None) -> DelegateChoice:
    """The first delegate of `chain` that loads and that `accept` (building the model
    on it) does not refuse with `DelegateRefused`; the CPU when none does."""
    failures = []
    for spec in chain:
        library, options = parse_delegate_spec(spec)
        with _quiet_failed_delegate():
            try:
                delegate = load_delegate(library, options)
            except (OSError, ValueError, AttributeError, RuntimeError) as exc:
                failures.append(f"{library}: {_one_line(exc)}")
                continue
        try:
            accepted = None if accept is None else accept(delegate)
        except DelegateRefused as exc:
            failures.append(f"{library}: {_one_line(exc)}")
            continue
        return DelegateChoice(library, delegate, tuple(failures), accepted)
    return DelegateChoice(CPU, None, tuple(failures))
