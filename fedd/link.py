"""The MQTT link: the only module that talks to paho.

A small async surface over paho-mqtt 2 (MQTT v5): `async with Link(...)`,
`await publish(...)` that returns once the broker acknowledged (QoS 1), and
`async for message in link.messages()` over a bounded queue. A thread of
ours runs paho's network loop and owns the reconnection policy (full-jitter
backoff, reset once a connection has held); paho's callbacks cross into
asyncio only with `loop.call_soon_threadsafe`. paho keeps unacknowledged messages in memory
only, so a publish while the link is down fails at once with `LinkDown`
and durability stays with the caller's outbox. `publish(..., alias=True)`
sends a QoS 1 topic as an MQTT v5 topic alias once the broker has taken it
on this connection (`TopicAliases` says how). Timeouts use
`asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11 the latter can
swallow a cancellation that races a completion, and a task that survives
its cancellation keeps a daemon from stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedd.config import BrokerConfig, UnusableFileError

log = logging.getLogger(__name__)

EARLY_REPORT_TTL_S = 30.0
NETWORK_TICK_S = 0.5  # how long one network-loop pass may block (bounds close latency)
CLOSE_TIMEOUT_S = 5.0


class LinkError(Exception):
    """Base of the link's errors."""


class TlsSetupError(LinkError, UnusableFileError):
    """The configured CA, certificate or key cannot be loaded: a configuration error."""


class LinkDown(LinkError):
    """Not connected, or the connection dropped before the acknowledgement."""


class PublishRejected(LinkError):
    """The broker refused a publish (e.g. not authorized by its ACL)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"broker refused publish to {topic}: {reason}")
        self.topic = topic
        self.reason = reason


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if we vanish without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


TOPIC_ALIAS_BYTES = 3  # the Topic Alias property: identifier 0x23 and a two-byte number


def publish_wire_bytes(topic: str, payload: bytes, qos: int, *,
                       topic_alias: int | None = None) -> int:
    """Size of the MQTT v5 PUBLISH packet that carries `payload`.

    `topic` as sent: "" when the alias alone stands for it. With
    `topic_alias` the property block holds the Topic Alias (3 bytes), else
    nothing: fixed header, remaining length, topic, packet id (QoS > 0),
    property length and properties, payload.
    """
    properties = TOPIC_ALIAS_BYTES if topic_alias is not None else 0
    variable = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + properties
    remaining = variable + len(payload)
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def _network_thread_writes(_client: mqtt.Client, _userdata: object, _sock: object) -> None:
    """Nothing to do: the network thread's loop() sees the queued packet and writes it."""


class TopicAliases:
    """The topic aliases of one connection, client → broker (MQTT v5, 3.3.2.3.4).

    The broker's CONNACK says how many it takes (Topic Alias Maximum;
    Mosquitto's `max_topic_alias`, default 10; absent or 0: none). A topic
    gets the next free number on its first aliased publish, which carries
    the full topic and the alias; the alias goes alone (an empty topic) only
    once the broker has acknowledged such a publish on this connection. The
    map belongs to the connection: a new one starts empty, and a QoS 1
    message that carried an alias on the old one must not be resent as it
    is (the broker would not know the alias, or would know it as another
    topic): `Link` drops those, and their publishers, told `LinkDown`, send
    again. Not thread-safe: `Link` holds its lock around every call.
    """

    def __init__(self, maximum: int = 0) -> None:
        self.maximum = maximum
        self._numbers: dict[str, int] = {}
        self._known: set[str] = set()  # acknowledged by the broker on this connection

    def plan(self, topic: str, *, assign: bool) -> tuple[str, int | None]:
        """(topic as sent, alias or None) for the next publish; `assign` takes a number."""
        number = self._numbers.get(topic)
        if number is None:
            if len(self._numbers) >= self.maximum:
                return topic, None
            number = len(self._numbers) + 1
            if assign:
                self._numbers[topic] = number
        return ("" if topic in self._known else topic), number

    def acknowledged(self, topic: str) -> None:
        if topic in self._numbers:
            self._known.add(topic)


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS: the CA that signed the broker, and our own certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str


