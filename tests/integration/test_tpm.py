"""TPM attestation against a real software TPM (swtpm): device side and hub side together.

Each test gets its own swtpm (free loopback ports, its own state folder,
killed at the end). The device enrolls as `scripts/enroll` would, the hub
issues nonces, and every refusal the issue names is checked for its own
reason: a good quote is accepted; a tampered quote, a replayed or stale
nonce, wrong PCR values, a quote by another TPM's key and a device without
a TPM are each refused with a distinct reason.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from fedd.trust import signing
from fedd.trust.enrollments import Enrollment, EnrollmentError, EnrollmentStore, create_enrollment
from fedd.trust.measure import agent_files, measurement_digest, pcr_after_measure
from fedd.trust.nonces import NonceBook
from fedd.trust.policy import PcrPolicy
from fedd.trust.quote import NoTpm, Quote, attestation_from_dict
from fedd.trust.reasons import Reason
from fedd.trust.state import Mode, TrustState
from tests.tpm_fixtures import Swtpm, closed_port, skip_without_swtpm

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOW = 1_763_884_800.0  # the hub's clock in these tests (2025-11-23T08:00:00Z)
DEVICE = "pi-001"
CLASS = "rpi4"
MEASUREMENT = hashlib.sha256(b"fedd agent release under test").digest()
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    skip_without_swtpm()
    with Swtpm(tmp_path / "swtpm") as tpm:
        yield tpm


@pytest.fixture
def other_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A second TPM: another endorsement seed, so another AK."""
    skip_without_swtpm()
    with Swtpm(tmp_path / "other-swtpm") as tpm:
        yield tpm


def tpm_module():  # type: ignore[no-untyped-def]
    from fedd.trust import tpm

    return tpm


@dataclass
class Device:
    swtpm: Swtpm
    enrollment: Enrollment
    key: signing.Ed25519PrivateKey
    policy: PcrPolicy

    def answer(self, nonce: bytes) -> Quote:
        answer = tpm_module().answer_challenge(self.swtpm.tcti, nonce)
        assert isinstance(answer, Quote), answer
        return answer


def enroll(swtpm: Swtpm, folder: Path, device_id: str = DEVICE) -> Device:
    """Measure the agent into PCR 23, enroll, and allow exactly these PCR values for CLASS."""
    tpm_mod = tpm_module()
    key = signing.generate_key(folder / f"{device_id}.key")
    with tpm_mod.open_tpm(swtpm.tcti) as tpm:
        assert tpm.measure(MEASUREMENT) == pcr_after_measure(MEASUREMENT)
        record = create_enrollment(device_id=device_id, device_class=CLASS, update_key=key,
                                   tpm=tpm, pcrs=tpm_mod.DEFAULT_PCRS, now=NOW)
    assert record.binding is not None
    assert record.binding.pcrs[tpm_mod.MEASUREMENT_PCR] == pcr_after_measure(MEASUREMENT)
    policy = PcrPolicy.from_values({CLASS: {i: {v} for i, v in record.binding.pcrs.items()}})
    return Device(swtpm, record, key, policy)


@pytest.fixture
def device(swtpm: Swtpm, tmp_path: Path) -> Device:
    return enroll(swtpm, tmp_path)


@pytest.fixture
def nonces() -> NonceBook:
    return NonceBook(ttl_s=30)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def check(device: Device, quote: Quote | NoTpm, nonces: NonceBook,
          at: float = NOW):  # type: ignore[no-untyped-def]
    from fedd.trust.verify import verify_quote

    return verify_quote(device.enrollment, quote, nonces, device.policy, at)


# ---------------------------------------------------------------- accepted


