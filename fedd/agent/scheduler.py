"""When local training may run: heat, power, load, memory, hours and budgets.

The agent asks three things, each answered in a sentence it can log, show in
``fedd status`` and put in the heartbeat:

- before a round, :meth:`Scheduler.decide` (``readings``, ``now``) →
  :class:`Decision` ("deferred: 71.3 °C > 70.0 °C limit (cpu_thermal)");
- while a round runs, :meth:`Scheduler.should_stop` → a reason or None, most
  easily through :class:`TrainingRun`, which also drops the training thread
  to low priority, measures its CPU time and the run's energy, and re-reads
  the device only every ``check_interval_s``;
- after a round, :meth:`Scheduler.record_run` (CPU-seconds, joules, ``now``)
  charges the budgets, which :meth:`Scheduler.to_state` makes JSON for the
  agent's store and :meth:`Scheduler.from_state` restores.

In the agent (a sketch)::

    reader = ReadingsReader(cpu_window_s=cfg.scheduler.cpu_window_s)
    scheduler = Scheduler.from_state(store.get("scheduler"), cfg.scheduler)
    decision = scheduler.decide(reader.read(), time.time())   # before a round
    if decision.run:                                          # in the worker thread:
        with scheduler.training_run(reader) as run:
            learner.stop_check = run.should_stop                  # asked between batches
            learner.local_round(...)
        scheduler.record_run(run.cpu_s, run.energy_j, time.time())
        store.put(scheduler=scheduler.to_state(), last_run=run.as_dict())

Budgets are sliding windows (CPU-seconds in any 60 minutes, runs in any 24
hours), so there is no midnight reset to game and no time zone to get wrong;
only ``hours`` is local wall-clock time. A value the device cannot read
(no thermal zone, no battery) does not block training; a limit crossed does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from types import TracebackType
from typing import Any

import numpy as np
import psutil

from fedd.agent.readings import Readings, ReadingsReader
from fedd.config import SchedulerConfig

__all__ = [
    "Decision",
    "Priority",
    "Scheduler",
    "TrainingRun",
    "lower_priority",
    "thread_cpu_seconds",
]

log = logging.getLogger(__name__)

HOUR_S = 3600.0
DAY_S = 86400.0
RETRY_S = 60.0  # how soon to ask again after a deferral that no clock can predict
EXPECTED_RUNS = 5  # a run is expected to cost the median CPU of the last few
MAX_RUNS_KEPT = 10000
STATE_VERSION = 1


@dataclass(frozen=True)
class Decision:
    """Whether to train now, why, and (when not) how long waiting is worth.

    ``rule`` names the limit that deferred ("temperature", "cpu_budget", ...)
    or is "ok"/"disabled"; ``details`` is JSON-able for the heartbeat.
    """

    run: bool
    reason: str
    rule: str
    wait_s: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Problem:
    rule: str
    text: str
    wait_s: float = RETRY_S


def _parse_hours(spans: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """"22:00-06:00" → (1320, 360) minutes of the day; the config has checked the form."""
    parsed = []
    for span in spans:
        start, end = (int(h) * 60 + int(m) for h, m in (t.split(":") for t in span.split("-")))
        parsed.append((start, end))
    return tuple(parsed)


def _fmt_s(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class Scheduler:
    """The training policy of one device. Not thread-safe: call it from the
    agent's loop, or hold a lock; :class:`TrainingRun` calls ``should_stop``
    from the training thread while the loop waits for the round."""

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        tz: tzinfo | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.tz = tz  # None: the system's local time, for ``hours``
        self.config = config
        self._runs: list[tuple[float, float, float]] = []  # (end time, CPU-s, J), oldest first
        self._hot_c: float | None = None  # heat latch: the temperature that stopped us
        if state is not None:
            self._load_state(state)

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @config.setter
    def config(self, config: SchedulerConfig) -> None:
        """Reconfigure (on reload); the budget history is kept."""
        self._config = config
        self._hours = _parse_hours(config.hours)

    # ----------------------------------------------------------- decisions

    def decide(self, readings: Readings, now: float) -> Decision:
        """Train now? ``now`` is wall-clock time (s since the epoch)."""
        cfg = self.config
        details = self._details(readings, now)
        if not cfg.enabled:
            return Decision(True, "ok: scheduler disabled", "disabled", 0.0, details)
        problems = self._problems(readings, now, running=False, run_cpu_s=0.0)
        details["blocked_by"] = [p.rule for p in problems]
        if problems:
            first = problems[0]
            return Decision(False, f"deferred: {first.text}", first.rule,
                            max(0.0, first.wait_s), details)
        return Decision(True, "ok: " + self._summary(readings, now), "ok", 0.0, details)

    def should_stop(
        self, readings: Readings, now: float | None = None, *, run_cpu_s: float = 0.0
    ) -> str | None:
        """The reason to stop a running round, or None.

        Checks the limits a round can cross while it runs: hours, firmware
        throttling, heat, power, battery, memory and the CPU budget
        (``run_cpu_s`` is what this round has used so far). Not CPU load (the
        round is the load; at nice 19 it yields to the device's own work) and
        not the run count. A value that cannot be read does not stop a round.
        """
        if not self.config.enabled:
            return None
        now = readings.time if now is None else now
        problems = self._problems(readings, now, running=True, run_cpu_s=run_cpu_s)
        return f"stopped: {problems[0].text}" if problems else None

    def _problems(
        self, readings: Readings, now: float, *, running: bool, run_cpu_s: float
    ) -> list[_Problem]:
        cfg = self.config
        found: list[_Problem] = []

        if self._hours and not self._in_hours(now):
            found.append(_Problem("hours", f"outside training hours ({', '.join(cfg.hours)})"
                                  + ("" if running else
                                     f"; next opens in {_fmt_s(self._until_open(now))}"),
                                  self._until_open(now)))

        throttling = readings.throttling
        if cfg.defer_when_throttled and throttling is not None and throttling.now:
            found.append(_Problem("throttled", "Raspberry Pi firmware reports "
                                  f"{', '.join(throttling.now)} now "
                                  f"(get_throttled {throttling.raw:#x})"))

        if (heat := self._heat(readings, running)) is not None:
            found.append(heat)

        on_battery, percent = readings.on_battery, readings.battery_percent
        if cfg.require_power and on_battery is not False and (on_battery or not running):
            why = (f"on battery ({percent:.0f} %)" if on_battery and percent is not None
                   else "on battery" if on_battery else "power source unknown")
            found.append(_Problem("power", f"{why}; training needs external power"))
        if on_battery and cfg.min_battery_percent > 0:
            if percent is None and not running:
                found.append(_Problem("battery", "on battery, charge unknown"))
            elif percent is not None and percent < cfg.min_battery_percent:
                found.append(_Problem("battery", f"on battery at {percent:.0f} % "
                                      f"< {cfg.min_battery_percent:g} %"))

        memory = readings.memory_available_mib
        if memory is not None and memory < cfg.min_memory_mib:
            found.append(_Problem("memory", f"{memory:.0f} MiB available "
                                  f"< {cfg.min_memory_mib:g} MiB minimum"))

        other = readings.other_cpu_percent
        if not running and other is not None and other > cfg.max_cpu_percent:
            window = readings.cpu_window_s or cfg.cpu_window_s
            found.append(_Problem("cpu", f"device busy: {other:.0f} % CPU over {window:.0f} s "
                                  f"> {cfg.max_cpu_percent:g} % limit", cfg.cpu_window_s))

        if (budget := self._cpu_budget_problem(now, running, run_cpu_s)) is not None:
            found.append(budget)

        if not running and cfg.max_runs_per_day is not None:
            times = sorted(t for t, _, _ in self._recent(now, DAY_S))
            if len(times) >= cfg.max_runs_per_day:
                frees_at = times[len(times) - cfg.max_runs_per_day] + DAY_S
                found.append(_Problem("runs", f"{len(times)}/{cfg.max_runs_per_day} runs "
                                      "in the last 24 h", frees_at - now))
        return found

    def _heat(self, readings: Readings, running: bool) -> _Problem | None:
        cfg = self.config
        hottest = readings.hottest(cfg.temperature_sensors)
        if hottest is None:
            return None
        t, limit = hottest.celsius, cfg.max_temperature_c
        if t > limit:
            self._hot_c = t
            return _Problem("temperature", f"{t:.1f} °C > {limit:.1f} °C limit ({hottest.name})")
        resume = limit - cfg.cooldown_c
        if self._hot_c is not None and t > resume and not running:
            return _Problem("temperature", f"cooling down: {t:.1f} °C > {resume:.1f} °C resume "
                            f"point after {self._hot_c:.1f} °C ({hottest.name})")
        if t <= resume:
            self._hot_c = None
        return None

    def _cpu_budget_problem(self, now: float, running: bool, run_cpu_s: float) -> _Problem | None:
        budget = self.config.cpu_budget_s_per_hour
        if budget is None:
            return None
        hour = sorted(self._recent(now, HOUR_S))
        used = sum(cpu for _, cpu, _ in hour)
        if running:
            if run_cpu_s > 0 and used + run_cpu_s >= budget:
                return _Problem("cpu_budget", f"CPU budget spent: {used + run_cpu_s:.1f}/"
                                f"{budget:g} s this hour")
            return None
        expected = self.expected_run_cpu_s()

        def blocked(spent: float) -> bool:  # a run must fit, unless nothing is spent yet
            return spent >= budget or (spent > 0 and spent + expected > budget)

        if not blocked(used):
            return None
        wait, left = HOUR_S, used
        for t, cpu, _ in hour:
            left -= cpu
            if not blocked(max(0.0, left)):
                wait = min(t, now) + HOUR_S - now
                break
        run = f" (a run takes ~{expected:.1f} s)" if used < budget else ""
        return _Problem("cpu_budget", f"CPU budget spent: {used:.1f}/{budget:g} s this hour{run}",
                        wait)

    # ------------------------------------------------------------- reports

    def _details(self, readings: Readings, now: float) -> dict[str, Any]:
        hottest = readings.hottest(self.config.temperature_sensors)
        throttled = None if readings.throttling is None else list(readings.throttling.now)
        other = readings.other_cpu_percent
        memory = readings.memory_available_mib
        return {
            "temperature_c": None if hottest is None else round(hottest.celsius, 1),
            "temperature_sensor": None if hottest is None else hottest.name,
            "on_battery": readings.on_battery,
            "battery_percent": readings.battery_percent,
            "cpu_percent": None if other is None else round(other, 1),
            "memory_available_mib": None if memory is None else round(memory, 1),
            "throttled_now": throttled,
            "in_hours": self._in_hours(now) if self._hours else None,
            **self.budget(now),
        }

    def _summary(self, readings: Readings, now: float) -> str:
        cfg = self.config
        hottest = readings.hottest(cfg.temperature_sensors)
        parts = [f"{hottest.celsius:.1f} °C ({hottest.name})" if hottest
                 else "no temperature sensor"]
        batteries = any(s.is_system_battery for s in readings.supplies)
        if readings.on_battery is False:
            parts.append("plugged in" if batteries else "external power")
        elif readings.on_battery:
            percent = readings.battery_percent
            parts.append("on battery" + (f" at {percent:.0f} %" if percent is not None else ""))
        else:
            parts.append("power source unknown")
        other = readings.other_cpu_percent
        parts.append("load unknown" if other is None else f"{other:.0f} % load")
        if readings.memory_available_mib is not None:
            parts.append(f"{readings.memory_available_mib:.0f} MiB free")
        budget = self.budget(now)
        if cfg.cpu_budget_s_per_hour is not None:
            parts.append(f"budget {budget['cpu_s_hour']:.1f}/{cfg.cpu_budget_s_per_hour:g} s")
        if cfg.max_runs_per_day is not None:
            parts.append(f"{budget['runs_24h']}/{cfg.max_runs_per_day} runs in 24 h")
        return ", ".join(parts)

    def budget(self, now: float) -> dict[str, Any]:
        """What the budgets hold at ``now``, JSON-able (heartbeat, status)."""
        hour, day = self._recent(now, HOUR_S), self._recent(now, DAY_S)
        return {
            "cpu_s_hour": round(sum(cpu for _, cpu, _ in hour), 3),
            "cpu_budget_s_per_hour": self.config.cpu_budget_s_per_hour,
            "runs_24h": len(day),
            "max_runs_per_day": self.config.max_runs_per_day,
            "energy_j_24h": round(sum(j for _, _, j in day), 3),
        }

    def expected_run_cpu_s(self) -> float:
        """What the next run will likely cost: the median of the last few runs."""
        recent = [cpu for _, cpu, _ in self._runs[-EXPECTED_RUNS:]]
        # numpy, which the agent holds anyway: `statistics` would bring fractions and
        # decimal (0.45 MiB of RSS) for this one median.
        return float(np.median(recent)) if recent else 0.0

    # ------------------------------------------------------------- budgets

    def record_run(self, cpu_seconds: float, energy_j: float, now: float) -> None:
        """Charge one finished (or stopped) run to the budgets, at its end time ``now``."""
        if not (math.isfinite(cpu_seconds) and cpu_seconds >= 0):
            raise ValueError(f"cpu_seconds must be finite and >= 0, got {cpu_seconds}")
        if not (math.isfinite(energy_j) and energy_j >= 0):
            raise ValueError(f"energy_j must be finite and >= 0, got {energy_j}")
        self._runs.append((float(now), float(cpu_seconds), float(energy_j)))
        self._runs.sort(key=lambda r: r[0])
        self._runs = self._recent(now, DAY_S)[-MAX_RUNS_KEPT:]

    def _recent(self, now: float, span: float) -> list[tuple[float, float, float]]:
        """Runs that ended within ``span`` before ``now``. A run "in the future" (the
        clock was set back, e.g. a Pi without an RTC before NTP) counts as now."""
        return [r for r in self._runs if min(r[0], now) > now - span]

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: the runs of the last 24 h and the heat latch."""
        return {"version": STATE_VERSION, "runs": [list(r) for r in self._runs],
                "hot_c": self._hot_c}

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any] | None, config: SchedulerConfig, *, tz: tzinfo | None = None
    ) -> Scheduler:
        """A scheduler with the budgets of :meth:`to_state`; a missing or damaged
        state starts empty (logged), it never stops the agent."""
        return cls(config, tz=tz, state=state)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {state.get('version')!r}")
            runs = []
            for run in state.get("runs", []):
                t, cpu, joules = (float(v) for v in run)
                if not all(math.isfinite(v) for v in (t, cpu, joules)) or cpu < 0 or joules < 0:
                    raise ValueError(f"bad run {run!r}")
                runs.append((t, cpu, joules))
            hot = state.get("hot_c")
            self._hot_c = None if hot is None else float(hot)
            self._runs = sorted(runs)[-MAX_RUNS_KEPT:]
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("scheduler state ignored, budgets start empty: %s", exc)
            self._runs, self._hot_c = [], None

    # --------------------------------------------------------------- hours

    def _seconds_of_day(self, now: float) -> float:
        local = datetime.fromtimestamp(now, self.tz)
        return local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6

    def _in_hours(self, now: float) -> bool:
        minute = self._seconds_of_day(now) / 60
        return any(
            (start <= minute < end) if start < end else (minute >= start or minute < end)
            for start, end in self._hours
        )

    def _until_open(self, now: float) -> float:
        second = self._seconds_of_day(now)
        return min((start * 60 - second) % DAY_S for start, _ in self._hours)

    # ---------------------------------------------------------------- runs

    def training_run(self, reader: ReadingsReader) -> TrainingRun:
        """A :class:`TrainingRun` with this scheduler's limits and priority settings."""
        return TrainingRun(self, reader)


