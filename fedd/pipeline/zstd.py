"""zstd[:LEVEL]: Zstandard over the whole body, or the body stored as is if that is shorter.

Wire: one flag byte, then either the body itself (``0x00``, stored: a body
of a few dozen bytes does not shrink) or one zstd frame (``0x01``) in the
magicless format, without checksum, content size or dictionary id: those
would cost 4 to 13 bytes a message, and the hub needs none of them. So the
stage never costs more than 1 byte. LEVEL (1-22, default 3) is the
encoder's business and not on the wire.

Decoding is bounded: the frame may not inflate past `max_size` (the largest
body the stack can make for the part's length), checked with a streaming
read of at most max_size + 1 bytes, so a 30-byte bomb never allocates more.
A frame that is corrupt, truncated or followed by any byte is `bad-zstd`.

zstandard is imported by the functions that use it, not here: every agent
imports this stage with the pipeline, and one whose codec has no zstd stage
need not carry the library (0.25 MiB of RSS).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fedd.pipeline._args import integer
from fedd.pipeline.errors import DecodeError, SpecError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import ByteCoder, Measurements

if TYPE_CHECKING:
    import zstandard

__all__ = ["Zstd"]

STORED = 0x00
FRAME = 0x01
DEFAULT_LEVEL = 3
_local = threading.local()  # zstandard contexts are not safe to share between threads


def _decompressor() -> zstandard.ZstdDecompressor:
    import zstandard

    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    return dctx


def _inflates_past(dctx: zstandard.ZstdDecompressor, frame: bytes, max_size: int) -> bool:
    """Whether a failed frame failed for its size: stream at most max_size + 1 bytes."""
    import zstandard

    try:
        return len(dctx.stream_reader(frame).read(max_size + 1)) > max_size
    except zstandard.ZstdError:
        return False


class Zstd(ByteCoder):
    """Zstandard entropy coding of the body; the last stage of a stack."""

    name = "zstd"
    code = 0x20
    usage = "zstd[:LEVEL], LEVEL 1-22 (e.g. 'zstd' or 'zstd:9')"

    def __init__(self, *, level: int | None = DEFAULT_LEVEL) -> None:
        """`level=None` is the hub's decode-only stage (the level is not on the wire)."""
        if level is not None and not 1 <= level <= 22:
            raise SpecError(f"zstd: the level must be between 1 and 22, got {level}")
        self.level = level
        self._compressors = threading.local()

    @classmethod
    def from_header(cls, reader: Reader) -> Zstd:
        return cls(level=None)

    @classmethod
    def from_args(cls, args: list[str]) -> Zstd:
        if len(args) > 1:
            raise SpecError(f"'zstd' takes at most a level: write {cls.usage}")
        return cls(level=integer(args[0], "zstd: the level", cls.usage, 1, 22) if args
                   else DEFAULT_LEVEL)

    def spec(self) -> str:
        return self.name if self.level is None else f"zstd:{self.level}"

    def overhead(self) -> int:
        return 1

    def encode(self, body: bytes) -> tuple[bytes, Measurements]:
        if self.level is None:
            raise SpecError("this zstd stage was read from a payload: it can decode, not encode")
        import zstandard

        cctx = getattr(self._compressors, "cctx", None)
        if cctx is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0,
                write_content_size=0, write_dict_id=0)
            cctx = self._compressors.cctx = zstandard.ZstdCompressor(compression_params=params)
        frame = cctx.compress(body)
        stored = len(frame) >= len(body)
        out = bytes([STORED]) + body if stored else bytes([FRAME]) + frame
        return out, {"level": self.level, "in": len(body), "out": len(out),
                     "ratio": len(body) / len(out), "stored": stored}

    def decode(self, data: bytes, *, max_size: int) -> bytes:
        if not data:
            raise DecodeError("truncated", "zstd flag missing")
        flag, rest = data[0], data[1:]
        if flag == STORED:
            return rest  # the body's own checks bound it
        if flag != FRAME:
            raise DecodeError("bad-zstd", f"zstd flag {flag:#04x}")
        import zstandard

        dctx = _decompressor()
        try:
            # max_output_size bounds frames without a content size (ours); a crafted
            # frame that declares one is bounded by the streaming check below.
            params = zstandard.get_frame_parameters(rest, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        except zstandard.ZstdError as exc:
            raise DecodeError("bad-zstd", f"frame header: {exc}") from None
        if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and \
                params.content_size > max_size:
            raise DecodeError("decompressed-too-large",
                              f"frame declares {params.content_size} bytes, the most is "
                              f"{max_size}")
        try:
            body = dctx.decompress(rest, max_output_size=max_size + 1)
        except zstandard.ZstdError as exc:
            if _inflates_past(dctx, rest, max_size):
                raise DecodeError("decompressed-too-large",
                                  f"frame inflates past {max_size} bytes") from None
            raise DecodeError("bad-zstd", str(exc)) from None
        if len(body) > max_size:
            raise DecodeError("decompressed-too-large", f"frame inflates past {max_size} bytes")
        # One frame, complete, and nothing after it (decompress() does not say).
        check = dctx.decompressobj()
        check.decompress(rest)
        if not check.eof or check.unused_data:
            raise DecodeError("bad-zstd", "the frame is incomplete or followed by data")
        return body
