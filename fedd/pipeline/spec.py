"""From a spec string to a checked stack of stages, and from a payload header back.

Spec grammar: stages joined by '+', each ``name[:arg[:arg]]``, spaces around
them ignored, e.g. ``topk:0.01+q:4+zstd``. A stack is at most one sparsifier,
then one value coding, then at most one byte coder, in that order; a stack
without a value coding uses ``float32``. Anything else is refused with a
`SpecError` that says what to write instead.
"""

from __future__ import annotations

import difflib

from fedd.pipeline.errors import DecodeError, SpecError
from fedd.pipeline.float16 import Float16
from fedd.pipeline.float32 import Float32
from fedd.pipeline.quantize import Quantize
from fedd.pipeline.reader import Reader
from fedd.pipeline.sign import Sign
from fedd.pipeline.stage import ByteCoder, Kind, Sparsifier, Stage, ValueCodec
from fedd.pipeline.topk import TopK
from fedd.pipeline.zstd import Zstd

__all__ = ["MAX_STAGES", "STAGES", "check", "parse", "read_header"]

STAGE_CLASSES: tuple[type[Stage], ...] = (TopK, Float32, Float16, Quantize, Sign, Zstd)
STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in STAGE_CLASSES}
ALIASES = {"f32": "float32", "float16": "f16", "fp16": "f16"}
BY_CODE: dict[int, type[Stage]] = {cls.code: cls for cls in STAGE_CLASSES}
MAX_STAGES = 3
VALUE_CODINGS = "float32, f16, q:BITS or sign"


def _stage(token: str, spec: str) -> Stage:
    name, *args = [part.strip() for part in token.split(":")]
    name = ALIASES.get(name.lower(), name.lower())
    if name not in STAGES:
        close = difflib.get_close_matches(name, [*STAGES, *ALIASES], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        known = ", ".join(cls.usage.split(" ")[0].rstrip(",") for cls in STAGE_CLASSES)
        raise SpecError(f"unknown stage '{token}' in '{spec}'{hint}; the stages are {known}")
    return STAGES[name].from_args(args)


def _refusal(stage: Stage, kind: Kind, before: Stage | None) -> str:
    """Why `stage` cannot take `kind` (which `before` gave), and what to write."""
    after = f" after '{before.spec()}'" if before else ""
    if isinstance(stage, Sparsifier):
        if kind is Kind.SPARSE:
            return f"'{stage.spec()}'{after}: a stack has at most one sparsifier"
        return (f"'{stage.spec()}' must come before the value coding{after}: top-k picks "
                f"entries of the float delta, then their values are coded "
                f"(e.g. 'topk:0.01+q:4+zstd')")
    if isinstance(stage, ValueCodec):
        if isinstance(before, ByteCoder):
            return (f"'{stage.spec()}'{after}: '{before.name}' compresses the finished bytes "
                    f"and must be the last stage (e.g. 'topk:0.01+q:4+zstd')")
        return (f"'{stage.spec()}'{after}: a stack has one value coding "
                f"({VALUE_CODINGS})")
    if isinstance(stage, ByteCoder):
        return f"'{stage.spec()}'{after}: a stack has at most one byte coder, and it comes last"
    return f"'{stage.spec()}' cannot take {kind.value}{after}"  # pragma: no cover


def check(stages: list[Stage]) -> list[Stage]:
    """The stack with `float32` inserted where the value coding is missing; SpecError if bad."""
    out: list[Stage] = []
    kind = Kind.DENSE
    for stage in stages:
        if isinstance(stage, ByteCoder) and kind in (Kind.DENSE, Kind.SPARSE):
            out.append(Float32())  # 'zstd' alone, 'topk:0.01+zstd': float32 values
            kind = Kind.BYTES
        if kind not in stage.takes:
            raise SpecError(_refusal(stage, kind, out[-1] if out else None))
        out.append(stage)
        kind = stage.gives
    if kind in (Kind.DENSE, Kind.SPARSE):
        out.append(Float32())
    return out


def parse(spec: str) -> list[Stage]:
    """A spec string → its checked stack."""
    if not isinstance(spec, str):
        raise SpecError(f"a codec spec is a string like 'topk:0.01+q:4+zstd', got "
                        f"{type(spec).__name__}")
    tokens = [token.strip() for token in spec.split("+")]
    if not spec.strip():
        raise SpecError("the codec spec is empty: write e.g. 'float32', 'f16' or "
                        "'topk:0.01+q:4+zstd'")
    if not all(tokens):
        raise SpecError(f"an empty stage in '{spec}' (two '+' in a row, or one at an end)")
    return check([_stage(token, spec) for token in tokens])


def read_header(reader: Reader) -> list[Stage]:
    """Read the stage count and descriptors after the version byte; DecodeError if bad."""
    count = reader.byte("stage count")
    if not 1 <= count <= MAX_STAGES:
        raise DecodeError("bad-stack", f"{count} stages (1 to {MAX_STAGES} exist)")
    stages = []
    for _ in range(count):
        code = reader.byte("stage code")
        if code not in BY_CODE:
            raise DecodeError("unknown-stage", f"stage code {code:#04x}")
        stages.append(BY_CODE[code].from_header(reader))
    kind = Kind.DENSE
    for stage in stages:
        if kind not in stage.takes:
            raise DecodeError("bad-stack", "+".join(s.spec() for s in stages))
        kind = stage.gives
    if kind in (Kind.DENSE, Kind.SPARSE):
        raise DecodeError("bad-stack", "+".join(s.spec() for s in stages) + " has no value coding")
    return stages
