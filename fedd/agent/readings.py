"""The device's condition, read from the kernel: heat, power, load and memory.

Everything comes from the kernel's own files under a configurable ``root``
(``/`` on a device; a directory tree with the kernel's layout in tests):

- heat: ``/sys/class/thermal/thermal_zone*/{type,temp}`` (m°C) and hwmon
  ``temp*_input`` (m°C, named by the chip's ``name`` and ``temp*_label``);
- power rails: hwmon ``power*_input`` / ``power*_average`` (µW),
  ``energy*_input`` (µJ counters, turned into watts between two reads), and
  INA3221 channels (Jetson), which give only bus voltage ``in*_input`` (mV)
  and current ``curr*_input`` (mA): power = V * I;
- power supplies: ``/sys/class/power_supply/*/{type,online,capacity,status,scope}``;
- Raspberry Pi firmware flags: ``.../soc:firmware/get_throttled``;
- CPU load and memory: ``/proc/stat``, ``/proc/self/stat``, ``/proc/loadavg``,
  ``/proc/meminfo``.

CPU and memory are read from ``/proc`` under the root rather than through
psutil, so that the tests drive every branch from the same fake tree as the
rest, and so that the load window is this reader's own: ``psutil.cpu_percent``
keeps one module-wide "previous sample" that every caller in the process
resets.

Every reader tolerates missing or unreadable files (the value is None and
``Readings.sources`` says why) and never blocks: files are opened
``O_NONBLOCK`` and read only when they are regular files (as sysfs and procfs
attributes are), so a FIFO or a device node in the tree is skipped, not
waited on. A sysfs read is still a driver call (an I2C sensor takes a few
ms); nothing here sleeps or waits for an interval.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "THROTTLE_BITS",
    "PowerRail",
    "PowerSupply",
    "Readings",
    "ReadingsReader",
    "Temperature",
    "Throttling",
]

MAX_ATTR_BYTES = 65536  # sysfs attributes are at most a page; /proc/meminfo is ~1.5 KiB
PLAUSIBLE_C = (-50.0, 200.0)  # outside this a "temperature" is a sensor that is not there
CPU_HISTORY = 256
MIN_CPU_SPAN_S = 1.0  # below this a load from 10 ms ticks is noise

# Raspberry Pi firmware get_throttled bits: 0-3 hold now, 16-19 happened since boot.
THROTTLE_BITS = {
    0: "under-voltage",
    1: "ARM frequency capped",
    2: "throttled",
    3: "soft temperature limit",
}
_SINCE_BOOT_SHIFT = 16

# A rail that measures the whole board's input: VDD_IN, POM_5V_IN, VIN_SYS_5V0, IN.
_INPUT_RAIL = re.compile(r"(^|_)(VDD_)?IN($|_)|^VIN", re.IGNORECASE)
_NOT_CONNECTED = {"NC", "NA", "N/A"}


# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class Temperature:
    """One temperature sensor: a thermal zone (by its ``type``) or an hwmon input."""

    name: str
    celsius: float
    kind: Literal["thermal_zone", "hwmon"]
    source: str

    def matches(self, wanted: str) -> bool:
        """True if ``wanted`` names this sensor: its full name, hwmon chip or label."""
        return wanted in (self.name, *self.name.split("/", 1))


@dataclass(frozen=True)
class PowerSupply:
    """One entry of ``/sys/class/power_supply``."""

    name: str
    type: str  # Battery, Mains, USB, UPS, Wireless, ...
    online: bool | None
    capacity: float | None  # percent, batteries only
    status: str | None  # Charging, Discharging, Full, Not charging, Unknown
    scope: str | None  # "Device" marks a peripheral's battery (a mouse), not the system's
    source: str

    @property
    def is_system_battery(self) -> bool:
        return self.type == "Battery" and self.scope != "Device"


@dataclass(frozen=True)
class PowerRail:
    """A measured power, in watts, and how it was measured."""

    name: str
    watts: float
    method: Literal["power", "V*I", "energy"]
    source: str

    @property
    def is_board_input(self) -> bool:
        return bool(_INPUT_RAIL.search(self.name.rsplit("/", 1)[-1]))


@dataclass(frozen=True)
class Throttling:
    """Raspberry Pi firmware throttling flags (``vcgencmd get_throttled``)."""

    raw: int
    source: str

    @property
    def now(self) -> tuple[str, ...]:
        """Conditions active right now: under-voltage, frequency capped, ..."""
        return tuple(name for bit, name in THROTTLE_BITS.items() if self.raw >> bit & 1)

    @property
    def since_boot(self) -> tuple[str, ...]:
        """Conditions that occurred at some time since boot."""
        return tuple(
            name for bit, name in THROTTLE_BITS.items() if self.raw >> (bit + _SINCE_BOOT_SHIFT) & 1
        )

    @property
    def under_voltage(self) -> bool:
        return bool(self.raw & 1)


@dataclass(frozen=True, kw_only=True)
class Readings:
    """A snapshot of the device's condition. None means "not known here".

    ``sources`` maps each group (temperature, power_supply, power, throttling,
    cpu, memory, load) to where its values came from, or why they are missing.
    """

    time: float  # wall clock, s since the epoch
    monotonic: float  # time.monotonic() of the same instant (for integrating power)
    temperatures: tuple[Temperature, ...] = ()
    supplies: tuple[PowerSupply, ...] = ()
    on_battery: bool | None = None
    battery_percent: float | None = None
    rails: tuple[PowerRail, ...] = ()
    throttling: Throttling | None = None
    cpu_percent: float | None = None  # whole system, % of all cores, over cpu_window_s
    own_cpu_percent: float | None = None  # this process's part of cpu_percent
    cpu_window_s: float | None = None
    load_1m: float | None = None
    memory_available_mib: float | None = None
    memory_total_mib: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def other_cpu_percent(self) -> float | None:
        """CPU used by everything but this process: the device's own work."""
        if self.cpu_percent is None:
            return None
        return max(0.0, self.cpu_percent - (self.own_cpu_percent or 0.0))

    def hottest(self, names: Collection[str] = ()) -> Temperature | None:
        """The hottest watched sensor.

        With no ``names``: the thermal zones, or the hwmon sensors if the
        board has no thermal zone. Otherwise the sensors ``names`` matches
        (zone type, hwmon chip name, label or ``chip/label``).
        """
        if names:
            watched = [t for t in self.temperatures if any(t.matches(n) for n in names)]
        else:
            zones = [t for t in self.temperatures if t.kind == "thermal_zone"]
            watched = zones or list(self.temperatures)
        return max(watched, key=lambda t: t.celsius, default=None)

    def power(self, rail: str | None = None) -> PowerRail | None:
        """The board's power draw: the named rail, else the board-input rail,
        else the only rail, else the sum of all rails (which may count a
        nested rail twice; name the rail in the config if so)."""
        rails = self.rails
        if rail is not None:
            return next((r for r in rails if rail in (r.name, r.name.rsplit("/", 1)[-1])), None)
        if not rails:
            return None
        inputs = [r for r in rails if r.is_board_input]
        if inputs:
            return inputs[0]
        if len(rails) == 1:
            return rails[0]
        return PowerRail(
            name=f"sum of {len(rails)} rails",
            watts=sum(r.watts for r in rails),
            method=rails[0].method if len({r.method for r in rails}) == 1 else "power",
            source=", ".join(r.name for r in rails),
        )

    def as_dict(self) -> dict[str, Any]:
        """A compact JSON-able view for the heartbeat and ``fedd status``."""
        return {
            "time": self.time,
            "temperatures_c": {t.name: round(t.celsius, 1) for t in self.temperatures},
            "on_battery": self.on_battery,
            "battery_percent": self.battery_percent,
            "power_w": {r.name: round(r.watts, 3) for r in self.rails},
            "throttled_now": None if self.throttling is None else list(self.throttling.now),
            "throttled_since_boot": (
                None if self.throttling is None else list(self.throttling.since_boot)
            ),
            "cpu_percent": _round(self.cpu_percent, 1),
            "own_cpu_percent": _round(self.own_cpu_percent, 1),
            "cpu_window_s": _round(self.cpu_window_s, 1),
            "load_1m": self.load_1m,
            "memory_available_mib": _round(self.memory_available_mib, 1),
            "memory_total_mib": _round(self.memory_total_mib, 1),
            "sources": dict(self.sources),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------ files


def _read(path: Path, problems: list[str] | None = None) -> str | None:
    """A small text file's content, stripped; None if absent or unreadable.

    Opens with O_NONBLOCK and reads only regular files, so nothing can make
    this wait. A missing file is normal (optional attributes); any other
    failure is noted in ``problems``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR) and problems is not None:
            problems.append(f"{path}: {e.strerror}")
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            if problems is not None:
                problems.append(f"{path}: not a regular file")
            return None
        return os.read(fd, MAX_ATTR_BYTES).decode("ascii", "replace").strip()
    except OSError as e:  # sysfs: EIO, ENODATA, EINVAL, EAGAIN from a sensor that is off
        if problems is not None:
            problems.append(f"{path}: {e.strerror}")
        return None
    finally:
        os.close(fd)


def _number(path: Path, problems: list[str]) -> float | None:
    text = _read(path, problems)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{path}: not a number ({text[:20]!r})")
        return None
    if not math.isfinite(value):
        problems.append(f"{path}: not a finite number ({text[:20]!r})")
        return None
    return value


def _numbered(directory: Path, pattern: str) -> Iterator[tuple[int, Path]]:
    """Entries matching ``prefix*suffix`` with a number at the star, in numeric order."""
    prefix, suffix = pattern.split("*")
    regex = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    try:
        names = os.listdir(directory)
    except OSError:
        return iter(())
    found = [(int(m.group(1)), directory / n) for n in names if (m := regex.match(n))]
    return iter(sorted(found))


def _problems_note(problems: list[str]) -> str:
    if not problems:
        return ""
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; unreadable: " + ", ".join(problems[:3]) + more


# ------------------------------------------------------------------ reader


@dataclass(frozen=True)
class _CpuSample:
    monotonic: float
    total: int
    idle: int
    own: int | None


class ReadingsReader:
    """Reads :class:`Readings` from a root; keeps the samples that CPU load and
    energy counters need (a load is a difference between two reads).

    ``cpu_window_s``: the load is averaged from the newest earlier sample that
    is at least this old (or the oldest one there is, if that is at least
    ``MIN_CPU_SPAN_S`` old; else the load is unknown). The reader takes a first
    sample when it is made, so the first ``read()`` a second later has a load.
    ``cpu_window_s`` may be changed on a live reader (config reload).
    Thread-safe: the agent may read from its loop and its worker.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        cpu_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not cpu_window_s > 0:
            raise ValueError(f"cpu_window_s must be > 0, got {cpu_window_s}")
        self.root = Path(root)
        self.cpu_window_s = cpu_window_s
        self.clock = clock
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._cpu: deque[_CpuSample] = deque(maxlen=CPU_HISTORY)
        self._energy: dict[Path, tuple[float, float]] = {}  # counter → (monotonic, µJ)
        with self._lock:
            if (first := self._cpu_sample(self.clock())) is not None:
                self._cpu.append(first)

    def _path(self, relative: str) -> Path:
        return self.root / relative

    def read(self) -> Readings:
        with self._lock:
            mono, wall = self.clock(), self.wall_clock()
            sources: dict[str, str] = {}
            temperatures = self._temperatures(sources)
            supplies, on_battery, battery = self._supplies(sources)
            rails = self._rails(mono, sources)
            throttling = self._throttling(sources)
            cpu, own, window = self._cpu_load(mono, sources)
            load_1m = self._load(sources)
            available, total = self._memory(sources)
        return Readings(
            time=wall,
            monotonic=mono,
            temperatures=temperatures,
            supplies=supplies,
            on_battery=on_battery,
            battery_percent=battery,
            rails=rails,
            throttling=throttling,
            cpu_percent=cpu,
            own_cpu_percent=own,
            cpu_window_s=window,
            load_1m=load_1m,
            memory_available_mib=available,
            memory_total_mib=total,
            sources=sources,
        )

    # heat

    def _temperatures(self, sources: dict[str, str]) -> tuple[Temperature, ...]:
        problems: list[str] = []
        found: list[Temperature] = []
        thermal = self._path("sys/class/thermal")
        for _, zone in _numbered(thermal, "thermal_zone*"):
            milli = _number(zone / "temp", problems)
            if milli is None:
                continue
            name = _read(zone / "type", problems) or zone.name
            self._add_temperature(found, problems, name, milli, "thermal_zone", zone / "temp")
        zones = len(found)
        for chip_name, chip in self._hwmon_chips(problems):
            for n, path in _numbered(chip, "temp*_input"):
                milli = _number(path, problems)
                if milli is None:
                    continue
                label = _read(chip / f"temp{n}_label") or f"temp{n}"
                self._add_temperature(found, problems, f"{chip_name}/{label}", milli, "hwmon",
                                      path)
        if found:
            where = f"{zones} thermal zone(s) in {thermal}, {len(found) - zones} hwmon sensor(s)"
        else:
            where = f"no thermal zone in {thermal} and no hwmon temp*_input"
        sources["temperature"] = where + _problems_note(problems)
        return tuple(found)

    @staticmethod
    def _add_temperature(found: list[Temperature], problems: list[str], name: str, milli: float,
                         kind: Literal["thermal_zone", "hwmon"], path: Path) -> None:
        celsius = milli / 1000.0
        low, high = PLAUSIBLE_C
        if low <= celsius <= high:
            found.append(Temperature(name, celsius, kind, str(path)))
        else:
            problems.append(f"{path}: implausible {celsius:g} °C ignored")

    def _hwmon_chips(self, problems: list[str]) -> Iterator[tuple[str, Path]]:
        """(name, attribute directory) of each hwmon chip; old drivers keep them in device/."""
        for _, hwmon in _numbered(self._path("sys/class/hwmon"), "hwmon*"):
            for attrs in (hwmon, hwmon / "device"):
                name = _read(attrs / "name", problems)
                if name is not None:
                    yield name, attrs
                    break

    # power supplies

    def _supplies(
        self, sources: dict[str, str]
    ) -> tuple[tuple[PowerSupply, ...], bool | None, float | None]:
        problems: list[str] = []
        base = self._path("sys/class/power_supply")
        supplies = []
        try:
            names = sorted(os.listdir(base))
        except OSError:
            names = []
        for name in names:
            d = base / name
            kind = _read(d / "type", problems)
            if kind is None:
                continue
            online = _number(d / "online", problems)
            supplies.append(PowerSupply(
                name=name, type=kind, online=None if online is None else online > 0,
                capacity=self._capacity(d, problems) if kind == "Battery" else None,
                status=_read(d / "status", problems), scope=_read(d / "scope", problems),
                source=str(d)))
        on_battery, why = _power_state(supplies)
        percents = [s.capacity for s in supplies if s.is_system_battery and s.capacity is not None]
        battery = min(percents) if percents else None
        sources["power_supply"] = f"{why} ({base})" + _problems_note(problems)
        return tuple(supplies), on_battery, battery

    @staticmethod
    def _capacity(d: Path, problems: list[str]) -> float | None:
        capacity = _number(d / "capacity", problems)
        if capacity is not None:
            return max(0.0, min(100.0, capacity))
        for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            a, b = _number(d / now, problems), _number(d / full, problems)
            if a is not None and b:
                return max(0.0, min(100.0, 100.0 * a / b))
        return None

    # power rails

    def _rails(self, mono: float, sources: dict[str, str]) -> tuple[PowerRail, ...]:
        problems: list[str] = []
        rails: list[PowerRail] = []
        seen_counters = set()
        for chip_name, chip in self._hwmon_chips(problems):
            powered = set()
            for pattern in ("power*_input", "power*_average"):
                for n, path in _numbered(chip, pattern):
                    if n in powered:
                        continue
                    micro = _number(path, problems)
                    if micro is not None:
                        powered.add(n)
                        name = f"{chip_name}/{_read(chip / f'power{n}_label') or f'power{n}'}"
                        rails.append(PowerRail(name, micro / 1e6, "power", str(path)))
            for n, path in _numbered(chip, "energy*_input"):
                micro_j = _number(path, problems)
                if micro_j is None:
                    continue
                seen_counters.add(path)
                previous = self._energy.get(path)
                self._energy[path] = (mono, micro_j)
                if previous is not None and mono > previous[0] and micro_j >= previous[1]:
                    watts = (micro_j - previous[1]) / 1e6 / (mono - previous[0])
                    name = f"{chip_name}/{_read(chip / f'energy{n}_label') or f'energy{n}'}"
                    rails.append(PowerRail(name, watts, "energy", str(path)))
            if chip_name.startswith("ina3221"):
                rails.extend(self._ina3221(chip_name, chip, problems))
        for stale in set(self._energy) - seen_counters:
            del self._energy[stale]
        if rails:
            where = ", ".join(f"{r.name} ({r.method})" for r in rails)
        else:
            where = f"no hwmon power, energy or INA3221 input in {self._path('sys/class/hwmon')}"
        sources["power"] = where + _problems_note(problems)
        return tuple(rails)

    @staticmethod
    def _ina3221(chip_name: str, chip: Path, problems: list[str]) -> Iterator[PowerRail]:
        """INA3221 channels 1-3: bus voltage (mV) * current (mA). Higher numbers are
        shunt voltages and a summed current, which must not be paired."""
        for n in (1, 2, 3):
            label = _read(chip / f"in{n}_label")
            if label is not None and label.upper() in _NOT_CONNECTED:
                continue
            if _read(chip / f"in{n}_enable") == "0":
                continue
            millivolts = _number(chip / f"in{n}_input", problems)
            milliamps = _number(chip / f"curr{n}_input", problems)
            if millivolts is None or milliamps is None:
                continue
            yield PowerRail(f"{chip_name}/{label or f'in{n}'}", millivolts * milliamps / 1e6,
                            "V*I", f"{chip / f'in{n}_input'} * {chip / f'curr{n}_input'}")

    # Raspberry Pi firmware

    def _throttling(self, sources: dict[str, str]) -> Throttling | None:
        problems: list[str] = []
        candidates = sorted(self._path("sys/devices/platform").glob(
            "soc*/soc*:firmware/get_throttled"))
        for path in candidates:
            text = _read(path, problems)
            if text is None:
                continue
            try:
                raw = int(text, 16)
            except ValueError:
                problems.append(f"{path}: not a hex number ({text[:20]!r})")
                continue
            sources["throttling"] = str(path)
            return Throttling(raw, str(path))
        sources["throttling"] = ("unknown: no Raspberry Pi firmware get_throttled under "
                                 f"{self._path('sys/devices/platform')}") + _problems_note(problems)
        return None

    # CPU, load and memory

    def _cpu_sample(self, mono: float) -> _CpuSample | None:
        text = _read(self._path("proc/stat"))
        if text is None or not text.startswith("cpu "):
            return None
        try:
            # user nice system idle iowait irq softirq steal (guest time is inside user/nice)
            ticks = [int(v) for v in text.split("\n", 1)[0].split()[1:9]]
        except ValueError:
            return None
        if len(ticks) < 4:
            return None
        return _CpuSample(mono, sum(ticks), sum(ticks[3:5]), self._own_ticks())

    def _own_ticks(self) -> int | None:
        text = _read(self._path("proc/self/stat"))
        if text is None or ")" not in text:
            return None
        fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        try:
            return int(fields[11]) + int(fields[12])  # utime + stime, fields 14 and 15
        except (IndexError, ValueError):
            return None

    def _cpu_load(
        self, mono: float, sources: dict[str, str]
    ) -> tuple[float | None, float | None, float | None]:
        stat_path = self._path("proc/stat")
        current = self._cpu_sample(mono)
        if current is None:
            sources["cpu"] = f"unknown: {stat_path} unreadable"
            return None, None, None
        old_enough = [s for s in self._cpu if mono - s.monotonic >= self.cpu_window_s]
        base = old_enough[-1] if old_enough else (self._cpu[0] if self._cpu else None)
        self._cpu.append(current)
        while len(self._cpu) > 1 and mono - self._cpu[1].monotonic >= self.cpu_window_s:
            self._cpu.popleft()  # the next one is old enough to be the baseline later
        if base is None:
            sources["cpu"] = f"unknown: first {stat_path} sample"
            return None, None, None
        if mono - base.monotonic < MIN_CPU_SPAN_S:
            sources["cpu"] = (f"unknown: {stat_path} sampled {mono - base.monotonic:.2f} s ago, "
                              f"a load needs {MIN_CPU_SPAN_S:g} s")
            return None, None, None
        total = current.total - base.total
        if total <= 0:
            sources["cpu"] = f"unknown: no ticks counted in {stat_path} since the last sample"
            return None, None, None
        busy = 100.0 * (total - (current.idle - base.idle)) / total
        own = None
        if current.own is not None and base.own is not None:
            own = min(100.0, max(0.0, 100.0 * (current.own - base.own) / total))
        window = current.monotonic - base.monotonic
        sources["cpu"] = f"{stat_path} and {self._path('proc/self/stat')} over {window:.1f} s"
        return max(0.0, min(100.0, busy)), own, window

    def _load(self, sources: dict[str, str]) -> float | None:
        path = self._path("proc/loadavg")
        text = _read(path)
        with contextlib.suppress(AttributeError, IndexError, ValueError):
            value = float(text.split()[0])  # type: ignore[union-attr]
            sources["load"] = str(path)
            return value
        sources["load"] = f"unknown: {path} unreadable"
        return None

    def _memory(self, sources: dict[str, str]) -> tuple[float | None, float | None]:
        path = self._path("proc/meminfo")
        values = dict(_meminfo(_read(path) or ""))
        available, total = values.get("MemAvailable"), values.get("MemTotal")
        if available is None:
            sources["memory"] = f"unknown: no MemAvailable in {path}"
        else:
            sources["memory"] = f"{path} MemAvailable"
        kib = 1024.0
        return (None if available is None else available / kib,
                None if total is None else total / kib)


def _meminfo(text: str) -> Iterable[tuple[str, float]]:
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            yield key.strip(), float(parts[0])  # kB


def _power_state(supplies: list[PowerSupply]) -> tuple[bool | None, str]:
    """(on battery?, why) from the power supplies; None when it cannot be told."""
    batteries = [s for s in supplies if s.is_system_battery]
    external = [s for s in supplies if s.type != "Battery"]
    if not batteries:
        return False, "no system battery: external power"
    names = ", ".join(b.name for b in batteries)
    if any(b.status == "Discharging" for b in batteries):
        return True, f"battery {names} discharging"
    online = [s.name for s in external if s.online]
    if online:
        return False, f"external power: {', '.join(online)} online"
    states = [b.status for b in batteries if b.status in ("Charging", "Full", "Not charging")]
    if states:
        return False, f"battery {names} {states[0].lower()}: external power"
    if external and all(s.online is False for s in external):
        return True, f"battery {names}; {', '.join(s.name for s in external)} offline"
    return None, f"battery {names} with unknown status and no external supply online"
