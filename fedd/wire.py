"""Wire messages between agents and the hub, and their strict codecs (v1).

Models are CBOR (RFC 8949) maps; updates are a CBOR map (format 1) or a
compact binary record (format 2: varints, a model tag and a CRC-32, no
names the topic or the model already give); heartbeats and status are JSON
so an operator can read them with `mosquitto_sub`. Every decoder takes
untrusted bytes: it bounds the size before parsing, demands exactly the
documented keys with exact types and ranges, and raises `WireError` whose
`reason` is a short, stable code the hub counts. docs/wire-format.md is the
normative description of what is here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol

import cbor2
import numpy as np

from fedd.pipeline import VERSION as PIPELINE_VERSION
from fedd.pipeline import Decoded, DecodeError, Pipeline, SpecError, largest_payload
from fedd.pipeline import spec as pipeline_spec
from fedd.pipeline.reader import Reader
from fedd.pipeline.varint import encode_one as varint

FORMAT = 1
# ModelUpdate format 2 (docs/wire-format.md, "ModelUpdate, format 2"): its first byte is
# its format number. Bytes 0x00-0x17 are CBOR's small unsigned integers, so no format-1
# update (a CBOR map, 0xa0-0xbf) and no signed envelope (0x82) starts with one; 0x02 is
# format 2 and the others up to 0x17 are kept for later formats (unknown-format).
UPDATE_FORMAT_COMPACT = 2
COMPACT_FIRST_BYTES = range(0x18)
MODEL_TAG_BYTES = 4  # the first bytes of the model file's sha256
CHECKSUM_BYTES = 4  # CRC-32 (zlib.crc32) of every byte before it, little-endian
MAX_VARINT_BYTES = 9  # 63 bits: every count is < 2**63
MAX_CREATED = 2**53  # as format 1: a float holds it exactly
# format byte, tag, five one-byte varints, the shortest stack (version, count, one
# code), a one-byte part, the checksum
MIN_COMPACT_BYTES = 1 + MODEL_TAG_BYTES + 5 + 3 + 1 + CHECKSUM_BYTES
CODEC_FLOAT32 = "float32"
TRIGGER_VERSION = "version"  # a round on a global version the device had not trained on
TRIGGER_DRIFT = "drift"  # a round its own data's drift asked for
TRIGGERS = (TRIGGER_VERSION, TRIGGER_DRIFT)
MAX_PARTS = 16
MAX_PART_VALUES = 64 * 1024 * 1024
MAX_JSON_BYTES = 16 * 1024
HEARTBEAT_FORMAT = 2  # 1 was the unversioned heartbeat before acknowledgements
MAX_CODEC_CHARS = 64
# The largest payload of any stack for the largest part: a bound on one part's bytes.
MAX_PART_PAYLOAD = largest_payload(MAX_PART_VALUES)
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class WireError(ValueError):
    """A payload that does not follow the wire format; `reason` is countable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj[key]
    # bool is an int subclass; a true/false where a number belongs is an error.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError("bad-field", f"{key} is a boolean")
    if not isinstance(value, kind):
        raise WireError("bad-field", f"{key} is {type(value).__name__}")
    return value


