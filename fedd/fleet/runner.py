"""`fedd fleet`: a whole federated fleet on one machine, on real data.

A private Mosquitto on a free loopback port, in the fleet's production mode
(mutual TLS with certificates made for the run, the fleet ACL), one `fedd
hub` process and one `fedd agent` process per HAPT person, each agent replaying its person's
recorded stream on an accelerated clock as if it were live. The runner only
watches what any operator could: the retained model topic and the
heartbeats. It prints a row per global version, then a summary, and writes
`report.json` and `accuracy.png` into the run folder.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from fedd import pki, topics
from fedd.datasets import hapt, hapt_person, save_stream
from fedd.fleet.broker import Mosquitto, MutualTLS
from fedd.fleet.report import HEADER, FleetReport, VersionRow, format_row, plot, score_row
from fedd.link import Link, TlsFiles
from fedd.pipeline import Pipeline, SpecError
from fedd.wire import GlobalModel, Heartbeat, WireError

FLEET = "demo"
MODELS = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
LAG_VERSIONS = 3  # print a version once this many newer ones exist, scored or not
FINAL_GRACE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class FleetOptions:
    devices: int = 10
    versions: int = 60
    timeout_s: float = 600.0
    speed: float = 50.0
    out: Path = Path("runs/fleet")
    buffer_size: int = 5
    strategy: str = "finetune"
    model: str = "har-mlp"
    codec: str = "float32"
    manifest: Path = MODELS

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 30:
            raise ValueError(f"--devices must be 1-30 (HAPT has 30 people), got {self.devices}")
        if not 1 <= self.buffer_size <= self.devices:
            raise ValueError(f"--buffer-size must be 1-{self.devices}, got {self.buffer_size}")
        try:
            Pipeline.from_spec(self.codec)
        except SpecError as exc:
            raise ValueError(f"--codec: {exc}") from None


def _say(text: str) -> None:
    print(text, flush=True)


def _write_yaml(path: Path, content: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedd.cli", *args],
                                stdout=out, stderr=subprocess.STDOUT)


def _peak_rss(pid: int) -> int | None:
    """VmHWM of a live process, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Watcher:
    """Turns the model topic and the heartbeats into table rows."""

    def __init__(self, devices: int, started: float) -> None:
        self.devices = devices
        self.started = started
        self.rows: dict[int, VersionRow] = {}
        self.scores: dict[int, dict[str, tuple[float, float]]] = {}
        self.uplink: dict[str, int] = {}
        self.updates: dict[str, int] = {}
        self.printed: list[VersionRow] = []

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic.endswith("/model/current"):
                model = GlobalModel.decode(payload, max_bytes=64 * 2**20)
                self.rows.setdefault(model.version, VersionRow(
                    model.version, time.monotonic() - self.started, model.contributors,
                    model.mean_staleness, uplink_bytes=sum(self.uplink.values())))
            else:
                beat = Heartbeat.decode(payload)
                self.uplink[beat.device] = beat.uplink_bytes
                self.updates[beat.device] = beat.updates_sent
                if beat.evaluation:
                    self.scores.setdefault(beat.evaluation.version, {})[beat.device] = (
                        beat.evaluation.global_accuracy, beat.evaluation.personal_accuracy)
        except WireError as exc:
            _say(f"  (ignored a malformed message on {topic}: {exc})")

    def print_ready(self, *, flush_all: bool = False) -> None:
        newest = max(self.rows, default=-1)
        done = {r.version for r in self.printed}
        for version in sorted(v for v in self.rows if v not in done):
            scored = self.scores.get(version, {})
            if not (flush_all or len(scored) >= self.devices or newest >= version + LAG_VERSIONS):
                break
            row = self.rows[version]
            score_row(row, scored)
            self.printed.append(row)
            _say(format_row(row))

    def complete(self, version: int) -> bool:
        return len(self.scores.get(version, {})) >= self.devices


