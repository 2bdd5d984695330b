"""Command source: lines of numbers from a command's standard output, or from standard input.

Any sensor a program can read (a vendor tool, a BLE bridge, a script on a
serial port) becomes a source: the program prints one sample per line,
numeric columns separated by commas and/or whitespace. Configured columns
are the channels, in the order the features expect (acceleration in g,
angular velocity in rad/s: a `scale` per channel converts), optionally a
label column (an integer class, -1 unknown) and a timestamp column.

Without a timestamp the samples are taken to be evenly spaced at
`rate_hz`. With one, they are interpolated onto that grid (see
`resample`), and a jump of more than `gap_tolerance` periods is a gap.

Every line is checked; a bad one is dropped and counted under its reason
(`bad_lines`), logged the 1st, 10th, 100th… time, and never stops the
stream. Lines are bounded by `max_line_bytes`. The source restarts
nothing: when the command ends it logs the exit code and ends the stream,
and a non-zero exit (or death by signal) raises `CommandFailed` with the
last lines of the command's standard error, which is logged as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shlex
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import BinaryIO

import numpy as np

from fedd.agent.sensors.resample import Resampler
from fedd.agent.sensors.source import CHUNK_INTERVAL_S, Chunk, FdReader, SensorError

log = logging.getLogger(__name__)

READ_BYTES = 65536
STDERR_LINE_BYTES = 1000
STDERR_TAIL_LINES = 5
EXIT_WAIT_S = 5.0  # after the command closes its output, how long it may take to exit

Read = Callable[[], Awaitable[bytes]]  # the next block of input, b"" at its end

_NUMBER = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(rb"[+-]?\d+")
_COMMENT = b"#"

# Reasons a line is dropped: the keys of `CommandSource.bad_lines`.
TOO_LONG = "too long"
NOT_TEXT = "not ASCII text"
COLUMNS = "wrong number of columns"
EMPTY_FIELD = "empty field"
NOT_NUMBER = "not a number"
NOT_FINITE = "not finite"
BAD_LABEL = "label not an integer from -1 to 32767"
BAD_TIME = "timestamp not after the previous one"


class CommandError(SensorError):
    """The command cannot be started."""


class CommandFailed(CommandError):
    """The command ended with a non-zero exit code or was killed by a signal."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr_tail: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = tuple(stderr_tail)
        how = f"exited with code {returncode}"
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        tail = "; its last error output: " + " | ".join(stderr_tail) if stderr_tail else ""
        super().__init__(f"sensor command {shlex.join(argv)} {how}{tail}")


