"""The attestation a device sends to the hub: a TPM quote, or an explicit "no TPM".

A `Quote` carries the TPM's own bytes untouched: ``attest`` is the marshalled
TPMS_ATTEST (the content of the TPM2B_ATTEST that TPM2_Quote returns, nonce
and PCR digest inside), ``signature`` the marshalled TPMT_SIGNATURE over it,
and ``pcrs`` the SHA-256 PCR values the device read for the same selection,
which the hub hashes and compares with the signed digest.

`to_dict` gives CBOR-ready values (bytes, int keys); `from_dict` is strict and
bounded and raises `AttestationFormatError` for anything else, so a hub can
decode attacker bytes with it directly.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ATTEST_BYTES",
    "MAX_PCR_INDEX",
    "MAX_REASON_CHARS",
    "MAX_SIGNATURE_BYTES",
    "AttestationFormatError",
    "NoTpm",
    "Quote",
    "attestation_from_dict",
]

MAX_ATTEST_BYTES = 1024  # a quote over one bank is ~150 bytes; TPMS_ATTEST is < 1 KiB
MAX_SIGNATURE_BYTES = 256  # ECDSA P-256 is 72 bytes marshalled
MAX_PCR_INDEX = 23  # PC Client TPMs have 24 PCRs per bank
PCR_DIGEST_SIZE = 32  # the SHA-256 bank
MAX_REASON_CHARS = 300


class AttestationFormatError(ValueError):
    """An attestation message that is not a well-formed `Quote` or `NoTpm`."""


@dataclass(frozen=True)
class Quote:
    """A TPM2 quote: signed attest bytes, the signature, the PCR values (index -> SHA-256)."""

    attest: bytes
    signature: bytes
    pcrs: Mapping[int, bytes]

    def __post_init__(self) -> None:
        for name, value, limit in (("attest", self.attest, MAX_ATTEST_BYTES),
                                   ("signature", self.signature, MAX_SIGNATURE_BYTES)):
            if not isinstance(value, bytes):
                raise AttestationFormatError(f"quote {name} must be bytes, "
                                             f"got {type(value).__name__}")
            if not 0 < len(value) <= limit:
                raise AttestationFormatError(f"quote {name} must be 1-{limit} bytes, "
                                             f"got {len(value)}")
        if not isinstance(self.pcrs, Mapping):
            raise AttestationFormatError("quote pcrs must be a mapping of index to value")
        if not 0 < len(self.pcrs) <= MAX_PCR_INDEX + 1:
            raise AttestationFormatError(f"a quote covers 1-{MAX_PCR_INDEX + 1} PCRs, "
                                         f"got {len(self.pcrs)}")
        pcrs = {}
        for index, value in self.pcrs.items():
            if type(index) is not int or not 0 <= index <= MAX_PCR_INDEX:
                raise AttestationFormatError(f"PCR index must be an int 0-{MAX_PCR_INDEX}, "
                                             f"got {index!r}")
            if not isinstance(value, bytes) or len(value) != PCR_DIGEST_SIZE:
                raise AttestationFormatError(f"PCR {index} must be {PCR_DIGEST_SIZE} bytes "
                                             f"(SHA-256 bank)")
            pcrs[index] = value
        object.__setattr__(self, "pcrs", types.MappingProxyType(dict(sorted(pcrs.items()))))

    def to_dict(self) -> dict[str, Any]:
        return {"attest": self.attest, "signature": self.signature, "pcrs": dict(self.pcrs)}

    def to_json_dict(self) -> dict[str, Any]:
        """The same with hex strings and string keys, for JSON files (enrollments)."""
        return {"attest": self.attest.hex(), "signature": self.signature.hex(),
                "pcrs": {str(i): v.hex() for i, v in self.pcrs.items()}}

    @classmethod
    def from_json_dict(cls, obj: Any) -> Quote:
        _check_keys(obj, {"attest", "signature", "pcrs"}, "quote")
        pcrs = obj["pcrs"]
        if not isinstance(pcrs, dict) or len(pcrs) > MAX_PCR_INDEX + 1:
            raise AttestationFormatError("quote pcrs must be an object of at most "
                                         f"{MAX_PCR_INDEX + 1} entries")
        decoded = {}
        for key, value in pcrs.items():
            if not (isinstance(key, str) and key.isdigit() and str(int(key)) == key
                    and len(key) <= 2):
                raise AttestationFormatError(f"PCR index must be a decimal string, got {key!r}")
            decoded[int(key)] = _unhex(value, f"PCR {key}", PCR_DIGEST_SIZE)
        return cls(_unhex(obj["attest"], "attest", MAX_ATTEST_BYTES),
                   _unhex(obj["signature"], "signature", MAX_SIGNATURE_BYTES), decoded)


@dataclass(frozen=True)
class NoTpm:
    """This device has no usable TPM; ``reason`` says why (for the operator, not for trust)."""

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason:
            raise AttestationFormatError("no_tpm needs a non-empty reason")
        if len(self.reason) > MAX_REASON_CHARS:
            object.__setattr__(self, "reason", self.reason[:MAX_REASON_CHARS - 1] + "…")

    def to_dict(self) -> dict[str, Any]:
        return {"no_tpm": self.reason}


def _check_keys(obj: Any, keys: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise AttestationFormatError(f"{what} must be a map, got {type(obj).__name__}")
    if set(obj) != keys:
        raise AttestationFormatError(f"{what} must have exactly the keys {sorted(keys)}, "
                                     f"got {sorted(map(str, obj))[:8]}")


def _unhex(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise AttestationFormatError(f"{what} must be a hex string of at most {limit} bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise AttestationFormatError(f"{what} is not hex") from None


def attestation_from_dict(obj: Any) -> Quote | NoTpm:
    """Decode `Quote.to_dict` or `NoTpm.to_dict` output (e.g. after cbor2), strictly."""
    if isinstance(obj, dict) and set(obj) == {"no_tpm"}:
        reason = obj["no_tpm"]
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise AttestationFormatError(f"no_tpm must be a string of at most "
                                         f"{MAX_REASON_CHARS} characters")
        return NoTpm(reason)
    _check_keys(obj, {"attest", "signature", "pcrs"}, "attestation")
    pcrs = obj["pcrs"]
    if not isinstance(pcrs, dict):
        raise AttestationFormatError("quote pcrs must be a map of index to value")
    return Quote(obj["attest"], obj["signature"], pcrs)
