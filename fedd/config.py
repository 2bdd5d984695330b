"""Typed configuration: YAML files loaded into frozen dataclasses.

The schema is the dataclasses below; one generic walker reads their fields and
type hints, so adding a setting is adding a field. Every error names the file,
the line and the dotted key, because a device owner fixing a config over a
serial console has nothing else to go on.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fedd.pipeline import Pipeline

__all__ = [
    "EXIT_CONFIG_INVALID",
    "EXIT_CONFIG_MISSING",
    "AgentConfig",
    "AggregationConfig",
    "BrokerConfig",
    "ConfigError",
    "DeviceTrustConfig",
    "FleetTrustConfig",
    "HeartbeatConfig",
    "HubConfig",
    "LedgerConfig",
    "LimitsConfig",
    "ModelConfig",
    "ReconnectConfig",
    "ReplayConfig",
    "RobustConfig",
    "SchedulerConfig",
    "SensorConfig",
    "StoreConfig",
    "TlsConfig",
    "TrainingConfig",
    "UnusableFileError",
    "WindowConfig",
    "detect_role",
    "load_agent_config",
    "load_config",
    "load_hub_config",
]

EXIT_CONFIG_INVALID = 78  # sysexits EX_CONFIG
EXIT_CONFIG_MISSING = 66  # sysexits EX_NOINPUT

Role = Literal["agent", "hub"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A config file that cannot be used, with where and why.

    ``exit_code`` is what a daemon should exit with, so systemd and scripts can
    tell "no file" (66) from "bad file" (78) without parsing the message.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        line: int | None,
        key: str | None,
        message: str,
        *,
        exit_code: int = EXIT_CONFIG_INVALID,
    ) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.key = key
        self.message = message
        self.exit_code = exit_code
        super().__init__(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        """Survive pickling (multiprocessing) with the keyword-only exit code intact."""
        return (type(self), (self.path, self.line, self.key, self.message), self.__dict__)

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return ": ".join(p for p in (where, self.key, self.message) if p)


class UnusableFileError(Exception):
    """A file a valid config names (a key, a certificate) that cannot be used at start.

    The message starts with the dotted key; daemons exit with EXIT_CONFIG_INVALID.
    """


def setting(default: Any = dataclasses.MISSING, **constraints: Any) -> Any:
    """A field with a default and constraints (min, max, gt, pattern, hint) for the walker."""
    return field(default=default, metadata=constraints)


IDENTIFIER = {
    "pattern": r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
    "hint": "must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
    " (it becomes an MQTT topic level)",
}
# A device id is also its certificate's CN; "fedd-…" names the hub and monitor (fedd.pki).
DEVICE_ID = {
    "pattern": r"(?!fedd-)" + IDENTIFIER["pattern"],
    "hint": IDENTIFIER["hint"] + "; ids starting with fedd- are reserved for the hub",
}


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Mutual TLS: the fleet CA, and this program's certificate and key (scripts/provision)."""

    ca_file: str = "/etc/fedd/tls/ca.crt"
    cert_file: str = "/etc/fedd/tls/client.crt"
    key_file: str = "/etc/fedd/tls/client.key"


