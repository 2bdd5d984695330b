"""Wire messages (fedd/wire.py): round trips and strict, reasoned rejection."""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedd.pipeline import REASONS, DecodeError, Pipeline
from fedd.pipeline.varint import encode_one as varint_bytes
from fedd.wire import (
    FORMAT,
    MAX_JSON_BYTES,
    MAX_PARTS,
    Ack,
    Evaluation,
    GlobalModel,
    Heartbeat,
    ModelUpdate,
    WireError,
    encode_deltas,
    parts_digest,
)

MAX = 1 << 20
SHA = "ab" * 32
FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False)


def tricky_parts(seed: int = 0) -> dict[str, np.ndarray]:
    """Values whose bits a lossy codec would change: subnormals, -0.0, extremes."""
    rng = np.random.default_rng(seed)
    body = rng.normal(0, 1, 300).astype(np.float32)
    body[:6] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max,
                np.finfo(np.float32).min, np.finfo(np.float32).tiny, 1 / 3]
    return {"body": body, "head": rng.normal(0, 1e-3, 17).astype(np.float32)}


def update(*, parts: dict[str, np.ndarray] | None = None, codec: str = "float32",
           **changes: Any) -> ModelUpdate:
    """A valid update of float32 deltas (tricky_parts unless given) through `codec`."""
    base = ModelUpdate.from_deltas(tricky_parts() if parts is None else parts, codec=codec,
                                   rng=np.random.default_rng(0), device="dev-01", seq=7,
                                   base_version=3, model="har-mlp", num_samples=250,
                                   created=1_700_000_000.25)
    return replace(base, **changes)


def float32_payload(values: np.ndarray) -> bytes:
    """A float32-stack pipeline payload written by hand (so it may hold NaN)."""
    values = np.asarray(values, "<f4")
    assert values.size < 128  # n fits one varint byte
    return Pipeline.from_spec("float32").header + bytes([values.size]) + values.tobytes()


