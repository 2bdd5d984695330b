"""q:BITS[:CHUNK]: unbiased stochastic quantization to 2**BITS levels per chunk.

The values are cut into chunks of CHUNK (default 256; the last may be
shorter). Each chunk has a scale s, the bfloat16 at or above its largest
|x| (see packing.py). The chunk's grid is L = 2**BITS evenly spaced levels
from -s to +s: level c means s·(2c - (L-1))/(L-1), so 1 bit is ±s and 8 bits
are 256 levels. A value between two levels is rounded to the upper one with
probability equal to its distance from the lower one over the level spacing,
so E[decoded] = x exactly (unbiased) and |decoded - x| < 2s/(L-1), the
spacing. A chunk of zeros has s = 0 and decodes to zeros.

Error feedback needs a contractive codec (stage.ValueCodec.contractive).
Per value the variance is at most spacing^2/4 = s^2/(L-1)^2, and s^2 is at most
the chunk's squared norm, so E||error||^2 <= min(CHUNK, count)/(L-1)^2·||x||^2:
guaranteed contractive when min(CHUNK, count) < (L-1)^2. 8 bits always are,
4 bits up to 224 values a chunk, 2 bits up to 8, and 1 bit never (one
value and zeros around it: ±s everywhere). After top-k the count is k, so
``topk:0.001+q:4`` is safe on 8288 values (k = 8) and dense ``q:1`` is not:
with error feedback use ``sign`` for 1 bit, or a short chunk.

Wire: ceil(count/CHUNK) scales (bfloat16, 2 bytes LE each), then the
count·BITS bits of the level numbers, LSB-first, zero padding. Header
parameters: BITS (1 byte), log2 CHUNK (1 byte).
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline import packing
from fedd.pipeline._args import integer, power_of_two
from fedd.pipeline.errors import DecodeError, SpecError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import Measurements, ValueCodec

__all__ = ["Quantize"]

DEFAULT_CHUNK = 256
MAX_CHUNK_LOG2 = 16
# level c of 2**b → (2c - (L-1))/(L-1), in [-1, 1]
_GRIDS = {bits: ((2 * np.arange(1 << bits) - ((1 << bits) - 1)) / ((1 << bits) - 1)
                 ).astype(np.float32) for bits in packing.BITS}


class Quantize(ValueCodec):
    """b-bit stochastic quantization with a bfloat16 scale per chunk."""

    name = "q"
    code = 0x03
    usage = "q:BITS[:CHUNK], BITS one of 1, 2, 4, 8 (e.g. 'q:4' or 'q:4:128')"
    stochastic = True

    def __init__(self, *, bits: int, chunk: int = DEFAULT_CHUNK) -> None:
        if bits not in packing.BITS:
            raise SpecError(f"q:{bits}: bits must be 1, 2, 4 or 8")
        if chunk < 1 or chunk > 1 << MAX_CHUNK_LOG2 or chunk & (chunk - 1):
            raise SpecError(f"q: chunk must be a power of two up to {1 << MAX_CHUNK_LOG2}, "
                            f"got {chunk}")
        self.bits = bits
        self.chunk = chunk
        self._grid = _GRIDS[bits]

    @classmethod
    def from_args(cls, args: list[str]) -> Quantize:
        if not 1 <= len(args) <= 2:
            raise SpecError(f"'q' needs the number of bits: write {cls.usage}")
        bits = integer(args[0], "q: bits", cls.usage, 1, 8)
        if bits not in packing.BITS:
            raise SpecError(f"q:{bits}: bits must be 1, 2, 4 or 8")
        chunk = DEFAULT_CHUNK
        if len(args) == 2:
            chunk = power_of_two(args[1], "q: chunk", cls.usage, 1, 1 << MAX_CHUNK_LOG2)
        return cls(bits=bits, chunk=chunk)

    @classmethod
    def from_header(cls, reader: Reader) -> Quantize:
        bits = reader.byte("q bits")
        log2 = reader.byte("q chunk")
        if bits not in packing.BITS or log2 > MAX_CHUNK_LOG2:
            raise DecodeError("bad-parameter", f"q with {bits} bits and chunk 2**{log2}")
        return cls(bits=bits, chunk=1 << log2)

    def header(self) -> bytes:
        return bytes([self.code, self.bits, self.chunk.bit_length() - 1])

    def spec(self) -> str:
        return f"q:{self.bits}:{self.chunk}"

    def _dequantize(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """The one formula the encoder and the decoder share, so both get the same bits."""
        return packing.per_chunk(self._grid[codes], scales, self.chunk)

    def encode(self, values: np.ndarray, rng: np.random.Generator
               ) -> tuple[bytes, np.ndarray, Measurements]:
        count = values.size
        blocks = packing.chunks(count, self.chunk)
        padded = np.zeros(blocks * self.chunk, dtype=np.float32)
        padded[:count] = values
        scale_bits = packing.bf16_up(np.abs(padded.reshape(blocks, self.chunk)).max(axis=1)
                                     if blocks else np.zeros(0, np.float32))
        scales = packing.scales_f32(scale_bits)
        spread = np.repeat(scales, self.chunk)[:count]
        top = (1 << self.bits) - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            position = np.where(spread > 0, (values / spread + 1) * np.float32(top / 2), 0)
        position = np.clip(position, 0, top).astype(np.float32)
        low = np.floor(position)
        up = rng.random(count, dtype=np.float32) < position - low
        codes = np.minimum(low + up, top).astype(np.uint8)
        decoded = self._dequantize(codes, scales)
        payload = scale_bits.astype("<u2").tobytes() + packing.pack(codes, self.bits)
        return payload, decoded, {"bits": self.bits, "chunk": self.chunk, "scales": blocks}

    def decode(self, reader: Reader, count: int) -> np.ndarray:
        scales = packing.read_scales(reader, packing.chunks(count, self.chunk), "q scales")
        codes = packing.unpack(reader, count, self.bits, "q codes")
        return self._dequantize(codes, scales)

    def max_bytes(self, count: int) -> int:
        return 2 * packing.chunks(count, self.chunk) + packing.chunks(count * self.bits, 8)

    def contractive(self, count: int) -> bool:
        return min(self.chunk, count) < ((1 << self.bits) - 1) ** 2
