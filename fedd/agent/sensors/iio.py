"""Linux Industrial I/O (IIO): the kernel interface of real accelerometers and gyroscopes.

A device is a sysfs directory, `/sys/bus/iio/devices/iio:deviceN` (see the
kernel's Documentation/ABI/testing/sysfs-bus-iio and iio/iio_devbuf.rst):

- `name`; per channel `in_<channel>_raw`, and its `_scale` and `_offset`,
  per channel (`in_accel_x_scale`) or shared by the type (`in_accel_scale`).
  A value in the ABI's unit is `(raw + offset) * scale`: m/s² for `accel`,
  rad/s for `anglvel`. HAPT, and so the shipped features, measure
  acceleration in g: this source divides `accel` channels by
  9.80665 m/s² per g. Other types keep the ABI's unit.
- `sampling_frequency` (or `in_<type>_sampling_frequency`) and its
  `_available` list (`"12.5 26 52 104"` or a range `"[min step max]"`).
- The buffer: `buffer/{enable,length}` (`buffer0/` since Linux 5.11) and
  `scan_elements/in_<channel>_{en,index,type}`; once enabled, fixed-size
  records are read from the character device `/dev/iio:deviceN`. Each
  enabled element sits in index order at an offset aligned to its own
  storage size, the record is padded to its largest element, and the type
  string `[be|le]:[s|u|f]bits/storagebits[Xrepeat][>>shift]` says how to
  decode it. The `in_timestamp` element (s64 nanoseconds) tells this source
  when samples were lost.

Buffered mode is the one to use: the kernel (or the sensor's own FIFO)
keeps the clock and the agent wakes about ten times a second. Polled mode
reads every `_raw` file once per sample from a thread: each read is a
syscall and on I²C/SPI sensors a bus transfer (0.1 to 1 ms each, six per
sample), its timing jitters by a millisecond or more, and it costs CPU at
every sample. Up to 50 or 100 Hz is realistic on a Raspberry Pi; the
shipped features want 50 Hz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedd.agent.sensors.source import (
    CHUNK_INTERVAL_S,
    Chunk,
    FdReader,
    SensorError,
    split_at_gaps,
)

log = logging.getLogger(__name__)

STANDARD_GRAVITY = 9.80665  # m/s² per g
DEVICES_DIR = "sys/bus/iio/devices"
DEFAULT_CHANNELS = ("accel_x", "accel_y", "accel_z", "anglvel_x", "anglvel_y", "anglvel_z")
BUFFER_SECONDS = 4.0  # default kernel buffer: this long a stall of the agent loses nothing
MAX_RECORDS_PER_READ = 4096

Mode = Literal["auto", "buffered", "polled"]

_TYPE_RE = re.compile(r"(be|le):([suf])(\d+)/(\d+)(?:X(\d+))?(?:>>(\d+))?")
_CHANNEL_RE = re.compile(r"(-?)(?:in_)?(([a-z]+)\d*(?:_[a-z0-9]+)*)")


class IioError(SensorError):
    """An IIO device cannot be used as configured; `path` is the file or folder at fault."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class IioDeviceNotFound(IioError):
    """No IIO device of the configured name or number."""


class IioChannelNotFound(IioError):
    """The device has no such channel; `available` lists the ones it has."""

    def __init__(self, message: str, path: Path | str | None = None,
                 available: Sequence[str] = ()) -> None:
        super().__init__(message, path)
        self.available = tuple(available)


class IioTypeError(IioError):
    """A scan element's type string cannot be parsed or is not supported."""


class IioBufferUnavailable(IioError):
    """Buffered reads were needed but the device's buffer cannot be used."""


# ------------------------------------------------------------------ scan elements