async def _watch(port: int, monitor: TlsFiles, options: FleetOptions,
                 agents: list[subprocess.Popen[bytes]], watcher: Watcher) -> str:
    link = Link(host="127.0.0.1", port=port, client_id=f"fedd-fleet-{os.getpid()}",
                tls=monitor,
                subscriptions=[(topics.model_current(FLEET), 1), (topics.heartbeats(FLEET), 0)])
    deadline = watcher.started + options.timeout_s
    reached_at: float | None = None
    async with link:
        while True:
            message = await link.next_message(timeout=0.5)
            if message is not None:
                watcher.on_message(message.topic, message.payload)
            watcher.print_ready()
            now = time.monotonic()
            if any(a.poll() is not None for a in agents):
                return "an agent exited early (see its log)"
            if now > deadline:
                return f"timeout after {options.timeout_s:.0f} s"
            if reached_at is None and max(watcher.rows, default=-1) >= options.versions:
                reached_at = now
            if reached_at is not None and (watcher.complete(options.versions)
                                           or now - reached_at > FINAL_GRACE_S):
                return f"reached version {options.versions}"


def _prepare_streams(options: FleetOptions, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    _say(f"preparing the replay streams of {options.devices} HAPT people …")
    people = hapt.load()
    paths = []
    for person in range(1, options.devices + 1):
        path = folder / f"person-{person:02d}.npz"
        save_stream(hapt_person(person, people=people), path)
        paths.append(path)
    return paths


def _provision(folder: Path, devices: list[str]) -> dict[str, TlsFiles]:
    """A fleet CA and every certificate the run needs: the broker, hub, watcher, devices."""
    ca, _ = pki.init_ca(folder, FLEET)
    pki.issue_broker(ca, folder, ["127.0.0.1", "localhost"])
    bundles = {}
    for identity in (pki.HUB_IDENTITY, pki.MONITOR_IDENTITY, *devices):
        issued = pki.issue_client(ca, folder, identity)
        bundles[identity] = TlsFiles(*(str(issued.folder / name) for name in (
            pki.CA_CERT, pki.CLIENT_CERT, pki.CLIENT_KEY)))
    return bundles


def _broker_section(port: int, tls: TlsFiles) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": port, "transport": "tls",
            "tls": {"ca_file": tls.ca_file, "cert_file": tls.cert_file,
                    "key_file": tls.key_file}}


def _agent_config(person: int, stream: Path, broker: dict[str, object], out: Path,
                  options: FleetOptions) -> dict[str, object]:
    return {
        "device_id": f"person-{person:02d}", "fleet": FLEET, "log_level": "info",
        "state_dir": str(out / "state" / f"person-{person:02d}"),
        "broker": broker,
        "model": {"manifest": str(options.manifest), "name": options.model},
        "sensor": {"kind": "replay", "rate_hz": hapt.SAMPLE_RATE_HZ,
                   "replay": {"dataset": "stream", "person": person, "npz_path": str(stream),
                              "speed": options.speed}},
        "training": {"strategy": options.strategy, "min_windows": 32, "min_interval_s": 1.0},
        "heartbeat": {"interval_s": 2.0},
        "uplink": {"codec": options.codec},
        # Ten agents share two cores here: to each of them the others are the
        # device's "real job", so the load rule and the budgets would idle the demo.
        "scheduler": {"max_cpu_percent": 100.0, "cpu_budget_s_per_hour": None,
                      "max_runs_per_day": None},
    }


def _hub_config(broker: dict[str, object], out: Path, options: FleetOptions
                ) -> dict[str, object]:
    return {
        "fleet": FLEET, "log_level": "info", "state_dir": str(out / "state" / "hub"),
        "broker": broker,
        "model": {"manifest": str(options.manifest), "name": options.model},
        "aggregation": {"buffer_size": options.buffer_size,
                        "quorum": max(1, options.buffer_size // 2), "max_wait_s": 5.0,
                        "max_staleness": 20, "staleness_exponent": 0.5},
    }


def run_fleet(options: FleetOptions) -> int:
    out = options.out.resolve()
    if (out / "state").exists():
        raise SystemExit(f"{out} holds an earlier run; choose another --out or remove it")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "state").mkdir()
    streams = _prepare_streams(options, out / "data")
    devices = [f"person-{person:02d}" for person in range(1, len(streams) + 1)]
    bundles = _provision(out / "pki", devices)
    with Mosquitto(out / "broker", tls=MutualTLS(out / "pki", FLEET)) as broker:
        _say(f"broker: mosquitto on 127.0.0.1:{broker.port}, mutual TLS and the fleet ACL "
             f"(certificates in {out / 'pki'})")
        hub_broker = _broker_section(broker.port, bundles[pki.HUB_IDENTITY])
        hub = _start(["hub", "-c", str(_write_yaml(out / "hub.yaml",
                                                   _hub_config(hub_broker, out, options)))],
                     out / "logs" / "hub.log")
        agents = []
        for person, stream in enumerate(streams, start=1):
            device_broker = _broker_section(broker.port, bundles[devices[person - 1]])
            config = _write_yaml(out / f"agent-{person:02d}.yaml",
                                 _agent_config(person, stream, device_broker, out, options))
            agents.append(_start(["agent", "-c", str(config)],
                                 out / "logs" / f"agent-{person:02d}.log"))
        _say(f"hub and {len(agents)} agents started (logs in {out / 'logs'}); "
             f"stopping at version {options.versions}\n")
        _say(HEADER)
        watcher = Watcher(options.devices, time.monotonic())
        try:
            ended = asyncio.run(_watch(broker.port, bundles[pki.MONITOR_IDENTITY], options,
                                       agents, watcher))
        finally:
            peaks = [_peak_rss(a.pid) for a in agents]
            agent_codes = [_stop(a) for a in agents]
            hub_code = _stop(hub)
        watcher.print_ready(flush_all=True)
    wall = time.monotonic() - watcher.started
    report = _summarize(options, watcher, ended, wall, peaks, agent_codes, hub_code)
    report.write(out / "report.json")
    if any(r.personal_accuracy is not None for r in report.rows):
        plot(report.rows, out / "accuracy.png",
             f"fedd fleet: {options.devices} HAPT devices, {options.model}, "
             f"{options.strategy}, {options.codec}, FedBuff K={options.buffer_size}")
    _print_summary(report, out)
    clean = ended.startswith("reached") and hub_code == 0 and not any(agent_codes)
    return 0 if clean else 1