def dense_parts(message: ModelUpdate, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    return {name: message.read_part(name, length=sizes[name]).dense() for name in message.parts}


SIZES = {name: len(values) for name, values in tricky_parts().items()}


def global_model(**changes: Any) -> GlobalModel:
    base = GlobalModel(version=4, parent=3, model="har-mlp", model_sha256=SHA,
                       created=1_700_000_123.5, contributors=5, mean_staleness=0.8,
                       parts=tricky_parts(1))
    return replace(base, **changes)


def heartbeat(**changes: Any) -> Heartbeat:
    base = Heartbeat(device="dev-01", time=1_700_000_000.5, uptime_s=12.0, activity="idle",
                     decision="train", model_version=4, windows=300, outbox=1, updates_sent=2,
                     uplink_bytes=4096, last_update_seq=1, delegate="xnnpack",
                     rss_bytes=50_000_000, evaluation=None)
    return replace(base, **changes)


def assert_bit_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32
        assert got[name].tobytes() == want[name].astype(np.float32).tobytes(), name


def raw_update(**changes: Any) -> dict[str, Any]:
    """The decoded CBOR map of a valid update, with fields replaced."""
    obj = cbor2.loads(update().encode())
    obj.update(changes)
    return obj


def reason_of(payload: bytes, decode=ModelUpdate.decode) -> str:
    with pytest.raises(WireError) as info:
        decode(payload, max_bytes=MAX)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


# ------------------------------------------------------------------ round trips


def test_update_round_trip_is_bit_exact() -> None:
    sent = update()
    got = ModelUpdate.decode(sent.encode(), max_bytes=MAX)
    assert (got.device, got.seq, got.base_version, got.model, got.num_samples, got.created,
            got.codec) == (sent.device, sent.seq, sent.base_version, sent.model,
                           sent.num_samples, sent.created, sent.codec)
    assert isinstance(got.parts, dict) and got.parts == sent.parts
    values = dense_parts(got, SIZES)
    assert_bit_exact(values, tricky_parts())
    assert values["body"].tobytes()[:4] == struct.pack("<f", -0.0)


@pytest.mark.parametrize("codec", ["topk:0.1+q:4+zstd", "f16", "q:8", "topk:5+sign"])
def test_compressed_update_round_trip(codec: str) -> None:
    deltas = tricky_parts(3)
    deltas["body"][:6] = 0.5  # no extremes: a lossy codec's error is relative to the range
    sent = update(parts=deltas, codec=codec)
    assert sent.codec == Pipeline.from_spec(codec).spec  # canonical on the wire
    got = ModelUpdate.decode(sent.encode(), max_bytes=MAX)
    assert got.codec == sent.codec and got.parts == sent.parts
    values = dense_parts(got, SIZES)
    for name, delta in deltas.items():
        assert values[name].shape == delta.shape and np.isfinite(values[name]).all()
    assert len(sent.encode()) < len(update(parts=deltas).encode())


def test_encode_deltas_keeps_residuals_and_drops_a_misfit() -> None:
    pipe = Pipeline.from_spec("topk:0.1+q:4+zstd")
    rng = np.random.default_rng(2)
    deltas = {name: rng.normal(0, 1, size).astype(np.float32) for name, size in SIZES.items()}
    first = encode_deltas(pipe, deltas, rng=np.random.default_rng(1))
    assert set(first.residuals) == set(deltas) and first.bytes == sum(
        len(p) for p in first.payloads.values())
    # What was not sent is carried: delta = sent + residual.
    sent = {n: pipe.decode(p, length=SIZES[n], max_bytes=1 << 16)
            for n, p in first.payloads.items()}
    for name in deltas:
        np.testing.assert_allclose(sent[name] + first.residuals[name], deltas[name], atol=1e-6)
    misfit = {"body": np.ones(5, np.float32), "head": first.residuals["head"]}
    again = encode_deltas(pipe, deltas, misfit, rng=np.random.default_rng(1))
    assert again.payloads["body"] == first.payloads["body"]  # the 5-value residual dropped


def test_read_part_refuses_another_stack_and_a_wrong_length() -> None:
    sparse = update(codec="topk:0.1+q:4+zstd")
    mixed = replace(update(), parts={**update().parts, "head": sparse.parts["head"]})
    got = ModelUpdate.decode(mixed.encode(), max_bytes=MAX)
    with pytest.raises(DecodeError) as info:
        got.read_part("head", length=SIZES["head"])
    assert info.value.reason == "stack-mismatch"
    with pytest.raises(DecodeError) as info:
        got.read_part("body", length=SIZES["body"] + 1)
    assert info.value.reason == "wrong-length"


def test_update_payload_is_the_documented_map() -> None:
    obj = cbor2.loads(update().encode())
    assert set(obj) == ModelUpdate.KEYS
    assert obj["format"] == FORMAT and obj["codec"] == "float32"
    assert obj["trigger"] == "version"
    head = tricky_parts()["head"].astype("<f4")
    assert obj["parts"]["head"] == float32_payload(head)
    assert obj["parts"]["head"][:4] == bytes([1, 1, 1, 17])  # version, 1 stage, float32, n


def test_global_model_round_trip_keeps_digest_and_values() -> None:
    sent = global_model()
    got = GlobalModel.decode(sent.encode(), max_bytes=MAX)
    assert_bit_exact(got.parts, sent.parts)
    assert got.digest == sent.digest == parts_digest(sent.parts)
    for name in ("version", "parent", "model", "model_sha256", "created", "contributors",
                 "mean_staleness"):
        assert getattr(got, name) == getattr(sent, name)
    first = GlobalModel.decode(global_model(version=0, parent=None).encode(), max_bytes=MAX)
    assert first.parent is None


def test_digest_depends_on_names_and_every_bit() -> None:
    parts = tricky_parts()
    flipped = {**parts, "head": parts["head"].copy()}
    flipped["head"].view(np.uint32)[3] ^= 1
    renamed = {"body": parts["body"], "tail": parts["head"]}
    digests = {parts_digest(parts), parts_digest(flipped), parts_digest(renamed)}
    assert len(digests) == 3
    assert re.fullmatch(r"[0-9a-f]{64}", parts_digest(parts))


@pytest.mark.parametrize("evaluation", [None, Evaluation(version=4, windows=100,
                                                         global_accuracy=0.91,
                                                         personal_accuracy=0.95)])
def test_heartbeat_round_trip(evaluation: Evaluation | None) -> None:
    sent = heartbeat(evaluation=evaluation)
    payload = sent.encode()
    assert json.loads(payload)["device"] == "dev-01"
    assert Heartbeat.decode(payload) == sent


def test_heartbeat_nullable_fields() -> None:
    sent = heartbeat(model_version=None, last_update_seq=None)
    assert Heartbeat.decode(sent.encode()) == sent


# ------------------------------------------------------------ update rejection


def test_oversized_update_is_refused_before_parsing() -> None:
    payload = update().encode()
    with pytest.raises(WireError) as info:
        ModelUpdate.decode(payload, max_bytes=len(payload) - 1)
    assert info.value.reason == "too-large"
    assert ModelUpdate.decode(payload, max_bytes=len(payload)).seq == 7
    # The size bound comes first: even garbage is only "too-large".
    with pytest.raises(WireError, match=r"^too-large"):
        ModelUpdate.decode(b"\xff" * 100, max_bytes=99)


@pytest.mark.parametrize("payload", [
    b"", b"\xff", b"\x1c", update().encode()[:-1], update().encode()[:40],
    b"\xa1\x61", b"\x5f\x41",
], ids=["empty", "break", "reserved-ai", "truncated-1", "truncated-40", "short-map",
        "unterminated-bytes"])
def test_not_cbor(payload: bytes) -> None:
    assert reason_of(payload) == "not-cbor"


@pytest.mark.parametrize("decode", ["update", "model"])
@pytest.mark.parametrize("trailer", [b"\x00", b"junk", b"\xff"])
def test_trailing_bytes_after_the_map(decode: str, trailer: bytes) -> None:
    if decode == "update":
        assert reason_of(update().encode() + trailer) == "not-cbor"
    else:
        assert reason_of(global_model().encode() + trailer, GlobalModel.decode) == "not-cbor"


def test_repeated_key_is_refused() -> None:
    valid = update().encode()
    assert valid[0] == 0xAA  # a map of 10 pairs
    payload = b"\xab" + valid[1:] + cbor2.dumps("seq") + cbor2.dumps(99)
    assert reason_of(payload) in {"bad-keys", "not-cbor"}


@pytest.mark.parametrize("value", [[1, 2], "update", 500, -5, None, b"\xa0", 1.5])
def test_not_a_map(value: Any) -> None:
    assert reason_of(cbor2.dumps(value)) == "not-a-map"


@pytest.mark.parametrize("first", [0x00, 0x01, 0x03, 0x17])
def test_a_small_first_byte_is_an_update_format_number(first: int) -> None:
    """0x00-0x17 (CBOR's small integers) start compact formats: 2, or one to come."""
    assert reason_of(bytes([first]) + b"\x00" * 20) == "unknown-format"


def test_unknown_trigger_is_a_bad_field() -> None:
    obj = raw_update()
    obj["trigger"] = "whim"
    assert reason_of(cbor2.dumps(obj)) == "bad-field"


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("seq"),
    lambda o: o.pop("parts"),
    lambda o: o.update(extra=1),
    lambda o: o.update({1: "int key"}),
    lambda o: (o.pop("codec"), o.update(codecs="float32")),
], ids=["missing-seq", "missing-parts", "extra", "int-key", "renamed"])
def test_bad_keys(mutate: Any) -> None:
    obj = raw_update()
    mutate(obj)
    assert reason_of(cbor2.dumps(obj)) == "bad-keys"


