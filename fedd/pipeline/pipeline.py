"""The pipeline: a checked stack of stages, its encode (device) and its strict decode (hub)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedd.pipeline import indices, spec, varint
from fedd.pipeline.errors import DecodeError, SpecError
from fedd.pipeline.reader import Reader
from fedd.pipeline.stage import ByteCoder, Sparsifier, Stage, ValueCodec

__all__ = ["MAX_LENGTH", "VERSION", "Decoded", "Encoded", "Pipeline", "accumulate", "decode",
           "largest_payload", "read"]

VERSION = 1
MAX_LENGTH = 1 << 26  # values in one part; as wire.MAX_PART_VALUES


@dataclass(frozen=True)
class Encoded:
    """What the device gets from one encode."""

    payload: bytes = field(repr=False)
    residual: np.ndarray = field(repr=False)  # keep it: the next encode's residual
    measurements: dict[str, Any]


@dataclass(frozen=True)
class Decoded:
    """A checked payload: `values` at `indices` (sorted, unique), or dense when indices is None."""

    stack: str  # the decode-side spec of the payload's stack, e.g. "topk+q:4:256+zstd"
    length: int
    indices: np.ndarray | None = field(repr=False)
    values: np.ndarray = field(repr=False)

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> np.ndarray:
        """The float32 vector of the part's length."""
        if self.indices is None:
            return self.values
        out = np.zeros(self.length, dtype=np.float32)
        out[self.indices] = self.values
        return out

    def add_to(self, total: np.ndarray, weight: float) -> None:
        """total += weight · this, touching only the sent entries when sparse."""
        scaled = np.multiply(self.values, weight, dtype=total.dtype)
        if self.indices is None:
            total += scaled
        else:
            total[self.indices] += scaled  # indices are unique: no np.add.at needed


@dataclass(frozen=True)
class _Roles:
    sparsifier: Sparsifier | None
    codec: ValueCodec
    coder: ByteCoder | None

    @classmethod
    def of(cls, stages: Sequence[Stage]) -> _Roles:
        return cls(next((s for s in stages if isinstance(s, Sparsifier)), None),
                   next(s for s in stages if isinstance(s, ValueCodec)),
                   next((s for s in stages if isinstance(s, ByteCoder)), None))

    def body_bound(self, length: int) -> int:
        """The largest body (before the byte coder) a valid message of `length` values has."""
        index = indices.max_bytes(length) if self.sparsifier else 0
        return index + self.codec.max_bytes(length)


def _norm(vector: np.ndarray) -> float:
    """L2 norm summed in float64 (a float32 dot overflows past ~1e19)."""
    return float(np.sqrt(np.einsum("i,i->", vector, vector, dtype=np.float64)))


def _header(stages: Sequence[Stage]) -> bytes:
    return bytes([VERSION, len(stages)]) + b"".join(stage.header() for stage in stages)


@dataclass(frozen=True)
class _Stack:
    """A valid payload header, parsed once: its bytes, decode-side stages and roles."""

    header: bytes
    roles: _Roles
    text: str


# Headers seen before. A valid header is prefix-free (its count and stage codes say
# where it ends), so a payload that starts with one parses to the same stack: the
# hub parses each stack once, not once per update. Bounded; replaced, never mutated.
_SEEN: tuple[_Stack, ...] = ()
_SEEN_MAX = 64
_SEEN_LOCK = threading.Lock()


def _stack(payload: bytes, reader: Reader) -> _Stack:
    global _SEEN
    for known in _SEEN:
        if payload.startswith(known.header):
            reader.pos = len(known.header)
            return known
    start = reader.pos - 1  # the version byte
    stages = spec.read_header(reader)
    parsed = _Stack(payload[start : reader.pos], _Roles.of(stages),
                    "+".join(s.spec() for s in stages))
    with _SEEN_LOCK:
        if len(_SEEN) < _SEEN_MAX:
            _SEEN = (*_SEEN, parsed)
    return parsed


def _check_length(length: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int | np.integer) \
            or not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"length must be an int in 0..{MAX_LENGTH}, got {length!r}")


