"""Mutual TLS and the fleet ACL on a real Mosquitto (fault tests of issue 5).

A private broker per test in the fleet's TLS mode (fedd.fleet.broker with
the shipped templates), certificates from fedd.pki, and plain paho-mqtt 2
clients (MQTT v5) standing in for devices, hub workers and a monitor: these
tests are about what the broker lets each identity do, not about fedd.link.

"Nothing arrived" is never a sleep: the forbidden messages go first, then an
allowed marker on the same connection; MQTT keeps one client's messages in
order, so once the marker is in, anything forbidden that got through would
be in too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from fedd import pki, topics
from fedd.fleet.broker import Mosquitto, MutualTLS
from fedd.link import Link, PublishRejected, TlsFiles

pytestmark = pytest.mark.integration

FLEET = "secure"
WAIT_S = 5.0  # bounds every wait; a healthy broker answers in milliseconds
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code, in the PUBACK of a refused QoS 1 publish


def accepted(code: ReasonCode) -> bool:
    """A PUBACK that took the message (0x10 "no matching subscribers" is a success too)."""
    return not code.is_failure


def attest(device: str) -> str:
    return topics.attest(FLEET, device)


def nonce(device: str) -> str:
    return topics.attest_nonce(FLEET, device)


def ack(device: str) -> str:
    return topics.ack(FLEET, device)


# ---------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Fleet:
    pki: Path
    ca_file: Path
    rogue: Path  # a bundle for "dev-a" signed by another CA

    def bundle(self, identity: str) -> Path:
        return pki.client_folder(self.pki, identity)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("pki")
    ca, _ = pki.init_ca(root / "fleet", FLEET)
    pki.issue_broker(ca, root / "fleet", ["localhost", "127.0.0.1"])
    for identity in ("dev-a", "dev-b", pki.HUB_IDENTITY, pki.MONITOR_IDENTITY):
        pki.issue_client(ca, root / "fleet", identity)
    rogue, _ = pki.init_ca(root / "rogue", FLEET)
    issued = pki.issue_client(rogue, root / "rogue", "dev-a")
    return Fleet(root / "fleet", root / "fleet" / pki.CA_CERT, issued.folder)


@pytest.fixture
def broker(tmp_path: Path, fleet: Fleet) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", tls=MutualTLS(fleet.pki, FLEET)) as mosquitto:
        yield mosquitto


# ---------------------------------------------------------------- a small MQTT v5 client


class Client:
    """One paho client over TLS; callbacks record under a lock, every wait has a deadline."""

    def __init__(self, broker: Mosquitto, ca_file: Path, bundle: Path | None, client_id: str,
                 *, cert: str = pki.CLIENT_CERT, key: str = pki.CLIENT_KEY) -> None:
        self.broker = broker
        self.client_id = client_id
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv5)
        self.paho.tls_set(ca_certs=str(ca_file),
                          certfile=str(bundle / cert) if bundle else None,
                          keyfile=str(bundle / key) if bundle else None)
        self._changed = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnected: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = self._on_message
        self._looping = False

    # paho's network thread calls these
    def _record(self, update: Callable[[], None]) -> None:
        with self._changed:
            update()
            self._changed.notify_all()

    def _on_connect(self, _c, _u, _flags, reason_code, _props) -> None:
        self._record(lambda: setattr(self, "connack", reason_code))

    def _on_disconnect(self, _c, _u, _flags, reason_code, _props) -> None:
        self._record(lambda: setattr(self, "disconnected", reason_code))

    def _on_publish(self, _c, _u, mid, reason_code, _props) -> None:
        self._record(lambda: self.pubacks.__setitem__(mid, reason_code))

    def _on_subscribe(self, _c, _u, mid, reason_codes, _props) -> None:
        self._record(lambda: self.subacks.__setitem__(mid, list(reason_codes)))

    def _on_message(self, _c, _u, message) -> None:
        self._record(lambda: self.messages.append(message))

    def wait(self, condition: Callable[[], object], what: str) -> object:
        with self._changed:
            if not self._changed.wait_for(condition, timeout=WAIT_S):
                pytest.fail(f"{self.client_id!r}: no {what} within {WAIT_S} s")
            return condition()

    # the test's side
    def set_will(self, topic: str, payload: bytes) -> Client:
        self.paho.will_set(topic, payload, qos=1, retain=True)
        return self

    def connect(self) -> Client:
        """Connect and wait for a successful CONNACK."""
        self.paho.connect(self.broker.host, self.broker.port, keepalive=10)
        self.paho.loop_start()
        self._looping = True
        self.wait(lambda: self.connack or self.disconnected, "CONNACK")
        assert self.connack is not None and not self.connack.is_failure, \
            f"refused: {self.connack or self.disconnected}"
        return self

    def subscribe(self, *topic_filters: str) -> list[ReasonCode]:
        result, mid = self.paho.subscribe([(t, 1) for t in topic_filters])
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS
        return self.wait(lambda: self.subacks.get(mid), "SUBACK")  # type: ignore[return-value]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """QoS 1: the reason code of the broker's PUBACK."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        return self.wait(lambda: self.pubacks.get(info.mid), f"PUBACK for {topic}")  # type: ignore[return-value]

    def received(self, topic: str, payload: bytes) -> mqtt.MQTTMessage:
        """Wait for one message with this topic and payload."""
        def find() -> mqtt.MQTTMessage | None:
            return next((m for m in self.messages
                         if m.topic == topic and m.payload == payload), None)
        return self.wait(find, f"message {payload!r} on {topic}")  # type: ignore[return-value]

    def seen(self) -> list[tuple[str, bytes]]:
        with self._changed:
            return [(m.topic, m.payload) for m in self.messages]

    def drop(self) -> None:
        """Vanish without DISCONNECT (a power cut): the broker publishes the will."""
        self.paho.loop_stop()
        self._looping = False
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if self._looping:
            self.paho.disconnect()
            self.paho.loop_stop()
            self._looping = False