@dataclass(frozen=True, kw_only=True)
class ReconnectConfig:
    """Exponential backoff with full jitter, so a fleet that lost its broker spreads out."""

    initial_s: float = setting(1.0, gt=0, max=3600)
    max_s: float = setting(120.0, gt=0, max=86400)
    stable_s: float = setting(60.0, min=0, max=86400)

    def __post_init__(self) -> None:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """The MQTT broker both programs connect to."""

    host: str = "127.0.0.1"
    port: int = setting(8883, min=1, max=65535)
    transport: Literal["tls", "tcp"] = "tls"
    tls: TlsConfig = field(default_factory=TlsConfig)
    client_id: str | None = setting(None, **IDENTIFIER)
    keepalive_s: int = setting(30, min=5, max=3600)
    session_expiry_s: int = setting(86400, min=0, max=0xFFFFFFFE)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which shipped model to use; the manifest pins its hash and signatures."""

    manifest: str = "/usr/share/fedd/models/manifest.json"
    name: str = "har-mlp"


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """Recorded data played back as a live sensor: demos and benchmarks need no hardware."""

    dataset: Literal["hapt", "npz", "stream"] = "hapt"
    person: int = setting(1, min=1, max=100000)
    npz_path: str | None = None
    speed: float = setting(1.0, gt=0, max=100000)
    loop: bool = False

    def __post_init__(self) -> None:
        if self.dataset != "hapt" and self.npz_path is None:
            raise ValueError(f"npz_path is required when dataset is '{self.dataset}'")


SHIPPED_CHANNELS = 6  # the shipped feature sets read acc x/y/z then gyro x/y/z


@dataclass(frozen=True, kw_only=True)
class IioConfig:
    """A Linux IIO accelerometer/gyroscope (/sys/bus/iio/devices, /dev/iio:deviceN)."""

    device: str = "iio:device0"
    channels: tuple[str, ...] = ("accel_x", "accel_y", "accel_z",
                                 "anglvel_x", "anglvel_y", "anglvel_z")
    mode: Literal["auto", "buffered", "polled"] = "auto"
    buffer_length: int | None = setting(None, min=2, max=1048576)
    trigger: str | None = None
    timestamps: bool = True
    gap_tolerance: float = setting(2.0, gt=1, max=1000)

    def __post_init__(self) -> None:
        if len(self.channels) != SHIPPED_CHANNELS:
            raise ValueError(f"channels must name {SHIPPED_CHANNELS} channels "
                             f"(acc x/y/z, gyro x/y/z), got {len(self.channels)}")


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """Samples as text lines from a program (or the agent's stdin)."""

    argv: tuple[str, ...] = ()
    channels: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    columns: int | None = setting(None, min=1, max=4096)
    label_column: int | None = setting(None, min=0, max=4095)
    timestamp_column: int | None = setting(None, min=0, max=4095)
    timestamp_unit_s: float = setting(1.0, gt=0, max=86400)
    scale: tuple[float, ...] | None = None
    gap_tolerance: float = setting(2.0, gt=1, max=1000)
    max_line_bytes: int = setting(1024, min=16, max=1048576)

    def __post_init__(self) -> None:
        if len(self.channels) != SHIPPED_CHANNELS:
            raise ValueError(f"channels must list {SHIPPED_CHANNELS} column indices "
                             f"(acc x/y/z, gyro x/y/z), got {len(self.channels)}")
        if self.scale is not None and len(self.scale) != len(self.channels):
            raise ValueError(f"scale needs one factor per channel ({len(self.channels)}), "
                             f"got {len(self.scale)}")


@dataclass(frozen=True, kw_only=True)
class SensorConfig:
    """Where samples come from; ``kind`` picks the driver and its sub-section."""

    kind: Literal["replay", "iio", "command"] = "replay"
    rate_hz: float = setting(50.0, gt=0, max=100000)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    iio: IioConfig = field(default_factory=IioConfig)
    command: CommandConfig = field(default_factory=CommandConfig)


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    """Sliding windows over the sample stream: the unit the store keeps and the model sees."""

    size: int = setting(128, min=16, max=65536)
    step: int = setting(64, min=1, max=65536)

    def __post_init__(self) -> None:
        if self.step > self.size:
            raise ValueError(f"step ({self.step}) must not exceed size ({self.size})")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Bounds on the local window store, so a device never fills its flash."""

    max_windows: int = setting(20000, min=100)
    max_age_h: float = setting(168.0, gt=0)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """When and how hard a device trains, and what stays personal (the strategy)."""

    strategy: Literal["finetune", "fedavg", "fedper", "fedrep", "ditto", "local"] = "finetune"
    min_windows: int = setting(64, min=1)
    epochs: int = setting(2, min=1, max=100)
    learning_rate: float | None = setting(None, gt=0, max=10)  # None: the model's own
    head_epochs: int = setting(1, min=0, max=100)
    min_interval_s: float = setting(60.0, min=0)


HOURS = {
    "pattern": r"([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)",
    "hint": "must be HH:MM-HH:MM in local time, e.g. 22:00-06:00 (it may wrap midnight)",
}


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """When the device may train: heat, power, load, memory, hours and budgets."""

    enabled: bool = True
    max_temperature_c: float = setting(70.0, min=20, max=150)
    cooldown_c: float = setting(5.0, min=0, max=50)
    temperature_sensors: tuple[str, ...] = ()
    defer_when_throttled: bool = True
    require_power: bool = False
    min_battery_percent: float = setting(30.0, min=0, max=100)
    max_cpu_percent: float = setting(50.0, gt=0, max=100)
    cpu_window_s: float = setting(10.0, gt=0, max=3600)
    min_memory_mib: float = setting(128.0, min=0)
    hours: tuple[str, ...] = setting((), **HOURS)
    cpu_budget_s_per_hour: float | None = setting(60.0, gt=0, max=3600 * 1024)
    max_runs_per_day: int | None = setting(96, min=1)
    watts_per_cpu: float = setting(2.5, gt=0, max=10000)
    power_rail: str | None = None
    check_interval_s: float = setting(5.0, min=0.1, max=3600)
    nice: int = setting(19, min=0, max=19)
    idle_io: bool = True

    def __post_init__(self) -> None:
        for span in self.hours:
            start, end = span.split("-")
            if start == end:
                raise ValueError(
                    f"hours: {span!r} is empty; write 00:00-24:00 for the whole day"
                )


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """When the device's recent data departs from what its model was trained on."""

    enabled: bool = True
    kl_threshold: float = setting(0.5, gt=0, max=100)
    shift_threshold: float = setting(1.0, gt=0, max=100)
    recent_windows: int = setting(128, min=8, max=100000)
    min_windows: int = setting(32, min=4, max=100000)
    check_interval_s: float = setting(10.0, gt=0, max=86400)

    def __post_init__(self) -> None:
        if self.min_windows > self.recent_windows:
            raise ValueError(f"min_windows ({self.min_windows}) must not exceed "
                             f"recent_windows ({self.recent_windows})")


def parse_delegate_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`library?key=value&key=value` → (library, options); `%XX` escapes a `&` or `=`
    in a value, and a `+` stays a `+` (an option may be a path, not a form field)."""
    library, _, query = spec.partition("?")
    if not library:
        raise ValueError(f"delegate {spec!r} names no library")
    options = {}
    for pair in query.split("&") if query else ():
        key, equals, value = pair.partition("=")
        if not key or not equals:
            raise ValueError(f"delegate {spec!r}: option {pair!r} is not key=value")
        options[unquote(key)] = unquote(value)
    return library, options


@dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    """Accelerators for inference; training always runs on the CPU."""

    delegates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for spec in self.delegates:
            parse_delegate_spec(spec)


@dataclass(frozen=True, kw_only=True)
class HeartbeatConfig:
    """How often a device reports its health to the hub."""

    interval_s: float = setting(60.0, min=0.1)
    # Each interval is drawn from interval_s x (1 +- jitter): a fleet started together
    # does not report in lockstep.
    jitter: float = setting(0.1, min=0, max=0.5)
    # A node_exporter textfile-collector file (*.prom) the agent rewrites each beat.
    prometheus_textfile: str | None = None


@dataclass(frozen=True, kw_only=True)
class UplinkConfig:
    """How updates are compressed on their way to the hub (docs/wire-format.md)."""

    codec: str = "float32"
    # Whole MQTT PUBLISHes of updates (fedd.link.publish_wire_bytes); None = unlimited.
    bytes_per_hour: int | None = setting(None, min=64)
    max_update_bytes: int | None = setting(None, min=64)
    # An update stays in the outbox until the hub acknowledges it on ack/<device>;
    # without an acknowledgement within ack_timeout_s it is sent again.
    ack_timeout_s: float = setting(60.0, min=1, max=86400)
    # Outbox bounds; when either is reached, new deltas fold into the residual.
    outbox_max_updates: int = setting(16, min=1, max=100000)
    outbox_max_bytes: int = setting(1048576, min=1024)

    def __post_init__(self) -> None:
        Pipeline.from_spec(self.codec)  # a SpecError is the pipeline's own sentence


@dataclass(frozen=True, kw_only=True)
class DeviceTrustConfig:
    """The device's side of attestation and update signing (docs/security.md)."""

    # The TPM's TCTI, always explicit (e.g. "device:/dev/tpmrm0"); None: no TPM here,
    # and the device answers every challenge with "no TPM" for the hub's policy to judge.
    tcti: str | None = None
    ak_handle: int = setting(0x81010002, min=0x81000000, max=0x817FFFFF)
    pcrs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 23)
    # Reset this PCR and extend it with the digest of the agent's code and model at
    # start (16 or 23, the ones locality 0 may reset); None: do not measure.
    measure_pcr: int | None = 23
    # The Ed25519 update key (scripts/enroll writes it); None: updates go unsigned.
    signing_key: str | None = None

    def __post_init__(self) -> None:
        if not self.pcrs or len(set(self.pcrs)) != len(self.pcrs) or not all(
                0 <= p <= 23 for p in self.pcrs):
            raise ValueError("pcrs must be distinct PCR indices 0-23")
        if self.measure_pcr is not None and self.measure_pcr not in (16, 23):
            raise ValueError("measure_pcr must be 16 or 23 (resettable at locality 0) or null")
        if self.tcti is not None and not self.tcti.strip():
            raise ValueError("tcti must name the TPM (e.g. device:/dev/tpmrm0) or be null")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """One device's ``fedd.yaml``."""

    device_id: str = setting(**DEVICE_ID)
    fleet: str = setting("default", **IDENTIFIER)
    log_level: LogLevel = "info"
    state_dir: str = "/var/lib/fedd"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sensor: SensorConfig = field(default_factory=SensorConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    trust: DeviceTrustConfig = field(default_factory=DeviceTrustConfig)


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """Buffered async aggregation (FedBuff): K updates or T seconds; stale ones weigh less."""

    buffer_size: int = setting(10, min=1)
    max_wait_s: float = setting(300.0, gt=0)
    quorum: int = setting(3, min=1)
    max_staleness: int = setting(20, min=0)
    staleness_exponent: float = setting(0.5, min=0, max=4)
    server_learning_rate: float = setting(1.0, gt=0, max=10)

    def __post_init__(self) -> None:
        if self.quorum > self.buffer_size:
            raise ValueError(
                f"quorum ({self.quorum}) must not exceed buffer_size ({self.buffer_size})"
            )


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """Bounds on each update's influence (fedd.hub.robust); every bound is on one
    update's L2 norm over all its shared parts, the median of the fleet's recent
    norms scaling the relative ones (defaults: scripts/bench-robust)."""

    clip_norm: float | None = setting(None, gt=0)
    clip_multiple: float | None = setting(3.0, min=1, max=1000)
    reject_multiple: float | None = setting(10.0, min=1, max=1000000)
    norm_history: int = setting(100, min=1, max=100000)
    warmup: int = setting(10, min=1, max=100000)
    rule: Literal["mean", "trimmed_mean", "median"] = "mean"
    trim: float = setting(0.2, min=0, max=0.5)

    def __post_init__(self) -> None:
        if self.trim >= 0.5:
            raise ValueError(f"trim ({self.trim}) must be below 0.5: it drops that share of "
                             "each coordinate's values from each end")
        if self.warmup > self.norm_history:
            raise ValueError(f"warmup ({self.warmup}) must not exceed norm_history "
                             f"({self.norm_history})")
        if None not in (self.clip_multiple, self.reject_multiple) \
                and self.reject_multiple < self.clip_multiple:  # type: ignore[operator]
            raise ValueError(f"reject_multiple ({self.reject_multiple}) must not be below "
                             f"clip_multiple ({self.clip_multiple})")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Bounds that keep a bad or hostile update from hurting the hub."""

    max_update_bytes: int = setting(4194304, min=1024, max=268435456)


@dataclass(frozen=True, kw_only=True)
class LedgerConfig:
    """The hub's durable record of every update it folded in or rejected (exactly once)."""

    # Records older than this are pruned; a device's later resend of a pruned seq
    # is still recognized as a duplicate by its high-water mark.
    retention_days: float = setting(30.0, gt=0)


@dataclass(frozen=True, kw_only=True)
class FleetTrustConfig:
    """Which devices may shape the model: attestation policy and update signatures."""

    # off: no attestation; prefer: untrusted devices' updates are folded but flagged;
    # require: they are rejected with the reason.
    mode: Literal["off", "prefer", "require"] = "off"
    # Every update must carry a valid Ed25519 signature of its enrolled device.
    require_signatures: bool = False
    # One <device_id>.json per enrolled device (scripts/enroll register).
    enrollments: str = "/var/lib/fedd-hub/enrollments"
    # Allowed PCR values per device class (docs/security.md); required unless mode is off.
    pcr_policy: str | None = None
    # A passed challenge trusts the device this long; it is challenged again before.
    window_s: float = setting(86400.0, min=60, max=30 * 86400)
    nonce_ttl_s: float = setting(60.0, min=1, max=3600)

    def __post_init__(self) -> None:
        if self.mode != "off" and self.pcr_policy is None:
            raise ValueError(f"mode {self.mode} needs a pcr_policy file")


@dataclass(frozen=True, kw_only=True)
class HubConfig:
    """The hub's ``hub.yaml``."""

    fleet: str = setting("default", **IDENTIFIER)
    log_level: LogLevel = "info"
    state_dir: str = "/var/lib/fedd-hub"
    share_group: str = setting("hub", **IDENTIFIER)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    trust: FleetTrustConfig = field(default_factory=FleetTrustConfig)


# ---------------------------------------------------------------- loading

_ACCEPTS = {bool: ("bool",), int: ("int",), float: ("int", "float"), str: ("str",)}
_NAMES = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "null": "null",
    "timestamp": "a timestamp",
}


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _tag(node: Node) -> str:
    return node.tag.rsplit(":", 1)[-1]


