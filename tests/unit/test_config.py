"""Config loading: the shipped defaults, and an actionable error for each kind of mistake."""

import dataclasses
import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from fedd.config import (
    EXIT_CONFIG_INVALID,
    EXIT_CONFIG_MISSING,
    AgentConfig,
    ConfigError,
    HubConfig,
    ReplayConfig,
    detect_role,
    load_agent_config,
    load_config,
    load_hub_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def write(tmp_path: Path, text: str, name: str = "fedd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def keys_of(node: yaml.Node) -> dict:
    """The key tree of a composed YAML mapping (leaves are None)."""
    return {k.value: keys_of(v) if isinstance(v, yaml.MappingNode) else None for k, v in node.value}


def fields_of(cls: type) -> dict:
    return {
        f.name: fields_of(f.default_factory) if dataclasses.is_dataclass(f.type) else None
        for f in dataclasses.fields(cls)
    }


# ------------------------------------------------------------ shipped defaults


@pytest.mark.parametrize(
    ("name", "load", "expected"),
    [
        ("fedd.yaml", load_agent_config, AgentConfig(device_id="change-me")),
        ("hub.yaml", load_hub_config, HubConfig()),
    ],
)
def test_shipped_files_equal_dataclass_defaults(name, load, expected):
    path = CONFIG_DIR / name
    assert load(path) == expected
    assert load_config(path) == expected
    # Every key is written out, so the file documents the whole schema.
    assert keys_of(yaml.compose(path.read_text())) == fields_of(type(expected))


@pytest.mark.parametrize("name", ["fedd.yaml", "hub.yaml"])
def test_every_shipped_key_has_a_comment(name):
    lines = (CONFIG_DIR / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            above = lines[i - 1].lstrip() if i else ""
            assert above.startswith("#") or "#" in line, f"{name}:{i + 1} has no comment"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "device_id: d1\n"])
def test_empty_or_minimal_agent_file_uses_defaults(tmp_path, text):
    path = write(tmp_path, text)
    if "device_id" not in text:
        with pytest.raises(ConfigError, match="device_id: required key is missing"):
            load_agent_config(path)
    else:
        assert load_agent_config(path) == AgentConfig(device_id="d1")


@pytest.mark.parametrize("text", ["", "broker:\n", "aggregation: {}\n"])
def test_empty_hub_file_and_empty_sections_use_defaults(tmp_path, text):
    assert load_hub_config(write(tmp_path, text)) == HubConfig()


def test_values_are_typed_and_nested(tmp_path):
    path = write(
        tmp_path,
        """
        device_id: pi-07
        broker: {host: hub.local, port: 8883}
        sensor:
          rate_hz: 100        # int accepted for float
          replay: {dataset: npz, npz_path: /data/x.npz, speed: 0x10, loop: yes}
        """,
    )
    cfg = load_agent_config(path)
    assert (cfg.broker.host, cfg.broker.port) == ("hub.local", 8883)
    assert cfg.sensor.rate_hz == 100.0 and isinstance(cfg.sensor.rate_hz, float)
    assert cfg.sensor.replay == ReplayConfig(
        dataset="npz", npz_path="/data/x.npz", speed=16.0, loop=True
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.broker.port = 1  # type: ignore[misc]


def test_scheduler_lists_and_nullable_budgets(tmp_path):
    path = write(
        tmp_path,
        """
        device_id: pi-07
        scheduler:
          hours: [22:00-06:00, "12:00-13:00", 00:00-24:00]   # unquoted spans stay strings
          temperature_sensors:
            - CPU-therm
            - GPU-therm
          cpu_budget_s_per_hour: null
          max_runs_per_day: ~
          power_rail: VDD_IN
          require_power: yes
        """,
    )
    cfg = load_agent_config(path).scheduler
    assert cfg.hours == ("22:00-06:00", "12:00-13:00", "00:00-24:00")
    assert cfg.temperature_sensors == ("CPU-therm", "GPU-therm")
    assert (cfg.cpu_budget_s_per_hour, cfg.max_runs_per_day) == (None, None)
    assert (cfg.power_rail, cfg.require_power) == ("VDD_IN", True)
    assert load_agent_config(write(tmp_path, "device_id: a\nscheduler:\n  hours: []\n")) == (
        AgentConfig(device_id="a"))


# ------------------------------------------------------------------- errors

AGENT_OK = """
device_id: pi-01
broker:
  host: 127.0.0.1
  port: 1883
"""

# (file text, line, key, words the message must contain); every case exits 78.
INVALID = {
    "nested unknown key": (
        "device_id: a\nsensor:\n  replay:\n    persn: 3\n",
        4,
        "sensor.replay.persn",
        ["unknown key", "did you mean 'person'?", "allowed keys: dataset, person"],
    ),
    "wrong type": (
        "device_id: a\nbroker:\n  port: '1883'\n",
        3,
        "broker.port",
        ["expected an integer, got a string ('1883')"],
    ),
    "out of range": (
        "device_id: a\nbroker:\n  host: x\n  port: 70000\n",
        4,
        "broker.port",
        ["must be at least 1 and at most 65535, got 70000"],
    ),
    "exclusive bound": (
        "device_id: a\ntraining:\n  learning_rate: 0\n",
        3,
        "training.learning_rate",
        ["greater than 0"],
    ),
    "delegate option": (
        "device_id: a\ninference:\n  delegates: [libedgetpu.so.1, 'libnpu.so?cache']\n",
        2,
        "inference",
        ["option 'cache' is not key=value"],
    ),
    "not finite": (
        "device_id: a\nstore:\n  max_age_h: .inf\n",
        3,
        "store.max_age_h",
        ["finite"],
    ),
    "duplicate key": (
        "device_id: a\nbroker:\n  port: 1\n  host: x\n  port: 2\n",
        5,
        "broker.port",
        ["duplicate key (first set on line 3)"],
    ),
    "duplicate top-level section": (
        "device_id: a\nwindow: {}\nfleet: f\nwindow: {size: 64}\n",
        4,
        "window",
        ["duplicate key (first set on line 2)"],
    ),
    "syntax error": (
        "device_id: a\nbroker:\n  host: x\n port: 1\n",
        4,
        None,
        ["YAML syntax error"],
    ),
    "missing device_id": (
        "# agent\nfleet: f\nbroker: {port: 1}\n",
        2,
        "device_id",
        ["required key is missing"],
    ),
    "pattern": (
        "device_id: room/1\n",
        1,
        "device_id",
        ["'room/1' is not valid", "MQTT topic level"],
    ),
    "top level not a mapping": ("- a\n- b\n", 1, None, ["mapping at the top level, got a list"]),
    "section not a mapping": (
        "device_id: a\nwindow: 128\n",
        2,
        "window",
        ["expected a mapping, got an integer"],
    ),
    "literal": (
        "device_id: a\nlog_level: warn\n",
        2,
        "log_level",
        ["must be one of 'debug', 'info', 'warning', 'error'", "did you mean 'warning'?"],
    ),
    "unquoted number as string": (
        "device_id: 1234\n",
        1,
        "device_id",
        ["expected a string, got an integer ('1234') (quote it"],
    ),
    "non-string key": ("device_id: a\n1: x\n", 2, None, ["keys must be strings"]),
    "npz without npz_path": (
        "device_id: a\nsensor:\n  rate_hz: 50\n  replay:\n    dataset: npz\n",
        4,
        "sensor.replay",
        ["npz_path is required when dataset is 'npz'"],
    ),
    "window step > size": (
        "device_id: a\nwindow:\n  size: 32\n  step: 64\n",
        2,
        "window",
        ["step (64) must not exceed size (32)"],
    ),
    "quorum > buffer_size": (
        "fleet: f\naggregation:\n  buffer_size: 2\n  quorum: 5\n",
        2,
        "aggregation",
        ["quorum (5) must not exceed buffer_size (2)"],
    ),
    "list item pattern": (
        "device_id: a\nscheduler:\n  hours:\n    - 22:00-06:00\n    - 25:00-26:00\n",
        5,
        "scheduler.hours[1]",
        ["'25:00-26:00' is not valid", "HH:MM-HH:MM"],
    ),
    "list item type": (
        "device_id: a\nscheduler:\n  temperature_sensors: [cpu_thermal, 1]\n",
        3,
        "scheduler.temperature_sensors[1]",
        ["expected a string, got an integer ('1')"],
    ),
    "scalar for a list": (
        "device_id: a\nscheduler:\n  hours: 22:00-06:00\n",
        3,
        "scheduler.hours",
        ["expected a list, got a string ('22:00-06:00'); write [item] for one item"],
    ),
    "mapping for a list": (
        "device_id: a\nscheduler:\n  hours: {a: 1}\n",
        3,
        "scheduler.hours",
        ["expected a list, got a mapping"],
    ),
    "empty hours span": (
        "device_id: a\nscheduler:\n  hours: ['06:00-06:00']\n",
        2,
        "scheduler",
        ["hours: '06:00-06:00' is empty; write 00:00-24:00 for the whole day"],
    ),
    "scheduler bound": (
        "device_id: a\nscheduler:\n  max_cpu_percent: 150\n",
        3,
        "scheduler.max_cpu_percent",
        ["at most 100"],
    ),
    "hub unknown top-level key": (
        "aggregation: {}\nshare_grup: x\n",
        2,
        "share_grup",
        ["did you mean 'share_group'?"],
    ),
}


@pytest.mark.parametrize(("text", "line", "key", "words"), INVALID.values(), ids=INVALID.keys())
def test_invalid_file_names_file_line_and_key(tmp_path, text, line, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.key) == (str(path), line, key)
    assert err.exit_code == EXIT_CONFIG_INVALID == 78
    prefix = f"{path}:{line}: " + (f"{key}: " if key else "")
    assert str(err).startswith(prefix), str(err)
    for word in words:
        assert word in err.message, err.message


@pytest.mark.parametrize("make", [lambda p: p / "absent.yaml", lambda p: p])
def test_missing_or_unreadable_file_exits_66(tmp_path, make):
    path = make(tmp_path)  # a path that does not exist, and a directory
    for load in (load_agent_config, load_hub_config, load_config, detect_role):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert info.value.exit_code == EXIT_CONFIG_MISSING == 66
        assert info.value.line is None and info.value.key is None
        assert str(info.value).startswith(f"{path}: cannot read config file: ")
    copy = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert (str(copy), copy.exit_code) == (str(info.value), EXIT_CONFIG_MISSING)


# -------------------------------------------------- strictness and roles


@pytest.mark.parametrize(
    ("key_path", "value", "ok"),
    [
        ("broker.port", "true", False),  # bool is not an int
        ("broker.port", "1883.0", False),  # nor is a float
        ("sensor.rate_hz", "yes", False),  # bool is not a float
        ("sensor.rate_hz", "50", True),  # an int is a float
        ("sensor.replay.loop", "1", False),  # an int is not a bool
        ("sensor.replay.loop", "'true'", False),  # nor is a string
        ("sensor.replay.loop", "on", True),  # YAML 1.1 boolean
        ("sensor.replay.npz_path", "~", True),  # X | None takes null
        ("broker.host", "~", False),  # str does not
    ],
)
def test_scalar_types_are_strict(tmp_path, key_path, value, ok):
    *sections, leaf = key_path.split(".")
    text = "device_id: a\n" + "".join("  " * i + f"{name}:\n" for i, name in enumerate(sections))
    text += "  " * len(sections) + f"{leaf}: {value}\n"
    path = write(tmp_path, text)
    if ok:
        load_agent_config(path)
    else:
        with pytest.raises(ConfigError, match="expected") as info:
            load_agent_config(path)
        assert (info.value.line, info.value.key) == (len(sections) + 2, key_path)


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("device_id: a\n", "agent"),
        ("", "agent"),
        ("- 1\n", "agent"),
        ("aggregation: {}\n", "hub"),
        ("fleet: f\naggregation:\n  quorum: 1\n", "hub"),
    ],
)
def test_detect_role(tmp_path, text, role):
    assert detect_role(write(tmp_path, text)) == role