def test_a_good_quote_is_accepted_and_opens_the_trust_window(device: Device,
                                                              nonces: NonceBook) -> None:
    nonce = nonces.issue(DEVICE, NOW)
    quote = device.answer(nonce)
    on_the_wire = attestation_from_dict(cbor2.loads(cbor2.dumps(quote.to_dict())))
    verdict = check(device, on_the_wire, nonces, NOW + 1)
    assert verdict.ok, verdict
    state = TrustState(mode=Mode.REQUIRE, window_s=600)
    assert not state.decide(DEVICE, NOW + 1).accept
    state.record(verdict)
    assert state.decide(DEVICE, NOW + 2).accept
    assert state.trusted_until(DEVICE) == NOW + 1 + 600


def test_the_ak_persists_across_a_reopen_and_a_tpm_power_cycle(swtpm: Swtpm) -> None:
    tpm_mod = tpm_module()
    with tpm_mod.open_tpm(swtpm.tcti) as tpm:
        first = tpm.attestation_key()
    with tpm_mod.open_tpm(swtpm.tcti) as tpm:
        again = tpm.attestation_key()
    swtpm.restart()
    with tpm_mod.open_tpm(swtpm.tcti) as tpm:
        after_reboot = tpm.attestation_key()
    assert first.created and not again.created and not after_reboot.created
    assert first.public == again.public == after_reboot.public
    assert first.handle == tpm_mod.DEFAULT_AK_HANDLE
    assert first.public.pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert len(first.public.name) == 34  # nameAlg (2) + SHA-256


def test_the_measurement_pcr_holds_the_same_value_after_every_restart(swtpm: Swtpm) -> None:
    tpm_mod = tpm_module()
    digest = measurement_digest(agent_files(REPO / "fedd", [REPO / "models" / "har-mlp.tflite"]))
    expected = pcr_after_measure(digest)
    for _ in range(2):  # the agent starts twice: reset + one extend each time
        with tpm_mod.open_tpm(swtpm.tcti) as tpm:
            assert tpm.measure(digest) == expected
            assert tpm.read_pcrs([23]) == {23: expected}
    swtpm.restart()
    with tpm_mod.open_tpm(swtpm.tcti) as tpm:
        assert tpm.read_pcrs([23]) == {23: bytes(32)}  # a power cycle clears it


def test_pcr_reads_span_more_than_eight_pcrs(swtpm: Swtpm) -> None:
    with tpm_module().open_tpm(swtpm.tcti) as tpm:  # TPM2_PCR_Read returns <= 8 per call
        assert sorted(tpm.read_pcrs(range(24))) == list(range(24))


# ---------------------------------------------------------------- refused, one reason each


