"""fedd.trust without a TPM: nonces, the PCR policy file, trust windows and modes, update
signatures, the attestation's wire form, the measurement and enrollment records.

The TPM-backed half (quotes, AK, binding) is tests/integration/test_tpm.py
against a real swtpm; the fuzzing of the TPM structure parsers at the end
needs only tpm2-pytss.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from fedd.config import ConfigError
from fedd.trust import signing
from fedd.trust.enrollments import (
    Enrollment,
    EnrollmentError,
    EnrollmentStore,
    create_enrollment,
)
from fedd.trust.measure import agent_files, measurement_digest, pcr_after_measure
from fedd.trust.nonces import NONCE_BYTES, NonceBook, NonceBookFull
from fedd.trust.policy import PcrPolicy
from fedd.trust.quote import AttestationFormatError, NoTpm, Quote, attestation_from_dict
from fedd.trust.reasons import DESCRIPTIONS, Reason, Verdict
from fedd.trust.state import Mode, TrustState

NOW = 1_000_000.0
A, B = bytes([0xAA]) * 32, bytes([0xBB]) * 32


def test_every_reason_is_described_and_stable() -> None:
    assert set(DESCRIPTIONS) == set(Reason)
    assert len({r.value for r in Reason}) == len(Reason)
    assert Reason.BAD_SIGNATURE == "bad-signature"  # a str: metrics labels, logs, the wire


# ---------------------------------------------------------------- NonceBook


def counter_random() -> Callable[[int], bytes]:
    count = iter(range(1, 1_000_000))
    return lambda n: next(count).to_bytes(n, "big")


def test_a_nonce_is_fresh_and_works_once_for_its_device() -> None:
    book = NonceBook(ttl_s=10)
    first, second = book.issue("pi-1", NOW), book.issue("pi-1", NOW)
    assert len(first) == NONCE_BYTES and first != second
    assert book.redeem("pi-2", first, NOW) is Reason.NONCE_UNKNOWN  # another device's
    assert book.redeem("pi-1", first, NOW + 9.9) is None
    assert book.redeem("pi-1", first, NOW + 9.9) is Reason.NONCE_UNKNOWN  # replay
    assert book.redeem("pi-1", bytes(32), NOW) is Reason.NONCE_UNKNOWN  # never issued
    assert book.redeem("pi-1", second, NOW + 1) is None


def test_an_expired_nonce_is_stale_then_forgotten() -> None:
    book = NonceBook(ttl_s=10)
    nonce = book.issue("pi-1", NOW)
    assert book.redeem("pi-1", nonce, NOW + 10) is Reason.NONCE_EXPIRED
    assert book.redeem("pi-1", nonce, NOW + 10) is Reason.NONCE_UNKNOWN  # reported once
    late = book.issue("pi-1", NOW)
    assert book.redeem("pi-1", late, NOW + 19.9) is Reason.NONCE_EXPIRED
    gone = book.issue("pi-1", NOW)
    assert book.redeem("pi-1", gone, NOW + 20) is Reason.NONCE_UNKNOWN  # past the grace
    assert len(book) == 0


def test_the_book_is_bounded_per_device_and_in_devices() -> None:
    book = NonceBook(ttl_s=10, max_per_device=2, max_devices=2, random=counter_random())
    oldest = book.issue("pi-1", NOW)
    book.issue("pi-1", NOW)
    newest = book.issue("pi-1", NOW)
    assert len(book) == 2
    assert book.redeem("pi-1", oldest, NOW) is Reason.NONCE_UNKNOWN  # pushed out
    assert book.redeem("pi-1", newest, NOW) is None
    book.issue("pi-2", NOW)
    with pytest.raises(NonceBookFull):
        book.issue("pi-3", NOW)
    book.issue("pi-3", NOW + 25)  # once the others are stale, they make room
    book.purge(NOW + 100)
    assert len(book) == 0


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"max_per_device": 0}, {"max_devices": 0}])
def test_nonce_book_arguments_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        NonceBook(**kwargs)  # type: ignore[arg-type]


def test_a_short_random_source_is_refused() -> None:
    with pytest.raises(RuntimeError, match="random"):
        NonceBook(random=lambda n: b"x").issue("pi-1", NOW)


# ---------------------------------------------------------------- PcrPolicy


GOOD_POLICY = f"""\
# a comment
format: 1
classes:
  rpi4:
    pcrs:
      0: ["{A.hex()}"]
      23: ["{B.hex()}", "{A.hex().upper()}"]
  jetson.orin-nx:
    pcrs:
      7: ['{B.hex()}']
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pcr-policy.yaml"
    path.write_text(text)
    return path


