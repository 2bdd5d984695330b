"""The two ways a pipeline says no: a bad spec (config) and a bad payload (wire)."""

from __future__ import annotations

__all__ = ["REASONS", "DecodeError", "PipelineError", "SpecError"]

# Every reason a decoder can give, with what it means. Stable codes: the hub counts them.
REASONS: dict[str, str] = {
    "too-large": "the payload is longer than max_bytes",
    "truncated": "the payload ends inside a field or section",
    "trailing-bytes": "bytes are left after the last section",
    "unknown-version": "the first byte is not a pipeline format this code reads",
    "unknown-stage": "a stage code this code does not know",
    "bad-stack": "known stages in an order or number no encoder writes",
    "bad-parameter": "a stage parameter out of its range (e.g. 3 bits)",
    "stack-mismatch": "a valid stack, but not the one this pipeline decodes",
    "wrong-length": "the payload's part length differs from the expected one",
    "bad-varint": "a varint longer than allowed or not in its shortest form",
    "bad-index-coding": "an unknown index-coding flag, or a varint list longer than the bitmap",
    "bad-count": "more sparse values announced than the part has",
    "index-out-of-range": "an index >= the part length (a bitmap bit past the end included)",
    "duplicate-index": "a zero gap between two sparse indices",
    "non-finite": "a NaN or an infinity among the values or the scales",
    "bad-scale": "a negative per-chunk scale",
    "bad-padding": "non-zero padding bits after the last packed code",
    "bad-zstd": "an unknown zstd flag, or a frame that is corrupt, truncated or followed by data",
    "decompressed-too-large": "a zstd frame that inflates past the largest valid body",
}


class PipelineError(ValueError):
    """Base of the pipeline's own errors."""


class SpecError(PipelineError):
    """A codec spec (from config) that names no valid stack; the message says why."""


class DecodeError(PipelineError):
    """An encoded part the hub must refuse; `reason` is one of `REASONS`, `detail` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:  # a typo here would split a counter in two
            raise AssertionError(f"undocumented decode reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