@pytest.mark.parametrize("fmt", [0, 2, -1, "1", None, True, [1]])
def test_unknown_format(fmt: Any) -> None:
    assert reason_of(cbor2.dumps(raw_update(format=fmt))) == "unknown-format"


@pytest.mark.parametrize("decode", ["update", "model"])
def test_float_format_number_is_unknown(decode: str) -> None:
    if decode == "update":
        assert reason_of(cbor2.dumps(raw_update(format=1.0))) == "unknown-format"
    else:
        payload = cbor2.dumps(raw_model(format=1.0))
        assert reason_of(payload, GlobalModel.decode) == "unknown-format"


@pytest.mark.parametrize("codec", ["float16", "FLOAT32", "", None, 32, "f32", "gzip",
                                   "topk:0.01+q:4+zstd", "zstd+q:4", "x" * 65])
def test_unknown_codec(codec: Any) -> None:
    assert reason_of(cbor2.dumps(raw_update(codec=codec))) == "unknown-codec"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 7, 16])
def test_non_finite_part_value_is_refused_by_its_reader(bad: float, where: int) -> None:
    head = tricky_parts()["head"].copy()
    head[where] = bad
    obj = raw_update(parts={"head": float32_payload(head)})
    got = ModelUpdate.decode(cbor2.dumps(obj), max_bytes=MAX)  # the wire does not decode
    with pytest.raises(DecodeError) as info:
        got.read_part("head", length=17)
    assert info.value.reason == "non-finite"


def test_non_finite_signalling_nan_bits() -> None:
    blob = bytearray(float32_payload(np.zeros(4, np.float32)))
    blob[-8:-4] = struct.pack("<I", 0x7F800001)  # a signalling NaN, not produced by numpy ops
    got = ModelUpdate.decode(cbor2.dumps(raw_update(parts={"body": bytes(blob)})),
                             max_bytes=MAX)
    with pytest.raises(DecodeError, match=r"^non-finite"):
        got.read_part("body", length=4)


@pytest.mark.parametrize("parts", [
    {"body": b""},
    {"body": b"\0" * 8, "head": b""},
    {},
    {f"p{i}": b"\0\0\0\0" for i in range(MAX_PARTS + 1)},
    {"bo/dy": b"\0" * 4},
    {"+": b"\0" * 4},
    {"": b"\0" * 4},
    {"_body": b"\0" * 4},
    {"x" * 65: b"\0" * 4},
    {1: b"\0" * 4},
    {"body": [0.0, 1.0]},
    {"body": "0000"},
    {"body": None},
    [b"\0" * 4],
    b"\0" * 4,
], ids=["empty-payload", "second-part-empty", "empty", "too-many", "slash-name",
        "plus-name", "empty-name", "underscore-first", "long-name", "int-name", "list-values",
        "text-values", "null-values", "list-not-map", "bytes-not-map"])
def test_bad_parts(parts: Any) -> None:
    assert reason_of(cbor2.dumps(raw_update(parts=parts))) == "bad-parts"


def test_max_parts_is_accepted() -> None:
    parts = {f"p{i}": b"\0\0\0\0" for i in range(MAX_PARTS)}
    got = ModelUpdate.decode(cbor2.dumps(raw_update(parts=parts)), max_bytes=MAX)
    assert len(got.parts) == MAX_PARTS


@pytest.mark.parametrize(("key", "value"), [
    ("seq", True), ("seq", False), ("base_version", True), ("num_samples", True),
    ("seq", -1), ("base_version", -5), ("seq", 2**63), ("num_samples", 0),
    ("seq", 1.0), ("seq", "7"), ("seq", None),
    ("device", "dev/01"), ("device", "dev+01"), ("device", "+"), ("device", "#"),
    ("device", ""), ("device", "-dev"), ("device", "d" * 65), ("device", "dév"),
    ("device", 7), ("device", b"dev"), ("model", "har mlp"), ("model", None),
    ("created", True), ("created", "now"), ("created", math.nan), ("created", math.inf),
    ("created", None),
])
def test_bad_field(key: str, value: Any) -> None:
    assert reason_of(cbor2.dumps(raw_update(**{key: value}))) == "bad-field"


@pytest.mark.parametrize(("key", "value"), [
    ("seq", 0), ("seq", 2**63 - 1), ("num_samples", 1), ("created", 0), ("created", -1.5),
    ("device", "a"), ("device", "A" * 64), ("device", "dev_1.2-x"),
])
def test_edge_values_are_accepted(key: str, value: Any) -> None:
    got = ModelUpdate.decode(cbor2.dumps(raw_update(**{key: value})), max_bytes=MAX)
    assert getattr(got, key) == value


@pytest.mark.parametrize(("key", "value"), [
    ("device", "dev-01\n"), ("model", "har-mlp\n"), ("parts", {"body\n": b"\0" * 4}),
])
def test_identifier_with_trailing_newline_is_rejected(key: str, value: Any) -> None:
    assert reason_of(cbor2.dumps(raw_update(**{key: value}))) in {"bad-field", "bad-parts"}