# ------------------------------------------------------------ low priority


@dataclass
class Priority:
    """What :func:`lower_priority` did to one thread, for the log and the heartbeat."""

    tid: int
    nice_before: int | None = None
    nice: int | None = None
    io_before: str | None = None
    io: str | None = None
    restored: bool = True
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"nice": self.nice, "io": self.io, "restored": self.restored,
                "notes": list(self.notes)}


def _io_name(ionice: Any) -> str:
    return f"{ionice.ioclass.name.removeprefix('IOPRIO_CLASS_').lower()}/{ionice.value}"


@contextlib.contextmanager
def lower_priority(*, nice: int = 19, idle_io: bool = True) -> Iterator[Priority]:
    """Lower the CALLING THREAD's CPU priority to ``nice`` and its I/O class to
    idle, and restore both afterwards.

    Linux keeps nice and I/O priority per thread: ``setpriority(PRIO_PROCESS,
    tid)`` and ``ioprio_set(IOPRIO_WHO_PROCESS, tid)`` (through psutil, which
    takes a thread id) change this thread only, not the agent's loop. Lowering
    is always allowed. Raising nice back needs CAP_SYS_NICE or an RLIMIT_NICE
    that allows it (systemd: ``LimitNICE=+10`` with ``Nice=10``); without either the thread keeps
    the low priority, ``restored`` is False and a warning says so, so run
    training on a thread of its own. The idle I/O class only matters with an
    I/O scheduler that honours classes (BFQ; mq-deadline in part).
    """
    tid = threading.get_native_id()
    priority = Priority(tid)
    try:
        priority.nice_before = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > priority.nice_before:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        priority.nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:
        priority.notes.append(f"nice unchanged: {exc.strerror}")
    thread: psutil.Process | None = None
    old_io = None
    if idle_io:
        try:
            thread = psutil.Process(tid)
            old_io = thread.ionice()
            priority.io_before = _io_name(old_io)
            thread.ionice(psutil.IOPRIO_CLASS_IDLE)
            priority.io = _io_name(thread.ionice())
        except (psutil.Error, OSError, ValueError) as exc:
            priority.notes.append(f"I/O class unchanged: {exc}")
            old_io = None
    try:
        yield priority
    finally:
        if thread is not None and old_io is not None:
            try:
                keeps_value = old_io.ioclass in (psutil.IOPRIO_CLASS_RT, psutil.IOPRIO_CLASS_BE)
                thread.ionice(old_io.ioclass, old_io.value if keeps_value else None)
            except (psutil.Error, OSError, ValueError) as exc:
                priority.restored = False
                priority.notes.append(f"I/O class not restored: {exc}")
        changed = priority.nice is not None and priority.nice != priority.nice_before
        if priority.nice_before is not None and changed:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, priority.nice_before)
            except OSError as exc:
                priority.restored = False
                priority.notes.append(
                    f"nice {priority.nice} not raised back to {priority.nice_before}: "
                    f"{exc.strerror} (needs CAP_SYS_NICE, or LimitNICE= up to the unit's Nice=)")
        if not priority.restored:
            log.warning("thread %d keeps its training priority: %s", tid,
                        "; ".join(priority.notes))


