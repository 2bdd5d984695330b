"""float32: the values as they are, 4 bytes each; the identity stack and the baseline."""

from __future__ import annotations

import numpy as np

from fedd.pipeline.errors import DecodeError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import Measurements, ValueCodec

__all__ = ["Float32"]


class Float32(ValueCodec):
    """Wire: `count` x float32 little-endian. Lossless; decode refuses NaN/Inf."""

    name = "float32"
    code = 0x01
    usage = "float32"

    def encode(self, values: np.ndarray, rng: np.random.Generator
               ) -> tuple[bytes, np.ndarray, Measurements]:
        return values.astype("<f4").tobytes(), values, {}

    def decode(self, reader: Reader, count: int) -> np.ndarray:
        values = reader.array(count, "<f4", "float32 values")
        if not np.isfinite(values).all():
            raise DecodeError("non-finite", "float32 values hold NaN or Inf")
        return values.astype(np.float32)

    def max_bytes(self, count: int) -> int:
        return 4 * count
