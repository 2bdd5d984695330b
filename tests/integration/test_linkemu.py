"""fedd.fleet.linkemu on this machine's kernel: rate, loss, delay, isolation, teardown.

Every peer inside a namespace is a small Python process (`PEER` below) that
prints one JSON line; the other end runs in this process in the root
namespace. Bands are broad on purpose: they catch a link that is not shaped
or not lossy, not a slow CI machine. Skipped, with the reason, where the
machine cannot create namespaces (not root, no iproute2/nftables, a kernel
that refuses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fedd.fleet.broker import Mosquitto
from fedd.fleet.linkemu import (
    DelayProxy,
    Direction,
    LinkEmuError,
    Namespace,
    Shape,
    can_create_namespaces,
    remove_stale,
)

pytestmark = pytest.mark.integration

PEER_TIMEOUT_S = 30.0
RATE_BPS = 64_000
SHAPED_BYTES = 64 * 1024

# One file, several roles, each ending with one JSON line on stdout.
PEER = textwrap.dedent("""
    import hashlib, json, os, socket, sys, time
    role, args = sys.argv[1], sys.argv[2:]
    if role == "tcp-send":  # host port size: send random bytes, wait for the receiver's close
        host, port, size = args[0], int(args[1]), int(args[2])
        data = os.urandom(size)
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        print(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
    elif role == "tcp-receive":  # host: print the port, then what one connection brought
        with socket.create_server((args[0], 0)) as server:
            server.settimeout(30)
            print(json.dumps({"port": server.getsockname()[1]}), flush=True)
            conn, _ = server.accept()
            start, digest, size = time.monotonic(), hashlib.sha256(), 0
            with conn:
                conn.settimeout(30)
                while chunk := conn.recv(65536):
                    digest.update(chunk)
                    size += len(chunk)
                seconds = time.monotonic() - start
        print(json.dumps({"bytes": size, "seconds": seconds, "sha256": digest.hexdigest()}))
    elif role == "udp-send":  # host port count: numbered datagrams, paced
        host, port, count = args[0], int(args[1]), int(args[2])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for seq in range(count):
                s.sendto(seq.to_bytes(4, "big") + bytes(196), (host, port))
                if seq % 50 == 49:
                    time.sleep(0.003)
        print(json.dumps({"sent": count}))
    elif role == "udp-receive":  # host: print the port, then the distinct numbers received
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((args[0], 0))
            print(json.dumps({"port": s.getsockname()[1]}), flush=True)
            seen, s_timeout = set(), 5.0
            while True:
                s.settimeout(s_timeout)
                try:
                    seen.add(int.from_bytes(s.recv(2048)[:4], "big"))
                except TimeoutError:
                    break
                s_timeout = 1.0
        print(json.dumps({"received": len(seen)}))
    elif role == "connect":  # timeout host:port...: how a connect to each ends
        out = {}
        for target in args[1:]:
            host, port = target.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=float(args[0])).close()
                out[target] = "ok"
            except TimeoutError:
                out[target] = "timeout"
            except OSError as exc:
                out[target] = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        print(json.dumps(out))
    elif role == "echo-rtt":  # host port n: round trips of 100 bytes over one connection
        host, port, n = args[0], int(args[1]), int(args[2])
        rtts = []
        with socket.create_connection((host, port), timeout=10) as s:
            for _ in range(n):
                start = time.monotonic()
                s.sendall(bytes(100))
                got = 0
                while got < 100:
                    got += len(s.recv(100 - got))
                rtts.append(time.monotonic() - start)
        print(json.dumps({"rtts": rtts}))
""")


@pytest.fixture(scope="module", autouse=True)
def namespaces_work() -> None:
    reason = can_create_namespaces()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with Namespace() as namespace:
        yield namespace


def start_peer(ns: Namespace, *args: object) -> subprocess.Popen[str]:
    return ns.run([sys.executable, "-c", PEER, *map(str, args)], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)


def first_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The peer's first JSON line (bounded: the peer's own timeouts end it)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(PEER_TIMEOUT_S)
        err = process.stderr.read() if process.stderr else ""
        pytest.fail(f"peer exited with {process.returncode} and no output: {err}")
    return json.loads(line)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The peer's last JSON line, once it exited with 0."""
    try:
        out, err = process.communicate(timeout=PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"peer did not finish within {PEER_TIMEOUT_S:.0f} s: {err}")
    assert process.returncode == 0, f"peer failed ({process.returncode}): {err}"
    return json.loads(out.strip().splitlines()[-1])


