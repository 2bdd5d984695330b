"""The hub's check of one challenge answer: `verify_quote` gives a `Verdict` with one reason.

In this order, each refusal with its own stable code (`fedd.trust.reasons`):

1. ``no-tpm``: the device answered that it has no usable TPM;
2. ``not-enrolled``: its enrollment has no attestation key;
3. ``malformed``: the attest or signature bytes do not parse strictly, are
   not a TPM-generated quote, not ECDSA-SHA256, not over the SHA-256 bank;
4. ``wrong-key``: the TPM names another signer than the enrolled AK;
5. ``bad-signature``: the signature does not verify with the enrolled AK
   (the attest bytes were changed);
6. ``nonce-unknown`` / ``nonce-expired``: the signed nonce was never issued
   to this device or was used before (replay) / was issued but has expired
   (stale). Only a correctly signed quote can use up a nonce;
7. ``pcr-digest-mismatch``: the PCR values sent are not the ones the TPM
   quoted (a different selection, or values that do not hash to the signed
   digest);
8. ``no-policy`` / ``pcr-missing`` / ``pcr-not-allowed``: the policy has no
   entry for the device's class / the quote leaves out a PCR the policy
   names / a PCR value is not one the policy allows.

Feed the verdict to `fedd.trust.state.TrustState.record`.
"""

from __future__ import annotations

from fedd.trust.attest import Refusal, check_signed_quote, pcr_digest
from fedd.trust.enrollments import Enrollment
from fedd.trust.nonces import NonceBook
from fedd.trust.policy import PcrPolicy
from fedd.trust.quote import NoTpm, Quote
from fedd.trust.reasons import Reason, Verdict

__all__ = ["Reason", "Verdict", "verify_quote"]


def verify_quote(enrollment: Enrollment, attestation: Quote | NoTpm, nonces: NonceBook,
                 policy: PcrPolicy, now: float) -> Verdict:
    """Check a device's answer to a challenge against its enrollment, nonces and policy."""
    device = enrollment.device_id

    def refuse(reason: Reason, detail: str) -> Verdict:
        return Verdict.refuse(device, reason, detail, now)

    if isinstance(attestation, NoTpm):
        return refuse(Reason.NO_TPM, attestation.reason)
    if not isinstance(attestation, Quote):
        return refuse(Reason.MALFORMED, f"not a quote: {type(attestation).__name__}")
    if enrollment.ak is None:
        return refuse(Reason.NOT_ENROLLED, "enrolled without a TPM attestation key"
                      + (f" ({enrollment.no_tpm})" if enrollment.no_tpm else ""))
    try:
        quoted = check_signed_quote(enrollment.ak, attestation.attest, attestation.signature)
    except Refusal as refusal:
        return refuse(refusal.reason, refusal.detail)
    nonce_reason = nonces.redeem(device, quoted.extra_data, now)
    if nonce_reason is Reason.NONCE_EXPIRED:
        return refuse(nonce_reason, "the quote answers a nonce that had expired")
    if nonce_reason is not None:
        return refuse(Reason.NONCE_UNKNOWN, "the quote answers a nonce not issued to this "
                                            "device, or one already used")
    if quoted.pcrs != tuple(attestation.pcrs):
        return refuse(Reason.PCR_DIGEST_MISMATCH, f"PCR values sent for {list(attestation.pcrs)}"
                                                  f", but the TPM quoted {list(quoted.pcrs)}")
    if pcr_digest(tuple(attestation.pcrs.values())) != quoted.pcr_digest:
        return refuse(Reason.PCR_DIGEST_MISMATCH, "the PCR values sent do not hash to the "
                                                  "digest the TPM signed")
    reason, detail = policy.check(enrollment.device_class, attestation.pcrs)
    if reason is not None:
        return refuse(reason, detail)
    return Verdict.accept(device, now, f"quote over PCRs {list(quoted.pcrs)} verified")
