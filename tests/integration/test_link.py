"""fedd.link against a real Mosquitto: the acknowledgement contract of publish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import psutil
import pytest

from fedd.fleet.broker import Mosquitto
from fedd.link import Backoff, Link, LinkDown, publish_wire_bytes

pytestmark = pytest.mark.integration

MQTT_MID_SPACE = 65535  # packet identifiers 1..65535, then paho wraps to 1


@contextmanager
def frozen(broker: Mosquitto) -> Iterator[None]:
    """SIGSTOP the broker: connections stay open but nothing is acknowledged."""
    conf = str(broker.folder / "mosquitto.conf")
    (process,) = [p for p in psutil.process_iter(["cmdline"])
                  if p.info["cmdline"] and conf in p.info["cmdline"]]
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def test_publish_waits_for_the_brokers_acknowledgement(broker):
    async def main() -> None:
        async with Link(host=broker.host, port=broker.port, client_id="ack-probe") as link:
            await link.wait_connected(10)
            await link.publish("fedd/test/ack", b"acknowledged", qos=1, timeout=10)
            with frozen(broker), pytest.raises(LinkDown):
                await link.publish("fedd/test/ack", b"never acknowledged", qos=1, timeout=1.0)

    asyncio.run(main())


def test_qos1_is_not_acknowledged_by_a_stale_qos0_entry_after_ids_wrap(broker):
    async def main() -> None:
        async with Link(host=broker.host, port=broker.port, client_id="wrap-probe") as link:
            await link.wait_connected(10)
            # Heartbeats are QoS 0: a long-lived agent sends this many in time.
            for _ in range(MQTT_MID_SPACE):
                await link.publish("fedd/test/heartbeat", b"beat", qos=0)
            await link.publish("fedd/test/ack", b"flush", qos=1, timeout=10)
            with frozen(broker), pytest.raises(LinkDown):
                for _ in range(3):  # the ids right after the wrap
                    await link.publish("fedd/test/ack", b"update", qos=1, timeout=1.0)

    asyncio.run(main())


# Two tasks publishing QoS 1 on one Link, as the agent's publisher (updates) and
# reporter (the retained "online" after a reconnect) do. Run in a child process:
# a deadlock there cannot hang the test run, and a thread in the child reports a
# stall (no publish completing for seconds on a local broker) instead of waiting.
CONCURRENT_PUBLISHERS = textwrap.dedent("""
    import asyncio, os, sys, threading, time
    from fedd.link import Link

    PORT, TASKS, EACH = int(sys.argv[1]), 3, 3000
    done = [0] * TASKS

    def watchdog():
        last, since = -1, time.monotonic()
        while True:
            time.sleep(0.25)
            total = sum(done)
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since > 3:
                print(f"stalled after {total} acknowledged publishes", flush=True)
                os._exit(3)

    async def main():
        async with Link(host="127.0.0.1", port=PORT, client_id="concurrent") as link:
            await link.wait_connected(10)

            async def publisher(i):
                for _ in range(EACH):
                    await link.publish(f"fedd/test/concurrent/{i}", b"x" * 100, qos=1,
                                       timeout=10)
                    done[i] += 1

            await asyncio.gather(*(publisher(i) for i in range(TASKS)))
        print("published", sum(done), flush=True)

    threading.Thread(target=watchdog, daemon=True).start()
    asyncio.run(main())
