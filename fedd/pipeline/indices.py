"""Index coding for sparse updates: the cheaper of delta-varints and a bitmap, per message.

Layout of the index section (one flag byte, then):

- ``0x00`` varint: k as a varint, then k varints: the first index, then each
  index minus the one before (always >= 1: the indices are strictly
  increasing, so an unsorted list cannot be written, and a zero gap is a
  duplicate). Costs about 1 byte an index when they are denser than 1 in 128.
- ``0x01`` bitmap: ceil(n/8) bytes, bit i (LSB-first, byte i//8) set when
  index i is sent; k is the number of set bits. Costs n/8 bytes whatever k.

The encoder takes the varint form when it is no longer than the bitmap.
The decoder holds it to that: a varint list longer than the bitmap would be
is refused (`bad-index-coding`), which also bounds the section at
1 + ceil(n/8) bytes.
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline import varint
from fedd.pipeline.errors import DecodeError
from fedd.pipeline.reader import Reader

__all__ = ["BITMAP", "VARINT", "decode", "encode", "max_bytes"]

VARINT = 0x00
BITMAP = 0x01
MODES = {VARINT: "varint", BITMAP: "bitmap"}
# An index of a part of at most 2**26 values (fedd's largest) fits 4 varint bytes;
# 5 keeps room up to 2**35.
MAX_INDEX_VARINT = 5


def max_bytes(length: int) -> int:
    """The largest index section for a part of `length` values."""
    return 1 + -(-length // 8)


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.uint64)
    if indices.size:
        gaps[0] = indices[0]
        gaps[1:] = np.diff(indices)
    return gaps


def encode(indices: np.ndarray, length: int) -> tuple[bytes, str]:
    """Sorted unique indices < length → (section bytes, "varint" or "bitmap")."""
    gaps = _gaps(indices)
    count = varint.encode_one(indices.size)
    varint_size = len(count) + int(varint.sizes(gaps).sum())
    if varint_size <= max_bytes(length) - 1:
        return bytes([VARINT]) + count + varint.encode_many(gaps), "varint"
    bits = np.zeros(length, dtype=bool)
    bits[indices] = True
    return bytes([BITMAP]) + np.packbits(bits, bitorder="little").tobytes(), "bitmap"


def decode(reader: Reader, length: int) -> np.ndarray:
    """Read an index section: sorted unique int64 indices < length, or DecodeError."""
    start = reader.pos
    mode = reader.byte("index coding flag")
    bitmap_size = max_bytes(length) - 1
    if mode == BITMAP:
        bits = np.unpackbits(reader.bytes_array(bitmap_size, "index bitmap"), bitorder="little")
        if bits[length:].any():
            raise DecodeError("index-out-of-range", f"a bitmap bit at or past {length}")
        return np.flatnonzero(bits).astype(np.int64)
    if mode != VARINT:
        raise DecodeError("bad-index-coding", f"index coding flag {mode:#04x}")
    count = reader.uvarint("index count")
    if count > length:
        raise DecodeError("bad-count", f"{count} indices for a part of {length} values")
    gaps = reader.uvarints(count, "index gaps", max_len=MAX_INDEX_VARINT)
    if reader.pos - start - 1 > bitmap_size:
        raise DecodeError("bad-index-coding",
                          f"{reader.pos - start - 1} bytes of varints where a bitmap takes "
                          f"{bitmap_size}")
    if count > 1 and not gaps[1:].all():
        raise DecodeError("duplicate-index", "a zero gap between two indices")
    indices = np.cumsum(gaps).astype(np.int64)
    if count and indices[-1] >= length:
        raise DecodeError("index-out-of-range", f"index {indices[-1]} in a part of {length}")
    return indices
