"""The fleet's certificates for mutual TLS: one CA per fleet, a broker, the hub, devices.

The broker trusts only the fleet CA and takes each client's MQTT username from
its certificate's common name (Mosquitto's `use_identity_as_username`), so the
CN is the identity the ACL grants rights to: a device's CN is its `device_id`,
the hub's is `fedd-hub`, a read-only monitor's is `fedd-monitor`. Device ids
starting with `fedd-` are reserved for these service identities, so that no
device certificate can ever carry one of them.

Keys are ECDSA P-256 (small, fast on a Raspberry Pi, supported by every TLS
stack a device may have) and are written unencrypted with mode 0600: a daemon
must start unattended, so the file's permissions are the protection. Nothing
here overwrites an existing key or certificate unless asked with `force`.

Layout of a provisioning folder (`scripts/provision` writes it):

    <pki>/ca.crt, ca.key            the fleet CA (keep ca.key offline)
    <pki>/broker/                   ca.crt, broker.crt, broker.key (+ rendered config)
    <pki>/hub/                      ca.crt, client.crt, client.key
    <pki>/monitor/                  ca.crt, client.crt, client.key
    <pki>/devices/<device_id>/      ca.crt, client.crt, client.key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "BROKER_CERT",
    "BROKER_KEY",
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "HUB_IDENTITY",
    "MONITOR_IDENTITY",
    "SERVICE_IDENTITIES",
    "AlreadyExists",
    "BadIdentity",
    "CertificateAuthority",
    "Issued",
    "PkiError",
    "check_device_id",
    "check_fleet",
    "check_identity",
    "client_certificate",
    "client_folder",
    "create_ca",
    "device_folder",
    "generate_key",
    "init_ca",
    "issue_broker",
    "issue_client",
    "load_ca",
    "load_certificate",
    "load_private_key",
    "parse_hosts",
    "server_certificate",
    "write_certificate",
    "write_private_key",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"
BROKER_CERT, BROKER_KEY = "broker.crt", "broker.key"

HUB_IDENTITY = "fedd-hub"
MONITOR_IDENTITY = "fedd-monitor"
SERVICE_IDENTITIES = (HUB_IDENTITY, MONITOR_IDENTITY)
RESERVED_PREFIX = "fedd-"

# The same rule as fedd.config's IDENTIFIER: an id becomes one MQTT topic level,
# so it can hold no '/', '+' or '#', and it becomes an ACL username via %u.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# One DNS name: dot-separated labels of letters, digits and inner hyphens.
HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

CA_DAYS = 3650
LEAF_DAYS = 730
# Certificates start an hour in the past: a device whose clock runs a little
# behind the provisioning machine must not see a "not yet valid" certificate.
BACKDATE = dt.timedelta(hours=1)
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


class PkiError(Exception):
    """Something the operator must fix before a certificate can be made or used."""


class BadIdentity(PkiError, ValueError):
    """A device id, fleet or host name that cannot be a certificate identity."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"{value!r}: {reason}")
        self.value = value
        self.reason = reason