@pytest.mark.parametrize("decode", ["update", "model"])
def test_huge_integer_where_a_float_belongs(decode: str) -> None:
    if decode == "update":
        payload = cbor2.dumps(raw_update(created=10**400))
        assert reason_of(payload) == "bad-field"
    else:
        obj = cbor2.loads(global_model().encode())
        obj["mean_staleness"] = -(10**400)
        assert reason_of(cbor2.dumps(obj), GlobalModel.decode) == "bad-field"


# ------------------------------------------------------------- model rejection


def raw_model(**changes: Any) -> dict[str, Any]:
    obj = cbor2.loads(global_model().encode())
    obj.update(changes)
    return obj


def test_global_model_with_tampered_values_fails_its_digest() -> None:
    obj = raw_model()
    blob = bytearray(obj["parts"]["head"])
    blob[5] ^= 0x01
    obj["parts"]["head"] = bytes(blob)
    assert reason_of(cbor2.dumps(obj), GlobalModel.decode) == "bad-digest"


@pytest.mark.parametrize("digest", ["0" * 64, SHA, parts_digest({"x": np.zeros(1)})])
def test_global_model_with_a_wrong_digest(digest: str) -> None:
    assert reason_of(cbor2.dumps(raw_model(digest=digest)), GlobalModel.decode) == "bad-digest"


@pytest.mark.parametrize(("changes", "reason"), [
    ({"digest": 5}, "bad-field"),
    ({"model_sha256": "AB" * 32}, "bad-field"),
    ({"model_sha256": "ab" * 31}, "bad-field"),
    ({"parent": -1}, "bad-field"),
    ({"parent": True}, "bad-field"),
    ({"version": True}, "bad-field"),
    ({"mean_staleness": math.nan}, "bad-field"),
    ({"format": 2}, "unknown-format"),
    ({"parts": {}}, "bad-parts"),
    ({"codec": "float32"}, "bad-keys"),
])
def test_global_model_rejections(changes: dict[str, Any], reason: str) -> None:
    assert reason_of(cbor2.dumps(raw_model(**changes)), GlobalModel.decode) == reason


def test_global_model_too_large() -> None:
    payload = global_model().encode()
    with pytest.raises(WireError, match=r"^too-large"):
        GlobalModel.decode(payload, max_bytes=len(payload) - 1)


# --------------------------------------------------------- heartbeat rejection


def hb_reason(payload: bytes) -> str:
    with pytest.raises(WireError) as info:
        Heartbeat.decode(payload)
    return info.value.reason


def hb_json(**changes: Any) -> bytes:
    obj = json.loads(heartbeat().encode())
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (b" " * (MAX_JSON_BYTES + 1), "too-large"),
    (b"{", "not-json"),
    (b"\xff\xfe\x00", "not-json"),
    (b"[1, 2]", "not-a-map"),
    (hb_json(extra=1), "bad-keys"),
    (hb_json(windows=True), "bad-field"),
    (hb_json(windows=1.5), "bad-field"),
    (hb_json(device=None), "bad-field"),
    (hb_json(time="now"), "bad-field"),
    (hb_json(model_version="4"), "bad-field"),
    (hb_json(evaluation=[1]), "bad-field"),
    (hb_json(evaluation={"version": 1}), "bad-keys"),
    (hb_json(evaluation={"version": 1, "windows": 2, "global_accuracy": True,
                         "personal_accuracy": 0.5}), "bad-field"),
    (heartbeat().encode().replace(b'"uptime_s":12.0', b'"uptime_s":NaN'), "bad-field"),
    (heartbeat().encode().replace(b'"time":1700000000.5', b'"time":Infinity'), "bad-field"),
], ids=["too-large", "truncated", "bad-utf", "list", "extra-key", "bool-int", "float-int",
        "null-str", "str-float", "str-int", "list-eval", "eval-keys", "eval-bool",
        "nan", "inf"])
def test_heartbeat_rejections(payload: bytes, reason: str) -> None:
    assert hb_reason(payload) == reason


@pytest.mark.parametrize(("changes", "reason"), [
    ({"format": 1}, "unknown-format"),
    ({"format": "2"}, "unknown-format"),
    ({"connected": 1}, "bad-field"),
    ({"on_battery": "yes"}, "bad-field"),
    ({"reconnects": False}, "bad-field"),
], ids=["old-format", "str-format", "int-bool", "str-bool", "bool-int"])
def test_heartbeat_format_and_booleans(changes: dict[str, Any], reason: str) -> None:
    assert hb_reason(hb_json(**changes)) == reason


def test_heartbeat_booleans_round_trip() -> None:
    sent = heartbeat(connected=True, on_battery=None, battery_percent=55.5)
    assert Heartbeat.decode(sent.encode()) == sent


# --------------------------------------------------------------- acknowledgements


def ack(**changes: Any) -> Ack:
    base = Ack(device="dev-01", seq=7, digest="0123456789abcdef" * 2, outcome="accepted",
               reason=None, duplicate=False,
               version=3, time=1_700_000_000.25)
    return replace(base, **changes)


@pytest.mark.parametrize("sent", [
    ack(), ack(duplicate=True), ack(outcome="rejected", reason="too-stale"),
    ack(outcome="rejected", reason="payload-non-finite", duplicate=True),
    ack(seq=None, outcome="rejected", reason="not-cbor"),
], ids=["accepted", "duplicate", "rejected", "rejected-again", "unreadable"])
def test_ack_round_trip(sent: Ack) -> None:
    assert Ack.decode(sent.encode()) == sent


