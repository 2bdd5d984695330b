"""The training policy rule by rule, its budgets over time, its state, and low priority."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from fedd.agent.readings import PowerSupply, Readings, ReadingsReader, Temperature, Throttling
from fedd.agent.scheduler import Scheduler, lower_priority, thread_cpu_seconds
from fedd.config import SchedulerConfig

NOW = datetime(2026, 3, 10, 23, 30, tzinfo=UTC).timestamp()  # a Tuesday, 23:30 UTC
BATTERY = PowerSupply("BAT0", "Battery", None, 80.0, "Charging", None, "/sys/...")


def reading(*, temp: float | None = 45.0, sensor: str = "cpu_thermal", **changes) -> Readings:
    """A calm device on mains power; ``changes`` overrides any field."""
    base = Readings(
        time=NOW, monotonic=100.0,
        temperatures=() if temp is None else (
            Temperature(sensor, temp, "thermal_zone", "/sys/class/thermal/thermal_zone0/temp"),),
        on_battery=False, cpu_percent=12.0, own_cpu_percent=0.0, cpu_window_s=10.0,
        memory_available_mib=812.0,
    )
    return dataclasses.replace(base, **changes)


def scheduler(**config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), tz=UTC)


def at(hour: int, minute: int = 0, second: int = 0, day: int = 10) -> float:
    return datetime(2026, 3, day, hour, minute, second, tzinfo=UTC).timestamp()


# ------------------------------------------------------------ decisions


def test_ok_says_what_it_checked():
    decision = scheduler().decide(reading(), NOW)
    assert decision.run and decision.rule == "ok" and decision.wait_s == 0
    assert decision.reason == ("ok: 45.0 °C (cpu_thermal), external power, 12 % load, "
                               "812 MiB free, budget 0.0/60 s, 0/96 runs in 24 h")
    assert json.loads(json.dumps(decision.details))["blocked_by"] == []
    plugged = reading(supplies=(BATTERY,), temp=None, cpu_percent=None,
                      memory_available_mib=None)
    reason = scheduler(cpu_budget_s_per_hour=None, max_runs_per_day=None).decide(plugged, NOW)
    assert reason.reason == "ok: no temperature sensor, plugged in, load unknown"


@pytest.mark.parametrize(
    ("config", "changes", "rule", "reason"),
    [
        ({}, {"temp": 71.3}, "temperature", "deferred: 71.3 °C > 70.0 °C limit (cpu_thermal)"),
        ({}, {"on_battery": True, "battery_percent": 18.0}, "battery",
         "deferred: on battery at 18 % < 30 %"),
        ({}, {"on_battery": True, "battery_percent": None}, "battery",
         "deferred: on battery, charge unknown"),
        ({"require_power": True}, {"on_battery": True, "battery_percent": 80.0}, "power",
         "deferred: on battery (80 %); training needs external power"),
        ({"require_power": True}, {"on_battery": None}, "power",
         "deferred: power source unknown; training needs external power"),
        ({}, {"throttling": Throttling(0x50005, "get_throttled")}, "throttled",
         "deferred: Raspberry Pi firmware reports under-voltage, throttled now "
         "(get_throttled 0x50005)"),
        ({}, {"memory_available_mib": 96.4}, "memory",
         "deferred: 96 MiB available < 128 MiB minimum"),
        ({}, {"cpu_percent": 90.0, "own_cpu_percent": 7.0}, "cpu",
         "deferred: device busy: 83 % CPU over 10 s > 50 % limit"),
        ({"hours": ("01:00-05:00",)}, {}, "hours",
         "deferred: outside training hours (01:00-05:00); next opens in 1 h 30 min"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_each_rule_defers_with_a_sentence(config, changes, rule, reason):
    decision = scheduler(**config).decide(reading(**changes), NOW)
    assert (decision.run, decision.rule, decision.reason) == (False, rule, reason)
    assert decision.wait_s > 0
    assert decision.details["blocked_by"] == [rule]


@pytest.mark.parametrize(
    ("config", "changes"),
    [
        ({}, {"temp": 70.0}),  # at the limit is not above it
        ({}, {"temp": 99.0, "sensor": "PMIC-Die"}),  # see the next line
        ({}, {"on_battery": True, "battery_percent": 30.0}),
        ({"min_battery_percent": 0}, {"on_battery": True, "battery_percent": None}),
        ({"require_power": True}, {"supplies": (BATTERY,)}),  # battery charging: plugged in
        ({}, {"throttling": Throttling(0x50000, "x")}),  # happened since boot, not now
        ({"defer_when_throttled": False}, {"throttling": Throttling(0x5, "x")}),
        ({}, {"cpu_percent": 60.0, "own_cpu_percent": 20.0}),  # fedd's own load is not counted
        ({"max_cpu_percent": 100}, {"cpu_percent": 100.0}),
        ({}, {"cpu_percent": None, "temp": None, "memory_available_mib": None}),  # unknowns
        ({"hours": ("22:00-06:00",)}, {}),
        ({"hours": ("00:00-24:00",)}, {}),
    ],
)
def test_within_limits_runs(config, changes):
    if changes.get("sensor") == "PMIC-Die":
        config = {"temperature_sensors": ("CPU-therm",)}  # a bogus zone that is not watched
    decision = scheduler(**config).decide(reading(**changes), NOW)
    assert decision.run, decision.reason


def test_disabled_scheduler_always_runs_and_never_stops():
    s = scheduler(enabled=False)
    hot = reading(temp=99.0, memory_available_mib=1.0)
    assert s.decide(hot, NOW).reason == "ok: scheduler disabled"
    assert s.should_stop(hot) is None


def test_the_first_problem_is_the_reason_and_all_are_listed():
    bad = reading(temp=80.0, memory_available_mib=10.0, cpu_percent=99.0)
    decision = scheduler(hours=("01:00-02:00",)).decide(bad, NOW)
    assert decision.rule == "hours"
    assert decision.details["blocked_by"] == ["hours", "temperature", "memory", "cpu"]
    assert decision.details["temperature_c"] == 80.0 and decision.details["in_hours"] is False


def test_heat_has_hysteresis_until_cooldown_below_the_limit():
    s = scheduler(max_temperature_c=70.0, cooldown_c=5.0)
    assert not s.decide(reading(temp=71.3), NOW).run
    cooling = s.decide(reading(temp=67.0), NOW)
    assert (cooling.run, cooling.rule) == (False, "temperature")
    assert cooling.reason == ("deferred: cooling down: 67.0 °C > 65.0 °C resume point "
                              "after 71.3 °C (cpu_thermal)")
    assert s.decide(reading(temp=65.0), NOW).run
    assert s.decide(reading(temp=68.0), NOW).run  # the latch is cleared
    assert scheduler(cooldown_c=0).decide(reading(temp=69.9), NOW).run


# ------------------------------------------------------------------- hours


@pytest.mark.parametrize(
    ("hours", "clock", "run", "wait_s"),
    [
        (("22:00-06:00",), (23, 30), True, 0),
        (("22:00-06:00",), (0, 0), True, 0),
        (("22:00-06:00",), (5, 59, 59), True, 0),
        (("22:00-06:00",), (6, 0), False, 16 * 3600),
        (("22:00-06:00",), (21, 59), False, 60),
        (("22:00-06:00",), (22, 0), True, 0),
        (("12:00-13:00", "22:00-06:00"), (7, 0), False, 5 * 3600),
        (("12:00-13:00", "22:00-06:00"), (12, 30), True, 0),
        (("12:00-13:00", "22:00-06:00"), (13, 0), False, 9 * 3600),
        (("18:00-24:00",), (23, 59, 59), True, 0),
        (("18:00-24:00",), (0, 0), False, 18 * 3600),
    ],
)
def test_hours_in_local_time_wrap_midnight(hours, clock, run, wait_s):
    decision = scheduler(hours=hours).decide(reading(), at(*clock))
    assert decision.run == run, decision.reason
    assert decision.wait_s == pytest.approx(wait_s)


def test_hours_use_the_given_time_zone():
    from datetime import timedelta, timezone
    s = Scheduler(SchedulerConfig(hours=("22:00-06:00",)), tz=timezone(timedelta(hours=2)))
    assert s.decide(reading(), at(21, 0)).run  # 23:00 at UTC+2
    assert not s.decide(reading(), at(5, 0)).run  # 07:00 there


# ----------------------------------------------------------------- budgets


def test_cpu_budget_slides_over_the_hour_and_expects_the_next_run():
    s = scheduler(cpu_budget_s_per_hour=60.0)
    s.record_run(20.0, 50.0, NOW - 3500)
    s.record_run(30.0, 75.0, NOW - 1000)
    decision = s.decide(reading(), NOW)  # 50 used; a run takes ~25 s: it would not fit
    assert (decision.run, decision.rule) == (False, "cpu_budget")
    assert decision.reason == ("deferred: CPU budget spent: 50.0/60 s this hour "
                               "(a run takes ~25.0 s)")
    assert decision.wait_s == pytest.approx(100.0)  # when the 20 s run leaves the hour
    assert decision.details["cpu_s_hour"] == 50.0 and decision.details["energy_j_24h"] == 125.0
    later = s.decide(reading(), NOW + 100.5)
    assert later.run and "budget 30.0/60 s" in later.reason


def test_cpu_budget_example_and_an_empty_hour_always_allows_one_run():
    s = scheduler(cpu_budget_s_per_hour=60.0)
    s.record_run(58.2, 1.0, NOW - 60)
    decision = s.decide(reading(), NOW)
    assert decision.reason.startswith("deferred: CPU budget spent: 58.2/60 s this hour")
    assert decision.wait_s == pytest.approx(3540.0)
    s = scheduler(cpu_budget_s_per_hour=60.0)
    s.record_run(90.0, 1.0, NOW - 3601)  # a run bigger than the budget, over an hour ago
    assert s.expected_run_cpu_s() == 90.0
    assert s.decide(reading(), NOW).run  # nothing spent this hour: one run may start
    s.record_run(61.0, 1.0, NOW - 10)
    spent = s.decide(reading(), NOW)
    assert spent.reason == "deferred: CPU budget spent: 61.0/60 s this hour"


def test_runs_per_day_slide_over_24_hours():
    s = scheduler(max_runs_per_day=3, cpu_budget_s_per_hour=None)
    for ago in (80000, 50000, 10):
        s.record_run(1.0, 2.5, NOW - ago)
    decision = s.decide(reading(), NOW)
    assert (decision.rule, decision.reason) == ("runs", "deferred: 3/3 runs in the last 24 h")
    assert decision.wait_s == pytest.approx(86400 - 80000)
    assert s.decide(reading(), NOW + 6401).run
    assert s.budget(NOW + 6401)["runs_24h"] == 2


def test_unlimited_budgets_and_record_validation():
    s = scheduler(cpu_budget_s_per_hour=None, max_runs_per_day=None)
    for i in range(200):
        s.record_run(100.0, 250.0, NOW - i)
    assert s.decide(reading(), NOW).reason.endswith("812 MiB free")
    for bad in ((-1.0, 0.0), (float("nan"), 0.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            s.record_run(*bad, NOW)


def test_old_runs_are_forgotten_and_future_runs_count_as_now():
    s = scheduler()
    s.record_run(5.0, 1.0, NOW - 90000)
    s.record_run(5.0, 1.0, NOW)
    assert len(s.to_state()["runs"]) == 1  # older than 24 h: dropped on record
    s.record_run(7.0, 1.0, NOW + 7200)  # the clock was set back 2 h after this run
    assert s.budget(NOW) == {"cpu_s_hour": 12.0, "cpu_budget_s_per_hour": 60.0,
                             "runs_24h": 2, "max_runs_per_day": 96, "energy_j_24h": 2.0}


def test_state_round_trips_through_json_and_survives_damage(caplog):
    s = scheduler()
    s.record_run(12.5, 31.25, NOW - 100)
    s.record_run(3.0, 7.5, NOW - 50)
    s.decide(reading(temp=75.0), NOW)  # latches the heat
    state = json.loads(json.dumps(s.to_state()))
    back = Scheduler.from_state(state, SchedulerConfig(), tz=UTC)
    assert back.to_state() == s.to_state()
    assert back.budget(NOW) == s.budget(NOW)
    assert back.decide(reading(temp=67.0), NOW).rule == "temperature"  # still cooling
    for damaged in ({"version": 99}, {"version": 1, "runs": [[1, "x", 2]]},
                    {"version": 1, "runs": [[1, -1, 2]]}, {"version": 1, "runs": 5}, "junk"):
        fresh = Scheduler.from_state(damaged, SchedulerConfig())  # type: ignore[arg-type]
        assert fresh.to_state() == {"version": 1, "runs": [], "hot_c": None}
    assert "scheduler state ignored" in caplog.text
    assert Scheduler.from_state(None, SchedulerConfig()).to_state()["runs"] == []


def test_reconfigure_keeps_the_history():
    s = scheduler()
    s.record_run(30.0, 1.0, NOW - 10)
    s.config = SchedulerConfig(cpu_budget_s_per_hour=20.0, hours=("01:00-02:00",))
    decision = s.decide(reading(), NOW)
    assert decision.details["blocked_by"] == ["hours", "cpu_budget"]


# ------------------------------------------------------------- mid-run


@pytest.mark.parametrize(
    ("config", "changes", "run_cpu_s", "reason"),
    [
        ({}, {"temp": 70.5}, 0, "stopped: 70.5 °C > 70.0 °C limit (cpu_thermal)"),
        ({}, {"on_battery": True, "battery_percent": 29.0}, 0,
         "stopped: on battery at 29 % < 30 %"),
        ({"require_power": True}, {"on_battery": True, "battery_percent": 90.0}, 0,
         "stopped: on battery (90 %); training needs external power"),
        ({}, {"memory_available_mib": 50.0}, 0, "stopped: 50 MiB available < 128 MiB minimum"),
        ({}, {"throttling": Throttling(0x1, "x")}, 0,
         "stopped: Raspberry Pi firmware reports under-voltage now (get_throttled 0x1)"),
        ({"hours": ("22:00-23:00",)}, {}, 0, "stopped: outside training hours (22:00-23:00)"),
        ({}, {}, 60.0, "stopped: CPU budget spent: 60.0/60 s this hour"),
    ],
)
def test_should_stop_when_a_limit_is_crossed_mid_run(config, changes, run_cpu_s, reason):
    assert scheduler(**config).should_stop(reading(**changes), run_cpu_s=run_cpu_s) == reason


@pytest.mark.parametrize(
    ("config", "changes"),
    [
        ({}, {"cpu_percent": 100.0}),  # the run is the load; at nice 19 it yields anyway
        ({"require_power": True}, {"on_battery": None}),  # unknown is not a crossing
        ({}, {"on_battery": True, "battery_percent": None}),
        ({}, {"temp": 67.0}),  # cooling hysteresis only gates starting
        ({}, {"temp": None, "memory_available_mib": None}),
    ],
)
def test_should_stop_ignores_load_unknowns_and_the_run_count(config, changes):
    s = scheduler(max_runs_per_day=1, **config)
    s.record_run(1.0, 1.0, NOW - 10)
    s._hot_c = 72.0
    assert s.should_stop(reading(**changes), NOW, run_cpu_s=1.0) is None


def test_should_stop_counts_earlier_runs_against_the_budget():
    s = scheduler(cpu_budget_s_per_hour=60.0)
    s.record_run(50.0, 1.0, NOW - 100)
    assert s.should_stop(reading(), NOW, run_cpu_s=9.9) is None
    assert s.should_stop(reading(), NOW, run_cpu_s=10.0) == (
        "stopped: CPU budget spent: 60.0/60 s this hour")


# ------------------------------------------------------------ low priority


def _thread_nice(tid: int) -> int:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of stat(5): nice


def _in_thread(fn):
    result: list = []
    errors: list = []

    def run():
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=30)
    if errors:
        raise errors[0]
    return result[0]


def test_lower_priority_changes_only_the_calling_thread_and_restores_it():
    def body():
        tid = threading.get_native_id()
        before = (_thread_nice(tid), psutil.Process(tid).ionice().ioclass)
        with lower_priority(nice=19, idle_io=True) as priority:
            inside = (_thread_nice(tid), psutil.Process(tid).ionice().ioclass)
            main = _thread_nice(os.getpid())  # the main thread is untouched
        after = (_thread_nice(tid), psutil.Process(tid).ionice().ioclass)
        return before, inside, main, after, priority

    before, inside, main, after, priority = _in_thread(body)
    assert inside == (19, psutil.IOPRIO_CLASS_IDLE)
    assert main == before[0]
    assert priority.nice == 19 and priority.io == "idle/0"
    if os.geteuid() != 0:
        pytest.skip("raising nice back needs CAP_SYS_NICE; see the unprivileged test")
    assert after == before and priority.restored and priority.notes == []


def test_lower_priority_never_raises_a_thread_already_lower():
    def body():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        with lower_priority(nice=10, idle_io=False) as priority:
            inside = _thread_nice(tid)
        return inside, _thread_nice(tid), priority

    inside, after, priority = _in_thread(body)
    assert (inside, after, priority.nice, priority.io, priority.restored) == (19, 19, 19, None,
                                                                              True)


def _as_nobody(rlimit_nice: int) -> dict:
    """Run lower_priority(nice=10) in a forked child that dropped root for nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exception may escape
        status = 1
        try:
            os.close(read_end)
            try:
                resource.setrlimit(resource.RLIMIT_NICE, (rlimit_nice, rlimit_nice))
            except (OSError, ValueError) as exc:  # raising it needs CAP_SYS_RESOURCE
                os.write(write_end, json.dumps({"skip": f"RLIMIT_NICE {rlimit_nice}: {exc}"})
                         .encode())
                status = 0
                raise SystemExit from None
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            warnings: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore
            logging.getLogger("fedd.agent.scheduler").addHandler(handler)
            with lower_priority(nice=10) as p:
                inside = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            after = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.write(write_end, json.dumps({"restored": p.restored, "notes": p.notes,
                                            "inside": inside, "after": after,
                                            "io": p.io, "warnings": warnings}).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = json.loads(data)
    if "skip" in got:
        pytest.skip(got["skip"])
    return got


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_unprivileged_restore_fails_softly_and_says_why():
    got = _as_nobody(rlimit_nice=0)
    assert (got["inside"], got["after"], got["restored"], got["io"]) == (10, 10, False, "idle/0")
    assert "not raised back to 0" in got["notes"][0] and "CAP_SYS_NICE" in got["notes"][0]
    assert "keeps its training priority" in got["warnings"][0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_unprivileged_restore_works_with_rlimit_nice():
    got = _as_nobody(rlimit_nice=20)  # what systemd's LimitNICE=+0 sets: nice 0 allowed
    assert (got["inside"], got["after"], got["restored"], got["notes"]) == (10, 0, True, [])


def test_thread_cpu_seconds_counts_one_thread_only():
    start = threading.Event()
    stop = threading.Event()
    ident: list[int] = []

    def idle_thread():
        ident.append(threading.get_ident())
        start.set()
        stop.wait(30)

    worker = threading.Thread(target=idle_thread)
    worker.start()
    start.wait(30)
    waiting_before = thread_cpu_seconds(ident[0])
    mine = thread_cpu_seconds()
    while thread_cpu_seconds() - mine < 0.1:  # burn 0.1 s here
        pass
    waited = thread_cpu_seconds(ident[0]) - waiting_before
    stop.set()
    worker.join()
    assert waited < 0.05  # the waiting thread used (almost) nothing meanwhile


# ------------------------------------------------------------ training run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(root: Path, relative: str, text: object) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def test_training_run_measures_energy_checks_at_intervals_and_restores_priority(tmp_path):
    clock = Clock()
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu_thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", 50000)
    write(tmp_path, "sys/class/hwmon/hwmon0/name", "ina3221")
    write(tmp_path, "sys/class/hwmon/hwmon0/in1_label", "VDD_IN")
    write(tmp_path, "sys/class/hwmon/hwmon0/in1_input", 5000)
    write(tmp_path, "sys/class/hwmon/hwmon0/curr1_input", 1000)  # 5 W
    reader = ReadingsReader(tmp_path, clock=clock, wall_clock=lambda: NOW)
    s = scheduler(check_interval_s=5.0)

    def body():
        tid = threading.get_native_id()
        with s.training_run(reader) as run:
            niced = _thread_nice(tid)
            clock.now += 1.0
            early = run.should_stop()  # before the interval: no read at all
            write(tmp_path, "sys/class/hwmon/hwmon0/curr1_input", 2000)  # 10 W from here
            clock.now += 5.0
            checked = run.should_stop()
            write(tmp_path, "sys/class/thermal/thermal_zone0/temp", 75500)
            clock.now += 4.0
            stays = run.should_stop()  # the next check is due at 111
            clock.now += 1.0
            hot = run.should_stop()
            again = run.should_stop()
        return niced, early, checked, stays, hot, again, _thread_nice(tid), run

    niced, early, checked, stays, hot, again, after, run = _in_thread(body)
    assert (niced, early, checked, stays) == (19, None, None, None)
    assert hot == again == run.stopped == "stopped: 75.5 °C > 70.0 °C limit (cpu_thermal)"
    if os.geteuid() == 0:
        assert after == 0 and run.priority.restored
    # 5 W for the first 6 s, 10 W after: trapezoids over readings at 100, 106, 111, 111.
    assert run.wall_s == 11.0
    assert run.energy_j == pytest.approx((5 + 10) / 2 * 6 + 10 * 5)
    assert run.energy_source == ("measured: ina3221/VDD_IN over 11.0 s "
                                 "(4 readings; the whole board)")
    assert 0 <= run.cpu_s < 5
    record = json.loads(json.dumps(run.as_dict()))
    assert record["priority"]["nice"] == 19 and record["stopped"] == run.stopped
    s.record_run(run.cpu_s, run.energy_j, NOW)
    assert s.budget(NOW)["runs_24h"] == 1


def test_training_run_without_a_power_sensor_estimates_from_cpu_time(tmp_path):
    reader = ReadingsReader(tmp_path)
    s = scheduler(watts_per_cpu=2.5, nice=5, idle_io=False)

    def body():
        with s.training_run(reader) as run:
            deadline = time.thread_time() + 0.2
            while time.thread_time() < deadline:
                pass
            assert run.should_stop() is None
        return run

    run = _in_thread(body)
    assert run.cpu_s == pytest.approx(0.2, abs=0.1)
    assert run.energy_j == pytest.approx(run.cpu_s * 2.5)
    assert run.energy_source == f"estimate: {run.cpu_s:.2f} CPU-s x 2.5 W"
    assert run.priority.nice == 5 and run.priority.io is None


def test_training_run_restores_priority_if_the_first_reading_fails():
    class Broken(ReadingsReader):
        def read(self) -> Readings:
            raise RuntimeError("sensor bus gone")

    def body():
        tid = threading.get_native_id()
        with pytest.raises(RuntimeError), scheduler().training_run(Broken("/nonexistent")):
            pass
        return _thread_nice(tid)

    assert _in_thread(body) == (0 if os.geteuid() == 0 else 19)