def receive_tcp(server: socket.socket) -> tuple[int, float, str]:
    """Accept one connection; (bytes, seconds from accept to EOF, sha256)."""
    server.settimeout(PEER_TIMEOUT_S)
    conn, _ = server.accept()
    start, digest, size = time.monotonic(), hashlib.sha256(), 0
    with conn:
        conn.settimeout(PEER_TIMEOUT_S)
        while chunk := conn.recv(65536):
            digest.update(chunk)
            size += len(chunk)
        seconds = time.monotonic() - start
    return size, seconds, digest.hexdigest()


def transfer_up(ns: Namespace, size: int) -> tuple[float, float]:
    """TCP namespace → root: (goodput in bit/s, seconds); the bytes arrive intact."""
    with socket.create_server((ns.root_ip, 0)) as server:
        sender = start_peer(ns, "tcp-send", ns.root_ip, server.getsockname()[1], size)
        got, seconds, digest = receive_tcp(server)
    assert finish(sender)["sha256"] == digest
    assert got == size
    return 8 * size / seconds, seconds


def transfer_down(ns: Namespace, size: int) -> tuple[float, float]:
    """TCP root → namespace: (goodput in bit/s, seconds measured by the receiver)."""
    receiver = start_peer(ns, "tcp-receive", ns.ns_ip)
    port = first_line(receiver)["port"]
    data = os.urandom(size)
    with socket.create_connection((ns.ns_ip, port), timeout=PEER_TIMEOUT_S) as conn:
        conn.sendall(data)
    result = finish(receiver)
    assert result["bytes"] == size
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    return 8 * size / result["seconds"], result["seconds"]