def ack_json(**changes: Any) -> bytes:
    return json.dumps({**json.loads(ack().encode()), **changes}).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (b" " * (MAX_JSON_BYTES + 1), "too-large"),
    (b"{", "not-json"),
    (b"[]", "not-a-map"),
    (ack_json(extra=1), "bad-keys"),
    (ack_json(outcome="maybe"), "bad-field"),
    (ack_json(reason="too-stale"), "bad-field"),  # accepted with a reason
    (ack_json(outcome="rejected"), "bad-field"),  # rejected without one
    (ack_json(outcome="rejected", reason="Not A Code"), "bad-field"),
    (ack_json(outcome="rejected", reason=5), "bad-field"),
    (ack_json(duplicate=1), "bad-field"),
    (ack_json(seq=-1), "bad-field"),
    (ack_json(seq=True), "bad-field"),
    (ack_json(device="a/b"), "bad-field"),
    (ack_json(time="now"), "bad-field"),
    (ack_json(digest="0123"), "bad-field"),
    (ack_json(digest="0123456789ABCDEF" * 2), "bad-field"),
    (ack_json(seq=None), "bad-field"),  # accepted, yet no seq
], ids=["too-large", "truncated", "list", "extra", "outcome", "accepted-reason",
        "rejected-no-reason", "reason-shape", "reason-int", "dup-int", "negative-seq",
        "bool-seq", "device-topic", "time-str", "short-digest", "upper-digest",
        "accepted-no-seq"])
def test_ack_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        Ack.decode(payload)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_ack_random_bytes(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        Ack.decode(payload)


def test_heartbeat_missing_key() -> None:
    obj = json.loads(heartbeat().encode())
    del obj["rss_bytes"]
    assert hb_reason(json.dumps(obj).encode()) == "bad-keys"


def test_heartbeat_deeply_nested_json() -> None:
    assert hb_reason(b"[" * 5000) == "not-json"


# ------------------------------------------------------------------- fuzzing


FUZZ_DELTAS = {"body": np.linspace(-1, 1, 24, dtype=np.float32),
               "head": np.arange(6, dtype=np.float32)}
FUZZ_SIZES = {"body": 24, "head": 6}
VALID = update(parts=FUZZ_DELTAS).encode()
VALID_SPARSE = update(parts=FUZZ_DELTAS, codec="topk:0.25+q:4+zstd").encode()


def decodes_or_refuses(payload: bytes, max_bytes: int = 4096) -> None:
    """The property: a valid ModelUpdate or a WireError with a known reason, nothing else."""
    try:
        got = ModelUpdate.decode(payload, max_bytes=max_bytes)
    except WireError as exc:
        assert exc.reason in {"too-large", "not-cbor", "not-a-map", "bad-keys",
                              "unknown-format", "unknown-codec", "bad-parts", "bad-field"}
        return
    assert len(payload) <= max_bytes
    assert isinstance(got.device, str) and isinstance(got.model, str)
    assert all(type(v) is int for v in (got.seq, got.base_version, got.num_samples))
    assert got.seq >= 0 and got.base_version >= 0 and got.num_samples >= 1
    assert math.isfinite(got.created)
    assert 1 <= len(got.parts) <= MAX_PARTS
    Pipeline.from_spec(got.codec)
    parts_read_or_refused(got)


def parts_read_or_refused(got: ModelUpdate) -> None:
    """Each part of a decoded update reads as a finite vector or is refused with a known
    reason (a part the fuzz model does not have is read at 24 values)."""
    for name, blob in got.parts.items():
        assert isinstance(blob, bytes) and blob
        try:
            values = got.read_part(name, length=FUZZ_SIZES.get(name, 24)).dense()
        except DecodeError as exc:
            assert exc.reason in REASONS
        else:
            assert values.dtype == np.float32 and np.isfinite(values).all()


@FUZZ
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=700))
def test_fuzz_random_bytes(payload: bytes, max_bytes: int) -> None:
    decodes_or_refuses(payload, max_bytes)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)),
                min_size=1, max_size=8))
def test_fuzz_bit_flips(flips: list[tuple[int, int]]) -> None:
    payload = bytearray(VALID)
    for index, bit in flips:
        payload[index] ^= 1 << bit
    decodes_or_refuses(bytes(payload))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_SPARSE) - 1), st.integers(0, 7)),
                min_size=1, max_size=8))
def test_fuzz_bit_flips_compressed(flips: list[tuple[int, int]]) -> None:
    payload = bytearray(VALID_SPARSE)
    for index, bit in flips:
        payload[index] ^= 1 << bit
    decodes_or_refuses(bytes(payload))


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, len(VALID)), st.binary(max_size=16))
def test_fuzz_truncate_and_splice(cut: int, resume: int, inserted: bytes) -> None:
    decodes_or_refuses(VALID[:cut])
    decodes_or_refuses(VALID[:cut] + inserted + VALID[resume:])


@FUZZ
@given(st.binary(min_size=1, max_size=40), st.integers(0, len(VALID)))
def test_fuzz_overwrite(chunk: bytes, at: int) -> None:
    decodes_or_refuses(VALID[:at] + chunk + VALID[at + len(chunk):])


CBOR_LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(2**1000, 2**1100)
               | st.floats() | st.text(max_size=8) | st.binary(max_size=12))
CBOR_VALUES = (CBOR_LEAVES | st.lists(CBOR_LEAVES, max_size=3)
               | st.dictionaries(st.text(max_size=5), CBOR_LEAVES, max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(ModelUpdate.KEYS)), CBOR_VALUES, max_size=2))
@example({"created": 10**400})  # the known failure, independent of generation
def test_fuzz_field_values(changes: dict[str, Any]) -> None:
    """One or two fields of a valid update replaced by arbitrary CBOR values."""
    decodes_or_refuses(cbor2.dumps(raw_update(**changes)), max_bytes=MAX)


