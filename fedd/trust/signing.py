"""Update signatures: every update is signed with the device's Ed25519 key.

The hub verifies the signature against the public key in the device's
enrollment record before it decodes a byte of the body, so a malformed or
forged body never reaches a decoder.

Why Ed25519 in a file and not a TPM-resident ECC key:

- Every device can sign. A Raspberry Pi has no TPM unless a TPM board is
  added, and many fleets mix boards with and without one; they all still
  get authenticated updates, while the attestation policy
  (require/prefer/off) says what a missing TPM means.
- Cheap where it runs. Ed25519 is well under a millisecond in software (on
  the x86 build machine: 58 us to sign and 195 us to verify a 2 kB update;
  not measured on a Pi), with no TPM round trip. A discrete TPM on SPI/I2C
  is a slow device shared with everything else on the board that uses it
  (not measured here: swtpm is no guide to a hardware TPM). Signatures are
  a fixed 64 bytes (ECDSA-DER is 70-72), keys 32, which matters on a
  metered uplink; signing is deterministic (no per-signature randomness to
  get wrong).
- The AK cannot do it anyway: a restricted TPM key only signs TPM-made
  structures (quotes) or digests the TPM hashed itself, so a TPM-resident
  update key would be a second, unrestricted key with its own enrollment.

What ties the Ed25519 key to the TPM: ``scripts/enroll`` makes the TPM quote,
with the AK, over the qualifying data `binding_nonce` (a hash of the device
id and this public key); the hub checks that quote when it registers the
enrollment. So the update key was vouched for by the same TPM whose AK the
hub challenges afterwards. The cost: the private key is a file (mode 0600)
that root on the device can read, unlike a TPM key; a device whose root is
compromised fails its next attestation only if the compromise shows in the
PCRs the policy checks.

Signed message: ``b"fedd/update/v1\\0" || device_id (UTF-8) || b"\\0" || body``:
the context keeps an update signature from being valid as anything else, and
the device id binds it to its sender.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedd.trust.reasons import Reason

__all__ = [
    "KEY_MODE",
    "SIGNATURE_BYTES",
    "UPDATE_CONTEXT",
    "SigningKeyError",
    "binding_nonce",
    "generate_key",
    "load_key",
    "load_or_generate_key",
    "parse_public_key",
    "public_key_pem",
    "sign_update",
    "verify_update",
]

UPDATE_CONTEXT = b"fedd/update/v1\0"
BINDING_CONTEXT = b"fedd/update-key-binding/v1\0"
SIGNATURE_BYTES = 64
KEY_MODE = 0o600
MAX_KEY_FILE_BYTES = 4096
MAX_PEM_CHARS = 1024


class SigningKeyError(Exception):
    """A device key file that cannot be used; the message names the file and why."""


def generate_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """A new Ed25519 key written to ``path`` (PKCS#8 PEM, 0600 from creation); never overwrites."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_MODE)
    except FileExistsError:
        raise SigningKeyError(f"{path}: already exists (not overwritten)") from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), KEY_MODE)  # whatever the umask was
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def load_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the device key; refuse a file others can read, or anything but an Ed25519 key."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            data = stream.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: no such key file") from None
    except OSError as error:
        raise SigningKeyError(f"{path}: cannot read: {error.strerror or error}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise SigningKeyError(f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the "
                              f"key; chmod 600 it")
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes, not a key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise SigningKeyError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key")
    return key


def load_or_generate_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """The device key at ``path``, made on first use; (key, whether it was just made)."""
    if Path(path).exists():
        return load_key(path), False
    try:
        return generate_key(path), True
    except SigningKeyError:  # made by someone else since we looked
        return load_key(path), False


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_public_key(pem: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo); ValueError for anything else."""
    if not isinstance(pem, str) or len(pem) > MAX_PEM_CHARS:
        raise ValueError(f"an update key is a PEM string of at most {MAX_PEM_CHARS} characters")
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the update key is not an Ed25519 public key")
    return key


def _message(device_id: str, body: bytes) -> bytes:
    return UPDATE_CONTEXT + device_id.encode() + b"\0" + body


def sign_update(key: Ed25519PrivateKey, device_id: str, body: bytes) -> bytes:
    """The 64-byte signature of ``body`` sent by ``device_id``."""
    return key.sign(_message(device_id, bytes(body)))


def verify_update(public_key: Ed25519PublicKey, device_id: str, body: bytes,
                  signature: bytes) -> Reason | None:
    """None if ``signature`` is ``device_id``'s over ``body``; else malformed or bad-signature."""
    if (not isinstance(signature, bytes | bytearray | memoryview)
            or len(signature) != SIGNATURE_BYTES):
        return Reason.MALFORMED
    try:
        public_key.verify(bytes(signature), _message(device_id, bytes(body)))
    except InvalidSignature:
        return Reason.BAD_SIGNATURE
    return None


def binding_nonce(device_id: str, public_key: Ed25519PublicKey) -> bytes:
    """The qualifying data of the enrollment quote that vouches for this update key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(BINDING_CONTEXT + device_id.encode() + b"\0" + raw).digest()