def thread_cpu_seconds(ident: int | None = None) -> float:
    """CPU time (user + system) of a Python thread, by ``threading.get_ident()``;
    the calling thread by default. Works from any thread while that one lives."""
    if ident is None:
        return time.thread_time()
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


# ------------------------------------------------------------ training run


class TrainingRun:
    """One training round on the calling thread, as a context manager.

    Entering lowers the thread's priority (``nice``, ``idle_io``) and takes
    the first reading; :meth:`should_stop`, called between batches, re-reads
    the device at most every ``check_interval_s`` and asks the scheduler;
    leaving restores the priority and takes the last reading. Afterwards
    ``cpu_s`` (this thread's CPU time), ``energy_j`` with ``energy_source``
    ("measured: ..." by integrating the power rail's watts over the readings,
    else "estimate: CPU-s x W") and ``stopped`` (the reason, or None) describe
    the run; :meth:`as_dict` puts them in one JSON-able record.
    """

    def __init__(self, scheduler: Scheduler, reader: ReadingsReader) -> None:
        self.scheduler = scheduler
        self.reader = reader
        self.stopped: str | None = None
        self.priority: Priority | None = None
        self.energy_j: float | None = None
        self.energy_source: str | None = None
        self.wall_s: float | None = None
        self._cpu_final: float | None = None
        self._ident: int | None = None
        self._cpu_start = 0.0
        self._power: list[tuple[float, float | None, str | None]] = []  # (monotonic, W, rail)
        self._next_check = 0.0
        self._priority_cm: contextlib.AbstractContextManager[Priority] | None = None

    def __enter__(self) -> TrainingRun:
        cfg = self.scheduler.config
        self._ident = threading.get_ident()
        self._priority_cm = lower_priority(nice=cfg.nice, idle_io=cfg.idle_io)
        self.priority = self._priority_cm.__enter__()
        self._cpu_start = thread_cpu_seconds(self._ident)
        try:
            first = self.reader.read()
        except BaseException:
            self._priority_cm.__exit__(None, None, None)
            raise
        self._sample(first)
        self._next_check = first.monotonic + cfg.check_interval_s
        return self

    @property
    def cpu_s(self) -> float:
        """CPU-seconds of the training thread since the run began."""
        if self._cpu_final is not None:
            return self._cpu_final
        if self._ident is None:
            return 0.0
        return thread_cpu_seconds(self._ident) - self._cpu_start

    def should_stop(self) -> str | None:
        """A reason to stop now, or None; cheap when called between every batch."""
        if self.stopped is not None:
            return self.stopped
        if self.reader.clock() < self._next_check:
            return None
        readings = self.reader.read()
        self._sample(readings)
        self._next_check = readings.monotonic + self.scheduler.config.check_interval_s
        self.stopped = self.scheduler.should_stop(readings, run_cpu_s=self.cpu_s)
        if self.stopped is not None:
            log.info("training %s", self.stopped)
        return self.stopped

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cpu_final = thread_cpu_seconds(self._ident) - self._cpu_start
        try:
            self._sample(self.reader.read())
        finally:
            assert self._priority_cm is not None
            self._priority_cm.__exit__(exc_type, exc, tb)
        self._estimate_energy()

    def _sample(self, readings: Readings) -> None:
        rail = readings.power(self.scheduler.config.power_rail)
        self._power.append((readings.monotonic, None if rail is None else rail.watts,
                            None if rail is None else rail.name))

    def _estimate_energy(self) -> None:
        self.wall_s = self._power[-1][0] - self._power[0][0]
        rails = {name for _, _, name in self._power}
        if len(rails) == 1 and None not in rails and len(self._power) >= 2:
            points = [(t, w) for t, w, _ in self._power if w is not None]
            joules = sum((t1 - t0) * (w0 + w1) / 2
                         for (t0, w0), (t1, w1) in itertools.pairwise(points))
            self.energy_j = joules
            self.energy_source = (f"measured: {rails.pop()} over {self.wall_s:.1f} s "
                                  f"({len(self._power)} readings; the whole board)")
            return
        watts = self.scheduler.config.watts_per_cpu
        self.energy_j = self.cpu_s * watts
        self.energy_source = f"estimate: {self.cpu_s:.2f} CPU-s x {watts:g} W"

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_s": round(self.cpu_s, 4),
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            "energy_j": None if self.energy_j is None else round(self.energy_j, 3),
            "energy_source": self.energy_source,
            "stopped": self.stopped,
            "priority": None if self.priority is None else self.priority.as_dict(),
        }