@pytest.fixture
def clients(broker: Mosquitto, fleet: Fleet) -> Iterator[Callable[..., Client]]:
    """`clients(identity, client_id=…)` → a connected Client; all closed after the test."""
    made: list[Client] = []

    def make(identity: str, client_id: str | None = None, *, will: tuple[str, bytes] | None = None,
             connect: bool = True) -> Client:
        client = Client(broker, fleet.ca_file, fleet.bundle(identity), client_id or identity)
        made.append(client)
        if will:
            client.set_will(*will)
        return client.connect() if connect else client

    try:
        yield make
    finally:
        for client in made:
            client.close()


def hub_worker(clients: Callable[..., Client], client_id: str = "hub-1") -> Client:
    """A hub worker's subscriptions: the shared update stream and the devices' reports."""
    hub = clients(pki.HUB_IDENTITY, client_id)
    granted = hub.subscribe(topics.update_shared(FLEET, "hub"), topics.heartbeats(FLEET),
                            topics.statuses(FLEET), attest("+"))
    assert [code.value for code in granted] == [1, 1, 1, 1]
    return hub


def log_count(broker: Mosquitto, text: str) -> int:
    try:
        return broker.log_path.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def wait_log(broker: Mosquitto, text: str, count: int = 1) -> None:
    """Wait until the broker has logged `text` `count` times."""
    deadline = time.monotonic() + WAIT_S
    while log_count(broker, text) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the broker log within {WAIT_S} s:\n"
                        f"{broker.log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)


# ---------------------------------------------------------------- what a device may do


def test_a_device_uses_its_own_topics(clients, broker):
    hub = hub_worker(clients)
    device = clients("dev-a", "fedd-dev-a")
    granted = device.subscribe(topics.model_current(FLEET), ack("dev-a"), nonce("dev-a"))
    assert [code.value for code in granted] == [1, 1, 1]
    wait_log(broker, "as fedd-dev-a (p5, c1, k10, u'dev-a')")  # the username is the CN

    sent = [(topics.update(FLEET, "dev-a"), b"update"),
            (topics.heartbeat(FLEET, "dev-a"), b"heartbeat"),
            (topics.status(FLEET, "dev-a"), b"online"),
            (attest("dev-a"), b"quote")]
    for topic, payload in sent:
        assert accepted(device.publish(topic, payload, retain=payload == b"online")), topic
    for topic, payload in sent:
        hub.received(topic, payload)

    for topic, payload in [(topics.model_current(FLEET), b"model v1"),
                           (ack("dev-a"), b"ack 1"), (nonce("dev-a"), b"nonce 1")]:
        assert accepted(hub.publish(topic, payload, retain="model" in topic)), topic
        device.received(topic, payload)