@dataclass(frozen=True)
class ScanType:
    """One scan element's storage, parsed from its `_type` string (e.g. `le:s12/16>>4`)."""

    big_endian: bool
    kind: Literal["s", "u", "f"]
    bits: int
    storage_bits: int
    repeat: int = 1
    shift: int = 0

    @classmethod
    def parse(cls, text: str, path: Path | str | None = None) -> ScanType:
        match = _TYPE_RE.fullmatch(text.strip())
        where = f" in {path}" if path is not None else ""
        if match is None:
            raise IioTypeError(f"cannot parse scan element type {text.strip()!r}{where}: expected "
                               "[be|le]:[s|u|f]bits/storagebits[Xrepeat][>>shift]", path)
        endian, kind, bits, storage, repeat, shift = match.groups()
        scan = cls(endian == "be", kind, int(bits), int(storage),  # type: ignore[arg-type]
                   max(1, int(repeat or 1)), int(shift or 0))
        if scan.storage_bits not in (8, 16, 32, 64):
            raise IioTypeError(f"scan element type {text.strip()!r}{where}: storage of "
                               f"{scan.storage_bits} bits is not 8, 16, 32 or 64", path)
        if scan.kind == "f" and (scan.bits != scan.storage_bits or scan.storage_bits == 8
                                 or scan.shift):
            raise IioTypeError(f"scan element type {text.strip()!r}{where}: a float must fill "
                               "16, 32 or 64 bits unshifted", path)
        if not 0 < scan.bits <= scan.storage_bits - scan.shift:
            raise IioTypeError(f"scan element type {text.strip()!r}{where}: {scan.bits} bits "
                               f"shifted by {scan.shift} do not fit in {scan.storage_bits}", path)
        return scan

    @property
    def size(self) -> int:
        """Bytes the element takes in a record, which is also its alignment."""
        return self.storage_bits // 8 * self.repeat

    def numpy_format(self) -> str:
        return f"{'>' if self.big_endian else '<'}{'f' if self.kind == 'f' else 'u'}" \
               f"{self.storage_bits // 8}"

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored words (as read with `numpy_format`) → values: int64, or float64 for `f`."""
        if self.kind == "f":
            return stored.astype(np.float64)
        words = stored.astype(np.uint64)
        if self.shift:
            words >>= np.uint64(self.shift)
        if self.bits < 64:
            words &= np.uint64((1 << self.bits) - 1)
        if self.kind == "u":
            return words.astype(np.int64)
        spare = 64 - self.bits  # sign-extend: sign bit up to bit 63, then an arithmetic shift
        return (words << np.uint64(spare)).view(np.int64) >> np.int64(spare)


@dataclass(frozen=True)
class ScanElement:
    name: str  # "accel_x", "timestamp"
    index: int
    type: ScanType


def record_dtype(elements: Sequence[ScanElement]) -> np.dtype:
    """The numpy layout of one buffer record holding `elements` (the enabled ones)."""
    names, formats, offsets = [], [], []
    offset = largest = 0
    for element in sorted(elements, key=lambda e: e.index):
        if element.type.repeat > 1:
            raise IioTypeError(f"scan element {element.name} repeats {element.type.repeat} "
                               "values per record, which this source does not read")
        size = element.type.size
        offset = -(-offset // size) * size
        names.append(element.name)
        formats.append(element.type.numpy_format())
        offsets.append(offset)
        offset += size
        largest = max(largest, size)
    if not names:
        raise IioBufferUnavailable("no scan element is enabled")
    itemsize = -(-offset // largest) * largest
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": itemsize})


# ------------------------------------------------------------------ sysfs


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise IioError(f"cannot read {path}: {exc.strerror or exc}", path) from exc


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise IioError(f"cannot write {value!r} to {path}: {exc.strerror or exc}", path) from exc


def _number(path: Path) -> float:
    text = _read(path)
    try:
        return float(text)
    except ValueError:
        raise IioError(f"{path} holds {text!r}, not a number", path) from None


def _format_hz(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def pick_frequency(available: str, want: float, *, at_least: bool) -> str:
    """The entry of a `*_available` list to write for a wanted rate.

    The nearest one (ties go up); with `at_least`, the lowest one not below
    `want` (a polled sensor must refresh at least as often as it is read),
    else the highest. A range `[min step max]` is rounded to its step.
    """
    text = available.strip()
    if text.startswith("["):
        try:
            low, step, high = (float(v) for v in text.strip("[]").split())
        except ValueError:
            raise ValueError(f"cannot parse the frequency range {text!r}") from None
        steps = (min(max(want, low), high) - low) / step if step > 0 else 0.0
        chosen = low + step * (math.ceil(steps - 1e-9) if at_least else math.floor(steps + 0.5))
        return _format_hz(min(chosen, high))
    try:
        choices = sorted({float(v): v for v in text.split()}.items())
    except ValueError:
        raise ValueError(f"cannot parse the frequency list {text!r}") from None
    if not choices:
        raise ValueError("the device lists no available frequency")
    if at_least:
        above = [token for value, token in choices if value >= want - 1e-9]
        return above[0] if above else choices[-1][1]
    return min(choices, key=lambda c: (abs(c[0] - want), -c[0]))[1]


@dataclass(frozen=True)
class IioChannel:
    """One selected channel and how its raw counts become a value in the feature unit."""

    name: str  # "accel_x"
    type: str  # "accel"
    offset: float
    scale: float  # ABI unit per count
    unit: float  # divisor from the ABI unit to the feature unit (g for accel)
    sign: float  # -1.0 for a channel configured as "-accel_y"

    def values(self, raw: np.ndarray | float) -> np.ndarray | float:
        return (raw + self.offset) * self.scale / self.unit * self.sign


def find_device(root: Path, device: str) -> Path:
    """`iio:deviceN` as such, anything else by the device's `name`."""
    base = root / DEVICES_DIR
    found = sorted(base.glob("iio:device*")) if base.is_dir() else []
    if re.fullmatch(r"iio:device\d+", device):
        if (base / device).is_dir():
            return base / device
        matches = []
    else:
        matches = [path for path in found
                   if (path / "name").is_file() and _read(path / "name") == device]
        if len(matches) == 1:
            return matches[0]
    listing = ", ".join(
        f"{path.name} ({_read(path / 'name') if (path / 'name').is_file() else '?'})"
        for path in found) or "none"
    if len(matches) > 1:
        raise IioDeviceNotFound(f"several IIO devices are named {device!r}: "
                                f"{', '.join(p.name for p in matches)}; configure one by number",
                                base)
    raise IioDeviceNotFound(f"no IIO device {device!r} under {base} (found: {listing})", base)


