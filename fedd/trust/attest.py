"""TPM structures the hub must read from attacker bytes: the AK's public area, quotes, signatures.

Parsing uses tpm2-pytss's marshalling types (the TSS's own ``Tss2_MU_*``
unmarshallers, bounds-checked C), and on top of them this module is strict:
every buffer has a size bound, must be consumed exactly and re-marshal to
the same bytes, and may hold only what fedd's attestation key produces: an
ECC NIST P-256 restricted signing key with ECDSA-SHA256, a primary object of
the endorsement hierarchy, quoting the SHA-256 PCR bank.

A refusal is a `Refusal` carrying a `Reason` (malformed, wrong-key,
bad-signature) and a sentence; nothing here raises anything else on bad input.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_RH, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from fedd.trust.quote import MAX_ATTEST_BYTES, MAX_PCR_INDEX, MAX_SIGNATURE_BYTES
from fedd.trust.reasons import Reason

__all__ = [
    "AK_ATTRIBUTES",
    "MAX_PUBLIC_BYTES",
    "AkPublic",
    "AttestedQuote",
    "Refusal",
    "check_signed_quote",
    "parse_ak_public",
    "parse_attest",
    "pcr_digest",
]

# A restricted signing key that never leaves this TPM: what tpm2_createak makes.
AK_ATTRIBUTES = int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
                    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                    | TPMA_OBJECT.USERWITHAUTH)
MAX_PUBLIC_BYTES = 512  # our AK's TPMT_PUBLIC is 88 bytes
NAME_ALG_SHA256 = struct.pack(">H", int(TPM2_ALG.SHA256))
ECC_COORDINATE_BYTES = 32


class Refusal(Exception):
    """A TPM structure or signature the hub refuses, with the reason code and a sentence."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = Reason(reason)
        self.detail = detail


@dataclass(frozen=True)
class AkPublic:
    """An attestation key's public area (marshalled TPMT_PUBLIC) and what follows from it."""

    public: bytes
    name: bytes  # nameAlg || SHA-256(public): the TPM's name for the key
    qualified_name: bytes  # nameAlg || SHA-256(TPM_RH_ENDORSEMENT || name): as a quote states it
    key: ec.EllipticCurvePublicKey

    @property
    def pem(self) -> str:
        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class AttestedQuote:
    """The parts of a parsed TPMS_ATTEST (type quote) that the hub checks."""

    qualified_signer: bytes
    extra_data: bytes  # the qualifying data: the hub's nonce
    pcrs: tuple[int, ...]  # the SHA-256 PCRs the digest covers, ascending
    pcr_digest: bytes
    reset_count: int
    restart_count: int


def _malformed(detail: str) -> Refusal:
    return Refusal(Reason.MALFORMED, detail)


def _unmarshal(cls: type, data: bytes, limit: int, what: str):  # type: ignore[no-untyped-def]
    if not isinstance(data, bytes) or not 0 < len(data) <= limit:
        raise _malformed(f"{what} must be 1-{limit} bytes")
    try:
        value, used = cls.unmarshal(data)
        again = value.marshal()
    except Exception as error:  # the TSS raises TSS2_Exception; cffi may raise others
        raise _malformed(f"{what} does not parse: {error}") from None
    if used != len(data):
        raise _malformed(f"{what} has {len(data) - used} trailing bytes")
    if again != data:
        raise _malformed(f"{what} is not in canonical form")
    return value


def qualified_name(name: bytes) -> bytes:
    """The qualified name of a primary object of the endorsement hierarchy with this name."""
    digest = hashlib.sha256(struct.pack(">I", int(TPM2_RH.ENDORSEMENT)) + name).digest()
    return NAME_ALG_SHA256 + digest