def _got(node: Node) -> str:
    """Describe a node the way a user wrote it, for "expected X, got Y"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if _tag(node) == "null":
        return "null"
    return f"{_NAMES.get(_tag(node), _tag(node))} ({node.value!r})"


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _compose(path: str | os.PathLike[str]) -> Node | None:
    """Read and compose the file, keeping every node's line for later errors."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ConfigError(
            path,
            None,
            None,
            f"cannot read config file: {e.strerror or e}",
            exit_code=EXIT_CONFIG_MISSING,
        ) from None
    try:
        return yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        text = ": ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
        line = mark.line + 1 if mark else None
        raise ConfigError(path, line, None, f"YAML syntax error: {text or e}") from None


def _broken_bounds(value: float, meta: dict[str, Any]) -> str | None:
    """Return the bounds a number breaks, in words, or None if it is within them."""
    ok = (
        ("min" not in meta or value >= meta["min"])
        and ("gt" not in meta or value > meta["gt"])
        and ("max" not in meta or value <= meta["max"])
    )
    if ok:
        return None
    words = {"min": "at least", "gt": "greater than", "max": "at most"}
    return " and ".join(f"{w} {meta[k]}" for k, w in words.items() if k in meta)


def _scalar(tp: type, meta: dict[str, Any], node: Node, key: str, path: str) -> Any:
    """Convert one scalar node to ``tp`` and check its constraints."""

    def fail(message: str) -> ConfigError:
        return ConfigError(path, _line(node), key, message)

    if not isinstance(node, ScalarNode) or _tag(node) not in _ACCEPTS[tp]:
        quotable = tp is str and _tag(node) in ("int", "float", "bool", "timestamp")
        hint = " (quote it to make it a string)" if quotable else ""
        raise fail(f"expected {_NAMES[_ACCEPTS[tp][-1]]}, got {_got(node)}{hint}")
    value = tp(SafeConstructor().construct_object(node))
    if tp is float and not math.isfinite(value):
        raise fail(f"must be a finite number, got {node.value}")
    if tp in (int, float) and (bounds := _broken_bounds(value, meta)):
        raise fail(f"must be {bounds}, got {node.value}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise fail(f"{value!r} is not valid: {meta.get('hint', 'must match ' + meta['pattern'])}")
    return value


def _value(tp: Any, meta: dict[str, Any], knode: Node, vnode: Node, key: str, path: str) -> Any:
    """Convert a node to the type hint ``tp``: dispatch on the kind of hint."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, vnode, key, _line(knode), path)
    if origin in (types.UnionType, typing.Union):  # X | None
        if _tag(vnode) == "null":
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _value(inner, meta, knode, vnode, key, path)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # a list: tuple[X, ...]
        if not isinstance(vnode, SequenceNode):
            hint = "; write [item] for one item, [] for none"
            raise ConfigError(path, _line(vnode), key, f"expected a list, got {_got(vnode)}{hint}")
        return tuple(_value(args[0], meta, knode, item, f"{key}[{i}]", path)
                     for i, item in enumerate(vnode.value))
    if origin is Literal:
        if not (isinstance(vnode, ScalarNode) and _tag(vnode) == "str" and vnode.value in args):
            choices = ", ".join(repr(a) for a in args)
            got = vnode.value if isinstance(vnode, ScalarNode) else ""
            close = difflib.get_close_matches(str(got), args, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                path, _line(vnode), key, f"must be one of {choices}, got {_got(vnode)}{hint}"
            )
        return vnode.value
    return _scalar(tp, meta, vnode, key, path)


def _build(cls: type, node: Node | None, prefix: str | None, line: int | None, path: str) -> Any:
    """Walk one mapping node into ``cls``; ``line`` is where errors about the whole section go."""
    if node is None or (isinstance(node, ScalarNode) and _tag(node) == "null"):
        pairs = []  # an empty file or an empty section: all defaults
    elif isinstance(node, MappingNode):
        pairs = node.value
    else:
        where = "" if prefix else " at the top level"
        raise ConfigError(path, _line(node), prefix, f"expected a mapping{where}, got {_got(node)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    seen: dict[str, int] = {}
    kwargs = {}
    for knode, vnode in pairs:
        if not (isinstance(knode, ScalarNode) and _tag(knode) == "str"):
            raise ConfigError(
                path, _line(knode), prefix, f"keys must be strings, got {_got(knode)}"
            )
        name, key = knode.value, _join(prefix, knode.value)
        if name in seen:
            raise ConfigError(
                path, _line(knode), key, f"duplicate key (first set on line {seen[name]})"
            )
        seen[name] = _line(knode)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                path, _line(knode), key, f"unknown key{hint}; allowed keys: {', '.join(fields)}"
            )
        kwargs[name] = _value(hints[name], fields[name].metadata, knode, vnode, key, path)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(path, line, _join(prefix, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a cross-field check in __post_init__
        raise ConfigError(path, line, prefix, str(e)) from None


def _detect(node: Node | None) -> Role:
    if isinstance(node, MappingNode) and any(k.value == "aggregation" for k, _ in node.value):
        return "hub"
    return "agent"


def _load(path: str | os.PathLike[str], role: Role | None) -> AgentConfig | HubConfig:
    node = _compose(path)
    cls = {"agent": AgentConfig, "hub": HubConfig}[role or _detect(node)]
    return _build(cls, node, None, None if node is None else _line(node), os.fspath(path))


def detect_role(path: str | os.PathLike[str]) -> Role:
    """Tell a hub file (it has ``aggregation``) from an agent file, for ``fedd check-config``."""
    return _detect(_compose(path))


def load_config(path: str | os.PathLike[str], role: Role | None = None) -> AgentConfig | HubConfig:
    """Load either kind of file; ``role`` None means guess with :func:`detect_role`."""
    if role not in (None, "agent", "hub"):
        raise ValueError(f"role must be 'agent', 'hub' or None, got {role!r}")
    return _load(path, role)


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Load a device's ``fedd.yaml``; raises :class:`ConfigError`."""
    return _load(path, "agent")


def load_hub_config(path: str | os.PathLike[str]) -> HubConfig:
    """Load the hub's ``hub.yaml``; raises :class:`ConfigError`."""
    return _load(path, "hub")
