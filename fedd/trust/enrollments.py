"""Enrollment records: one per device, what the hub trusts about it, and where they live.

``scripts/enroll`` runs on the device: it creates (or loads) the device's
Ed25519 update key and, with a TPM, its attestation key, and writes the
record as JSON (`create_enrollment`, `Enrollment.to_json`). The operator
copies the file to the hub and registers it (``scripts/enroll register``,
`EnrollmentStore.register_file`): the hub loads it strictly, checks every
claim it can, and keeps it as ``<store>/<device_id>.json``.

The device id is the one in the device's client certificate (its CN, which
the broker's ACL turns into the only topics the device may write), so an
update arriving on ``update/<device_id>`` is checked against this record.

Record, format 1 (JSON object, exactly these keys)::

    {"format": 1,
     "device_id": "pi-001",               # the certificate CN
     "device_class": "rpi4",              # selects the PCR policy
     "enrolled_at": "2025-11-23T08:13:02Z",
     "update_key": "-----BEGIN PUBLIC KEY-----…",   # Ed25519, SubjectPublicKeyInfo PEM
     "tpm": {"ak_handle": "0x81010002",
             "ak_public": "<hex TPMT_PUBLIC>",      # what the hub verifies quotes with
             "ak_name": "<hex>", "ak_pem": "-----BEGIN PUBLIC KEY-----…",  # derived, checked
             "binding": {"attest": "<hex>", "signature": "<hex>", "pcrs": {"0": "<hex>", …}}},
     "no_tpm": null}

With no TPM, ``tpm`` is null and ``no_tpm`` says why. ``binding`` is a quote
by the AK whose qualifying data is `fedd.trust.signing.binding_nonce` of
the device id and the update key: the hub checks it at registration, so the
update key is vouched for by the TPM. Its PCR values are those at
enrollment, a starting point for the policy of the device's class.

What the hub cannot check: that the AK lives in a genuine TPM (no EK
certificate, no credential activation). Enrollment is trust on first use by
the operator who runs ``scripts/enroll`` on the device.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedd.pki import BadIdentity, check_device_id
from fedd.trust.quote import AttestationFormatError, NoTpm, Quote
from fedd.trust.reasons import Reason
from fedd.trust.signing import binding_nonce, parse_public_key, public_key_pem, verify_update

if TYPE_CHECKING:
    from fedd.trust.attest import AkPublic
    from fedd.trust.tpm import Tpm

__all__ = [
    "ENROLLMENT_FORMAT",
    "Enrollment",
    "EnrollmentError",
    "EnrollmentStore",
    "create_enrollment",
]

ENROLLMENT_FORMAT = 1
MAX_ENROLLMENT_BYTES = 16 * 1024
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
PERSISTENT_RANGE = (0x81000000, 0x817FFFFF)
MAX_REASON_CHARS = 300
TOP_KEYS = {"format", "device_id", "device_class", "enrolled_at", "update_key", "tpm", "no_tpm"}
TPM_KEYS = {"ak_handle", "ak_public", "ak_name", "ak_pem", "binding"}


class EnrollmentError(ValueError):
    """An enrollment record the hub refuses; the message names the source and why."""


@dataclass(frozen=True, kw_only=True)
class Enrollment:
    """What the hub knows about one device: identity, class, update key and TPM AK (if any)."""

    device_id: str
    device_class: str
    enrolled_at: float  # seconds since the epoch (UTC)
    update_key: Ed25519PublicKey
    ak: AkPublic | None = None
    ak_handle: int | None = None
    binding: Quote | None = None
    no_tpm: str | None = None

    @property
    def ak_pem(self) -> str | None:
        return None if self.ak is None else self.ak.pem

    @property
    def ak_name(self) -> bytes | None:
        return None if self.ak is None else self.ak.name

    def verify_update(self, body: bytes, signature: bytes) -> Reason | None:
        """None if the update ``body`` carries this device's signature, else why not."""
        return verify_update(self.update_key, self.device_id, body, signature)

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        tpm = None
        if self.ak is not None:
            assert self.binding is not None and self.ak_handle is not None
            tpm = {"ak_handle": f"{self.ak_handle:#x}", "ak_public": self.ak.public.hex(),
                   "ak_name": self.ak.name.hex(), "ak_pem": self.ak.pem,
                   "binding": self.binding.to_json_dict()}
        when = dt.datetime.fromtimestamp(int(self.enrolled_at), dt.UTC)
        return {"format": ENROLLMENT_FORMAT, "device_id": self.device_id,
                "device_class": self.device_class,
                "enrolled_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "update_key": public_key_pem(self.update_key), "tpm": tpm,
                "no_tpm": self.no_tpm}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<enrollment>") -> Enrollment:
        """Load and check a record strictly; `EnrollmentError` naming ``source`` otherwise."""
        if len(text) > MAX_ENROLLMENT_BYTES:
            raise EnrollmentError(f"{source}: larger than {MAX_ENROLLMENT_BYTES} bytes")
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as error:
            raise EnrollmentError(f"{source}: not JSON ({error})") from None
        return cls.from_dict(obj, source=source)

    @classmethod
    def from_dict(cls, obj: Any, *, source: str = "<enrollment>") -> Enrollment:
        try:
            return _parse(obj)
        except EnrollmentError as error:
            raise EnrollmentError(f"{source}: {error}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _keys(obj: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EnrollmentError(f"{what} must be an object")
    if set(obj) != keys:
        extra, missing = sorted(set(obj) - keys), sorted(keys - set(obj))
        raise EnrollmentError(f"{what}: unknown keys {extra[:5]}, missing keys {missing}")
    return obj


def _text(obj: dict[str, Any], key: str, limit: int) -> str:
    value = obj[key]
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise EnrollmentError(f"{key} must be a string of 1-{limit} characters")
    return value


def _hex(value: Any, key: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise EnrollmentError(f"{key} must be a hex string of at most {limit} bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EnrollmentError(f"{key} is not hex") from None


def _parse(obj: Any) -> Enrollment:
    obj = _keys(obj, TOP_KEYS, "the record")
    if type(obj["format"]) is not int or obj["format"] != ENROLLMENT_FORMAT:
        raise EnrollmentError(f"format must be {ENROLLMENT_FORMAT}, got {obj['format']!r}")
    device_id = _text(obj, "device_id", 64)
    try:
        check_device_id(device_id)
    except BadIdentity as error:
        raise EnrollmentError(f"device_id: {error}") from None
    device_class = _text(obj, "device_class", 64)
    if not CLASS_NAME.fullmatch(device_class):
        raise EnrollmentError("device_class must be 1-64 of A-Z a-z 0-9 _ . - starting with "
                              "a letter or digit")
    stamp = _text(obj, "enrolled_at", 20)
    if not TIMESTAMP.fullmatch(stamp):
        raise EnrollmentError("enrolled_at must be UTC as YYYY-MM-DDTHH:MM:SSZ")
    try:
        enrolled_at = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC).timestamp()
    except ValueError as error:
        raise EnrollmentError(f"enrolled_at: {error}") from None
    try:
        update_key = parse_public_key(_text(obj, "update_key", 1024))
    except ValueError as error:
        raise EnrollmentError(f"update_key: {error}") from None
    tpm, no_tpm = obj["tpm"], obj["no_tpm"]
    if (tpm is None) == (no_tpm is None):
        raise EnrollmentError("exactly one of tpm and no_tpm must be set")
    common = {"device_id": device_id, "device_class": device_class,
              "enrolled_at": enrolled_at, "update_key": update_key}
    if tpm is None:
        return Enrollment(**common, no_tpm=_text(obj, "no_tpm", MAX_REASON_CHARS))
    return Enrollment(**common, **_parse_tpm(tpm, device_id, update_key))


def _parse_tpm(obj: Any, device_id: str, update_key: Ed25519PublicKey) -> dict[str, Any]:
    try:
        from fedd.trust.attest import (
            MAX_PUBLIC_BYTES,
            Refusal,
            check_signed_quote,
            parse_ak_public,
            pcr_digest,
        )
    except ImportError as error:
        raise EnrollmentError(f"the record has a TPM key and reading it needs tpm2-pytss "
                              f"(install fedd[tpm]): {error}") from None
    obj = _keys(obj, TPM_KEYS, "tpm")
    handle_text = _text(obj, "ak_handle", 10)
    if not re.fullmatch(r"0x[0-9a-f]{8}", handle_text):
        raise EnrollmentError("tpm.ak_handle must be a lowercase hex handle like 0x81010002")
    handle = int(handle_text, 16)
    if not PERSISTENT_RANGE[0] <= handle <= PERSISTENT_RANGE[1]:
        raise EnrollmentError(f"tpm.ak_handle {handle_text} is not a persistent owner handle")
    try:
        ak = parse_ak_public(_hex(obj["ak_public"], "tpm.ak_public", MAX_PUBLIC_BYTES))
    except Refusal as refusal:
        raise EnrollmentError(f"tpm.ak_public: {refusal.detail}") from None
    if _hex(obj["ak_name"], "tpm.ak_name", 34) != ak.name:
        raise EnrollmentError("tpm.ak_name is not the name of tpm.ak_public")
    if _text(obj, "ak_pem", 1024).strip() != ak.pem.strip():
        raise EnrollmentError("tpm.ak_pem is not the key of tpm.ak_public")
    try:
        binding = Quote.from_json_dict(obj["binding"])
    except AttestationFormatError as error:
        raise EnrollmentError(f"tpm.binding: {error}") from None
    try:
        quoted = check_signed_quote(ak, binding.attest, binding.signature)
    except Refusal as refusal:
        raise EnrollmentError(f"tpm.binding ({refusal.reason}): {refusal.detail}") from None
    if quoted.extra_data != binding_nonce(device_id, update_key):
        raise EnrollmentError("tpm.binding does not vouch for this device id and update key")
    if quoted.pcrs != tuple(binding.pcrs):
        raise EnrollmentError("tpm.binding's PCR values are not the PCRs it quotes")
    if pcr_digest(tuple(binding.pcrs.values())) != quoted.pcr_digest:
        raise EnrollmentError("tpm.binding's PCR values do not match the quoted digest")
    return {"ak": ak, "ak_handle": handle, "binding": binding}


def create_enrollment(*, device_id: str, device_class: str, update_key: Ed25519PrivateKey,
                      tpm: Tpm | NoTpm, pcrs: Iterable[int], now: float) -> Enrollment:
    """The device's record (device side): with a TPM, its AK and the binding quote over ``pcrs``."""
    check_device_id(device_id)
    if not CLASS_NAME.fullmatch(device_class):
        raise ValueError(f"device class {device_class!r}: 1-64 of A-Z a-z 0-9 _ . - starting "
                         "with a letter or digit")
    public = update_key.public_key()
    common = {"device_id": device_id, "device_class": device_class,
              "enrolled_at": float(int(now)), "update_key": public}
    if isinstance(tpm, NoTpm):
        return Enrollment(**common, no_tpm=tpm.reason[:MAX_REASON_CHARS])
    ak = tpm.attestation_key()
    binding = tpm.quote(binding_nonce(device_id, public), pcrs)
    record = Enrollment(**common, ak=ak.public, ak_handle=ak.handle, binding=binding)
    return Enrollment.from_dict(record.to_dict(), source="the new enrollment")  # check our own


class EnrollmentStore:
    """The hub's enrollments: a folder of ``<device_id>.json`` records, read strictly.

    Reads are cached per file (by inode, size and mtime), so the hub may call
    `get` for every update; an operator's change to a file is seen at once.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, tuple[tuple[int, int, int], Enrollment]] = {}
        self._lock = threading.Lock()

    def path(self, device_id: str) -> Path:
        return self.folder / f"{check_device_id(device_id)}.json"

    def get(self, device_id: str) -> Enrollment | None:
        """The device's record, None when it is not enrolled; `EnrollmentError` if it is bad."""
        try:
            path = self.path(device_id)
        except BadIdentity:
            return None
        try:
            with open(path, "rb") as stream:
                info = os.fstat(stream.fileno())
                stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
                with self._lock:
                    cached = self._cache.get(device_id)
                if cached is not None and cached[0] == stamp:
                    return cached[1]
                data = stream.read(MAX_ENROLLMENT_BYTES + 1)
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(device_id, None)
            return None
        record = Enrollment.from_json(data, source=str(path))
        if record.device_id != device_id:
            raise EnrollmentError(f"{path}: holds the record of {record.device_id!r}")
        with self._lock:
            self._cache[device_id] = (stamp, record)
        return record

    def device_ids(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if p.is_file())

    def register(self, record: Enrollment, *, replace: bool = False) -> Path:
        """Store ``record``; an existing different record is kept unless ``replace``."""
        path = self.path(record.device_id)
        text = record.to_json()
        if path.exists() and not replace:
            if path.read_text(encoding="utf-8") == text:
                return path  # the same record again: nothing to do
            raise EnrollmentError(f"{path}: {record.device_id!r} is already enrolled with "
                                  f"another record (re-enroll with replace)")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def register_file(self, source: str | os.PathLike[str], *,
                      replace: bool = False) -> Enrollment:
        """Load the record an operator copied from a device, check it, store it."""
        try:
            with open(source, "rb") as stream:
                data = stream.read(MAX_ENROLLMENT_BYTES + 1)
        except OSError as error:
            raise EnrollmentError(f"{source}: cannot read: {error.strerror or error}") from None
        record = Enrollment.from_json(data, source=os.fspath(source))
        self.register(record, replace=replace)
        return record

    def remove(self, device_id: str) -> bool:
        """Forget a device's enrollment; whether there was one."""
        path = self.path(device_id)
        with self._lock:
            self._cache.pop(device_id, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
