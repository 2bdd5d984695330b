"""topk:AMOUNT: send only the k entries of largest magnitude.

AMOUNT is a fraction of the part (``topk:0.01``, or ``topk:1%``) or a count
(``topk:100``): a number with a '.', an exponent or a '%' is a fraction in
(0, 1], a plain integer is a count >= 1. A fraction keeps
max(1, round(fraction·n)) entries; a count larger than the part keeps all.

What it selects from is the device's *accumulated* vector, residual + delta
(error feedback, done by the pipeline): an entry not sent now keeps growing
in the residual until it is. Its indices go on the wire with the index
coding of indices.py; it has no header parameter (k is in the message).
"""

from __future__ import annotations

import math

import numpy as np

from fedd.pipeline._args import integer
from fedd.pipeline.errors import SpecError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import Sparsifier

__all__ = ["TopK"]


class TopK(Sparsifier):
    """Top-k by |value|; `fraction` or `count`, or neither on the hub (decode only)."""

    name = "topk"
    code = 0x10
    usage = "topk:FRACTION or topk:COUNT (e.g. 'topk:0.01', 'topk:1%' or 'topk:100')"

    def __init__(self, *, fraction: float | None = None, count: int | None = None) -> None:
        if fraction is not None and count is not None:
            raise SpecError("topk takes a fraction or a count, not both")
        if fraction is not None and not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise SpecError(f"topk: the fraction must be in (0, 1], got {fraction}")
        if count is not None and count < 1:
            raise SpecError(f"topk: the count must be >= 1, got {count}")
        self.fraction = fraction
        self.count = count

    @classmethod
    def from_args(cls, args: list[str]) -> TopK:
        if len(args) != 1 or not args[0]:
            raise SpecError(f"'topk' needs how much to keep: write {cls.usage}")
        text = args[0]
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise SpecError(f"topk: '{text}' is not a percentage ({cls.usage})") from None
            if not (math.isfinite(percent) and 0 < percent <= 100):
                raise SpecError(f"topk: the percentage must be in (0, 100], got {text}")
            return cls(fraction=percent / 100)
        if any(c in text for c in ".eE"):
            try:
                fraction = float(text)
            except ValueError:
                raise SpecError(f"topk: '{text}' is not a number ({cls.usage})") from None
            return cls(fraction=fraction)
        return cls(count=integer(text, "topk: the count", cls.usage, 1, 1 << 40))

    @classmethod
    def from_header(cls, reader: Reader) -> TopK:
        return cls()

    def spec(self) -> str:
        if self.fraction is not None:
            return f"topk:{self.fraction!r}"
        if self.count is not None:
            return f"topk:{self.count}"
        return "topk"

    def kept(self, length: int) -> int:
        """k for a part of `length` values."""
        if self.count is not None:
            return min(self.count, length)
        if self.fraction is None:
            raise SpecError("this topk stage was read from a payload: it can decode, not "
                            "encode (give it a fraction or a count)")
        return min(length, max(1, round(self.fraction * length)))

    def max_kept(self, length: int) -> int:
        return length if self.fraction is None and self.count is None else self.kept(length)

    def select(self, vector: np.ndarray) -> np.ndarray:
        length = vector.size
        k = self.kept(length)
        if k >= length:
            return np.arange(length, dtype=np.int64)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        top = np.argpartition(np.abs(vector), length - k)[length - k :]
        return np.sort(top).astype(np.int64)
