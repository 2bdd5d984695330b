"""Attestation messages on the attest topics, and the signed-update envelope.

JSON, so an operator can read them with `mosquitto_sub`; every decoder takes
untrusted bytes, bounds them first and demands exact keys and types
(`fedd.wire.WireError` with a countable reason, as for every other message):

- device → hub, ``attest/<device>``: ``{"kind": "hello"}`` (asks for a
  challenge, sent on every connect), ``{"kind": "quote", "quote": {...}}``
  (`Quote.to_json_dict`) or ``{"kind": "no-tpm", "reason": "..."}``.
- hub → device, ``attest/<device>/nonce``: ``{"kind": "challenge", "nonce":
  hex, "expires": t}`` or ``{"kind": "verdict", "trusted": bool, "reason":
  code | null, "detail": "...", "until": t | null}``.

A signed update is the CBOR array ``[body, signature]``: the update's own
bytes and the 64-byte Ed25519 signature over them (`fedd.trust.signing`).
Its first byte (0x82, an array of two) tells it from a bare update (a map),
so the hub can check the signature before it decodes a byte of the body.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import cbor2

from fedd.trust.quote import AttestationFormatError, NoTpm, Quote
from fedd.wire import WireError

MAX_ATTEST_JSON = 8 * 1024
MAX_DETAIL_CHARS = 512
NONCE_BYTES = 32
SIGNATURE_BYTES = 64
ENVELOPE_OVERHEAD = 16  # array and byte-string headers around body and signature
ENVELOPE_FIRST_BYTE = 0x82  # CBOR: an array of two items


def _json(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_ATTEST_JSON:
        raise WireError("too-large", f"{what} of {len(payload)} bytes")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError("not-json", str(exc) or type(exc).__name__) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise WireError("not-a-map", f"{what} is not an object with a kind")
    return obj


def _keys(obj: dict[str, Any], keys: set[str], what: str) -> None:
    if set(obj) != keys:
        raise WireError("bad-keys", f"{what} {obj['kind']}: keys {sorted(map(str, obj))}, "
                                    f"expected {sorted(keys)}")


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WireError("bad-field", f"{what} is not a finite number")
    return float(value)


def _text(value: Any, what: str, limit: int = MAX_DETAIL_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise WireError("bad-field", f"{what} is not a text of at most {limit} characters")
    return value


# ---------------------------------------------------------------- device → hub


@dataclass(frozen=True)
class Hello:
    """Asks the hub for a challenge (after every connect)."""

    def encode(self) -> bytes:
        return b'{"kind":"hello"}'


def encode_attestation(attestation: Quote | NoTpm) -> bytes:
    if isinstance(attestation, NoTpm):
        body: dict[str, Any] = {"kind": "no-tpm", "reason": attestation.reason}
    else:
        body = {"kind": "quote", "quote": attestation.to_json_dict()}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_attest(payload: bytes) -> Hello | Quote | NoTpm:
    """What a device sent on its attest topic."""
    obj = _json(payload, "attest message")
    kind = obj["kind"]
    if kind == "hello":
        _keys(obj, {"kind"}, "attest message")
        return Hello()
    try:
        if kind == "quote":
            _keys(obj, {"kind", "quote"}, "attest message")
            return Quote.from_json_dict(obj["quote"])
        if kind == "no-tpm":
            _keys(obj, {"kind", "reason"}, "attest message")
            return NoTpm(_text(obj["reason"], "reason"))
    except AttestationFormatError as exc:
        raise WireError("bad-field", f"attest message {kind}: {exc}") from None
    raise WireError("bad-field", f"attest message kind {kind!r}")


# ---------------------------------------------------------------- hub → device


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires: float

    def encode(self) -> bytes:
        return json.dumps({"kind": "challenge", "nonce": self.nonce.hex(),
                           "expires": self.expires}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class TrustVerdict:
    """The hub's answer to a quote (or to a device it cannot trust)."""

    trusted: bool
    reason: str | None
    detail: str
    until: float | None

    def encode(self) -> bytes:
        return json.dumps({"kind": "verdict", "trusted": self.trusted, "reason": self.reason,
                           "detail": self.detail[:MAX_DETAIL_CHARS], "until": self.until},
                          separators=(",", ":")).encode()


def decode_from_hub(payload: bytes) -> Challenge | TrustVerdict:
    obj = _json(payload, "hub attest message")
    if obj["kind"] == "challenge":
        _keys(obj, {"kind", "nonce", "expires"}, "hub attest message")
        nonce = _text(obj["nonce"], "nonce", 2 * NONCE_BYTES)
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raise WireError("bad-field", "nonce is not hex") from None
        if len(raw) != NONCE_BYTES:
            raise WireError("bad-field", f"nonce of {len(raw)} bytes, expected {NONCE_BYTES}")
        return Challenge(raw, _time(obj["expires"], "expires"))
    if obj["kind"] == "verdict":
        _keys(obj, {"kind", "trusted", "reason", "detail", "until"}, "hub attest message")
        if not isinstance(obj["trusted"], bool):
            raise WireError("bad-field", "trusted is not a boolean")
        reason = None if obj["reason"] is None else _text(obj["reason"], "reason", 64)
        until = None if obj["until"] is None else _time(obj["until"], "until")
        return TrustVerdict(obj["trusted"], reason, _text(obj["detail"], "detail"), until)
    raise WireError("bad-field", f"hub attest message kind {obj['kind']!r}")


# ---------------------------------------------------------------- signed updates


def seal(body: bytes, signature: bytes) -> bytes:
    """A signed update as published: [body, signature]."""
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"an update signature is {SIGNATURE_BYTES} bytes")
    return cbor2.dumps([body, signature])


def unseal(payload: bytes, *, max_body: int) -> tuple[bytes, bytes | None]:
    """(body, signature) of a signed update, or (payload, None) for a bare one.

    Only the envelope is parsed here; the body stays bytes until the
    signature over it has been checked.
    """
    if not payload or payload[0] != ENVELOPE_FIRST_BYTE:
        return payload, None
    if len(payload) > max_body + ENVELOPE_OVERHEAD + SIGNATURE_BYTES:
        raise WireError("too-large", f"signed update of {len(payload)} bytes exceeds "
                                     f"{max_body} (+ envelope)")
    stream = io.BytesIO(payload)
    try:
        items = cbor2.CBORDecoder(stream, allow_indefinite=False, max_depth=2).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, EOFError) as exc:
        raise WireError("bad-envelope", f"signed update: {exc}") from None
    if stream.tell() != len(payload):
        raise WireError("bad-envelope", "bytes after the signed update")
    if (not isinstance(items, list) or len(items) != 2
            or not all(isinstance(item, bytes) for item in items)):
        raise WireError("bad-envelope", "a signed update is [body, signature], two byte strings")
    body, signature = items
    if len(signature) != SIGNATURE_BYTES:
        raise WireError("bad-envelope", f"signature of {len(signature)} bytes, "
                                         f"expected {SIGNATURE_BYTES}")
    return body, signature
