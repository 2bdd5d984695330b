"""Shared fixtures for the integration and end-to-end tests: real parts only.

A real Mosquitto on a free loopback port (each with its own folder), real
`fedd hub` / `fedd agent` processes (`python -m fedd.cli`), the shipped
LiteRT model and real HAPT data. Every wait is a poll with a deadline, every
process started here is killed by a finalizer if a test left it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from fedd.fleet.broker import Mosquitto
from fedd.link import Link, Message

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Generous deadlines: they bound a hang, they are not performance assertions.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


# ---------------------------------------------------------------- paths


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def manifest_path(repo_root: Path) -> Path:
    path = repo_root / "models" / "manifest.json"
    assert path.is_file(), f"the shipped model manifest is missing: {path}"
    return path


@pytest.fixture(scope="session")
def noop_delegate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tests/fixtures/noop_delegate.c` built as a LiteRT external delegate library.

    It is a real delegate that claims no nodes (see the source for its options):
    built from source here because no accelerator's delegate can be installed on
    a test machine, and none is needed to test the path a working delegate takes.
    """
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)),
                    None)
    if compiler is None:
        pytest.skip("no C compiler (install gcc and libc6-dev) to build the no-op delegate")
    library = tmp_path_factory.mktemp("delegate") / "libnoop_delegate.so"
    source = REPO_ROOT / "tests" / "fixtures" / "noop_delegate.c"
    built = subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{compiler} could not build {source}:\n{built.stderr}"
    return library


# ---------------------------------------------------------------- broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto for one test, in its own folder, on a free port."""
    with Mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto shared by one test module (use a fleet name per test)."""
    with Mosquitto(tmp_path_factory.mktemp("broker")) as mosquitto:
        yield mosquitto


# ---------------------------------------------------------------- waiting


def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05, watch: Iterable[FeddProcess] = ()) -> T:
    """Poll `condition` until it returns something truthy; return that value.

    Fails after `timeout` seconds, or at once if one of the `watch`ed
    processes exits meanwhile (with the tail of its log in the message).
    """
    deadline = time.monotonic() + timeout
    watched = list(watch)
    last: object = None
    while True:
        last = condition()
        if last:
            return last  # type: ignore[return-value]
        for process in watched:
            if process.popen.poll() is not None:
                pytest.fail(f"{process.name} exited with {process.popen.returncode} while "
                            f"waiting for {what}\n{process.tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(p.tail() for p in watched)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} "
                        f"(last value: {last!r})\n{tails}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """`wait_for(condition, timeout=…, what=…, watch=[processes])` → the truthy value."""
    return wait_until


def read_json(path: Path) -> dict[str, Any] | None:
    """A status file, or None while it does not exist yet (writers replace atomically)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture(scope="session")
def status_of() -> Callable[[Path], dict[str, Any] | None]:
    """`status_of(state_dir)` → the parsed `<state_dir>/status.json` or None."""
    return lambda state_dir: read_json(Path(state_dir) / "status.json")


# ---------------------------------------------------------------- configs


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def write_yaml(path: Path, content: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(content), sort_keys=False))
    return path


def agent_settings(*, broker: Mosquitto, device_id: str, state_dir: Path, manifest: Path,
                   fleet: str = "test", person: int = 1, **overrides: Any) -> dict[str, Any]:
    """An agent config replaying one HAPT person fast, training and reporting often."""
    base: dict[str, Any] = {
        "device_id": device_id, "fleet": fleet, "log_level": "info",
        "state_dir": str(state_dir),
        "broker": {"host": broker.host, "port": broker.port, "keepalive_s": 5,
                   "transport": "tcp", "reconnect": {"initial_s": 0.2, "max_s": 2.0}},
        "model": {"manifest": str(manifest), "name": "har-mlp"},
        "sensor": {"kind": "replay", "rate_hz": 50.0,
                   "replay": {"dataset": "hapt", "person": person, "speed": 100.0}},
        "training": {"min_windows": 32, "epochs": 1, "learning_rate": 0.1, "head_epochs": 1,
                     "min_interval_s": 0.5},
        "heartbeat": {"interval_s": 0.5},
        # The test runner's own load must not read as the device's real job.
        "scheduler": {"max_cpu_percent": 100.0, "cpu_budget_s_per_hour": None,
                      "max_runs_per_day": None},
    }
    return _merge(base, overrides)