def test_a_client_without_a_certificate_is_refused(broker, fleet):
    outcome = handshake(broker, fleet.ca_file, None)
    assert not outcome.connected, outcome
    wait_log(broker, "peer did not return a certificate")


def test_a_certificate_from_another_ca_is_refused(broker, fleet):
    outcome = handshake(broker, fleet.ca_file, fleet.rogue)  # CN dev-a, the wrong issuer
    assert not outcome.connected, outcome
    wait_log(broker, "certificate verify failed")
    # Mutual: a device that trusts another CA refuses this fleet's broker itself.
    outcome = handshake(broker, fleet.rogue / pki.CA_CERT, fleet.bundle("dev-a"))
    assert not outcome.connected and "CERTIFICATE_VERIFY_FAILED" in outcome.detail, outcome


def test_an_expired_certificate_or_a_server_one_is_refused(broker, fleet, tmp_path):
    ca = pki.load_ca(fleet.pki)
    key, cert = pki.client_certificate(
        ca, "dev-a", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    expired = tmp_path / "expired"
    pki.write_private_key(expired / pki.CLIENT_KEY, key)
    pki.write_certificate(expired / pki.CLIENT_CERT, cert)
    assert not handshake(broker, fleet.ca_file, expired).connected
    wait_log(broker, "certificate verify failed")
    # The broker's own certificate is the fleet CA's too, but only for servers.
    server = handshake(broker, fleet.ca_file, fleet.pki / "broker", cert=pki.BROKER_CERT,
                       key=pki.BROKER_KEY)
    assert not server.connected, server
    wait_log(broker, "certificate verify failed", count=2)
    # …while the device's own certificate still gets in.
    assert handshake(broker, fleet.ca_file, fleet.bundle("dev-a")).connected


def test_a_device_cannot_write_another_devices_topics(clients):
    hub = hub_worker(clients)
    device = clients("dev-a", "fedd-dev-a")
    forbidden = [topics.update(FLEET, "dev-b"), topics.heartbeat(FLEET, "dev-b"),
                 topics.status(FLEET, "dev-b"), attest("dev-b"), nonce("dev-a"),
                 ack("dev-a"), topics.model_current(FLEET)]
    for topic in forbidden:
        refused = device.publish(topic, b"forged")
        assert refused.value == NOT_AUTHORIZED and str(refused) == "Not authorized", topic
    # The marker goes after the forgeries on the same connection.
    assert accepted(device.publish(topics.update(FLEET, "dev-a"), b"marker"))
    hub.received(topics.update(FLEET, "dev-a"), b"marker")
    assert hub.seen() == [(topics.update(FLEET, "dev-a"), b"marker")]
    assert device.paho.is_connected(), "a refused publish does not cost the connection"


def test_a_device_cannot_read_another_devices_topics(clients):
    hub = hub_worker(clients)
    device = clients("dev-a", "fedd-dev-a")
    other = clients("dev-b", "fedd-dev-b")
    other.subscribe(ack("dev-b"))
    # Mosquitto 2.0 grants any subscription and filters each delivery by the ACL.
    device.subscribe(ack("dev-b"), nonce("dev-b"), f"fedd/v1/{FLEET}/#", "#")
    for topic, payload in [(ack("dev-b"), b"ack for b"), (nonce("dev-b"), b"nonce for b"),
                           (ack("dev-a"), b"marker")]:
        assert accepted(hub.publish(topic, payload))
    other.received(ack("dev-b"), b"ack for b")
    device.received(ack("dev-a"), b"marker")
    assert {topic for topic, _ in device.seen()} == {ack("dev-a")}


def test_a_last_will_in_another_devices_name_is_dropped(clients, broker):
    hub = hub_worker(clients)
    forger = clients("dev-a", "forger", will=(topics.status(FLEET, "dev-b"), b"offline"))
    honest = clients("dev-a", "honest", will=(topics.status(FLEET, "dev-a"), b"offline"))
    forger.drop()
    wait_log(broker, "Client forger closed its connection")
    honest.drop()
    hub.received(topics.status(FLEET, "dev-a"), b"offline")
    assert hub.seen() == [(topics.status(FLEET, "dev-a"), b"offline")]


# ---------------------------------------------------------------- the hub and the monitor


def test_hub_workers_share_updates_and_write_acks_and_the_model(clients):
    hubs = [hub_worker(clients, "hub-1"), hub_worker(clients, "hub-2")]
    devices = {name: clients(name, f"fedd-{name}") for name in ("dev-a", "dev-b")}
    for name, device in devices.items():
        device.subscribe(ack(name))
        for n in range(3):
            assert accepted(device.publish(topics.update(FLEET, name), f"{name} {n}".encode()))
    expected = {(topics.update(FLEET, name), f"{name} {n}".encode())
                for name in devices for n in range(3)}

    def arrived() -> list[tuple[str, bytes]]:
        return [m for hub in hubs for m in hub.seen() if "/update/" in m[0]]

    deadline = time.monotonic() + WAIT_S
    while len(arrived()) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(arrived()) == sorted(expected), "each update reaches exactly one worker"

    hub = hubs[0]
    for name, device in devices.items():
        assert accepted(hub.publish(ack(name), f"ack {name}".encode()))
        device.received(ack(name), f"ack {name}".encode())
    assert accepted(hub.publish(topics.model_current(FLEET), b"model v2", retain=True))
    assert hub.publish(topics.update(FLEET, "dev-a"), b"hub as device").value == NOT_AUTHORIZED

    late = clients("dev-b", "fedd-dev-b-late")
    late.subscribe(topics.model_current(FLEET))
    assert late.received(topics.model_current(FLEET), b"model v2").retain


def test_the_monitor_reads_health_and_writes_nothing(clients):
    monitor = clients(pki.MONITOR_IDENTITY, "monitor")
    monitor.subscribe(topics.heartbeats(FLEET), topics.statuses(FLEET),
                      topics.update(FLEET, "+"))
    device = clients("dev-a", "fedd-dev-a")
    for topic in (topics.heartbeat(FLEET, "dev-a"), topics.update(FLEET, "fedd-monitor"),
                  topics.status(FLEET, "fedd-monitor"), topics.model_current(FLEET),
                  ack("dev-a")):
        assert monitor.publish(topic, b"from the monitor").value == NOT_AUTHORIZED, topic
    assert accepted(device.publish(topics.update(FLEET, "dev-a"), b"private"))
    assert accepted(device.publish(topics.heartbeat(FLEET, "dev-a"), b"beat"))
    monitor.received(topics.heartbeat(FLEET, "dev-a"), b"beat")
    assert monitor.seen() == [(topics.heartbeat(FLEET, "dev-a"), b"beat")]


# ---------------------------------------------------------------- fedd's own link


def tls_files(bundle: Path) -> TlsFiles:
    return TlsFiles(str(bundle / pki.CA_CERT), str(bundle / pki.CLIENT_CERT),
                    str(bundle / pki.CLIENT_KEY))


def test_fedd_links_speak_mutual_tls_with_the_fleet_broker(broker, fleet):
    """The provisioned bundles work as fedd.link uses them (the paths of broker.tls)."""

    async def main() -> None:
        hub_link = Link(host=broker.host, port=broker.port, client_id="fedd-hub-test",
                        tls=tls_files(fleet.bundle(pki.HUB_IDENTITY)),
                        subscriptions=[(topics.update_shared(FLEET, "hub"), 1)])
        device_link = Link(host=broker.host, port=broker.port, client_id="fedd-dev-a",
                           tls=tls_files(fleet.bundle("dev-a")))
        async with hub_link as hub, device_link as device:
            await hub.wait_connected(WAIT_S)
            await device.wait_connected(WAIT_S)
            with pytest.raises(PublishRejected, match="Not authorized"):
                await device.publish(topics.update(FLEET, "dev-b"), b"forged", timeout=WAIT_S)
            # Link does not report its SUBACK: resend until the hub's subscription is in.
            deadline = time.monotonic() + WAIT_S
            message = None
            while message is None:
                assert time.monotonic() < deadline, "the hub never got the device's update"
                await device.publish(topics.update(FLEET, "dev-a"), b"mine", timeout=WAIT_S)
                message = await hub.next_message(timeout=0.2)
            assert (message.topic, message.payload) == (topics.update(FLEET, "dev-a"), b"mine")

    asyncio.run(main())


def test_a_tls_link_under_two_way_load_keeps_every_message(broker, fleet):
    """Publishing (event loop thread) while receiving (network thread) on one TLS link.

    Only the network thread may touch the socket: when publish() wrote too,
    two threads inside one OpenSSL connection lost packets and aborted the
    agent (malloc: "unsorted double linked list corrupted") in the demo.
    """
    count = 400
    echo_topic, feed_topic = topics.ack(FLEET, "dev-a"), topics.update(FLEET, "dev-a")

    async def main() -> None:
        hub_link = Link(host=broker.host, port=broker.port, client_id="fedd-hub-load",
                        tls=tls_files(fleet.bundle(pki.HUB_IDENTITY)),
                        subscriptions=[(topics.update_shared(FLEET, "hub"), 1)])
        device_link = Link(host=broker.host, port=broker.port, client_id="fedd-dev-a-load",
                           tls=tls_files(fleet.bundle("dev-a")),
                           subscriptions=[(echo_topic, 1)])
        async with hub_link as hub, device_link as device:
            await hub.wait_connected(WAIT_S)
            await device.wait_connected(WAIT_S)
            await asyncio.sleep(0.3)  # both SUBSCRIBEs reach the broker

            async def echo() -> int:
                echoed = 0
                while echoed < count:
                    message = await hub.next_message(timeout=WAIT_S)
                    assert message is not None, f"the hub heard {echoed} of {count}"
                    await hub.publish(echo_topic, message.payload, timeout=WAIT_S)
                    echoed += 1
                return echoed

            async def feed() -> None:
                for i in range(count):
                    await device.publish(feed_topic, i.to_bytes(4, "big") * 256, timeout=WAIT_S)

            echoer = asyncio.create_task(echo())
            await feed()
            heard = set()
            while len(heard) < count:
                message = await device.next_message(timeout=WAIT_S)
                assert message is not None, f"the device heard {len(heard)} of {count} echoes"
                heard.add(int.from_bytes(message.payload[:4], "big"))
            assert await echoer == count and heard == set(range(count))

    asyncio.run(main())


# ---------------------------------------------------------------- handshakes that fail


@dataclass(frozen=True)
class Outcome:
    connected: bool
    detail: str


def handshake(broker: Mosquitto, ca_file: Path, bundle: Path | None, *,
              cert: str = pki.CLIENT_CERT, key: str = pki.CLIENT_KEY) -> Outcome:
    """Try one connection, driving paho's loop by hand (no background reconnects).

    With TLS 1.3 the client finishes its handshake before the broker has
    checked the client certificate, so a refusal shows up either as an SSL
    error from connect() or as the connection closing before any CONNACK.
    """
    client = Client(broker, ca_file, bundle, f"probe-{bundle.name if bundle else 'none'}",
                    cert=cert, key=key)
    try:
        client.paho.connect(broker.host, broker.port, keepalive=10)
    except (ssl.SSLError, OSError) as error:
        return Outcome(False, f"{type(error).__name__}: {error}")
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            rc = client.paho.loop(timeout=0.05)
            if client.connack is not None:
                return Outcome(not client.connack.is_failure, f"CONNACK {client.connack}")
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.disconnected is not None:
                return Outcome(False, f"closed before CONNACK: {rc!r}, {client.disconnected}")
        pytest.fail(f"no answer to the handshake within {WAIT_S} s")
    finally:
        sock = client.paho.socket()
        if sock is not None:
            sock.close()
