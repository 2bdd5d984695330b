"""Running a fedd program as a systemd service: signals, notify, watchdog.

Both daemons are an object with `async run(stop)` and `reload(config)`.
SIGTERM/SIGINT set `stop`; SIGHUP re-reads the config file and hands a valid
one to `reload`, while an invalid one is logged and the old config keeps
running. systemd hears READY=1 once the service is up, WATCHDOG=1 from the
event loop at half the WatchdogSec interval, and STATUS= lines.

Logs go to stderr as plain lines, or, when stderr is systemd's journal
stream (JOURNAL_STREAM), straight to journald as structured entries
(`JournalHandler`): PRIORITY from the level, the daemon's identity
(FEDD_DEVICE, FEDD_FLEET) on every entry, and FEDD_* fields a call passes
with `extra=log_fields(update_seq=17)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
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
        # sd_watchdog_enabled(3): a WATCHDOG_PID of another process (our parent's
        # watchdog, inherited) is not ours to feed.
        pid = os.environ.get("WATCHDOG_PID", "")
        if pid.isdigit() and int(pid) != os.getpid():
            self.watchdog_interval_s = None

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


JOURNAL_SOCKET = "/run/systemd/journal/socket"
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
FIELD_PREFIX = "fedd_"  # a record attribute fedd_<name> becomes the field FEDD_<NAME>
_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                    (logging.INFO, 6))


def log_fields(**values: object) -> dict[str, object]:
    """`extra=` for a log call: each value becomes the journal field FEDD_<NAME>."""
    return {f"{FIELD_PREFIX}{name}": value for name, value in values.items()}


def syslog_priority(levelno: int) -> int:
    """The syslog priority (journald's PRIORITY) of a logging level: 2 crit … 7 debug."""
    return next((prio for floor, prio in _SYSLOG_PRIORITY if levelno >= floor), 7)


def journal_field(name: str, value: object) -> bytes:
    """One field of journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    data = str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:  # binary-safe form: name, newline, 64-bit LE length, data
        return key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return key + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Log records as journald entries over its native socket.

    Fields: MESSAGE (``logger: message`` and any traceback), PRIORITY,
    SYSLOG_IDENTIFIER, LOGGER, CODE_FILE/CODE_LINE/CODE_FUNC, THREAD_NAME,
    the constant `fields` (upper-case names, e.g. FEDD_DEVICE), and one
    FEDD_<NAME> for every record attribute ``fedd_<name>`` (from ``extra=``).
    An entry journald does not take (socket gone, too large) is written to
    stderr instead, which under systemd is the journal stream as well.
    """

    def __init__(self, identifier: str, fields: Mapping[str, object] | None = None, *,
                 socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        for name in fields or {}:
            if not (name.isupper() and name.replace("_", "").isalnum()
                    and not name.startswith("_")):
                raise ValueError(f"not a journal field name: {name!r}")
        self.identifier = identifier
        self.socket_path = socket_path
        self._constant = b"".join(journal_field(k, v) for k, v in (fields or {}).items()
                                  if v is not None)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def entry(self, record: logging.LogRecord) -> bytes:
        fields = [journal_field("MESSAGE", self.format(record)),
                  journal_field("PRIORITY", syslog_priority(record.levelno)),
                  journal_field("SYSLOG_IDENTIFIER", self.identifier),
                  journal_field("LOGGER", record.name),
                  journal_field("CODE_FILE", record.pathname),
                  journal_field("CODE_LINE", record.lineno),
                  journal_field("CODE_FUNC", record.funcName),
                  journal_field("THREAD_NAME", record.threadName)]
        for attribute, value in vars(record).items():
            name = attribute[len(FIELD_PREFIX):]
            if attribute.startswith(FIELD_PREFIX) and name.isidentifier() and value is not None:
                fields.append(journal_field(f"FEDD_{name.upper()}", value))
        return self._constant + b"".join(fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._socket.sendto(self.entry(record), self.socket_path)
        except OSError:
            try:
                line = f"<{syslog_priority(record.levelno)}>{self.format(record)}\n"
                sys.stderr.write(line)
                sys.stderr.flush()
            except Exception:
                self.handleError(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._socket.close()
        super().close()


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether systemd connected our stderr to the journal (JOURNAL_STREAM is its dev:inode)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def setup_logging(level: str, *, identifier: str = "fedd",
                  fields: Mapping[str, object] | None = None) -> None:
    """Plain lines on stderr; structured journal entries when run by systemd.

    Under systemd (stderr is the journal stream and journald's socket is
    there) records go to `JournalHandler` with `identifier` and `fields`;
    otherwise they are ``LEVEL logger: message`` lines on stderr.
    """
    if stderr_is_journal() and os.path.exists(JOURNAL_SOCKET):
        handler: logging.Handler = JournalHandler(identifier, fields, socket_path=JOURNAL_SOCKET)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


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