def hub_settings(*, broker: Mosquitto, state_dir: Path, manifest: Path, fleet: str = "test",
                 **overrides: Any) -> dict[str, Any]:
    """A hub config that makes a version from every update (K = 1) unless overridden."""
    base: dict[str, Any] = {
        "fleet": fleet, "log_level": "info", "state_dir": str(state_dir),
        "broker": {"host": broker.host, "port": broker.port, "keepalive_s": 5,
                   "transport": "tcp", "reconnect": {"initial_s": 0.2, "max_s": 2.0}},
        "model": {"manifest": str(manifest), "name": "har-mlp"},
        "aggregation": {"buffer_size": 1, "quorum": 1, "max_wait_s": 1.0,
                        "max_staleness": 1000, "staleness_exponent": 0.5},
    }
    return _merge(base, overrides)


@pytest.fixture(scope="session")
def agent_yaml(manifest_path: Path) -> Callable[..., Path]:
    """`agent_yaml(path, broker=…, device_id=…, state_dir=…, fleet=…, person=…, **sections)`."""

    def write(path: Path, **settings: Any) -> Path:
        settings.setdefault("manifest", manifest_path)
        return write_yaml(path, agent_settings(**settings))

    return write


@pytest.fixture(scope="session")
def hub_yaml(manifest_path: Path) -> Callable[..., Path]:
    """`hub_yaml(path, broker=…, state_dir=…, fleet=…, **sections)`."""

    def write(path: Path, **settings: Any) -> Path:
        settings.setdefault("manifest", manifest_path)
        return write_yaml(path, hub_settings(**settings))

    return write


# ---------------------------------------------------------------- processes


def fedd_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a fedd child: ours minus any systemd hand-over, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a SIGABRT from dump_and_kill logs every thread's stack
    env.update(extra or {})
    return env


class FeddProcess:
    """A `python -m fedd.cli …` child with its output in a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", "fedd.cli", *args],
                                          stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=fedd_env(env))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.name} ({self.log_path}) ---\n{text}"

    def send(self, sig: int) -> None:
        assert self.alive(), f"{self.name} is not running\n{self.tail()}"
        self.popen.send_signal(sig)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_and_kill()
            pytest.fail(f"{self.name} did not exit within {timeout:.0f} s\n{self.tail(80)}")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, as systemd stops a unit; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def dump_and_kill(self) -> None:
        """A hung child: SIGABRT makes faulthandler log every thread's stack, then SIGKILL."""
        if self.alive():
            self.popen.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        self.kill()

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def wait_log(self, text: str, *, timeout: float = START_TIMEOUT_S, after: int = 0) -> str:
        """Wait until `text` appears in the log past character `after`; returns the log."""
        return wait_until(lambda: (lambda log: log if text in log[after:] else None)(self.log()),
                          timeout=timeout, what=f"{text!r} in the log of {self.name}",
                          watch=[self])


