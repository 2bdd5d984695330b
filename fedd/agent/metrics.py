"""The heartbeat's numbers as a Prometheus node_exporter textfile.

node_exporter's textfile collector reads `*.prom` files from a directory;
a device that already runs node_exporter gets fedd's health on the same
scrape, with no port of ours to open. Each gauge is a heartbeat field
(docs/heartbeat.md), labelled with the device; a field that is null is left
out rather than faked. prometheus-client writes the file atomically.
"""

from __future__ import annotations

from dataclasses import asdict

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from fedd.wire import Heartbeat

PREFIX = "fedd_"
NESTED = ("evaluation", "drift")  # objects whose numbers become fedd_<object>_<key>


def _numbers(beat: Heartbeat) -> dict[str, float]:
    """Every numeric or boolean field of the heartbeat, nested ones flattened."""
    flat: dict[str, object] = {}
    for key, value in asdict(beat).items():
        if key in NESTED:
            for inner, number in (value or {}).items():
                flat[f"{key}_{inner}"] = number
        else:
            flat[key] = value
    return {key: float(value) for key, value in flat.items()
            if isinstance(value, int | float) and key not in ("time", "format")}


def write_textfile(path: str, beat: Heartbeat) -> None:
    registry = CollectorRegistry()
    for key, value in sorted(_numbers(beat).items()):
        gauge = Gauge(PREFIX + key, f"heartbeat field {key} (docs/heartbeat.md)", ["device"],
                      registry=registry)
        gauge.labels(beat.device).set(value)
    Gauge(PREFIX + "heartbeat_time_seconds", "Unix time of the heartbeat", ["device"],
          registry=registry).labels(beat.device).set(beat.time)
    write_to_textfile(path, registry)