def test_load_config_dispatches_and_role_overrides(tmp_path):
    hub = write(tmp_path, "fleet: f\naggregation: {}\n", "hub.yaml")
    agent = write(tmp_path, AGENT_OK)
    assert isinstance(load_config(hub), HubConfig)
    assert isinstance(load_config(agent), AgentConfig)
    with pytest.raises(ConfigError, match="aggregation: unknown key"):
        load_config(hub, role="agent")
    with pytest.raises(ValueError, match="role"):
        load_config(agent, role="device")  # type: ignore[arg-type]


def test_uplink_codec_is_checked_with_the_pipelines_sentence(tmp_path):
    good = load_agent_config(write(tmp_path, """
        device_id: d1
        uplink:
          codec: topk:0.01+q:4+zstd
        """))
    assert good.uplink.codec == "topk:0.01+q:4+zstd"
    assert load_agent_config(write(tmp_path, "device_id: d1\n")).uplink.codec == "float32"
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, """
            device_id: d1
            uplink:
              codec: topk:0.01+q:3
            """))
    text = str(info.value)
    assert "uplink" in text and "q" in text and "3" in text


def test_device_ids_starting_with_fedd_are_reserved(tmp_path):
    path = tmp_path / "fedd.yaml"
    path.write_text("device_id: fedd-hub\n")
    with pytest.raises(ConfigError, match=r"fedd.yaml:1: device_id: .*reserved for the hub"):
        load_agent_config(path)
    path.write_text("device_id: feddish-1\n")
    assert load_agent_config(path).device_id == "feddish-1"