def test_fold_deltas_grows_matching_residuals_and_restarts_mismatched_ones() -> None:
    from fedd.wire import fold_deltas

    delta = {"body": np.ones(4, np.float32), "head": np.full(2, 2.0, np.float32)}
    folded = fold_deltas(delta, {"body": np.full(4, 0.5, np.float32),
                                 "head": np.zeros(3, np.float32)})  # head: another model's
    np.testing.assert_array_equal(folded["body"], np.full(4, 1.5, np.float32))
    np.testing.assert_array_equal(folded["head"], delta["head"])


# ------------------------------------------------------- ModelUpdate, format 2


@dataclass(frozen=True)
class Model:
    """What format 2 needs of a model (fedd.model.ModelSpec is one)."""

    name: str = "har-mlp"
    sha256: str = "63da1295" + "0" * 56
    parts: dict[str, int] = dataclass_field(default_factory=lambda: dict(SIZES))


MODEL = Model()
SEQ = 1_795_424_574_134  # a seq of a store started at the clock in ms (~2^41)


def compact(*, parts: dict[str, np.ndarray] | None = None, codec: str = "topk:0.1+q:4",
            **changes: Any) -> ModelUpdate:
    return update(parts=parts, codec=codec, format=2, **{"seq": SEQ, **changes})


def decode2(payload: bytes, *, max_bytes: int = MAX, model: Any = MODEL,
            device: str | None = "dev-01") -> ModelUpdate:
    return ModelUpdate.decode(payload, max_bytes=max_bytes, device=device, model=model)


def reason2(payload: bytes, **kwargs: Any) -> str:
    with pytest.raises(WireError) as info:
        decode2(payload, **kwargs)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def sealed(record: bytes | bytearray) -> bytes:
    """A format-2 record with its CRC-32 appended (to reach the checks after it)."""
    return bytes(record) + zlib.crc32(record).to_bytes(4, "little")


def record(*varints: int, tag: bytes = bytes.fromhex("63da1295"), rest: bytes = b"") -> bytes:
    """Format byte, tag, the given varints (seq, base, samples, created, flags), `rest`, CRC."""
    out = bytearray([2]) + tag
    for number in varints:
        out += varint_bytes(number)
    return sealed(out + rest)


STACK = Pipeline.from_spec("topk:0.1+q:4").header  # 01 02 10 03 04 08
PAYLOAD = Pipeline.from_spec("topk:0.1+q:4").encode(np.ones(SIZES["head"], np.float32)).payload
BODY = PAYLOAD[len(STACK) + 1 :]  # after the header and n (17: one byte)


@pytest.mark.parametrize("codec", ["float32", "topk:0.1+q:4", "topk:0.1+q:4+zstd", "f16",
                                   "topk:5+sign:8"])
def test_format2_round_trip(codec: str) -> None:
    sent = compact(codec=codec)
    payload = sent.encode(model=MODEL)
    assert payload[0] == 0x02 and payload[1:5] == bytes.fromhex("63da1295")
    got = decode2(payload)
    assert (got.device, got.seq, got.base_version, got.model, got.num_samples, got.trigger,
            got.format) == ("dev-01", SEQ, 3, "har-mlp", 250, "version", 2)
    assert got.created == 1_700_000_000.0  # whole seconds on the wire
    assert got.parts == sent.parts
    # The codec is the stack the payloads state: no density, no zstd level.
    assert got.codec == Pipeline.from_spec(codec).spec.replace(":0.1", "").replace(
        ":5", "").replace("zstd:3", "zstd")
    for name, values in dense_parts(got, SIZES).items():
        np.testing.assert_array_equal(values, sent.read_part(name, length=SIZES[name]).dense())
    if codec == "float32":
        assert_bit_exact(dense_parts(got, SIZES), tricky_parts())


def test_format2_carries_the_trigger_and_any_subset_of_parts() -> None:
    body_only = {"body": tricky_parts()["body"]}
    got = decode2(compact(parts=body_only, trigger="drift").encode(model=MODEL))
    assert got.trigger == "drift" and set(got.parts) == {"body"}
    head_only = {"head": tricky_parts()["head"]}
    assert set(decode2(compact(parts=head_only).encode(model=MODEL)).parts) == {"head"}


def test_format2_header_is_25_bytes_and_the_stack_is_stated_once() -> None:
    """1 format + 4 tag + 6 seq + 1 base + 2 samples + 5 created + 1 flags + 1 length + 4 CRC,
    and the stack header once instead of the header and n in every part."""
    sent = compact()
    payloads = sum(len(p) for p in sent.parts.values())
    stack = len(sent.pipeline.header)
    per_part = sum(stack + len(varint_bytes(SIZES[name])) for name in sent.parts)
    assert (stack, per_part) == (6, 6 + 2 + 6 + 1)
    assert len(sent.encode(model=MODEL)) == payloads - per_part + stack + 25
    assert len(replace(sent, format=1).encode()) > payloads + 150  # keys, names, codec text


def test_format2_is_told_apart_by_its_first_byte() -> None:
    """A format-1 map (0xa0-0xbf) and a signed envelope (0x82) never start with 0x02."""
    assert update().encode()[0] == 0xAA
    assert decode2(update().encode()).format == 1  # format 1 still decodes, with or without
    assert ModelUpdate.decode(update().encode(), max_bytes=MAX).format == 1


def test_format2_needs_the_device_and_the_model() -> None:
    payload = compact().encode(model=MODEL)
    assert reason_of(payload) == "unknown-format"  # a reader without the model
    assert reason2(payload, device=None) == "unknown-format"
    with pytest.raises(ValueError, match="model="):
        compact().encode()