""")


def test_concurrent_qos1_publishes_do_not_deadlock(broker):
    try:
        result = subprocess.run([sys.executable, "-c", CONCURRENT_PUBLISHERS, str(broker.port)],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"}, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the concurrent publishers neither finished nor reported a stall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "published 9000" in result.stdout


def test_a_persistent_session_keeps_what_arrived_while_we_were_away(broker):
    """The hub's acknowledgements reach an agent that was offline when they were sent."""
    topic = "fedd/v1/test/ack/away"

    async def main() -> None:
        def listener() -> Link:
            return Link(host=broker.host, port=broker.port, client_id="fedd-away",
                        subscriptions=[(topic, 1)], session_expiry_s=600)

        async with listener() as link:
            await link.wait_connected(10)
            await link.publish("fedd/test/flush", b"", qos=1, timeout=10)  # SUBACK is in
        async with Link(host=broker.host, port=broker.port, client_id="fedd-hub-probe") as hub:
            await hub.wait_connected(10)
            await hub.publish(topic, b"ack of update 7", qos=1, timeout=10)
        async with listener() as link:
            await link.wait_connected(10)
            message = await link.next_message(timeout=10)
            assert message is not None and message.payload == b"ack of update 7"

    asyncio.run(main())


def test_reconnects_back_off_and_count(broker):
    """Broker gone: attempts fail and are counted; back: one reconnect, backoff reset."""

    async def main() -> None:
        link = Link(host=broker.host, port=broker.port, client_id="fedd-backoff",
                    backoff=Backoff(0.05, 0.2), stable_s=0.0)
        async with link:
            await link.wait_connected(10)
            broker.stop()
            async with asyncio.timeout(10):
                while link.connected.is_set() or link.stats.failed_attempts < 3:
                    await asyncio.sleep(0.05)
            broker.start()
            await link.wait_connected(10)
            assert link.stats.connects == 2 and link.stats.reconnects == 1
            assert link.stats.last_disconnected is not None
            assert link.stats.last_connected >= link.stats.last_disconnected

    asyncio.run(main())


# ---------------------------------------------------------------- topic aliases


class CountingProxy:
    """A TCP relay between one client and the broker that counts the client's bytes.

    `sent` is every byte the client wrote (what its uplink carries); `cut()`
    closes the current connections, as a dropped link would.
    """

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.sent = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._server.close()
        self.cut()


@contextmanager
def counting_proxy(broker: Mosquitto) -> Iterator[CountingProxy]:
    proxy = CountingProxy(broker.port)
    try:
        yield proxy
    finally:
        proxy.close()


UPDATE_TOPIC = "fedd/v1/demo/update/person-01"


async def received(listener: Link, count: int) -> list[tuple[str, bytes]]:
    got = []
    for _ in range(count):
        message = await listener.next_message(timeout=10)
        assert message is not None, f"only {got} arrived"
        got.append((message.topic, message.payload))
    return got


async def publish_counted(link: Link, proxy: CountingProxy, payload: bytes) -> tuple[int, int]:
    """(bytes `wire_bytes` predicted, bytes that crossed) for one aliased QoS 1 publish."""
    predicted = link.wire_bytes(UPDATE_TOPIC, payload, qos=1, alias=True)
    before = proxy.sent
    await link.publish(UPDATE_TOPIC, payload, qos=1, timeout=10, alias=True)
    return predicted, proxy.sent - before


@contextlib.asynccontextmanager
async def hub_and_device(broker: Mosquitto, proxy: CountingProxy
                         ) -> AsyncIterator[tuple[Link, Link]]:
    """A listener on the update topics (subscribed for sure) and a device through `proxy`."""
    async with Link(host=broker.host, port=broker.port, client_id="hub-probe",
                    subscriptions=[("fedd/v1/demo/update/+", 1)]) as listener, \
            Link(host=broker.host, port=proxy.port, client_id="fedd-person-01",
                 backoff=Backoff(0.05, 0.2)) as link:
        await listener.wait_connected(10)
        await listener.publish("fedd/test/flush", b"", qos=1, timeout=10)  # SUBACK is in
        await link.wait_connected(10)
        yield listener, link