def _count(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    value = _field(obj, key, int)
    if not minimum <= value < 2**63:  # also bounds CBOR bignums
        raise WireError("bad-field", f"{key}={value} out of range")
    return value


def _identifier(obj: Mapping[str, Any], key: str) -> str:
    value = _field(obj, key, str)
    if not IDENTIFIER.fullmatch(value):
        raise WireError("bad-field", f"{key}={value!r} is not an identifier")
    return value


def _finite(obj: Mapping[str, Any], key: str) -> float:
    value = _field(obj, key, (int, float))
    if _is_int(value) and abs(value) > 2**53:  # a CBOR bignum would overflow float
        raise WireError("bad-field", f"{key} is out of range")
    if not math.isfinite(value):
        raise WireError("bad-field", f"{key} is not finite")
    return float(value)


def _exact_keys(obj: Any, expected: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise WireError("not-a-map", f"{what} is {type(obj).__name__}, not a map")
    keys = set(obj)
    if keys != expected:
        detail = []
        if keys - expected:
            detail.append(f"unknown {sorted(map(str, keys - expected))}")
        if expected - keys:
            detail.append(f"missing {sorted(expected - keys)}")
        raise WireError("bad-keys", f"{what}: " + ", ".join(detail))
    return obj


def load_json(payload: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Untrusted JSON, bounded before it is parsed (too-large, not-json)."""
    if len(payload) > max_bytes:
        raise WireError("too-large", f"{what} of {len(payload)} bytes")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError("not-json", str(exc) or type(exc).__name__) from None


def _load_cbor(payload: bytes, max_bytes: int, what: str, keys: set[str]) -> dict[str, Any]:
    """One definite-length CBOR map, no duplicate keys, nothing after it.

    The format number is checked before the key set, so a message of a
    future format is reported as such rather than as unknown keys.
    """
    if len(payload) > max_bytes:
        raise WireError("too-large", f"{what} of {len(payload)} bytes exceeds {max_bytes}")
    stream = io.BytesIO(payload)
    try:
        obj = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, allow_indefinite=False,
                                max_depth=4).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            EOFError) as exc:
        raise WireError("not-cbor", f"{what}: {exc}") from None
    if stream.tell() != len(payload):
        raise WireError("not-cbor", f"{what}: {len(payload) - stream.tell()} bytes after the map")
    if isinstance(obj, dict) and "format" in obj and (
            not _is_int(obj["format"]) or obj["format"] != FORMAT):
        raise WireError("unknown-format", f"{what} format {obj['format']!r}")
    return _exact_keys(obj, keys, what)


def encode_parts(parts: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """Flat float32 little-endian bytes per named part."""
    return {name: np.ascontiguousarray(values, dtype="<f4").tobytes()
            for name, values in sorted(parts.items())}


def _named_blobs(raw: Any) -> dict[str, Any]:
    """A parts map: 1-MAX_PARTS entries whose names are identifiers."""
    if not isinstance(raw, dict) or not raw:
        raise WireError("bad-parts", "parts must be a non-empty map")
    if len(raw) > MAX_PARTS:
        raise WireError("bad-parts", f"{len(raw)} parts exceed {MAX_PARTS}")
    for name in raw:
        if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
            raise WireError("bad-parts", f"part name {name!r} is not an identifier")
    return raw


def decode_parts(raw: Any) -> dict[str, np.ndarray]:
    """Strict inverse of `encode_parts`: bounded, float32-aligned, finite."""
    parts = {}
    for name, blob in _named_blobs(raw).items():
        if not isinstance(blob, bytes) or len(blob) % 4 or len(blob) // 4 > MAX_PART_VALUES:
            raise WireError("bad-parts", f"part {name} is not a float32 vector")
        values = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise WireError("non-finite", f"part {name} holds NaN or Inf")
        parts[name] = values
    return parts


def parts_digest(parts: Mapping[str, np.ndarray]) -> str:
    """sha256 over the parts' names and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, blob in encode_parts(parts).items():
        digest.update(name.encode() + b"\0" + len(blob).to_bytes(8, "big") + blob)
    return digest.hexdigest()


def _pipeline(codec: Any) -> Pipeline:
    """The pipeline a `codec` field names; it must be the canonical spec (unknown-codec)."""
    if not isinstance(codec, str) or not 0 < len(codec) <= MAX_CODEC_CHARS:
        raise WireError("unknown-codec", f"codec {codec!r}")
    try:
        pipeline = _PIPELINES.get(codec) or Pipeline.from_spec(codec)
    except SpecError as exc:
        raise WireError("unknown-codec", f"codec {codec!r}: {exc}") from None
    if pipeline.spec != codec:
        raise WireError("unknown-codec", f"codec {codec!r} is not canonical ({pipeline.spec!r})")
    if len(_PIPELINES) < 64:
        _PIPELINES[codec] = pipeline
    return pipeline


_PIPELINES: dict[str, Pipeline] = {}


def decode_payload_parts(raw: Any) -> dict[str, bytes]:
    """The parts map of an update: 1-MAX_PARTS named, non-empty, bounded pipeline payloads.

    The payloads themselves are not decoded here: that needs each part's
    expected length, which only the hub knows (`ModelUpdate.read_part`).
    """
    parts = {}
    for name, blob in _named_blobs(raw).items():
        if not isinstance(blob, bytes) or not 0 < len(blob) <= MAX_PART_PAYLOAD:
            raise WireError("bad-parts", f"part {name} is not a pipeline payload")
        parts[name] = blob
    return parts


@dataclass(frozen=True)
class EncodedDeltas:
    """Float32 deltas through a pipeline: the payloads to send and the residuals to keep."""

    payloads: dict[str, bytes] = field(repr=False)
    residuals: dict[str, np.ndarray] = field(repr=False)
    measurements: dict[str, dict[str, Any]]

    @property
    def bytes(self) -> int:
        return sum(len(p) for p in self.payloads.values())


def _carried(residual: np.ndarray | None, delta: np.ndarray) -> np.ndarray | None:
    """A stored residual, unless it belongs to a part of another shape (the model changed)."""
    return residual if residual is not None and np.shape(residual) == np.shape(delta) else None


def fold_deltas(deltas: Mapping[str, np.ndarray],
                residuals: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    """Send nothing: each part's residual grows by its delta, as error feedback would."""
    out = {}
    for name, delta in deltas.items():
        carried = _carried(residuals.get(name), delta)
        out[name] = (delta if carried is None else carried + delta).astype(np.float32)
    return out


def encode_deltas(pipeline: Pipeline, deltas: Mapping[str, np.ndarray],
                  residuals: Mapping[str, np.ndarray | None] | None = None, *,
                  rng: np.random.Generator | None = None) -> EncodedDeltas:
    """Encode each part's delta with its error-feedback residual (None or missing: zeros).

    A residual whose length differs from its part's (the model changed) is
    dropped, not an error: it fed back a delta of another shape.
    """
    residuals = residuals or {}
    payloads, kept, measurements = {}, {}, {}
    for name, delta in sorted(deltas.items()):
        out = pipeline.encode(delta, _carried(residuals.get(name), delta), rng=rng)
        payloads[name], kept[name], measurements[name] = (out.payload, out.residual,
                                                          out.measurements)
    return EncodedDeltas(payloads, kept, measurements)


class WireModel(Protocol):
    """What format 2 needs to know of the model: `fedd.model.ModelSpec` is one."""

    @property
    def name(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def parts(self) -> Mapping[str, int]: ...


def model_tag(model: WireModel) -> bytes:
    """The model's tag in a format-2 update: the first 4 bytes of its file's sha256."""
    try:
        tag = bytes.fromhex(model.sha256[: 2 * MODEL_TAG_BYTES])
    except (TypeError, ValueError):
        tag = b""
    if len(tag) != MODEL_TAG_BYTES:
        raise ValueError(f"model {model.name}: sha256 {model.sha256!r} is not hex")
    return tag


def _part_order(model: WireModel) -> list[str]:
    """A format-2 part mask's bit i is the i-th part of the model in name order."""
    names = sorted(model.parts)
    if not 0 < len(names) <= MAX_PARTS:
        raise ValueError(f"model {model.name} has {len(names)} parts (1 to {MAX_PARTS})")
    return names


def _checksum(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(CHECKSUM_BYTES, "little")


def _read_stack(reader: Reader) -> tuple[bytes, Pipeline]:
    """A pipeline header (version, stages) at the reader: its bytes and its pipeline."""
    try:
        version = reader.byte("the pipeline version")
        if version != PIPELINE_VERSION:
            raise DecodeError("unknown-version", f"pipeline format {version}")
        pipeline = Pipeline(pipeline_spec.read_header(reader))
    except (DecodeError, SpecError) as exc:
        raise WireError("unknown-codec", f"the stack header: {exc}") from None
    return pipeline.header, pipeline


@dataclass(frozen=True)
class ModelUpdate:
    """Device → hub: the delta of the shared weights from one local round.

    `codec` is the canonical pipeline spec ("float32", "topk:0.01+q:4:256+zstd:3");
    `parts` holds each part's pipeline payload. Build one from float32 deltas
    with `from_deltas` (or `encode_deltas` to keep the residuals); the hub
    reads a part with `read_part`, which needs the part's expected length.

    `format` is the encoding `encode` writes and `decode` read: 1, the CBOR
    map, or 2, the compact record (`encode(model=…)`, `decode(…, device=…,
    model=…)`), which leaves out what the topic and the model already say.
    A format-2 update states the pipeline header once for all its parts
    and leaves out each part's length n (the model's): it decodes with the
    device of its topic, the model's name, `created` in whole seconds, as
    `codec` the stack that header names (``topk+q:4:256+zstd``: k and the
    zstd level are the encoder's choice and not on the wire), and as
    `parts` the whole pipeline payloads again.
    """

    device: str
    seq: int
    base_version: int
    model: str
    num_samples: int
    parts: Mapping[str, bytes] = field(repr=False)
    created: float
    codec: str = CODEC_FLOAT32
    trigger: str = TRIGGER_VERSION
    format: int = FORMAT
    # A decoded format-2 update's pipeline (its codec is a decode-side spec).
    _stack: Pipeline | None = field(default=None, init=False, repr=False, compare=False)

    KEYS: ClassVar[set[str]] = {"format", "device", "seq", "base_version", "model",
                                "num_samples", "codec", "trigger", "created", "parts"}

    @classmethod
    def from_deltas(cls, deltas: Mapping[str, np.ndarray], *, codec: str = CODEC_FLOAT32,
                    rng: np.random.Generator | None = None, **fields: Any) -> ModelUpdate:
        """An update of float32 deltas through `codec`, with no error feedback."""
        pipeline = Pipeline.from_spec(codec)
        encoded = encode_deltas(pipeline, deltas, rng=rng)
        return cls(parts=encoded.payloads, codec=pipeline.spec, **fields)

    @property
    def pipeline(self) -> Pipeline:
        return self._stack or _pipeline(self.codec)

    def read_part(self, name: str, *, length: int) -> Decoded:
        """Check and parse one part's payload for a part of `length` values.

        The payload must be of this update's codec; raises `DecodeError`
        (its `reason` from fedd.pipeline.REASONS).
        """
        return self.pipeline.read(self.parts[name], length=length,
                                  max_bytes=largest_payload(length))

    def encode(self, *, model: WireModel | None = None) -> bytes:
        """The update's bytes in its `format`; format 2 needs the `model` (tag, part order)."""
        if self.format == UPDATE_FORMAT_COMPACT:
            if model is None:
                raise ValueError("a format-2 update is encoded with model= (its sha256 "
                                 "and part order)")
            return self._encode_compact(model)
        if self.format != FORMAT:
            raise ValueError(f"no update format {self.format!r} (1 or 2)")
        return cbor2.dumps({
            "format": FORMAT, "device": self.device, "seq": self.seq,
            "base_version": self.base_version, "model": self.model,
            "num_samples": self.num_samples, "codec": self.codec, "trigger": self.trigger,
            "created": self.created, "parts": dict(sorted(self.parts.items())),
        })

    def _encode_compact(self, model: WireModel) -> bytes:
        names = _part_order(model)
        if self.model != model.name:
            raise ValueError(f"an update of {self.model} encoded for model {model.name}")
        if not self.parts or not set(self.parts) <= set(names):
            raise ValueError(f"parts {sorted(self.parts)} are not a non-empty subset of "
                             f"{model.name}'s {names}")
        header = self.pipeline.header
        present = [name for name in names if name in self.parts]
        bodies = []
        for name in present:  # each payload is the header, n, then its body
            prefix = header + varint(model.parts[name])
            payload = self.parts[name]
            if not (len(prefix) < len(payload) <= MAX_PART_PAYLOAD
                    and payload.startswith(prefix)):
                raise ValueError(f"part {name} is not a {self.codec} payload of "
                                 f"{model.parts[name]} values")
            bodies.append(payload[len(prefix):])
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger {self.trigger!r} is not one of {TRIGGERS}")
        created = math.floor(self.created)
        if not (0 <= self.seq < 2**63 and 0 <= self.base_version < 2**63
                and 1 <= self.num_samples < 2**63 and 0 <= created <= MAX_CREATED):
            raise ValueError("seq, base_version, num_samples or created out of range")
        mask = sum(1 << names.index(name) for name in present)
        flags = mask << 1 | (self.trigger == TRIGGER_DRIFT)
        out = bytearray([UPDATE_FORMAT_COMPACT])
        out += model_tag(model)
        for number in (self.seq, self.base_version, self.num_samples, created, flags):
            out += varint(number)
        out += header
        for body in bodies[:-1]:
            out += varint(len(body)) + body
        out += bodies[-1]  # the last part runs up to the checksum
        return bytes(out + _checksum(out))

    @classmethod
    def decode(cls, payload: bytes, *, max_bytes: int, device: str | None = None,
               model: WireModel | None = None) -> ModelUpdate:
        """Either format, told apart by the first byte; format 2 needs `device` and `model`.

        `device` is the topic's last level (a format-2 update does not repeat
        it) and `model` the hub's model: its tag must match (`wrong-model`)
        and its parts, in name order, name the update's part mask.
        """
        if len(payload) > max_bytes:
            raise WireError("too-large", f"update of {len(payload)} bytes exceeds {max_bytes}")
        if payload and payload[0] in COMPACT_FIRST_BYTES:
            return cls._decode_compact(payload, device=device, model=model)
        obj = _load_cbor(payload, max_bytes, "update", cls.KEYS)
        codec = _pipeline(obj["codec"]).spec
        if obj["trigger"] not in TRIGGERS:
            raise WireError("bad-field", f"trigger {obj['trigger']!r} is not one of {TRIGGERS}")
        return cls(device=_identifier(obj, "device"), seq=_count(obj, "seq"),
                   base_version=_count(obj, "base_version"), model=_identifier(obj, "model"),
                   num_samples=_count(obj, "num_samples", minimum=1),
                   parts=decode_payload_parts(obj["parts"]), created=_finite(obj, "created"),
                   codec=codec, trigger=obj["trigger"])

    @classmethod
    def _decode_compact(cls, payload: bytes, *, device: str | None,
                        model: WireModel | None) -> ModelUpdate:
        if payload[0] != UPDATE_FORMAT_COMPACT:
            raise WireError("unknown-format", f"update format {payload[0]}")
        if device is None or model is None:
            raise WireError("unknown-format", "format 2 is read with the topic's device and "
                                              "the model (decode(..., device=, model=))")
        if len(payload) < MIN_COMPACT_BYTES:
            raise WireError("truncated", f"{len(payload)} bytes, a format-2 update has at "
                                         f"least {MIN_COMPACT_BYTES}")
        record = payload[:-CHECKSUM_BYTES]
        if _checksum(record) != payload[-CHECKSUM_BYTES:]:
            raise WireError("bad-checksum", "the CRC-32 does not match the bytes")
        tag = record[1 : 1 + MODEL_TAG_BYTES]
        if tag != model_tag(model):
            raise WireError("wrong-model", f"model tag {tag.hex()} is not {model.name}'s "
                                           f"({model.sha256[:8]})")
        names = _part_order(model)
        reader = Reader(record, offset=1 + MODEL_TAG_BYTES)
        parts: dict[str, bytes] = {}
        try:
            seq, base_version, num_samples, created, flags = (
                reader.uvarint(what, max_len=MAX_VARINT_BYTES)
                for what in ("seq", "base_version", "num_samples", "created", "flags"))
            if num_samples < 1:
                raise WireError("bad-field", "num_samples=0")
            if created > MAX_CREATED:
                raise WireError("bad-field", f"created={created} out of range")
            mask = flags >> 1
            if not mask or mask >> len(names):
                raise WireError("bad-parts", f"part mask {mask:#x} for {len(names)} parts")
            present = [name for i, name in enumerate(names) if mask >> i & 1]
        except DecodeError as exc:  # truncated, bad-varint: the Reader's own reasons
            raise WireError(exc.reason, exc.detail) from None
        header, stack = _read_stack(reader)
        try:
            for name in present[:-1]:
                size = reader.uvarint(f"part {name}'s length", max_len=MAX_VARINT_BYTES)
                if not 0 < size <= MAX_PART_PAYLOAD:
                    raise WireError("bad-parts", f"part {name} of {size} bytes")
                parts[name] = reader.take(size, f"part {name}")
        except DecodeError as exc:
            raise WireError(exc.reason, exc.detail) from None
        parts[present[-1]] = reader.rest()
        for name, body in parts.items():
            if not body:
                raise WireError("bad-parts", f"part {name} is empty")
            # The whole pipeline payload again, read at the hub (read_part).
            parts[name] = header + varint(model.parts[name]) + body
        update = cls(device=device, seq=seq, base_version=base_version, model=model.name,
                     num_samples=num_samples, parts=parts, created=float(created),
                     codec=stack.spec, trigger=TRIGGER_DRIFT if flags & 1 else TRIGGER_VERSION,
                     format=UPDATE_FORMAT_COMPACT)
        object.__setattr__(update, "_stack", stack)
        return update


@dataclass(frozen=True)
class GlobalModel:
    """Hub → devices: one global version of the shared weights (retained)."""

    version: int
    parent: int | None
    model: str
    model_sha256: str
    created: float
    contributors: int
    mean_staleness: float
    parts: Mapping[str, np.ndarray] = field(repr=False)

    KEYS: ClassVar[set[str]] = {"format", "version", "parent", "model", "model_sha256",
                                "created", "contributors", "mean_staleness", "digest", "parts"}

    @property
    def digest(self) -> str:
        return parts_digest(self.parts)

    def encode(self) -> bytes:
        return cbor2.dumps({
            "format": FORMAT, "version": self.version, "parent": self.parent,
            "model": self.model, "model_sha256": self.model_sha256, "created": self.created,
            "contributors": self.contributors, "mean_staleness": self.mean_staleness,
            "digest": self.digest, "parts": encode_parts(self.parts),
        })

    @classmethod
    def decode(cls, payload: bytes, *, max_bytes: int) -> GlobalModel:
        obj = _load_cbor(payload, max_bytes, "model", cls.KEYS)
        parent = None if obj["parent"] is None else _count(obj, "parent")
        sha = _field(obj, "model_sha256", str)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise WireError("bad-field", "model_sha256 is not a sha256 hex digest")
        message = cls(version=_count(obj, "version"), parent=parent,
                      model=_identifier(obj, "model"), model_sha256=sha,
                      created=_finite(obj, "created"),
                      contributors=_count(obj, "contributors"),
                      mean_staleness=_finite(obj, "mean_staleness"),
                      parts=decode_parts(obj["parts"]))
        if _field(obj, "digest", str) != message.digest:
            raise WireError("bad-digest", f"model version {message.version} digest mismatch")
        return message


@dataclass(frozen=True)
class Evaluation:
    """Holdout accuracy of one global version on one device (replay only)."""

    version: int
    windows: int
    global_accuracy: float
    personal_accuracy: float


@dataclass(frozen=True)
class Drift:
    """How far this device's recent windows depart from its training data."""

    prediction_kl: float
    feature_shift: float
    windows: int


@dataclass(frozen=True)
class Heartbeat:
    """Device health and progress, published every interval and on new versions."""

    device: str
    time: float
    uptime_s: float
    activity: str
    decision: str
    model_version: int | None
    windows: int
    outbox: int
    updates_sent: int
    uplink_bytes: int
    last_update_seq: int | None
    delegate: str
    rss_bytes: int
    last_update_energy_j: float | None = None
    last_update_bytes: int | None = None  # the encoded update (CBOR), before MQTT framing
    uplink_bytes_hour: int = 0  # update PUBLISH bytes acknowledged in the last hour
    uplink_budget_hour: int | None = None  # uplink.bytes_per_hour; None: unlimited
    goodput_bps: float | None = None  # bytes/s, publish → PUBACK (EWMA); None: none yet
    evaluation: Evaluation | None = None
    drift: Drift | None = None
    outbox_bytes: int = 0  # encoded bytes of the updates in the outbox
    acked: int = 0  # updates the hub acknowledged as accepted, all-time
    rejected: int = 0  # updates the hub acknowledged as rejected, all-time
    last_ack_seq: int | None = None
    last_ack_time: float | None = None
    connected: bool = False
    reconnects: int = 0  # connections after the first, since the agent started
    connect_failures: int = 0  # attempts refused or unreachable, since the agent started
    cpu_percent: float | None = None  # whole system, % of all cores
    temperature_c: float | None = None  # the hottest sensor
    battery_percent: float | None = None
    on_battery: bool | None = None
    cpu_s_hour: float = 0.0  # training CPU-seconds in the last hour (scheduler budget)
    runs_24h: int = 0  # training runs in the last 24 h (scheduler budget)
    software: str = ""  # the agent's fedd version
    model: str = ""  # the model it runs (manifest name)
    trusted: bool | None = None  # the hub's last attestation verdict; None: none yet
    trust_reason: str | None = None  # why not trusted (a fedd.trust.reasons code)
    trusted_until: float | None = None
    format: int = HEARTBEAT_FORMAT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Heartbeat:
        obj = load_json(payload, "heartbeat")
        if isinstance(obj, dict) and obj.get("format") != HEARTBEAT_FORMAT:
            raise WireError("unknown-format", f"heartbeat format {obj.get('format')!r}")
        return _from_json(cls, obj, "heartbeat")


_JSON_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "float": (int, float), "int": (int,), "bool": (bool,),
    "bool | None": (bool, type(None)),
    "int | None": (int, type(None)), "float | None": (int, float, type(None)),
    "str | None": (str, type(None)),
    "Evaluation | None": (dict, type(None)),
    "Drift | None": (dict, type(None)),
}
_NESTED: dict[str, type] = {"evaluation": Evaluation, "drift": Drift}


def _from_json(cls: type, obj: Any, what: str) -> Any:
    """Build a flat frozen dataclass from JSON with exact keys and types."""
    names = {f.name for f in fields(cls)}
    obj = _exact_keys(obj, names, what)
    values = {}
    for f in fields(cls):
        value = obj[f.name]
        kinds = _JSON_KINDS[str(f.type)]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise WireError("bad-field", f"{what}.{f.name} is {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise WireError("bad-field", f"{what}.{f.name} is not finite")
        if isinstance(value, dict):
            value = _from_json(_NESTED[f.name], value, f"{what}.{f.name}")
        values[f.name] = value
    return cls(**values)


ACK_ACCEPTED = "accepted"  # durably recorded and folded into the hub's buffer
ACK_REJECTED = "rejected"  # durably recorded as refused, with a reason; never retried
ACK_OUTCOMES = (ACK_ACCEPTED, ACK_REJECTED)
REASON = re.compile(r"^[a-z][a-z0-9-]{0,63}$")


DIGEST_HEX = re.compile(r"^[0-9a-f]{32}$")


def payload_digest(payload: bytes) -> str:
    """What an ack names an update by when its seq cannot be read: 128 bits of sha256."""
    return hashlib.sha256(payload).hexdigest()[:32]


@dataclass(frozen=True)
class Ack:
    """Hub → device: what became of one update; the agent drops it from its outbox.

    The update is named by `seq`, or, when the hub could not read its seq
    (an update it cannot decode), by `digest` alone (`payload_digest` of the
    bytes as published): a device must not resend forever what no hub reads.
    `duplicate` says the hub had already recorded this seq (a resend after a
    lost acknowledgement); the outcome is then the recorded one, and nothing
    was folded twice. `version` is the hub's current global version.
    """

    device: str
    seq: int | None
    digest: str
    outcome: str
    reason: str | None
    duplicate: bool
    version: int
    time: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        obj = _exact_keys(load_json(payload, "ack"), {f.name for f in fields(cls)}, "ack")
        if not isinstance(obj["duplicate"], bool):
            raise WireError("bad-field", "ack.duplicate is not a boolean")
        if obj["outcome"] not in ACK_OUTCOMES:
            raise WireError("bad-field", f"ack.outcome {obj['outcome']!r} not in {ACK_OUTCOMES}")
        reason = obj["reason"]
        well_formed = reason is None or (isinstance(reason, str) and REASON.fullmatch(reason))
        if not well_formed or (reason is None) != (obj["outcome"] == ACK_ACCEPTED):
            raise WireError("bad-field", f"ack.reason {reason!r} does not fit its outcome")
        if not isinstance(obj["digest"], str) or not DIGEST_HEX.fullmatch(obj["digest"]):
            raise WireError("bad-field", "ack.digest is not 32 lowercase hex digits")
        seq = None if obj["seq"] is None else _count(obj, "seq")
        if seq is None and obj["outcome"] == ACK_ACCEPTED:
            raise WireError("bad-field", "an accepted update's ack names its seq")
        return cls(device=_identifier(obj, "device"), seq=seq, digest=obj["digest"],
                   outcome=obj["outcome"], reason=reason, duplicate=obj["duplicate"],
                   version=_count(obj, "version"), time=_finite(obj, "time"))


@dataclass(frozen=True)
class Status:
    """Retained online/offline marker; the offline one doubles as the last will."""

    device: str
    state: str
    time: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()