def test_a_tampered_attest_is_refused_as_bad_signature(device: Device,
                                                       nonces: NonceBook) -> None:
    nonce = nonces.issue(DEVICE, NOW)
    quote = device.answer(nonce)
    nonce_at = quote.attest.index(nonce)
    # The nonce, the clock info in the middle, the PCR digest at the end.
    for index in (nonce_at, len(quote.attest) // 2, len(quote.attest) - 1):
        tampered = Quote(flip(quote.attest, index), quote.signature, quote.pcrs)
        verdict = check(device, tampered, nonces)
        assert verdict.reason is Reason.BAD_SIGNATURE, (index, verdict)
    assert check(device, quote, nonces).ok  # a refused forgery did not use up the nonce


def test_a_tampered_signature_is_refused_as_bad_signature(device: Device,
                                                          nonces: NonceBook) -> None:
    quote = device.answer(nonces.issue(DEVICE, NOW))
    tampered = Quote(quote.attest, flip(quote.signature, len(quote.signature) - 1), quote.pcrs)
    assert check(device, tampered, nonces).reason is Reason.BAD_SIGNATURE


def test_a_structurally_broken_quote_is_refused_as_malformed(device: Device,
                                                             nonces: NonceBook) -> None:
    quote = device.answer(nonces.issue(DEVICE, NOW))
    broken = [
        Quote(flip(quote.attest, 0), quote.signature, quote.pcrs),  # TPM_GENERATED magic
        Quote(quote.attest[:-1], quote.signature, quote.pcrs),  # truncated
        Quote(quote.attest + b"\0", quote.signature, quote.pcrs),  # trailing byte
        Quote(quote.attest, flip(quote.signature, 1), quote.pcrs),  # not ECDSA any more
        Quote(quote.attest, b"\x00\x18" + bytes(8), quote.pcrs),  # truncated signature
    ]
    for bad in broken:
        verdict = check(device, bad, nonces)
        assert verdict.reason is Reason.MALFORMED, verdict


def test_tampered_pcr_values_are_refused_as_a_digest_mismatch(device: Device,
                                                             nonces: NonceBook) -> None:
    quote = device.answer(nonces.issue(DEVICE, NOW))
    values = dict(quote.pcrs)
    values[0] = flip(values[0], 0)
    verdict = check(device, Quote(quote.attest, quote.signature, values), nonces)
    assert verdict.reason is Reason.PCR_DIGEST_MISMATCH, verdict

    quote = device.answer(nonces.issue(DEVICE, NOW))
    fewer = {i: v for i, v in quote.pcrs.items() if i != 7}
    verdict = check(device, Quote(quote.attest, quote.signature, fewer), nonces)
    assert verdict.reason is Reason.PCR_DIGEST_MISMATCH, verdict


def test_a_replayed_nonce_is_refused(device: Device, nonces: NonceBook) -> None:
    quote = device.answer(nonces.issue(DEVICE, NOW))
    assert check(device, quote, nonces).ok
    verdict = check(device, quote, nonces, NOW + 1)
    assert verdict.reason is Reason.NONCE_UNKNOWN, verdict


def test_a_nonce_never_issued_or_issued_to_another_device_is_refused(
        device: Device, nonces: NonceBook) -> None:
    assert check(device, device.answer(bytes(32)), nonces).reason is Reason.NONCE_UNKNOWN
    foreign = nonces.issue("pi-002", NOW)
    assert check(device, device.answer(foreign), nonces).reason is Reason.NONCE_UNKNOWN


def test_a_stale_nonce_is_refused(device: Device, nonces: NonceBook) -> None:
    quote = device.answer(nonces.issue(DEVICE, NOW))
    verdict = check(device, quote, nonces, NOW + nonces.ttl_s + 1)
    assert verdict.reason is Reason.NONCE_EXPIRED, verdict


def test_other_code_in_the_measurement_pcr_is_refused_as_not_allowed(
        device: Device, nonces: NonceBook) -> None:
    with tpm_module().open_tpm(device.swtpm.tcti) as tpm:
        tpm.measure(hashlib.sha256(b"a patched agent").digest())
    verdict = check(device, device.answer(nonces.issue(DEVICE, NOW)), nonces)
    assert verdict.reason is Reason.PCR_NOT_ALLOWED, verdict
    assert "PCR 23" in verdict.detail


def test_a_class_without_policy_or_a_pcr_left_out_is_refused(device: Device,
                                                             nonces: NonceBook) -> None:
    from fedd.trust.verify import verify_quote

    quote = device.answer(nonces.issue(DEVICE, NOW))
    other_class = PcrPolicy.from_values({"jetson": {0: {bytes(32)}}})
    verdict = verify_quote(device.enrollment, quote, nonces, other_class, NOW)
    assert verdict.reason is Reason.NO_POLICY, verdict

    nonce = nonces.issue(DEVICE, NOW)
    partial = tpm_module().answer_challenge(device.swtpm.tcti, nonce, pcrs=[0, 1, 2])
    assert check(device, partial, nonces).reason is Reason.PCR_MISSING


def test_a_quote_by_another_tpm_is_refused_as_wrong_key(device: Device, other_swtpm: Swtpm,
                                                        nonces: NonceBook) -> None:
    with tpm_module().open_tpm(other_swtpm.tcti) as other:
        other.measure(MEASUREMENT)  # same PCRs as the device: only the key differs
        quote = other.quote(nonces.issue(DEVICE, NOW))
    verdict = check(device, quote, nonces)
    assert verdict.reason is Reason.WRONG_KEY, verdict

    # Another TPM's quote that claims to be signed by the enrolled AK: bad signature.
    signer = device.enrollment.ak.qualified_name  # type: ignore[union-attr]
    at = quote.attest.index(b"\x00\x22\x00\x0b") + 2  # TPM2B_NAME of 34 bytes
    forged = quote.attest[:at] + signer + quote.attest[at + len(signer):]
    verdict = check(device, Quote(forged, quote.signature, quote.pcrs), nonces)
    assert verdict.reason is Reason.BAD_SIGNATURE, verdict


def test_a_device_without_a_tpm_says_so_and_the_mode_decides(device: Device,
                                                             nonces: NonceBook) -> None:
    tpm_mod = tpm_module()
    tcti = f"swtpm:host=127.0.0.1,port={closed_port()}"
    answer = tpm_mod.answer_challenge(tcti, nonces.issue(DEVICE, NOW))
    assert isinstance(answer, NoTpm)
    assert tcti in answer.reason and "IO failure" in answer.reason
    assert isinstance(tpm_mod.open_tpm("device:/nonexistent/tpmrm0"), NoTpm)
    with pytest.raises(ValueError, match="TCTI explicitly"):
        tpm_mod.open_tpm("")

    wire = attestation_from_dict(cbor2.loads(cbor2.dumps(answer.to_dict())))
    verdict = check(device, wire, nonces)
    assert verdict.reason is Reason.NO_TPM and tcti in verdict.detail
    for mode, accept, flagged in ((Mode.REQUIRE, False, False), (Mode.PREFER, True, True),
                                  (Mode.OFF, True, False)):
        state = TrustState(mode=mode, window_s=600)
        state.record(verdict)
        decision = state.decide(DEVICE, NOW)
        assert (decision.accept, decision.flagged) == (accept, flagged), mode
        if mode is not Mode.OFF:
            assert decision.reason is Reason.NO_TPM


def test_an_object_of_someone_else_at_the_ak_handle_is_refused_not_evicted(
        swtpm: Swtpm) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

    tpm_mod = tpm_module()
    handle = 0x81010003
    with ESAPI(swtpm.tcti) as esapi:  # a storage key, as another tool might persist
        template = TPM2B_PUBLIC.parse(
            "ecc256", objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS)
        transient, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template,
                                             ESYS_TR.OWNER)
        esapi.evict_control(ESYS_TR.OWNER, transient, handle)
        esapi.flush_context(transient)
    with (tpm_mod.open_tpm(swtpm.tcti, ak_handle=handle) as tpm,
          pytest.raises(tpm_mod.TpmError, match="not a fedd AK")):
        tpm.attestation_key()
    answer = tpm_mod.answer_challenge(swtpm.tcti, bytes(32), ak_handle=handle)
    assert isinstance(answer, NoTpm) and "not a fedd AK" in answer.reason
    with ESAPI(swtpm.tcti) as esapi:  # still there
        _more, data = esapi.get_capability(TPM2_CAP.HANDLES, handle, 1)
        assert handle in list(data.data.handles)


