"""A real software TPM for tests: swtpm on free loopback ports, its own state folder.

`Swtpm` is a context manager: it starts ``swtpm socket --tpm2`` (server port P,
control port P+1, both on 127.0.0.1), waits until it listens, and kills it on
exit. Its state folder outlives a `restart`, as a TPM's NVRAM outlives a
reboot. `skip_without_swtpm` skips a test, with the reason, when the swtpm
binary or tpm2-pytss is missing (setup-env installs both).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
INSTALL_HINT = ("apt-get install swtpm swtpm-tools libtss2-dev pkg-config && "
                ".venv/bin/pip install 'tpm2-pytss>=2.3'")


def skip_without_swtpm() -> None:
    """Skip the calling test (with why) unless swtpm and tpm2-pytss are both here."""
    if shutil.which("swtpm") is None:
        pytest.skip(f"the swtpm binary is not installed ({INSTALL_HINT})")
    if importlib.util.find_spec("tpm2_pytss") is None:
        pytest.skip(f"tpm2-pytss is not installed ({INSTALL_HINT})")


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free loopback ports in 50 tries")


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: refused right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Swtpm:
    """One swtpm process; ``tcti`` is what fedd's config would say."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.state = self.folder / "state"
        self.log_path = self.folder / "swtpm.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()
        command = ["swtpm", "socket", "--tpm2",
                   "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                   "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                   "--flags", "not-need-init,startup-clear",
                   "--tpmstate", f"dir={self.state}",
                   "--log", f"file={self.log_path}"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"swtpm exited at start ({self._process.returncode}): "
                                   f"{err.strip()}")
            try:  # the control port: a probe there sends no TPM command
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"swtpm did not listen on port {self.port + 1} "
                           f"in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            if process.stderr:
                process.stderr.close()

    def restart(self) -> Swtpm:
        """Stop and start again on the same state (a power cycle), on fresh ports."""
        self.stop()
        return self.start()

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