def test_tbf_limits_tcp_goodput_to_the_configured_rate(ns):
    unshaped, _ = transfer_up(ns, SHAPED_BYTES)
    ns.shape(Shape(rate_bps=RATE_BPS), Direction.UP)
    shaped, seconds = transfer_up(ns, SHAPED_BYTES)
    ns.shape(Shape(rate_bps=RATE_BPS), Direction.DOWN)
    ns.shape(None, Direction.UP)
    shaped_down, seconds_down = transfer_down(ns, SHAPED_BYTES // 2)
    print(f"\nTCP goodput over a {RATE_BPS} bit/s tbf: up {shaped / 1e3:.1f} kbit/s "
          f"({SHAPED_BYTES} B in {seconds:.2f} s), down {shaped_down / 1e3:.1f} kbit/s "
          f"({SHAPED_BYTES // 2} B in {seconds_down:.2f} s); unshaped "
          f"{unshaped / 1e6:.0f} Mbit/s ({unshaped / shaped:.0f}x)")
    assert 40_000 <= shaped <= 70_000
    assert 40_000 <= shaped_down <= 70_000
    assert unshaped / shaped > 20


def test_random_loss_drops_about_that_share_of_udp_datagrams_up(ns):
    ns.set_loss(5.0, Direction.UP)
    count = 4000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((ns.root_ip, 0))
        sender = start_peer(ns, "udp-send", ns.root_ip, sock.getsockname()[1], count)
        seen: set[int] = set()
        sock.settimeout(5.0)
        with contextlib.suppress(TimeoutError):
            while len(seen) < count:
                seen.add(int.from_bytes(sock.recv(2048)[:4], "big"))
                sock.settimeout(1.0)
    assert finish(sender)["sent"] == count
    lost = count - len(seen)
    counted = ns.loss_count(Direction.UP)
    print(f"\nUDP up at 5 % loss: {lost}/{count} lost ({100 * lost / count:.2f} %); "
          f"nft counters {counted}")
    assert 0.02 <= lost / count <= 0.09
    assert counted.dropped == lost, "every missing datagram was dropped by the loss rule"
    assert ns.loss_count(Direction.DOWN).dropped == 0


def test_random_loss_drops_about_that_share_of_udp_datagrams_down(ns):
    ns.set_loss(5.0, Direction.DOWN)
    count = 4000
    receiver = start_peer(ns, "udp-receive", ns.ns_ip)
    port = first_line(receiver)["port"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seq in range(count):
            sock.sendto(seq.to_bytes(4, "big") + bytes(196), (ns.ns_ip, port))
            if seq % 50 == 49:
                time.sleep(0.003)
    lost = count - finish(receiver)["received"]
    print(f"\nUDP down at 5 % loss: {lost}/{count} lost ({100 * lost / count:.2f} %)")
    assert 0.02 <= lost / count <= 0.09
    assert ns.loss_count(Direction.DOWN).dropped == lost


def test_tcp_completes_intact_under_loss_both_ways(ns):
    ns.set_loss(5.0)
    size = 256 * 1024
    goodput, seconds = transfer_up(ns, size)
    up, down = ns.loss_count(Direction.UP), ns.loss_count(Direction.DOWN)
    print(f"\nTCP {size} B at 5 % loss both ways: {seconds:.2f} s ({goodput / 1e6:.1f} Mbit/s); "
          f"dropped {up.dropped}/{up.passed + up.dropped} up, "
          f"{down.dropped}/{down.passed + down.dropped} down")
    assert up.dropped > 0, "the loss rule never fired: the test proved nothing"


def test_a_shaped_lossy_link_still_carries_tcp(ns):
    ns.shape(Shape(rate_bps=RATE_BPS))
    ns.set_loss(5.0)
    goodput, seconds = transfer_up(ns, 16 * 1024)
    up, down = ns.loss_count(Direction.UP), ns.loss_count(Direction.DOWN)
    print(f"\nTCP 16 KiB over 64 kbit/s at 5 % loss: {seconds:.2f} s "
          f"({goodput / 1e3:.1f} kbit/s); dropped {up.dropped} up, {down.dropped} down")
    # Intact (transfer_up checks the digest) and shaped: tbf's 3 KB burst makes 16 KiB
    # read up to ~20 % above the rate, so the bound is loose.
    assert goodput < 100_000


DRAIN = textwrap.dedent("""
    import asyncio, json, sys, time
    from fedd.link import Link, publish_wire_bytes
    host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    topic = "fedd/v1/linkemu/update/device-1"
    async def main():
        async with Link(host=host, port=port, client_id="linkemu-drain") as link:
            await link.wait_connected(20)
            start = time.monotonic()
            for seq in range(count):  # one at a time, each acknowledged, as the agent does
                await link.publish(topic, seq.to_bytes(4, "big") + bytes(size - 4), qos=1)
            seconds = time.monotonic() - start
        wire = count * publish_wire_bytes(topic, bytes(size), 1)
        print(json.dumps({"seconds": seconds, "wire_bytes": wire}))
    asyncio.run(main())
""")


def test_an_mqtt_client_inside_drains_through_the_shaped_link_to_a_root_broker(ns, tmp_path):
    """100 updates of 330 bytes (har-mlp, topk:0.01+q:4+zstd), one PUBACK at a time."""
    count, size = 100, 330
    ns.shape(Shape(rate_bps=RATE_BPS))
    broker = Mosquitto(tmp_path / "broker")
    broker.host = ns.root_ip  # listen on the link's root side only
    with broker:
        argv = [sys.executable, "-c", DRAIN, broker.host, *map(str, (broker.port, count, size))]
        client = ns.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        result = finish(client)
    seconds, wire = result["seconds"], result["wire_bytes"]
    floor = 8 * wire / RATE_BPS  # the MQTT bytes alone at the line rate
    print(f"\nMQTT drain of {count} x {size} B updates over {RATE_BPS} bit/s: {seconds:.2f} s "
          f"({wire} B of PUBLISH, {8 * wire / seconds / 1e3:.1f} kbit/s of MQTT goodput; "
          f"{floor:.2f} s at the line rate)")
    assert floor <= seconds < 4 * floor + 5


def connect_results(ns: Namespace, timeout: float, *targets: str) -> dict[str, str]:
    return finish(start_peer(ns, "connect", timeout, *targets))


def root_addresses(ns: Namespace) -> list[str]:
    """The root namespace's IPv4 addresses other than loopback and this link's own."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return [info["local"] for entry in json.loads(out)
            if entry["ifname"] not in ("lo", ns.root_dev)
            for info in entry.get("addr_info", [])]


def test_a_namespace_process_reaches_only_the_veth_peer(ns):
    with socket.create_server(("0.0.0.0", 0)) as server:
        server.listen(16)
        port = server.getsockname()[1]
        others = root_addresses(ns)
        targets = [f"{ns.root_ip}:{port}", f"127.0.0.1:{port}", f"1.1.1.1:{port}",
                   *(f"{address}:{port}" for address in others)]
        results = connect_results(ns, 2.0, *targets)
    print(f"\nconnects from {ns.name}: {results}")
    assert results.pop(f"{ns.root_ip}:{port}") == "ok"
    # Its own loopback (nothing listens there), and no route to anything else.
    assert results.pop(f"127.0.0.1:{port}") == "Connection refused"
    assert set(results.values()) == {"Network is unreachable"}


def test_outages_cut_the_link_and_it_comes_back(ns):
    with socket.create_server((ns.root_ip, 0)) as server:
        server.listen(16)
        target = f"{ns.root_ip}:{server.getsockname()[1]}"
        with ns.outage():
            assert ns.loss(Direction.UP) == ns.loss(Direction.DOWN) == 100.0
            assert connect_results(ns, 1.0, target)[target] == "timeout"
        assert ns.loss(Direction.UP) == 0.0
        assert connect_results(ns, 2.0, target)[target] == "ok"
        ns.set_link(False)
        assert connect_results(ns, 1.0, target)[target] != "ok"
        ns.set_link(True)
        assert connect_results(ns, 2.0, target)[target] == "ok"


class EchoServer:
    """A threaded TCP echo server for the delay test."""

    def __init__(self, host: str) -> None:
        self.server = socket.create_server((host, 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(PEER_TIMEOUT_S)
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def test_delay_proxy_adds_the_one_way_delay_each_way(ns):
    delay = 0.1
    echo = EchoServer("0.0.0.0")
    try:
        with DelayProxy(("127.0.0.1", echo.port), delay, listen=(ns.root_ip, 0)) as proxy:
            host, port = proxy.address
            delayed = finish(start_peer(ns, "echo-rtt", host, port, 5))["rtts"]
            direct = finish(start_peer(ns, "echo-rtt", ns.root_ip, echo.port, 5))["rtts"]
            assert proxy.connections == 1
    finally:
        echo.close()
    print(f"\necho round trip: direct {1e3 * statistics.median(direct):.2f} ms, through a "
          f"{1e3 * delay:.0f} ms proxy {1e3 * statistics.median(delayed):.1f} ms")
    assert min(delayed) >= 2 * delay
    assert statistics.median(delayed) < 2 * delay + 0.1
    assert statistics.median(direct) < 0.05


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return {entry["ifname"] for entry in json.loads(out)}


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=True, timeout=10).stdout


def assert_gone(name: str, root_dev: str, ns_dev: str, table: str) -> None:
    assert name not in netns_names()
    assert not {root_dev, ns_dev} & link_names()
    assert table not in nft_tables()


def test_teardown_leaves_nothing_behind_even_after_an_error():
    namespace = Namespace()
    with pytest.raises(RuntimeError, match="boom"), namespace as ns:
        ns.shape(Shape(rate_bps=RATE_BPS))
        ns.set_loss(5.0)
        sleeper = ns.run(["sleep", "60"])
        assert ns.name in netns_names() and ns.root_dev in link_names()
        assert ns.root_table in nft_tables()
        assert ns.pids() == [sleeper.pid]
        raise RuntimeError("boom")
    assert sleeper.poll() is not None, "the process inside was stopped"
    assert_gone(namespace.name, namespace.root_dev, namespace.ns_dev, namespace.root_table)
    namespace.close()  # idempotent
    with pytest.raises(LinkEmuError, match="not created"):
        namespace.set_loss(1.0)


def test_remove_stale_clears_a_crashed_run_and_spares_live_ones(ns):
    crash = textwrap.dedent("""
        import json, os, signal
        from fedd.fleet.linkemu import Namespace, Shape
        ns = Namespace().create()
        ns.shape(Shape(rate_bps=64000))
        ns.set_loss(5.0)
        print(json.dumps([ns.name, ns.root_dev, ns.ns_dev, ns.root_table]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True,
                          timeout=PEER_TIMEOUT_S, check=False)
    assert done.returncode == -9, done.stderr
    name, root_dev, ns_dev, table = json.loads(done.stdout)
    assert name in netns_names() and root_dev in link_names() and table in nft_tables()
    removed = remove_stale()
    print(f"\nremove_stale: {removed}")
    assert f"netns {name}" in removed
    assert_gone(name, root_dev, ns_dev, table)
    assert ns.name in netns_names() and ns.root_dev in link_names(), "a live run is spared"
    assert ns.root_table in nft_tables()
