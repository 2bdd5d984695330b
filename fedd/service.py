"""Running a fedd program as a systemd service: signals, notify, watchdog.

Both daemons are an object with `async run(stop)` and `reload(config)`.
SIGTERM/SIGINT set `stop`; SIGHUP re-reads the config file and hands a valid
one to `reload`, while an invalid one is logged and the old config keeps
running. systemd hears READY=1 once the service is up, WATCHDOG=1 from the
event loop at half the WatchdogSec interval, and STATUS= lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

import sdnotify

from fedd.config import ConfigError

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) messages; silent when not run by systemd.

    The socket is made non-blocking: if the manager is not reading, a
    message is dropped rather than freezing the daemon's event loop.
    """

    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            self._notifier.socket.setblocking(False)
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) else None

    def ready(self) -> None:
        self._notifier.notify("READY=1")

    def status(self, text: str) -> None:
        self._notifier.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self._notifier.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self._notifier.notify("STOPPING=1")


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...

    def reload(self, config: Any) -> None: ...


def setup_logging(level: str) -> None:
    """Plain lines on stderr: journald adds the time and the unit."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        force=True)


async def _watchdog(notifier: Notifier) -> None:
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def serve(service: Service, notifier: Notifier,
                load_config: Callable[[], Any]) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads through `load_config`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            config = load_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        service.reload(config)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    watchdog = asyncio.create_task(_watchdog(notifier))
    try:
        await service.run(stop)
    finally:
        notifier.stopping()
        watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
