"""The update codec pipeline: one part's float32 delta ↔ a few bytes (pure numpy, no I/O).

A stack of small stages, chosen by a spec string from config, each with the
device-side encode and the matching strict hub-side decode (stage.py says
how stages fit together)::

    topk:0.01+q:4+zstd     top-k 1 % (error feedback) → 4-bit values → zstd
    f16                    float16, dense
    q:8 / q:2:64           b-bit unbiased stochastic quantization, chunk scales
    sign                   scaled sign, 1 bit a value (use with error feedback)
    float32                the identity; the baseline

Stages: ``topk:FRACTION|COUNT`` (or ``topk:1%``), then one value coding
(``float32``, ``f16``, ``q:BITS[:CHUNK]`` with BITS in 1/2/4/8, ``sign[:CHUNK]``;
default ``float32``), then optionally ``zstd[:LEVEL]``. A bad spec raises
`SpecError` (a ValueError) with a sentence that says what to write.

API
---
Device::

    pipe = Pipeline.from_spec("topk:0.01+q:4+zstd")   # pipe.spec == "topk:0.01+q:4:256+zstd:3"
    out = pipe.encode(delta, residual, rng=rng)       # residual: None the first time
    out.payload, out.residual, out.measurements       # keep out.residual for the next encode
    pipe.max_payload_bytes(len(delta))                # worst case, for a link budget
    pipe.error_feedback_safe(len(delta))              # False: the residual would grow (q:1)

Hub (any stack: payloads describe their own; or ``pipe.decode``/``pipe.accumulate``
to accept only that pipeline's stack)::

    vector = decode(payload, length=8288, max_bytes=65536)     # finite float32, or DecodeError
    accumulate(total, payload, weight, max_bytes=65536)        # total += weight·update
    read(payload, length=..., max_bytes=...)                   # Decoded: indices, values, stack
    largest_payload(8288)                                      # a max_bytes every stack fits

`DecodeError.reason` is one of `REASONS` (errors.py), a stable code to count.
`accumulate` checks the whole payload before it touches the sum, and folds a
sparse update in with ``total[idx] += w·v``: the top-k scatter is the decode
that commutes with the sum; dequantization, the f16 cast, index and zstd
decoding run per update (its docstring says why).
Measurements are nested by stage name; for "topk:0.01+q:4+zstd" on 8288
values: ``{"topk": {"kept": 83, "density": 0.01, "index_coding": "varint",
"index_bytes": 108}, "q": {"bits": 4, "chunk": 256, "scales": 1, "bytes": 44},
"zstd": {"level": 3, "in": 152, "out": 153, "ratio": 0.99, "stored": True},
"error_feedback": {"residual_norm": 0.127, "carried": 0.81}, "values": 8288,
"bytes": 162}`` (zstd stored the body: 152 bytes of indices and 4-bit values
do not shrink).

Wire layout of one part (all integers little-endian; varint = unsigned LEB128)
-------------------------------------------------------------------------------
::

    u8      pipeline format version, 1
    u8      number of stages S (1-3)
    S x     stage code u8 and its parameters:
              0x10 topk       (none: k is in the index section)
              0x01 float32    (none)
              0x02 f16        (none)
              0x03 q          u8 bits (1, 2, 4, 8), u8 log2 chunk (0-16)
              0x04 sign       u8 log2 chunk (0-16)
              0x20 zstd       (none: the level is the encoder's)
    varint  n, the part length (must equal the hub's expected length)
    body    if zstd: u8 flag, 0 = body stored as is, 1 = one magicless zstd frame
            (no checksum, content size or dict id) of the body; the body is:
              [index section, if topk]   indices.py: u8 0 + varint k + k varint gaps,
                                         or u8 1 + ceil(n/8) bitmap bytes
              [value section]            m = n (dense) or k (sparse) values:
                float32   4m bytes
                f16       2m bytes binary16
                q:b:c     ceil(m/c) bfloat16 scales (2 bytes), then ceil(m·b/8) bytes of
                          b-bit level numbers, LSB-first
                sign:c    ceil(m/c) bfloat16 scales, then ceil(m/8) bytes of sign bits

For example "topk:0.001+q:4+zstd" on har-mlp's body (8288 values, k = 8) is
7 header bytes (``01 03 10 03 04 08 20``: version, S = 3, topk, q 4 bits
chunk 2**8, zstd), 2 bytes of n (``e0 40``), the zstd flag (stored: such a
body does not shrink), a varint index section of about 1 + 1 + 8·~1.6 bytes,
one 2-byte scale and 4 bytes of 4-bit levels: about 33 bytes against 33,152
of float32. Scales are bfloat16, the high half of a float32: float32's
range in 2 bytes (packing.py says why).

Strictness: `read` checks in this order and stops at the first failure:
size (`too-large`), version, stage count and codes, parameters, stack shape,
stack match, n, zstd flag / frame / size bound, index section, values,
nothing left over. Every allocation is bounded by the expected length.
"""

from fedd.pipeline.errors import REASONS, DecodeError, PipelineError, SpecError
from fedd.pipeline.pipeline import (
    MAX_LENGTH,
    VERSION,
    Decoded,
    Encoded,
    Pipeline,
    accumulate,
    decode,
    largest_payload,
    read,
)

__all__ = ["MAX_LENGTH", "REASONS", "VERSION", "DecodeError", "Decoded", "Encoded", "Pipeline",
           "PipelineError", "SpecError", "accumulate", "decode", "largest_payload", "read"]