class AlreadyExists(PkiError, FileExistsError):
    """A key or certificate is already there; replacing it needs force."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists (only force replaces it)")
        self.path = path


# ---------------------------------------------------------------- identities


def check_fleet(fleet: str) -> str:
    """A fleet name, as fedd.config accepts it (it is a topic level in the ACL)."""
    if not IDENTIFIER.fullmatch(fleet):
        raise BadIdentity(fleet, "a fleet must be 1-64 of A-Z a-z 0-9 _ . - starting with "
                                 "a letter or digit")
    return fleet


def check_device_id(device_id: str) -> str:
    """A device id that may become a certificate CN and so an ACL username."""
    if not IDENTIFIER.fullmatch(device_id):
        raise BadIdentity(device_id, "a device id must be 1-64 of A-Z a-z 0-9 _ . - starting "
                                     "with a letter or digit")
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise BadIdentity(device_id, f"device ids starting with {RESERVED_PREFIX!r} are "
                                     f"reserved for the service identities "
                                     f"{', '.join(SERVICE_IDENTITIES)}")
    return device_id


def check_identity(identity: str) -> str:
    """A client identity: a device id or one of the service identities (hub, monitor)."""
    return identity if identity in SERVICE_IDENTITIES else check_device_id(identity)


def parse_hosts(hosts: Iterable[str]) -> tuple[list[str], list[ipaddress.IPv4Address
                                                            | ipaddress.IPv6Address]]:
    """Split the broker's names into DNS names and IP addresses, for its SAN."""
    names: list[str] = []
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        try:
            addresses.append(ipaddress.ip_address(host))
        except ValueError:
            if not HOSTNAME.fullmatch(host):
                raise BadIdentity(host, "not an IP address nor a DNS name") from None
            names.append(host.lower())
    if not names and not addresses:
        raise BadIdentity("", "the broker needs at least one DNS name or IP address")
    return names, addresses


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertificateAuthority:
    """The fleet CA's key and certificate: everything it signs is trusted by the broker."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def __post_init__(self) -> None:
        if self.key.public_key() != self.certificate.public_key():
            raise PkiError("the CA key does not belong to the CA certificate")
        try:
            basic = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            raise PkiError("the CA certificate has no basic constraints") from None
        if not basic.value.ca:
            raise PkiError("the CA certificate is not a CA (basicConstraints CA:false)")

    @property
    def fleet(self) -> str | None:
        """The fleet named in the CA's subject (OU), if any."""
        units = self.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        return str(units[0].value) if units else None

    @property
    def expires(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _subject(common_name: str, fleet: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedd")]
    if fleet:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _check_days(days: int) -> int:
    if not isinstance(days, int) or days < 1:
        raise PkiError(f"validity must be a whole number of days >= 1, not {days!r}")
    return days


def create_ca(fleet: str, *, days: int = CA_DAYS,
              now: dt.datetime | None = None) -> CertificateAuthority:
    """A self-signed fleet CA that may sign leaf certificates only (pathlen 0)."""
    check_fleet(fleet)
    key = generate_key()
    start = (now or _utcnow()) - BACKDATE
    name = _subject(f"fedd fleet {fleet} CA", fleet)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=_check_days(days)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def _leaf(ca: CertificateAuthority, common_name: str, usage: x509.ObjectIdentifier, *,
          days: int, now: dt.datetime | None,
          san: x509.SubjectAlternativeName | None = None,
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and an end-entity certificate signed by `ca`, never outliving the CA."""
    key = generate_key()
    public = key.public_key()
    start = (now or _utcnow()) - BACKDATE
    end = min(start + dt.timedelta(days=_check_days(days)), ca.expires)
    if end <= start:
        raise PkiError(f"the fleet CA expired on {ca.expires:%Y-%m-%d}: make a new CA")
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name, ca.fleet))
        .issuer_name(ca.certificate.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_ski.value), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def server_certificate(ca: CertificateAuthority, hosts: Sequence[str], *,
                       days: int = LEAF_DAYS, now: dt.datetime | None = None,
                       ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's certificate: clients check its SAN against the host they dial."""
    names, addresses = parse_hosts(hosts)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses])
    return _leaf(ca, (names or [str(a) for a in addresses])[0], ExtendedKeyUsageOID.SERVER_AUTH,
                 days=days, now=now, san=san)


def client_certificate(ca: CertificateAuthority, identity: str, *, days: int = LEAF_DAYS,
                       now: dt.datetime | None = None,
                       ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A device's or the hub's certificate: its CN becomes the MQTT username.

    The identity is also in the SAN (`urn:fedd:client:<identity>`): Mosquitto
    reads the CN, but RFC 5280-minded verifiers (and other brokers) look there.
    """
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"urn:fedd:client:{check_identity(identity)}")])
    return _leaf(ca, identity, ExtendedKeyUsageOID.CLIENT_AUTH, days=days, now=now, san=san)


# ---------------------------------------------------------------- files


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_dir(folder: Path) -> None:
    """Create missing folders private (0700), parents too; existing ones keep their mode."""
    for missing in reversed([folder, *folder.parents]):
        if not missing.exists():
            missing.mkdir(mode=DIR_MODE, exist_ok=True)


def _write(path: Path, data: bytes, mode: int, *, force: bool) -> Path:
    """Write a file with `mode` from its creation on (a key is never briefly readable).

    Without force the file must not exist (O_EXCL); with force the new content
    goes to a sibling first and replaces the old file atomically.
    """
    _make_dir(path.parent)
    target = path.with_name(f".{path.name}.tmp") if force else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if force:
        target.unlink(missing_ok=True)
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise AlreadyExists(path) from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(target, mode)  # the umask may have narrowed a certificate's mode
        if force:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return path


def write_private_key(path: str | Path, key: ec.EllipticCurvePrivateKey, *,
                      force: bool = False) -> Path:
    """PEM (PKCS#8, unencrypted), mode 0600."""
    return _write(Path(path), _key_pem(key), KEY_MODE, force=force)


def write_certificate(path: str | Path, cert: x509.Certificate, *,
                      force: bool = False) -> Path:
    """PEM, mode 0644 (a certificate is public)."""
    return _write(Path(path), _cert_pem(cert), CERT_MODE, force=force)


def load_certificate(path: str | Path) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: no such certificate") from None
    except ValueError as error:
        raise PkiError(f"{path}: not a PEM certificate ({error})") from None


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{path}: no such key") from None
    except (ValueError, TypeError) as error:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC key")
    return key


# ---------------------------------------------------------------- the folder layout


@dataclass(frozen=True)
class Issued:
    """What one provisioning step wrote: the folder, its files, the new certificate."""

    identity: str
    folder: Path
    files: tuple[Path, ...]
    certificate: x509.Certificate

    @property
    def expires(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Check every target before writing any, so a refused step leaves no half bundle."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise AlreadyExists(path)


def _copy_ca(ca: CertificateAuthority, folder: Path, *, force: bool) -> Path:
    """Put the CA certificate beside a leaf; an identical copy already there is fine."""
    path = folder / CA_CERT
    pem = _cert_pem(ca.certificate)
    if path.exists() and path.read_bytes() == pem:
        return path
    return _write(path, pem, CERT_MODE, force=force)


def _ca_copy_conflicts(ca: CertificateAuthority, folder: Path) -> list[Path]:
    path = folder / CA_CERT
    return [path] if path.exists() and path.read_bytes() != _cert_pem(ca.certificate) else []


def init_ca(pki: str | Path, fleet: str, *, days: int = CA_DAYS,
            force: bool = False) -> tuple[CertificateAuthority, Issued]:
    """Create the fleet CA in `pki` (ca.key 0600, ca.crt)."""
    pki = Path(pki)
    key_path, cert_path = pki / CA_KEY, pki / CA_CERT
    _refuse_existing([key_path, cert_path], force)
    ca = create_ca(fleet, days=days)
    write_private_key(key_path, ca.key, force=force)
    write_certificate(cert_path, ca.certificate, force=force)
    return ca, Issued(f"fleet {fleet} CA", pki, (cert_path, key_path), ca.certificate)


def load_ca(pki: str | Path) -> CertificateAuthority:
    """The fleet CA from `pki` (ca.crt + ca.key), to sign more certificates."""
    pki = Path(pki)
    if not (pki / CA_CERT).exists() and not (pki / CA_KEY).exists():
        raise PkiError(f"{pki}: no fleet CA here (create one first: provision ca)")
    return CertificateAuthority(load_private_key(pki / CA_KEY), load_certificate(pki / CA_CERT))


def _issue(ca: CertificateAuthority, folder: Path, identity: str, names: tuple[str, str],
           made: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], force: bool) -> Issued:
    """Write a leaf's key and certificate and a copy of the CA certificate into `folder`."""
    cert_path, key_path = folder / names[0], folder / names[1]
    _refuse_existing([cert_path, key_path, *_ca_copy_conflicts(ca, folder)], force)
    key, cert = made
    write_private_key(key_path, key, force=force)
    write_certificate(cert_path, cert, force=force)
    ca_path = _copy_ca(ca, folder, force=force)
    return Issued(identity, folder, (ca_path, cert_path, key_path), cert)


def issue_broker(ca: CertificateAuthority, pki: str | Path, hosts: Sequence[str], *,
                 days: int = LEAF_DAYS, force: bool = False) -> Issued:
    """`<pki>/broker/`: the broker's key and certificate and the CA that checks clients."""
    made = server_certificate(ca, hosts, days=days)
    names = made[1].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    identity = ", ".join(str(getattr(name, "value", name)) for name in names)
    return _issue(ca, Path(pki) / "broker", identity, (BROKER_CERT, BROKER_KEY), made, force)


def device_folder(pki: str | Path, device_id: str) -> Path:
    return Path(pki) / "devices" / check_device_id(device_id)


def client_folder(pki: str | Path, identity: str) -> Path:
    """Where a client's bundle goes: hub/, monitor/ or devices/<device_id>/."""
    if identity == HUB_IDENTITY:
        return Path(pki) / "hub"
    if identity == MONITOR_IDENTITY:
        return Path(pki) / "monitor"
    return device_folder(pki, identity)


def issue_client(ca: CertificateAuthority, pki: str | Path, identity: str, *,
                 days: int = LEAF_DAYS, force: bool = False) -> Issued:
    """A client bundle (ca.crt, client.crt, client.key) ready for /etc/fedd/tls/."""
    made = client_certificate(ca, identity, days=days)  # checks the identity first
    return _issue(ca, client_folder(pki, identity), identity, (CLIENT_CERT, CLIENT_KEY), made,
                  force)
