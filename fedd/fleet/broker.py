"""A private Mosquitto broker on a free loopback port (demo, benchmarks, tests).

Each broker gets its own folder with its config, persistence and log, so
several can run side by side and nothing touches the system's broker. It runs
open (plain TCP, anonymous) by default, or as a fleet's broker with mutual TLS
and the fleet's ACL, rendered from the same templates an operator installs.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedd import mosquitto_conf, pki

CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto")
INSTALL_HINT = "apt-get install mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    for candidate in CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError(f"mosquitto not found; install it with: {INSTALL_HINT}")


@dataclass(frozen=True)
class MutualTLS:
    """Run the broker as `fleet`'s: client certificates from the CA in `pki`, the fleet ACL.

    `pki` is a folder written by `scripts/provision` (or fedd.pki): the broker
    uses `<pki>/broker/` (ca.crt, broker.crt, broker.key), whose names must
    include 127.0.0.1 for clients to accept it here.
    """

    pki: Path
    fleet: str
    templates: Path | None = None  # config/mosquitto of this source tree by default

    def __post_init__(self) -> None:
        object.__setattr__(self, "pki", Path(self.pki).resolve())
        pki.check_fleet(self.fleet)

    @property
    def broker_folder(self) -> Path:
        return self.pki / "broker"


class Mosquitto:
    """`with Mosquitto(folder) as broker:` → broker.port on 127.0.0.1.

    `Mosquitto(folder, tls=MutualTLS(pki_folder, fleet))` starts it in the
    fleet's mutual-TLS mode instead of plain anonymous TCP.
    """

    def __init__(self, folder: str | Path, port: int | None = None, *,
                 tls: MutualTLS | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.log_path = self.folder / "mosquitto.log"
        self.acl_path = self.folder / mosquitto_conf.ACL_FILE
        self._process: subprocess.Popen[bytes] | None = None

    def _tls_settings(self, tls: MutualTLS) -> mosquitto_conf.BrokerSettings:
        folder = self.folder.resolve()
        return mosquitto_conf.BrokerSettings(
            fleet=tls.fleet, port=self.port, bind_address=self.host,
            cafile=tls.broker_folder / pki.CA_CERT, certfile=tls.broker_folder / pki.BROKER_CERT,
            keyfile=tls.broker_folder / pki.BROKER_KEY, acl_file=folder / self.acl_path.name,
            persistence_dir=folder, log_file=folder / self.log_path.name,
            user=getpass.getuser())

    def config_text(self) -> str:
        if self.tls is not None:
            return mosquitto_conf.render_broker_conf(self._tls_settings(self.tls),
                                                     self.tls.templates)
        return "\n".join([
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.folder}/",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            f"user {getpass.getuser()}",
            "",
        ])

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self.config_text())
        if self.tls is not None:
            for name in (pki.CA_CERT, pki.BROKER_CERT, pki.BROKER_KEY):
                if not (self.tls.broker_folder / name).is_file():
                    raise FileNotFoundError(f"{self.tls.broker_folder / name} is missing "
                                            "(provision the broker first)")
            self.acl_path.write_text(mosquitto_conf.render_acl(self.tls.fleet,
                                                               self.tls.templates))
        self._process = subprocess.Popen([mosquitto_binary(), "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"mosquitto exited at start ({self._process.returncode}): "
                                   f"{err.strip()} (log: {self.log_path})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout_s} s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (fault tests); `start()` brings it back.

        Mosquitto saves its persistence file only on a clean stop (or every
        `autosave_interval`), so sessions and queued messages since the last
        save die with it.
        """
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
