"""Sensor sources: where the agent's samples come from.

Every source yields the same `Chunk`s (see `source`), so windowing and
features are identical whatever the samples come from:

- `replay`: a recorded person played back on an accelerated clock, with
  the person's holdout windows so a demo can score the device on its future;
- `iio`: a Linux Industrial I/O accelerometer/gyroscope, buffered through
  `/dev/iio:deviceN` where the device allows it, else polled through sysfs;
- `command`: lines of numbers from a command's standard output or from
  the agent's own standard input.
"""

from __future__ import annotations

from fedd.agent.sensors.command import CommandError, CommandFailed, CommandSource
from fedd.agent.sensors.iio import (
    DEFAULT_CHANNELS,
    IioBufferUnavailable,
    IioChannelNotFound,
    IioDeviceNotFound,
    IioError,
    IioSource,
    IioTypeError,
)
from fedd.agent.sensors.replay import ReplaySource
from fedd.agent.sensors.source import CHUNK_INTERVAL_S, Chunk, SensorError, SensorSource
from fedd.config import SensorConfig, WindowConfig
from fedd.datasets import hapt_person, load_stream, npz_person
from fedd.datasets.hapt import DatasetError

__all__ = [
    "CHUNK_INTERVAL_S",
    "DEFAULT_CHANNELS",
    "Chunk",
    "CommandError",
    "CommandFailed",
    "CommandSource",
    "IioBufferUnavailable",
    "IioChannelNotFound",
    "IioDeviceNotFound",
    "IioError",
    "IioSource",
    "IioTypeError",
    "ReplaySource",
    "SensorError",
    "SensorSource",
    "open_source",
]


def open_source(sensor: SensorConfig, window: WindowConfig) -> SensorSource:
    """Build the configured source."""
    if sensor.kind == "iio":
        iio = sensor.iio
        return IioSource(device=iio.device, channels=iio.channels, rate_hz=sensor.rate_hz,
                         mode=iio.mode, buffer_length=iio.buffer_length, trigger=iio.trigger,
                         timestamps=iio.timestamps, gap_tolerance=iio.gap_tolerance)
    if sensor.kind == "command":
        cmd = sensor.command
        return CommandSource(command=cmd.argv or None, rate_hz=sensor.rate_hz,
                             channels=cmd.channels, columns=cmd.columns,
                             label_column=cmd.label_column,
                             timestamp_column=cmd.timestamp_column,
                             timestamp_unit_s=cmd.timestamp_unit_s, scale=cmd.scale,
                             gap_tolerance=cmd.gap_tolerance,
                             max_line_bytes=cmd.max_line_bytes)
    replay = sensor.replay
    if replay.dataset == "hapt":
        try:
            data = hapt_person(replay.person, window.size, window.step)
        except DatasetError as exc:  # the shipped default, on a device without the data
            raise DatasetError(f"{exc} (sensor.kind replay, dataset hapt: a demo source; "
                               "on a device set sensor.kind to iio or command)") from exc
    elif replay.dataset == "stream":
        data = load_stream(replay.npz_path or "")
    else:
        data = npz_person(replay.npz_path or "", replay.person)
    return ReplaySource(data, rate_hz=sensor.rate_hz, speed=replay.speed, loop=replay.loop)
