"""sign[:CHUNK]: one bit a value, the sign, times the chunk's mean |x| (scaled signSGD).

Biased on purpose (it is not an estimator of x but of its direction): use it
with error feedback, which carries what it loses into the next update.
A value >= 0 is sent as +s, a negative one as -s, where s is the mean |x|
of its chunk (default 256 values) rounded to the nearest bfloat16.

Wire: ceil(count/CHUNK) scales (bfloat16, 2 bytes LE each), then count sign
bits, LSB-first (1 = +s), zero padding. Header parameter: log2 CHUNK (1 byte).
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline import packing
from fedd.pipeline._args import power_of_two
from fedd.pipeline.errors import DecodeError, SpecError
from fedd.pipeline.quantize import DEFAULT_CHUNK, MAX_CHUNK_LOG2
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import Measurements, ValueCodec

__all__ = ["Sign"]


class Sign(ValueCodec):
    """Scaled sign with a bfloat16 scale (mean |x|) per chunk."""

    name = "sign"
    code = 0x04
    usage = "sign[:CHUNK] (e.g. 'sign' or 'sign:128')"

    def __init__(self, *, chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < 1 or chunk > 1 << MAX_CHUNK_LOG2 or chunk & (chunk - 1):
            raise SpecError(f"sign: chunk must be a power of two up to {1 << MAX_CHUNK_LOG2}, "
                            f"got {chunk}")
        self.chunk = chunk

    @classmethod
    def from_args(cls, args: list[str]) -> Sign:
        if len(args) > 1:
            raise SpecError(f"'sign' takes at most a chunk size: write {cls.usage}")
        if not args:
            return cls()
        return cls(chunk=power_of_two(args[0], "sign: chunk", cls.usage, 1, 1 << MAX_CHUNK_LOG2))

    @classmethod
    def from_header(cls, reader: Reader) -> Sign:
        log2 = reader.byte("sign chunk")
        if log2 > MAX_CHUNK_LOG2:
            raise DecodeError("bad-parameter", f"sign with chunk 2**{log2}")
        return cls(chunk=1 << log2)

    def header(self) -> bytes:
        return bytes([self.code, self.chunk.bit_length() - 1])

    def spec(self) -> str:
        return f"sign:{self.chunk}"

    def _decoded(self, positive: np.ndarray, scales: np.ndarray) -> np.ndarray:
        unit = np.where(positive, np.float32(1), np.float32(-1))
        return packing.per_chunk(unit, scales, self.chunk)

    def encode(self, values: np.ndarray, rng: np.random.Generator
               ) -> tuple[bytes, np.ndarray, Measurements]:
        count = values.size
        blocks = packing.chunks(count, self.chunk)
        padded = np.zeros(blocks * self.chunk, dtype=np.float32)
        padded[:count] = np.abs(values)
        sizes = np.minimum(self.chunk, count - self.chunk * np.arange(blocks))
        means = (padded.reshape(blocks, self.chunk).sum(axis=1, dtype=np.float64) / sizes
                 if blocks else np.zeros(0))
        scale_bits = packing.bf16_nearest(means.astype(np.float32))
        positive = values >= 0
        decoded = self._decoded(positive, packing.scales_f32(scale_bits))
        payload = scale_bits.astype("<u2").tobytes() + packing.pack(positive, 1)
        return payload, decoded, {"chunk": self.chunk, "scales": blocks}

    def decode(self, reader: Reader, count: int) -> np.ndarray:
        scales = packing.read_scales(reader, packing.chunks(count, self.chunk), "sign scales")
        positive = packing.unpack(reader, count, 1, "sign bits").astype(bool)
        return self._decoded(positive, scales)

    def max_bytes(self, count: int) -> int:
        return 2 * packing.chunks(count, self.chunk) + packing.chunks(count, 8)
