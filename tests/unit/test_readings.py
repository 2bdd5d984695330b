"""Device readings from fake kernel trees (every branch) and from this machine's real /sys."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from fedd.agent.readings import Readings, ReadingsReader, Temperature, Throttling

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2 3\n"
SELF_STAT = "1234 (python3 (fedd) x) S 1 1234 1234 0 -1 4194560 1 0 0 0 {utime} {stime} 0 0 20 0\n"
MEMINFO = "MemTotal:        3884000 kB\nMemFree:          200000 kB\nMemAvailable:     819200 kB\n"


class Tree:
    """A directory tree with the kernel's layout, and a clock the test moves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = 1000.0

    def write(self, relative: str, text: object) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{text}\n")
        return path

    def files(self, directory: str, **attrs: object) -> None:
        for name, value in attrs.items():
            self.write(f"{directory}/{name}", value)

    def stat(self, *, user: int, system: int = 0, idle: int, iowait: int = 0,
             utime: int = 0, stime: int = 0) -> None:
        self.write("proc/stat", STAT.format(user=user, system=system, idle=idle, iowait=iowait))
        self.write("proc/self/stat", SELF_STAT.format(utime=utime, stime=stime))

    def reader(self, **kwargs: object) -> ReadingsReader:
        return ReadingsReader(self.root, clock=lambda: self.now, wall_clock=lambda: 5e8 + self.now,
                              **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# ------------------------------------------------------------------ heat


def test_thermal_zones_in_numeric_order_with_types(tree):
    tree.files("sys/class/thermal/thermal_zone0", type="cpu_thermal", temp=55000)
    tree.files("sys/class/thermal/thermal_zone10", type="gpu_thermal", temp=48500)
    tree.files("sys/class/thermal/thermal_zone2", type="soc_thermal", temp=61250)
    tree.write("sys/class/thermal/cooling_device0/type", "Processor")  # not a zone
    r = tree.reader().read()
    assert [(t.name, t.celsius, t.kind) for t in r.temperatures] == [
        ("cpu_thermal", 55.0, "thermal_zone"),
        ("soc_thermal", 61.25, "thermal_zone"),
        ("gpu_thermal", 48.5, "thermal_zone"),
    ]
    assert r.temperatures[0].source.endswith("thermal_zone0/temp")
    assert r.hottest().name == "soc_thermal"
    assert "3 thermal zone(s)" in r.sources["temperature"]


def test_unreadable_missing_and_implausible_temperatures_are_skipped_and_said(tree):
    tree.files("sys/class/thermal/thermal_zone0", type="cpu_thermal", temp=50000)
    tree.files("sys/class/thermal/thermal_zone1", type="off")  # no temp file at all
    (tree.root / "sys/class/thermal/thermal_zone2/temp").mkdir(parents=True)  # EISDIR-like
    tree.files("sys/class/thermal/thermal_zone3", type="PMIC-bogus", temp=-274000)
    tree.files("sys/class/thermal/thermal_zone4", type="garbage", temp="n/a")
    tree.write("sys/class/thermal/thermal_zone5/temp", 40000)  # no type: named by its folder
    tree.files("sys/class/thermal/thermal_zone6", type="inf", temp="inf")
    r = tree.reader().read()
    assert [(t.name, t.celsius) for t in r.temperatures] == [
        ("cpu_thermal", 50.0), ("thermal_zone5", 40.0)]
    note = r.sources["temperature"]
    assert "thermal_zone2/temp: not a regular file" in note
    assert "implausible -274 °C" in note and "not a number ('n/a')" in note
    assert "+1 more" in note  # four problems: three are shown


def test_hwmon_temperatures_named_by_chip_and_label_old_and_new_layouts(tree):
    tree.files("sys/class/hwmon/hwmon0", name="coretemp", temp1_input=62000,
               temp1_label="Package id 0", temp2_input=58000)
    tree.files("sys/class/hwmon/hwmon1/device", name="nvme", temp1_input=44850)  # old layout
    tree.files("sys/class/hwmon/hwmon2", name="broken", temp1_input="")
    r = tree.reader().read()
    assert [(t.name, t.celsius, t.kind) for t in r.temperatures] == [
        ("coretemp/Package id 0", 62.0, "hwmon"),
        ("coretemp/temp2", 58.0, "hwmon"),
        ("nvme/temp1", 44.85, "hwmon"),
    ]
    # No thermal zone: every hwmon sensor is watched by default.
    assert r.hottest().name == "coretemp/Package id 0"
    assert r.hottest(["nvme"]).celsius == 44.85
    assert r.hottest(["Package id 0"]).celsius == 62.0
    assert r.hottest(["nothing"]) is None


def test_thermal_zones_win_over_hwmon_by_default_but_names_select_any(tree):
    tree.files("sys/class/thermal/thermal_zone0", type="CPU-therm", temp=41000)
    tree.files("sys/class/thermal/thermal_zone1", type="PMIC-Die", temp=100000)
    tree.files("sys/class/hwmon/hwmon0", name="nvme", temp1_input=75000)
    r = tree.reader().read()
    assert r.hottest().name == "PMIC-Die"
    assert r.hottest(["CPU-therm"]).celsius == 41.0
    assert r.hottest(["CPU-therm", "nvme/temp1"]).celsius == 75.0


# ----------------------------------------------------------------- power


def test_hwmon_power_inputs_and_averages_in_microwatts(tree):
    tree.files("sys/class/hwmon/hwmon0", name="ina226", power1_input=4_250_000,
               power1_label="VDD_IN")
    tree.files("sys/class/hwmon/hwmon1", name="amdgpu", power1_average=12_000_000)
    tree.files("sys/class/hwmon/hwmon2", name="dup", power1_input=1_000_000,
               power1_average=9_000_000)  # _input wins for the same channel
    r = tree.reader().read()
    assert [(p.name, p.watts, p.method) for p in r.rails] == [
        ("ina226/VDD_IN", 4.25, "power"), ("amdgpu/power1", 12.0, "power"),
        ("dup/power1", 1.0, "power")]
    assert r.power().name == "ina226/VDD_IN"  # the board-input rail
    assert r.power("amdgpu/power1").watts == 12.0
    assert r.power("VDD_IN").watts == 4.25
    assert r.power("absent") is None


def test_ina3221_channels_are_volts_times_amps_and_skip_nc_disabled_and_shunts(tree):
    tree.files("sys/class/hwmon/hwmon3", name="ina3221",
               in1_label="VDD_IN", in1_input=5080, curr1_input=1200,
               in2_label="VDD_CPU_GPU_CV", in2_input=5072, curr2_input=400, in2_enable=1,
               in3_label="NC", in3_input=0, curr3_input=0,
               in4_input=12, curr4_input=1600)  # shunt voltage and summed current
    r = tree.reader().read()
    assert [(p.name, round(p.watts, 4), p.method) for p in r.rails] == [
        ("ina3221/VDD_IN", 6.096, "V*I"), ("ina3221/VDD_CPU_GPU_CV", 2.0288, "V*I")]
    assert "in1_input" in r.rails[0].source and "curr1_input" in r.rails[0].source
    assert r.power().name == "ina3221/VDD_IN"
    tree.write("sys/class/hwmon/hwmon3/in1_enable", 0)  # a disabled channel is not read
    assert [p.name for p in tree.reader().read().rails] == ["ina3221/VDD_CPU_GPU_CV"]


def test_without_an_input_rail_one_rail_is_used_and_several_are_summed(tree):
    tree.files("sys/class/hwmon/hwmon0", name="ina3221", in1_label="VDD_GPU_SOC",
               in1_input=5000, curr1_input=1000)
    assert tree.reader().read().power().name == "ina3221/VDD_GPU_SOC"
    tree.files("sys/class/hwmon/hwmon0", in2_label="VDD_CPU_CV", in2_input=5000,
               curr2_input=600)
    total = tree.reader().read().power()
    assert (total.name, total.watts, total.method) == ("sum of 2 rails", 8.0, "V*I")
    assert Readings(time=0, monotonic=0).power() is None


def test_energy_counters_become_watts_between_reads(tree):
    tree.files("sys/class/hwmon/hwmon0", name="board", energy1_input=1_000_000,
               energy1_label="VIN")
    reader = tree.reader()
    first = reader.read()
    assert first.rails == ()  # one counter value is not a power yet
    tree.now += 4.0
    tree.write("sys/class/hwmon/hwmon0/energy1_input", 13_000_000)  # 12 J in 4 s
    second = reader.read()
    assert [(p.name, p.watts, p.method) for p in second.rails] == [("board/VIN", 3.0, "energy")]
    tree.now += 1.0
    tree.write("sys/class/hwmon/hwmon0/energy1_input", 5)  # counter reset: no power this time
    assert reader.read().rails == ()


# --------------------------------------------------------- power supplies


def test_battery_discharging_with_mains_offline(tree):
    tree.files("sys/class/power_supply/AC", type="Mains", online=0)
    tree.files("sys/class/power_supply/BAT0", type="Battery", capacity=18,
               status="Discharging")
    r = tree.reader().read()
    assert (r.on_battery, r.battery_percent) == (True, 18.0)
    assert [(s.name, s.type, s.online) for s in r.supplies] == [
        ("AC", "Mains", False), ("BAT0", "Battery", None)]
    assert "discharging" in r.sources["power_supply"]


@pytest.mark.parametrize(
    ("supplies", "on_battery", "percent", "words"),
    [
        ({}, False, None, "no system battery"),
        ({"usb": {"type": "USB", "online": 1}}, False, None, "no system battery"),
        ({"AC": {"type": "Mains", "online": 1},
          "BAT0": {"type": "Battery", "capacity": 64, "status": "Charging"}},
         False, 64.0, "AC online"),
        ({"BAT0": {"type": "Battery", "capacity": 100, "status": "Full"}},
         False, 100.0, "full"),
        ({"BAT0": {"type": "Battery", "capacity": 80, "status": "Not charging"}},
         False, 80.0, "not charging"),
        ({"BAT0": {"type": "Battery", "capacity": 55, "status": "Unknown"}},
         None, 55.0, "unknown status"),
        ({"AC": {"type": "Mains", "online": 0},
          "BAT0": {"type": "Battery", "capacity": 55, "status": "Unknown"}},
         True, 55.0, "AC offline"),
        ({"hid-mouse": {"type": "Battery", "scope": "Device", "capacity": 5,
                        "status": "Discharging"}},
         False, None, "no system battery"),
        ({"BAT0": {"type": "Battery", "energy_now": 30_000_000, "energy_full": 40_000_000,
                   "status": "Discharging"},
          "BAT1": {"type": "Battery", "charge_now": 1_000, "charge_full": 2_000,
                   "status": "Discharging"}},
         True, 50.0, "discharging"),
    ],
    ids=["none", "usb-only", "charging", "full", "not-charging", "unknown", "mains-offline",
         "peripheral", "energy-and-charge"],
)
def test_power_state(tree, supplies, on_battery, percent, words):
    for name, attrs in supplies.items():
        tree.files(f"sys/class/power_supply/{name}", **attrs)
    r = tree.reader().read()
    assert (r.on_battery, r.battery_percent) == (on_battery, percent)
    assert words in r.sources["power_supply"]


# ---------------------------------------------------- Raspberry Pi firmware


@pytest.mark.parametrize(
    ("folder", "text", "now", "since_boot"),
    [
        ("soc/soc:firmware", "0x50005", ("under-voltage", "throttled"),
         ("under-voltage", "throttled")),
        ("soc/soc:firmware", "0", (), ()),
        ("soc/soc:firmware", "80008", ("soft temperature limit",), ("soft temperature limit",)),
        ("soc@107c000000/soc@107c000000:firmware", "0x20002", ("ARM frequency capped",),
         ("ARM frequency capped",)),  # Raspberry Pi 5 naming
    ],
)
def test_get_throttled_bits(tree, folder, text, now, since_boot):
    path = tree.write(f"sys/devices/platform/{folder}/get_throttled", text)
    t = tree.reader().read().throttling
    assert (t.now, t.since_boot, t.source) == (now, since_boot, str(path))
    assert t.under_voltage == ("under-voltage" in now)


@pytest.mark.parametrize("text", [None, "zz"])
def test_throttling_unknown_without_firmware_file_or_with_garbage(tree, text):
    if text is not None:
        tree.write("sys/devices/platform/soc/soc:firmware/get_throttled", text)
    r = tree.reader().read()
    assert r.throttling is None
    assert r.sources["throttling"].startswith("unknown: no Raspberry Pi firmware get_throttled")
    assert ("not a hex number" in r.sources["throttling"]) == (text is not None)


# ------------------------------------------------------ CPU, load, memory


def test_cpu_load_over_the_window_and_own_share(tree):
    tree.stat(user=1000, idle=9000, utime=10)
    reader = tree.reader(cpu_window_s=10.0)  # first sample at t=1000
    tree.now += 0.5
    early = reader.read()
    assert early.cpu_percent is None and "a load needs 1 s" in early.sources["cpu"]
    tree.now += 4.5  # t=1005: 400 ticks, 100 idle, 50 of them ours
    tree.stat(user=1300, idle=9100, utime=45, stime=15)
    r = reader.read()
    assert (r.cpu_percent, r.own_cpu_percent, r.cpu_window_s) == (75.0, 12.5, 5.0)
    assert r.other_cpu_percent == 62.5
    assert "over 5.0 s" in r.sources["cpu"]
    tree.now += 7.0  # t=1012: the early t=1000.5 read is the newest sample >= 10 s old
    tree.stat(user=1300, system=100, idle=9500, iowait=100, utime=45, stime=15)
    r = reader.read()
    assert (r.cpu_window_s, r.cpu_percent) == (11.5, 40.0)  # 400 busy of 1000 ticks
    tree.now += 5.0  # t=1017: now t=1005 is the baseline (>= 10 s old, newest such)
    tree.stat(user=1300, system=100, idle=9900, iowait=100, utime=45, stime=15)
    r = reader.read()
    assert (r.cpu_window_s, r.cpu_percent) == (12.0, 10.0)
    assert r.own_cpu_percent == 0.0


def test_cpu_load_unknown_when_unreadable_or_counters_do_not_move(tree):
    reader = tree.reader()
    tree.now += 5
    r = reader.read()
    assert r.cpu_percent is None and r.sources["cpu"].startswith("unknown: ")
    assert "unreadable" in r.sources["cpu"]
    tree.stat(user=10, idle=10)
    reader = tree.reader()
    tree.now += 5
    r = reader.read()
    assert r.cpu_percent is None and "no ticks" in r.sources["cpu"]
    tree.write("proc/self/stat", "garbage")  # own share unknown, the load still known
    tree.stat(user=20, idle=20)
    tree.write("proc/self/stat", "garbage")
    tree.now += 5
    r = reader.read()
    assert (r.cpu_percent, r.own_cpu_percent, r.other_cpu_percent) == (50.0, None, 50.0)


def test_memory_and_load_average(tree):
    tree.write("proc/meminfo", MEMINFO)
    tree.write("proc/loadavg", "0.52 0.58 0.59 2/345 6789")
    r = tree.reader().read()
    assert (r.memory_available_mib, r.memory_total_mib, r.load_1m) == (800.0, 3792.96875, 0.52)
    tree.write("proc/meminfo", "MemTotal: 1000 kB\n")  # a kernel without MemAvailable
    tree.write("proc/loadavg", "")
    r = tree.reader().read()
    assert (r.memory_available_mib, r.load_1m) == (None, None)
    assert r.sources["memory"].startswith("unknown") and r.sources["load"].startswith("unknown")


# ------------------------------------------------------- robustness, real


def test_an_empty_root_gives_a_reading_of_unknowns(tree):
    r = tree.reader().read()
    assert r.temperatures == r.supplies == r.rails == ()
    assert (r.throttling, r.cpu_percent, r.memory_available_mib) == (None, None, None)
    assert r.on_battery is False  # no battery: on external power
    assert set(r.sources) == {"temperature", "power_supply", "power", "throttling", "cpu",
                              "memory", "load"}
    json.dumps(r.as_dict())


def test_a_fifo_where_a_file_should_be_never_blocks(tree):
    for relative in ("sys/class/thermal/thermal_zone0/temp", "proc/meminfo",
                     "sys/class/power_supply/BAT0/type"):
        path = tree.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    result: list[Readings] = []
    worker = threading.Thread(target=lambda: result.append(tree.reader().read()), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "a reader blocked on a FIFO"
    (r,) = result
    assert r.temperatures == () and r.memory_available_mib is None
    assert "not a regular file" in r.sources["temperature"]


def test_readings_are_frozen_and_json_able(tree):
    tree.files("sys/class/thermal/thermal_zone0", type="cpu_thermal", temp=47000)
    tree.files("sys/class/hwmon/hwmon0", name="ina3221", in1_label="VDD_IN", in1_input=5000,
               in1_enable=1, curr1_input=500)
    tree.write("sys/devices/platform/soc/soc:firmware/get_throttled", "0x50000")
    r = tree.reader().read()
    with pytest.raises(AttributeError):
        r.cpu_percent = 1.0  # type: ignore[misc]
    d = json.loads(json.dumps(r.as_dict()))
    assert d["temperatures_c"] == {"cpu_thermal": 47.0}
    assert d["power_w"] == {"ina3221/VDD_IN": 2.5}
    assert (d["throttled_now"], d["throttled_since_boot"]) == ([], ["under-voltage",
                                                                   "throttled"])
    assert Temperature("a/b", 1.0, "hwmon", "x").matches("b")
    assert not Throttling(0, "x").now


def test_default_root_reads_this_machine(capsys):
    times = iter([0.0, 2.0])  # the clock says 2 s passed; the CPU really works a little
    reader = ReadingsReader(clock=lambda: next(times))
    deadline = time.thread_time() + 0.2
    while time.thread_time() < deadline:
        pass
    r = reader.read()
    assert r.memory_available_mib is not None and r.memory_available_mib > 0
    assert r.load_1m is not None
    assert r.cpu_percent is not None and r.own_cpu_percent is not None, r.sources["cpu"]
    # Both are whole-machine percentages from 100 Hz ticks read a moment apart, over a
    # fraction of a second: too coarse to compare our share with the total here (the
    # exact arithmetic is tested on fake /proc trees above).
    assert 0 < r.own_cpu_percent <= 100 and 0 <= r.cpu_percent <= 100
    for t in r.temperatures:
        assert -50 <= t.celsius <= 200
    with capsys.disabled():
        print("\nthis machine:", json.dumps(r.as_dict(), indent=1))