# ---------------------------------------------------------------- enrollment and update keys


def test_enrollment_round_trip_and_its_checks(device: Device, other_swtpm: Swtpm,
                                              tmp_path: Path) -> None:
    record = device.enrollment
    text = record.to_json()
    assert Enrollment.from_json(text) == record
    store = EnrollmentStore(tmp_path / "enrollments")
    copy = tmp_path / "copied.json"
    copy.write_text(text)
    assert store.register_file(copy) == record
    assert store.get(DEVICE) == record
    assert store.register_file(copy) == record  # the same record again is fine

    other_key = signing.Ed25519PrivateKey.generate()
    swapped = json.loads(text)
    swapped["update_key"] = signing.public_key_pem(other_key)
    with pytest.raises(EnrollmentError, match="does not vouch"):
        Enrollment.from_dict(swapped)

    renamed = json.loads(text)
    renamed["device_id"] = "pi-002"
    with pytest.raises(EnrollmentError, match="does not vouch"):
        Enrollment.from_dict(renamed)

    other = enroll(other_swtpm, tmp_path / "other", device_id=DEVICE)
    mixed = json.loads(text)
    mixed["tpm"]["ak_public"] = other.enrollment.to_dict()["tpm"]["ak_public"]
    with pytest.raises(EnrollmentError, match="ak_name"):
        Enrollment.from_dict(mixed)
    mixed["tpm"]["ak_name"] = other.enrollment.to_dict()["tpm"]["ak_name"]
    mixed["tpm"]["ak_pem"] = other.enrollment.to_dict()["tpm"]["ak_pem"]
    with pytest.raises(EnrollmentError, match="wrong-key"):
        Enrollment.from_dict(mixed)

    pcrs = json.loads(text)
    pcrs["tpm"]["binding"]["pcrs"]["0"] = "11" * 32
    with pytest.raises(EnrollmentError, match="digest"):
        Enrollment.from_dict(pcrs)

    with pytest.raises(EnrollmentError, match="already enrolled"):
        store.register(other.enrollment)
    store.register(other.enrollment, replace=True)
    assert store.get(DEVICE) == other.enrollment