def _summarize(options: FleetOptions, watcher: Watcher, ended: str, wall: float,
               peaks: list[int | None], agent_codes: list[int], hub_code: int) -> FleetReport:
    rows = watcher.printed
    scored = [r for r in rows if r.personal_accuracy is not None]
    final = scored[-1] if scored else None
    updates = sum(watcher.updates.values())
    uplink = sum(watcher.uplink.values())
    known_peaks = [p for p in peaks if p]
    summary: dict[str, object] = {
        "ended": ended, "wall_time_s": round(wall, 1), "versions": max(watcher.rows, default=0),
        "final_version_scored": final.version if final else None,
        "final_personal_accuracy": final.personal_accuracy if final else None,
        "final_worst_personal_accuracy": final.worst_personal_accuracy if final else None,
        "final_global_accuracy": final.global_accuracy if final else None,
        "updates_sent": updates, "uplink_bytes": uplink,
        "uplink_bytes_per_update": round(uplink / updates, 1) if updates else None,
        "codec": Pipeline.from_spec(options.codec).spec,
        "agent_peak_rss_bytes_max": max(known_peaks, default=None),
        "agent_peak_rss_bytes_median": statistics.median(known_peaks) if known_peaks else None,
        "agent_exit_codes": agent_codes, "hub_exit_code": hub_code,
    }
    return FleetReport(options={k: str(v) for k, v in asdict(options).items()}, rows=rows,
                       summary=summary)


def _print_summary(report: FleetReport, out: Path) -> None:
    s = report.summary

    def pct(key: str) -> str:
        value = s[key]
        return "-" if value is None else f"{100 * float(value):.1f} %"  # type: ignore[arg-type]

    mib = 2**20
    rss_max = s["agent_peak_rss_bytes_max"]
    _say("\nsummary")
    _say(f"  ended                 {s['ended']} in {s['wall_time_s']} s")
    _say(f"  global versions       {s['versions']}")
    _say(f"  personal accuracy     {pct('final_personal_accuracy')} mean, "
         f"{pct('final_worst_personal_accuracy')} worst device "
         f"(version {s['final_version_scored']})")
    _say(f"  global accuracy       {pct('final_global_accuracy')} mean")
    _say(f"  uplink                {s['updates_sent']} updates, "
         f"{int(s['uplink_bytes']) / mib:.2f} MiB, "  # type: ignore[call-overload]
         f"{s['uplink_bytes_per_update']} bytes per update ({s['codec']})")
    if rss_max:
        _say(f"  agent peak RSS        {int(rss_max) / mib:.1f} MiB max, "  # type: ignore[call-overload]
             f"{float(s['agent_peak_rss_bytes_median']) / mib:.1f} MiB median")  # type: ignore[arg-type]
    _say(f"  exit codes            hub {s['hub_exit_code']}, agents {s['agent_exit_codes']}")
    _say(f"  report                {out / 'report.json'}, {out / 'accuracy.png'}")