def test_format2_refusals_in_order() -> None:
    good = compact().encode(model=MODEL)
    assert reason2(good, max_bytes=len(good) - 1) == "too-large"
    assert reason2(b"\x03" + good[1:]) == "unknown-format"
    assert reason2(good[:14]) == "truncated"
    assert reason2(good[:-1]) == "bad-checksum"
    flipped = bytearray(good)
    flipped[9] ^= 0x10
    assert reason2(bytes(flipped)) == "bad-checksum"
    assert reason2(good, model=Model(sha256="ff" * 32)) == "wrong-model"
    assert reason2(good, model=Model(name="har-cnn", sha256="89e5b514" + "0" * 56)) \
        == "wrong-model"


@pytest.mark.parametrize(("varints", "rest", "reason"), [
    ((SEQ, 3, 250, 1_700_000_000, 0b110), STACK + bytes([len(BODY)]) + BODY,
     "bad-parts"),  # two parts, the last empty
    ((SEQ, 3, 250, 1_700_000_000, 0b001), STACK + BODY, "bad-parts"),  # no part: drift alone
    ((SEQ, 3, 250, 1_700_000_000, 0b1000), STACK + BODY, "bad-parts"),  # past the 2 parts
    ((SEQ, 3, 250, 1_700_000_000, 0b110), STACK + b"\x00" + BODY, "bad-parts"),  # empty body
    ((SEQ, 3, 250, 1_700_000_000, 0b110), STACK + b"\x7f" + BODY, "truncated"),  # past the end
    ((SEQ, 3, 250, 1_700_000_000, 0b110), STACK + b"\x80\x00" + BODY, "bad-varint"),
    ((SEQ, 3, 0, 1_700_000_000, 0b100), STACK + BODY, "bad-field"),  # num_samples 0
    ((SEQ, 3, 250, 2**53 + 1, 0b100), STACK + BODY, "bad-field"),  # past a float's integers
    ((SEQ, 3, 250), b"", "truncated"),  # fields missing: ends inside a varint
    ((SEQ, 3, 250, 1_700_000_000, 0b100), b"\x09" + STACK[1:] + BODY, "unknown-codec"),
    ((SEQ, 3, 250, 1_700_000_000, 0b100), STACK[:2] + b"\x77" + BODY, "unknown-codec"),
    ((SEQ, 3, 250, 1_700_000_000, 0b100), b"\x01\x02\x03\x04\x08\x10" + BODY,
     "unknown-codec"),  # q before topk: no encoder writes that stack
    ((SEQ, 3, 250, 1_700_000_000, 0b100), b"\x01\x02\x10", "unknown-codec"),  # cut short
    ((SEQ, 3, 250, 1_700_000_000, 0b100), STACK + BODY, None),  # the control: a valid head
])
def test_format2_field_refusals(varints: tuple[int, ...], rest: bytes,
                                reason: str | None) -> None:
    payload = record(*varints, rest=rest)
    if len(payload) < 18:
        payload = record(*varints, rest=b"\x80" * 6)  # long enough, ends in a varint
    if reason is None:
        assert decode2(payload).parts == {"head": PAYLOAD}  # the whole payload again
    else:
        assert reason2(payload) == reason


@pytest.mark.parametrize("bad", [
    b"\x80\x00",  # 0 written in two bytes: not the shortest form
    b"\xff" * 9 + b"\x01",  # ten bytes: past 63 bits
])
def test_format2_varints_are_short_and_shortest(bad: bytes) -> None:
    out = bytearray([2]) + bytes.fromhex("63da1295") + bad
    out += varint_bytes(3) + varint_bytes(250) + varint_bytes(1_700_000_000) + b"\x04"
    assert reason2(sealed(out + STACK + BODY)) == "bad-varint"


def test_format2_largest_counts_round_trip() -> None:
    sent = compact(seq=2**63 - 1, base_version=2**63 - 1, num_samples=2**63 - 1,
                   created=float(2**53))
    got = decode2(sent.encode(model=MODEL))
    assert (got.seq, got.base_version, got.num_samples, got.created) == (
        2**63 - 1, 2**63 - 1, 2**63 - 1, float(2**53))


@pytest.mark.parametrize(("changes", "model"), [
    ({"model": "har-cnn"}, MODEL),  # the update is of another model
    ({"seq": -1}, MODEL),
    ({"seq": 2**63}, MODEL),
    ({"num_samples": 0}, MODEL),
    ({"created": -1.0}, MODEL),
    ({"trigger": "whim"}, MODEL),
    ({}, Model(parts={"body": 300})),  # a part the model does not have
    ({}, Model(sha256="not hex")),
])
def test_format2_encoder_refuses_what_no_decoder_would_take(changes: dict[str, Any],
                                                            model: Model) -> None:
    with pytest.raises(ValueError):
        compact(**changes).encode(model=model)


def test_format2_encoder_refuses_parts_of_mixed_stacks() -> None:
    mixed = compact(parts={"body": tricky_parts()["body"]})
    mixed = replace(mixed, parts={**mixed.parts, "head": update().parts["head"]})
    with pytest.raises(ValueError, match="head"):
        mixed.encode(model=MODEL)


def test_format2_parts_are_read_at_the_models_lengths() -> None:
    """n is not on the wire: a part is the model's length, and a body that does not fit the
    stack at that length fails its read at the hub (payload-<reason>)."""
    got = decode2(record(SEQ, 3, 250, 1_700_000_000, 0b100, rest=STACK + BODY + b"\x00"))
    assert got.parts["head"].startswith(STACK + bytes([17]))
    with pytest.raises(DecodeError) as info:
        got.read_part("head", length=SIZES["head"])
    assert info.value.reason == "trailing-bytes"
    # A part of another length is another model, which the tag refuses; were the tag to
    # collide, a body must still fit its stack at the hub's length (float32: 4 bytes each).
    dense = compact(codec="float32").encode(model=MODEL)
    bigger = decode2(dense, model=Model(parts={"body": 300, "head": 18}))
    with pytest.raises(DecodeError) as info:
        bigger.read_part("head", length=18)
    assert info.value.reason == "truncated"


