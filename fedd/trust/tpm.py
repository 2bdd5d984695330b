"""The device's TPM 2.0: attestation key, measurement and quotes (tpm2-pytss ESAPI).

Always through an explicit TCTI string from the config, e.g.
``device:/dev/tpmrm0`` (the kernel's resource manager) or
``swtpm:host=127.0.0.1,port=2321`` (a software TPM in tests): ``ESAPI()``
without one silently falls back to a simulator. When the TCTI cannot be
opened, or tpm2-pytss is not installed, `open_tpm` returns a `NoTpm` that
says why; the device sends it to the hub, whose policy decides. A missing
TPM is never mistaken for a trusted one.

The attestation key (AK) is an ECC NIST P-256 restricted signing key
(ECDSA-SHA256), a primary object of the endorsement hierarchy, made
persistent at a fixed handle (default 0x81010002, configurable). A second
run finds it there and loads it; an object at that handle that is not such a
key (tools and platforms persist EKs and other keys in the 0x8101xxxx range)
is refused with a message naming the handle, never evicted. (A primary
key is derived from the endorsement seed and the template, so it comes back
the same even if it was evicted, until the seed is changed.) The enrollment
record carries the AK's public area; nothing here proves the AK shares a TPM
with a manufacturer-certified EK (no credential activation): enrollment
trusts the operator who runs ``scripts/enroll`` on the device.

Measurement PCR: 23 by default. The PC Client profile names PCR 23
"application support" and lets software at locality 0 reset it; firmware
and the boot chain leave it alone (0-7 firmware, 8-15 boot loader, IMA,
systemd, 16 debug, 17-22 dynamic launch at higher localities). The agent
resets it and extends it once with `fedd.trust.measure.measurement_digest`,
so its value is H(0^32 || digest) however often the agent restarted, and the
policy can list it. The price of resettable: root on the device can reset
it and extend a good value while running other code; a root compromise is
outside what PCR 23 alone can show (put IMA's PCR 10 in the policy for that).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedd.trust.quote import MAX_PCR_INDEX, NoTpm, Quote

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPML_DIGEST_VALUES,
        TPML_PCR_SELECTION,
        TPMT_HA,
        TPMT_SIG_SCHEME,
        TPMU_HA,
    )

    from fedd.trust.attest import (
        AK_ATTRIBUTES,
        AkPublic,
        Refusal,
        parse_ak_public,
        parse_attest,
        pcr_digest,
    )
except ImportError as error:  # the optional "tpm" extra is not installed
    MISSING = f"tpm2-pytss is not installed ({error}); install fedd[tpm] and libtss2"
else:
    MISSING = None

__all__ = [
    "DEFAULT_AK_HANDLE",
    "DEFAULT_PCRS",
    "MEASUREMENT_PCR",
    "AttestationKey",
    "NoTpm",
    "Tpm",
    "TpmError",
    "answer_challenge",
    "open_tpm",
]

DEFAULT_AK_HANDLE = 0x81010002
MEASUREMENT_PCR = 23
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, MEASUREMENT_PCR)
PERSISTENT_OWNER_RANGE = (0x81000000, 0x817FFFFF)  # what TPM2_EvictControl(owner) may use
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"  # without ":null" the TPM refuses the symmetric part
QUOTE_ATTEMPTS = 3  # a PCR that changes between the quote and the read gets a retry
MAX_NONCE_BYTES = 64  # qualifying data is a TPM2B_DATA: at most one digest (the hub sends 32)
RESETTABLE_PCRS = (16, 23)  # locality 0 may reset these (PC Client profile)


class TpmError(RuntimeError):
    """The TPM was reached but refused or failed an operation; the message says which."""


def _check_pcrs(pcrs: Iterable[int]) -> tuple[int, ...]:
    pcrs = list(pcrs)
    if not pcrs or any(type(p) is not int or not 0 <= p <= MAX_PCR_INDEX for p in pcrs):
        raise ValueError(f"PCRs must be 1-{MAX_PCR_INDEX + 1} indices 0-{MAX_PCR_INDEX}, "
                         f"got {pcrs[:30]}")
    return tuple(sorted(set(pcrs)))


def _selection(pcrs: Sequence[int]):  # type: ignore[no-untyped-def]
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, pcrs)))


@dataclass(frozen=True)
class AttestationKey:
    """The persistent AK: its handle, public area (and name, PEM), and whether this run made it."""

    handle: int
    public: AkPublic
    created: bool


class Tpm(contextlib.AbstractContextManager["Tpm"]):
    """An open TPM (one ESAPI context). Use `open_tpm`; close it, or use it in ``with``."""

    def __init__(self, esapi: ESAPI, tcti: str, *, ak_handle: int = DEFAULT_AK_HANDLE) -> None:
        low, high = PERSISTENT_OWNER_RANGE
        if not low <= ak_handle <= high:
            raise ValueError(f"ak_handle must be a persistent handle {low:#x}-{high:#x}, "
                             f"got {ak_handle:#x}")
        self._esapi = esapi
        self.tcti = tcti
        self.ak_handle = ak_handle
        self._ak: AttestationKey | None = None
        self._ak_tr = None

    def close(self) -> None:
        if self._esapi is not None:
            self._esapi.close()
            self._esapi = None  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self._esapi is None:
            raise TpmError("the TPM is closed")
        try:
            return fn(*args, **kwargs)
        except TSS2_Exception as error:
            raise TpmError(f"{what} failed: {error}") from error

    # ------------------------------------------------------------ the AK

    def _persistent(self, handle: int) -> bool:
        _more, data = self._call("TPM2_GetCapability(handles)", self._esapi.get_capability,
                                 TPM2_CAP.HANDLES, handle, 1)
        return handle in list(data.data.handles)

    def attestation_key(self) -> AttestationKey:
        """Load the AK from its persistent handle, or create and persist it there (once)."""
        if self._ak is not None:
            return self._ak
        esapi, handle = self._esapi, self.ak_handle
        created = False
        if self._persistent(handle):
            tr = self._call(f"loading the object at {handle:#x}", esapi.tr_from_tpmpublic, handle)
        else:
            template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
            transient, _pub, _data, _digest, _ticket = self._call(
                "creating the AK under the endorsement hierarchy", esapi.create_primary,
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
            try:
                tr = self._call(f"persisting the AK at {handle:#x}", esapi.evict_control,
                                ESYS_TR.OWNER, transient, handle)
            finally:
                self._call("flushing the transient AK", esapi.flush_context, transient)
            created = True
        public, _name, tpm_qualified = self._call("TPM2_ReadPublic", esapi.read_public, tr)
        try:
            ak = parse_ak_public(public.publicArea.marshal())
        except Refusal as refusal:
            raise TpmError(f"the persistent handle {handle:#x} holds an object that is not a "
                           f"fedd AK ({refusal.detail}); choose another ak_handle, or evict it "
                           f"(tpm2_evictcontrol -C o -c {handle:#x}) if it is not in use") from None
        if bytes(tpm_qualified) != ak.qualified_name:
            raise TpmError(f"the key at {handle:#x} is not a primary key of the endorsement "
                           "hierarchy; choose another ak_handle")
        self._ak_tr = tr
        self._ak = AttestationKey(handle=handle, public=ak, created=created)
        return self._ak

    # ------------------------------------------------------------ PCRs

    def read_pcrs(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """The SHA-256 values of the given PCRs (read in chunks; a TPM returns at most 8)."""
        wanted = _check_pcrs(pcrs)
        values: dict[int, bytes] = {}
        counter = None
        for _ in range(len(wanted)):  # every read returns at least one PCR, or we stop
            remaining = [p for p in wanted if p not in values]
            if not remaining:
                break
            update, selected, digests = self._call("TPM2_PCR_Read", self._esapi.pcr_read,
                                                   _selection(remaining))
            if counter is not None and update != counter:
                raise TpmError("the PCRs changed while being read")
            counter = update
            got = _indices(selected)
            if not got or len(got) != len(digests):
                raise TpmError(f"TPM2_PCR_Read returned no values for PCRs {remaining}")
            for index, digest in zip(got, digests, strict=True):
                values[index] = bytes(digest)
        missing = [p for p in wanted if p not in values]
        if missing:
            raise TpmError(f"the TPM has no SHA-256 values for PCRs {missing}")
        return values

    def measure(self, digest: bytes, pcr: int = MEASUREMENT_PCR) -> bytes:
        """Reset ``pcr`` and extend it once with ``digest`` (SHA-256); return its new value."""
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("a measurement is a 32-byte SHA-256 digest")
        if pcr not in RESETTABLE_PCRS:
            raise ValueError(f"the measurement PCR must be resettable at locality 0 "
                             f"({RESETTABLE_PCRS}), got {pcr}")
        esys_pcr = ESYS_TR(pcr)
        self._call(f"TPM2_PCR_Reset({pcr})", self._esapi.pcr_reset, esys_pcr)
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                                             digest=TPMU_HA(sha256=digest))])
        self._call(f"TPM2_PCR_Extend({pcr})", self._esapi.pcr_extend, esys_pcr, values)
        value = self.read_pcrs([pcr])[pcr]
        if value != hashlib.sha256(bytes(32) + digest).digest():
            raise TpmError(f"PCR {pcr} was extended by someone else during the measurement")
        return value

    # ------------------------------------------------------------ quotes

    def quote(self, nonce: bytes, pcrs: Iterable[int] = DEFAULT_PCRS) -> Quote:
        """A quote by the AK over the SHA-256 ``pcrs`` with ``nonce`` as qualifying data."""
        if not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_NONCE_BYTES:
            raise ValueError(f"a nonce is 1-{MAX_NONCE_BYTES} bytes")
        chosen = _check_pcrs(pcrs)
        self.attestation_key()
        for _ in range(QUOTE_ATTEMPTS):
            attest, signature = self._call(
                "TPM2_Quote", self._esapi.quote, self._ak_tr, _selection(chosen), nonce,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            attest_bytes = bytes(attest)
            values = self.read_pcrs(chosen)
            quoted = parse_attest(attest_bytes)
            if quoted.pcrs != chosen:
                raise TpmError(f"the TPM quoted PCRs {quoted.pcrs}, not {chosen}")
            if pcr_digest([values[p] for p in chosen]) == quoted.pcr_digest:
                return Quote(attest_bytes, signature.marshal(), values)
        raise TpmError(f"the PCRs kept changing during {QUOTE_ATTEMPTS} quotes")


def _indices(selection) -> list[int]:  # type: ignore[no-untyped-def]
    found: list[int] = []
    for i in range(selection.count):
        bank = selection.pcrSelections[i]
        if bank.hash != TPM2_ALG.SHA256:
            continue
        for byte_index in range(bank.sizeofSelect):
            byte = bank.pcrSelect[byte_index]
            found.extend(8 * byte_index + bit for bit in range(8) if byte >> bit & 1)
    return sorted(found)


def open_tpm(tcti: str, *, ak_handle: int = DEFAULT_AK_HANDLE) -> Tpm | NoTpm:
    """Open the TPM through ``tcti`` (required, never a default), or say why there is none."""
    if not isinstance(tcti, str) or not tcti.strip():
        raise ValueError("give the TCTI explicitly (e.g. 'device:/dev/tpmrm0'): without one "
                         "the TSS silently falls back to a simulator")
    if MISSING is not None:
        return NoTpm(MISSING)
    try:
        esapi = ESAPI(tcti)
    except TSS2_Exception as error:
        return NoTpm(f"cannot open the TPM through TCTI {tcti!r}: {error}")
    return Tpm(esapi, tcti, ak_handle=ak_handle)


def answer_challenge(tcti: str, nonce: bytes, pcrs: Iterable[int] = DEFAULT_PCRS, *,
                     ak_handle: int = DEFAULT_AK_HANDLE) -> Quote | NoTpm:
    """What the agent sends for one hub nonce: a quote, or a `NoTpm` saying what went wrong.

    The TPM is opened for this answer only and closed after it, so the agent
    holds no TPM connection between challenges. A TPM that opens but fails
    (no AK possible, a handle taken, a TPM error) answers `NoTpm` with the
    error: the hub's policy then treats the device as one without a TPM.
    """
    tpm = open_tpm(tcti, ak_handle=ak_handle)
    if isinstance(tpm, NoTpm):
        return tpm
    with tpm:
        try:
            return tpm.quote(nonce, pcrs)
        except TpmError as error:
            return NoTpm(f"the TPM at {tcti!r} cannot quote: {error}")
