"""Attestation messages and the signed-update envelope (fedd/trust/messages.py)."""

from __future__ import annotations

import contextlib
import json

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedd.trust.messages import (
    Challenge,
    Hello,
    TrustVerdict,
    decode_attest,
    decode_from_hub,
    encode_attestation,
    seal,
    unseal,
)
from fedd.trust.quote import NoTpm, Quote
from fedd.wire import WireError

QUOTE = Quote(b"\xff\x54\x43\x47" + bytes(60), bytes(70), {0: bytes(32), 23: b"\x01" * 32})


@pytest.mark.parametrize("message", [Hello(), QUOTE, NoTpm("no TPM configured")],
                         ids=["hello", "quote", "no-tpm"])
def test_device_messages_round_trip(message: object) -> None:
    payload = message.encode() if isinstance(message, Hello) else encode_attestation(message)
    assert decode_attest(payload) == message


@pytest.mark.parametrize("message", [
    Challenge(b"\x07" * 32, 1_700_000_060.0),
    TrustVerdict(True, None, "quote over PCRs [0, 23] verified", 1_700_086_400.0),
    TrustVerdict(False, "pcr-not-allowed", "PCR 23 is not allowed", None),
], ids=["challenge", "trusted", "refused"])
def test_hub_messages_round_trip(message: object) -> None:
    assert decode_from_hub(message.encode()) == message


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{" * 10, "not-json"),
    (b'"hello"', "not-a-map"),
    (b'{"kind":"hello","extra":1}', "bad-keys"),
    (b'{"kind":"selfie"}', "bad-field"),
    (b'{"kind":"no-tpm","reason":5}', "bad-field"),
    (json.dumps({"kind": "quote", "quote": {"attest": "zz", "signature": "",
                                             "pcrs": {}}}).encode(), "bad-field"),
    (b" " * 9000, "too-large"),
], ids=["json", "string", "extra", "kind", "reason", "quote", "large"])
def test_device_message_refusals(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_attest(payload)
    assert info.value.reason == reason


@pytest.mark.parametrize("payload", [
    b'{"kind":"challenge","nonce":"00","expires":1}',
    b'{"kind":"challenge","nonce":"' + b"zz" * 32 + b'","expires":1}',
    b'{"kind":"challenge","nonce":"' + b"00" * 32 + b'","expires":true}',
    b'{"kind":"verdict","trusted":1,"reason":null,"detail":"","until":null}',
    b'{"kind":"verdict","trusted":true,"reason":null,"detail":"","until":"soon"}',
], ids=["short-nonce", "hex", "bool-time", "int-bool", "str-time"])
def test_hub_message_refusals(payload: bytes) -> None:
    with pytest.raises(WireError, match=r"^bad-field"):
        decode_from_hub(payload)


def test_a_bare_update_passes_and_a_sealed_one_opens() -> None:
    body = cbor2.dumps({"format": 1, "seq": 3})
    assert unseal(body, max_body=1000) == (body, None)
    signature = bytes(range(64))
    sealed = seal(body, signature)
    assert len(sealed) == len(body) + 2 + 2 + 64
    assert unseal(sealed, max_body=1000) == (body, signature)


@pytest.mark.parametrize(("payload", "reason"), [
    (cbor2.dumps([b"body", bytes(63)]), "bad-envelope"),
    (cbor2.dumps([b"body", "not bytes"]), "bad-envelope"),
    (cbor2.dumps([b"body", bytes(64)]) + b"\0", "bad-envelope"),
    (cbor2.dumps([b"body", bytes(64)])[:-3], "bad-envelope"),
    (cbor2.dumps([bytes(2000), bytes(64)]), "too-large"),
], ids=["short-signature", "text", "trailing", "truncated", "large"])
def test_envelope_refusals(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        unseal(payload, max_body=1000)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoders_only_raise_wire_errors(payload: bytes) -> None:
    for decode in (decode_attest, decode_from_hub, lambda p: unseal(b"\x82" + p, max_body=200)):
        with contextlib.suppress(WireError):
            decode(payload)