class LineSplitter:
    """Bytes → lines, each at most `max_bytes`; a longer line comes out as None, once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._partial = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> list[bytes | None]:
        pieces = data.split(b"\n")
        out: list[bytes | None] = []
        for piece in pieces[:-1]:
            if self._overlong or len(self._partial) + len(piece) > self.max_bytes:
                out.append(None)
            else:
                out.append(bytes(self._partial + piece))
            self._partial.clear()
            self._overlong = False
        if not self._overlong:
            self._partial += pieces[-1]
            if len(self._partial) > self.max_bytes:
                self._partial.clear()
                self._overlong = True
        return out

    def end(self) -> list[bytes | None]:
        """The last line when the stream did not end with a newline."""
        if self._overlong:
            out: list[bytes | None] = [None]
        else:
            out = [bytes(self._partial)] if self._partial else []
        self._partial.clear()
        self._overlong = False
        return out


class CommandSource:
    """Samples parsed from the lines of `command`'s output (an argv list, no shell) or of stdin.

    `channels` are the column indices (from 0) of the values, in feature
    order; a line must have exactly `columns` fields (default: one past the
    highest index used). `stdin` (a file object or descriptor) replaces the
    agent's own standard input when `command` is None.
    """

    def __init__(self, *, command: Sequence[str] | None, rate_hz: float,
                 channels: Sequence[int] = (0, 1, 2, 3, 4, 5), columns: int | None = None,
                 label_column: int | None = None, timestamp_column: int | None = None,
                 timestamp_unit_s: float = 1.0, scale: Sequence[float] | None = None,
                 gap_tolerance: float = 2.0, max_line_bytes: int = 1024,
                 stdin: BinaryIO | int | None = None) -> None:
        if command is not None and (isinstance(command, str) or not command
                                    or not all(isinstance(a, str) and a for a in command)):
            raise ValueError("command must be a non-empty list of non-empty strings "
                             "(the program and its arguments; no shell)")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        channels = tuple(channels)
        if not channels or any(not isinstance(c, int) or c < 0 for c in channels):
            raise ValueError(f"channels must be column indices from 0, got {list(channels)}")
        used = [*channels, *(c for c in (label_column, timestamp_column) if c is not None)]
        if any(c < 0 for c in used):
            raise ValueError("column indices start at 0")
        if len(set(used)) != len(used):
            raise ValueError(f"a column is used twice among channels {list(channels)}, "
                             f"label {label_column} and timestamp {timestamp_column}")
        columns = max(used) + 1 if columns is None else columns
        if columns <= max(used):
            raise ValueError(f"columns ({columns}) must exceed the highest column used "
                             f"({max(used)})")
        if scale is not None and len(scale) != len(channels):
            raise ValueError(f"scale has {len(scale)} factors for {len(channels)} channels")
        if not timestamp_unit_s > 0:
            raise ValueError(f"timestamp_unit_s must be positive, got {timestamp_unit_s}")
        if not gap_tolerance > 1:
            raise ValueError(f"gap_tolerance is in sample periods and must exceed 1, "
                             f"got {gap_tolerance}")
        if not 16 <= max_line_bytes <= 1 << 20:
            raise ValueError(f"max_line_bytes must be from 16 to 1 MiB, got {max_line_bytes}")
        self.command = None if command is None else tuple(command)
        self.rate_hz = float(rate_hz)
        self.channels = channels
        self.columns = columns
        self.label_column = label_column
        self.timestamp_column = timestamp_column
        self.timestamp_unit_s = timestamp_unit_s
        self.scale = np.array(scale if scale is not None else [1.0] * len(channels), np.float64)
        self.gap_tolerance = gap_tolerance
        self.max_line_bytes = max_line_bytes
        self._stdin = stdin
        self.name = "stdin" if command is None else os.path.basename(command[0])
        self.lines = 0  # lines read: good, bad, blank or comment
        self.samples = 0  # samples emitted
        self.bad_lines: dict[str, int] = {}
        self.exit_code: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._last_time: float | None = None

    def holdout(self) -> None:
        return None

    @property
    def stats(self) -> dict[str, object]:
        """Counters for the heartbeat and `fedd status`."""
        return {"lines": self.lines, "samples": self.samples, "bad_lines": dict(self.bad_lines),
                "exit_code": self.exit_code}

    # parsing

    def parse(self, line: bytes | None) -> tuple[list[float], int, float | None] | str | None:
        """One line → (values, label, time), a reason to reject it, or None to skip it."""
        if line is None:
            return TOO_LONG
        line = line.strip()
        if not line or line.startswith(_COMMENT):
            return None
        if not line.isascii():
            return NOT_TEXT
        fields = [f.strip() for f in line.split(b",")] if b"," in line else line.split()
        if len(fields) != self.columns:
            return COLUMNS
        if not all(fields):
            return EMPTY_FIELD
        values = []
        for column in self.channels:
            if not _NUMBER.fullmatch(fields[column]):
                return NOT_NUMBER
            value = float(fields[column])
            if not math.isfinite(value):
                return NOT_FINITE
            values.append(value)
        label = -1
        if self.label_column is not None:
            text = fields[self.label_column]
            if not _INTEGER.fullmatch(text) or not -1 <= int(text) <= 32767:
                return BAD_LABEL
            label = int(text)
        when = None
        if self.timestamp_column is not None:
            text = fields[self.timestamp_column]
            if not _NUMBER.fullmatch(text):
                return NOT_NUMBER
            when = float(text) * self.timestamp_unit_s
            if not math.isfinite(when):
                return NOT_FINITE
            last = self._last_time
            # a small step back or a repeat is a bad line; a big jump back is a restarted clock
            if last is not None and last - self.gap_tolerance / self.rate_hz <= when <= last:
                return BAD_TIME
            self._last_time = when
        return values, label, when

    def _reject(self, reason: str, line: bytes | None) -> None:
        count = self.bad_lines[reason] = self.bad_lines.get(reason, 0) + 1
        if math.log10(count).is_integer():
            shown = "(over the limit)" if line is None else repr(line[:80])
            log.warning("sensor %s: line %d dropped, %s (%d such lines so far): %s", self.name,
                        self.lines, reason, count, shown)

    def _rows(self, lines: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values, labels, times = [], [], []
        for line in lines:
            self.lines += 1
            parsed = self.parse(line)
            if parsed is None:
                continue
            if isinstance(parsed, str):
                self._reject(parsed, line)
                continue
            values.append(parsed[0])
            labels.append(parsed[1])
            times.append(parsed[2])
        samples = np.array(values, np.float64).reshape(len(values), len(self.channels))
        stamps = np.array(times if self.timestamp_column is not None else [], np.float64)
        return samples * self.scale, np.array(labels, np.int16), stamps

    # streaming

    async def chunks(self, start_at: int = 0) -> AsyncIterator[Chunk]:
        """Samples as lines arrive; the cursor keeps counting from `start_at`."""
        cursor = start_at
        first = True
        splitter = LineSplitter(self.max_line_bytes)
        resampler = None
        if self.timestamp_column is not None:
            resampler = Resampler(self.rate_hz, self.gap_tolerance / self.rate_hz)
        self._last_time = None
        loop = asyncio.get_running_loop()
        opened = self._stdin_input() if self.command is None else self._command_input()
        async with opened as read:
            while True:
                started = loop.time()
                data = await read()
                lines = splitter.feed(data) if data else splitter.end()
                samples, labels, times = self._rows(lines)
                if resampler is None:
                    segments = [(samples, labels, False)] if len(samples) else []
                else:
                    segments = resampler.push(times, samples, labels)
                for values, labs, gap in segments:
                    cursor += len(values)
                    self.samples += len(values)
                    yield Chunk(values.astype(np.float32), labs.astype(np.int16), gap or first,
                                cursor)
                    first = False
                if not data:
                    return
                if len(data) < READ_BYTES:  # caught up: gather ~CHUNK_INTERVAL_S of lines
                    await asyncio.sleep(max(0.0, started + CHUNK_INTERVAL_S - loop.time()))

    @contextlib.asynccontextmanager
    async def _stdin_input(self) -> AsyncIterator[Read]:
        source = sys.stdin if self._stdin is None else self._stdin
        try:  # sys.stdin is None when the agent was started without one
            fd = os.dup(source if isinstance(source, int) else source.fileno())
        except (OSError, AttributeError, ValueError) as exc:
            raise CommandError(f"the agent has no standard input to read samples from: {exc}"
                               ) from exc
        try:
            reader = FdReader(fd)

            async def read() -> bytes:
                data = await reader.read(READ_BYTES)
                if not data:
                    log.info("sensor stdin: end of input after %d lines", self.lines)
                return data

            yield read
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _command_input(self) -> AsyncIterator[Read]:
        assert self.command is not None
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=READ_BYTES)
        except OSError as exc:
            raise CommandError(f"cannot start sensor command {shlex.join(self.command)}: "
                               f"{exc.strerror or exc}") from exc
        log.info("sensor command started (pid %d): %s", proc.pid, shlex.join(self.command))
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr
        errors = asyncio.create_task(self._log_stderr(stderr, proc.pid))
        finished = False
        try:
            yield lambda: stdout.read(READ_BYTES)
            finished = True
        finally:
            code = proc.returncode
            if not finished or code is None:
                code = await self._end(proc, graceful=finished)
            self.exit_code = code
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):  # not wait_for: see fedd/link.py
                    await errors
        log.log(logging.INFO if code == 0 else logging.ERROR,
                "sensor command %s ended with code %d after %d lines (%d samples, bad: %s)",
                self.name, code, self.lines, self.samples, self.bad_lines or "none")
        if code != 0:
            raise CommandFailed(self.command, code, list(self.stderr_tail))

    async def _end(self, proc: asyncio.subprocess.Process, *, graceful: bool) -> int:
        """Wait for the command to exit (after its output closed), or stop it."""
        if graceful:
            try:
                async with asyncio.timeout(EXIT_WAIT_S):
                    return await proc.wait()
            except TimeoutError:
                log.warning("sensor command %s closed its output but kept running; stopping it",
                            self.name)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(2.0):
                return await proc.wait()
        except TimeoutError:
            log.warning("sensor command %s ignored SIGTERM; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await proc.wait()

    async def _log_stderr(self, stream: asyncio.StreamReader, pid: int) -> None:
        splitter = LineSplitter(STDERR_LINE_BYTES)
        while True:
            data = await stream.read(READ_BYTES)
            for line in splitter.feed(data) if data else splitter.end():
                text = "(a line over the limit)" if line is None else \
                    line.decode("utf-8", "replace").rstrip()
                if text:
                    self.stderr_tail.append(text)
                    log.warning("sensor command %s[%d]: %s", self.name, pid, text)
            if not data:
                return