def test_topic_alias_sends_the_topic_once_per_connection(broker):
    """Mosquitto (max_topic_alias 10 by default) takes the alias; subscribers see the topic."""
    payload = b"\x02" + bytes(69)  # a format-2 update's size

    async def main(proxy: CountingProxy) -> None:
        async with hub_and_device(broker, proxy) as (listener, link):
            full = publish_wire_bytes(UPDATE_TOPIC, payload, 1, topic_alias=1)
            alone = publish_wire_bytes("", payload, 1, topic_alias=1)
            assert (full, alone) == (109, 80)  # 1 + 1 + 2 + 29 + 2 + 1 + 3 + 70; 29 fewer
            sizes = [await publish_counted(link, proxy, payload) for _ in range(3)]
            assert sizes == [(full, full), (alone, alone), (alone, alone)]
            proxy.cut()  # a new connection: a new, empty alias map
            async with asyncio.timeout(10):
                while link.stats.connects < 2 or not link.connected.is_set():
                    await asyncio.sleep(0.02)
            sizes = [await publish_counted(link, proxy, payload) for _ in range(2)]
            assert sizes == [(full, full), (alone, alone)]
            assert await received(listener, 5) == [(UPDATE_TOPIC, payload)] * 5
            assert link.stats.connects == 2  # the broker never refused an alias

    with counting_proxy(broker) as proxy:
        asyncio.run(main(proxy))


def test_an_aliased_publish_is_not_resent_on_a_new_connection(broker):
    """paho resends unacknowledged QoS 1 publishes after a reconnect, as they were built.

    One that carried the alias alone would be a protocol error on the new
    connection (Mosquitto closes it, and the resend comes again on every
    reconnect): the link drops it, its publisher (told LinkDown) sends again.
    """
    payload = b"\x02" + bytes(69)

    async def main(proxy: CountingProxy) -> None:
        async with hub_and_device(broker, proxy) as (listener, link):
            await link.publish(UPDATE_TOPIC, payload, qos=1, timeout=10, alias=True)
            alone = publish_wire_bytes("", payload, 1, topic_alias=1)
            assert link.wire_bytes(UPDATE_TOPIC, payload, qos=1, alias=True) == alone
            with frozen(broker):
                with pytest.raises(LinkDown):  # sent with the alias alone, never acknowledged
                    await link.publish(UPDATE_TOPIC, payload, qos=1, timeout=0.5, alias=True)
                proxy.cut()
                async with asyncio.timeout(10):
                    while link.connected.is_set():
                        await asyncio.sleep(0.02)
            await link.wait_connected(10)
            await asyncio.sleep(1.5)  # a resend with the stale alias would be refused by now
            assert link.connected.is_set() and link.stats.connects == 2
            full = publish_wire_bytes(UPDATE_TOPIC, payload, 1, topic_alias=1)
            assert await publish_counted(link, proxy, payload) == (full, full)
            got = await received(listener, 2)
            while (extra := await listener.next_message(timeout=0.5)) is not None:
                got.append((extra.topic, extra.payload))  # the old connection's, if it landed
            assert {topic for topic, _ in got} == {UPDATE_TOPIC} and len(got) <= 3
            assert link.stats.connects == 2

    with counting_proxy(broker) as proxy:
        asyncio.run(main(proxy))


class NoAliasMosquitto(Mosquitto):
    """A broker that takes no topic aliases (Topic Alias Maximum 0 in its CONNACK)."""

    def config_text(self) -> str:
        return super().config_text() + "max_topic_alias 0\n"


def test_no_alias_where_the_broker_takes_none(tmp_path):
    payload = b"\x02" + bytes(69)

    async def main(broker: Mosquitto, proxy: CountingProxy) -> None:
        async with Link(host=broker.host, port=proxy.port, client_id="fedd-person-01") as link:
            await link.wait_connected(10)
            plain = publish_wire_bytes(UPDATE_TOPIC, payload, 1)
            for _ in range(2):
                assert await publish_counted(link, proxy, payload) == (plain, plain)

    with NoAliasMosquitto(tmp_path / "broker") as broker, counting_proxy(broker) as proxy:
        asyncio.run(main(broker, proxy))
