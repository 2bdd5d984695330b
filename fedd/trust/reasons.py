"""Why a device is, or is not, trusted: stable reason codes and the verdict of one check.

The codes are what the hub counts and logs and what a refused update carries
back to the device, so they never change meaning; add new ones, never reuse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["DESCRIPTIONS", "Reason", "Verdict"]


class Reason(enum.StrEnum):
    """Why a quote, an update signature or an enrollment was refused."""

    MALFORMED = "malformed"
    NO_TPM = "no-tpm"
    NOT_ENROLLED = "not-enrolled"
    WRONG_KEY = "wrong-key"
    BAD_SIGNATURE = "bad-signature"
    NONCE_UNKNOWN = "nonce-unknown"
    NONCE_EXPIRED = "nonce-expired"
    PCR_MISSING = "pcr-missing"
    PCR_DIGEST_MISMATCH = "pcr-digest-mismatch"
    PCR_NOT_ALLOWED = "pcr-not-allowed"
    NO_POLICY = "no-policy"
    NEVER_ATTESTED = "never-attested"
    TRUST_EXPIRED = "trust-expired"


DESCRIPTIONS: dict[Reason, str] = {
    Reason.MALFORMED: "bytes that do not parse strictly as what they claim to be (too long, "
                      "truncated, trailing bytes, wrong TPM magic or type, unsupported algorithm)",
    Reason.NO_TPM: "the device says it has no usable TPM (and why)",
    Reason.NOT_ENROLLED: "no enrollment for this device, or one without an attestation key",
    Reason.WRONG_KEY: "the quote was made by another TPM key than the enrolled one",
    Reason.BAD_SIGNATURE: "the signature does not verify with the enrolled key (tampered data)",
    Reason.NONCE_UNKNOWN: "a nonce the hub never issued to this device, or already used (replay)",
    Reason.NONCE_EXPIRED: "a nonce the hub issued, but the answer came after it expired (stale)",
    Reason.PCR_MISSING: "the quote does not cover every PCR the device class's policy names",
    Reason.PCR_DIGEST_MISMATCH: "the PCR values sent do not hash to the digest the TPM signed",
    Reason.PCR_NOT_ALLOWED: "a PCR value that the policy does not allow for the device class",
    Reason.NO_POLICY: "the PCR policy has no entry for the device's class",
    Reason.NEVER_ATTESTED: "the device has not passed a challenge since the hub started",
    Reason.TRUST_EXPIRED: "the device's trust window ran out before it answered a new challenge",
}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check for one device: ok, or the reason and a sentence."""

    device_id: str
    reason: Reason | None
    detail: str
    at: float  # the hub's clock (seconds, time.time()) when the check was made

    @property
    def ok(self) -> bool:
        return self.reason is None

    @classmethod
    def accept(cls, device_id: str, at: float, detail: str = "trusted") -> Verdict:
        return cls(device_id, None, detail, at)

    @classmethod
    def refuse(cls, device_id: str, reason: Reason, detail: str, at: float) -> Verdict:
        return cls(device_id, Reason(reason), detail, at)