# ------------------------------------------------------------------ the source


class IioSource:
    """Samples from a Linux IIO device, buffered when it can be, else polled.

    `channels` are channel names without `in_` (`accel_x`, `anglvel_z`),
    in the order the features expect; a leading `-` flips the sign (for a
    board mounted the other way round). `rate_hz` is the wanted rate: the
    device is set to the nearest frequency it offers (the lowest one not
    below it when polled) and `self.rate_hz` is what it runs at. A gap is
    flagged when consecutive samples are more than `gap_tolerance` periods
    apart (buffered: by the kernel's timestamps; polled: a late poll).
    """

    def __init__(self, *, device: str = "iio:device0", root: str | os.PathLike[str] = "/",
                 channels: Sequence[str] = DEFAULT_CHANNELS, rate_hz: float = 50.0,
                 mode: Mode = "auto", buffer_length: int | None = None,
                 trigger: str | None = None, timestamps: bool = True,
                 gap_tolerance: float = 2.0) -> None:
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        if mode not in ("auto", "buffered", "polled"):
            raise ValueError(f"mode must be auto, buffered or polled, got {mode!r}")
        if not gap_tolerance > 1:
            raise ValueError(f"gap_tolerance is in sample periods and must exceed 1, "
                             f"got {gap_tolerance}")
        if buffer_length is not None and buffer_length < 2:
            raise ValueError(f"buffer_length must be at least 2 records, got {buffer_length}")
        if not channels:
            raise ValueError("channels must name at least one channel")
        self.root = Path(root)
        self.path = find_device(self.root, device)
        self.name = _read(self.path / "name") if (self.path / "name").is_file() else self.path.name
        self.char_device = self.root / "dev" / self.path.name
        self.timestamps = timestamps
        self.gap_tolerance = gap_tolerance
        self._trigger = trigger
        self._buffer_dir, self._scan_dir = self._buffer_dirs()
        self.channels = self._channels(channels)
        self.requested_mode = mode
        self.mode: Literal["buffered", "polled"] = self._pick_mode(mode)
        if self.mode == "buffered":
            try:
                self._stop_stale_buffer()  # a running buffer refuses a new sampling frequency
            except IioError as exc:
                log.warning("IIO %s: %s", self.path.name, exc)
        self.rate_hz = self._set_rate(float(rate_hz))
        self.buffer_length = buffer_length or max(64, math.ceil(self.rate_hz * BUFFER_SECONDS))
        self.gaps_detected = 0  # gaps after the stream's start: lost samples, late polls
        self._types: dict[str, ScanType] = {}  # enabled scan elements, once the buffer runs
        log.info("IIO %s (%s): %s, %s at %s Hz", self.path.name, self.name, self.mode,
                 ", ".join(c.name for c in self.channels), _format_hz(self.rate_hz))

    def holdout(self) -> None:
        return None

    # setup

    def _buffer_dirs(self) -> tuple[Path | None, Path | None]:
        """(buffer folder, scan elements folder): legacy names first, `buffer0/` else."""
        for buffer_dir, scan_dir in ((self.path / "buffer", self.path / "scan_elements"),
                                     (self.path / "buffer0", self.path / "buffer0")):
            if (buffer_dir / "enable").is_file() and (buffer_dir / "length").is_file() \
                    and scan_dir.is_dir():
                return buffer_dir, scan_dir
        return None, None

    def _attribute(self, channel: str, kind: str, attribute: str) -> Path | None:
        for name in (f"in_{channel}_{attribute}", f"in_{kind}_{attribute}"):
            if (self.path / name).is_file():
                return self.path / name
        return None

    def _channels(self, names: Sequence[str]) -> tuple[IioChannel, ...]:
        out: list[IioChannel] = []
        for spec in names:
            match = _CHANNEL_RE.fullmatch(spec.strip())
            if match is None:
                raise ValueError(f"channel {spec!r} is not an IIO channel name such as accel_x")
            sign, name, kind = match.groups()
            if name in (c.name for c in out):
                raise ValueError(f"channel {name} is configured twice")
            in_sysfs = (self.path / f"in_{name}_raw").is_file()
            in_buffer = self._scan_dir is not None and all(
                (self._scan_dir / f"in_{name}_{part}").is_file()
                for part in ("en", "index", "type"))
            if not (in_sysfs or in_buffer):
                available = sorted(({p.name[3:-4] for p in self.path.glob("in_*_raw")}
                                    | ({p.name[3:-3] for p in self._scan_dir.glob("in_*_en")}
                                       if self._scan_dir is not None else set()))
                                   - {"timestamp"})
                raise IioChannelNotFound(
                    f"IIO device {self.path.name} ({self.name}) has no channel {name} "
                    f"(it has: {', '.join(available) or 'none'})", self.path, available)
            scale_path = self._attribute(name, kind, "scale")
            offset_path = self._attribute(name, kind, "offset")
            if scale_path is None:
                log.warning("IIO %s: no scale for %s, taking raw counts as %s", self.path.name,
                            name, "m/s²" if kind == "accel" else "the ABI unit")
            out.append(IioChannel(
                name=name, type=kind,
                offset=_number(offset_path) if offset_path else 0.0,
                scale=_number(scale_path) if scale_path else 1.0,
                unit=STANDARD_GRAVITY if kind == "accel" else 1.0,
                sign=-1.0 if sign else 1.0))
        return tuple(out)

    def _pick_mode(self, mode: Mode) -> Literal["buffered", "polled"]:
        problem = self._buffer_problem()
        if mode == "buffered" and problem:
            raise IioBufferUnavailable(f"IIO {self.path.name}: buffered mode impossible: "
                                       f"{problem}", self.path)
        if mode == "polled" or (mode == "auto" and problem):
            if problem and mode == "auto":
                log.info("IIO %s: polling sysfs (%s)", self.path.name, problem)
            missing = [c.name for c in self.channels
                       if not (self.path / f"in_{c.name}_raw").is_file()]
            if missing:
                raise IioChannelNotFound(f"IIO device {self.path.name} has no in_*_raw file for "
                                         f"{', '.join(missing)}, so it cannot be polled",
                                         self.path)
            return "polled"
        return "buffered"

    def _buffer_problem(self) -> str | None:
        """Why buffered reads cannot work, or None."""
        if self._buffer_dir is None or self._scan_dir is None:
            return "the device has no buffer"
        if not self.char_device.exists():
            return f"{self.char_device} does not exist"
        missing = [c.name for c in self.channels
                   if not (self._scan_dir / f"in_{c.name}_en").is_file()]
        if missing:
            return f"no scan element for {', '.join(missing)}"
        for channel in self.channels:  # a bad type string is an error, not a reason to poll
            scan = ScanType.parse(_read(self._scan_dir / f"in_{channel.name}_type"),
                                  self._scan_dir / f"in_{channel.name}_type")
            if scan.repeat > 1:
                raise IioTypeError(f"scan element {channel.name} repeats values "
                                   f"({scan.repeat}), which this source does not read")
        return None

    def _set_rate(self, want: float) -> float:
        """Set the device (or its trigger) to the rate nearest `want`; return the rate in use."""
        files = []
        if self._trigger is not None and self.mode == "buffered":
            trigger_dir = self._find_trigger(self._trigger)
            if (trigger_dir / "sampling_frequency").is_file():
                files.append(trigger_dir / "sampling_frequency")
        files += [path for path in [self.path / "sampling_frequency",
                                    *(self.path / f"in_{kind}_sampling_frequency"
                                      for kind in dict.fromkeys(c.type for c in self.channels))]
                  if path.is_file()]
        if not files:
            log.warning("IIO %s exposes no sampling frequency; assuming %s Hz", self.path.name,
                        _format_hz(want))
            return want
        for path in files:
            available = path.with_name(path.name + "_available")
            try:
                value = pick_frequency(_read(available), want, at_least=self.mode == "polled") \
                    if available.is_file() else _format_hz(want)
            except ValueError as exc:
                log.warning("IIO %s: %s: %s", self.path.name, available, exc)
                value = _format_hz(want)
            try:
                if _number(path) != float(value):
                    _write(path, value)
            except IioError as exc:
                log.warning("IIO %s: could not set the sampling frequency: %s", self.path.name, exc)
        device_rate = _number(files[0])
        if self.mode == "polled":  # the poller's clock is the rate; the device only refreshes
            if device_rate < want:
                log.warning("IIO %s refreshes at %s Hz, below the %s Hz it is polled at: "
                            "samples will repeat", self.path.name, _format_hz(device_rate),
                            _format_hz(want))
            return want
        if abs(device_rate - want) > 0.01 * want:
            log.warning("IIO %s samples at %s Hz (asked %s Hz); features use the device's rate",
                        self.path.name, _format_hz(device_rate), _format_hz(want))
        if not device_rate > 0:
            raise IioError(f"{files[0]} says the device samples at {device_rate} Hz", files[0])
        return device_rate

    def _find_trigger(self, name: str) -> Path:
        base = self.root / DEVICES_DIR
        for path in sorted(base.glob("trigger*")):
            if (path / "name").is_file() and _read(path / "name") == name:
                return path
        raise IioDeviceNotFound(f"no IIO trigger named {name!r} under {base}", base)

    # streaming

    async def chunks(self, start_at: int = 0) -> AsyncIterator[Chunk]:
        """Live samples; the cursor keeps counting from `start_at` (a live stream never rewinds)."""
        if self.mode == "buffered":
            try:
                fd, layout = self._open_buffer()
            except IioBufferUnavailable as exc:
                if self.requested_mode == "buffered" or not all(
                        (self.path / f"in_{c.name}_raw").is_file() for c in self.channels):
                    raise
                log.warning("IIO %s: %s; polling sysfs instead", self.path.name, exc)
                self.mode = "polled"
            else:
                try:
                    async for chunk in self._read_buffer(fd, layout, start_at):
                        yield chunk
                finally:
                    self._close_buffer(fd)
                return
        async for chunk in self._poll(start_at):
            yield chunk

    def _open_buffer(self) -> tuple[int, np.dtype]:
        """Open the character device, select the scan elements, size and enable the buffer.

        Returns the descriptor and the record layout. Anything sysfs refuses
        (a read-only /sys, a driver that wants a trigger) is an
        `IioBufferUnavailable`, which `auto` mode answers by polling.
        """
        assert self._buffer_dir is not None and self._scan_dir is not None
        try:
            fd = os.open(self.char_device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise IioBufferUnavailable(f"cannot open {self.char_device}: "
                                       f"{exc.strerror or exc}", self.char_device) from exc
        try:
            enable = self._buffer_dir / "enable"
            try:
                self._stop_stale_buffer()
                wanted = {f"in_{c.name}_en" for c in self.channels}
                if self.timestamps and (self._scan_dir / "in_timestamp_en").is_file():
                    wanted.add("in_timestamp_en")
                for path in sorted(self._scan_dir.glob("in_*_en")):
                    state = "1" if path.name in wanted else "0"
                    if _read(path) != state:
                        _write(path, state)
                if self._trigger is not None:
                    _write(self.path / "trigger" / "current_trigger", self._trigger)
                if (self.path / "current_timestamp_clock").is_file():
                    with contextlib.suppress(IioError):  # monotonic: a clock step is no fake gap
                        _write(self.path / "current_timestamp_clock", "monotonic")
                _write(self._buffer_dir / "length", str(self.buffer_length))
            except IioError as exc:
                raise IioBufferUnavailable(str(exc), exc.path) from exc
            layout = self._read_layout()
            try:
                _write(enable, "1")
            except IioError as exc:
                hint = "" if self._trigger else " (does the device need a trigger?)"
                raise IioBufferUnavailable(f"{exc}{hint}", enable) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd, layout

    def _stop_stale_buffer(self) -> None:
        """Disable a buffer left enabled (by a run of ours that died): it locks the settings."""
        assert self._buffer_dir is not None
        enable = self._buffer_dir / "enable"
        if _read(enable) != "0":
            log.warning("IIO %s: its buffer was left enabled; disabling it", self.path.name)
            _write(enable, "0")

    def _read_layout(self) -> np.dtype:
        """Record layout from the scan elements the kernel reports enabled."""
        assert self._scan_dir is not None
        elements = []
        for path in sorted(self._scan_dir.glob("in_*_en")):
            if _read(path) != "1":
                continue
            name = path.name[3:-3]
            index_path = self._scan_dir / f"in_{name}_index"
            try:
                index = int(_read(index_path))
            except ValueError:
                raise IioError(f"{index_path} is not an integer", index_path) from None
            type_path = self._scan_dir / f"in_{name}_type"
            elements.append(ScanElement(name, index, ScanType.parse(_read(type_path), type_path)))
        self._types = {e.name: e.type for e in elements}
        if self.timestamps and "timestamp" not in self._types:
            log.info("IIO %s has no timestamp channel: samples lost in its buffer go unnoticed",
                     self.path.name)
        return record_dtype(elements)

    def _close_buffer(self, fd: int) -> None:
        assert self._buffer_dir is not None
        try:
            _write(self._buffer_dir / "enable", "0")
        except IioError as exc:
            log.warning("IIO %s: %s", self.path.name, exc)
        finally:
            os.close(fd)

    def decode(self, records: np.ndarray) -> np.ndarray:
        """Buffer records → (n, channels) float64 values in the feature units."""
        return np.stack([c.values(self._types[c.name].decode(records[c.name]).astype(np.float64))
                         for c in self.channels], axis=1)

    async def _read_buffer(self, fd: int, layout: np.dtype, cursor: int) -> AsyncIterator[Chunk]:
        record = layout.itemsize
        size = record * max(1, min(MAX_RECORDS_PER_READ, self.buffer_length))
        reader = FdReader(fd)
        pending = bytearray()
        last_ts: int | None = None
        first = True
        max_gap_ns = self.gap_tolerance * 1e9 / self.rate_hz
        while True:
            try:
                data = await reader.read(size)
            except OSError as exc:  # ENODEV: the device went away
                raise IioError(f"reading {self.char_device} failed: {exc.strerror or exc}",
                               self.char_device) from exc
            pending += data
            count = len(pending) // record
            if count:
                records = np.frombuffer(bytes(pending[: count * record]), layout)
                del pending[: count * record]
                gaps = np.zeros(count, bool)
                gaps[0] = first
                first = False
                if "timestamp" in self._types:
                    ts = self._types["timestamp"].decode(records["timestamp"])
                    dt = np.diff(ts, prepend=ts[0] if last_ts is None else last_ts)
                    lost = (dt > max_gap_ns) | (dt < 0)
                    self.gaps_detected += int(lost.sum())
                    gaps |= lost
                    last_ts = int(ts[-1])
                for chunk in split_at_gaps(self.decode(records), np.full(count, -1, np.int16),
                                           gaps, cursor):
                    cursor = chunk.cursor
                    yield chunk
            if not data:
                if pending:
                    log.warning("IIO %s: %d bytes of a partial record at end of stream dropped",
                                self.path.name, len(pending))
                log.info("IIO %s: end of stream", self.path.name)
                return
            if len(data) < size:  # drained: let the kernel gather ~CHUNK_INTERVAL_S of samples
                await asyncio.sleep(CHUNK_INTERVAL_S)

    def read_raw(self, fds: Sequence[int]) -> list[int]:
        """One polled sample: the raw counts of every channel (`fds` open on the `_raw` files)."""
        out = []
        for fd, channel in zip(fds, self.channels, strict=True):
            try:
                text = os.pread(fd, 64, 0)
            except OSError as exc:  # EBUSY while someone else runs the buffer, ENODEV when gone
                raise IioError(f"reading in_{channel.name}_raw of {self.path.name} failed: "
                               f"{exc.strerror or exc}", self.path / f"in_{channel.name}_raw"
                               ) from exc
            try:
                out.append(int(text))
            except ValueError:
                raise IioError(f"in_{channel.name}_raw of {self.path.name} holds {text!r}",
                               self.path / f"in_{channel.name}_raw") from None
        return out

    async def _poll(self, cursor: int) -> AsyncIterator[Chunk]:
        fds = [os.open(self.path / f"in_{c.name}_raw", os.O_RDONLY | os.O_CLOEXEC)
               for c in self.channels]
        poller = _Poller(self, fds)
        poller.start()
        try:
            while True:
                await asyncio.sleep(CHUNK_INTERVAL_S)
                raw, gaps, error = poller.take()
                if len(raw):
                    values = np.stack([c.values(raw[:, i]) for i, c in enumerate(self.channels)],
                                      axis=1)
                    for chunk in split_at_gaps(values, np.full(len(raw), -1, np.int16), gaps,
                                               cursor):
                        cursor = chunk.cursor
                        yield chunk
                if error is not None:
                    raise error
        finally:
            poller.stop()
            for fd in fds:
                os.close(fd)


class _Poller:
    """Reads every `_raw` file once per period in its own thread.

    A thread, not asyncio sleeps: the agent's loop also commits SQLite
    transactions and computes features, and an SD card's fsync alone can
    stall it for tens of milliseconds. A read later than `gap_tolerance`
    periods after the previous one marks a gap, and the schedule restarts
    from there instead of bursting to catch up.
    """

    def __init__(self, source: IioSource, fds: Sequence[int]) -> None:
        self.source, self.fds = source, fds
        self.period = 1.0 / source.rate_hz
        self._lock = threading.Lock()
        self._rows: list[list[int]] = []
        self._gaps: list[bool] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fedd-iio-{source.path.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def take(self) -> tuple[np.ndarray, np.ndarray, BaseException | None]:
        with self._lock:
            rows, gaps, error = self._rows, self._gaps, self._error
            self._rows, self._gaps = [], []
        raw = np.array(rows, np.float64).reshape(len(rows), len(self.fds))
        return raw, np.array(gaps, bool), error

    def _run(self) -> None:
        tolerance = self.source.gap_tolerance * self.period
        due = time.monotonic()
        last: float | None = None
        try:
            while not self._stop.is_set():
                wait = due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                now = time.monotonic()
                row = self.source.read_raw(self.fds)
                gap = last is None or now - last > tolerance
                if gap and last is not None:
                    self.source.gaps_detected += 1
                if now - due > tolerance - self.period:  # too late: resynchronize, do not burst
                    due = now
                due += self.period
                last = now
                with self._lock:
                    self._rows.append(row)
                    self._gaps.append(gap)
        except BaseException as exc:  # handed to the async side, which raises it
            with self._lock:
                self._error = exc