def test_format2_documented_example_bytes() -> None:
    """docs/wire-format.md's example header, field by field."""
    sent = compact(seq=SEQ, base_version=12, num_samples=180, created=1_795_424_575.8)
    out = sent.encode(model=MODEL)
    body = sent.parts["body"][len(STACK) + 2 :]  # n = 300: two bytes
    head = sent.parts["head"][len(STACK) + 1 :]
    assert len(body) < 128 and out[:27].hex(" ") == (
        "02"  # format 2
        " 63 da 12 95"  # the model tag: sha256 63da1295...
        " b6 b5 93 bd a0 34"  # seq 1795424574134
        " 0c"  # base_version 12
        " b4 01"  # num_samples 180
        " bf 82 90 d8 06"  # created 1795424575 (whole seconds)
        " 06"  # flags: part mask 0b11 (body, head) << 1, trigger version
        " 01 02 10 03 04 08"  # the stack once: pipeline v1, 2 stages, topk, q 4 bits 2^8
        " " + varint_bytes(len(body)).hex())  # the body's length, then its body
    assert out[27 : 27 + len(body)] == body
    assert out[27 + len(body) : -4] == head  # the last part, to the CRC
    assert out[-4:] == zlib.crc32(out[:-4]).to_bytes(4, "little")


FUZZ_MODEL = Model(parts=dict(FUZZ_SIZES))
VALID2 = compact(parts=FUZZ_DELTAS, codec="float32").encode(model=FUZZ_MODEL)
VALID2_SPARSE = compact(parts=FUZZ_DELTAS, codec="topk:0.25+q:4+zstd").encode(
    model=FUZZ_MODEL)
REASONS2 = {"too-large", "unknown-format", "truncated", "bad-checksum", "wrong-model",
            "bad-varint", "bad-field", "bad-parts", "unknown-codec"}


def decodes_or_refuses2(payload: bytes, max_bytes: int = 4096) -> None:
    """Format 2's property: a valid update or a WireError with one of its reasons."""
    try:
        got = decode2(payload, max_bytes=max_bytes, model=FUZZ_MODEL)
    except WireError as exc:
        assert exc.reason in REASONS2 | {"not-cbor", "not-a-map", "bad-keys", "unknown-codec",
                                         "bad-parts", "bad-field"}
        return
    assert len(payload) <= max_bytes
    if got.format == 1:
        return
    assert got.device == "dev-01" and got.model == FUZZ_MODEL.name
    assert all(type(v) is int for v in (got.seq, got.base_version, got.num_samples))
    assert 0 <= got.seq < 2**63 and 0 <= got.base_version < 2**63 and got.num_samples >= 1
    assert got.created.is_integer() and 0 <= got.created <= 2**53
    assert got.trigger in ("version", "drift")
    assert got.parts and set(got.parts) <= set(FUZZ_SIZES)
    parts_read_or_refused(got)


@FUZZ
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_fuzz2_random_bytes_after_the_format_byte(tail: bytes, max_bytes: int) -> None:
    decodes_or_refuses2(b"\x02" + tail, max_bytes)


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz2_random_records_with_a_good_checksum(body: bytes) -> None:
    """Past the CRC: random fields behind the right format byte and tag."""
    decodes_or_refuses2(sealed(b"\x02" + bytes.fromhex("63da1295") + body))


@FUZZ
@given(st.sampled_from([VALID2, VALID2_SPARSE]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=8),
       st.booleans())
def test_fuzz2_bit_flips(valid: bytes, flips: list[tuple[int, int]], fix_crc: bool) -> None:
    """Flipped bits: refused as bad-checksum, or (CRC fixed up) by the field checks."""
    payload = bytearray(valid)
    for index, bit in flips:
        payload[index % len(payload)] ^= 1 << bit
    if fix_crc:
        payload = bytearray(sealed(payload[:-4]))
    elif bytes(payload[:-4]) != valid[:-4] and payload[0] == 2:
        assert reason2(bytes(payload), model=FUZZ_MODEL) in {"bad-checksum", "unknown-format",
                                                             "truncated"}
    decodes_or_refuses2(bytes(payload))


@FUZZ
@given(st.sampled_from([VALID2, VALID2_SPARSE]), st.integers(0, 400), st.integers(0, 400),
       st.binary(max_size=16))
def test_fuzz2_truncate_and_splice(valid: bytes, cut: int, resume: int,
                                   inserted: bytes) -> None:
    decodes_or_refuses2(valid[:cut])
    spliced = valid[:cut] + inserted + valid[resume:]
    decodes_or_refuses2(spliced)
    decodes_or_refuses2(sealed(spliced[:-4]) if len(spliced) > 4 else spliced)


@FUZZ
@given(st.integers(0, 2**64), st.integers(0, 2**64), st.integers(0, 2**64),
       st.integers(0, 2**60), st.integers(0, 2**20))
def test_fuzz2_field_values(seq: int, base: int, samples: int, created: int,
                            flags: int) -> None:
    """Any numbers in the five varints, with a valid part behind them."""
    head = compact(parts=FUZZ_DELTAS, codec="float32").parts["head"]  # header, n = 6, body
    decodes_or_refuses2(record(seq, base, samples, created, flags, rest=head[:3] + head[4:]))
