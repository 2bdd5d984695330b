"""fedd.pki, the Mosquitto templates and scripts/provision: certificates and files, no broker."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedd import config, mosquitto_conf, pki, topics

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVISION = REPO_ROOT / "scripts" / "provision"


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("farm")


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- certificates


def test_the_fleet_ca_is_a_self_signed_p256_ca_that_signs_leaves_only(ca):
    cert = ca.certificate
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and not usage.value.digital_signature
    assert ca.fleet == "farm"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=pki.CA_DAYS)
    assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC)


def test_a_device_certificate_names_the_device_and_is_for_clients_only(ca):
    key, cert = pki.client_certificate(ca, "pi-001", days=30)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert common_name(cert) == "pi-001"
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) == dt.timedelta(days=30)
    # What an RFC 5280 verifier of client certificates says: it chains, to this identity.
    verified = PolicyBuilder().store(Store([ca.certificate])).build_client_verifier() \
        .verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:fedd:client:pi-001")]
    assert verified.chain[-1] == ca.certificate


def test_the_broker_certificate_carries_every_name_clients_dial_and_serves_only(ca):
    _key, cert = pki.server_certificate(ca, ["mqtt.example.net", "LOCALHOST", "127.0.0.1",
                                             "::1"])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.net", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert common_name(cert) == "mqtt.example.net"
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(Store([ca.certificate])).build_server_verifier(name) \
            .verify(cert, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca.certificate])) \
            .build_server_verifier(x509.DNSName("elsewhere.example.net")).verify(cert, [])


def test_a_certificate_from_another_ca_does_not_chain(ca):
    other = pki.create_ca("farm")
    _key, cert = pki.client_certificate(other, "pi-001")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca.certificate])).build_client_verifier().verify(cert, [])


def test_a_client_certificate_is_no_server_certificate(ca):
    _key, cert = pki.client_certificate(ca, "localhost")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca.certificate])) \
            .build_server_verifier(x509.DNSName("localhost")).verify(cert, [])


def test_no_leaf_outlives_its_ca():
    short = pki.create_ca("farm", days=10)
    _key, cert = pki.client_certificate(short, "pi-001", days=365)
    assert cert.not_valid_after_utc == short.certificate.not_valid_after_utc
    expired = pki.create_ca("farm", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=5))
    with pytest.raises(pki.PkiError, match="expired"):
        pki.client_certificate(expired, "pi-001")


@pytest.mark.parametrize("days", [0, -1, 1.5])
def test_validity_is_whole_positive_days(ca, days):
    with pytest.raises(pki.PkiError, match="whole number of days"):
        pki.client_certificate(ca, "pi-001", days=days)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("device_id", ["pi-001", "A", "a.b_c-d", "0", "x" * 64])
def test_good_device_ids(device_id):
    assert pki.check_device_id(device_id) == device_id


@pytest.mark.parametrize("device_id", [
    "", "a/b", "+", "#", "dev+", "-dev", ".dev", "_dev", "a b", "dev\n", "x" * 65, "pi-ü",
    "fedd-hub", "fedd-monitor", "fedd-anything", "FEDD-Hub",
])
def test_bad_or_reserved_device_ids_are_refused(ca, device_id, tmp_path):
    with pytest.raises(pki.BadIdentity):
        pki.check_device_id(device_id)
    if device_id not in pki.SERVICE_IDENTITIES:
        with pytest.raises(pki.BadIdentity):
            pki.issue_client(ca, tmp_path, device_id)
        assert not any(tmp_path.iterdir()), "a refused identity wrote nothing"


def test_the_service_identities_are_clients_but_not_devices(ca):
    for identity in pki.SERVICE_IDENTITIES:
        assert pki.check_identity(identity) == identity
        _key, cert = pki.client_certificate(ca, identity)
        assert common_name(cert) == identity
    assert pki.HUB_IDENTITY == "fedd-hub" and pki.MONITOR_IDENTITY == "fedd-monitor"


def test_identities_follow_the_config_rule():
    assert pki.IDENTIFIER.pattern == config.IDENTIFIER["pattern"]


@pytest.mark.parametrize("fleet", ["", "a/b", "farm#", "x" * 65])
def test_bad_fleet_names_are_refused(fleet):
    with pytest.raises(pki.BadIdentity):
        pki.create_ca(fleet)


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-x.example"], ["a..b"], ["x" * 64]])
def test_bad_broker_names_are_refused(ca, hosts):
    with pytest.raises(pki.BadIdentity):
        pki.server_certificate(ca, hosts)


# ---------------------------------------------------------------- files


def test_a_provisioned_folder_has_private_keys_and_bundles(tmp_path):
    root = tmp_path / "pki"
    with umask(0):  # even a careless umask leaves no key readable by others
        ca, issued = pki.init_ca(root, "farm")
        broker = pki.issue_broker(ca, root, ["localhost", "127.0.0.1"])
        device = pki.issue_client(ca, root, "pi-001")
        hub = pki.issue_client(ca, root, pki.HUB_IDENTITY)
        monitor = pki.issue_client(ca, root, pki.MONITOR_IDENTITY)
    assert set(issued.files) == {root / "ca.crt", root / "ca.key"}
    assert broker.folder == root / "broker"
    assert device.folder == root / "devices" / "pi-001" == pki.device_folder(root, "pi-001")
    assert hub.folder == root / "hub" and monitor.folder == root / "monitor"
    for bundle in (device, hub, monitor):
        assert sorted(p.name for p in bundle.folder.iterdir()) == \
            ["ca.crt", "client.crt", "client.key"]
    assert sorted(p.name for p in broker.folder.iterdir()) == \
        ["broker.crt", "broker.key", "ca.crt"]
    for path in root.rglob("*"):
        if path.suffix == ".key":
            assert mode(path) == 0o600, path
        elif path.suffix == ".crt":
            assert mode(path) == 0o644, path
        else:
            assert mode(path) == 0o700, path
    cert = pki.load_certificate(device.folder / pki.CLIENT_CERT)
    cert.verify_directly_issued_by(pki.load_certificate(device.folder / pki.CA_CERT))
    key = pki.load_private_key(device.folder / pki.CLIENT_KEY)
    assert key.public_key() == cert.public_key()
    assert (device.folder / pki.CLIENT_KEY).read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


def test_nothing_is_overwritten_without_force(tmp_path):
    ca, _ = pki.init_ca(tmp_path, "farm")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(pki.AlreadyExists):
        pki.init_ca(tmp_path, "farm")
    device = pki.issue_client(ca, tmp_path, "pi-001")
    bundle = {p: p.read_bytes() for p in device.files}
    with pytest.raises(pki.AlreadyExists) as refused:
        pki.issue_client(ca, tmp_path, "pi-001")
    assert refused.value.path.parent == device.folder
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert {p: p.read_bytes() for p in device.files} == bundle

    again = pki.issue_client(ca, tmp_path, "pi-001", force=True)
    assert (again.folder / pki.CLIENT_KEY).read_bytes() != bundle[device.folder / pki.CLIENT_KEY]
    assert mode(again.folder / pki.CLIENT_KEY) == 0o600
    assert not list(again.folder.glob(".*.tmp"))


def test_a_refused_bundle_is_not_half_written(tmp_path):
    ca, _ = pki.init_ca(tmp_path / "pki", "farm")
    folder = pki.device_folder(tmp_path / "pki", "pi-001")
    folder.mkdir(parents=True)
    (folder / pki.CLIENT_KEY).write_bytes(b"an old key")
    with pytest.raises(pki.AlreadyExists):
        pki.issue_client(ca, tmp_path / "pki", "pi-001")
    assert sorted(p.name for p in folder.iterdir()) == [pki.CLIENT_KEY]


def test_a_bundle_never_mixes_two_cas(tmp_path):
    first, _ = pki.init_ca(tmp_path, "farm")
    device = pki.issue_client(first, tmp_path, "pi-001")
    (device.folder / pki.CLIENT_CERT).unlink()
    (device.folder / pki.CLIENT_KEY).unlink()
    with pytest.raises(pki.AlreadyExists, match=r"ca\.crt"):  # the CA copy there is another's
        pki.issue_client(pki.create_ca("farm"), tmp_path, "pi-001")
    assert sorted(p.name for p in device.folder.iterdir()) == [pki.CA_CERT]
    pki.issue_client(first, tmp_path, "pi-001")  # the same CA again: its copy is fine


def test_the_ca_loads_back_and_signs_more(tmp_path):
    ca, _ = pki.init_ca(tmp_path, "farm")
    loaded = pki.load_ca(tmp_path)
    assert loaded.certificate == ca.certificate and loaded.fleet == "farm"
    _key, cert = pki.client_certificate(loaded, "pi-002")
    cert.verify_directly_issued_by(ca.certificate)


def test_a_broken_ca_folder_is_explained(tmp_path):
    with pytest.raises(pki.PkiError, match="no fleet CA here"):
        pki.load_ca(tmp_path)
    pki.init_ca(tmp_path / "a", "farm")
    other, _ = pki.init_ca(tmp_path / "b", "farm")
    (tmp_path / "a" / pki.CA_KEY).write_bytes((tmp_path / "b" / pki.CA_KEY).read_bytes())
    with pytest.raises(pki.PkiError, match="does not belong"):
        pki.load_ca(tmp_path / "a")
    device = pki.issue_client(other, tmp_path / "b", "pi-001")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / pki.CA_CERT).write_bytes((device.folder / pki.CLIENT_CERT).read_bytes())
    (tmp_path / "c" / pki.CA_KEY).write_bytes((device.folder / pki.CLIENT_KEY).read_bytes())
    with pytest.raises(pki.PkiError, match="not a CA"):
        pki.load_ca(tmp_path / "c")
    (tmp_path / "c" / pki.CA_KEY).write_text("garbage")
    with pytest.raises(pki.PkiError, match="not an unencrypted PEM private key"):
        pki.load_ca(tmp_path / "c")


# ---------------------------------------------------------------- Mosquitto templates


def settings(tmp_path: Path, **overrides: object) -> mosquitto_conf.BrokerSettings:
    values: dict[str, object] = {
        "fleet": "farm", "port": 18883, "cafile": tmp_path / "ca.crt",
        "certfile": tmp_path / "broker.crt", "keyfile": tmp_path / "broker.key",
        "acl_file": tmp_path / "fedd-acl", "persistence_dir": tmp_path,
        "log_file": tmp_path / "mosquitto.log", "user": "root",
    }
    values.update(overrides)
    return mosquitto_conf.BrokerSettings(**values)  # type: ignore[arg-type]


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_broker_config_requires_a_fleet_certificate(tmp_path):
    conf = directives(mosquitto_conf.render_broker_conf(settings(tmp_path)))
    for line in ("listener 18883", "require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false", f"acl_file {tmp_path}/fedd-acl",
                 f"cafile {tmp_path}/ca.crt", f"certfile {tmp_path}/broker.crt",
                 f"keyfile {tmp_path}/broker.key", "persistence true",
                 f"persistence_location {tmp_path}/", f"log_dest file {tmp_path}/mosquitto.log",
                 "user root"):
        assert line in conf
    assert not any(re.search(r"@[A-Z_]+@", line) for line in conf)
    assert not any(line.startswith(("password_file", "psk_file")) for line in conf)
    assert sum(line.startswith("listener") for line in conf) == 1


def test_the_broker_config_follows_its_options(tmp_path):
    conf = directives(mosquitto_conf.render_broker_conf(
        settings(tmp_path, bind_address="10.0.0.2", log_file=None)))
    assert "listener 18883 10.0.0.2" in conf and "log_dest syslog" in conf
    installed = directives(mosquitto_conf.render_broker_conf(
        mosquitto_conf.BrokerSettings.installed(fleet="farm")))
    assert "cafile /etc/mosquitto/fedd/ca.crt" in installed
    assert "acl_file /etc/mosquitto/fedd/fedd-acl" in installed
    assert "listener 8883" in installed and "user mosquitto" in installed


@pytest.mark.parametrize(("override", "message"), [
    ({"cafile": Path("relative/ca.crt")}, "absolute"),
    ({"keyfile": Path("/etc/with space/broker.key")}, "white space"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"bind_address": "not an address"}, "bind address"),
    ({"user": "root\nallow_anonymous true"}, "user"),
    ({"fleet": "farm/#"}, "fleet"),
])
def test_bad_broker_settings_are_refused(tmp_path, override, message):
    with pytest.raises(pki.PkiError, match=message):
        settings(tmp_path, **override)


def test_a_template_placeholder_without_a_value_is_an_error():
    with pytest.raises(mosquitto_conf.TemplateError, match="NOPE"):
        mosquitto_conf.render("listener @PORT@ @NOPE@\n", {"PORT": "1"})


def test_the_acl_gives_devices_their_own_topics_only():
    acl = directives(mosquitto_conf.render_acl("farm"))
    sections: dict[str | None, list[str]] = {None: []}
    current: str | None = None
    for line in acl:
        if line.startswith("user "):
            current = line.split()[1]
            sections[current] = []
        else:
            sections[current].append(line)
    patterns = [line for line in acl if line.startswith("pattern ")]
    assert set(patterns) == {
        f"pattern write {topics.update('farm', '%u')}",
        f"pattern write {topics.heartbeat('farm', '%u')}",
        f"pattern write {topics.status('farm', '%u')}",
        "pattern write fedd/v1/farm/attest/%u",
        "pattern read fedd/v1/farm/attest/%u/nonce",
        f"pattern read {topics.ack('farm', '%u')}",
        "pattern read fedd/v1/farm/model/#",
    }
    assert topics.model_current("farm").startswith("fedd/v1/farm/model/")
    assert sections[None] == patterns, "no topic line for anonymous clients, patterns only"
    assert set(sections) == {None, pki.HUB_IDENTITY, pki.MONITOR_IDENTITY}
    shared = topics.update_shared("farm", "hub").split("/", 2)[2]
    assert f"topic read {shared}" in sections[pki.HUB_IDENTITY]
    assert f"topic write {topics.ack('farm', '+')}" in sections[pki.HUB_IDENTITY]
    assert "topic readwrite fedd/v1/farm/model/#" in sections[pki.HUB_IDENTITY]
    assert "topic deny fedd/v1/farm/+/fedd-hub/#" in sections[pki.HUB_IDENTITY]
    assert not any(line.startswith(("topic write", "topic readwrite"))
                   for line in sections[pki.MONITOR_IDENTITY])
    assert "topic deny fedd/v1/farm/+/fedd-monitor/#" in sections[pki.MONITOR_IDENTITY]
    rules = [line for line in acl if not line.startswith("user ")]
    assert all(" fedd/v1/farm/" in line for line in rules), "every rule is the fleet's"


def test_rendered_files_are_not_overwritten_without_force(tmp_path):
    conf, acl = mosquitto_conf.write_broker_files(settings(tmp_path), tmp_path / "out")
    assert conf.name == "fedd-broker.conf" and acl.name == "fedd-acl"
    with pytest.raises(pki.AlreadyExists):
        mosquitto_conf.write_broker_files(settings(tmp_path, port=1), tmp_path / "out")
    assert "listener 18883" in conf.read_text()
    mosquitto_conf.write_broker_files(settings(tmp_path, port=1), tmp_path / "out", force=True)
    assert "listener 1\n" in conf.read_text()


def test_templates_are_found_or_named(tmp_path):
    assert mosquitto_conf.find_templates() == REPO_ROOT / "config" / "mosquitto"
    with pytest.raises(mosquitto_conf.TemplateError, match=str(tmp_path)):
        mosquitto_conf.find_templates(tmp_path)


# ---------------------------------------------------------------- scripts/provision


def provision(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROVISION), *map(str, args)], text=True,
                          capture_output=True, timeout=60, check=False)


def test_provision_makes_a_fleet_and_refuses_to_redo_it(tmp_path):
    root = tmp_path / "pki"
    steps = [
        ("ca", "--fleet", "farm"),
        ("broker", "--host", "localhost", "127.0.0.1"),
        ("hub",),
        ("monitor",),
        ("device", "pi-001", "pi-002"),
        ("mosquitto", "--port", "8884", "--syslog"),
    ]
    for step in steps:
        done = provision("--pki", root, *step)
        assert done.returncode == 0, (step, done.stdout, done.stderr)
        assert "wrote" in done.stdout
    assert (root / "devices" / "pi-002" / "client.key").exists()
    conf = (root / "broker" / "fedd-broker.conf").read_text()
    assert "listener 8884" in conf and "log_dest syslog" in conf
    assert "fedd/v1/farm/update/%u" in (root / "broker" / "fedd-acl").read_text()

    again = provision("--pki", root, "device", "pi-002", "pi-003")
    assert again.returncode == 1
    assert "pi-002: refused" in again.stdout and "--force" in again.stdout
    assert (root / "devices" / "pi-003" / "client.crt").exists(), "the others are still made"

    for args, message in [
        (("device", "fedd-hub"), "reserved"),
        (("device", "a/b"), "device id"),
        (("ca",), "already exists"),
        (("mosquitto", "--fleet", "other"), "belongs to fleet 'farm'"),
        (("broker", "--host", "bad host", "--force"), "not an IP address"),
    ]:
        refused = provision("--pki", root, *args)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert message in refused.stderr
    missing = provision("--pki", tmp_path / "nowhere", "device", "pi-001")
    assert missing.returncode == 1 and "no fleet CA" in missing.stderr
    assert provision("--pki", root).returncode == 2
    assert provision("--pki", root, "broker").returncode == 2
