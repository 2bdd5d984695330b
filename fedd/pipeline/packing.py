"""Bit-level layouts shared by the value codecs: packed codes and bfloat16 scales.

Codes of `bits` bits (1, 2, 4 or 8) are packed LSB-first: value i goes to
byte i*bits//8 at bit offset (i*bits) % 8. The unused high bits of the last
byte are zero, and the decoder insists on it (`bad-padding`).

Per-chunk scales are bfloat16: the high 16 bits of a float32, 2 bytes
little-endian. That is float32's range (no underflow of a 1e-9 scale, no
overflow of a 1e5 one, where float16 would fail at 6e-8 and 65504) in
float16's size; its 8-bit mantissa does not matter for a scale that the
encoder rounds *up*, so the grid still covers every value in the chunk.
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline.errors import DecodeError
from fedd.pipeline.reader import Reader

__all__ = ["BITS", "bf16_nearest", "bf16_up", "chunks", "pack", "per_chunk", "read_scales",
           "scales_f32", "unpack"]

BITS = (1, 2, 4, 8)
_BF16_MAX = np.uint32(0x7F7F)  # largest finite bfloat16, 3.39e38


def chunks(count: int, chunk: int) -> int:
    return -(-count // chunk)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes < 2**bits → LSB-first packed bytes."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    if bits == 1:
        return np.packbits(codes.astype(bool), bitorder="little").tobytes()
    per = 8 // bits
    padded = np.zeros(chunks(codes.size, per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(
        np.uint8).tobytes()


def unpack(reader: Reader, count: int, bits: int, what: str) -> np.ndarray:
    """Read the packed codes of `count` values; padding bits must be zero."""
    raw = reader.bytes_array(chunks(count * bits, 8), what)
    if bits == 8:
        return raw
    if bits == 1:
        codes = np.unpackbits(raw, bitorder="little")
    else:
        per, mask = 8 // bits, np.uint8((1 << bits) - 1)
        codes = np.empty(raw.size * per, dtype=np.uint8)
        for slot in range(per):  # 2 or 4 strided passes, not a loop over values
            codes[slot::per] = (raw >> np.uint8(slot * bits)) & mask
    if codes[count:].any():
        raise DecodeError("bad-padding", f"{what}: non-zero bits after value {count}")
    return codes[:count]


def bf16_up(values: np.ndarray) -> np.ndarray:
    """Non-negative finite float32 → the smallest bfloat16 >= each (capped at the largest)."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.minimum((raw + np.uint32(0xFFFF)) >> 16, _BF16_MAX).astype(np.uint16)


def bf16_nearest(values: np.ndarray) -> np.ndarray:
    """Non-negative finite float32 → the nearest bfloat16 (ties to even), capped."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (raw + np.uint32(0x7FFF) + ((raw >> 16) & np.uint32(1))) >> 16
    return np.minimum(rounded, _BF16_MAX).astype(np.uint16)


def per_chunk(values: np.ndarray, scales: np.ndarray, chunk: int) -> np.ndarray:
    """values[i] * scales[i // chunk], as float32 (one rounding, the same on both sides)."""
    count = values.size
    out = np.zeros(scales.size * chunk, dtype=np.float32)
    out[:count] = values
    out.reshape(scales.size, chunk)[:] *= scales[:, None]
    return out[:count]


def scales_f32(bf16: np.ndarray) -> np.ndarray:
    return (bf16.astype(np.uint32) << 16).view(np.float32)


def read_scales(reader: Reader, count: int, what: str) -> np.ndarray:
    """`count` bfloat16 scales as float32: finite and not negative."""
    raw = reader.array(count, "<u2", what)
    if ((raw & 0x7F80) == 0x7F80).any():
        raise DecodeError("non-finite", f"{what}: a NaN or infinite scale")
    if (raw & 0x8000).any():
        raise DecodeError("bad-scale", f"{what}: a negative scale")
    return scales_f32(raw)