def test_a_policy_file_loads_and_checks(tmp_path: Path) -> None:
    policy = PcrPolicy.load(write(tmp_path, GOOD_POLICY))
    assert policy.required("rpi4") == (0, 23)
    assert policy.required("unknown") is None
    assert policy.classes["rpi4"][23] == {A, B}
    assert policy.check("rpi4", {0: A, 1: B, 23: A}) == (None, "")
    reason, detail = policy.check("rpi4", {0: B, 23: A})
    assert reason is Reason.PCR_NOT_ALLOWED and "PCR 0" in detail and "rpi4" in detail
    assert policy.check("rpi4", {0: A})[0] is Reason.PCR_MISSING
    assert policy.check("pi-zero", {0: A})[0] is Reason.NO_POLICY


BAD_POLICIES = [
    # (what, text, line, key, message part)
    ("unknown top key", "format: 1\nclasses: {a: {pcrs: {0: ['" + "0" * 63 + "a']}}}\nextra: 1\n",
     3, "extra", "unknown key"),
    ("no classes key", "format: 1\n", 1, "classes", "missing"),
    ("wrong format", "format: 2\nclasses: {}\n", 1, "format", "format 1"),
    ("empty classes", "format: 1\nclasses: {}\n", 2, "classes", "no device class"),
    ("bad class name", "format: 1\nclasses:\n  -bad:\n    pcrs: {0: []}\n", 3, "classes.-bad",
     "class name"),
    ("class with other keys", "format: 1\nclasses:\n  a:\n    pcr: {}\n", 4, "classes.a.pcr",
     "exactly one key"),
    ("pcr 24", f"format: 1\nclasses:\n  a:\n    pcrs:\n      24: ['{A.hex()}']\n", 5,
     "classes.a.pcrs.24", "0-23"),
    ("quoted pcr index", f"format: 1\nclasses:\n  a:\n    pcrs:\n      '0': ['{A.hex()}']\n",
     5, "classes.a.pcrs.0", "integer"),
    ("empty value list", "format: 1\nclasses:\n  a:\n    pcrs:\n      0: []\n", 5,
     "classes.a.pcrs.0", "non-empty list"),
    ("short value", "format: 1\nclasses:\n  a:\n    pcrs:\n      0:\n        - 'abcd'\n", 6,
     "classes.a.pcrs.0[0]", "64-digit hex"),
    ("unquoted all-digit value", "format: 1\nclasses:\n  a:\n    pcrs:\n      0:\n        - "
     + "1" * 64 + "\n", 6, "classes.a.pcrs.0[0]", "quoted"),
    ("duplicate class", f"format: 1\nclasses:\n  a:\n    pcrs: {{0: ['{A.hex()}']}}\n"
     f"  a:\n    pcrs: {{0: ['{A.hex()}']}}\n", 5, "classes.a", "duplicate key"),
    ("not a mapping", "- 1\n- 2\n", 1, None, "mapping"),
    ("yaml syntax", "format: 1\nclasses: [\n", 3, None, "YAML syntax error"),
]


@pytest.mark.parametrize(("what", "text", "line", "key", "message"), BAD_POLICIES,
                         ids=[case[0] for case in BAD_POLICIES])