class FeddLauncher:
    """Starts fedd processes and makes sure none outlives its scope."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[FeddProcess] = []

    def start(self, name: str, args: list[str], *,
              env: Mapping[str, str] | None = None) -> FeddProcess:
        process = FeddProcess(name, args, self.log_dir / f"{name}.log", env)
        self.processes.append(process)
        return process

    def agent(self, name: str, config: Path, *,
              env: Mapping[str, str] | None = None) -> FeddProcess:
        return self.start(name, ["agent", "-c", str(config)], env=env)

    def hub(self, name: str, config: Path, *,
            env: Mapping[str, str] | None = None) -> FeddProcess:
        return self.start(name, ["hub", "-c", str(config)], env=env)

    def cleanup(self) -> None:
        """Stop leftovers: SIGTERM first, SIGKILL after a grace period."""
        running = [p for p in self.processes if p.alive()]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for process in running:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.dump_and_kill()


def run_cli(*args: str, timeout: float = 60.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one short `fedd …` command to completion and capture its output."""
    return subprocess.run([sys.executable, "-m", "fedd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=fedd_env(env),
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def fedd(tmp_path: Path) -> Iterator[FeddLauncher]:
    """`fedd.agent(name, config)`, `fedd.hub(name, config)`; leftovers are killed."""
    launcher = FeddLauncher(tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="module")
def module_fedd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeddLauncher]:
    """A launcher whose processes may span a module; leftovers are killed at its end."""
    launcher = FeddLauncher(tmp_path_factory.mktemp("logs"))
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="session")
def fedd_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`fedd_cli("check-config", path)` → CompletedProcess with text stdout/stderr."""
    return run_cli


# ---------------------------------------------------------------- MQTT


class MqttProbe:
    """A small synchronous test client over `fedd.link.Link` (each call is one session)."""

    _ids = itertools.count()

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def _link(self, subscriptions: Iterable[tuple[str, int]] = ()) -> Link:
        client_id = f"fedd-test-{os.getpid()}-{next(self._ids)}"
        return Link(host=self.host, port=self.port, client_id=client_id, keepalive_s=10,
                    subscriptions=list(subscriptions))

    def collect(self, topics: Iterable[str], until: Callable[[list[Message]], bool], *,
                timeout: float, what: str) -> list[Message]:
        """Subscribe and gather messages until `until(messages)` holds."""
        subscriptions = [(topic, 1) for topic in topics]

        messages: list[Message] = []

        async def main() -> bool:
            deadline = time.monotonic() + timeout
            async with self._link(subscriptions) as link:
                await link.wait_connected(timeout)
                while time.monotonic() < deadline:
                    message = await link.next_message(timeout=0.2)
                    if message is None:
                        continue
                    messages.append(message)
                    if until(messages):
                        return True
            return False

        if not asyncio.run(main()):
            summary = [(m.topic, len(m.payload), m.retain) for m in messages[-5:]]
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; "
                        f"{len(messages)} messages, last: {summary}")
        return messages

    def first(self, topic: str, predicate: Callable[[Message], bool] = lambda m: True, *,
              timeout: float = START_TIMEOUT_S, what: str | None = None) -> Message:
        """The first message on `topic` (retained or live) that satisfies `predicate`."""
        found = self.collect([topic], lambda ms: predicate(ms[-1]), timeout=timeout,
                             what=what or f"a message on {topic}")
        return found[-1]

    def retained(self, topic: str, *, timeout: float = 5.0) -> Message | None:
        """The message the broker retains on `topic` now (a fresh subscription), or None."""

        async def main() -> Message | None:
            async with self._link([(topic, 1)]) as link:
                await link.wait_connected(timeout)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    message = await link.next_message(timeout=0.2)
                    if message is not None and message.retain:
                        return message
            return None

        return asyncio.run(main())

    @contextlib.contextmanager
    def listening(self, topics: Iterable[str]) -> Iterator[Callable[[int, float],
                                                                   list[Message]]]:
        """Subscribe in a background thread while the block runs; `heard(n, timeout)`
        returns the first n messages (or fails the test after timeout)."""
        heard: queue.Queue[Message] = queue.Queue()
        subscribed, stop = threading.Event(), threading.Event()

        async def main() -> None:
            async with self._link([(topic, 1) for topic in topics]) as link:
                await link.wait_connected(START_TIMEOUT_S)
                await asyncio.sleep(0.2)  # let the SUBSCRIBE sent on connect reach the broker
                subscribed.set()
                while not stop.is_set():
                    message = await link.next_message(timeout=0.1)
                    if message is not None:
                        heard.put(message)

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        if not subscribed.wait(START_TIMEOUT_S):
            pytest.fail("the listening probe did not connect")

        def first(count: int, timeout: float) -> list[Message]:
            deadline, got = time.monotonic() + timeout, []
            while len(got) < count:
                try:
                    got.append(heard.get(timeout=max(deadline - time.monotonic(), 0.01)))
                except queue.Empty:
                    pytest.fail(f"heard {len(got)} of {count} messages in {timeout:.0f} s")
            return got

        try:
            yield first
        finally:
            stop.set()
            thread.join(START_TIMEOUT_S)

    def publish(self, *messages: tuple[str, bytes], retain: bool = False,
                timeout: float = 10.0) -> None:
        """Publish (topic, payload) pairs in order, QoS 1, each acknowledged by the broker."""

        async def main() -> None:
            async with self._link() as link:
                await link.wait_connected(timeout)
                for topic, payload in messages:
                    await link.publish(topic, payload, qos=1, retain=retain, timeout=timeout)

        asyncio.run(main())


@pytest.fixture(scope="session")
def mqtt_probe() -> Callable[[Mosquitto], MqttProbe]:
    """`mqtt_probe(broker)` → an MqttProbe on that broker."""
    return lambda mosquitto: MqttProbe(mosquitto.host, mosquitto.port)


@pytest.fixture
def probe(broker: Mosquitto) -> MqttProbe:
    """An MqttProbe on the test's own `broker`."""
    return MqttProbe(broker.host, broker.port)


