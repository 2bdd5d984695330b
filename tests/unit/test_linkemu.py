"""fedd.fleet.linkemu parts that need no root: tbf arguments, counters, the delay proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from fedd.fleet.linkemu import DelayProxy, Direction, LossCount, Namespace, Shape


def test_shape_defaults_to_a_two_frame_burst_at_low_rates():
    assert Shape(rate_bps=64_000).tc_args() == [
        "tbf", "rate", "64000bit", "burst", "3028", "latency", "200ms"]
    # 20 ms of the rate once that is more than two frames.
    assert Shape(rate_bps=10_000_000, latency_s=0.05).tc_args()[3:] == [
        "burst", "25000", "latency", "50ms"]


@pytest.mark.parametrize("kwargs", [
    {"rate_bps": 0}, {"rate_bps": 64_000, "burst_bytes": 1000},
    {"rate_bps": 64_000, "latency_s": 0.0},
])
def test_shape_refuses_what_tbf_cannot_do(kwargs):
    with pytest.raises(ValueError):
        Shape(**kwargs)


def test_loss_count_rate():
    assert LossCount(passed=95, dropped=5).rate == 0.05
    assert LossCount(passed=0, dropped=0).rate == 0.0


def test_directions_are_the_devices():
    assert Direction.BOTH == Direction.UP | Direction.DOWN
    assert Direction.UP in Direction.BOTH


def test_a_namespace_does_nothing_before_create():
    namespace = Namespace(subnet="10.231.255.252/30")
    namespace.close()  # nothing to undo
    assert namespace.name.startswith("fedd-t")
    assert len(namespace.root_dev) <= 15


@contextlib.contextmanager
def echo_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)  # answer a half-close with ours

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_delay_proxy_delays_each_way_keeps_order_and_passes_eof():
    delay = 0.05
    payload = bytes(range(256)) * 2000  # 512 KB: many chunks, order must hold
    with echo_server() as port, DelayProxy(("127.0.0.1", port), delay) as proxy, \
            socket.create_connection(proxy.address, timeout=10) as conn:
        start = time.monotonic()
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        rtt = time.monotonic() - start
        sender = threading.Thread(target=lambda: (conn.sendall(payload),
                                                  conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := conn.recv(65536):
            received += chunk
        sender.join(10)
    assert 2 * delay <= rtt < 2 * delay + 0.5
    assert bytes(received) == payload


def test_delay_proxy_closes_the_client_when_the_target_refuses():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        with DelayProxy(("127.0.0.1", port), 0.01) as proxy, \
                socket.create_connection(proxy.address, timeout=5) as conn:
            assert conn.recv(1) == b""