def test_updates_verify_against_the_enrollment(device: Device) -> None:
    body = b"\x01update body bytes"
    signature = signing.sign_update(device.key, DEVICE, body)
    assert device.enrollment.verify_update(body, signature) is None
    other = signing.Ed25519PrivateKey.generate()
    assert device.enrollment.verify_update(
        body, signing.sign_update(other, DEVICE, body)) is Reason.BAD_SIGNATURE
    assert device.enrollment.verify_update(flip(body, 3), signature) is Reason.BAD_SIGNATURE
    assert device.enrollment.verify_update(body, signature[:-1]) is Reason.MALFORMED


# ---------------------------------------------------------------- scripts/enroll


def run_enroll(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "enroll"), *args],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          check=False)


def test_scripts_enroll_on_the_device_then_on_the_hub(swtpm: Swtpm, tmp_path: Path) -> None:
    out = tmp_path / "pi-007.json"
    key = tmp_path / "device" / "update.key"
    device_args = ["device", "--tcti", swtpm.tcti, "--device-id", "pi-007", "--class", CLASS,
                   "--key", str(key), "--out", str(out)]
    done = run_enroll(*device_args)
    assert done.returncode == 0, done.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    record = Enrollment.from_json(out.read_text())
    assert record.device_id == "pi-007" and record.ak is not None
    assert str(out) in done.stdout and "0x81010002" in done.stdout

    again = run_enroll(*device_args[:-2], "--out", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr
    assert Enrollment.from_json((tmp_path / "again.json").read_text()).ak == record.ak

    store = tmp_path / "hub" / "enrollments"
    done = run_enroll("register", "--store", str(store), str(out))
    assert done.returncode == 0, done.stderr
    assert EnrollmentStore(store).get("pi-007") == record

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"format": 1}')
    done = run_enroll("register", "--store", str(store), str(garbage))
    assert done.returncode == 1 and "garbage.json" in done.stderr


def test_scripts_enroll_refuses_a_missing_tpm_unless_told(tmp_path: Path) -> None:
    skip_without_swtpm()  # without tpm2-pytss the reason would be that, not the TCTI's
    tcti = f"swtpm:host=127.0.0.1,port={closed_port()}"
    args = ["device", "--tcti", tcti, "--device-id", "pi-008", "--class", CLASS,
            "--key", str(tmp_path / "update.key"), "--out", str(tmp_path / "pi-008.json")]
    done = run_enroll(*args)
    assert done.returncode == 1 and "IO failure" in done.stderr
    assert not (tmp_path / "pi-008.json").exists()
    done = run_enroll(*args, "--allow-no-tpm")
    assert done.returncode == 0, done.stderr
    record = Enrollment.from_json((tmp_path / "pi-008.json").read_text())
    assert record.ak is None and record.no_tpm and "IO failure" in record.no_tpm
