"""f16: IEEE binary16, 2 bytes a value.

Exactness: a value with 2**-14 <= |x| <= 65504 comes back within 2**-11·|x|
(round to nearest, 11 significant bits); below 2**-14 (subnormal) within
2**-25 absolutely. A value beyond ±65504 is clipped to ±65504 rather than
sent as an infinity. Error feedback carries the rounding and the clipping
into the next update.
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline.errors import DecodeError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import Measurements, ValueCodec

__all__ = ["Float16"]

F16_MAX = float(np.finfo(np.float16).max)


class Float16(ValueCodec):
    """Wire: `count` x binary16 little-endian; decode refuses NaN/Inf."""

    name = "f16"
    code = 0x02
    usage = "f16"

    def encode(self, values: np.ndarray, rng: np.random.Generator
               ) -> tuple[bytes, np.ndarray, Measurements]:
        half = np.clip(values, -F16_MAX, F16_MAX).astype("<f2")
        clipped = int(np.count_nonzero(np.abs(values) > F16_MAX))
        return half.tobytes(), half.astype(np.float32), {"clipped": clipped}

    def decode(self, reader: Reader, count: int) -> np.ndarray:
        values = reader.array(count, "<f2", "f16 values").astype(np.float32)
        if not np.isfinite(values).all():  # float32 checks faster than float16
            raise DecodeError("non-finite", "f16 values hold NaN or Inf")
        return values

    def max_bytes(self, count: int) -> int:
        return 2 * count