# ---------------------------------------------------------------- systemd notify


class NotifyListener:
    """The receiving end of sd_notify(3): a unix datagram socket to put in NOTIFY_SOCKET.

    A thread drains it continuously, as systemd does: the kernel queues only
    a few datagrams (net.unix.max_dgram_qlen), and the daemons drop what a
    full queue will not take rather than block.
    """

    MAX_PATH = 100  # sun_path holds 108 bytes

    def __init__(self, folder: Path, name: str = "notify") -> None:
        path = folder / f"{name}.sock"
        self._scratch: Path | None = None
        if len(os.fsencode(path)) > self.MAX_PATH:  # a deep tmp_path: fall back to /tmp
            self._scratch = Path(tempfile.mkdtemp(prefix="fedd-notify-"))
            path = self._scratch / f"{name}.sock"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self.timed: list[tuple[float, str]] = []  # (time.monotonic() of arrival, line)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._drain = threading.Thread(target=self._receive, name=f"notify-{name}", daemon=True)
        self._drain.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            lines = [line for line in data.decode(errors="replace").split("\n") if line]
            with self._lock:
                self.messages.extend(lines)
                self.timed.extend((now, line) for line in lines)

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived (time.monotonic)."""
        with self._lock:
            return [t for t, line in self.timed if line == "WATCHDOG=1"]

    def poll(self) -> list[str]:
        """Every line received so far, in order."""
        with self._lock:
            return list(self.messages)

    def wait(self, predicate: Callable[[list[str]], bool], *, timeout: float, what: str,
             watch: Iterable[FeddProcess] = ()) -> list[str]:
        return wait_until(lambda: self.poll() if predicate(self.poll()) else None,
                          timeout=timeout, what=what, watch=watch)

    def close(self) -> None:
        self._closing.set()
        self._drain.join()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._scratch is not None:
            with contextlib.suppress(OSError):
                self._scratch.rmdir()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[Callable[[str], NotifyListener]]:
    """`notify_socket(name)` → a bound NotifyListener; closed after the test."""
    listeners: list[NotifyListener] = []

    def make(name: str = "notify") -> NotifyListener:
        listener = NotifyListener(tmp_path, name)
        listeners.append(listener)
        return listener

    try:
        yield make
    finally:
        for listener in listeners:
            listener.close()


@pytest.fixture(scope="session")
def notify_listener() -> type[NotifyListener]:
    """The NotifyListener class, for module-scoped fixtures (close it yourself)."""
    return NotifyListener