def test_policy_errors_name_the_file_line_and_key(tmp_path: Path, what: str, text: str,
                                                  line: int, key: str | None,
                                                  message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        PcrPolicy.load(path)
    error = caught.value
    assert error.path == str(path)
    assert (error.line, error.key) == (line, key), str(error)
    assert message in error.message, str(error)
    assert error.exit_code == 78


def test_a_missing_empty_or_huge_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        PcrPolicy.load(tmp_path / "absent.yaml")
    assert caught.value.exit_code == 66
    with pytest.raises(ConfigError, match="empty"):
        PcrPolicy.load(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="larger than"):
        PcrPolicy.load(write(tmp_path, "#" * (2 << 20)))


def test_policy_values_are_checked_in_code_too() -> None:
    with pytest.raises(ValueError, match="0-23"):
        PcrPolicy.from_values({"a": {24: {A}}})
    with pytest.raises(ValueError, match="32-byte"):
        PcrPolicy.from_values({"a": {0: {b"short"}}})
    with pytest.raises(ValueError, match="no PCR"):
        PcrPolicy.from_values({"a": {}})


# ---------------------------------------------------------------- TrustState


def passed(device: str, at: float) -> Verdict:
    return Verdict.accept(device, at)


def test_a_pass_opens_a_window_that_expires() -> None:
    state = TrustState(mode="require", window_s=100)
    assert state.decide("pi-1", NOW).reason is Reason.NEVER_ATTESTED
    state.record(passed("pi-1", NOW))
    assert state.trusted("pi-1", NOW + 99.9)
    assert state.decide("pi-1", NOW + 50) == state.decide("pi-1", NOW + 99)
    assert state.decide("pi-1", NOW + 50).accept
    late = state.decide("pi-1", NOW + 100)
    assert (late.accept, late.reason) == (False, Reason.TRUST_EXPIRED)
    assert state.counts(NOW + 1) == {"trusted": 1, "untrusted": 0}


def test_a_failed_challenge_ends_trust_at_once_with_its_reason() -> None:
    state = TrustState(mode=Mode.REQUIRE, window_s=100)
    state.record(passed("pi-1", NOW))
    state.record(Verdict.refuse("pi-1", Reason.PCR_NOT_ALLOWED, "PCR 23", NOW + 1))
    decision = state.decide("pi-1", NOW + 2)
    assert (decision.accept, decision.reason) == (False, Reason.PCR_NOT_ALLOWED)
    state.record(passed("pi-1", NOW + 3))
    assert state.decide("pi-1", NOW + 4).accept


def test_modes_decide_accept_reject_and_flag() -> None:
    for mode, accept, flagged in ((Mode.REQUIRE, False, False), (Mode.PREFER, True, True),
                                  (Mode.OFF, True, False)):
        state = TrustState(mode=mode, window_s=100)
        state.record(Verdict.refuse("pi-1", Reason.NO_TPM, "no /dev/tpmrm0", NOW))
        decision = state.decide("pi-1", NOW)
        assert (decision.accept, decision.flagged) == (accept, flagged), mode
        assert decision.reason is (None if mode is Mode.OFF else Reason.NO_TPM)
        state.record(passed("pi-1", NOW))
        trusted = state.decide("pi-1", NOW + 1)
        assert (trusted.accept, trusted.flagged, trusted.reason) == (True, False, None)


def test_challenges_renew_before_the_window_ends_and_wait_between_tries() -> None:
    state = TrustState(mode="prefer", window_s=100, renew_before_s=10, retry_s=5)
    assert state.needs_challenge("pi-1", NOW)
    state.challenged("pi-1", NOW)
    assert not state.needs_challenge("pi-1", NOW + 4.9)  # waiting for the answer
    assert state.needs_challenge("pi-1", NOW + 5)  # no answer: ask again
    state.record(passed("pi-1", NOW + 6))
    assert not state.needs_challenge("pi-1", NOW + 95.9)
    assert state.needs_challenge("pi-1", NOW + 96)  # 10 s before the window ends
    assert state.trusted("pi-1", NOW + 96)
    assert not TrustState(mode="off", window_s=100).needs_challenge("pi-1", NOW)
    state.forget("pi-1")
    assert state.trusted_until("pi-1") is None


@pytest.mark.parametrize("kwargs", [
    {"mode": "strict", "window_s": 10}, {"mode": "off", "window_s": 0},
    {"mode": "off", "window_s": 10, "renew_before_s": 10},
    {"mode": "off", "window_s": 10, "retry_s": 0},
])
def test_trust_state_arguments_are_checked(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TrustState(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- update signatures


def test_sign_and_verify_an_update(tmp_path: Path) -> None:
    key = signing.generate_key(tmp_path / "update.key")
    public = signing.parse_public_key(signing.public_key_pem(key))
    body = bytes(range(200))
    signature = signing.sign_update(key, "pi-1", body)
    assert len(signature) == signing.SIGNATURE_BYTES
    assert signing.verify_update(public, "pi-1", body, signature) is None


def test_signatures_from_another_key_or_over_changed_bytes_are_refused(tmp_path: Path) -> None:
    key = signing.generate_key(tmp_path / "pi-1.key")
    other = signing.generate_key(tmp_path / "pi-2.key")
    public = key.public_key()
    body = b"update"
    good = signing.sign_update(key, "pi-1", body)
    assert signing.verify_update(public, "pi-1", body,
                                 signing.sign_update(other, "pi-1", body)) is Reason.BAD_SIGNATURE
    assert signing.verify_update(public, "pi-1", b"updatE", good) is Reason.BAD_SIGNATURE
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert signing.verify_update(public, "pi-1", body, flipped) is Reason.BAD_SIGNATURE
    assert signing.verify_update(public, "pi-2", body, good) is Reason.BAD_SIGNATURE  # bound to id
    assert signing.verify_update(public, "pi-1", body, good[:-1]) is Reason.MALFORMED
    assert signing.verify_update(public, "pi-1", body, good + b"\0") is Reason.MALFORMED
    assert signing.verify_update(public, "pi-1", body, "x" * 64) is Reason.MALFORMED  # type: ignore[arg-type]


def test_a_key_file_is_0600_whatever_the_umask_and_never_overwritten(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key = signing.generate_key(tmp_path / "keys" / "update.key")
    finally:
        os.umask(old)
    path = tmp_path / "keys" / "update.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(signing.SigningKeyError, match="already exists"):
        signing.generate_key(path)
    loaded, made = signing.load_or_generate_key(path)
    assert not made and signing.public_key_pem(loaded) == signing.public_key_pem(key)
    _, made = signing.load_or_generate_key(tmp_path / "new.key")
    assert made


def test_unsafe_or_wrong_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "update.key"
    signing.generate_key(path)
    path.chmod(0o644)
    with pytest.raises(signing.SigningKeyError, match="chmod 600"):
        signing.load_key(path)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = tmp_path / "ec.key"
    other.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    other.chmod(0o600)
    with pytest.raises(signing.SigningKeyError, match="not an Ed25519"):
        signing.load_key(other)
    with pytest.raises(signing.SigningKeyError, match="no such"):
        signing.load_key(tmp_path / "absent.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"x" * 10_000)
    junk.chmod(0o600)
    with pytest.raises(signing.SigningKeyError, match="larger"):
        signing.load_key(junk)
    ec_pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="Ed25519"):
        signing.parse_public_key(ec_pem.decode())


# ---------------------------------------------------------------- the attestation's wire form


def a_quote() -> Quote:
    return Quote(b"\xff\x54\x43\x47" + bytes(40), b"\x00\x18" + bytes(70), {23: A, 0: B})


def test_a_quote_round_trips_in_both_forms() -> None:
    quote = a_quote()
    assert list(quote.pcrs) == [0, 23]
    assert attestation_from_dict(quote.to_dict()) == quote
    assert Quote.from_json_dict(json.loads(json.dumps(quote.to_json_dict()))) == quote
    assert attestation_from_dict(NoTpm("no /dev/tpmrm0").to_dict()) == NoTpm("no /dev/tpmrm0")
    assert len(NoTpm("x" * 1000).reason) == 300


@pytest.mark.parametrize("bad", [
    None, [], {}, {"no_tpm": 5}, {"no_tpm": "x" * 301}, {"no_tpm": "x", "attest": b""},
    {"attest": b"a", "signature": b"s"},
    {"attest": b"a", "signature": b"s", "pcrs": {0: A}, "more": 1},
    {"attest": "a", "signature": b"s", "pcrs": {0: A}},
    {"attest": b"", "signature": b"s", "pcrs": {0: A}},
    {"attest": b"a" * 1025, "signature": b"s", "pcrs": {0: A}},
    {"attest": b"a", "signature": b"s" * 257, "pcrs": {0: A}},
    {"attest": b"a", "signature": b"s", "pcrs": {}},
    {"attest": b"a", "signature": b"s", "pcrs": [A]},
    {"attest": b"a", "signature": b"s", "pcrs": {24: A}},
    {"attest": b"a", "signature": b"s", "pcrs": {True: A}},
    {"attest": b"a", "signature": b"s", "pcrs": {"0": A}},
    {"attest": b"a", "signature": b"s", "pcrs": {0: A[:31]}},
    {"attest": b"a", "signature": b"s", "pcrs": {i: A for i in range(25)}},
])
def test_malformed_attestations_are_refused(bad: object) -> None:
    with pytest.raises(AttestationFormatError):
        attestation_from_dict(bad)


@pytest.mark.parametrize("pcrs", [{"05": A.hex()}, {"x": A.hex()}, {"0": "zz" * 32},
                                  {"0": A.hex()[:-2]}, {"0": 5}])
def test_malformed_json_quotes_are_refused(pcrs: dict[str, object]) -> None:
    with pytest.raises(AttestationFormatError):
        Quote.from_json_dict({"attest": "aa", "signature": "bb", "pcrs": pcrs})


# ---------------------------------------------------------------- the measurement


def test_the_measurement_is_stable_and_sees_every_change(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    model = tmp_path / "m.tflite"
    model.write_bytes(b"\x00model")
    files = agent_files(tmp_path / "pkg", [model])
    assert sorted(files) == ["code/pkg/a.py", "code/pkg/sub/b.py", "model/m.tflite"]
    digest = measurement_digest(files)
    assert measurement_digest(dict(reversed(list(files.items())))) == digest
    model.write_bytes(b"\x00modem")
    assert measurement_digest(files) != digest
    renamed = {"code/pkg/c.py" if k == "code/pkg/a.py" else k: v for k, v in files.items()}
    assert measurement_digest(renamed) != measurement_digest(files)
    assert pcr_after_measure(digest) == hashlib.sha256(bytes(32) + digest).digest()


@pytest.mark.parametrize("label", ["/etc/passwd", "../x", "a//b", "a/./b", "", "a\\b"])
def test_measurement_labels_must_be_clean_relative_paths(tmp_path: Path, label: str) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="label"):
        measurement_digest({label: tmp_path / "f"})


def test_measurement_inputs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing"):
        measurement_digest({})
    with pytest.raises(ValueError, match="32-byte"):
        pcr_after_measure(b"short")
    with pytest.raises(ValueError, match="no such model"):
        agent_files(tmp_path, [tmp_path / "absent.tflite"])


# ---------------------------------------------------------------- enrollments (no TPM)


def no_tpm_record(tmp_path: Path, device_id: str = "pi-1") -> Enrollment:
    key = signing.generate_key(tmp_path / f"{device_id}.key")
    return create_enrollment(device_id=device_id, device_class="rpi4", update_key=key,
                             tpm=NoTpm("no /dev/tpmrm0"), pcrs=[0], now=NOW + 0.7)


def test_a_record_without_a_tpm_round_trips(tmp_path: Path) -> None:
    record = no_tpm_record(tmp_path)
    assert record.ak is None and record.ak_pem is None and record.no_tpm == "no /dev/tpmrm0"
    assert record.enrolled_at == NOW
    loaded = Enrollment.from_json(record.to_json())
    assert loaded == record
    assert json.loads(record.to_json())["enrolled_at"] == "1970-01-12T13:46:40Z"


def mutate(record: Enrollment, **changes: object) -> dict[str, object]:
    obj = record.to_dict()
    obj.update(changes)
    return obj


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": 2}, "format"),
    ({"format": True}, "format"),
    ({"extra": 1}, "unknown keys"),
    ({"device_id": "fedd-hub"}, "reserved"),
    ({"device_id": "a b"}, "device id"),
    ({"device_class": "-x"}, "device_class"),
    ({"enrolled_at": "2025-11-23 08:00:00"}, "enrolled_at"),
    ({"enrolled_at": "2025-13-23T08:00:00Z"}, "enrolled_at"),
    ({"update_key": "not a pem"}, "update_key"),
    ({"no_tpm": None}, "exactly one"),
    ({"no_tpm": ""}, "no_tpm"),
    ({"tpm": {"ak_handle": "0x81010002"}}, "exactly one"),
])
def test_bad_records_are_refused_with_the_source_named(tmp_path: Path, changes: dict[str, object],
                                                      message: str) -> None:
    record = no_tpm_record(tmp_path)
    with pytest.raises(EnrollmentError, match=message) as caught:
        Enrollment.from_dict(mutate(record, **changes), source="copied.json")
    assert str(caught.value).startswith("copied.json: ")


def test_json_level_checks(tmp_path: Path) -> None:
    text = no_tpm_record(tmp_path).to_json()
    with pytest.raises(EnrollmentError, match="duplicate key"):
        Enrollment.from_json(text.replace('"format": 1,', '"format": 1, "format": 1,'))
    with pytest.raises(EnrollmentError, match="not JSON"):
        Enrollment.from_json(text[:-5])
    with pytest.raises(EnrollmentError, match="larger"):
        Enrollment.from_json(" " * 20_000 + text)


def test_the_store_registers_once_and_replaces_only_when_asked(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path / "store")
    assert store.get("pi-1") is None and store.device_ids() == []
    record = no_tpm_record(tmp_path)
    path = store.register(record)
    assert path.name == "pi-1.json" and store.get("pi-1") == record
    assert store.register(record) == path  # the same record again: fine
    newer = no_tpm_record(tmp_path / "again")
    with pytest.raises(EnrollmentError, match="already enrolled"):
        store.register(newer)
    store.register(newer, replace=True)
    assert store.get("pi-1") == newer
    assert store.device_ids() == ["pi-1"]
    assert store.get("../etc/passwd") is None and store.get("fedd-hub") is None
    assert store.remove("pi-1") and not store.remove("pi-1")
    assert store.get("pi-1") is None


def test_the_store_refuses_a_bad_or_misnamed_file(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    (tmp_path / "pi-9.json").write_text(no_tpm_record(tmp_path / "k").to_json())
    with pytest.raises(EnrollmentError, match="record of 'pi-1'"):
        store.get("pi-9")
    (tmp_path / "pi-8.json").write_text("{}")
    with pytest.raises(EnrollmentError, match=r"pi-8\.json"):
        store.get("pi-8")
    with pytest.raises(EnrollmentError, match="cannot read"):
        store.register_file(tmp_path / "absent.json")


def test_an_enrolled_device_verifies_its_updates(tmp_path: Path) -> None:
    key = signing.generate_key(tmp_path / "k")
    record = create_enrollment(device_id="pi-1", device_class="rpi4", update_key=key,
                               tpm=NoTpm("none"), pcrs=[0], now=NOW)
    body = b"body"
    assert record.verify_update(body, signing.sign_update(key, "pi-1", body)) is None
    assert record.verify_update(b"bodY", signing.sign_update(key, "pi-1", body)) \
        is Reason.BAD_SIGNATURE


# ---------------------------------------------------------------- TPM structure parsers (fuzz)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1100))
def test_attest_parsing_refuses_random_bytes_as_malformed(data: bytes) -> None:
    attest = pytest.importorskip("fedd.trust.attest")
    try:
        attest.parse_attest(data)
    except attest.Refusal as refusal:
        assert refusal.reason is Reason.MALFORMED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_ak_public_parsing_refuses_random_bytes_as_malformed(data: bytes) -> None:
    attest = pytest.importorskip("fedd.trust.attest")
    try:
        attest.parse_ak_public(data)
    except attest.Refusal as refusal:
        assert refusal.reason is Reason.MALFORMED
    else:
        pytest.fail("random bytes parsed as an AK")


# A quote recorded from swtpm (tests/integration/test_tpm.py makes live ones): the AK's
# public area, and its quote over PCRs 0-7 and 23.
AK_PUBLIC = bytes.fromhex(
    "0023000b00050072000000100018000b0003001000203e7aaa688ab897504889c672320581525553b8e1e74e"
    "6ec0d6c6da6534ec3a600020ec2ef8fdc234a020f0ab6975c4c89f60cb4d645dc69a1daba7a46955b3a11288")
ATTEST = bytes.fromhex(
    "ff54434780180022000b81b0aac705c5f00a1784418dfc63346aee2ae537b1aee7ceffe6cce5b546781b0020"
    "69112495fac0f3ff8176ad36cf5e7c0ef8f2af955fbcc5bde69f6f6a278dd13000000000000754e600000001"
    "0000000001201910230016363600000001000b03ff008000207f4d3bf5c671ccc76c75c267f809bf6e1d4a3e"
    "15b03f070118722ac79bd26fea")
SIGNATURE = bytes.fromhex(
    "0018000b0020d80d3065531f251682f2b72b7bfcb9eeeb0e1246ba8ba57b0469141b9c834c9f0020d5794b17"
    "a51f2493733217ddcc0f563efbef81421bc861e7a19842c3d2574011")


def test_the_recorded_quote_verifies_with_its_ak() -> None:
    attest = pytest.importorskip("fedd.trust.attest")
    ak = attest.parse_ak_public(AK_PUBLIC)
    quoted = attest.check_signed_quote(ak, ATTEST, SIGNATURE)
    assert quoted.pcrs == (0, 1, 2, 3, 4, 5, 6, 7, 23)
    assert quoted.qualified_signer == ak.qualified_name


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_changed_quote_bytes_are_refused_with_a_reason_never_a_crash(data: st.DataObject) -> None:
    attest = pytest.importorskip("fedd.trust.attest")
    ak = attest.parse_ak_public(AK_PUBLIC)
    target = data.draw(st.sampled_from(["attest", "signature"]))
    original = ATTEST if target == "attest" else SIGNATURE
    index = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[index]))
    changed = original[:index] + bytes([value]) + original[index + 1:]
    if data.draw(st.booleans()):
        changed = changed[:data.draw(st.integers(1, len(changed)))]
    pair = (changed, SIGNATURE) if target == "attest" else (ATTEST, changed)
    with pytest.raises(attest.Refusal) as caught:
        attest.check_signed_quote(ak, *pair)
    assert caught.value.reason in {Reason.MALFORMED, Reason.WRONG_KEY, Reason.BAD_SIGNATURE}
