"""What a stage is: the data kinds it takes and gives, and its three roles.

A part's update flows through a stack of stages. The data between two stages
is one of three *kinds*:

- ``DENSE``: a float32 vector of the part's full length (the delta);
- ``SPARSE``: sorted unique indices into that vector and their float32 values;
- ``BYTES``: the encoded body;
- ``COMPRESSED``: the body after the byte coder, which nothing takes, so the
  byte coder is last.

Each stage declares which kinds it takes and which it gives, and plays one
of three roles, each a base class with its own device-side ``encode`` and
matching hub-side ``decode``:

- a :class:`Sparsifier` (``topk``) picks which entries to send, DENSE → SPARSE;
  its indices are written by the index coding (``indices.py``);
- a :class:`ValueCodec` (``float32``, ``f16``, ``q``, ``sign``) turns the float
  values of a DENSE or SPARSE vector into bytes, and tells the encoder the
  exact values the hub will decode (what error feedback subtracts);
- a :class:`ByteCoder` (``zstd``) turns the body into fewer bytes, BYTES → COMPRESSED.

A future dense transform (clipping, DP noise, a random rotation) would be a
fourth role, DENSE → DENSE, placed before the sparsifier.

Every stage has a wire ``code`` (one byte) and writes its decode-relevant
parameters after it in the payload header (``header()``); ``spec()`` is its
canonical text form in a config. Encoder-only parameters (the top-k fraction,
the zstd level) are not on the wire: the hub does not need them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from fedd.pipeline._args import no_args
from fedd.pipeline.reader import Reader

__all__ = ["ByteCoder", "Kind", "Sparsifier", "Stage", "ValueCodec"]

Measurements = dict[str, Any]


class Kind(enum.Enum):
    DENSE = "a dense vector"
    SPARSE = "a sparse vector (indices and values)"
    BYTES = "bytes"
    COMPRESSED = "compressed bytes"


class Stage(ABC):
    """One swappable step of the pipeline; subclasses set the class attributes."""

    name: ClassVar[str]  # the spec name and the key of its measurements
    code: ClassVar[int]  # the wire code
    takes: ClassVar[frozenset[Kind]]
    gives: ClassVar[Kind]
    usage: ClassVar[str]  # how to write it in a spec, for error messages

    @classmethod
    def from_args(cls, args: list[str]) -> Stage:
        """Build from the ':'-separated arguments of a spec; raise SpecError if bad.

        This default is for stages without parameters; the others override it.
        """
        no_args(cls.name, args, cls.usage)
        return cls()

    @classmethod
    def from_header(cls, reader: Reader) -> Stage:
        """Build the decode side from the parameters after the code byte."""
        return cls.from_args([])

    def header(self) -> bytes:
        """The code byte and the parameters the decoder needs."""
        return bytes([self.code])

    def spec(self) -> str:
        """Canonical spec text, every parameter explicit (here: no parameters)."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.spec())


class Sparsifier(Stage):
    """DENSE → SPARSE: chooses the entries to send."""

    takes = frozenset({Kind.DENSE})
    gives = Kind.SPARSE

    @abstractmethod
    def select(self, vector: np.ndarray) -> np.ndarray:
        """Sorted unique int64 indices of the entries to send (device side)."""

    @abstractmethod
    def max_kept(self, length: int) -> int:
        """The most entries a valid message of this stage holds."""


class ValueCodec(Stage):
    """Float values (a dense vector or a sparse vector's values) ↔ bytes."""

    takes = frozenset({Kind.DENSE, Kind.SPARSE})
    gives = Kind.BYTES
    stochastic: ClassVar[bool] = False

    @abstractmethod
    def encode(self, values: np.ndarray, rng: np.random.Generator
               ) -> tuple[bytes, np.ndarray, Measurements]:
        """(bytes, the float32 values the hub will decode from them, measurements)."""

    @abstractmethod
    def decode(self, reader: Reader, count: int) -> np.ndarray:
        """Read `count` values: a finite float32 vector, or DecodeError."""

    @abstractmethod
    def max_bytes(self, count: int) -> int:
        """Exact size of the encoding of `count` values."""

    def contractive(self, count: int) -> bool:
        """Whether E||decoded - x||^2 < ||x||^2 for every x of `count` values.

        Error feedback needs it: a codec whose error can exceed the vector
        feeds back more than it removes, and the residual grows round after
        round. Exact and rounding codecs are; see Quantize for the exception.
        """
        return True


class ByteCoder(Stage):
    """BYTES → COMPRESSED: an entropy coder over the whole body; always the last stage."""

    takes = frozenset({Kind.BYTES})
    gives = Kind.COMPRESSED

    @abstractmethod
    def encode(self, body: bytes) -> tuple[bytes, Measurements]: ...

    @abstractmethod
    def decode(self, data: bytes, *, max_size: int) -> bytes:
        """The body, at most `max_size` bytes, or DecodeError."""

    def overhead(self) -> int:
        """Bytes it may add to an incompressible body."""
        return 0