def parse_ak_public(data: bytes) -> AkPublic:
    """Parse a marshalled TPMT_PUBLIC; refuse anything but fedd's AK template."""
    public = _unmarshal(TPMT_PUBLIC, data, MAX_PUBLIC_BYTES, "the AK public area")
    ecc = public.parameters.eccDetail
    checks = (
        (public.type == TPM2_ALG.ECC, "is not an ECC key"),
        (public.nameAlg == TPM2_ALG.SHA256, "does not use SHA-256 names"),
        (int(public.objectAttributes) == AK_ATTRIBUTES,
         f"has attributes {int(public.objectAttributes):#x}, not those of an AK "
         f"({AK_ATTRIBUTES:#x}: restricted|sign|fixedTPM|fixedParent|sensitiveDataOrigin"
         "|userWithAuth)"),
        (len(bytes(public.authPolicy)) == 0, "has an authorization policy"),
        (ecc.symmetric.algorithm == TPM2_ALG.NULL, "has a symmetric algorithm"),
        (ecc.scheme.scheme == TPM2_ALG.ECDSA
         and ecc.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256, "does not sign ECDSA-SHA256"),
        (ecc.curveID == TPM2_ECC.NIST_P256, "is not on NIST P-256"),
        (ecc.kdf.scheme == TPM2_ALG.NULL, "has a KDF"),
    )
    for ok, why in checks:
        if not ok:
            raise _malformed(f"the AK public area {why}")
    x, y = bytes(public.unique.ecc.x), bytes(public.unique.ecc.y)
    if len(x) != ECC_COORDINATE_BYTES or len(y) != ECC_COORDINATE_BYTES:
        raise _malformed("the AK's point coordinates are not 32 bytes each")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise _malformed("the AK's point is not on P-256") from None
    name = NAME_ALG_SHA256 + hashlib.sha256(data).digest()
    return AkPublic(public=data, name=name, qualified_name=qualified_name(name), key=key)


def _selected(selection) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    if selection.count != 1:
        raise _malformed(f"the quote covers {selection.count} PCR banks, fedd quotes one (SHA-256)")
    bank = selection.pcrSelections[0]
    if bank.hash != TPM2_ALG.SHA256:
        raise _malformed("the quote is not over the SHA-256 PCR bank")
    size = bank.sizeofSelect
    if not 1 <= size <= (MAX_PCR_INDEX + 8) // 8:
        raise _malformed(f"a PCR select of {size} bytes")
    bits = bytes(bank.pcrSelect[i] for i in range(size))
    pcrs = tuple(8 * i + j for i, byte in enumerate(bits) for j in range(8) if byte >> j & 1)
    if not pcrs:
        raise _malformed("the quote selects no PCR")
    return pcrs


def parse_attest(data: bytes) -> AttestedQuote:
    """Parse a marshalled TPMS_ATTEST that must be a TPM-generated quote."""
    attest = _unmarshal(TPMS_ATTEST, data, MAX_ATTEST_BYTES, "the attest structure")
    if attest.magic != TPM2_GENERATED.VALUE:
        raise _malformed("the attest structure was not generated by a TPM (magic)")
    if attest.type != TPM2_ST.ATTEST_QUOTE:
        raise _malformed("the attest structure is not a quote")
    quote = attest.attested.quote
    return AttestedQuote(
        qualified_signer=bytes(attest.qualifiedSigner),
        extra_data=bytes(attest.extraData),
        pcrs=_selected(quote.pcrSelect),
        pcr_digest=bytes(quote.pcrDigest),
        reset_count=int(attest.clockInfo.resetCount),
        restart_count=int(attest.clockInfo.restartCount),
    )


def _der_signature(data: bytes) -> bytes:
    signature = _unmarshal(TPMT_SIGNATURE, data, MAX_SIGNATURE_BYTES, "the quote signature")
    if signature.sigAlg != TPM2_ALG.ECDSA or signature.signature.ecdsa.hash != TPM2_ALG.SHA256:
        raise _malformed("the quote signature is not ECDSA-SHA256")
    r = bytes(signature.signature.ecdsa.signatureR)
    s = bytes(signature.signature.ecdsa.signatureS)
    if not (0 < len(r) <= ECC_COORDINATE_BYTES and 0 < len(s) <= ECC_COORDINATE_BYTES):
        raise _malformed("the quote signature's r and s must be 1-32 bytes")
    return encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))


def check_signed_quote(ak: AkPublic, attest: bytes, signature: bytes) -> AttestedQuote:
    """Parse and check a quote's signature: raise `Refusal` unless ``ak`` signed it.

    ``wrong-key`` when the TPM says another key signed (its qualified name is
    not the enrolled AK's), ``bad-signature`` when the signature does not
    verify (the attest bytes were changed after signing, or it was forged).
    """
    quoted = parse_attest(attest)
    der = _der_signature(signature)
    if quoted.qualified_signer != ak.qualified_name:
        raise Refusal(Reason.WRONG_KEY, f"signed by the key {quoted.qualified_signer.hex()[:20]}…, "
                                        f"not the enrolled AK {ak.qualified_name.hex()[:20]}…")
    try:
        ak.key.verify(der, attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Refusal(Reason.BAD_SIGNATURE, "the quote's signature does not verify with the "
                                            "enrolled AK") from None
    return quoted


def pcr_digest(values: list[bytes] | tuple[bytes, ...]) -> bytes:
    """What TPM2_Quote signs as pcrDigest: SHA-256 over the selected values in PCR order."""
    return hashlib.sha256(b"".join(values)).digest()
