"""The sensor section of the agent config picks and sets up the source."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedd.agent.sensors import CommandSource, ReplaySource, open_source
from fedd.config import ConfigError, load_agent_config
from fedd.datasets import hapt
from fedd.datasets.hapt import DatasetError


def _config(tmp_path: Path, sensor: str):
    path = tmp_path / "fedd.yaml"
    path.write_text(f"device_id: d1\nsensor:\n{sensor}")
    return load_agent_config(path)


def test_command_kind_builds_a_command_source(tmp_path: Path) -> None:
    config = _config(tmp_path, f"  kind: command\n  rate_hz: 25\n  command:\n"
                               f"    argv: [{sys.executable}, -c, 'print(1)']\n"
                               f"    channels: [5, 4, 3, 2, 1, 0]\n    label_column: 6\n")
    source = open_source(config.sensor, config.window)
    assert isinstance(source, CommandSource)
    assert source.rate_hz == 25 and source.holdout() is None


def test_replay_is_the_default(tmp_path: Path) -> None:
    config = _config(tmp_path, "  rate_hz: 50\n")
    assert isinstance(open_source(config.sensor, config.window), ReplaySource)


def test_replay_without_the_hapt_data_says_what_to_set(tmp_path: Path, monkeypatch) -> None:
    """The shipped default on a packaged device, which carries no data set."""
    monkeypatch.setattr(hapt, "PACKAGE", "fedd_test_no_such_dataset_package")
    config = _config(tmp_path, "  rate_hz: 50\n")
    with pytest.raises(DatasetError, match=r"not found.*set sensor\.kind to iio or command"):
        open_source(config.sensor, config.window)


@pytest.mark.parametrize(("sensor", "message"), [
    ("  iio:\n    channels: [accel_x, accel_y]\n", "sensor.iio: channels must name 6"),
    ("  command:\n    channels: [0, 1, 2, 3, 4, 5]\n    scale: [1.0]\n",
     "sensor.command: scale needs one factor per channel"),
    ("  kind: spi\n", "sensor.kind: must be one of"),
])
def test_bad_sensor_settings_name_the_key(tmp_path: Path, sensor: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, sensor)