class Backoff:
    """Exponential backoff with full jitter (AWS Architecture Blog, 2015).

    Each delay is drawn uniformly from [0, min(max_s, initial_s * 2^attempt)]:
    a fleet whose broker came back reconnects spread over the whole window
    instead of in synchronized waves. `reset()` after a connection has held
    for a while starts the next outage from short delays again.
    """

    def __init__(self, initial_s: float, max_s: float,
                 rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class LinkStats:
    """Counters an operator reads in the heartbeat."""

    connects: int = 0  # successful CONNACKs, the first one included
    failed_attempts: int = 0  # connection attempts refused or unreachable
    last_connected: float | None = None  # wall time of the latest CONNACK
    last_disconnected: float | None = None

    @property
    def reconnects(self) -> int:
        return max(self.connects - 1, 0)


class Link:
    """One MQTT v5 connection with its own network thread and reconnection policy.

    The thread connects (TCP or mutual TLS), runs paho's network loop until
    the connection drops, then waits a full-jitter backoff delay and tries
    again, until the link is closed. `session_expiry_s` > 0 asks the broker
    to keep our session (subscriptions and undelivered QoS 1 messages, e.g.
    the hub's acknowledgements) while we are away, so `client_id` must be
    stable across restarts.
    """

    def __init__(self, *, host: str, port: int, client_id: str, keepalive_s: int = 30,
                 subscriptions: Iterable[tuple[str, int]] = (), will: Will | None = None,
                 queue_size: int = 1000, tls: TlsFiles | None = None,
                 session_expiry_s: int = 0, backoff: Backoff | None = None,
                 stable_s: float = 60.0) -> None:
        self._host, self._port, self._keepalive = host, port, keepalive_s
        self._subscriptions = list(subscriptions)
        self._session_expiry_s = session_expiry_s
        self._backoff = backoff or Backoff(1.0, 60.0)
        self._stable_s = stable_s
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        if tls is not None:
            try:
                self._client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file,
                                     keyfile=tls.key_file, cert_reqs=ssl.CERT_REQUIRED,
                                     tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise TlsSetupError(f"broker.tls: cannot load the TLS files ({tls.ca_file}, "
                                    f"{tls.cert_file}, {tls.key_file}): {exc}") from None
        if will:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # Only the network thread may touch the socket: without an external-loop write
        # callback, paho writes from the publishing thread too (`_packet_queue` calls
        # loop_write when no loop_start thread exists), and two threads in one TLS
        # connection corrupt OpenSSL's state (seen: malloc aborts, lost packets). With
        # one, publish() only queues the packet and wakes the network thread's select.
        self._client.on_socket_register_write = _network_thread_writes
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self._lock = threading.RLock()
        self._pending: dict[int, asyncio.Future[None] | None] = {}  # None: QoS 0
        self._early: dict[int, tuple[ReasonCode, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected_at: float | None = None  # monotonic time of the latest CONNACK
        self._generation = 0  # CONNACKs so far, on the network thread (guarded by _lock)
        self._aliases = TopicAliases()  # this connection's (guarded by _lock)
        self._aliased: dict[int, tuple[str, int]] = {}  # mid → (topic, generation), QoS 1
        self._aliasing = 0  # aliased publishes between their plan and their registration
        self.connected = asyncio.Event()
        self.connections = 0  # bumps on every (re)connect, to re-announce retained state
        self.dropped_messages = 0
        self.stats = LinkStats()

    @classmethod
    def from_config(cls, broker: BrokerConfig, default_client_id: str, *,
                    subscriptions: Iterable[tuple[str, int]] = (),
                    will: Will | None = None) -> Link:
        """A link as the `broker` section says: TLS or (explicitly) plain TCP, session, backoff."""
        tls = None if broker.transport == "tcp" else TlsFiles(
            broker.tls.ca_file, broker.tls.cert_file, broker.tls.key_file)
        return cls(host=broker.host, port=broker.port,
                   client_id=broker.client_id or default_client_id,
                   keepalive_s=broker.keepalive_s, subscriptions=subscriptions, will=will,
                   tls=tls, session_expiry_s=broker.session_expiry_s,
                   backoff=Backoff(broker.reconnect.initial_s, broker.reconnect.max_s),
                   stable_s=broker.reconnect.stable_s)

    async def __aenter__(self) -> Link:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._network, name="mqtt", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing.set()
        self._client.disconnect()  # the network thread sends it and leaves its loop
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, CLOSE_TIMEOUT_S)
        self._fail_pending(LinkDown("link closed"))

    # the network thread

    def _network(self) -> None:
        """Connect, run the network loop, back off, again; until the link closes."""
        properties = None
        if self._session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry_s
        while not self._closing.is_set():
            try:
                self._client.connect(self._host, self._port, keepalive=self._keepalive,
                                     clean_start=not self._session_expiry_s,
                                     properties=properties)
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake
                self.stats.failed_attempts += 1
                log.info("cannot reach %s:%d: %s", self._host, self._port, exc)
            else:
                while not self._closing.is_set():
                    if self._client.loop(timeout=NETWORK_TICK_S) != mqtt.MQTT_ERR_SUCCESS:
                        break
                if self._closing.is_set():
                    self._client.disconnect()  # again: close may have come mid-connect
                    self._client.loop(timeout=NETWORK_TICK_S)
                    return
                held = self._connected_at
                if held is not None and time.monotonic() - held >= self._stable_s:
                    self._backoff.reset()
                self._connected_at = None
            delay = self._backoff.next_delay()
            log.debug("reconnecting to %s:%d in %.1f s", self._host, self._port, delay)
            self._closing.wait(delay)

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    def wire_bytes(self, topic: str, payload: bytes, *, qos: int = 1,
                   alias: bool = False) -> int:
        """The bytes of the PUBLISH that `publish` would send now (topic or alias)."""
        sent, number = topic, None
        if alias and qos:
            with self._lock:
                sent, number = self._aliases.plan(topic, assign=False)
        return publish_wire_bytes(sent, payload, qos, topic_alias=number)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      timeout: float = 30.0, alias: bool = False) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK.

        `alias` (QoS 1 only): use a topic alias when the broker takes them,
        so that once it has acknowledged one publish on this connection the
        topic is not sent again (`TopicAliases`; `wire_bytes` tells the
        size). paho may report a message published before `publish()` has
        even returned its id, so each report is matched to its publish
        either way round (`_pending` or `_early`). Our lock is never held
        while calling into paho: its network thread holds paho's own lock
        when it calls us.
        """
        if not self.connected.is_set():
            raise LinkDown("not connected")
        sent, number, properties = topic, None, None
        if alias and qos:
            with self._lock:
                sent, number = self._aliases.plan(topic, assign=True)
                generation = self._generation
                if number is not None:
                    self._aliasing += 1
            if number is not None:
                properties = Properties(PacketTypes.PUBLISH)
                properties.TopicAlias = number
        future = asyncio.get_running_loop().create_future() if qos else None
        try:
            info = self._client.publish(sent, payload, qos=qos, retain=retain,
                                        properties=properties)
        except BaseException:
            if number is not None:
                with self._lock:
                    self._aliasing -= 1
            raise
        with self._lock:
            if number is not None:  # paho may resend it: see _drop_aliased
                self._aliasing -= 1
                self._aliased[info.mid] = (topic, generation)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise LinkDown(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = future
            elif number is not None:
                self._aliased.pop(info.mid, None)
                if not early[0].is_failure and generation == self._generation:
                    self._aliases.acknowledged(topic)
        if future is None:
            return  # QoS 0: its report only needs consuming, done either way round
        try:
            if early is not None:
                self._check_ack(topic, early[0])
                return
            async with asyncio.timeout(timeout):
                await future
        except PublishRejected as exc:
            raise PublishRejected(topic, exc.reason) from None
        except TimeoutError:
            raise LinkDown(f"no acknowledgement for {topic} within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._pending.pop(info.mid, None)

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            yield await self._queue.get()

    async def next_message(self, timeout: float) -> Message | None:
        """The next incoming message, or None after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    # paho's network thread calls these; they only hand over to the event loop.

    @staticmethod
    def _check_ack(topic: str, reason: ReasonCode) -> None:
        if reason.is_failure:
            raise PublishRejected(topic, str(reason))

    def _on_connect(self, client: mqtt.Client, _userdata: object, _flags: object,
                    reason: ReasonCode, props: Properties | None) -> None:
        if reason.is_failure:
            self.stats.failed_attempts += 1
            log.warning("broker %s:%d refused the connection: %s", self._host, self._port, reason)
            return
        maximum = int(getattr(props, "TopicAliasMaximum", 0) or 0)
        with self._lock:
            self._generation += 1
            self._aliases = TopicAliases(maximum)
            stale, self._aliased = self._aliased, {}
            racing = self._aliasing
        if stale or racing:
            self._drop_aliased(client)
        if self._subscriptions:
            client.subscribe(self._subscriptions)
        self._connected_at = time.monotonic()
        self.stats.connects += 1
        self.stats.last_connected = time.time()
        log.info("connected to %s:%d (session %s)", self._host, self._port,
                 "resumed" if getattr(_flags, "session_present", False) else "new")
        self._call(self._set_connected)

    @staticmethod
    def _drop_aliased(client: mqtt.Client) -> None:
        """Keep paho from resending, on this new connection, what carried an old alias.

        paho resends unacknowledged QoS 1 messages after the CONNACK, as they
        were built: an alias alone that this connection never set is a
        protocol error (Mosquitto closes the connection, and the resend
        would come again on every reconnect), and an alias set here for
        another topic would deliver the message on that topic. Their
        publishers were told LinkDown and send again. paho has no way to
        take out single messages (`drop_out_messages` takes all), so the
        others are queued again as they were. (A publish whose alias was
        planned on the old connection but that paho sends on this one, a
        window of microseconds, is refused by the broker, which closes the
        connection; it is dropped here on the next one.)
        """
        out = client.drop_out_messages()
        kept = [m for m in out if getattr(m.properties, "TopicAlias", None) is None]
        log.info("dropped %d unacknowledged aliased publish(es) of the last connection",
                 len(out) - len(kept))
        for message in kept:
            client.publish(message.topic, message.payload, qos=message.qos,
                           retain=message.retain, properties=message.properties)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object,
                       reason: ReasonCode, _props: object) -> None:
        log.info("disconnected from %s:%d: %s", self._host, self._port, reason)
        self.stats.last_disconnected = time.time()
        self._call(self.connected.clear)
        self._call(self._fail_pending, LinkDown(f"disconnected: {reason}"))

    def _on_publish(self, _client: mqtt.Client, _userdata: object, mid: int,
                    reason: ReasonCode, _props: object) -> None:
        now = time.monotonic()
        with self._lock:
            aliased = self._aliased.pop(mid, None)
            if aliased is not None and not reason.is_failure \
                    and aliased[1] == self._generation:
                self._aliases.acknowledged(aliased[0])
            if mid not in self._pending:
                # Either publish() has not registered `mid` yet, or this is a
                # resend from before a disconnect whose caller already gave up;
                # the latter must not linger until message ids wrap around.
                self._early = {m: e for m, e in self._early.items()
                               if now - e[1] < EARLY_REPORT_TTL_S}
                self._early[mid] = (reason, now)
                return
            future = self._pending.pop(mid)
        if future is not None:
            self._call(self._resolve, future, reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        self._call(self._enqueue, Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # event-loop side

    def _call(self, fn: object, *args: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop shutting down
                self._loop.call_soon_threadsafe(fn, *args)

    def _set_connected(self) -> None:
        self.connections += 1
        self.connected.set()

    @staticmethod
    def _resolve(future: asyncio.Future[None], reason: ReasonCode) -> None:
        if future.done():
            return
        if reason.is_failure:
            future.set_exception(PublishRejected("", str(reason)))
        else:
            future.set_result(None)

    def _fail_pending(self, error: LinkError) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if future is not None and not future.done():
                future.set_exception(error)

    def _enqueue(self, message: Message) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped_messages += 1
            log.warning("incoming queue full (%d): dropped a message on %s",
                        self._queue.maxsize, message.topic)
