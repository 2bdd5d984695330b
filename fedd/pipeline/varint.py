"""Unsigned LEB128 varints: 7 bits a byte, low group first, high bit = more follows.

Vectorized both ways (no per-value Python loop). The decoder accepts only the
shortest form of each number, so every list of numbers has one encoding.
"""

from __future__ import annotations

import numpy as np

from fedd.pipeline.errors import DecodeError

__all__ = ["decode_many", "encode_many", "encode_one", "sizes"]

_LIMITS = np.array([1 << (7 * i) for i in range(1, 10)], dtype=np.uint64)


def sizes(values: np.ndarray) -> np.ndarray:
    """Bytes each non-negative value takes as a varint (1-10)."""
    values = np.asarray(values, dtype=np.uint64)
    return 1 + (values[:, None] >= _LIMITS[None, :]).sum(axis=1) if values.size else \
        np.zeros(0, dtype=np.int64)


def encode_many(values: np.ndarray) -> bytes:
    """Concatenated varints of non-negative integers."""
    values = np.asarray(values, dtype=np.uint64)
    if not values.size:
        return b""
    lengths = sizes(values)
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(values.size), lengths)
    within = np.arange(int(lengths.sum())) - starts[owner]
    groups = (values[owner] >> (7 * within).astype(np.uint64)) & np.uint64(0x7F)
    more = within < lengths[owner] - 1
    return (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8).tobytes()


def encode_one(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"a varint is unsigned, got {value}")
    out = bytearray()
    while True:
        group, value = value & 0x7F, value >> 7
        out.append(group | (0x80 if value else 0))
        if not value:
            return bytes(out)


def decode_many(buf: np.ndarray, count: int, *, max_len: int, what: str) -> tuple[np.ndarray, int]:
    """Read `count` varints from the start of uint8 `buf`: (values as uint64, bytes used).

    A varint longer than `max_len` bytes (<= 9, so it fits 63 bits) or with
    a zero last byte after the first (not the shortest form) is `bad-varint`;
    too few terminating bytes in `buf` is `truncated`.
    """
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    window = buf[: count * max_len]
    ends = np.flatnonzero(window < 0x80)  # the last byte of each varint
    if ends.size < count:
        if window.size < count * max_len:
            raise DecodeError("truncated", f"{what}: {count} varints need more bytes")
        raise DecodeError("bad-varint", f"{what}: a varint longer than {max_len} bytes")
    used = int(ends[count - 1]) + 1
    if used == count:  # all one byte long: the common case for dense indices
        return window[:count].astype(np.uint64), used
    ends = ends[:count]
    lengths = np.empty(count, dtype=np.int64)
    lengths[0] = ends[0] + 1
    lengths[1:] = ends[1:] - ends[:-1]
    longest = int(lengths.max())
    if longest > max_len:
        raise DecodeError("bad-varint", f"{what}: a varint longer than {max_len} bytes")
    last = window[ends]
    if ((lengths > 1) & (last == 0)).any():
        raise DecodeError("bad-varint", f"{what}: a varint not in its shortest form")
    # From the most significant group (the last byte) down: one pass per byte
    # position, at most max_len passes, each over every varint at once.
    values = last.astype(np.uint64)
    for back in range(1, longest):
        groups = (window[ends - back] & 0x7F).astype(np.uint64)  # masked below where too short
        values = np.where(lengths > back, (values << np.uint64(7)) | groups, values)
    return values, used
