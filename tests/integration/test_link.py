"""fedd.link against a real Mosquitto: the acknowledgement contract of publish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from fedd.fleet.broker import Mosquitto
from fedd.link import Backoff, Link, LinkDown

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
