"""A bounded cursor over untrusted bytes: every read names what it reads."""

from __future__ import annotations

import numpy as np

from fedd.pipeline import varint
from fedd.pipeline.errors import DecodeError

__all__ = ["Reader"]


class Reader:
    """Reads fields in order; running short is `truncated`, never an IndexError."""

    def __init__(self, data: bytes, *, offset: int = 0) -> None:
        self._data = data
        self._array = np.frombuffer(data, dtype=np.uint8)
        self.pos = offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def _need(self, size: int, what: str) -> None:
        if size > self.remaining:
            raise DecodeError("truncated", f"{what}: need {size} bytes, {self.remaining} left")

    def byte(self, what: str) -> int:
        self._need(1, what)
        self.pos += 1
        return self._data[self.pos - 1]

    def take(self, size: int, what: str) -> bytes:
        self._need(size, what)
        self.pos += size
        return self._data[self.pos - size : self.pos]

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        """`count` items of a fixed-size little-endian dtype, read-only."""
        size = count * np.dtype(dtype).itemsize
        self._need(size, what)
        out = np.frombuffer(self._data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out

    def bytes_array(self, size: int, what: str) -> np.ndarray:
        return self.array(size, "u1", what)

    def uvarint(self, what: str, *, max_len: int = 9) -> int:
        """One varint (a scalar loop over at most `max_len` bytes, not per element)."""
        value = 0
        for i in range(max_len):
            byte = self.byte(what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if i and not byte:
                    raise DecodeError("bad-varint", f"{what}: not in its shortest form")
                return value
        raise DecodeError("bad-varint", f"{what}: longer than {max_len} bytes")

    def uvarints(self, count: int, what: str, *, max_len: int) -> np.ndarray:
        values, used = varint.decode_many(self._array[self.pos :], count, max_len=max_len,
                                          what=what)
        self.pos += used
        return values

    def rest(self) -> bytes:
        out = self._data[self.pos :]
        self.pos = len(self._data)
        return out

    def finish(self, what: str) -> None:
        if self.remaining:
            raise DecodeError("trailing-bytes", f"{self.remaining} bytes after {what}")