def _as_bytes(payload: bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise TypeError(f"a payload is bytes, got {type(payload).__name__}")


def read(payload: bytes, *, length: int, max_bytes: int, expect: bytes | None = None
         ) -> Decoded:
    """Check and parse any pipeline payload of a part of `length` values.

    `expect` (a pipeline's header bytes) refuses any other stack as
    `stack-mismatch`. Raises `DecodeError` with a reason from `REASONS`.
    """
    payload = _as_bytes(payload)
    _check_length(length)
    if len(payload) > max_bytes:
        raise DecodeError("too-large", f"{len(payload)} bytes, the most is {max_bytes}")
    reader = Reader(payload)
    version = reader.byte("version")
    if version != VERSION:
        raise DecodeError("unknown-version", f"pipeline format {version} (this reads {VERSION})")
    stack = _stack(payload, reader)
    if expect is not None and stack.header != expect:
        raise DecodeError("stack-mismatch", stack.text)
    stated = reader.uvarint("part length")
    if stated != length:
        raise DecodeError("wrong-length", f"the payload is for {stated} values, expected {length}")
    roles = stack.roles
    body = reader.rest()
    if roles.coder is not None:
        body = roles.coder.decode(body, max_size=roles.body_bound(length))
    body_reader = Reader(body)
    where = indices.decode(body_reader, length) if roles.sparsifier else None
    values = roles.codec.decode(body_reader, length if where is None else where.size)
    body_reader.finish("the values")
    return Decoded(stack.text, length, where, values)


def largest_payload(length: int) -> int:
    """The longest valid payload of any stack for `length` values: a max_bytes for the hub.

    It is ``topk:1.0+float32+zstd`` stored: the longest header, n, the zstd
    flag, a full bitmap and 4 bytes a value.
    """
    _check_length(length)
    longest_header = 2 + 1 + 3 + 1  # version, count, topk, q (the longest codec), zstd
    return (longest_header + len(varint.encode_one(length)) + 1 + indices.max_bytes(length)
            + 4 * length)


def decode(payload: bytes, *, length: int, max_bytes: int) -> np.ndarray:
    """Any pipeline payload → a finite float32 vector of `length` values, or DecodeError."""
    return read(payload, length=length, max_bytes=max_bytes).dense()


def accumulate(total: np.ndarray, payload: bytes, weight: float, *, max_bytes: int,
               expect: bytes | None = None) -> Decoded:
    """total += weight · decode(payload), without a dense vector when the stack is sparse.

    What commutes with the sum, and so what the hub can defer (STYLE.md, point 1):

    - the top-k scatter is linear and the indices are unique, so
      Σ w_i·scatter(idx_i, v_i) is folded straight into `total` with
      ``total[idx] += w·v``: O(k) per update, no dense vector, no zeroing;
    - nothing else here commutes in a useful way: zstd and index decoding
      are not linear; the dequantization s_c·grid[code] is linear in the
      codes but each update has its own scales, so it runs per update (on
      the k sent values only); the float16 → float32 cast must happen
      before summing (a float16 sum would lose precision and overflow).
      A stage whose inverse is linear and shared by all updates of a
      version (e.g. a random rotation with a per-version seed) would be
      the one to run once per version on the sum.

    The payload is checked in full before `total` is touched: a rejected
    update changes nothing. Returns what was folded (its indices and values).
    """
    if not isinstance(total, np.ndarray) or total.ndim != 1 or total.dtype.kind != "f":
        raise TypeError("total must be a 1-D float numpy array")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    decoded = read(payload, length=total.size, max_bytes=max_bytes, expect=expect)
    decoded.add_to(total, weight)
    return decoded


class Pipeline:
    """A checked stack of stages: encode on the device, decode/accumulate on the hub."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages or not all(isinstance(stage, Stage) for stage in stages):
            raise SpecError("a pipeline needs one or more stages (fedd.pipeline.stage.Stage)")
        self._stages = tuple(spec.check(list(stages)))
        self._roles = _Roles.of(self._stages)
        self._header = _header(self._stages)

    @classmethod
    def from_spec(cls, text: str) -> Pipeline:
        """E.g. ``"topk:0.01+q:4+zstd"``; `SpecError` (a ValueError) says what is wrong."""
        return cls(spec.parse(text))

    @property
    def spec(self) -> str:
        """Canonical spec, every parameter explicit: ``from_spec(p.spec) == p``."""
        return "+".join(stage.spec() for stage in self._stages)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self._stages

    @property
    def header(self) -> bytes:
        """The payload's first bytes (version, stack), the same for every encode."""
        return self._header

    @property
    def sparse(self) -> bool:
        return self._roles.sparsifier is not None

    @property
    def stochastic(self) -> bool:
        return self._roles.codec.stochastic

    def __repr__(self) -> str:
        return f"Pipeline.from_spec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def error_feedback_safe(self, length: int) -> bool:
        """Whether error feedback provably keeps the residual bounded for parts of `length`.

        True when the stack's error is contractive in expectation (top-k is;
        the value codec must be too, see ValueCodec.contractive): dense
        ``q:1`` and ``q:2`` are not, and their residual grows without bound
        under error feedback. Check it where the spec is configured.
        """
        _check_length(length)
        kept = self._roles.sparsifier.max_kept(length) if self._roles.sparsifier else length
        return self._roles.codec.contractive(kept)

    def max_payload_bytes(self, length: int) -> int:
        """The most bytes an encode of `length` values can give (for link budgets)."""
        _check_length(length)
        roles = self._roles
        kept = length
        size = len(self._header) + len(varint.encode_one(length))
        if roles.sparsifier is not None:
            kept = roles.sparsifier.max_kept(length)
            widest = len(varint.encode_one(max(length - 1, 0)))
            listed = len(varint.encode_one(kept)) + kept * widest
            size += 1 + min(listed, indices.max_bytes(length) - 1)
        size += roles.codec.max_bytes(kept)
        return size + (roles.coder.overhead() if roles.coder else 0)

    def encode(self, delta: np.ndarray, residual: np.ndarray | None = None, *,
               rng: np.random.Generator | None = None) -> Encoded:
        """Encode one part's delta, with error feedback.

        The stages see ``accumulated = residual + delta`` (float32); the
        returned residual is ``accumulated - sent``, where *sent* is exactly
        the vector the hub will decode (after sparsification *and*
        quantization, so both errors are fed back). Keep it and pass it to the
        next encode of the same part; pass None (zeros) to start or to opt
        out. `rng` drives stochastic quantization; None means fresh OS entropy.
        Error feedback diverges on a stack that is not `error_feedback_safe`;
        ``measurements["error_feedback"]["carried"]`` (||residual|| / ||residual
        + delta||) above 1 shows a round that grew the residual.
        """
        delta = np.asarray(delta)
        if delta.ndim != 1 or delta.dtype.kind not in "fiu":
            raise ValueError(f"delta must be a 1-D numeric vector, got {delta.dtype} "
                             f"{delta.shape}")
        _check_length(delta.size)
        accumulated = delta.astype(np.float32)  # a copy
        if residual is not None:
            residual = np.asarray(residual)
            if residual.shape != delta.shape:
                raise ValueError(f"residual has shape {residual.shape}, delta {delta.shape}")
            accumulated += residual
        if not np.isfinite(accumulated).all():
            raise ValueError("delta + residual holds NaN or Inf: nothing was encoded")
        if rng is None and self.stochastic:
            rng = np.random.default_rng()
        roles = self._roles
        length = accumulated.size
        measurements: dict[str, Any] = {}
        section = b""
        values = accumulated
        where = None
        if roles.sparsifier is not None:
            where = roles.sparsifier.select(accumulated)
            section, mode = indices.encode(where, length)
            values = accumulated[where]
            measurements[roles.sparsifier.name] = {
                "kept": int(where.size), "density": where.size / length if length else 0.0,
                "index_coding": mode, "index_bytes": len(section)}
        coded, sent, stats = roles.codec.encode(values, rng)
        measurements[roles.codec.name] = {**stats, "bytes": len(coded)}
        body = section + coded
        if roles.coder is not None:
            body, stats = roles.coder.encode(body)
            measurements[roles.coder.name] = stats
        payload = self._header + varint.encode_one(length) + body
        if where is None:
            new_residual = accumulated - sent
        else:
            new_residual = accumulated.copy()
            new_residual[where] = values - sent
        carried, total = _norm(new_residual), _norm(accumulated)
        measurements["error_feedback"] = {"residual_norm": carried,
                                          "carried": carried / total if total else 0.0}
        measurements["values"] = length
        measurements["bytes"] = len(payload)
        return Encoded(payload, new_residual, measurements)

    def read(self, payload: bytes, *, length: int, max_bytes: int) -> Decoded:
        """`read` that also refuses a payload of another stack (`stack-mismatch`)."""
        return read(payload, length=length, max_bytes=max_bytes, expect=self._header)

    def decode(self, payload: bytes, *, length: int, max_bytes: int) -> np.ndarray:
        """A payload of this stack → finite float32 vector of `length`, or DecodeError."""
        return self.read(payload, length=length, max_bytes=max_bytes).dense()

    def accumulate(self, total: np.ndarray, payload: bytes, weight: float, *,
                   max_bytes: int) -> Decoded:
        """Module `accumulate` restricted to this stack (see there for what commutes)."""
        return accumulate(total, payload, weight, max_bytes=max_bytes, expect=self._header)
